"""HF safetensors import/export (the unquantised part; spec §7): round trips and named errors."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deepseek_jax import ModelConfig, Transformer, forward, load_hf, save_hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = ModelConfig.preset("tiny")
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(1), np.zeros((1, 4), np.int32))["params"]
    path = tmp_path_factory.mktemp("ckpt")
    save_hf(path, cfg, params)
    return cfg, params, path


def test_round_trip_is_bit_exact(saved):
    cfg, params, path = saved
    cfg2, params2 = load_hf(path)
    assert cfg2 == cfg.replace(attention_chunk_size=cfg2.attention_chunk_size)
    import flax.linen as nn
    flat, flat2 = jax.tree.leaves_with_path(nn.meta.unbox(params)), jax.tree.leaves_with_path(params2)
    assert [p for p, _ in flat] == [p for p, _ in flat2]
    for (p, a), (_, b) in zip(flat, flat2):
        assert a.dtype == b.dtype and np.array_equal(a, b), p
    names = load_file(os.path.join(path, "model.safetensors")).keys()
    assert "model.layers.3.eh_proj.weight" in names and "model.layers.1.mlp.experts.7.down_proj.weight" in names


def test_transformers_loads_our_export(saved):
    """Our export in transformers gives our logits (the MTP layer is ignored by HF)."""
    from tests.hf_oracle import hf_logits

    transformers = pytest.importorskip("transformers")
    cfg, params, path = saved
    model = transformers.DeepseekV32ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 24))
    ours = np.asarray(forward(params, tokens, cfg))
    ref = hf_logits(model, tokens)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def _corrupt(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.0.self_attn.q_a_proj.weight"), r"missing: model\.layers\.0\.self_attn\.q_a_proj"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}), r"unexpected: model\.layers\.0\.extra"),
    (lambda t: t.update({"lm_head.weight": np.zeros((5, 5), np.float32)}), r"shape: lm_head\.weight: expected \(256, 64\), got \(5, 5\)"),
])
def test_mismatched_checkpoint_names_the_tensor(saved, tmp_path, edit, message):
    _, _, path = saved
    _corrupt(path, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path)


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
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid safetensors index"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "x.safetensors"}}))
    with pytest.raises(ValueError, match="missing: \\['x.safetensors'\\]"):
        load_hf(tmp_path)
    quantised = json.loads((path / "config.json").read_text())
    quantised["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(quantised))
    with pytest.raises(ValueError, match="quantization_config"):
        load_hf(tmp_path)


def test_explicit_dtype(saved):
    _, _, path = saved
    cfg, params = load_hf(path, dtype="bfloat16")
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    assert params["lm_head"].dtype == np.dtype("bfloat16")
    assert params["moe_layers"]["mlp"]["gate"].dtype == np.float32  # the router stays fp32
