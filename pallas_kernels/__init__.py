"""DSA kernels: lightning-indexer scores + top-k and sparse MLA attention.

Each kernel sits beside a pure-JAX reference computing the same function; `ops` is the public
entry point that picks one.
"""
