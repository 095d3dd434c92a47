"""Orbax checkpoints: retention, bit-exact restore, resharding onto a mesh, atomicity under
kill -9 mid-save, the bf16 inference export, and named errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax import ModelConfig, Transformer, forward
from deepseek_jax.checkpoint.orbax import CheckpointManager, export_inference, load_inference
from deepseek_jax.params import abstract_params, param_shardings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tiny: expert 8, vocab 256 over "model" (4); embed 64 over "data" (2).
RULES = [("expert", "model"), ("vocab", "model"), ("embed", "data")]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny")
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 8))
    return cfg, params, tokens, np.asarray(forward(params, tokens, cfg))


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    """Steps 1..4 saved (async, max_to_keep=2), each with its own params, adamw state and data state."""
    _, params, _, _ = model
    tx = optax.adamw(1e-3)

    @jax.jit
    def train_step(params, opt_state):
        updates, opt_state = tx.update(params, opt_state, params)  # params as fake gradients
        return optax.apply_updates(params, updates), opt_state

    opt_state = jax.jit(tx.init)(params)
    directory = tmp_path_factory.mktemp("run")
    saved = {}
    with CheckpointManager(directory, max_to_keep=2) as manager:
        for step in range(1, 5):
            params, opt_state = train_step(params, opt_state)
            data_state = {"epoch": 0, "position": 100 * step, "shards": ["a", "b"]}
            assert manager.save(step, params=params, opt_state=opt_state, data_state=data_state)
            saved[step] = (params, opt_state, data_state)
    return directory, saved


def assert_bit_exact(restored, expected):
    expected = nn.meta.unbox(expected)
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for (path, a), b in zip(jax.tree.leaves_with_path(restored), jax.tree.leaves(expected)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def abstract_like(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), nn.meta.unbox(tree))


def test_keeps_latest_steps_and_restores_bit_exact(model, run):
    cfg = model[0]
    directory, saved = run
    params, opt_state, data_state = saved[4]
    with CheckpointManager(directory, max_to_keep=2) as manager:
        assert manager.all_steps() == [3, 4] and manager.latest_step() == 4
        assert not (directory / "1").exists() and not (directory / "2").exists()
        restored = manager.restore(params_target=abstract_params(cfg), opt_state_target=abstract_like(opt_state))
        assert restored["step"] == 4 and restored["data_state"] == data_state
        assert_bit_exact(restored["params"], params)
        assert_bit_exact(restored["opt_state"], opt_state)
        earlier = manager.restore(3, params_target=abstract_params(cfg))
        assert earlier["opt_state"] is None and earlier["data_state"] == saved[3][2]
        assert_bit_exact(earlier["params"], saved[3][0])


def test_restore_onto_a_mesh_reshards(model, run):
    """Saved on one device, restored onto 2x4: each array lands in its NamedSharding, values and
    logits unchanged; the adamw moments follow their params' shardings."""
    cfg, _, tokens, _ = model
    directory, saved = run
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    params_target = abstract_params(cfg, mesh, RULES)
    tx = optax.adamw(1e-3)
    sds = lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding)
    opt_target = optax.tree_map_params(  # eval_shape drops shardings; give mu, nu their params'
        tx, sds, jax.eval_shape(tx.init, params_target), jax.tree.map(lambda s: s.sharding, params_target),
        transform_non_params=lambda s: sds(s, NamedSharding(mesh, P())))
    with CheckpointManager(directory) as manager:
        restored = manager.restore(params_target=params_target, opt_state_target=opt_target)
    params = restored["params"]
    assert_bit_exact(restored["opt_state"], saved[4][1])
    assert restored["opt_state"][0].nu["embed"].sharding == NamedSharding(mesh, P("model", "data"))
    expected = param_shardings(cfg, mesh, RULES)
    for (path, leaf), sharding in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(expected)):
        assert leaf.sharding == sharding, jax.tree_util.keystr(path)
    assert params["embed"].sharding.spec == P("model", "data")
    assert params["moe_layers"]["mlp"]["w_gate"].sharding == NamedSharding(mesh, P(None, "model", "data", None))
    assert params["moe_layers"]["mlp"]["w_gate"].addressable_shards[0].data.shape == (2, 2, 32, 32)
    assert_bit_exact(params, saved[4][0])
    sharded, single = np.asarray(forward(params, tokens, cfg)), np.asarray(forward(saved[4][0], tokens, cfg))
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5 * np.abs(single).max())


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from deepseek_jax.checkpoint.orbax import CheckpointManager

    directory = sys.argv[1]
    manager = CheckpointManager(directory)
    manager.save(1, params={"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, data_state={"position": 1})
    manager.wait_until_finished()

    # Die at the worst moment: every array of step 2 is on disk, the commit rename not yet done.
    # (Killing on a timer raced the background writer: a fast disk committed first.)
    rename = os.rename
    def killing_rename(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(src)).startswith("2.orbax-checkpoint-tmp"):
            written = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(src) for f in files)
            if written < 1 << 20:
                sys.exit(f"only {written} bytes of step 2 on disk at its commit")
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)
    os.rename = killing_rename

    rng = np.random.default_rng(0)  # random: incompressible
    manager.save(2, params={f"w{i}": rng.standard_normal((512, 1024), dtype=np.float32) for i in range(4)},
                 data_state={"position": 2})  # 8 MiB
    manager.wait_until_finished()
    sys.exit("step 2 was committed: the kill before its rename never happened")
""")


def test_kill_during_async_save_leaves_previous_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    child = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], env=env, capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert not (tmp_path / "2").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith("2.")], "the killed save left no partial step"

    target = {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    with CheckpointManager(tmp_path, async_save=False) as manager:
        assert manager.all_steps() == [1] and manager.latest_step() == 1
        restored = manager.restore(params_target=target)
        assert restored["step"] == 1 and restored["data_state"] == {"position": 1}
        np.testing.assert_array_equal(restored["params"]["w"], np.arange(12, dtype=np.float32).reshape(3, 4))
        assert manager.save(2, params={"w": np.ones((3, 4), np.float32)}, data_state={"position": 2})
    with CheckpointManager(tmp_path) as manager:
        assert manager.all_steps() == [1, 2]
        restored = manager.restore(params_target=target)
        assert restored["step"] == 2 and restored["data_state"] == {"position": 2}
        np.testing.assert_array_equal(restored["params"]["w"], np.ones((3, 4), np.float32))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("2.")], "re-saving step 2 removes its debris"


def test_inference_export_round_trip(model, tmp_path):
    cfg, params, tokens, logits = model
    export_inference(tmp_path, cfg, params)
    cfg2, params2 = load_inference(tmp_path)
    assert cfg2 == cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    with open(tmp_path / "config.json") as f:
        assert ModelConfig.from_hf_config(json.load(f), attention_chunk_size=cfg.attention_chunk_size) == cfg2

    # The router and the indexer's head weights and key norm stay fp32; everything else is bf16.
    pinned = ("['mlp']['gate']", "['gate_bias']", "['weights_proj']['kernel']", "['k_norm']['scale']", "['k_norm']['bias']")
    dtypes = {jax.tree_util.keystr(p): x.dtype for p, x in jax.tree.leaves_with_path(params2)}
    for name, dtype in dtypes.items():
        assert dtype == (jnp.float32 if name.endswith(pinned) else jnp.bfloat16), name
    assert all(any(name.endswith(suffix) for name in dtypes) for suffix in pinned)
    expected = jax.tree.map(lambda x, y: np.asarray(x).astype(y.dtype), nn.meta.unbox(params), params2)
    assert_bit_exact(params2, expected)

    got = np.asarray(forward(params2, tokens, cfg2))
    assert np.linalg.norm(got - logits) / np.linalg.norm(logits) < 2e-2  # bf16 params and compute: ~7e-3

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    _, sharded = load_inference(tmp_path, mesh=mesh, rules=RULES)
    assert sharded["lm_head"].sharding == NamedSharding(mesh, P("data", "model"))
    assert_bit_exact(sharded, params2)


def test_errors_name_the_problem(model, run, tmp_path):
    cfg = model[0]
    directory, _ = run
    with CheckpointManager(tmp_path / "empty") as manager:
        with pytest.raises(ValueError, match=r"no checkpoint in .*empty"):
            manager.restore(params_target=abstract_params(cfg))
        with pytest.raises(ValueError, match=r"data_state: expected a JSON-serialisable dict"):
            manager.save(1, params={"w": np.zeros(2)}, data_state={"rng": np.zeros(2)})
    with CheckpointManager(directory) as manager:
        with pytest.raises(ValueError, match=r"no step 2 in .*; available steps: \[3, 4\]"):
            manager.restore(2, params_target=abstract_params(cfg))
    with pytest.raises(ValueError, match=r"no model_config.json"):
        load_inference(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"shape: \['embed'\]: expected \(128, 64\), got \(256, 64\)"):
        export_inference(tmp_path / "export", cfg.replace(vocab_size=128), model[1])
    with pytest.raises(ValueError, match=r"max_to_keep: expected None or >= 1, got 0"):
        CheckpointManager(tmp_path / "run", max_to_keep=0)
