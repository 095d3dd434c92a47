"""Train step: one step of each DSA stage, freezing, gradient isolation, bias update (spec §4-§5)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import ModelConfig, Transformer
from deepseek_jax.training import dsa
from deepseek_jax.training import train_step as ts
from deepseek_jax.training.optimizer import make_optimizer, param_labels
from sharding import rules
from sharding.mesh import make_mesh

CFG = ModelConfig.preset("tiny")
SHAPE = (2, 2, 24)  # [accumulation, batch, seq]; 24 > index_topk 16: the sparse path runs


@pytest.fixture(scope="module")
def setup():
    init = jax.jit(lambda: Transformer(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])
    params = nn.meta.unbox(init())
    tokens = np.random.default_rng(0).integers(2, CFG.vocab_size, size=SHAPE[:2] + (SHAPE[2] + 1,)).astype(np.int32)
    batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "mask": np.ones(SHAPE, np.float32)}
    return params, batch


def _one_step(stage, params, batch):
    # One device keeps the compile short; sharded runs are the pretrain tests' business.
    mesh, rule_set = make_mesh("data=1", devices=jax.devices()[:1]), rules.preset("dp")
    tx = make_optimizer(stage=stage, learning_rate=1e-2, indexer_learning_rate=1e-2, warmup_steps=0, total_steps=10)
    state = {"params": params, "opt_state": tx.init(params)}
    step = ts.make_train_step(CFG, ts.LossConfig(dsa_stage=stage), tx, mesh, rule_set, SHAPE)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), batch)
    return jax.device_get(new_state["params"]), jax.device_get(metrics)


def _changed(before, after, labels):
    out = {}
    for (path, a), b, lab in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after),
                                 jax.tree.leaves(labels), strict=True):
        out[jax.tree_util.keystr(path)] = (lab, not np.array_equal(np.asarray(a), np.asarray(b)))
    return out


@pytest.mark.parametrize("stage", ["dense_warmup", "sparse", "off"])
def test_one_step_per_stage(setup, stage):
    params, batch = setup
    new, m = _one_step(stage, params, batch)
    assert all(np.isfinite(v) for v in m.values())
    assert np.isclose(m["lm_loss"], np.log(CFG.vocab_size), atol=0.1)  # fresh init: near-uniform
    changed = _changed(params, new, param_labels(params, stage))
    trained = {k for k, (lab, c) in changed.items() if c}
    indexer = {k for k, (lab, _) in changed.items() if "indexer" in k}
    if stage == "dense_warmup":
        # Every parameter but the indexers (and the MoE bias) is bit-identical after the step.
        assert trained and trained <= indexer
        assert m["indexer_kl"] > 0 and 0 < m["indexer_recall"] <= 1 + 1e-6 and m["grad_norm"] == 0
    elif stage == "sparse":
        assert indexer <= trained and any("lm_head" in k for k in trained)
        # Moved by the bias rule, not the optimizer: the main MoE layers' and the MTP block's.
        assert any("moe_layers" in k and "gate_bias" in k for k in trained)
        assert any("mtp_0" in k and "gate_bias" in k for k in trained)
        assert m["indexer_grad_norm"] > 0 and m["grad_norm"] > 0
    else:
        assert not trained & indexer and m["indexer_kl"] == 0


def test_gradient_isolation_in_sparse_stage(setup):
    """LM losses reach no indexer parameter; the indexer KL reaches nothing else."""
    params, batch = setup
    mb = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    lc = ts.LossConfig(dsa_stage="sparse")

    def part(name):
        def f(p):
            _, (parts, _) = ts.loss_fn(p, mb["inputs"], mb["targets"], mb["mask"], cfg=CFG, lc=lc)
            return parts[name] if name != "lm" else parts["lm_loss"] + parts["mtp_loss"] + parts["balance_loss"]
        return jax.grad(f)

    g_lm, g_kl = jax.jit(lambda p: (part("lm")(p), part("indexer_kl")(p)))(params)
    for (path, lm), kl in zip(jax.tree_util.tree_leaves_with_path(g_lm), jax.tree.leaves(g_kl), strict=True):
        name = jax.tree_util.keystr(path)
        if "indexer" in name:
            assert np.all(np.asarray(lm) == 0), name
        else:
            assert np.all(np.asarray(kl) == 0), name
    assert any(np.any(np.asarray(x) != 0) for p, x in jax.tree_util.tree_leaves_with_path(g_kl)
               if "indexer" in jax.tree_util.keystr(p))
    assert np.any(np.asarray(g_lm["lm_head"]) != 0)


def test_attention_maps_agree_with_the_model_and_the_loss(setup):
    """`dsa.attention_maps` (for inspection): probs are distributions over causal keys, the top-k of
    its scores is the model's own selection, and the recall read off the maps is `indexer_terms`'."""
    params, batch = setup
    tokens, mask = batch["inputs"][0], batch["mask"][0]
    (_, aux), state = Transformer(CFG).apply({"params": params}, tokens, attention="sparse", with_mtp=False,
                                             return_indices=True, mutable=["intermediates"])
    maps = dsa.attention_maps(params, state["intermediates"], CFG)
    assert sorted(maps) == ["dense_layers", "moe_layers"]
    t, k = tokens.shape[1], CFG.index_topk
    causal = np.arange(t)[None, :] <= np.arange(t)[:, None]
    recalls = []
    for group, (scores, probs) in maps.items():
        scores, probs = np.asarray(scores), np.asarray(probs)
        assert scores.shape == probs.shape == aux["indices"][group].shape[:3] + (t,)
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert np.all(probs[..., ~causal] == 0) and np.all(np.isneginf(scores[..., ~causal]))
        top = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
        model = np.asarray(aux["indices"][group])
        for q in range(t):  # query q has min(q + 1, k) valid keys; the rest of its slots are -1
            n = min(q + 1, k)
            np.testing.assert_array_equal(np.sort(top[..., q, :n], -1), np.sort(model[..., q, :n], -1))
        recalls.append(np.take_along_axis(probs, top, -1).sum(-1).mean(axis=(1, 2)))
    _, recall = dsa.indexer_terms(params, state["intermediates"], CFG, "dense_warmup", jnp.asarray(mask))
    np.testing.assert_allclose(np.mean(np.concatenate(recalls)), recall, rtol=1e-5)


def test_bias_update_direction():
    """Overloaded experts' bias goes down by γ, underloaded ones' up (spec §5), in the stacked MoE
    layers and in the (unstacked) MTP block alike; nothing else moves."""
    moe = lambda shape: {"mlp": {"gate_bias": jnp.zeros(shape), "gate": jnp.ones(shape + (3,))}}
    params = {"moe_layers": moe((2, 4)), "mtp_0": {"block": moe((4,))}, "dense_layers": {"mlp": {"w": jnp.ones(2)}}}
    loads = {"moe_layers": jnp.array([[10.0, 0.0, 5.0, 5.0], [1.0, 2.0, 3.0, 6.0]]),
             "mtp_0": jnp.array([[0.0, 4.0, 4.0, 0.0]])}
    new = ts.update_gate_bias(params, loads, 0.01)
    np.testing.assert_allclose(new["moe_layers"]["mlp"]["gate_bias"],
                               [[-0.01, 0.01, 0.0, 0.0], [0.01, 0.01, 0.0, -0.01]])
    np.testing.assert_allclose(new["mtp_0"]["block"]["mlp"]["gate_bias"], [0.01, -0.01, -0.01, 0.01])
    for path, x in jax.tree_util.tree_leaves_with_path(new):
        if "gate_bias" not in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(x, 1.0)


def test_balance_loss_covers_mtp(setup):
    """L_Bal = α Σ f_i P_i over every MoE layer, the MTP block's included (spec §5); the loads
    handed to the bias update cover the MTP block too."""
    params, batch = setup
    inputs, targets, mask = (jnp.asarray(batch[k][0]) for k in ("inputs", "targets", "mask"))
    lc = ts.LossConfig(dsa_stage="off", balance_weight=0.5)
    aux, (_, (parts, loads)) = jax.jit(lambda p: (Transformer(CFG).apply({"params": p}, inputs)[1],
                                                  ts.loss_fn(p, inputs, targets, mask, cfg=CFG, lc=lc)))(params)
    assert aux["mtp_balance"].shape == (CFG.num_nextn_predict_layers,) and float(aux["mtp_balance"][0]) > 0
    want = 0.5 * (np.sum(aux["balance"]) + np.sum(aux["mtp_balance"]))
    np.testing.assert_allclose(float(parts["balance_loss"]), want, rtol=1e-6)
    assert sorted(loads) == ["moe_layers", "mtp_0"]
    n_routed = inputs.size * CFG.num_experts_per_tok
    np.testing.assert_array_equal(np.asarray(loads["mtp_0"]).sum(-1), [n_routed])


def test_accumulation_equals_one_big_batch(setup):
    """Gradients, loss parts and expert loads of 2 micro-batches x 2 sequences equal those of one
    batch of 4 (micro-batches weighted by their real tokens)."""
    params, batch = setup
    whole = {k: v.reshape(1, 4, -1)[..., :16] for k, v in batch.items()}
    split = {k: v.reshape(2, 2, 16) for k, v in whole.items()}
    grads = jax.jit(lambda p, b: ts.accumulated_grads(p, b, cfg=CFG, lc=ts.LossConfig(dsa_stage="off")))
    (g1, parts1, load1), (g2, parts2, load2) = grads(params, whole), grads(params, split)
    for key in parts1:
        np.testing.assert_allclose(parts2[key], parts1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for key in load1:
        np.testing.assert_array_equal(load2[key], load1[key])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sharded_step_equals_one_device(setup):
    """Two steps on an 8-way data-parallel mesh (the batch split) and on one device give the same
    losses (LM losses, dense path: the sharded compile is the slow part, so the cheapest stage)."""
    params, batch = setup
    batch = {k: v.reshape(1, 8, -1) for k, v in batch.items()}  # 8 sequences of 12: one per device
    tx = make_optimizer(stage="off", learning_rate=1e-2, indexer_learning_rate=1e-2, warmup_steps=0,
                        total_steps=10)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = make_mesh(f"data={len(devices)}", devices=devices)
        step = ts.make_train_step(CFG, ts.LossConfig(dsa_stage="off"), tx, mesh, rules.preset("dp"), (1, 8, 12))
        state, first = step({"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params)}, batch)
        after_first = jax.device_get(state["params"])
        _, second = step(state, batch)
        results.append((after_first, jax.device_get(first), jax.device_get(second)))
    (p1, m1, n1), (p8, m8, n8) = results
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(n8[key], n1[key], rtol=1e-4, atol=1e-6, err_msg=f"step 2 {key}")
    # Adam's first step is ~lr·g/(|g| + eps): for a gradient near eps, summation-order rounding
    # moves that element's update anywhere in [0, lr]. So: every element within one step (lr), and
    # all but a handful equal to 1e-4 relative (the gradients themselves match via grad_norm above;
    # step 2's losses show the rounding does not change the trajectory).
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)]) for p in (p8, p1))
    assert np.all(np.abs(a - b) <= 1e-2)
    assert np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-5)) > 0.9999
