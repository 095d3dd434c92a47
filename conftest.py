"""Test-wide setup: 8 simulated CPU devices, fast compiles, a persistent compilation cache.

XLA_FLAGS must be set before JAX initialises its backends, hence here at the repo root.
Test shapes are tiny, so XLA:CPU's backend optimisation buys nothing and costs ~3x in
compile time (mostly the random initialisers); level 0 keeps the suite fast. XLA:CPU aborts a
collective whose 8 device threads do not all arrive within 40 s; on 2 busy cores (xdist) the
sharded tests' threads can lag that long, so the limit is raised.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
          "--xla_llvm_disable_expensive_passes=true --xla_cpu_collective_call_terminate_timeout_seconds=900 "
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()

import jax  # noqa: E402

_cache = os.environ.get("DEEPSEEK_JAX_COMPILE_CACHE", os.path.join(os.path.dirname(__file__), ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
