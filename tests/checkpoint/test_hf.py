"""HF safetensors import/export (spec §7): round trips, FP8, sharded streaming, named errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer, forward, load_hf, save_hf
from deepseek_jax.checkpoint.hf import check_checkpoint
from deepseek_jax.params import abstract_params, param_shardings
from deepseek_jax.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor, write_file
from deepseek_jax.fp8 import dequantize_weight_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def all_tensors(path):
    """name -> array over every shard of a checkpoint directory."""
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            for name, info in read_header(os.path.join(path, f)).items():
                out[name] = read_tensor(info)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model (with MTP) saved in several shards."""
    cfg = ModelConfig.preset("tiny")
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"]
    path = tmp_path_factory.mktemp("ckpt")
    save_hf(path, cfg, params, max_shard_bytes=200_000)
    return cfg, nn.meta.unbox(params), path


def assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(p)


def test_ours_to_hf_to_ours_is_bit_exact(saved):
    cfg, params, path = saved
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    cfg2, params2 = load_hf(path)
    assert cfg2 == cfg.replace(attention_chunk_size=cfg2.attention_chunk_size)
    assert_trees_equal(params, params2)


def test_hf_to_ours_to_hf_is_bit_exact(tmp_path):
    """A transformers-written checkpoint comes back tensor for tensor, bit for bit."""
    from tests.hf_oracle import save_random_hf_model, tiny_hf_config

    save_random_hf_model(tiny_hf_config(), tmp_path / "hf")
    cfg, params = load_hf(tmp_path / "hf")
    save_hf(tmp_path / "ours", cfg, params)
    original, ours = all_tensors(tmp_path / "hf"), all_tensors(tmp_path / "ours")
    assert original.keys() == ours.keys()
    for name in original:
        assert original[name].dtype == ours[name].dtype and np.array_equal(original[name], ours[name]), name


def test_transformers_loads_our_export(saved):
    """Our sharded export in transformers gives our logits (HF ignores the MTP layer)."""
    from tests.hf_oracle import hf_logits

    transformers = pytest.importorskip("transformers")
    cfg, params, path = saved
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 24))
    ours = np.asarray(forward(params, tokens, cfg))
    ref = hf_logits(model, tokens)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_transformers_loads_our_fp8_export(saved, tmp_path):
    """transformers (FineGrainedFP8Config(dequantize=True), CPU) reads our FP8 files as we do."""
    import torch

    from tests.hf_oracle import hf_logits

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg, params, _ = saved
    save_hf(tmp_path, cfg, params, fp8=True)
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(
        tmp_path, quantization_config=transformers.FineGrainedFP8Config(dequantize=True),
        attn_implementation="eager", dtype=torch.float32).eval()
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(1, 24))
    _, dequantised = load_hf(tmp_path, dtype="float32")
    ours, ref = np.asarray(forward(dequantised, tokens, cfg)), hf_logits(model, tokens)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_fp8_checkpoint_loads_and_matches_the_dequantised_model(saved, tmp_path):
    cfg, params, _ = saved
    save_hf(tmp_path, cfg, params, fp8=True, max_shard_bytes=150_000)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "fp8"
    tensors = all_tensors(tmp_path)
    assert tensors["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == np.dtype("float8_e4m3fn")
    assert tensors["lm_head.weight"].dtype == np.float32 and tensors["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (1, 1)
    scales = np.concatenate([t.ravel() for n, t in tensors.items() if n.endswith("_scale_inv")])
    assert np.all(np.exp2(np.round(np.log2(scales))) == scales)  # ue8m0: powers of two

    cfg8, params8 = load_hf(tmp_path)
    assert cfg8.dtype == "bfloat16" and params8["moe_layers"]["mlp"]["w_up"].dtype == jnp.bfloat16

    # Dequantised by hand from the files, in float32: load_hf(dtype="float32") must give exactly this.
    _, params32 = load_hf(tmp_path, dtype="float32")
    w = dequantize_weight_blocks(tensors["model.layers.1.mlp.experts.3.up_proj.weight"],
                                 tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"])
    np.testing.assert_array_equal(np.asarray(params32["moe_layers"]["mlp"]["w_up"][0, 3]), w.T)

    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 24))
    exact, deq = np.asarray(forward(params, tokens, cfg)), np.asarray(forward(params32, tokens, cfg))
    hand = jax.tree.map(lambda x: x, params32)
    hand["moe_layers"]["mlp"]["w_up"] = hand["moe_layers"]["mlp"]["w_up"].at[0, 3].set(w.T)
    np.testing.assert_array_equal(np.asarray(forward(hand, tokens, cfg)), deq)
    err = np.linalg.norm(deq - exact) / np.linalg.norm(exact)
    print(f"FP8 checkpoint: relative logit error vs the unquantised model {err:.2e}")
    assert err < 0.1


def test_keep_fp8_weights(saved, tmp_path):
    """keep_fp8: e4m3 weights + block scales in memory (~1 byte/param), the same logits as the
    dequantised load, and a bit-exact FP8 re-export."""
    cfg, params, _ = saved
    save_hf(tmp_path / "fp8", cfg, params, fp8=True)
    cfg8, kept = load_hf(tmp_path / "fp8", keep_fp8=True)
    assert cfg8.weight_fp8 and kept["moe_layers"]["mlp"]["w_gate"].dtype == jnp.float8_e4m3fn
    assert kept["moe_layers"]["mlp"]["w_gate_scale"].shape == (cfg.num_moe_layers, cfg.n_routed_experts, 1, 1)
    assert kept["lm_head"].dtype == jnp.bfloat16 and kept["moe_layers"]["mlp"]["gate"].dtype == jnp.float32
    linear = [x for p, x in jax.tree.leaves_with_path(kept) if x.dtype == jnp.float8_e4m3fn]
    dense_bytes = sum(x.nbytes for x in jax.tree.leaves(load_hf(tmp_path / "fp8")[1]))
    kept_bytes = sum(x.nbytes for x in jax.tree.leaves(kept))
    assert sum(x.size for x in linear) > 0.5 * sum(x.size for x in jax.tree.leaves(kept))
    print(f"FP8-kept params: {kept_bytes / dense_bytes:.2f}x the bytes of the bf16 load")

    cfg16, dequantised = load_hf(tmp_path / "fp8")
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 24))
    np.testing.assert_array_equal(np.asarray(forward(kept, tokens, cfg8)), np.asarray(forward(dequantised, tokens, cfg16)))

    save_hf(tmp_path / "again", cfg8, kept, fp8=True)
    original, again = all_tensors(tmp_path / "fp8"), all_tensors(tmp_path / "again")
    assert original.keys() == again.keys()
    for name in original:
        if original[name].dtype == np.dtype("float8_e4m3fn") or name.endswith("_scale_inv"):
            assert np.array_equal(original[name].view(np.uint8), again[name].view(np.uint8)), name
        else:  # unquantised tensors went through the bf16 load
            assert np.array_equal(original[name].astype(again[name].dtype), again[name]), name


def test_load_onto_a_mesh(saved):
    cfg, params, path = saved
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    rules = [("expert", "model"), ("vocab", "model"), ("embed", "data")]
    _, sharded = load_hf(path, mesh=mesh, rules=rules)
    w_up = sharded["moe_layers"]["mlp"]["w_up"]  # [L, E, D, F] = ("layers", "expert", "embed", "moe_mlp")
    assert w_up.sharding.spec == jax.sharding.PartitionSpec(None, "model", "data", None)
    assert sharded["embed"].sharding.spec == jax.sharding.PartitionSpec("model", "data")
    assert_trees_equal(params, sharded)


def _corrupt(src, dst, edit):
    """Copies a checkpoint, applying edit(tensors: dict) to the shard holding them."""
    shutil.copytree(src, dst)
    tensors = all_tensors(dst)
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(dst, f))
    os.remove(os.path.join(dst, "model.safetensors.index.json"))
    edit(tensors)
    write_file(os.path.join(dst, "model.safetensors"), tensors)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.0.self_attn.q_a_proj.weight"), r"missing: model\.layers\.0\.self_attn\.q_a_proj"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}), r"unexpected: model\.layers\.0\.extra"),
    (lambda t: t.update({"lm_head.weight": np.zeros((5, 5), np.float32)}), r"shape: lm_head\.weight: expected \(256, 64\), got \(5, 5\)"),
    (lambda t: t.update({"model.norm.weight": np.zeros(64, np.int32)}), r"dtype: model\.norm\.weight"),
])
def test_mismatched_checkpoint_names_the_tensor(saved, tmp_path, edit, message):
    _, _, path = saved
    _corrupt(path, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path / "bad")


def test_truncated_shard_is_named(saved, tmp_path):
    _, _, path = saved
    shutil.copytree(path, tmp_path / "bad")
    shard = sorted(f for f in os.listdir(tmp_path / "bad") if f.endswith(".safetensors"))[2]
    file = tmp_path / "bad" / shard
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{shard}: truncated"):
        load_hf(tmp_path / "bad")


def test_bad_index_files(saved, tmp_path):
    _, _, path = saved
    shutil.copytree(path, tmp_path / "bad")
    index = tmp_path / "bad" / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    index.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        load_hf(tmp_path / "bad")
    missing_file = json.loads(json.dumps(original))
    missing_file["weight_map"]["lm_head.weight"] = "model-99999.safetensors"
    index.write_text(json.dumps(missing_file))
    with pytest.raises(ValueError, match=r"missing: \['model-99999.safetensors'\]"):
        load_hf(tmp_path / "bad")
    wrong_place = json.loads(json.dumps(original))
    files = sorted(set(wrong_place["weight_map"].values()))
    wrong_place["weight_map"]["lm_head.weight"] = next(f for f in files if f != original["weight_map"]["lm_head.weight"])
    index.write_text(json.dumps(wrong_place))
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        load_hf(tmp_path / "bad")


def test_partial_mtp_is_an_error_but_absent_mtp_loads_without_it(saved, tmp_path):
    _, _, path = saved
    _corrupt(path, tmp_path / "partial", lambda t: t.pop("model.layers.3.eh_proj.weight"))
    with pytest.raises(ValueError, match=r"missing: model\.layers\.3\.eh_proj\.weight"):
        load_hf(tmp_path / "partial")
    _corrupt(path, tmp_path / "none", lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.3.")])
    cfg, params = load_hf(tmp_path / "none")
    assert cfg.num_nextn_predict_layers == 0 and "mtp_0" not in params


def test_bad_directories(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(ValueError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no \*.safetensors"):
        load_hf(tmp_path)
    quantised = json.loads((path / "config.json").read_text())
    quantised["quantization_config"] = {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(quantised))
    with pytest.raises(ValueError, match="quantization_config"):
        load_hf(tmp_path)


def test_save_rejects_mismatched_params_and_writes_nothing(saved, tmp_path):
    cfg, params, _ = saved
    bad = jax.tree.map(lambda x: x, params)
    bad["lm_head"] = bad["lm_head"][:, :10]
    with pytest.raises(ValueError, match=r"shape: \['lm_head'\]"):
        save_hf(tmp_path / "out", cfg, bad)
    assert not (tmp_path / "out").exists()


def test_explicit_dtype(saved):
    _, _, path = saved
    cfg, params = load_hf(path, dtype="bfloat16")
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    assert params["lm_head"].dtype == jnp.bfloat16
    assert params["moe_layers"]["mlp"]["gate"].dtype == jnp.float32  # the router stays fp32


# ------------------------------------------------------------------------- the 671B mapping, dry
def official_671b_headers():
    """Every tensor of DeepSeek's released V3.2 checkpoint, written from spec §7 (not from our mapping)."""
    d, q, c, r, h, nope, v, f, fe, e, hi, di, vocab = 7168, 1536, 512, 64, 128, 128, 128, 18432, 2048, 256, 64, 128, 129280
    tensors = {"model.embed_tokens.weight": ("BF16", (vocab, d)), "model.norm.weight": ("BF16", (d,)),
               "lm_head.weight": ("BF16", (vocab, d))}

    def fp8(name, shape):
        tensors[name] = ("F8_E4M3", shape)
        tensors[name + "_scale_inv"] = ("F32", (-(-shape[0] // 128), -(-shape[1] // 128)))

    for layer in range(62):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = tensors[p + "post_attention_layernorm.weight"] = ("BF16", (d,))
        fp8(p + "self_attn.q_a_proj.weight", (q, d))
        tensors[p + "self_attn.q_a_layernorm.weight"] = ("BF16", (q,))
        fp8(p + "self_attn.q_b_proj.weight", (h * (nope + r), q))
        fp8(p + "self_attn.kv_a_proj_with_mqa.weight", (c + r, d))
        tensors[p + "self_attn.kv_a_layernorm.weight"] = ("BF16", (c,))
        fp8(p + "self_attn.kv_b_proj.weight", (h * (nope + v), c))
        fp8(p + "self_attn.o_proj.weight", (d, h * v))
        fp8(p + "self_attn.indexer.wq_b.weight", (hi * di, q))
        fp8(p + "self_attn.indexer.wk.weight", (di, d))
        tensors[p + "self_attn.indexer.k_norm.weight"] = tensors[p + "self_attn.indexer.k_norm.bias"] = ("F32", (di,))
        tensors[p + "self_attn.indexer.weights_proj.weight"] = ("BF16", (hi, d))
        if layer < 3:
            for proj in ("gate_proj", "up_proj"):
                fp8(p + f"mlp.{proj}.weight", (f, d))
            fp8(p + "mlp.down_proj.weight", (d, f))
            continue
        tensors[p + "mlp.gate.weight"] = ("BF16", (e, d))
        tensors[p + "mlp.gate.e_score_correction_bias"] = ("F32", (e,))
        for expert in [f"experts.{i}" for i in range(e)] + ["shared_experts"]:
            fp8(p + f"mlp.{expert}.gate_proj.weight", (fe, d))
            fp8(p + f"mlp.{expert}.up_proj.weight", (fe, d))
            fp8(p + f"mlp.{expert}.down_proj.weight", (d, fe))
        if layer == 61:  # the MTP module
            tensors[p + "enorm.weight"] = tensors[p + "hnorm.weight"] = ("BF16", (d,))
            tensors[p + "shared_head.norm.weight"] = ("BF16", (d,))
            fp8(p + "eh_proj.weight", (d, 2 * d))
            tensors[p + "embed_tokens.weight"] = tensors[p + "shared_head.head.weight"] = ("BF16", (vocab, d))
    return {name: TensorInfo("dry", dtype, shape, 0, 0) for name, (dtype, shape) in tensors.items()}


def test_671b_checkpoint_maps_completely_without_reading_data():
    cfg = ModelConfig.preset("v32-671b", dtype="bfloat16", param_dtype="bfloat16")
    headers = official_671b_headers()
    assert check_checkpoint(cfg, headers, abstract_params(cfg)) == []

    mesh = jax.make_mesh((2, 4), ("fsdp", "expert"))
    rules = [("expert", "expert"), ("embed", "fsdp"), ("vocab", "expert")]
    shardings = param_shardings(cfg, mesh, rules)
    spec = jax.sharding.PartitionSpec
    assert shardings["moe_layers"]["mlp"]["w_gate"].spec == spec(None, "expert", "fsdp", None)
    assert shardings["embed"].spec == spec("expert", "fsdp")
    assert shardings["dense_layers"]["attn"]["indexer"]["weights_proj"]["kernel"].spec == spec(None, "fsdp", None)


# ------------------------------------------------------------------------- streaming memory
def test_peak_host_memory_while_loading_stays_near_one_shard(tmp_path):
    """Load a ~110 MB, 31-shard checkpoint in a fresh process, sampling RSS every millisecond:
    the peak beyond the loaded params stays within 2x the largest shard. The process loads it
    once first, so XLA's compilations of the in-place writers (a fixed cost, whatever the
    checkpoint's size) are not counted against the streaming."""
    cfg = ModelConfig.preset("tiny", hidden_size=256, moe_intermediate_size=256, n_routed_experts=32, n_group=4,
                             num_hidden_layers=4, vocab_size=4096, intermediate_size=512)
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    save_hf(tmp_path, cfg, params, max_shard_bytes=4 << 20)
    del params
    shards = [os.path.getsize(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    script = textwrap.dedent(f"""
        import threading, time, os, jax
        from deepseek_jax import load_hf
        page = os.sysconf("SC_PAGE_SIZE")
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page

        def peak_during(fn):
            peak, done = [0], []
            def sample():
                while not done:
                    peak[0] = max(peak[0], rss()); time.sleep(0.001)
            t = threading.Thread(target=sample); t.start()
            out = fn(); jax.block_until_ready(out); done.append(1); t.join()
            return out, peak[0]

        jax.jit(lambda x: x + 1)(1.0).block_until_ready()
        base_first = rss()
        (_, first), peak_first = peak_during(lambda: load_hf({str(tmp_path)!r}))  # compiles the writers
        base = rss()  # the first params stay alive: nothing freed can be reused below
        (_, second), peak = peak_during(lambda: load_hf({str(tmp_path)!r}))
        model = sum(x.nbytes for x in jax.tree.leaves(second))
        print(peak_first - base_first - model, peak - base - model, model)
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first_overhead, overhead, model = map(int, out.stdout.split()[-3:])
    print(f"model {model / 2**20:.0f} MiB in {len(shards)} shards (largest {max(shards) / 2**20:.1f} MiB); "
          f"peak RSS above baseline + params: {overhead / 2**20:.1f} MiB "
          f"(first load, compiling its writers: {first_overhead / 2**20:.1f} MiB)")
    assert model > 20 * max(shards)
    assert overhead < 2 * max(shards), (overhead, max(shards))
