"""The memory planner's per-device param bytes equal what `shard_params` actually puts on a
device; remat policies order the activation estimate none > dots > full."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer
from experiments.plan_memory import activation_bytes, param_bytes_per_device, plan
from sharding import rules
from sharding.mesh import make_mesh, parse_mesh_spec


@pytest.mark.parametrize("preset, spec", [("fsdp", "data=2,fsdp=4"), ("fsdp_ep", "fsdp=2,expert=4"),
                                          ("tp_ep", "fsdp=2,expert=2,tensor=2")])
def test_param_bytes_match_real_shards(preset, spec):
    cfg = ModelConfig.preset("tiny")
    params = jax.jit(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32)))()["params"]
    placed = rules.shard_params(nn.meta.unbox(params), cfg, make_mesh(spec), rules.preset(preset))
    device = jax.devices()[0]
    real = sum(s.data.nbytes for leaf in jax.tree.leaves(placed) for s in leaf.addressable_shards if s.device == device)
    planned, _ = param_bytes_per_device(cfg, parse_mesh_spec(spec, 8), rules.preset(preset))
    assert planned == real


def test_remat_orders_activations():
    got = [activation_bytes(ModelConfig.preset("tiny", remat=r), 2, 24) for r in ("none", "dots", "full")]
    assert got[0] > got[1] > got[2] > 0


def test_batch_must_split():
    with pytest.raises(ValueError, match="does not split over the batch axes"):
        plan(ModelConfig.preset("tiny"), "data=2,fsdp=4", "fsdp", 12, 16, 1.0)
