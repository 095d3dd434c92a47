"""Pre-norm decoder block: h = x + MLA(RMSNorm(x)); out = h + FFN(RMSNorm(h)) (spec §1).

The FFN is a dense SwiGLU (the first `first_k_dense_replace` layers) or DeepSeekMoE. The
call signature (carry, *broadcast) -> (carry, aux) lets `nn.scan` stack the blocks.
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

    @nn.compact
    def __call__(self, x, cos, sin):
        cfg = self.cfg
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name=name)
        attn_out, indices = MLA(cfg, self.attention_mode, name="attn")(norm("attn_norm")(x), cos, sin)
        h = x + attn_out
        aux = {"indices": indices} if self.return_indices and indices is not None else {}
        if self.moe:
            ffn_out, moe_aux = MoE(cfg, name="mlp")(norm("ffn_norm")(h))
            aux.update(moe_aux)
        else:
            ffn_out = MLP(cfg, cfg.intermediate_size, name="mlp")(norm("ffn_norm")(h))
        # The residual stream is the scan carry: pin it to the batch split (a no-op without a mesh).
        return nn.with_logical_constraint(h + ffn_out, ("batch", "length", "act_embed")), aux
