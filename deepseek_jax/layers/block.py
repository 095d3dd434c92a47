"""Pre-norm decoder block: h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)) (spec §1).

The FFN is a dense SwiGLU (the first `first_k_dense_replace` layers) or DeepSeekMoE. The
call signature (carry, *broadcast, routes) -> (carry, aux) lets `nn.scan` stack the blocks.
The carry is x [B, T, D], or (x, group cache, layer index) when decoding with a cache: the
cache rides in the carry so each layer updates its rows in place (cache.py), and the index
advances by one per block.
"""

from typing import Any

import flax.linen as nn

from deepseek_jax.layers.mla import MLA
from deepseek_jax.layers.mlp import MLP
from deepseek_jax.layers.moe import MoE
from deepseek_jax.layers.norms import RMSNorm


class Block(nn.Module):
    cfg: Any
    moe: bool
    attention_mode: str = "auto"
    return_indices: bool = False
    return_routes: bool = False

    @nn.compact
    def __call__(self, carry, cos, sin, start=None, routes=None):
        """routes: forced experts [B, T, K] (MoE blocks only); start: see MLA."""
        cfg = self.cfg
        x, cache = (carry[0], carry[1:]) if isinstance(carry, tuple) else (carry, None)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
        attn_out, indices, group = MLA(cfg, self.attention_mode, name="attn")(norm("attn_norm")(x), cos, sin,
                                                                             cache=cache, start=start)
        h = x + attn_out
        aux = {"indices": indices} if self.return_indices and indices is not None else {}
        if self.moe:
            ffn_out, moe_aux = MoE(cfg, name="mlp")(norm("ffn_norm")(h), routes=routes)
            if not self.return_routes:
                moe_aux.pop("routes")
            aux.update(moe_aux)
        else:
            if routes is not None:
                raise ValueError("Block: routes given to a dense (non-MoE) block")
            ffn_out = MLP(cfg, cfg.intermediate_size, name="mlp")(norm("ffn_norm")(h))
        # The residual stream is the scan carry: pin it to the batch split (a no-op without a mesh).
        out = nn.with_logical_constraint(h + ffn_out, ("batch", "length", "act_embed"))
        return (out if cache is None else (out, group, cache[1] + 1)), aux
