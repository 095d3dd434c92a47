"""One process of a localhost multi-process run: `python -m tests.sharding.multiprocess_worker
PROCESS_ID NUM_PROCESSES PORT OUT.json` computes the tiny model's LM loss and a gradient norm on
a mesh over every process's CPU devices and writes them to OUT.json."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from sharding.mesh import initialize, make_mesh
from tests.xla_flags import fast_cpu_flags


def tiny_problem():
    """Config, params (host numpy, same on every process), tokens, targets, mask."""
    import flax.linen as nn

    from deepseek_jax import ModelConfig, Transformer

    cfg = ModelConfig.preset("tiny")
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, size=(8, 24)).astype(np.int32)
    with jax.default_device(jax.local_devices()[0]):  # computed by this process alone
        variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.asarray(tokens))
    params = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
    targets = np.roll(tokens, -1, axis=1)
    mask = np.ones_like(tokens)
    mask[:, -1] = 0
    return cfg, params, tokens, targets, mask


def sharded_loss(mesh_spec, preset):
    from sharding import rules
    from sharding.steps import loss_and_grad_step

    cfg, params, tokens, targets, mask = tiny_problem()
    mesh, rule_set = make_mesh(mesh_spec), rules.preset(preset)
    step = loss_and_grad_step(cfg, mesh, rule_set, tokens.shape)
    (loss, _), grads = step(rules.shard_params(params, cfg, mesh, rule_set), tokens, targets, mask)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return float(loss), float(jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(grad_norm))


if __name__ == "__main__":
    # Before JAX's backends start (at first use, not at import): 4 CPU devices per process, and no other platform.
    # jax read JAX_PLATFORMS when it was imported (above), so the config is set too: with it unset, the TPU plugin
    # (libtpu, in the test extra) starts and holds its process lockfile, which experiments/tpu_aot.py, run by another
    # test at the same time, then cannot take.
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    os.environ["XLA_FLAGS"] = fast_cpu_flags(4)
    process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    initialize(f"localhost:{port}", num_processes, process_id)
    loss, grad_norm = sharded_loss("fsdp=2,expert=-1", "fsdp_ep")
    with open(out, "w") as f:
        json.dump({"loss": loss, "grad_norm": grad_norm, "devices": jax.device_count(),
                   "process_count": jax.process_count()}, f)
