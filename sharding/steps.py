"""Sharded steps: `jax.jit` with explicit in/out shardings (what pjit became) on a mesh.

Params are placed by their logical axes (`sharding.rules`), inputs split on the batch, and the
model runs inside `jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)`, so its activation
constraints and the expert-parallel MoE see the mesh. Scalars come back replicated; gradients
come back sharded like the params (FSDP: reduce-scattered, never gathered whole).
"""

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.losses import lm_loss
from deepseek_jax.model import Transformer
from deepseek_jax.params import param_shardings
from sharding.rules import Rules, batch_sharding


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, rules: Rules):
    """The mesh and rules the model reads while it is traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def _sharded(fn, cfg, mesh, rules, batch_shape, n_batch_args, out_shardings):
    batch = batch_sharding(mesh, rules, batch_shape)
    jitted = jax.jit(fn, in_shardings=(param_shardings(cfg, mesh, rules),) + (batch,) * n_batch_args,
                     out_shardings=out_shardings)

    def run(params, *batch_args):
        with mesh_context(mesh, rules):
            return jitted(params, *(global_batch(x, batch) for x in batch_args))
    return run


def global_batch(x, sharding):
    """The global batch as an array on `sharding`. Every process passes the same full batch and
    contributes the rows of its own devices (one process: a plain device_put)."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def loss_fn(params, tokens, targets, mask, *, cfg, attention="auto"):
    """LM loss of `Transformer(cfg)` (next-token cross-entropy over real tokens) and its aux."""
    logits, aux = Transformer(cfg).apply({"params": params}, tokens, attention=attention, with_mtp=False)
    return lm_loss(logits, targets, mask), aux


def loss_and_grad_step(cfg, mesh: jax.sharding.Mesh, rules: Rules, batch_shape, *, attention="auto"):
    """(params, tokens, targets, mask) -> ((loss, dropped token copies), grads), compiled for `mesh`."""
    def step(params, tokens, targets, mask):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, tokens, targets, mask, cfg=cfg, attention=attention)
        dropped = aux["dropped_tokens"].sum() if "dropped_tokens" in aux else 0
        return (loss, dropped), grads

    replicated = NamedSharding(mesh, P())
    return _sharded(step, cfg, mesh, rules, batch_shape, 3,
                    ((replicated, replicated), param_shardings(cfg, mesh, rules)))


def forward_step(cfg, mesh: jax.sharding.Mesh, rules: Rules, batch_shape, *, attention="auto"):
    """(params, tokens) -> logits [B, T, V] float32 sharded on the batch, compiled for `mesh`."""
    def step(params, tokens):
        logits, _ = Transformer(cfg).apply({"params": params}, tokens, attention=attention, with_mtp=False)
        return logits

    out = NamedSharding(mesh, batch_sharding(mesh, rules, batch_shape).spec)
    return _sharded(step, cfg, mesh, rules, batch_shape, 1, out)
