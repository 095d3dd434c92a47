"""The pretraining loop: loss falls on the embedded corpus, preemption (SIGTERM in process, and
kill -9 of the binary) + resume equals an uninterrupted run, a NaN stops the run with the last
good checkpoint intact, metrics files."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from deepseek_jax.checkpoint.orbax import CheckpointManager
from deepseek_jax.params import abstract_params
from experiments import pretrain
from experiments.configs import tiny

ONE_DEVICE = jax.devices()[:1]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The test runs' changes to the tiny preset; `_flags` spells them for the binary.
CHANGES = {"steps": 30, "batch_size": 4, "seq_len": 32, "data_max_bytes": 100_000, "log_every": 1,
           "checkpoint_every": 10, "warmup_steps": 3, "mesh": "data=1", "indexer_recall": False}


def _config(**changes):
    c = tiny.get_config()
    c.model.vocab_size = 300
    c.update(**CHANGES)
    c.update(**changes)
    return c


def _flags(**changes):
    return ["--config.model.vocab_size=300"] + [f"--config.{k}={v}" for k, v in dict(CHANGES, **changes).items()]


class _Batches:
    """Wraps the real iterator; calls `hook(n)` after handing out batch n (1-based)."""

    def __init__(self, inner, hook):
        self.inner, self.hook, self.n = inner, hook, 0

    @property
    def state(self):
        return self.inner.state

    def __next__(self):
        batch = next(self.inner)
        self.n += 1
        return self.hook(self.n, batch)


def _iterator(config, workdir, state=None):
    cfg = pretrain.model_config(config)
    _, (stream, trained) = pretrain.load_tokenizer_and_stream(config, workdir, cfg)
    from deepseek_jax.training.data import PackedBatches
    return PackedBatches(stream, seq_len=config.seq_len, batch_size=config.batch_size,
                         accum_steps=config.grad_accum_steps, seed=config.seed, state=state, trained=trained)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    return workdir, pretrain.run(_config(), workdir, devices=ONE_DEVICE, progress=False)


def test_loss_falls_and_files(uninterrupted):
    workdir, summary = uninterrupted
    losses = [r["lm_loss"] for r in summary["history"]]
    assert summary["step"] == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    record = summary["history"][-1]
    for key in ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "indexer_kl", "grad_norm",
                "indexer_grad_norm", "expert_load_max_over_mean", "tokens_per_s", "tflops_per_s"):
        assert key in record
    assert len(_losses(workdir)) == 30
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.path.isfile(os.path.join(workdir, "tokenizer.json"))


def test_preempt_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """SIGTERM after step 11 saves step 11; rerunning resumes there with the same batches."""
    full_dir, full = uninterrupted
    workdir = str(tmp_path)
    config = _config()

    def preempt(n, batch):
        if n == 11:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch
    first = pretrain.run(config, workdir, batches=_Batches(_iterator(config, workdir), preempt),
                         devices=ONE_DEVICE, progress=False)
    assert first["preempted"] and first["step"] == 11
    second = pretrain.run(config, workdir, devices=ONE_DEVICE, progress=False)
    assert second["start_step"] == 11 and second["step"] == 30
    got, want = _losses(workdir), _losses(full_dir)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(second["state"]["params"]), jax.tree.leaves(full["state"]["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _binary(workdir, *flags):
    """`python -m experiments.pretrain` on one CPU device (the same compiled step as ONE_DEVICE
    here), sharing this session's compilation cache."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    cmd = [sys.executable, "-m", "experiments.pretrain", "--config=experiments/configs/tiny.py",
           f"--workdir={workdir}", "--config.sample_tokens=0", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_kill_9_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
    """SIGKILL the binary once its first checkpoint (step 5) is on disk; the same command then
    resumes from the last complete checkpoint, and every loss either process logged equals the
    uninterrupted run's at that step."""
    full_dir, _ = uninterrupted
    workdir = str(tmp_path)
    killed = _binary(workdir, *_flags(checkpoint_every=5))
    first = os.path.join(workdir, "checkpoints", "5")
    deadline = time.monotonic() + 300
    while not os.path.isdir(first) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    output = killed.communicate()[0]
    assert killed.returncode == -signal.SIGKILL, output
    logged = [r["step"] for r in _records(workdir)]
    assert 5 <= max(logged) < 30, logged  # killed mid-run, not after it

    resumed = _binary(workdir, *_flags(checkpoint_every=5))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    start = int(output.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert 5 <= start <= max(logged) and start % 5 == 0, output
    want = _losses(full_dir)
    records = _records(workdir)
    # Steps after the checkpoint that the killed process had logged are logged again.
    assert {r["step"] for r in records} == set(want) and len(records) == 30 + max(logged) - start
    np.testing.assert_allclose([r["loss"] for r in records], [want[r["step"]] for r in records], rtol=0, atol=1e-6)


def test_init_from_starts_from_the_other_runs_params(uninterrupted, tmp_path, monkeypatch):
    """`init_from` (how the sparse stage starts from a warm-up): step 1 starts from that run's
    last params, with its tokenizer, a fresh data iterator and step count."""
    full_dir, full = uninterrupted
    workdir = str(tmp_path)
    config = _config(init_from=full_dir)
    make_step, first_params = pretrain.train_step.make_train_step, []

    def recording_make_step(*args, **kwargs):
        step = make_step(*args, **kwargs)

        def run(state, batch):
            if not first_params:  # copied before the step donates it
                first_params.append(jax.device_get(state["params"]))
            return step(state, batch)
        return run
    monkeypatch.setattr(pretrain.train_step, "make_train_step", recording_make_step)

    def stop_after_one(n, batch):
        os.kill(os.getpid(), signal.SIGTERM)
        return batch
    summary = pretrain.run(config, workdir, batches=_Batches(_iterator(config, workdir), stop_after_one),
                           devices=ONE_DEVICE, progress=False)
    assert summary["start_step"] == 0 and summary["step"] == 1
    for a, b in zip(jax.tree.leaves(first_params[0]), jax.tree.leaves(full["state"]["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with open(os.path.join(workdir, "tokenizer.json")) as f, open(os.path.join(full_dir, "tokenizer.json")) as g:
        assert json.load(f)["model"] == json.load(g)["model"]
    with CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        restored = manager.restore(params_target=abstract_params(pretrain.model_config(config)))
    assert restored["step"] == 1 and restored["data_state"]["position"] == config.batch_size
    with pytest.raises(ValueError, match="init_from: no directory"):
        pretrain.run(_config(init_from=str(tmp_path / "missing")), str(tmp_path / "other"), devices=ONE_DEVICE,
                     progress=False)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path)
    config = _config()

    def poison(n, batch):
        if n == 13:
            batch = dict(batch, mask=np.full_like(batch["mask"], np.nan))
        return batch
    with pytest.raises(pretrain.NonFiniteLossError, match="step 13: non-finite loss"):
        pretrain.run(config, workdir, batches=_Batches(_iterator(config, workdir), poison), devices=ONE_DEVICE,
                     progress=False)
    cfg = pretrain.model_config(config)
    with CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        assert manager.all_steps()[-1] == 10
        restored = manager.restore(params_target=abstract_params(cfg))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored["params"]))
    assert restored["data_state"]["position"] == 10 * config.batch_size
