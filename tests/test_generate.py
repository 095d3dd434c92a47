"""Generation (spec §2-§3, §8): cached decode == full recomputation, batching, Keep Routing,
Keep Sampling Mask, seeds, stopping.

The config is the tiny preset with index_topk = 8, so prompts of 5 and 13 tokens sit below and
above it and 36 decode steps run the sparse path with a real selection (the test checks that
dense decoding gives different logits there). Weights are drawn wider than the default init so
attention, routing and indexer scores are far from uniform. Float32 throughout.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer, forward, generate
from deepseek_jax.cache import init_cache
from deepseek_jax.generate import (
    CACHE_BUCKET,
    PROMPT_BUCKET,
    decode_step,
    prefill,
    stream,
)
from deepseek_jax.params import abstract_params
from deepseek_jax.sampling import kept_mask, log_policy, sample, speculative_accept

NEW = 36
LOGIT_RTOL = 1e-4  # relative L2 error of decode logits vs recompute, per step (float32)


def random_params(cfg, seed=0, std=0.1):
    """Params of Transformer(cfg) drawn in NumPy (no init compile): weights N(0, std²), norm
    scales 1 + N(0, 0.1²), norm and router biases N(0, 0.05²), so attention, indexer and
    routing scores are far from uniform and the router bias takes part in selection."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        elif name.endswith(("['bias']", "['gate_bias']")):
            x = 0.05 * rng.normal(size=leaf.shape)
        else:
            x = std * rng.normal(size=leaf.shape)
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig.preset("tiny", index_topk=8, attention_chunk_size=8)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, cfg.vocab_size, n).tolist() for n in (5, 13)]
    return cfg, random_params(cfg), prompts


@pytest.fixture(scope="module")
def greedy(model):
    cfg, params, prompts = model
    return generate(params, cfg, prompts, NEW, eos_ids=(), record_routes=True)


def _full_sequences(prompts, gens):
    """prompt + tokens[:-1] of each generation (the inputs that produced the tokens), right-padded
    into one batch [B, T] (the forward is causal: padding after a sequence does not touch it)."""
    seqs = [list(p) + g.tokens[:-1].tolist() for p, g in zip(prompts, gens)]
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        batch[i, :len(seq)] = seq
    return jnp.asarray(batch)


def _at_new(logits, prompts):
    """Per sequence the NEW rows of logits [B, T, V] that predict the generated tokens."""
    return [np.asarray(logits[i, len(p) - 1:len(p) - 1 + NEW]) for i, p in enumerate(prompts)]


def _rel(a, b):
    return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)


def test_greedy_decode_equals_recompute(model, greedy):
    """Greedy tokens are the argmax of a full forward at every step (the forward is causal, so
    one pass over the final sequence is the recomputation of every prefix); the recorded
    log-probabilities are its log-softmax."""
    cfg, params, prompts = model
    recomputed = _at_new(forward(params, _full_sequences(prompts, greedy), cfg), prompts)
    for g, logits in zip(greedy, recomputed):
        assert len(g.tokens) == NEW and g.finish_reason == "length"
        np.testing.assert_array_equal(logits.argmax(-1), g.tokens)
        expected = np.asarray(jax.nn.log_softmax(logits))[np.arange(NEW), g.tokens]
        np.testing.assert_allclose(g.logprobs, expected, atol=1e-5)


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_decode_logits_match_recompute(model, greedy, attention):
    """Teacher-forced prefill + decode_step: the logits of every step match the forward over the
    same tokens (sparse decode vs the auto forward; dense decode vs the dense forward) within
    LOGIT_RTOL; past index_topk keys, sparse and dense decoding differ (the selection matters)."""
    cfg, params, prompts = model
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), PROMPT_BUCKET), np.int32)  # generate's shapes: shared compiles
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache = init_cache(cfg, len(prompts), CACHE_BUCKET)
    assert lengths.max() + NEW <= CACHE_BUCKET
    logits, cache, _ = prefill(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), cache, attention=attention)
    steps = [np.asarray(logits)]
    for j in range(NEW - 1):
        feed = jnp.asarray([g.tokens[j] for g in greedy], jnp.int32)
        logits, cache, _ = decode_step(params, cfg, cache, feed, attention=attention)
        steps.append(np.asarray(logits))
    steps = np.stack(steps, axis=1)  # [B, NEW, V]
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + NEW - 1)

    seqs = _full_sequences(prompts, greedy)
    refs = _at_new(forward(params, seqs, cfg, attention="auto" if attention == "sparse" else "dense"), prompts)
    for i, ref in enumerate(refs):
        err = _rel(steps[i], ref)
        print(f"{attention} decode, prompt of {len(prompts[i])}: max relative error {err.max():.2e}")
        assert err.max() <= LOGIT_RTOL, err
    if attention == "dense":  # beyond index_topk keys the sparse forward must differ from dense
        for i, sparse_ref in enumerate(_at_new(forward(params, seqs, cfg), prompts)):
            beyond = np.arange(NEW) + len(prompts[i]) > cfg.index_topk
            assert _rel(refs[i][beyond], sparse_ref[beyond]).min() > 100 * LOGIT_RTOL


def test_batch_equals_each_prompt_alone(model):
    """Sampled generation of a batch of different-length prompts equals each prompt generated
    alone (same per-prompt seed): tokens, log-probabilities, kept masks and routes."""
    cfg, params, prompts = model
    seeds = [3, 4]
    opts = {"temperature": 1.0, "top_p": 0.9, "eos_ids": (), "record_routes": True}
    batch = generate(params, cfg, prompts, 12, seed=seeds, **opts)
    for prompt, seed, b in zip(prompts, seeds, batch):
        alone, = generate(params, cfg, [prompt], 12, seed=[seed], **opts)
        np.testing.assert_array_equal(b.tokens, alone.tokens)
        np.testing.assert_allclose(b.logprobs, alone.logprobs, atol=1e-5)
        np.testing.assert_array_equal(b.kept_counts, alone.kept_counts)
        # the same kept sets (near-equal probabilities may swap places in the recorded order)
        np.testing.assert_array_equal(b.kept_mask(cfg.vocab_size), alone.kept_mask(cfg.vocab_size))
        np.testing.assert_array_equal(b.routes, alone.routes)
    assert any(b.kept_counts.min() < cfg.vocab_size for b in batch)  # top-p truncated somewhere


def test_replaying_routes_reproduces_logits(model, greedy):
    """Keep Routing: forward with the sampler's recorded routes gives the sampler's
    log-probabilities; forcing the forward's own routes gives bit-identical logits; other
    routes change them (the forced experts are used, with weights from the current gate)."""
    cfg, params, prompts = model
    seqs = _full_sequences(prompts, greedy)
    b, t = seqs.shape
    k = cfg.num_experts_per_tok
    routes = np.broadcast_to(np.arange(k, dtype=np.int32), (cfg.num_moe_layers, b, t, k)).copy()  # padding rows
    for i, g in enumerate(greedy):
        assert g.routes.shape == (cfg.num_moe_layers, len(prompts[i]) + NEW - 1, k)
        routes[:, i, :g.routes.shape[1]] = g.routes
    replayed = _at_new(forward(params, seqs, cfg, routes=jnp.asarray(routes)), prompts)
    for g, logits in zip(greedy, replayed):
        lp = np.asarray(jax.nn.log_softmax(logits))[np.arange(NEW), g.tokens]
        np.testing.assert_allclose(lp, g.logprobs, atol=1e-5)

    free, aux = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x, with_mtp=False,
                                                             return_routes=True))(params, seqs)
    np.testing.assert_array_equal(np.asarray(forward(params, seqs, cfg, routes=aux["routes"])), np.asarray(free))
    other = (aux["routes"] + 1) % cfg.n_routed_experts  # still K distinct experts per token
    moved = np.asarray(forward(params, seqs, cfg, routes=other))
    assert np.abs(moved - np.asarray(free)).max() > 1e-3
    with pytest.raises(ValueError, match="routes"):
        forward(params, seqs, cfg, routes=aux["routes"][:, :, :-1])


def _np_kept(logits, temperature, top_p, top_k):
    """Keep set by hand: sort by probability (ties: lower id), top-k, renormalise, top-p prefix."""
    z = logits.astype(np.float64) / (temperature or 1.0)
    order = sorted(range(len(z)), key=lambda v: (-z[v], v))
    if top_k:
        order = order[:top_k]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    kept, mass = [], 0.0
    for v, pv in zip(order, p):
        if kept and mass >= top_p:
            break
        kept.append(v)
        mass += pv
    kept_z = z[kept]
    logp = kept_z - kept_z.max() - np.log(np.exp(kept_z - kept_z.max()).sum())
    return kept, dict(zip(kept, logp))


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 0.8, 0), (0.7, 1.0, 3), (1.3, 0.5, 5), (0.0, 0.9, 4)])
def test_sampling_mask_matches_hand_computation(temperature, top_p, top_k):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, 11)).astype(np.float32) * 2
    logits[0, 3] = logits[0, 8] = logits[0].max() + 0.5  # a tie: the lower id goes first
    keys = jax.random.split(jax.random.key(0), 6)
    s = jax.jit(sample, static_argnames=("temperature", "top_p", "top_k"))(
        jnp.asarray(logits), keys, temperature=temperature, top_p=top_p, top_k=top_k)
    counts, ids = np.asarray(s.kept_counts), np.asarray(s.kept_ids)
    for b in range(6):
        kept, logp = _np_kept(logits[b], temperature, top_p, top_k)
        assert ids[b, :counts[b]].tolist() == kept
        token = int(s.tokens[b])
        assert token in kept
        np.testing.assert_allclose(float(s.logprobs[b]), logp[token], atol=1e-5)
        if temperature == 0:
            assert token == kept[0]
    flat = np.concatenate([ids[b, :counts[b]] for b in range(6)])
    mask = kept_mask(flat, counts, 11)
    assert mask.sum() == counts.sum() and all(mask[b, ids[b, :counts[b]]].all() for b in range(6))


def test_sampling_frequencies_follow_the_truncated_distribution():
    """10k draws from one row: empirical frequencies match π (renormalised over the kept set)."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    n = 10000
    keys = jax.random.split(jax.random.key(1), n)
    draws = jax.jit(jax.vmap(lambda k: sample(logits, k[None], temperature=0.8, top_p=0.85, top_k=0).tokens[0]))(keys)
    kept, logp = _np_kept(np.asarray(logits[0]), 0.8, 0.85, 0)
    freq = np.bincount(np.asarray(draws), minlength=6) / n
    for v in range(6):
        expected = np.exp(logp[v]) if v in kept else 0.0
        assert abs(freq[v] - expected) < 0.02, (v, freq[v], expected)


def test_temperature_sampling_is_reproducible(model):
    cfg, params, prompts = model
    opts = {"temperature": 1.0, "top_k": 20, "eos_ids": (), "record_routes": True}
    a = generate(params, cfg, prompts, 8, seed=11, **opts)
    b = generate(params, cfg, prompts, 8, seed=11, **opts)
    c = generate(params, cfg, prompts, 8, seed=12, **opts)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
    assert any((x.tokens != z.tokens).any() for x, z in zip(a, c))
    assert all(x.kept_counts.max() <= 20 and len(x.kept_ids) == x.kept_counts.sum() for x in a)


def test_eos_stop_sequences_and_stream(model, greedy):
    """EOS and stop sequences end a sequence (the ending tokens included); the streaming form
    yields the same tokens, one step at a time, in order."""
    cfg, params, prompts = model
    ref = [g.tokens.tolist() for g in greedy]
    out = generate(params, cfg, prompts, NEW, eos_ids=(ref[0][4],), stop=[ref[1][6:9]])
    first_eos = ref[0].index(ref[0][4])
    assert out[0].finish_reason == "eos" and out[0].tokens.tolist() == ref[0][:first_eos + 1]
    assert out[1].finish_reason in ("stop", "eos") and out[1].tokens.tolist() == ref[1][:len(out[1].tokens)]
    if out[1].finish_reason == "stop":
        assert out[1].tokens.tolist()[-3:] == ref[1][6:9]

    events = list(stream(params, cfg, prompts, NEW, eos_ids=()))
    for i in range(len(prompts)):
        mine = [e for e in events if e.index == i]
        assert [e.token for e in mine] == ref[i]
        assert [e.finish_reason for e in mine] == [None] * (NEW - 1) + ["length"]
    assert [e.index for e in events[:4]] == [0, 1, 0, 1]  # one token per sequence per step


def _agreeing_mtp(cfg, params, damp=0.1):
    """A model whose MTP layer mostly agrees with it: every block's output projections scaled by
    `damp` (so the next token depends mostly on the current one, with some context), and the MTP
    layer passing the next token's normalised embedding straight to the shared head."""
    p = jax.tree.map(lambda x: x, params)
    blocks = [p["dense_layers"], p["moe_layers"], p["mtp_0"]["block"]]
    for block in blocks:
        block["attn"]["o_proj"]["kernel"] *= damp
        mlp = block["mlp"]
        for path in (("down_proj", "kernel"), ("w_down",), ("shared", "down_proj", "kernel")):
            if path[0] in mlp:
                *parents, leaf = path
                node = mlp
                for key in parents:
                    node = node[key]
                node[leaf] *= damp
    d = cfg.hidden_size
    p["mtp_0"]["eh_proj"]["kernel"] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))])  # [emb ; hidden] -> emb
    for norm in (p["mtp_0"]["enorm"], p["mtp_0"]["shared_head_norm"], p["final_norm"]):
        norm["scale"] = jnp.ones_like(norm["scale"])
    return p


def test_speculative_greedy_equals_greedy(model):
    """MTP speculative decoding (greedy) gives the same tokens, log-probabilities and routes as
    plain greedy decoding, keeping some drafts and rejecting others (both paths run)."""
    cfg, params, prompts = model
    params = _agreeing_mtp(cfg, params)
    plain = generate(params, cfg, prompts, NEW, eos_ids=(), record_routes=True)
    events = list(stream(params, cfg, prompts, NEW, eos_ids=(), record_routes=True, speculative=True))
    spec = generate(params, cfg, prompts, NEW, eos_ids=(), record_routes=True, speculative=True)
    for a, b in zip(plain, spec):
        np.testing.assert_array_equal(b.tokens, a.tokens)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-5)
        np.testing.assert_array_equal(b.routes, a.routes)
    verdicts = [e.draft_accepted for e in events if e.draft_accepted is not None]
    rates = [g.accept_rate for g in spec]
    print(f"greedy acceptance rates: {rates}")
    assert 0 < np.mean(verdicts) < 1 and np.mean(rates) == pytest.approx(np.mean(verdicts), abs=0.1)
    assert [e.token for e in events if e.index == 0] == plain[0].tokens.tolist()


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.0, 1.0, 3)])
def test_speculative_accept_keeps_the_target_distribution(temperature, top_p, top_k):
    """Drafts from q, kept or replaced by speculative_accept: the tokens follow p (20k draws), the
    acceptance rate is Σ min(p, q), and the recorded log-probability is log p(token)."""
    rng = np.random.default_rng(5)
    target = jnp.asarray(rng.normal(size=(1, 6)) * 1.5, jnp.float32)
    draft = jnp.asarray(rng.normal(size=(1, 6)) * 1.5, jnp.float32)
    options = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    n = 20000

    @jax.jit
    def one(key):
        draft_key, accept_key = jax.random.split(key)
        d = sample(draft, draft_key[None], **options).tokens
        token, accepted = speculative_accept(target, draft, d, accept_key[None], **options)
        return token.tokens[0], token.logprobs[0], accepted[0]

    tokens, logprobs, accepted = jax.vmap(one)(jax.random.split(jax.random.key(2), n))
    p = np.exp(np.asarray(log_policy(target, **options))[0])
    q = np.exp(np.asarray(log_policy(draft, **options))[0])
    freq = np.bincount(np.asarray(tokens), minlength=6) / n
    np.testing.assert_allclose(freq, p, atol=0.015)
    assert abs(float(np.mean(accepted)) - np.minimum(p, q).sum()) < 0.015
    np.testing.assert_allclose(np.asarray(logprobs), np.log(p[np.asarray(tokens)]), rtol=1e-5)


def test_bad_inputs_raise(model):
    cfg, params, prompts = model
    for bad, match in [({"prompts": [[]]}, "prompts"), ({"prompts": [[cfg.vocab_size]]}, "prompts"),
                       ({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop": [[]]}, "stop"),
                       ({"max_new_tokens": cfg.max_position_embeddings}, "max_position_embeddings"),
                       ({"speculative": True, "cfg": cfg.replace(num_nextn_predict_layers=0)}, "speculative"),
                       ({"seed": [1, 2, 3]}, "seed")]:
        kwargs = {"cfg": cfg, "prompts": prompts, "max_new_tokens": 4, **bad}
        with pytest.raises(ValueError, match=match):
            generate(params, **kwargs)
