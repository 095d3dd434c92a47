"""Data pipeline: embedded corpus, BPE tokenizer, packing with EOS, resumable iterator."""

import json

import numpy as np
import pytest

from deepseek_jax.chat.markup import BOS, EOS
from deepseek_jax.training import data


@pytest.fixture(scope="module")
def corpus():
    docs = data.load_documents(max_bytes=100_000)
    tokenizer = data.train_tokenizer(docs, 300)
    stream, trained = data.pack(tokenizer, docs)
    assert trained.shape == stream.shape and np.all(trained == 1)  # plain text: every token counts
    return docs, tokenizer, stream


def test_corpus_tokenizer_packing(corpus):
    docs, tokenizer, stream = corpus
    assert docs and data.default_corpus_files() == sorted(data.default_corpus_files())
    assert tokenizer.token_to_id(BOS) == 0 and tokenizer.token_to_id(EOS) == 1
    assert tokenizer.get_vocab_size() == 300
    assert stream.dtype == np.int32 and stream[-1] == 1 and np.sum(stream == 1) == len(docs)
    first = stream[: np.argmax(stream == 1)]
    assert tokenizer.decode(first.tolist()) == docs[0]  # byte-level BPE round-trips exactly


def test_iterator_resumes_exactly(corpus):
    _, _, stream = corpus
    run = data.PackedBatches(stream, seq_len=16, batch_size=3, accum_steps=2, seed=5)
    batches = [next(run) for _ in range(7)]
    b = batches[0]
    assert b["inputs"].shape == (2, 3, 16) and np.array_equal(b["inputs"][..., 1:], b["targets"][..., :-1])
    again = data.PackedBatches(stream, seq_len=16, batch_size=3, accum_steps=2, seed=5)
    for _ in range(3):
        next(again)
    saved = json.loads(json.dumps(again.state))
    resumed = data.PackedBatches(stream, seq_len=16, batch_size=3, accum_steps=2, seed=5, state=saved)
    for want in batches[3:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="does not match"):
        data.PackedBatches(stream, seq_len=16, batch_size=3, accum_steps=2, seed=6, state=saved)


def test_iterator_epochs_cover_every_window():
    stream = np.arange(41, dtype=np.int32)  # 10 windows of 4 + 1
    it = data.PackedBatches(stream, seq_len=4, batch_size=5, seed=0)
    starts = sorted(int(x) for _ in range(2) for x in next(it)["inputs"][0, :, 0])
    assert starts == list(range(0, 40, 4))
    assert it.state["epoch"] == 0 and it.state["position"] == 10
    next(it)
    assert it.state["epoch"] == 1


def test_user_jsonl_and_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "hello"}\n\n{"text": "world"}\n')
    assert data.load_documents(str(path)) == ["hello", "world"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected .* string 'text', or strings 'prompt' and"):
        data.load_documents(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="no file"):
        data.load_documents(str(tmp_path / "missing.txt"))


def test_prompt_completion_records_train_the_completion_only(tmp_path, corpus):
    _, tokenizer, _ = corpus
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "Q: 2+3 A:", "completion": " 5"}\n{"text": "free text"}\n'
                    '{"prompt": "Q: 1+1 A:", "completion": " 2"}\n')
    docs = data.load_documents(str(path))
    assert docs == [data.Example("Q: 2+3 A:", " 5"), "free text", data.Example("Q: 1+1 A:", " 2")]
    stream, trained = data.pack(tokenizer, docs)
    want_tokens, want_trained = [], []
    for doc in docs:
        prompt, rest = (doc.prompt, doc.completion) if isinstance(doc, data.Example) else ("", doc)
        p, r = (tokenizer.encode(t, add_special_tokens=False).ids for t in (prompt, rest))
        want_tokens += p + r + [1]
        want_trained += [0] * len(p) + [1] * (len(r) + 1)  # the completion and its EOS
    assert stream.tolist() == want_tokens and trained.tolist() == want_trained
    # A batch's mask is `trained` at its targets: a prompt's first completion token is a target.
    it = data.PackedBatches(stream, seq_len=len(stream) - 1, batch_size=1, trained=trained)
    batch = next(it)
    assert batch["mask"][0, 0].tolist() == want_trained[1:]
    assert batch["targets"][0, 0].tolist() == want_tokens[1:]
    with pytest.raises(ValueError, match="trained mask of shape"):
        data.PackedBatches(stream, seq_len=4, batch_size=1, trained=trained[:-1])

    # align: every document (and its untrained EOS padding) fills whole windows, each starting at
    # a document's first token; the trained tokens and their order are unchanged.
    window = 16
    aligned, aligned_trained = data.pack(tokenizer, docs, align=window)
    assert len(aligned) == window * len(docs) + 1 and len(want_tokens) <= window * len(docs)
    rows, row_trained = aligned[:-1].reshape(len(docs), window), aligned_trained[:-1].reshape(len(docs), window)
    assert aligned[aligned_trained == 1].tolist() == stream[trained == 1].tolist()
    for row, mask, doc in zip(rows, row_trained, docs):
        first = doc.prompt if isinstance(doc, data.Example) else doc
        assert row[0] == tokenizer.encode(first, add_special_tokens=False).ids[0]
        assert np.all(row[mask.tolist().index(1) + mask.sum():] == 1) and mask[-1] == 0  # padding: EOS, untrained
    batch = next(data.PackedBatches(aligned, seq_len=window, batch_size=len(docs), trained=aligned_trained))
    assert sorted(map(tuple, batch["inputs"][0].tolist())) == sorted(map(tuple, rows.tolist()))
