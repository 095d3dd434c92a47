"""ModelConfig: presets, HF config round trips, validation errors (spec §1)."""

import math

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax import ModelConfig, Transformer

# The official DeepSeek-V3.2 config.json values that change the math (spec §1).
OFFICIAL = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "attention_bias": False,
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "index_head_dim": 128, "index_n_heads": 64, "index_topk": 2048,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}


def test_official_config_is_the_671b_preset():
    cfg = ModelConfig.from_hf_config(OFFICIAL)
    assert cfg == ModelConfig.preset("v32-671b", dtype="bfloat16", param_dtype="bfloat16")
    assert cfg.qk_head_dim == 192 and cfg.num_moe_layers == 58
    assert cfg.softmax_scale == pytest.approx(0.1352338, rel=1e-6)  # 192^-1/2 · (0.1 ln 40 + 1)^2


def test_671b_parameter_count():
    shapes = jax.eval_shape(lambda t: Transformer(ModelConfig.preset("v32-671b")).init(jax.random.PRNGKey(0), t),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    mtp_block = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]["mtp_0"]))
    assert 671.5e9 < total - mtp_block < 672.5e9  # spec §1: main model ≈ 671.9B
    assert 11.0e9 < mtp_block < 12.0e9            # MTP module ≈ 11.6B unique


def test_small_preset_size():
    shapes = jax.eval_shape(lambda t: Transformer(ModelConfig.preset("small")).init(jax.random.PRNGKey(0), t),
                            jax.ShapeDtypeStruct((1, 1), jnp.int32))
    assert 100e6 < sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) < 300e6


def test_hf_round_trip_both_rope_layouts():
    cfg = ModelConfig.preset("tiny")
    hf = cfg.to_hf_config()
    assert "rope_parameters" in hf and hf["rope_parameters"]["rope_type"] == "yarn"
    chunk = dict(attention_chunk_size=cfg.attention_chunk_size)  # a memory knob, not in HF's config
    assert ModelConfig.from_hf_config(hf, **chunk) == cfg
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {"type": "yarn", **{k: v for k, v in hf["rope_parameters"].items()
                                                 if k not in ("rope_type", "rope_theta")}}
    assert ModelConfig.from_hf_config(legacy, **chunk) == cfg


def test_transformers_accepts_our_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV32Config(**ModelConfig.preset("tiny").to_hf_config())
    assert hf.index_topk == 16 and hf.rope_parameters["rope_type"] == "yarn"
    assert hf.mlp_layer_types == ["dense", "sparse", "sparse"]


def test_from_hf_config_reads_files(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL))
    assert ModelConfig.from_hf_config(tmp_path) == ModelConfig.from_hf_config(OFFICIAL)
    with pytest.raises(ValueError, match="no config.json"):
        ModelConfig.from_hf_config(tmp_path / "missing")


@pytest.mark.parametrize("changes, field", [
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
    (dict(topk_group=5, n_group=4), "topk_group"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(dtype="int8"), "dtype"),
    (dict(rope_type="linear"), "rope_type"),
    (dict(index_fp8=True), "index_head_dim"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(attention_impl="cuda"), "attention_impl"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: expected .*, got"):
        ModelConfig.preset("tiny", **changes)


@pytest.mark.parametrize("key, value", [
    ("scoring_func", "softmax"), ("hidden_act", "gelu"), ("model_type", "deepseek_v3"),
    ("topk_method", "greedy"), ("attention_bias", True), ("q_lora_rank", None),
])
def test_unsupported_hf_fields(key, value):
    with pytest.raises(ValueError, match=key):
        ModelConfig.from_hf_config({**OFFICIAL, key: value})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")
