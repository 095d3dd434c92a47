"""Tile sizes for the Triton lowering: power-of-two blocks of at least 16 (tl.dot's minimum)."""


def next_pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (int(n) - 1).bit_length())
