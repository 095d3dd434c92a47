"""Tile sizes and operand limits of the Triton lowering.

Blocks are powers of two of at least 16 (tl.dot's minimum). JAX's Triton lowering addresses an
operand with 32-bit signed element offsets unless the operand exceeds 4 GiB (then 64-bit), so a
1-byte (fp8) operand of more than 2^31 elements and at most 2^32 bytes overflows the offset and
is silently mis-addressed (2- and 4-byte operands of at most 4 GiB have at most 2^31 elements).
"""

import math

import numpy as np

OFFSET_LIMIT = 2**31  # elements a 32-bit signed offset reaches (read at call time: tests lower it)


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (int(n) - 1).bit_length())


def overflows_offsets(shape, dtype) -> bool:
    """True for an operand the Triton lowering mis-addresses: 1-byte elements, 2^31 < size <= 2^32."""
    return np.dtype(dtype).itemsize == 1 and OFFSET_LIMIT < math.prod(shape) <= 2 * OFFSET_LIMIT


def rows_per_call(rows: int, row_operands: dict, caller: str) -> int:
    """How many of `rows` leading rows one pallas_call may take so that no operand overflows its offsets.

    row_operands: name -> (shape, dtype) of one row of each operand, as the kernel gets it. Returns
    `rows` when no [rows, *shape] operand overflows, else the group size of the fewest, most even
    groups (the callers shift the last group back to end at `rows`, recomputing the overlap) for
    which none does. Raises a ValueError where a single row overflows (no split helps).
    """
    group = rows
    while over := [(name, shape, dtype) for name, (shape, dtype) in row_operands.items()
                   if overflows_offsets((group, *shape), dtype)]:
        name, shape, dtype = over[0]
        if overflows_offsets(shape, dtype):
            raise ValueError(f"{caller}: one row of {name}, shape {tuple(shape)} of {np.dtype(dtype).name}, has "
                             f"{math.prod(shape)} elements: a 1-byte operand of more than 2^31 elements and at most "
                             "4 GiB overflows the Triton lowering's 32-bit offsets")
        # Below this operand's range; a smaller group may land another operand in its own range: check again.
        group = OFFSET_LIMIT // math.prod(shape)
        group = -(-rows // -(-rows // group))
    return group
