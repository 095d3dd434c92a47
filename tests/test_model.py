"""Transformer invariants: causality by gradient, MTP wiring, logical axes, dtypes (spec §1, §6)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer, forward


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.preset("tiny")
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, size=(2, 24)), jnp.int32)
    variables = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)
    return cfg, variables, tokens


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_causality_by_gradient(tiny, attention):
    """d logits[:, t] / d embedding[:, s] is exactly zero for every s > t."""
    cfg, variables, tokens = tiny
    params, zeros = variables["params"], variables["perturbations"]
    t_probe = 9

    @jax.jit
    def grads(perturbations):
        def probe(p):
            logits, _ = Transformer(cfg).apply({"params": params, "perturbations": p}, tokens,
                                               attention=attention, with_mtp=False)
            return jnp.sum(logits[:, t_probe] ** 2)
        return jax.grad(probe)(perturbations)["embeddings"]

    g = np.abs(np.asarray(grads(zeros))).sum(-1)  # [B, T]
    assert np.all(g[:, t_probe + 1:] == 0.0)
    assert np.all(g[:, : t_probe + 1] > 0.0)


def test_mtp_shapes_and_concat_order(tiny):
    """mtp_logits [depth, B, T, V]; eh_proj's first D input rows read the next token's embedding."""
    cfg, variables, tokens = tiny
    params = nn.meta.unbox(variables["params"])
    apply = jax.jit(lambda p, x: Transformer(cfg).apply({"params": p}, x))
    _, aux = apply(params, tokens)
    b, t = tokens.shape
    assert aux["mtp_logits"].shape == (cfg.num_nextn_predict_layers, b, t, cfg.vocab_size)

    d = cfg.hidden_size
    kernel = params["mtp_0"]["eh_proj"]["kernel"]
    assert kernel.shape == (2 * d, d)
    embedding_only = jax.tree.map(lambda x: x, params)
    embedding_only["mtp_0"]["eh_proj"]["kernel"] = kernel.at[d:].set(0.0)  # drop the hidden half
    base = apply(embedding_only, tokens)[1]["mtp_logits"][0]
    # With the hidden half zeroed, the main model's blocks cannot reach the MTP output...
    moved = jax.tree.map(lambda x: x, embedding_only)
    moved["moe_layers"]["mlp"]["w_down"] = 3.0 * moved["moe_layers"]["mlp"]["w_down"]
    np.testing.assert_allclose(apply(moved, tokens)[1]["mtp_logits"][0], base, rtol=1e-6, atol=1e-6)
    # ...and position i reads token i + 1: changing token 12 moves positions >= 11 only.
    changed = tokens.at[:, 12].set((tokens[:, 12] + 1) % cfg.vocab_size)
    diff = np.abs(np.asarray(apply(embedding_only, changed)[1]["mtp_logits"][0] - base)).max(-1)
    assert np.all(diff[:, :11] == 0.0) and np.all(diff[:, 11] > 0.0)


def test_every_param_has_logical_axes(tiny):
    cfg, variables, _ = tiny
    leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    stacked = variables["params"]["moe_layers"]["attn"]["q_a_proj"]["kernel"]
    assert stacked.names == ("layers", "embed", "q_lora") and stacked.value.shape[0] == cfg.num_moe_layers


def test_aux_outputs(tiny):
    cfg, variables, tokens = tiny
    _, aux = jax.jit(lambda v, x: Transformer(cfg).apply(v, x, return_indices=True))(variables, tokens)
    n_tokens = tokens.size
    assert aux["expert_load"].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert np.all(np.asarray(aux["expert_load"]).sum(-1) == n_tokens * cfg.num_experts_per_tok)
    assert aux["balance"].shape == (cfg.num_moe_layers,) and np.all(np.asarray(aux["balance"]) > 0)
    assert aux["indices"]["moe_layers"].shape == (cfg.num_moe_layers,) + tokens.shape + (cfg.index_topk,)
    assert aux["indices"]["mtp"].shape == (1,) + tokens.shape + (cfg.index_topk,)
    assert aux["mtp_expert_load"].shape == (1, cfg.n_routed_experts)
    assert np.all(np.asarray(aux["mtp_expert_load"]).sum(-1) == n_tokens * cfg.num_experts_per_tok)
    assert aux["mtp_balance"].shape == (1,) and float(aux["mtp_balance"][0]) > 0


def test_bf16_compute_tracks_float32(tiny):
    cfg, variables, tokens = tiny
    params = variables["params"]
    ref = forward(params, tokens, cfg, attention="dense")
    out = forward(params, tokens, cfg.replace(dtype="bfloat16"), attention="dense")
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 3e-2, rel


def test_bad_tokens_rejected(tiny):
    cfg, variables, _ = tiny
    with pytest.raises(ValueError, match="tokens: expected an integer array"):
        Transformer(cfg).apply(variables, jnp.zeros((2, 4), jnp.float32))


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_changes_no_numbers(tiny, remat):
    """Rematerialisation recomputes the same math: loss and gradients equal remat="none"."""
    cfg, variables, tokens = tiny

    def loss_and_grad(c):
        loss = lambda p: jnp.mean(Transformer(c).apply({"params": p}, tokens, with_mtp=False)[0] ** 2)
        return jax.jit(jax.value_and_grad(loss))(variables["params"])
    (want, want_g), (got, got_g) = loss_and_grad(cfg), loss_and_grad(cfg.replace(remat=remat))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
