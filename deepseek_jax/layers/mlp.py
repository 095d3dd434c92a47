"""SwiGLU feed-forward W2(silu(W1 x) ⊙ W3 x): the dense layers and the shared expert (spec §5).

Legend: B batch, T tokens, D model dim, F inner dim.
"""

from typing import Any

import flax.linen as nn
import jax

from deepseek_jax.layers.linear import Einsum


class MLP(nn.Module):
    cfg: Any
    inner_dim: int
    axis: str = "mlp"

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        args = (cfg.compute_dtype, cfg.params_dtype, cfg.initializer_range, 1, cfg.weight_fp8)
        d, f = cfg.hidden_size, self.inner_dim
        gate = Einsum((d, f), ("embed", self.axis), *args, name="gate_proj")("BTD,DF->BTF", x)
        up = Einsum((d, f), ("embed", self.axis), *args, name="up_proj")("BTD,DF->BTF", x)
        return Einsum((f, d), (self.axis, "embed"), *args, name="down_proj")("BTF,FD->BTD", jax.nn.silu(gate) * up)
