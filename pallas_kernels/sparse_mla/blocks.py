"""How many index blocks a sparse MLA kernel program walks: those up to its query's last used slot.

A query's indices often end in unused slots (-1). The indexer's top-k lists a query's keys by
ascending index and fills the slots past them with -1, so in causal prefill query t < K holds
t + 1 rows, and a decode step over a cache of n < K keys holds n. The kernels (Triton and
Mosaic; forward, backward and decode) loop over a query's index blocks only up to the block of
its last used slot, instead of over all K / block_k. Unused slots before it are masked as before,
so any placement of -1 stays exact; only whole blocks past the last used slot are skipped. The
Triton decode kernel does so only with walk_all=False, until timed (`triton_decode.py`).

Each program counts its own walk from the index row it already holds (`walked_blocks`, a max
over K slots) rather than taking a count from XLA. Counted in XLA, the reduction over [B, T, K]
added 0.4 MB of code to the Mosaic forward's compiled program (TPU v5e, T = 4096) and 1.6 MB to
the backward's (11 s of compile instead of 0.6), a read of the whole index array on a GPU
(0.5 GB at T = 64K), and an operand per kernel.

What it saves (K = 2048, 64-row blocks): causal prefill at T = 4K walks 76 % of the blocks of a
full walk (queries t < 2048 hold t + 1 rows) in the forward and the backward, 88 % at 8K, 98.5 %
at 64K; a decode step over a 512-key cache walks a quarter.
"""

import jax
import jax.numpy as jnp


def walked_blocks(used, block_k):
    """int32 scalar: the blocks of block_k slots up to the last True of `used` [N] or [1, N] (0 when none is).

    Kernel code (Triton and Mosaic lowerings) as well as plain JAX.
    """
    position = jax.lax.broadcasted_iota(jnp.int32, used.shape, used.ndim - 1) + 1
    return jax.lax.div(jnp.max(jnp.where(used, position, 0)) + block_k - 1, block_k)
