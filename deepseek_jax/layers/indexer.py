"""Lightning indexer of DeepSeek Sparse Attention, fixed V3.2 version (spec §3).

Produces the inputs of `pallas_kernels.ops.indexer_topk`: per query H_I head queries, one key
per token, and float32 head weights. q comes from the *normed* MLA query latent, k from
LayerNorm-with-bias(wk x); both split [rope | nope] with half-split RoPE; the head weights are
weights_proj(x) in float32 times H_I^-1/2 · d_I^-1/2. With `cfg.index_fp8`, q and k are
Hadamard-rotated and quantised to e4m3 with ue8m0 scales as DeepSeek's kernels do; q's scale
is folded into the head weights (relu(a z) = a relu(z) for a > 0), k's is returned.

Legend: B batch, T tokens, D model dim, Q q latent rank, H indexer heads, K indexer head dim.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax import fp8
from deepseek_jax.layers.linear import Einsum
from deepseek_jax.layers.norms import LayerNorm
from deepseek_jax.layers.rope import apply_rope_half


class Indexer(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x, q_latent, cos, sin):
        """Returns (q [B,T,H,K], k [B,T,K], w [B,T,H] float32, k_scale [B,T] float32 or None)."""
        cfg = self.cfg
        dtype, pdtype = cfg.compute_dtype, cfg.params_dtype
        heads, dim, rope = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        std = cfg.initializer_range

        q = Einsum((cfg.q_lora_rank, heads, dim), ("q_lora", "index_heads", "index_head_dim"),
                   dtype, pdtype, std, fp8=cfg.weight_fp8, name="wq_b")("BTQ,QHK->BTHK", q_latent)
        q = jnp.concatenate([apply_rope_half(q[..., :rope], cos, sin), q[..., rope:]], axis=-1)

        k = Einsum((cfg.hidden_size, dim), ("embed", "index_head_dim"), dtype, pdtype, std, fp8=cfg.weight_fp8,
                   name="wk")("BTD,DK->BTK", x)
        k = LayerNorm(eps=1e-6, dtype=dtype, name="k_norm")(k)
        k = jnp.concatenate([apply_rope_half(k[..., :rope], cos, sin), k[..., rope:]], axis=-1)

        w = Einsum((cfg.hidden_size, heads), ("embed", "index_heads"), jnp.float32, jnp.float32, std,
                   name="weights_proj")("BTD,DH->BTH", x.astype(jnp.float32))
        w = w * (heads**-0.5 * dim**-0.5)

        if not cfg.index_fp8:
            return q, k, w, None
        q8, q_scale = fp8.quantize_e4m3(fp8.hadamard_rotate(q))
        k8, k_scale = fp8.quantize_e4m3(fp8.hadamard_rotate(k))
        return q8, k8, w * q_scale[..., 0], k_scale[..., 0]
