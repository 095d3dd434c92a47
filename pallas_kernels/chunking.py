"""Maps a function over fixed-size chunks of one axis (queries, or batch rows), so working memory is per chunk;
splits causal queries into segments that see fewer keys."""

import itertools
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


def causal_segments(t: int, s: int, chunk: int, segments: int, q_offset: int = 0) -> list[tuple[int, int, int]]:
    """Static (start, stop, width) runs of whole query chunks; the queries in [start, stop) see only keys < width.

    Query p sees the keys s' <= p + q_offset, so a run that ends at `stop` needs only the first
    width = min(S, stop + q_offset) keys. Up to `segments` runs of about equal numbers of chunks
    (consecutive runs of the same width merged): a kernel that scores a run against its width
    instead of all S keys does T·S·(G + 1) / (2G) work over G runs instead of T·S at q_offset = 0
    (56 % at G = 8), and the top-k reads rows of its width.
    """
    n = -(-t // chunk)
    g = max(1, min(segments, n))
    bounds = [min(t, (i * n // g) * chunk) for i in range(g + 1)]
    runs = []
    for start, stop in itertools.pairwise(bounds):
        width = min(s, max(1, stop + q_offset))
        if runs and runs[-1][2] == width:
            runs[-1] = (runs[-1][0], stop, width)
        else:
            runs.append((start, stop, width))
    return runs
