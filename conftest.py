"""Test-wide setup: 8 simulated CPU devices, fast compiles, a persistent compilation cache, slow
files first.

XLA_FLAGS must be set before JAX initialises its backends, hence here at the repo root.
Test shapes are tiny, so XLA:CPU's backend optimisation buys nothing and costs ~3x in
compile time (mostly the random initialisers); level 0 keeps the suite fast, and XLA:CPU's
older loop emitters compile the tiny model's train step in ~60 % of the time its fusion
emitters take (12-15 s vs 20 s, same HLO, 2 cores). XLA:CPU aborts a
collective whose 8 device threads do not all arrive within 40 s; on 2 busy cores (xdist) the
sharded tests' threads can lag that long, so the limit is raised.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
          "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false "
          "--xla_cpu_collective_call_terminate_timeout_seconds=900 --xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()

import jax  # noqa: E402

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
