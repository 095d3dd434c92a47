"""One optimizer step: every V3.2 loss, gradient accumulation, AdamW, the aux-loss-free bias update.

loss = LM cross-entropy + MTP (λ, spec §6) + sequence-wise balance (α, spec §5)
       + indexer KL (spec §4; the DSA stage decides which terms train what, see `dsa.py`).
In the dense warm-up only the indexer KL is differentiated (everything else is frozen; the LM
terms are still reported). Micro-batches ([A, B, T] inputs, scanned) are weighted by their real
token counts, so the step equals one step on the whole batch. After the update each MoE
layer's selection bias moves by b += γ · sign(mean load − load) (spec §5), outside the gradient
(not in the dense warm-up, which freezes all but the indexers). The MTP modules' MoE blocks are
MoE layers like the others: their balance statistic joins the balance loss and their bias moves
by the same rule (when MTP runs, i.e. λ > 0).

The step is `jax.jit`-ed with explicit in/out shardings on a mesh (`sharding.rules` place the
params by their logical axes; the optimizer state follows the params; the batch is split on
its batch dim) and donates the state it replaces.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax import losses
from deepseek_jax.model import Transformer
from deepseek_jax.params import abstract_params, param_shardings
from deepseek_jax.training import dsa
from deepseek_jax.training.optimizer import param_labels
from sharding.rules import batch_sharding
from sharding.steps import global_batch, mesh_context


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the step optimises (hashable: a static argument of the jitted step)."""

    dsa_stage: str = "off"
    mtp_weight: float = 0.3          # λ
    balance_weight: float = 1e-4     # α
    indexer_weight: float = 1.0      # KL coefficient (acts as the indexer's LR multiplier, spec §4)
    bias_update_rate: float = 1e-3   # γ
    indexer_recall: bool = True      # measure recall (an O(T·S) metric per query chunk)

    def __post_init__(self):
        dsa.check_stage(self.dsa_stage)


def expert_loads(aux) -> dict:
    """Token counts per expert of every MoE layer that ran, keyed by the top-level param scope
    that holds its `gate_bias`: {"moe_layers": [L, E], "mtp_0": [1, E], ...} float32."""
    loads = {"moe_layers": aux["expert_load"]} if "expert_load" in aux else {}
    for depth, load in enumerate(aux.get("mtp_expert_load", ())):
        loads[f"mtp_{depth}"] = load[None]
    return jax.tree.map(lambda x: x.astype(jnp.float32), loads)


def loss_fn(params, inputs, targets, mask, *, cfg, lc: LossConfig):
    """(total loss, (parts dict of float32 scalars, `expert_loads`)) on one batch [B, T]."""
    stage = lc.dsa_stage
    with_mtp = bool(cfg.num_nextn_predict_layers) and lc.mtp_weight > 0
    (logits, aux), state = Transformer(cfg).apply(
        {"params": params}, inputs, attention=dsa.ATTENTION[stage], with_mtp=with_mtp,
        mutable=["intermediates"] if stage != "off" else [])
    parts = {"lm_loss": losses.lm_loss(logits, targets, mask)}
    parts["mtp_loss"] = losses.mtp_loss(aux["mtp_logits"], targets, mask, lc.mtp_weight) if with_mtp else 0.0
    balance = [aux[k] for k in ("balance", "mtp_balance") if k in aux]
    parts["balance_loss"] = losses.balance_loss(jnp.concatenate(balance), lc.balance_weight) if balance else 0.0
    total = parts["lm_loss"] + parts["mtp_loss"] + parts["balance_loss"]
    if stage != "off":
        kl, recall = dsa.indexer_terms(params, state["intermediates"], cfg, stage, mask,
                                       with_recall=lc.indexer_recall)
        parts.update(indexer_kl=kl, indexer_recall=recall)
        # Warm-up: the main model is frozen, so only the KL is differentiated.
        total = lc.indexer_weight * kl + (0.0 if stage == "dense_warmup" else total)
    else:
        parts.update(indexer_kl=0.0, indexer_recall=0.0)
    parts["loss"] = total
    return total, (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), parts), expert_loads(aux))


def accumulated_grads(params, batch, *, cfg, lc: LossConfig):
    """Gradients, loss parts and expert load summed over micro-batches; batch arrays [A, B, T]."""
    total_tokens = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

    def micro_loss(p, mb, share):
        total, (parts, load) = loss_fn(p, mb["inputs"], mb["targets"], mb["mask"], cfg=cfg, lc=lc)
        return total * share, (jax.tree.map(lambda x: x * share, parts), load)

    def micro(grads, mb):
        share = jnp.sum(mb["mask"].astype(jnp.float32)) / total_tokens
        (_, (parts, load)), micro_grads = jax.value_and_grad(micro_loss, has_aux=True)(params, mb, share)
        return jax.tree.map(jnp.add, grads, micro_grads), (parts, load)

    # Parts and loads come out per micro-batch (tiny) and are summed after the scan: no separate
    # trace of the model to learn their shapes for a carry.
    grads, (parts, load) = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), batch)
    parts, load = jax.tree.map(lambda x: jnp.sum(x, axis=0), (parts, load))
    return grads, parts, load


def update_gate_bias(params, loads, rate):
    """b += γ · sign(mean load − load) for every MoE selection bias with a load in `loads`
    (`expert_loads`: top-level scope -> [n, E], n = the bias's leading layer dims)."""
    def update(path, x):
        names = [getattr(k, "key", None) for k in path]
        if names[-2:] != ["mlp", "gate_bias"] or names[0] not in loads:
            return x
        load = loads[names[0]]
        delta = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return x + delta.reshape(x.shape).astype(x.dtype)
    return jax.tree_util.tree_map_with_path(update, params)


def _group_norm(grads, labels, group):
    return optax.tree.norm(jax.tree.map(lambda g, lab: g if lab == group else jnp.zeros_like(g), grads, labels))


def train_step(state, batch, *, cfg, lc: LossConfig, tx):
    """state {"params", "opt_state"}, batch {"inputs", "targets", "mask"} [A, B, T] -> (state, metrics)."""
    params = state["params"]
    grads, parts, load = accumulated_grads(params, batch, cfg=cfg, lc=lc)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    if lc.dsa_stage != "dense_warmup":  # the warm-up freezes everything but the indexers, the bias too
        params = update_gate_bias(params, load, lc.bias_update_rate)
    labels = param_labels(params, lc.dsa_stage)
    metrics = dict(parts, grad_norm=_group_norm(grads, labels, "main"),
                   indexer_grad_norm=_group_norm(grads, labels, "indexer"))
    if load:
        rows = jnp.concatenate(list(load.values()))
        metrics["expert_load_max_over_mean"] = jnp.max(jnp.max(rows, -1) / jnp.maximum(jnp.mean(rows, -1), 1e-9))
    return {"params": params, "opt_state": opt_state}, metrics


def state_shardings(cfg, tx, mesh, rules):
    """Shardings of {"params", "opt_state"}: params by their logical axes, the optimizer state
    as XLA propagates it from them (moments shard like their params)."""
    abstract = abstract_params(cfg, mesh, rules)
    with mesh_context(mesh, rules):
        opt_sh = jax.jit(tx.init).lower(abstract).compile().output_shardings
    return {"params": param_shardings(cfg, mesh, rules), "opt_state": opt_sh}


def init_state(cfg, tx, mesh, rules, seed: int, shardings=None):
    """Fresh {"params", "opt_state"} placed on `mesh` (params initialised from `seed`)."""
    shardings = shardings or state_shardings(cfg, tx, mesh, rules)

    def init():
        params = Transformer(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
        params = nn.meta.unbox(params)
        return {"params": params, "opt_state": tx.init(params)}
    with mesh_context(mesh, rules):
        return jax.jit(init, out_shardings=shardings)()


def make_train_step(cfg, lc: LossConfig, tx, mesh, rules, batch_shape, shardings=None):
    """A jitted (state, batch) -> (state, metrics) for host batches of shape [A, B, T] on `mesh`."""
    if len(batch_shape) != 3:
        raise ValueError(f"make_train_step: batch_shape: expected [accumulation, batch, seq], got {batch_shape}")
    shardings = shardings or state_shardings(cfg, tx, mesh, rules)
    per_micro = batch_sharding(mesh, rules, batch_shape[1:])
    batch_sh = NamedSharding(mesh, P(None, *per_micro.spec))
    batch_shardings = {"inputs": batch_sh, "targets": batch_sh, "mask": batch_sh}
    step = jax.jit(lambda state, batch: train_step(state, batch, cfg=cfg, lc=lc, tx=tx),
                   in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))

    def run(state, batch):
        with mesh_context(mesh, rules):
            return step(state, {k: global_batch(v, batch_sh) for k, v in batch.items()})
    return run
