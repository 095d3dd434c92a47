"""Logical-axis rules: which mesh axes split each logical axis of params and activations.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the model never
names mesh axes. A rule set maps a logical name to a mesh axis, a tuple of mesh axes, or None
(replicated). Presets (mesh axes from `sharding.mesh.AXES`):

  dp      : params replicated; the batch split over every non-tensor axis.
  fsdp    : + every weight split over "fsdp" on its model dim ("embed"), or on its latent dim
            (q_lora / kv_lora) when it has none (ZeRO-3: XLA gathers a layer's weights just
            before use and reduce-scatters their gradients).
  fsdp_ep : + routed experts split over "expert"; the MoE layer then runs expert-parallel
            (all-to-all, `sharding.moe_parallel`). Other weights split over fsdp × expert.
  tp_ep   : fsdp_ep + tensor parallelism: attention heads, the dense/shared/expert FFN inner
            dims, the indexer heads and the vocabulary split over "tensor".

Tokens are sharded over ("data", "fsdp", "expert") in every preset, so the batch must divide
by the product of those axes. A parameter dim that does not divide by its mesh axes' product
stays replicated on that dim (e.g. the tiny test model's small dims); `plan_memory` shows
per-device bytes, so a layout that shards less than hoped is visible.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

BATCH = ("data", "fsdp", "expert")
_ACTIVATIONS: Rules = (("batch", BATCH), ("length", None), ("act_embed", None), ("act_vocab", None))
# Attention's up-projections have no model dim; their latent dim takes "fsdp" instead.
_FSDP: Rules = (("embed", "fsdp"), ("q_lora", "fsdp"), ("kv_lora", "fsdp"))
# Weights without an expert dim are also split over "expert" (it is a data axis for them), so
# they do not sit replicated on every expert shard; expert weights use "expert" for E first.
_EP: Rules = (("expert", "expert"),) + tuple((name, ("fsdp", "expert")) for name, _ in _FSDP)
_TP: Rules = tuple((name, "tensor") for name in ("heads", "mlp", "moe_mlp", "index_heads", "vocab"))

PRESETS: dict[str, Rules] = {
    "dp": _ACTIVATIONS,
    "fsdp": _ACTIVATIONS + _FSDP,
    "fsdp_ep": _ACTIVATIONS + _FSDP + _EP,
    "tp_ep": _ACTIVATIONS + _FSDP + _EP + _TP,
}


def preset(name: str) -> Rules:
    if name not in PRESETS:
        raise ValueError(f"sharding rules: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh, rules: Rules) -> P:
    """PartitionSpec of an array with logical `axes` and `shape` under `rules` on `mesh`.

    Mesh axes of size 1, axes already used by an earlier dim, and trailing axes whose product
    does not divide the dim are left out, so any shape gets a valid spec.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        names = [target] if isinstance(target, str) else list(target or ())
        names = [a for a in names if mesh.shape.get(a, 1) > 1 and a not in used]
        while names and dim % math.prod(mesh.shape[a] for a in names):
            names.pop()
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else tuple(names))
    return P(*spec)


def logical_shardings(boxed_shapes, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for a pytree of `nn.LogicallyPartitioned` ShapeDtypeStructs (unboxed tree)."""
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda box: NamedSharding(mesh, spec_for(box.names, box.value.shape, mesh, rules)),
                        boxed_shapes, is_leaf=is_box)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a [batch, ...] input (tokens, targets, masks): the batch over the batch axes."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh, rules))


def shard_params(params, cfg, mesh: jax.sharding.Mesh, rules: Rules):
    """Places an (unboxed) params pytree of `Transformer(cfg)` on `mesh` as `rules` say.

    Every process must pass the same values (e.g. loaded from the same checkpoint)."""
    from deepseek_jax.params import abstract_params, check_params  # params.py imports this module

    target = abstract_params(cfg, mesh, rules)
    check_params(params, target, what="shard_params")
    return jax.device_put(params, jax.tree.map(lambda s: s.sharding, target))
