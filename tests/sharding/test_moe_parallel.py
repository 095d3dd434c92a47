"""Expert-parallel MoE (shard_map + all_to_all) against the single-device dropless dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.layers.experts import dispatch_experts
from sharding import moe_parallel
from sharding.mesh import make_mesh

N, D, F, E, K = 64, 16, 8, 8, 2


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    # Skewed routing: expert 0 is popular, so small capacities overflow on its shard.
    experts = np.stack([np.where(rng.random(N) < 0.6, 0, rng.integers(1, E, N)), rng.integers(1, E, N)], 1)
    experts = jnp.asarray(experts, jnp.int32)
    weights = jnp.asarray(rng.random((N, K)), jnp.float32)
    w = [jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    return x, experts, weights, w


def run(mesh_spec, inputs, capacity_factor):
    x, experts, weights, w = inputs
    fn = jax.jit(lambda *a: moe_parallel.dispatch(*a, capacity_factor=capacity_factor))
    with jax.set_mesh(make_mesh(mesh_spec)):
        return fn(x, experts, weights, *w)


@pytest.mark.parametrize("mesh_spec", ["expert=8", "data=2,expert=4", "expert=4,tensor=2", "fsdp=2,expert=2,tensor=2"])
def test_equals_single_device(inputs, mesh_spec):
    want = dispatch_experts(*inputs[:3], *inputs[3])
    got, dropped = run(mesh_spec, inputs, 0.0)
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_without_expert_axis_is_local(inputs):
    got, dropped = run("data=8", inputs, 1.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(dispatch_experts(*inputs[:3], *inputs[3])))
    assert int(dropped) == 0


def test_overflow_is_counted_and_dropped(inputs):
    """Capacity 1.0 on 4 expert shards (tokens in 8 blocks over data × expert): copies past each
    (source, destination) capacity are dropped in token order; the result equals the dropless
    one with exactly those copies' weights zeroed."""
    x, experts, weights, w = inputs
    shards, n_local = 4, N // 8
    capacity = int(np.ceil(n_local * K / shards))
    e = np.asarray(experts)
    keep = np.ones_like(e, bool)
    for src in range(N // n_local):
        block = e[src * n_local:(src + 1) * n_local].reshape(-1) // (E // shards)
        seen = np.zeros(shards, int)
        for i, dst in enumerate(block):
            keep.reshape(-1)[src * n_local * K + i] = seen[dst] < capacity
            seen[dst] += 1
    assert (~keep).sum() > 0
    got, dropped = run("data=2,expert=4", inputs, 1.0)
    assert int(dropped) == (~keep).sum()
    want = dispatch_experts(x, experts, weights * keep, *w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_gradients_match(inputs):
    x, experts, weights, w = inputs
    loss = lambda fn: lambda x, weights, *w: jnp.sum(jnp.sin(fn(x, experts, weights, *w)))
    want = jax.grad(loss(dispatch_experts), argnums=(0, 1, 2, 3, 4))(x, weights, *w)
    ep = lambda *a: moe_parallel.dispatch(*a)[0]
    with jax.set_mesh(make_mesh("data=2,expert=2,tensor=2")):
        got = jax.jit(jax.grad(loss(ep), argnums=(0, 1, 2, 3, 4)))(x, weights, *w)
    for g, r in zip(got, want):  # sums over tokens run in another order: norm-relative error
        assert np.linalg.norm(np.asarray(g) - np.asarray(r)) <= 1e-5 * np.linalg.norm(np.asarray(r))


def test_bad_split_is_named(inputs):
    x, experts, weights, w = inputs
    with pytest.raises(ValueError, match="tokens do not split"):
        run("expert=8", (x[:60], experts[:60], weights[:60], w), 0.0)
