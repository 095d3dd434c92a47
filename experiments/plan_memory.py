"""Per-device memory of training a config on a mesh, from abstract shapes only (no devices).

    python -m experiments.plan_memory --config=v32-671b --mesh=data=2,fsdp=32,expert=64 \\
        --mesh=fsdp=16,expert=64,tensor=2 --rules=fsdp_ep --batch=128 --seq_len=4096 --remat=full

For each mesh: bytes per device of
  params     each leaf's shard under the rules (`sharding.rules.spec_for`), in param_dtype;
  grads      the same shards (gradients are reduce-scattered like their params);
  optimizer  AdamW's two moments, float32, sharded like the params;
  activations what the backward pass keeps for one device's slice of the batch under the remat
             policy: the leaves of `jax.vjp`'s residuals from `jax.eval_shape`, minus the params
             they close over and their compute-dtype casts (a cast of a device's own shards
             costs at most half its params column). Only the batch split is counted, so with tensor parallelism this
             is an upper bound (heads/FFN activations also split over "tensor").
XLA's temporaries (collective buffers, fusion scratch) come on top; leave ~10-20 % headroom.
Prints a table and writes JSON.
"""

import collections
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from deepseek_jax.config import REMAT_POLICIES, ModelConfig
from deepseek_jax.losses import lm_loss
from deepseek_jax.model import Transformer
from deepseek_jax.params import boxed_abstract_params
from sharding import rules as rules_lib
from sharding.mesh import AXES, parse_mesh_spec


GIB = 1 << 30


def load_config(name_or_path: str, **overrides) -> ModelConfig:
    if name_or_path.endswith(".json"):
        return ModelConfig.from_hf_config(name_or_path, **overrides)
    return ModelConfig.preset(name_or_path, **overrides)


def param_bytes_per_device(cfg: ModelConfig, sizes: dict[str, int], rules) -> tuple[int, int]:
    """(bytes of one device's param shards in their dtypes, number of param elements per device)."""
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    nbytes = count = 0
    for box in jax.tree.leaves(boxed_abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        spec = rules_lib.spec_for(box.names, box.value.shape, mesh, rules)
        shard = [dim // math.prod(sizes[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
                 for dim, axes in zip(box.value.shape, tuple(spec) + (None,) * (len(box.value.shape) - len(spec)))]
        count += math.prod(shard)
        nbytes += math.prod(shard) * jnp.dtype(box.value.dtype).itemsize
    return nbytes, count


@functools.lru_cache(maxsize=64)  # meshes that split the batch alike share it: the trace takes seconds
def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """Bytes the backward pass keeps for `batch` sequences (residuals of jax.vjp, params excluded)."""
    params = nn.meta.unbox(boxed_abstract_params(cfg))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

    def loss(p, t):
        logits, _ = Transformer(cfg).apply({"params": p}, t, with_mtp=False)
        return lm_loss(logits, t, jnp.ones_like(t))

    residuals = jax.tree.leaves(jax.eval_shape(lambda p, t: jax.vjp(lambda q: loss(q, t), p)[1], params, tokens))
    left = collections.Counter(tuple(r.shape) for r in residuals)
    for p in jax.tree.leaves(params):
        # The params the backward closes over, and their compute-dtype casts, are not
        # activations: one residual of each param's shape is taken to be its cast.
        if left.get(tuple(p.shape)):
            left[tuple(p.shape)] -= 1
    sizes = {tuple(r.shape): math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in residuals}
    return sum(sizes[shape] * n for shape, n in left.items())


def plan(cfg: ModelConfig, mesh_spec: str, rules_name: str, batch: int, seq_len: int, hbm_gib: float) -> dict:
    sizes = parse_mesh_spec(mesh_spec, None)
    rules = rules_lib.preset(rules_name)
    batch_shards = math.prod(sizes[a] for a in rules_lib.BATCH)
    if batch % batch_shards:
        raise ValueError(f"plan_memory: batch {batch} does not split over the batch axes {rules_lib.BATCH} "
                         f"of mesh {mesh_spec!r} ({batch_shards})")
    params, count = param_bytes_per_device(cfg, sizes, rules)
    acts = activation_bytes(cfg, batch // batch_shards, seq_len)
    row = {"mesh": mesh_spec, "devices": math.prod(sizes.values()), "rules": rules_name, "remat": cfg.remat,
           "batch_per_device": batch // batch_shards, "params_gib": params / GIB, "grads_gib": params / GIB,
           "optimizer_gib": 2 * 4 * count / GIB, "activations_gib": acts / GIB}
    row["total_gib"] = row["params_gib"] + row["grads_gib"] + row["optimizer_gib"] + row["activations_gib"]
    row["fits"] = row["total_gib"] <= hbm_gib
    return row


def main(argv):
    del argv
    cfg = load_config(_CONFIG.value, remat=_REMAT.value, dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value,
                      attention_impl=_IMPL.value)
    rows = [plan(cfg, spec, _RULES.value, _BATCH.value, _SEQ.value, _HBM.value) for spec in _MESH.value]
    print(f"config={_CONFIG.value} rules={_RULES.value} batch={_BATCH.value} seq_len={_SEQ.value} "
          f"remat={_REMAT.value} param_dtype={_PARAM_DTYPE.value} attention_impl={_IMPL.value}; "
          f"GiB per device (of {_HBM.value:g})")
    cols = ("params_gib", "grads_gib", "optimizer_gib", "activations_gib", "total_gib")
    print(f"{'mesh':<36}{'devices':>8}{'batch/dev':>10}" + "".join(f"{c[:-4]:>13}" for c in cols) + f"{'fits':>6}")
    for r in rows:
        print(f"{r['mesh']:<36}{r['devices']:>8}{r['batch_per_device']:>10}"
              + "".join(f"{r[c]:>13.1f}" for c in cols) + f"{'yes' if r['fits'] else 'NO':>6}")
    with open(_OUT.value, "w") as f:
        json.dump({"config": _CONFIG.value, "seq_len": _SEQ.value, "batch": _BATCH.value, "axes": AXES,
                   "rows": rows}, f, indent=1)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    # Flags exist only when this runs as a binary: tests import its functions next to
    # other binaries that also define --config / --workdir.
    _CONFIG = flags.DEFINE_string("config", "v32-671b", "a ModelConfig preset or an HF config.json path")
    _MESH = flags.DEFINE_multi_string("mesh", ["data=1,fsdp=32,expert=8"], "mesh spec(s), every axis sized")
    _RULES = flags.DEFINE_enum("rules", "fsdp_ep", list(rules_lib.PRESETS), "logical-axis rules preset")
    _BATCH = flags.DEFINE_integer("batch", 64, "global batch (sequences)")
    _SEQ = flags.DEFINE_integer("seq_len", 4096, "tokens per sequence")
    _REMAT = flags.DEFINE_enum("remat", "full", list(REMAT_POLICIES), "remat policy of the blocks")
    _DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
    _PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "parameter (master weight) dtype")
    _IMPL = flags.DEFINE_enum("attention_impl", "pallas", ["pallas", "reference"],
                              "DSA kernels traced for the residuals: the fused kernels save little, the XLA "
                              "reference path saves the gathered rows")
    _HBM = flags.DEFINE_float("device_memory_gib", 141.0, "memory per device, for the headroom column")
    _OUT = flags.DEFINE_string("out", "/tmp/plan_memory.json", "JSON output")
    app.run(main)
