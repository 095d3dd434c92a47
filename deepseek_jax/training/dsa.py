"""DeepSeek Sparse Attention training stages: the indexer's KL loss and its recall (spec §4).

STAGES:
  dense_warmup : main attention dense, every parameter but the indexers frozen; each indexer
                 learns KL(p ‖ softmax(I)) over all causal keys, p = per-head softmax of the
                 main attention, summed over heads, L1-normalised.
  sparse       : top-k attention; everything trains; the indexer sees the selected set S_t only,
                 p and softmax(I) both renormalised over S_t.
  off          : no indexer loss (attention by sequence length, as in inference).

Gradient isolation: the MLA layers `sow` their attention inputs (see layers/mla.py); here the
main q/k are detached and each indexer is *re-applied* to its detached inputs (x and the q
latent), so the KL reaches only the indexer's own parameters, while the model's own indexer
output only feeds the (gradient-free) top-k: the LM loss never reaches the indexer.
Queries run in chunks (`map_query_chunks`): O(chunk · S) memory for the dense target, O(chunk · k)
for the sparse one (plus O(chunk · S) when recall is measured).
`attention_maps` returns the same two quantities as whole [T, S] maps, to look at (notebooks).

Legend: L layers, B batch, T queries, S keys, K selected keys, H heads, C kv latent rank,
N nope dim, R rope dim, I indexer heads, E indexer head dim.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax import losses
from deepseek_jax.layers.indexer import Indexer
from deepseek_jax.layers.rope import rope_cos_sin
from pallas_kernels.chunking import map_query_chunks
from pallas_kernels.indexer.reference import indexer_scores

STAGES = ("dense_warmup", "sparse", "off")
# The attention path the model runs in each stage.
ATTENTION = {"dense_warmup": "dense", "sparse": "sparse", "off": "auto"}


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"dsa_stage: expected one of {STAGES}, got {stage!r}")


def _gather(rows, sel):
    """rows [B, S, ...], sel [B, T, K] (valid indices) -> [B, T, K, ...]."""
    return jax.vmap(lambda r, i: r[i])(rows, sel)


def _layer_inputs(cfg, indexer_params, sown, cos, sin):
    """One layer's indexer outputs, re-applied to its detached inputs, and the detached main-attention
    inputs in absorbed form (float32): ((q_i, k_i, w_i, k_scale), (q_abs, q_rope, c_kv, k_rope))."""
    sg = jax.lax.stop_gradient
    index = Indexer(cfg).apply({"params": indexer_params}, sg(sown["x"]), sg(sown["q_latent"]), cos, sin)
    q_nope, q_rope, c_kv, k_rope, kv_b = sg((sown["q_nope"], sown["q_rope"], sown["c_kv"], sown["k_rope"],
                                             sown["kv_b"]))
    # Absorbed queries: q_nope · k_nope = (q_nope W_UK) · c_kv, so main logits need no per-head keys.
    q_abs = jnp.einsum("BTHN,CHN->BTHC", q_nope, kv_b[..., :cfg.qk_nope_head_dim].astype(q_nope.dtype),
                       preferred_element_type=jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    return index, (q_abs, f32(q_rope), f32(c_kv), f32(k_rope))


def _main_probs(cfg, positions, q_abs, q_rope, c_kv, k_rope):
    """The indexer's dense target for queries at `positions` [T]: head-summed, L1-normalised main
    attention over all causal keys -> (probs [B, T, S], valid [B, T, S])."""
    s_len = c_kv.shape[1]
    valid = jnp.broadcast_to(jnp.arange(s_len)[None, None, :] <= positions[None, :, None],
                             q_abs.shape[:2] + (s_len,))
    logits = (jnp.einsum("BTHC,BSC->BTHS", q_abs, c_kv)
              + jnp.einsum("BTHR,BSR->BTHS", q_rope, k_rope)) * cfg.softmax_scale
    return losses.head_summed_probs(logits, valid), valid


def _layer_terms(cfg, stage, with_recall, indexer_params, sown, cos, sin, mask):
    """(KL, recall) of one layer's indexer, averaged over real query rows."""
    (iq, ik, iw, k_scale), (q_abs, q_rope, c_kv, k_rope) = _layer_inputs(cfg, indexer_params, sown, cos, sin)
    dense_probs = lambda positions, qa, qr: _main_probs(cfg, positions, qa, qr, c_kv, k_rope)

    def chunk(positions, qa, qr, q_i, w_i, *selected):
        if stage == "dense_warmup":
            p, valid = dense_probs(positions, qa, qr)
            scores = indexer_scores(q_i, ik, w_i, k_scale)
            kl = losses.indexer_kl(p, scores, valid)
            if not with_recall:
                return kl, jnp.zeros_like(kl)
            top = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), min(cfg.index_topk, c_kv.shape[1]))[1]
            hit = jnp.take_along_axis(p * valid, top, axis=-1)
            return kl, jnp.sum(hit, -1)
        (sel,) = selected
        valid = sel >= 0
        sel = jnp.maximum(sel, 0)
        logits = (jnp.einsum("BTHC,BTKC->BTHK", qa, _gather(c_kv, sel))
                  + jnp.einsum("BTHR,BTKR->BTHK", qr, _gather(k_rope, sel))) * cfg.softmax_scale
        p_sel = losses.head_summed_probs(logits, valid)
        k_sel = _gather(ik, sel).astype(jnp.float32)
        scores = jnp.einsum("BTIK,BTI->BTK", jax.nn.relu(jnp.einsum("BTIE,BTKE->BTIK", q_i.astype(jnp.float32), k_sel)),
                            w_i.astype(jnp.float32))
        if k_scale is not None:
            scores = scores * _gather(k_scale, sel)
        kl = losses.indexer_kl(p_sel, scores, valid)
        if not with_recall:
            return kl, jnp.zeros_like(kl)
        p, _ = dense_probs(positions, qa, qr)
        return kl, jnp.sum(jnp.take_along_axis(p, sel, axis=-1) * valid, -1)

    arrays = (q_abs, q_rope, iq, iw) + ((sown["indices"],) if stage == "sparse" else ())
    kl, recall = map_query_chunks(chunk, cfg.attention_chunk_size, *arrays)
    weight = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1.0)
    return jnp.sum(kl * weight), jax.lax.stop_gradient(jnp.sum(recall * weight))


def _attention_sites(sown, params, path=()):
    """(module path, params of the attention module, its sown inputs) for every MLA that sowed `dsa`."""
    sites = []
    for name, child in sown.items():
        if name == "dsa":
            (inputs,) = child
            sites.append((path, params, inputs))
        else:
            sites += _attention_sites(child, params[name], path + (name,))
    return sites


def _map_sites(layer, params, intermediates, what):
    """{layer group: layer(indexer params, sown inputs) stacked over the group's layers [L, ...]}."""
    out = {}
    for path, attn_params, inputs in _attention_sites(intermediates, nn.meta.unbox(params)):
        if inputs["x"].ndim == 3:  # an unscanned block (MTP): no layer axis
            out[path[0]] = jax.tree.map(lambda x: x[None], layer(attn_params["indexer"], inputs))
        else:
            out[path[0]] = jax.lax.map(lambda a: layer(*a), (attn_params["indexer"], inputs))
    if not out:
        raise ValueError(f"{what}: the model sowed no attention inputs (was 'intermediates' mutable?)")
    return out


def indexer_terms(params, intermediates, cfg, stage, mask, *, with_recall=True):
    """Mean over every MLA layer (MTP's included) of the indexer KL loss and recall.

    params: unboxed model params; intermediates: the model's "intermediates" collection;
    mask [B, T]: real query rows. Recall = share of the main attention mass (over all causal
    keys) that falls in the indexer's top-k; it carries no gradient.
    """
    check_stage(stage)
    if stage == "off":
        raise ValueError("indexer_terms: dsa_stage 'off' has no indexer loss")
    b, t = mask.shape
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), cfg)
    layer = lambda p, s: _layer_terms(cfg, stage, with_recall, p, s, cos, sin, mask)
    terms = _map_sites(layer, params, intermediates, "indexer_terms").values()
    kls, recalls = zip(*terms)
    return jnp.mean(jnp.concatenate(kls)), jnp.mean(jnp.concatenate(recalls))


def attention_maps(params, intermediates, cfg):
    """Every MLA layer's indexer scores and main attention over all causal keys, for inspection
    (O(T·S) memory: short sequences). params and intermediates as for `indexer_terms`.

    Returns {group: (scores, probs)} per layer group ("dense_layers", "moe_layers", "mtp_0", ...),
    scores [L, B, T, S] float32 (-inf past each query) and probs
    [L, B, T, S]: the dense warm-up's target (per-head softmax summed over heads, L1-normalised).
    """
    def layer(indexer_params, sown):
        b, t = sown["x"].shape[:2]
        positions = jnp.arange(t, dtype=jnp.int32)
        cos, sin = rope_cos_sin(jnp.broadcast_to(positions, (b, t)), cfg)
        (iq, ik, iw, k_scale), main = _layer_inputs(cfg, indexer_params, sown, cos, sin)
        probs, valid = _main_probs(cfg, positions, *main)
        return jnp.where(valid, indexer_scores(iq, ik, iw, k_scale), -jnp.inf), probs
    return _map_sites(layer, params, intermediates, "attention_maps")
