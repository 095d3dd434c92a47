"""Pretraining data: corpus, tokenizer, packing and a resumable deterministic batch iterator.

- Corpus: user files (`.txt`/`.md`/`.py`... as one document each, `.jsonl` with one record per
  line, directories walked in sorted order), or, when none is given, the embedded default: the
  Python standard library's own top-level `.py` sources (in sorted order), present offline on
  every machine that runs this code. It is deterministic per Python version. A jsonl record is
  {"text": ...} (every token trained) or {"prompt": ..., "completion": ...}: an example whose
  prompt is context only, so the loss counts the completion and its EOS (supervised fine-tuning
  data, e.g. experiments/task_corpus.py's task demonstrations).
- Tokenizer (`tokenizers`): a `tokenizer.json`, or a byte-level BPE trained on the corpus with
  DeepSeek's BOS/EOS as ids 0 and 1 (the model's `bos_token_id` / `eos_token_id`).
- Packing: documents joined into one stream, each followed by EOS, with a parallel 0/1 stream
  marking the tokens the loss counts (all but prompts); the stream is cut into windows of
  seq_len + 1 tokens (inputs = window[:-1], targets = window[1:]). By default every token is
  real and windows cross documents; `pack(align=seq_len)` instead pads each document with
  untrained EOS so that each window starts at a document.
- Iterator: windows in a fresh seeded permutation each epoch; its whole state is a small JSON
  dict (`state`), saved with each checkpoint, so a resumed run reads exactly the same batches.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deepseek_jax.chat.markup import BOS, EOS

_JSONL = (".jsonl",)


@dataclasses.dataclass(frozen=True)
class Example:
    """A prompt-completion document: the loss counts the completion's tokens only."""
    prompt: str
    completion: str


Document = str | Example


def _parts(doc: Document) -> tuple[str, str]:
    """(context, trained text): a plain text is all trained."""
    return (doc.prompt, doc.completion) if isinstance(doc, Example) else ("", doc)


def _text(doc: Document) -> str:
    return "".join(_parts(doc))


def _record(record, where: str) -> Document:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return Example(record["prompt"], record["completion"])
    raise ValueError(f"data: {where}: expected a JSON object with a string 'text', or strings 'prompt' and "
                     f"'completion'")


def default_corpus_files() -> list[str]:
    """The embedded corpus: the standard library's top-level `.py` files, sorted."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def _files(paths: str) -> list[str]:
    files = []
    for path in filter(None, (p.strip() for p in paths.split(","))):
        if os.path.isdir(path):
            files += sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"data: no file or directory at {path!r}")
    return files


def load_documents(paths: str = "", max_bytes: int = 0) -> list[Document]:
    """Documents (texts, or Examples from prompt-completion jsonl records) from comma-separated
    files/directories (empty: the embedded corpus), in a fixed order, stopping once `max_bytes`
    (> 0) of text is read."""
    files = _files(paths) if paths else default_corpus_files()
    docs, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            if path.endswith(_JSONL):
                texts = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        texts.append(_record(json.loads(line), f"{path}:{n}"))
            else:
                texts = [f.read()]
        for doc in texts:
            if text := _text(doc):
                docs.append(doc)
                total += len(text.encode("utf-8"))
            if max_bytes > 0 and total >= max_bytes:
                return docs
    if not docs:
        raise ValueError(f"data: no text found in {paths or 'the embedded corpus'}")
    return docs


def train_tokenizer(docs: list[Document], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens (ids 0, 1 = BOS, EOS) trained on `docs`."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        raise ValueError(f"train_tokenizer: vocab_size: expected >= {len(alphabet) + 2} (bytes + BOS/EOS), "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(map(_text, docs), trainer)
    return tokenizer


def load_tokenizer(path: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer {path}: {tokenizer.get_vocab_size()} tokens exceed the model's "
                         f"vocab_size {vocab_size}")
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"tokenizer: no EOS token {EOS!r}")
    return eos


def pack(tokenizer: Tokenizer, docs: list[Document], align: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, trained): one int32 stream of every document's ids followed by EOS, and a 0/1
    stream of the same length marking the tokens the loss counts (an Example's prompt is 0).
    An Example's prompt and completion are tokenized apart, so no token straddles the two.
    align > 0 (the window length, seq_len) pads each document with untrained EOS to a multiple
    of it, so every window of PackedBatches starts at a document's first token and sees no other
    document (as a single prompt is seen at inference); one more untrained EOS ends the stream, the
    last window's last target."""
    eos = eos_id(tokenizer)
    prompts, rest = map(list, zip(*map(_parts, docs)))
    tokens, trained = [], []
    for p, r in zip(*([e.ids for e in tokenizer.encode_batch(t, add_special_tokens=False)] for t in (prompts, rest))):
        pad = -(len(p) + len(r) + 1) % align if align > 0 else 0
        tokens.append(np.asarray(p + r + [eos] * (1 + pad), np.int32))
        trained.append(np.repeat(np.asarray([0, 1, 0], np.int32), [len(p), len(r) + 1, pad]))
    if align > 0:
        tokens.append(np.asarray([eos], np.int32))
        trained.append(np.zeros(1, np.int32))
    return np.concatenate(tokens), np.concatenate(trained)


class PackedBatches:
    """Deterministic batches {"inputs", "targets", "mask"} of shape [accum, batch, seq_len] from a
    packed stream; the mask is `trained` at the targets (default: every target counts). `state`
    (JSON) is where it stands; passing it back resumes exactly there."""

    def __init__(self, stream: np.ndarray, *, seq_len: int, batch_size: int, accum_steps: int = 1,
                 seed: int = 0, state: dict | None = None, trained: np.ndarray | None = None):
        self.stream, self.seq_len = np.asarray(stream, np.int32), seq_len
        self.trained = np.ones(len(self.stream), np.float32) if trained is None else np.asarray(trained, np.float32)
        if self.trained.shape != self.stream.shape:
            raise ValueError(f"data: trained mask of shape {self.trained.shape} does not match the stream's "
                             f"{self.stream.shape}")
        self.shape = (accum_steps, batch_size)
        self.num_windows = (len(self.stream) - 1) // seq_len
        if self.num_windows < batch_size * accum_steps:
            raise ValueError(f"data: {len(self.stream)} tokens make {self.num_windows} windows of {seq_len + 1}, "
                             f"fewer than one batch ({accum_steps} x {batch_size})")
        fresh = {"seed": seed, "epoch": 0, "position": 0, "num_windows": self.num_windows}
        if state is not None and (state.get("num_windows") != self.num_windows or state.get("seed") != seed):
            raise ValueError(f"data: saved iterator state {state} does not match this corpus/seed "
                             f"(num_windows={self.num_windows}, seed={seed})")
        self.state = dict(state or fresh)
        self._order = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.state["seed"], epoch]).permutation(self.num_windows))
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picks = []
        for _ in range(self.shape[0] * self.shape[1]):
            if self.state["position"] == self.num_windows:
                self.state.update(epoch=self.state["epoch"] + 1, position=0)
            picks.append(self._epoch_order(self.state["epoch"])[self.state["position"]])
            self.state["position"] += 1
        starts = np.asarray(picks) * self.seq_len
        where = (starts[:, None] + np.arange(self.seq_len + 1)).reshape(*self.shape, self.seq_len + 1)
        windows = self.stream[where]
        return {"inputs": windows[..., :-1], "targets": windows[..., 1:], "mask": self.trained[where[..., 1:]]}
