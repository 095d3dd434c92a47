"""Maps a function over fixed-size chunks of the query axis, so working memory is per chunk."""

from typing import Callable

import jax
import jax.numpy as jnp


def map_query_chunks(fn: Callable, chunk: int, *arrays: jnp.ndarray):
    """Applies fn(positions [Tc], *chunks [B, Tc, ...]) -> pytree of [B, Tc, ...] over axis 1.

    Chunks are sliced out of the inputs and written into one preallocated output in a loop
    (no padded or transposed copies of the inputs). When T is not a multiple of the chunk, the
    last chunk is shifted back to end at T: it recomputes a few rows with identical values.
    Differentiable (the loop has a static trip count).
    """
    t = arrays[0].shape[1]
    chunk = min(chunk, t)
    n = -(-t // chunk)
    if n == 1:
        return fn(jnp.arange(t, dtype=jnp.int32), *arrays)

    def run(start):
        positions = start + jnp.arange(chunk, dtype=jnp.int32)
        return fn(positions, *(jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=1) for a in arrays))

    shapes = jax.eval_shape(run, jnp.int32(0))
    out = jax.tree.map(lambda s: jnp.zeros((s.shape[0], t) + s.shape[2:], s.dtype), shapes)

    def body(i, out):
        start = jnp.minimum(i * chunk, t - chunk)
        return jax.tree.map(lambda o, r: jax.lax.dynamic_update_slice_in_dim(o, r, start, axis=1), out, run(start))

    return jax.lax.fori_loop(0, n, body, out)
