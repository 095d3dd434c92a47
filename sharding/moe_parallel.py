"""Expert-parallel MoE dispatch with `jax.shard_map` and `all_to_all` (spec §5).

`dispatch` is what the MoE layer calls. Without a mesh whose "expert" axis is larger than 1
(one device, or data/FSDP/tensor parallelism only) it runs the dropless single-device path.
With one, the routed experts are split over "expert" and, per device:

  1. route locally (done by the caller): each token copy knows its expert, hence the shard
     that owns it (expert // experts_per_shard);
  2. pack copies into a send buffer [shards, capacity, D] - a fixed shape, as collectives
     need - in token order; copies past a destination's capacity are dropped and counted;
  3. `all_to_all` over "expert": each device receives the copies meant for its experts;
  4. sort them by local expert and run the grouped SwiGLU (`ragged_dot`); with a "tensor"
     axis the expert inner dim is split too and the down projection is `psum`med;
  5. `all_to_all` back, read each copy's result from where it was sent, weight and sum.

Tokens are sharded over every batch axis ("data", "fsdp", "expert") and replicated over
"tensor". `capacity_factor` c gives capacity = ceil(c · N_local · K / shards); c <= 0 means
capacity N_local · K, which can never overflow, so the result equals the single-device MoE
(to float rounding) at the cost of a buffer `shards` times larger than a balanced one.
XLA:CPU has no `ragged_all_to_all`, so the fixed-capacity exchange is the one implemented.

Legend: N tokens, K experts per token, D model dim, E experts, F expert inner dim,
P expert shards, C capacity per (source, destination) pair.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.layers.experts import combine, dispatch_experts, grouped_ffn

BATCH_AXES = ("data", "fsdp", "expert")


def expert_mesh():
    """The ambient mesh (`jax.set_mesh`) when it has an "expert" axis larger than 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("expert", 1) == 1:
        return None
    return mesh


def dispatch(x, experts, weights, w_gate, w_up, w_down, *, capacity_factor=0.0):
    """x [N, D], experts/weights [N, K], w_* [E, ...] -> (y [N, D], dropped token copies: int32 scalar)."""
    mesh = expert_mesh()
    if mesh is None:
        return dispatch_experts(x, experts, weights, w_gate, w_up, w_down), jnp.zeros((), jnp.int32)
    n, k = experts.shape
    e, f = w_gate.shape[0], w_gate.shape[-1]
    shards = mesh.shape["expert"]
    batch = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    n_batch = math.prod(mesh.shape[a] for a in batch)
    if e % shards:
        raise ValueError(f"expert parallelism: {e} experts do not split over {shards} 'expert' shards")
    if n % n_batch:
        raise ValueError(f"expert parallelism: {n} tokens do not split over the batch axes {batch} ({n_batch})")
    tensor = "tensor" if mesh.shape.get("tensor", 1) > 1 and f % mesh.shape["tensor"] == 0 else None
    n_local = n // n_batch
    capacity = n_local * k
    if capacity_factor > 0:
        capacity = min(capacity, math.ceil(capacity_factor * n_local * k / shards))

    def local(x, experts, weights, w_gate, w_up, w_down):
        per_shard = e // shards
        flat = experts.reshape(-1)                                     # [N·K] in token order
        dest = flat // per_shard
        slot = jnp.take_along_axis(jnp.cumsum(jax.nn.one_hot(dest, shards, dtype=jnp.int32), 0),
                                   dest[:, None], axis=1)[:, 0] - 1    # rank among copies sent to dest
        kept = slot < capacity
        send_x = jnp.zeros((shards, capacity, x.shape[-1]), x.dtype).at[dest, slot].set(
            jnp.repeat(x, k, axis=0), mode="drop")
        # Empty slots carry the out-of-range expert id `per_shard`: they sort last and fall
        # outside every ragged_dot group, so they cost nothing and come back as zeros.
        send_e = jnp.full((shards, capacity), per_shard, jnp.int32).at[dest, slot].set(flat % per_shard, mode="drop")
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True).reshape(shards * capacity, -1)
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True).reshape(-1)

        order = jnp.argsort(recv_e, stable=True)
        sizes = jnp.bincount(recv_e, length=per_shard).astype(jnp.int32)
        ys = grouped_ffn(recv_x[order], sizes, w_gate, w_up, w_down)
        if tensor:
            ys = jax.lax.psum(ys, tensor)
        ys = jnp.zeros_like(ys).at[order].set(ys).astype(x.dtype).reshape(shards, capacity, -1)
        back = jax.lax.all_to_all(ys, "expert", 0, 0, tiled=True)       # [P, C, D]: my copies' results
        mine = back[dest, jnp.minimum(slot, capacity - 1)]
        mine = jnp.where(kept[:, None], mine, 0).astype(jnp.float32).reshape(n_local, k, -1)
        dropped = jax.lax.psum(jnp.sum(~kept, dtype=jnp.int32), batch)
        return combine(mine, weights).astype(x.dtype), dropped

    tokens = P(batch, None)
    in_specs = (tokens, tokens, tokens, P("expert", None, tensor), P("expert", None, tensor), P("expert", tensor, None))
    # Tokens are replicated over "tensor"; so are the results once the psum above has run.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(tokens, P()))(
        x, experts, weights, w_gate, w_up, w_down)
