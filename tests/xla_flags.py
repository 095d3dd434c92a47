"""XLA:CPU flags for the test processes, set in XLA_FLAGS before JAX starts its backends.

XLA aborts the process on a flag it does not know, and flags come and go between jaxlib
releases, so each version-bound flag is listed with the jaxlib releases that have it.
"""

import jaxlib.version  # (no backend starts at import: the flags still apply)

# XLA:CPU's older loop emitters compile the tiny model's train step in ~60 % of the time its
# fusion emitters take (same HLO); jaxlib 0.11 dropped them, and the flag with them.
_LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_before(major, minor):
    return tuple(int(part) for part in jaxlib.version.__version__.split(".")[:2]) < (major, minor)


def fast_cpu_flags(device_count: int) -> str:
    """`device_count` simulated CPU devices, compiles tuned for tiny shapes (backend optimisation buys them
    nothing and costs ~3x in compile time, mostly the random initialisers), and collectives that wait up to
    15 minutes for their device threads (XLA:CPU's default aborts after 40 s; busy CI cores lag that long)."""
    flags = [f"--xla_force_host_platform_device_count={device_count}", "--xla_backend_optimization_level=0",
             "--xla_llvm_disable_expensive_passes=true",
             "--xla_cpu_collective_call_terminate_timeout_seconds=900",
             "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300"]
    if _jaxlib_before(0, 11):
        flags.append(_LOOP_EMITTERS)
    return " ".join(flags)
