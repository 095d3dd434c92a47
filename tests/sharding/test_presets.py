"""The tiny model under every rules preset (8 simulated devices) and across 2 processes equals
the unsharded model: loss and gradients to a relative error <= 1e-5 (float32)."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import Transformer
from deepseek_jax.losses import lm_loss
from sharding import rules
from sharding.mesh import make_mesh
from sharding.steps import forward_step, loss_and_grad_step
from tests.sharding.multiprocess_worker import tiny_problem

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def close(a, b, tol=1e-5):
    """‖a − b‖ <= tol·‖b‖ (exact equality when b is zero, e.g. the indexer's LM gradient)."""
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) <= tol * np.linalg.norm(np.asarray(b))


@pytest.fixture(scope="module")
def problem():
    cfg, params, tokens, targets, mask = tiny_problem()

    def loss(p):
        logits, _ = Transformer(cfg).apply({"params": p}, tokens, with_mtp=False)
        return lm_loss(logits, targets, mask)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params)
    return cfg, params, (tokens, targets, mask), ref_loss, ref_grads


@pytest.mark.parametrize("preset, mesh_spec", [
    ("dp", "data=8"),
    ("fsdp", "data=2,fsdp=4"),
    ("fsdp_ep", "fsdp=2,expert=4"),
    ("tp_ep", "data=2,expert=2,tensor=2"),
])
def test_preset_equals_unsharded(problem, preset, mesh_spec):
    cfg, params, batch, ref_loss, ref_grads = problem
    mesh, rule_set = make_mesh(mesh_spec), rules.preset(preset)
    sharded = rules.shard_params(params, cfg, mesh, rule_set)
    (loss, dropped), grads = loss_and_grad_step(cfg, mesh, rule_set, batch[0].shape)(sharded, *batch)
    assert int(dropped) == 0
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    for (path, g), r in zip(flat, ref_flat, strict=True):
        assert close(g, r), jax.tree_util.keystr(path)
    # Gradients come back sharded like the params.
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded)):
        assert g.sharding.is_equivalent_to(p.sharding, g.ndim)
    w_gate = sharded["moe_layers"]["mlp"]["w_gate"].sharding.spec  # [layers, E, D, F]
    expected = {"dp": (None, None, None, None), "fsdp": (None, None, "fsdp", None),
                "fsdp_ep": (None, "expert", "fsdp", None), "tp_ep": (None, "expert", None, "tensor")}[preset]
    assert tuple(w_gate) + (None,) * (4 - len(w_gate)) == expected


def test_forward_step_equals_unsharded(problem):
    cfg, params, (tokens, _, _), _, _ = problem
    mesh, rule_set = make_mesh("data=2,expert=2,tensor=2"), rules.preset("tp_ep")
    logits = forward_step(cfg, mesh, rule_set, tokens.shape)(rules.shard_params(params, cfg, mesh, rule_set), tokens)
    want, _ = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens, with_mtp=False))(params)
    assert close(logits, want)


def test_shard_params_names_mismatches(problem):
    cfg, params, _, _, _ = problem
    bad = dict(params, embed=params["embed"][:-1])
    with pytest.raises(ValueError, match=r"(?s)shard_params: .*embed"):
        rules.shard_params(bad, cfg, make_mesh("data=8"), rules.preset("dp"))


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'zero3'"):
        rules.preset("zero3")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(problem, tmp_path):
    """jax.distributed on localhost: 2 processes × 4 CPU devices, FSDP + expert parallel."""
    _, _, _, ref_loss, ref_grads = problem
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.multiprocess_worker", str(i), "2", str(port),
                               str(tmp_path / f"{i}.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    ref_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(ref_grads))))
    for i in range(2):
        got = json.loads((tmp_path / f"{i}.json").read_text())
        assert (got["process_count"], got["devices"]) == (2, 8)
        assert abs(got["loss"] - float(ref_loss)) <= 1e-5 * float(ref_loss)
        assert abs(got["grad_norm"] - ref_norm) <= 1e-5 * ref_norm
