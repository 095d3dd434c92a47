"""Transformer: embeddings -> dense blocks -> MoE blocks -> RMSNorm -> lm_head (+ MTP) (spec §1, §6).

Both block groups are stacked with `nn.scan`, so compile time does not grow with depth; their
params carry a leading "layers" axis. `__call__` returns (logits [B, T, V] float32, aux) where
aux holds, per MoE layer, the expert loads [L, E] and balance statistics [L]; with
`return_indices`, the indexer selections per layer ({"dense"|"moe"|"mtp"}: [L, B, T, K]); and
when MTP runs, `mtp_logits` [depth, B, T, V] (position i at depth k predicts token i + k + 1) and
its MoE blocks' `mtp_expert_load` [depth, E] and `mtp_balance` [depth] (they are trained and
balanced like the main MoE layers);
with `return_routes`, `routes`: the experts chosen at every MoE layer [L, B, T, K]; with
`return_hidden`, `hidden`: the final-normed hidden state [B, T, D] (the MTP input). With
`logits_at` [B, T'] (positions), the main logits are computed only there: [B, T', V].

Keep Routing (spec §8): `routes` [L, B, T, K] forces the experts of every MoE layer (weights
recomputed from the current gate scores). Decoding (cache.py): with `cache`, the tokens are
appended after `cache.lengths` and attend over the cache (absorbed mode; "auto" = sparse);
with `prefill=True` the cache must be empty and attention runs as without one while the rows
are written. aux["cache"] is the updated cache (lengths + T).

Legend: B batch, T tokens, D model dim, V vocab, L MoE layers, K experts per token.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.attention import resolve_mode
from deepseek_jax.cache import Cache
from deepseek_jax.layers.block import Block
from deepseek_jax.layers.mtp import MTP
from deepseek_jax.layers.norms import RMSNorm
from deepseek_jax.layers.rope import rope_cos_sin

_REMAT = {"dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          "full": jax.checkpoint_policies.nothing_saveable}


def _stack(cfg, n, moe, mode, return_indices, return_routes, name):
    block = Block
    if cfg.remat != "none":
        # Inside a scan the loop already keeps XLA from merging recomputation away (no CSE guard).
        block = nn.remat(Block, policy=_REMAT[cfg.remat], prevent_cse=False)
    # Block(carry, cos, sin, start, routes): routes are per layer, the rest is shared.
    scanned = nn.scan(block, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=n,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    return scanned(cfg, moe=moe, attention_mode=mode, return_indices=return_indices, return_routes=return_routes,
                   name=name)


def _check_decode_inputs(cfg, b, t, cache, prefill, with_mtp):
    if with_mtp and cfg.num_nextn_predict_layers:
        raise ValueError("with_mtp: MTP does not run inside a cached call (pass with_mtp=False; "
                         "speculative decoding applies the MTP layer itself)")
    if cache.lengths.shape != (b,):
        raise ValueError(f"cache.lengths: expected shape {(b,)} for a batch of {b}, got {cache.lengths.shape}")
    if prefill and t > cache.max_len:
        raise ValueError(f"prefill: {t} tokens do not fit a cache of max_len {cache.max_len}")


class Transformer(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, tokens, *, positions=None, attention="auto", with_mtp=True, return_indices=False,
                 routes=None, return_routes=False, return_hidden=False, logits_at=None, cache=None, prefill=False):
        cfg = self.cfg
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens: expected an integer array [batch, seq], got {tokens.dtype} {tokens.shape}")
        b, t = tokens.shape
        mode = resolve_mode(attention, t, cfg)
        start = None
        if cache is None and prefill:
            raise ValueError("prefill=True needs a cache to fill")
        if cache is not None:
            _check_decode_inputs(cfg, b, t, cache, prefill, with_mtp)
            if not prefill:
                mode = "dense" if attention == "dense" else "sparse"
                start = cache.lengths
        if routes is not None and routes.shape != (cfg.num_moe_layers, b, t, cfg.num_experts_per_tok):
            raise ValueError(f"routes: expected [MoE layers, B, T, K] = "
                             f"{(cfg.num_moe_layers, b, t, cfg.num_experts_per_tok)}, got {routes.shape}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if start is not None:
                positions = positions + start[:, None]
        cos, sin = rope_cos_sin(positions, cfg)

        embedding = self.param("embed", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), cfg.params_dtype)
        embed = lambda ids: jnp.take(embedding, ids, axis=0).astype(cfg.compute_dtype)
        head = self.param("lm_head", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
            (cfg.hidden_size, cfg.vocab_size), cfg.params_dtype)
        logits_of = lambda h: jnp.einsum("BTD,DV->BTV", h, head.astype(cfg.compute_dtype),
                                         preferred_element_type=jnp.float32)
        final_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype, name="final_norm")

        # A zero "perturbation" hook: gradients w.r.t. it are gradients w.r.t. the input embeddings.
        x = self.perturb("embeddings", embed(tokens))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        aux: dict = {"indices": {}}
        groups = {} if cache is None else dict(cache.layers)
        for name, n, moe in (("dense_layers", cfg.first_k_dense_replace, False),
                             ("moe_layers", cfg.num_moe_layers, True)):
            if n == 0:
                continue
            stack = _stack(cfg, n, moe, mode, return_indices, return_routes, name)
            carry = x if cache is None else (x, groups[name], jnp.int32(0))
            carry, layer_aux = stack(carry, cos, sin, start, routes if moe else None)
            x = carry if cache is None else carry[0]
            if cache is not None:
                groups[name] = carry[1]
            if "indices" in layer_aux:
                aux["indices"][name] = layer_aux.pop("indices")
            if "routes" in layer_aux:
                aux["routes"] = layer_aux.pop("routes")
            aux.update(layer_aux)
        if return_routes and not cfg.num_moe_layers:
            aux["routes"] = jnp.zeros((0, b, t, cfg.num_experts_per_tok), jnp.int32)
        hidden = final_norm(x)
        logits = logits_of(hidden if logits_at is None else jnp.take_along_axis(hidden, logits_at[..., None], axis=1))
        if return_hidden:
            aux["hidden"] = hidden
        if cache is not None:
            aux["cache"] = Cache(layers=groups, lengths=cache.lengths + t)

        if with_mtp and cfg.num_nextn_predict_layers:
            mtp_logits, mtp_indices, mtp_load, mtp_balance = [], [], [], []
            h = hidden
            for depth in range(1, cfg.num_nextn_predict_layers + 1):
                # Position i reads token i + depth; the last `depth` positions see padding (id 0).
                shifted = jnp.pad(tokens[:, depth:], ((0, 0), (0, depth)))
                h, normed, mtp_aux = MTP(cfg, mode, return_indices, name=f"mtp_{depth - 1}")(h, embed(shifted), cos, sin)
                mtp_logits.append(logits_of(normed))
                mtp_load.append(mtp_aux["expert_load"])
                mtp_balance.append(mtp_aux["balance"])
                if "indices" in mtp_aux:
                    mtp_indices.append(mtp_aux["indices"])
            aux["mtp_logits"] = jnp.stack(mtp_logits)
            aux["mtp_expert_load"], aux["mtp_balance"] = jnp.stack(mtp_load), jnp.stack(mtp_balance)
            if mtp_indices:
                aux["indices"]["mtp"] = jnp.stack(mtp_indices)
        return logits, aux


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def forward(params, tokens, cfg, *, attention: str = "auto", routes=None) -> jax.Array:
    """Logits [B, T, vocab] float32; sparse attention when T > cfg.index_topk (see attention.py).
    routes: optional forced experts per MoE layer [L, B, T, K] (Keep Routing)."""
    logits, _ = Transformer(cfg).apply({"params": params}, tokens, attention=attention, with_mtp=False,
                                       routes=routes)
    return logits
