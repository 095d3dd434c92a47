"""Parity with transformers' DeepseekV32ForCausalLM: save_pretrained -> load_hf -> forward.

Three tiny random configs with YaRN on and >= 8 indexer heads (spec §11.12), at sequence
lengths below and above index_topk so both the dense and the DSA sparse paths run.
"""

import numpy as np
import pytest

from deepseek_jax import forward, load_hf
from tests.hf_oracle import hf_logits, save_random_hf_model, tiny_hf_config

CONFIGS = {
    "base": (dict(), (12, 40)),
    "no_groups_mscale": (dict(
        q_lora_rank=48, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=24,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=16, n_group=1, topk_group=1,
        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=0, num_hidden_layers=2,
        index_n_heads=12, index_topk=8, routed_scaling_factor=1.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=5000.0, factor=8.0, original_max_position_embeddings=16,
                             beta_fast=16, beta_slow=2, mscale=1.0, mscale_all_dim=0.8),
        max_position_embeddings=128), (8, 30)),
    "deeper_wide_indexer": (dict(
        num_hidden_layers=4, first_k_dense_replace=2, vocab_size=200, index_n_heads=16, index_head_dim=64,
        qk_rope_head_dim=32, index_topk=24, n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=16,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=640), (20, 64)),
}


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    overrides, lengths = CONFIGS[name]
    hf_model = save_random_hf_model(tiny_hf_config(**overrides), tmp_path)
    cfg, params = load_hf(tmp_path)
    assert cfg.dtype == "float32" and cfg.index_topk == hf_model.config.index_topk
    rng = np.random.default_rng(0)
    for t in lengths:
        tokens = rng.integers(0, cfg.vocab_size, size=(2, t))
        ours = np.asarray(forward(params, tokens, cfg))
        ref = hf_logits(hf_model, tokens)
        err = rel_err(ours, ref)
        print(f"{name} T={t} ({'sparse' if t > cfg.index_topk else 'dense'}): rel err {err:.2e}")
        assert err <= 1e-4, f"{name} T={t}: relative error {err:.2e}"
        if t > cfg.index_topk:  # the selection must matter, or this would not test DSA at all
            dense_err = rel_err(np.asarray(forward(params, tokens, cfg, attention="dense")), ref)
            assert dense_err > 100 * err, f"{name} T={t}: dense attention is as close as sparse ({dense_err:.2e})"
