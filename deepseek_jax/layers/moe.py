"""DeepSeekMoE: sigmoid group-limited routing + dropless routed experts + shared expert (spec §5).

Routing (float32): s = sigmoid(x·Wg); experts are *selected* on s + b (b =
`e_score_correction_bias`, the aux-loss-free balancing bias, never a gradient target): group
score = sum of the top-2 biased scores, keep `topk_group` groups, then the top-k experts.
The *weights* are the unbiased s of those experts, normalised to sum 1, × routed_scaling_factor.
Dispatch (`sharding.moe_parallel.dispatch`) is dropless on one device; with an expert mesh axis
it is expert-parallel with a fixed capacity whose overflow is counted.
Also returns per-expert token counts (for the bias update), the sequence-wise balance
statistic Σ_i f_i P_i (spec §5), averaged over sequences, and the chosen experts.
Keep Routing (spec §8): given forced `routes`, the experts are those and their weights are
recomputed from the current gate scores, so a training forward reproduces a sampler's routing.

Legend: B batch, T tokens, N = B·T, D model dim, E experts, F expert inner dim, K experts/token.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.layers.linear import weight
from deepseek_jax.layers.mlp import MLP
from sharding import moe_parallel


def route(scores, bias, *, n_group, topk_group, top_k, scaling):
    """scores [N, E] = sigmoid gate (float32), bias [E] -> (weights [N, K] f32, experts [N, K] i32)."""
    n, e = scores.shape
    biased = scores + bias[None, :]
    grouped = biased.reshape(n, n_group, e // n_group)
    if n_group > 1:
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [N, G]
        _, kept = jax.lax.top_k(group_scores, topk_group)
        group_mask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], kept].set(True)
        biased = jnp.where(group_mask[:, :, None], grouped, -jnp.inf).reshape(n, e)
    _, experts = jax.lax.top_k(biased, top_k)
    return expert_weights(scores, experts, scaling), experts.astype(jnp.int32)


def expert_weights(scores, experts, scaling):
    """Unbiased scores of the chosen experts [N, K], normalised to sum 1, × scaling (float32)."""
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    return weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20) * scaling


class MoE(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x, routes=None):
        """x [B, T, D], optional forced routes [B, T, K] int32 -> (y [B, T, D], aux).

        aux: "expert_load" [E] int32, "balance" scalar f32, "routes" experts chosen [B, T, K]
        int32, "dropped_tokens" int32 (token copies past the expert-parallel capacity; always 0
        on one device or when the capacity factor <= 0).
        """
        cfg = self.cfg
        b, t, d = x.shape
        e, f, std = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.initializer_range
        pdtype = cfg.params_dtype

        gate = self.param("gate", nn.with_logical_partitioning(nn.initializers.normal(std), ("embed", "expert")),
                          (d, e), jnp.float32)
        bias = self.param("gate_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("expert",)),
                          (e,), jnp.float32)
        expert = lambda name, shape, axes: weight(self, name, shape, axes, std=std, param_dtype=pdtype,
                                                  dtype=x.dtype, n_lead=1, fp8=cfg.weight_fp8)
        w_gate = expert("w_gate", (e, d, f), ("expert", "embed", "moe_mlp"))
        w_up = expert("w_up", (e, d, f), ("expert", "embed", "moe_mlp"))
        w_down = expert("w_down", (e, f, d), ("expert", "moe_mlp", "embed"))

        tokens = x.reshape(b * t, d)
        scores = jax.nn.sigmoid(jnp.einsum("ND,DE->NE", tokens.astype(jnp.float32), gate,
                                           precision=jax.lax.Precision.HIGHEST))
        if routes is None:
            weights, experts = route(scores, jax.lax.stop_gradient(bias), n_group=cfg.n_group,
                                     topk_group=cfg.topk_group, top_k=cfg.num_experts_per_tok,
                                     scaling=cfg.routed_scaling_factor)
        else:
            if routes.shape != (b, t, cfg.num_experts_per_tok):
                raise ValueError(f"MoE routes: expected [B, T, K] = {(b, t, cfg.num_experts_per_tok)}, got {routes.shape}")
            experts = routes.reshape(b * t, -1).astype(jnp.int32)
            weights = expert_weights(scores, experts, cfg.routed_scaling_factor)
        y, dropped = moe_parallel.dispatch(tokens, experts, weights, w_gate, w_up, w_down,
                                           capacity_factor=cfg.moe_capacity_factor)
        y = y.reshape(b, t, d)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, f * cfg.n_shared_experts, axis="moe_mlp", name="shared")(x)

        chosen = jax.nn.one_hot(experts, e, dtype=jnp.float32).sum(1).reshape(b, t, e)
        frac = chosen.mean(1) * (e / cfg.num_experts_per_tok)                     # f_i per sequence
        prob = (scores / jnp.sum(scores, -1, keepdims=True)).reshape(b, t, e).mean(1)  # P_i per sequence
        aux = {"expert_load": chosen.sum((0, 1)).astype(jnp.int32), "balance": jnp.mean(jnp.sum(frac * prob, -1)),
               "routes": experts.reshape(b, t, -1), "dropped_tokens": dropped}
        return y, aux
