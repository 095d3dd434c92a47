"""A `tokenizers.Tokenizer` (a pretraining run's `tokenizer.json`) behind the rollout's Tokenizer
protocol (rl/multiturn.py), so a policy pretrained by experiments/pretrain.py keeps its token ids.

The chat format's special strings (BOS, EOS, ...) that the tokenizer holds as added tokens encode
to their single ids wherever they appear in the text, and decode back to their strings. EOS_ID is
the id the pretraining packer puts after every document (training/data.py), so a policy stops
where its corpus documents ended.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer

from deepseek_jax.training.data import eos_id


class BPETokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.EOS_ID = eos_id(tokenizer)

    @classmethod
    def from_file(cls, path: str) -> "BPETokenizer":
        return cls(Tokenizer.from_file(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)
