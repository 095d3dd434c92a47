import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def no_persistent_cache_writes():
    """XLA:CPU (jaxlib 0.10.2) deadlocks in the collectives of some multi-device programs loaded
    back from the persistent compilation cache (e.g. the FSDP + expert-parallel train step: the
    devices wait on different collectives). Compiled fresh they run fine, so programs compiled
    here are never written to the cache, hence never read back."""
    key = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, key)
    jax.config.update(key, 1e9)
    yield
    jax.config.update(key, before)
