"""Builds transformers' DeepseekV32ForCausalLM references on CPU (the numerical oracle).

Random weights are drawn wider than HF's init (std 0.02) so attention, routing and indexer
scores are far from uniform; the router bias is non-zero so the selection path is exercised.
The reference is reloaded from the saved files with `from_pretrained` (spec §11.16).
"""

import torch
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM


def tiny_hf_config(**overrides) -> DeepseekV32Config:
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        index_n_heads=8, index_head_dim=32, index_topk=16, max_position_embeddings=128,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    )
    kwargs.update(overrides)
    return DeepseekV32Config(**kwargs)


def save_random_hf_model(config: DeepseekV32Config, path, *, seed=0, std=0.08) -> DeepseekV32ForCausalLM:
    """Writes a randomly initialised model to `path`; returns the model reloaded from those files."""
    torch.manual_seed(seed)
    model = DeepseekV32ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("k_norm.bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn_like(buf))
    model.save_pretrained(path)
    return DeepseekV32ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def hf_logits(model, tokens) -> "torch.Tensor":
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
