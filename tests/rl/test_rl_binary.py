"""experiments/rl.py end to end on a tiny budget (spec §8): warm-up, GRPO steps, metrics.jsonl
rows with the contract's fields, TensorBoard events, Orbax checkpoints; a run stopped by SIGTERM
and then by a crash, resumed each time by the same call, logs the same metrics and ends with the
same params as an uninterrupted one. Evaluation and rollouts use the same batch size, so they
share compiles."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from deepseek_jax.rl import byte_tokenizer
from deepseek_jax.training import metrics
from experiments import rl
from experiments.configs import rl_math

TIMING = ("tokens_per_s", "rollout_s", "wall_s")


def _config():
    c = rl_math.get_config()
    c.update(sft_steps=2, sft_batch=4, steps=4, inner_steps=2, prompts_per_step=2, group_size=2, eval_every=1,
             eval_tasks=4, max_new_tokens=3, kl_coef=0.01, offpolicy_delta=0.5, top_k=16, checkpoint_every=2,
             format_weight=0.1, language_weight=0.1, length_penalty=0.1)
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    return workdir, rl.run(_config(), workdir, progress=False)


def test_runs_and_logs(uninterrupted):
    workdir, summary = uninterrupted
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["pass_at_1"] == summary["start_pass_at_1"] and rows[-1]["pass_at_1"] == summary["pass_at_1"]
    for r in rows[1:]:
        for key in ("reward_mean", "pass_at_1", "kl", "masked_fraction", "clip_fraction", "entropy",
                    "response_length", "truncated", "outcome_mean", "well_formed", "language_consistency"):
            assert key in r
        assert 0 <= r["outcome_mean"] <= 1 and 0 <= r["masked_fraction"] <= 1
        assert r["reward_mean"] <= r["outcome_mean"] + 0.2 + 1e-6  # format and language add at most 0.1 each
    assert any(r["grad_norm"] > 0 for r in rows[1:])  # rewards differed within a group: the params moved
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["0", "2", "4"]


def test_interrupted_and_resumed_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch):
    """SIGTERM during step 1 saves step 1; a crash after logging step 3 leaves checkpoint 2 and a
    row for step 3, which the resume drops and recomputes; a run past `steps` does nothing."""
    full_dir, full = uninterrupted
    workdir = str(tmp_path)
    append = metrics.append_jsonl
    stop = {"at": 1, "how": "sigterm"}

    def interrupting_append(path, row):
        append(path, row)
        if row["step"] == stop["at"]:
            if stop["how"] == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(metrics, "append_jsonl", interrupting_append)
    first = rl.run(_config(), workdir, progress=False)
    assert first["step"] == 1
    stop.update(at=3, how="crash")
    with pytest.raises(KeyboardInterrupt):
        rl.run(_config(), workdir, progress=False)
    assert [r["step"] for r in _rows(workdir)] == [0, 1, 2, 3]
    monkeypatch.setattr(metrics, "append_jsonl", append)
    last = rl.run(_config(), workdir, progress=False)
    assert last["start_step"] == 2 and last["step"] == 4

    got, want = _rows(workdir), _rows(full_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=0, atol=1e-6)
    for a, b in zip(jax.tree.leaves(last["params"]), jax.tree.leaves(full["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = rl.run(_config(), workdir, progress=False)
    assert again["start_step"] == again["step"] == 4 and again["pass_at_1"] == full["pass_at_1"]


def test_sft_batch_layout():
    tokens, mask = rl.sft_batch([(byte_tokenizer.BOS + "Q: 1+2 A:", " 3" + byte_tokenizer.EOS)])
    # targets (tokens[1:]) under the mask: " 3" then EOS
    assert tokens[0, 1:][mask[0]].tolist() == byte_tokenizer.encode(" 3") + [byte_tokenizer.EOS_ID]
    assert tokens.shape[1] % 16 == 0


def test_held_out_questions_never_trained_on():
    c = rl_math.get_config()
    c.levels = (1, 2)
    held_out = frozenset(t.prompt for t in rl.draw_tasks(c, 40, seed=123))
    for seed in range(5):
        assert not any(t.prompt in held_out for t in rl.draw_tasks(c, 32, seed, held_out))


def test_config_errors(tmp_path):
    c = rl_math.get_config()
    c.task = "poetry"
    with pytest.raises(ValueError, match="task"):
        rl.run(c, str(tmp_path))
    c = rl_math.get_config()
    c.group_size = 1
    with pytest.raises(ValueError, match="group_size"):
        rl.run(c, str(tmp_path))
