"""The two-command RL recipe's plumbing: experiments/task_corpus.py writes rl.py's demonstrations
without the held-out questions, experiments.pretrain trains on them, and rl.py starts GRPO from that
workdir (its params, tokenizer.json and config.json; EOS is the packer's document end)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from deepseek_jax.chat.markup import BOS, EOS
from deepseek_jax.training import data
from experiments import pretrain, rl, task_corpus
from experiments.configs import rl_format, rl_math
from tests.rl.test_rl_binary import _config, _rows


def _rl_config():
    """The RL test config with the vocab of a configs/rl_format.py policy."""
    c = _config()
    c.model.vocab_size = rl_format.get_config().model.vocab_size
    return c


def test_corpus_is_the_demonstrations_without_held_out_questions():
    c = rl_math.get_config()
    held_out = rl.held_out_tasks(c)[1]
    docs = task_corpus.documents(c, 600)
    assert len(docs) == 600 and len(held_out) > 10
    train = rl.draw_tasks(c, task_corpus.BATCH, 10_000, held_out)
    assert docs[:3] == [data.Example(p, a.removesuffix(EOS)) for p, a in (rl.demonstration(c, t) for t in train[:3])]
    prompts = {d.prompt.removeprefix(BOS) for d in docs}
    assert all(d.prompt.startswith(BOS) and EOS not in d.prompt + d.completion for d in docs)
    assert not prompts & held_out
    assert len(prompts) == 100 - len(held_out)  # every other one-digit sum appears


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step pretraining run of configs/rl_format.py on a small corpus."""
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(dataclasses.asdict(d)) + "\n"
                              for d in task_corpus.documents(rl_math.get_config(), 400)))
    config = rl_format.get_config()
    config.update(data=str(corpus), steps=2, batch_size=4, seq_len=32, warmup_steps=1, log_every=1,
                  checkpoint_every=2, mesh="data=1", indexer_recall=False, sample_tokens=0)
    workdir = str(root / "run")
    return workdir, pretrain.run(config, workdir, devices=jax.devices()[:1], progress=False)


def test_init_from_a_pretraining_workdir(pretrained):
    workdir, summary = pretrained
    c = _rl_config()
    c.init_from = workdir + "/checkpoints"  # a workdir's checkpoints/ names it too
    cfg, params, tokenizer = rl.load_init_from(c, pretrain.model_config(c))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(summary["state"]["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cfg == pretrain.model_config(c)  # rl's own numerics; the architecture is the run's
    assert tokenizer.EOS_ID == data.eos_id(summary["tokenizer"]) == cfg.eos_token_id
    ids = tokenizer.encode(BOS + "Q: 1+2 A: 3" + EOS)
    assert ids[0] == cfg.bos_token_id and ids[-1] == tokenizer.EOS_ID
    assert tokenizer.decode(ids) == BOS + "Q: 1+2 A: 3" + EOS


@pytest.mark.slow
def test_grpo_from_a_pretraining_workdir_resumes(pretrained, tmp_path):
    """Two GRPO steps from a pretrained policy, uninterrupted and as 1 + 1 steps resumed from the
    workdir's checkpoint (the reference params are rebuilt from init_from): same params, same rows."""
    c = _rl_config()
    c.update(init_from=pretrained[0], steps=2, checkpoint_every=1, sft_steps=1000)  # no warm-up with init_from
    full = rl.run(c, str(tmp_path / "full"), progress=False)
    assert full["step"] == 2 and 0 <= full["pass_at_1"] <= 1
    assert full["history"][0]["grad_norm"] >= 0 and np.isfinite(full["history"][0]["loss"])
    c.steps = 1
    rl.run(c, str(tmp_path / "resumed"), progress=False)
    c.steps = 2
    resumed = rl.run(c, str(tmp_path / "resumed"), progress=False)
    assert resumed["start_step"] == 1 and resumed["start_pass_at_1"] == full["start_pass_at_1"]
    assert _rows(str(tmp_path / "resumed")) == _rows(str(tmp_path / "full"))
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(full["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_another_model_is_refused(pretrained):
    c = _rl_config()
    c.init_from = pretrained[0]
    c.model.num_hidden_layers = 2
    with pytest.raises(ValueError, match="num_hidden_layers=3 there, 2 here"):
        rl.load_init_from(c, pretrain.model_config(c))
