"""Decode cache (cache.py; spec §2 "Caches", §3 step 10): layout, per-sequence writes, in-place
updates inside the jitted decode step, and the FP8 indexer key cache against recomputation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, forward
from deepseek_jax.cache import index_key_stack, init_cache, write
from deepseek_jax.generate import decode_step, prefill
from tests.test_generate import random_params


def test_init_cache_layout():
    cfg = ModelConfig.preset("tiny")
    cache = init_cache(cfg, 3, 40, mtp=True)
    assert set(cache.layers) == {"dense_layers", "moe_layers", "mtp"} and cache.max_len == 40
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    for name, n in (("dense_layers", 1), ("moe_layers", 2), ("mtp", 1)):
        group = cache.layers[name]
        assert group.kv.shape == (n, 3, 40, width) and group.kv.dtype == jnp.float32
        assert group.index_k.shape == (n, 3, 40, cfg.index_head_dim) and group.index_k_scale is None
    assert cache.lengths.tolist() == [0, 0, 0]

    fp8 = init_cache(ModelConfig.preset("tiny", index_fp8=True, index_head_dim=128, dtype="bfloat16"), 2, 8)
    group = fp8.layers["moe_layers"]
    assert group.kv.dtype == jnp.bfloat16 and group.index_k.dtype == jnp.float8_e4m3fn
    assert group.index_k_scale.shape == (2, 2, 8) and group.index_k_scale.dtype == jnp.float32
    assert "mtp" not in fp8.layers

    with pytest.raises(ValueError, match="max_len"):
        init_cache(cfg, 2, 0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        init_cache(cfg.replace(num_nextn_predict_layers=0), 2, 8, mtp=True)


def test_write_and_read_rows():
    """T new rows land at start[b] + t of the addressed layer; nothing else changes."""
    cfg = ModelConfig.preset("tiny", index_fp8=True, index_head_dim=128)
    group = init_cache(cfg, 2, 10).layers["moe_layers"]
    rng = np.random.default_rng(0)
    kv = rng.normal(size=(2, 3, group.kv.shape[-1])).astype(np.float32)
    keys = rng.normal(size=(2, 3, 128)).astype(np.float32)
    scale = rng.uniform(size=(2, 3)).astype(np.float32)
    start = np.array([0, 6])
    new = write(group, 1, jnp.asarray(start), jnp.asarray(kv), jnp.asarray(keys).astype(jnp.float8_e4m3fn),
                jnp.asarray(scale))
    for b in range(2):
        rows = slice(start[b], start[b] + 3)
        np.testing.assert_array_equal(np.asarray(new.kv[1, b, rows]), kv[b])
        np.testing.assert_array_equal(np.asarray(new.index_k[1, b, rows], np.float32),
                                      np.asarray(jnp.asarray(keys[b]).astype(jnp.float8_e4m3fn), np.float32))
        np.testing.assert_array_equal(np.asarray(new.index_k_scale[1, b, rows]), scale[b])
    written = np.zeros((2, 2, 10), bool)
    written[1, 0, 0:3] = written[1, 1, 6:9] = True
    assert np.all(np.asarray(new.kv)[~written] == 0) and np.all(np.asarray(new.index_k_scale)[~written] == 0)

    k, s = index_key_stack(new)
    assert k.shape == (2, 2, 10, 128) and s.shape == (2, 2, 10)


def test_decode_step_updates_the_cache_in_place():
    """The jitted decode step donates the cache and writes into it: its scratch memory stays
    below a third of the cache (scanning each layer's slice in and out would copy the whole
    cache; what remains is one layer's indexer keys, sliced out for scoring, and small buffers)."""
    cfg = ModelConfig.preset("tiny", index_topk=8, attention_chunk_size=8)
    cache = jax.eval_shape(lambda: init_cache(cfg, 2, 4096))
    params = jax.eval_shape(lambda: random_params(cfg))
    compiled = decode_step.lower(params, cfg, cache, jax.ShapeDtypeStruct((2,), jnp.int32)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("no memory analysis on this backend")
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    print(f"cache {cache_bytes / 2**20:.1f} MiB, decode step temp {stats.temp_size_in_bytes / 2**20:.2f} MiB")
    assert stats.temp_size_in_bytes < cache_bytes / 3


def test_fp8_indexer_cache_decode_matches_recompute():
    """With cfg.index_fp8 the cache keeps e4m3 keys and their scales; sparse decode over them
    gives the forward's logits (same FP8 simulation, same selections) past index_topk."""
    cfg = ModelConfig.preset("tiny", index_topk=8, attention_chunk_size=8, index_fp8=True, index_head_dim=128)
    params = random_params(cfg, seed=1)
    rng = np.random.default_rng(1)
    seq = rng.integers(2, cfg.vocab_size, size=(1, 24)).astype(np.int32)
    prompt = 10
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :prompt] = seq[0, :prompt]
    logits, cache, _ = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray([prompt]), init_cache(cfg, 1, 32))
    steps = [np.asarray(logits[0])]
    for t in range(prompt, seq.shape[1]):
        logits, cache, _ = decode_step(params, cfg, cache, jnp.asarray(seq[:, t]))
        steps.append(np.asarray(logits[0]))
    ref = np.asarray(forward(params, jnp.asarray(seq), cfg))[0, prompt - 1:]
    steps = np.stack(steps)
    err = np.linalg.norm(steps - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    print(f"fp8 indexer decode: max relative error {err.max():.2e}")
    assert err.max() <= 1e-4
