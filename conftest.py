"""Test-wide setup: 8 simulated CPU devices, fast compiles, a persistent compilation cache, slow
files first.

XLA_FLAGS must be set before JAX initialises its backends, hence here at the repo root
(`tests/xla_flags.py`: tiny shapes compile fastest with no backend optimisation; on 2 busy
cores (xdist) the sharded tests' device threads can lag past XLA:CPU's 40 s collective limit).
"""

import os

from tests.xla_flags import fast_cpu_flags

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + fast_cpu_flags(8)).strip()

import jax

_cache = os.environ.get("DEEPSEEK_JAX_COMPILE_CACHE", os.path.join(os.path.dirname(__file__), ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(items):
    """Files with a test marked `slow` run first (stable order otherwise): with `--dist loadfile`
    (setup.cfg) a file is one unit of work, and starting the long ones early keeps the two
    workers from finishing minutes apart."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
