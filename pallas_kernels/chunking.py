"""Maps a function over fixed-size chunks of one axis (queries, or batch rows), so working memory is per chunk."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def map_chunks(fn: Callable, chunk: int, *arrays: jnp.ndarray, axis: int):
    """Applies fn(positions [C], *chunks) -> pytree of arrays chunked like the inputs, over `axis`.

    positions are the chunk's indices along `axis`. Chunks are sliced out of the inputs and
    written into one preallocated output in a loop (no padded or transposed copies of the
    inputs). When the axis is not a multiple of the chunk, the last chunk is shifted back to end
    there: it recomputes a few entries with identical values. Differentiable (the loop has a
    static trip count).
    """
    t = arrays[0].shape[axis]
    chunk = min(chunk, t)
    n = -(-t // chunk)
    if n == 1:
        return fn(jnp.arange(t, dtype=jnp.int32), *arrays)

    def run(start):
        positions = start + jnp.arange(chunk, dtype=jnp.int32)
        return fn(positions, *(jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=axis) for a in arrays))

    shapes = jax.eval_shape(run, jnp.int32(0))
    out = jax.tree.map(lambda s: jnp.zeros(s.shape[:axis] + (t,) + s.shape[axis + 1:], s.dtype), shapes)

    def body(i, out):
        start = jnp.minimum(i * chunk, t - chunk)
        return jax.tree.map(lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r, start, axis=axis), out, run(start))

    return jax.lax.fori_loop(0, n, body, out)


def map_query_chunks(fn: Callable, chunk: int, *arrays: jnp.ndarray):
    """`map_chunks` over the query axis: fn(positions [Tc], *chunks [B, Tc, ...]) -> pytree of [B, Tc, ...]."""
    return map_chunks(fn, chunk, *arrays, axis=1)
