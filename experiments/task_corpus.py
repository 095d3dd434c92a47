"""Writes an RL task's demonstrations as a pretraining corpus (jsonl of {"prompt": ..., "completion": ...}),
so the pretraining binary can teach a policy the task format before GRPO (experiments/rl.py):

    python -m experiments.task_corpus --config=experiments/configs/rl_math.py --out=/tmp/math_corpus.jsonl \
        [--config.levels=1,2 --examples=20000]

A record is exactly rl.py's warm-up demonstration: the prompt (BOS + question) and the answer without
its final EOS (the pretraining packer puts EOS after every document, training/data.py). As in the
warm-up, the loss counts the answer and its EOS only: the questions are random draws, whose
tokens no model can predict and whose gradient would only be noise. Tasks are drawn as the
warm-up draws them, from the same config, so the held-out evaluation questions of an RL run with
this config (its task, levels, eval_tasks) never appear.
"""

import dataclasses
import functools
import json
import os

from absl import app, flags
from ml_collections import config_flags

from deepseek_jax.chat.markup import EOS
from deepseek_jax.training.data import Example
from experiments import rl

BATCH = 256  # tasks per draw; draw i is rl.draw_tasks' seed 10_000 + i, as the warm-up's steps


def documents(c, n: int) -> list[Example]:
    """n demonstrations of c.task (completions without EOS), none of a held-out question."""
    held_out = rl.held_out_tasks(c)[1]
    docs = []
    for i in range(-(-n // BATCH)):
        docs += [Example(prompt, target.removesuffix(EOS))
                 for prompt, target in map(functools.partial(rl.demonstration, c),
                                           rl.draw_tasks(c, BATCH, 10_000 + i, held_out))]
    return docs[:n]


def main(argv):
    del argv
    docs = documents(_CONFIG.value, _EXAMPLES.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        f.writelines(json.dumps(dataclasses.asdict(d)) + "\n" for d in docs)
    print(f"wrote {len(docs)} {_CONFIG.value.task} demonstrations to {_OUT.value}")


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/rl_math.py",
                                              "the RL config whose task, levels and held-out set to follow")
    _OUT = flags.DEFINE_string("out", "/tmp/deepseek_jax_math_corpus.jsonl", "the jsonl file to write")
    _EXAMPLES = flags.DEFINE_integer("examples", 20_000, "documents to write")
    app.run(main)
