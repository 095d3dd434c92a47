"""Routed-expert FFNs as grouped matmuls (spec §5), shared by the local and expert-parallel MoE.

Token copies are sorted by expert and each expert's contiguous rows run through SwiGLU with
`jax.lax.ragged_dot` (a grouped matmul on every backend; rows past the last group give 0).

Legend: N tokens, M = N·K token copies, D model dim, E experts, F expert inner dim, K experts/token.
"""

import jax
import jax.numpy as jnp


def grouped_ffn(xs, sizes, w_gate, w_up, w_down):
    """xs [M, D] sorted by expert, sizes [E] rows per expert, w_* [E, ...] -> [M, D] float32."""
    dtype = xs.dtype
    ragged = lambda a, w: jax.lax.ragged_dot(a, w.astype(dtype), sizes, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(ragged(xs, w_gate)) * ragged(xs, w_up)).astype(dtype)
    return ragged(h, w_down)


def combine(ys, weights):
    """ys [N, K, D] float32 expert outputs per token copy, weights [N, K] -> [N, D] float32."""
    return jnp.einsum("NKD,NK->ND", ys, weights)


def dispatch_experts(x, experts, weights, w_gate, w_up, w_down):
    """Dropless expert FFN on one device: x [N, D], experts/weights [N, K], w_* [E, ...] -> [N, D]."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)
    ys = grouped_ffn(x[order // k], sizes, w_gate, w_up, w_down)  # sorted by expert
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
    return combine(y, weights).astype(x.dtype)
