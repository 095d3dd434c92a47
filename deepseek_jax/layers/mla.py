"""Multi-head Latent Attention with its lightning indexer (spec §2-§3).

q: c_q = RMSNorm(W_qa x) (also the indexer's query input), q = W_qb c_q split [nope | rope],
interleaved RoPE on the rope part. kv: [c_kv | k_rope] = W_kva x, c_kv RMSNorm'd, k_rope
RoPE'd and shared by every head. W_kvb [C, H, N+V] holds per head [W_UK ; W_UV].
`attention.mla_attention` picks MHA (dense) or absorbed sparse attention.

With a cache (cache.py) the layer also stores the new tokens' rows [c_kv ; k_rope] and indexer
keys. Prefill (`start` None) writes rows 0..T-1 and attends as without a cache; otherwise the
tokens are appended at start[b] + t and attend over the cache (`attention.cached_mla_attention`).

Legend: B batch, T tokens, D model dim, Q q latent rank, C kv latent rank, H heads,
K = N + R qk head dim, V v head dim.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax import attention
from deepseek_jax import cache as cache_lib
from deepseek_jax.layers.indexer import Indexer
from deepseek_jax.layers.linear import Einsum, weight
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import apply_rope_interleaved


class MLA(nn.Module):
    cfg: Any
    attention_mode: str = "auto"

    @nn.compact
    def __call__(self, x, cos, sin, cache=None, start=None):
        """x [B, T, D] (normed) -> (out [B, T, D], indexer indices [B, T, topk] or None, cache).

        cache: None, or (LayerCache of this layer's group, layer index); the updated group is
        returned (None without a cache). start [B]: where the tokens go; None for a prefill.
        """
        cfg = self.cfg
        dtype, pdtype, std, eps = cfg.compute_dtype, cfg.params_dtype, cfg.initializer_range, cfg.rms_norm_eps
        h, nope, rope, c = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

        fp8 = cfg.weight_fp8
        q_latent = Einsum((cfg.hidden_size, cfg.q_lora_rank), ("embed", "q_lora"), dtype, pdtype, std, fp8=fp8,
                          name="q_a_proj")("BTD,DQ->BTQ", x)
        q_latent = RMSNorm(eps, dtype, pdtype, name="q_a_norm")(q_latent)
        q = Einsum((cfg.q_lora_rank, h, cfg.qk_head_dim), ("q_lora", "heads", "qk_head_dim"), dtype, pdtype, std,
                   fp8=fp8, name="q_b_proj")("BTQ,QHK->BTHK", q_latent)
        q_nope, q_rope = q[..., :nope], apply_rope_interleaved(q[..., nope:], cos, sin)

        kv = Einsum((cfg.hidden_size, c + rope), ("embed", "kv_lora_rope"), dtype, pdtype, std,
                    fp8=fp8, name="kv_a_proj")("BTD,DC->BTC", x)
        c_kv = RMSNorm(eps, dtype, pdtype, name="kv_a_norm")(kv[..., :c])
        k_rope = apply_rope_interleaved(kv[..., c:], cos, sin)
        kv_b = weight(self, "kv_b_proj", (c, h, nope + cfg.v_head_dim), ("kv_lora", "heads", "kv_head_dim"),
                      std=std, param_dtype=pdtype, dtype=dtype, fp8=fp8)

        index_inputs = Indexer(cfg, name="indexer")(x, q_latent, cos, sin)
        if cache is not None:
            group, layer = cache
            index_q, index_k, index_w, index_k_scale = index_inputs
            rows = jnp.concatenate([c_kv, k_rope.astype(c_kv.dtype)], axis=-1)
            at = jnp.zeros(x.shape[:1], jnp.int32) if start is None else start
            cache = cache_lib.write(group, layer, at, rows, index_k, index_k_scale)
        if cache is None or start is None:
            o, indices = attention.mla_attention(q_nope, q_rope, c_kv, k_rope, kv_b, index_inputs, cfg=cfg,
                                                 mode=self.attention_mode)
        else:
            o, indices = attention.cached_mla_attention(q_nope, q_rope, kv_b, index_q, index_w, cache, layer, start,
                                                        cfg=cfg, mode=self.attention_mode)
        # DSA training (deepseek_jax/training/dsa.py) reads these; a no-op unless "intermediates" is mutable.
        self.sow("intermediates", "dsa", dict(x=x, q_latent=q_latent, q_nope=q_nope, q_rope=q_rope, c_kv=c_kv,
                                              k_rope=k_rope, kv_b=kv_b, indices=indices))
        out = Einsum((h, cfg.v_head_dim, cfg.hidden_size), ("heads", "v_head_dim", "embed"), dtype, pdtype, std,
                     n_in=2, fp8=fp8, name="o_proj")("BTHV,HVD->BTD", o)
        return out, indices, cache
