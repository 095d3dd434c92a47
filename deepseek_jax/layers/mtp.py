"""Multi-token prediction module (spec §6), one per depth.

For position i at depth k: h'_i = W_eh [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i)] — embedding
FIRST, as in the checkpoints — then a full MoE decoder block (with its own MLA and indexer);
the caller applies the shared final head (`shared_head.norm` here, the main `lm_head`).
h_i is the previous depth's output (depth 1: the main model's final-normed hidden state).
With a cache (group, layer index) its block reads and writes the MTP rows (speculative decoding);
aux["cache"] then holds the updated group.

Legend: B batch, T tokens, D model dim.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from deepseek_jax.layers.block import Block
from deepseek_jax.layers.linear import Einsum
from deepseek_jax.layers.norms import RMSNorm


class MTP(nn.Module):
    cfg: Any
    attention_mode: str = "auto"
    return_indices: bool = False

    return_routes: bool = False

    @nn.compact
    def __call__(self, hidden, next_embeddings, cos, sin, cache=None, start=None, routes=None):
        """hidden, next_embeddings [B, T, D] -> (block output [B, T, D], head-normed [B, T, D], aux)."""
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
        joined = jnp.concatenate([norm("enorm")(next_embeddings), norm("hnorm")(hidden)], axis=-1)
        h = Einsum((2 * cfg.hidden_size, cfg.hidden_size), ("embed_concat", "embed"), cfg.compute_dtype,
                   cfg.params_dtype, cfg.initializer_range, fp8=cfg.weight_fp8, name="eh_proj")("BTE,ED->BTD", joined)
        block = Block(cfg, moe=True, attention_mode=self.attention_mode, return_indices=self.return_indices,
                      return_routes=self.return_routes, name="block")
        if cache is None:
            h, aux = block(h, cos, sin, start, routes)
        else:
            (h, group, _), aux = block((h, *cache), cos, sin, start, routes)
            aux["cache"] = group
        return h, norm("shared_head_norm")(h), aux
