"""Maps a function over fixed-size chunks of the query axis, so working memory is per chunk."""

from typing import Callable

import jax
import jax.numpy as jnp


def map_query_chunks(fn: Callable, chunk: int, *arrays: jnp.ndarray):
    """Applies fn(positions [Tc], *chunked arrays [B, Tc, ...]) over chunks of axis 1.

    T is padded up to a multiple of `chunk`; outputs (a pytree of [B, Tc, ...]) are stitched
    back to [B, T, ...]. Chunks run sequentially (`lax.map`), so peak memory is one chunk's.
    """
    t = arrays[0].shape[1]
    chunk = min(chunk, t)
    n = -(-t // chunk)
    pad = n * chunk - t

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        a = a.reshape((a.shape[0], n, chunk) + a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    positions = jnp.arange(n * chunk, dtype=jnp.int32).reshape(n, chunk)
    if n == 1:
        return fn(positions[0], *arrays)
    out = jax.lax.map(lambda args: fn(args[0], *args[1:]), (positions,) + tuple(split(a) for a in arrays))

    def join(o):
        o = jnp.moveaxis(o, 0, 1)
        return o.reshape((o.shape[0], n * chunk) + o.shape[3:])[:, :t]

    return jax.tree.map(join, out)
