"""experiments/sample.py end to end on a tiny random HF checkpoint with a small tokenizer."""

import datetime

import flax.linen as nn
import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from deepseek_jax import ModelConfig, Transformer, save_hf
from deepseek_jax.chat import markup
from deepseek_jax.chat.example_tools import example_tools
from experiments import sample

SPECIALS = [markup.BOS, markup.EOS, markup.USER, markup.ASSISTANT, markup.THINK_START, markup.THINK_END]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    cfg = ModelConfig.preset("tiny")
    params = jax.jit(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 4), np.int32)))()["params"]
    save_hf(path, cfg, nn.meta.unbox(params))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the quick brown fox jumps over the lazy dog 0123456789 + * = ?"] * 20
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"] + SPECIALS))
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def test_raw_completion(checkpoint):
    cfg, params = sample.load_checkpoint(str(checkpoint))
    complete = sample.Completer(params, cfg, sample.load_tokenizer(str(checkpoint / "tokenizer.json")),
                                max_new_tokens=8, temperature=0.0, top_p=1.0, top_k=0, seed=0, speculative=False)
    assert isinstance(complete("the quick brown fox"), str)
    assert complete.calls == 1


def test_chat_turn_runs_tools_and_keeps_reasoning():
    """A scripted model calls the calculator, then answers; the second prompt holds the reasoning."""
    tools, schemas = example_tools(datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc), {})
    call = ('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="calculate">\n'
            '<｜DSML｜parameter name="expression" string="true">17 * 23</｜DSML｜parameter>\n'
            '</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>')
    replies = iter(["I should compute it.</think>" + call, "Done.</think>It is 391.<｜end▁of▁sentence｜>"])
    prompts, shown = [], []

    def complete(prompt):
        prompts.append(prompt)
        return next(replies)
    history = [{"role": "system", "content": "sys", "tools": schemas}, {"role": "user", "content": "17*23?"}]
    history = sample.chat_turn(complete, history, tools, "thinking", 4, show=shown.append)
    assert history[-1]["content"] == "It is 391." and history[-2] == {"role": "tool", "content": "391"}
    assert "I should compute it." in prompts[1]
    assert any("calculate" in s and "391" in s for s in shown)


def test_chat_turn_survives_an_unparseable_completion(checkpoint):
    shown = []
    history = [{"role": "user", "content": "hi"}]
    out = sample.chat_turn(lambda prompt: "no end of sentence here", list(history), {}, "chat", 2, show=shown.append)
    assert out == history and "unparseable" in shown[0]
