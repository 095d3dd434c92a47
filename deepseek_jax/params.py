"""Abstract params of `Transformer(cfg)` and their shardings, from the params' logical axes.

No compute and no memory: shapes come from `jax.eval_shape` of `init`. `rules` pair logical
axis names with mesh axes (see `sharding.rules`); axes without a rule are replicated, rules=None
replicates everything, mesh=None places everything on the first local device.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepseek_jax.config import ModelConfig
from deepseek_jax.model import Transformer
from sharding import rules as rules_lib

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


@functools.lru_cache(maxsize=8)
def boxed_abstract_params(cfg: ModelConfig):
    """ShapeDtypeStruct params still in their `nn.LogicallyPartitioned` boxes.

    Cached per config: tracing `init` of the 671B model takes seconds, and loaders ask for
    shapes and shardings several times. Callers must not mutate the returned tree.
    """
    init = lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    return jax.eval_shape(init)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, rules: LogicalRules | None = None):
    """A params pytree of shardings."""
    boxed = boxed_abstract_params(cfg)
    if mesh is None:
        if rules:
            raise ValueError("param_shardings: rules given without a mesh")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: device, nn.meta.unbox(boxed))
    return rules_lib.logical_shardings(boxed, mesh, tuple(rules or ()))


def abstract_params(cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None, rules: LogicalRules | None = None):
    """Unboxed ShapeDtypeStruct params carrying their shardings (e.g. an Orbax restore target)."""
    shapes = nn.meta.unbox(boxed_abstract_params(cfg))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, param_shardings(cfg, mesh, rules))


def param_mismatches(params, target, *, check_dtype: bool = False) -> list[str]:
    """Every missing, unexpected or misshapen (and, with check_dtype, wrongly typed) leaf of
    `params` against `target` (e.g. `abstract_params(cfg)`), by name."""
    flat = lambda tree: {jax.tree_util.keystr(p): x for p, x in jax.tree.leaves_with_path(nn.meta.unbox(tree))}
    got, want = flat(params), flat(target)
    problems = [f"missing: {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected: {k}" for k in sorted(got.keys() - want.keys())]
    for k in sorted(want.keys() & got.keys()):
        g, w = got[k], want[k]
        if tuple(g.shape) != tuple(w.shape) or (check_dtype and jnp.dtype(g.dtype) != jnp.dtype(w.dtype)):
            what = f"{w.dtype} {tuple(w.shape)}, got {g.dtype} {tuple(g.shape)}" if check_dtype \
                else f"{tuple(w.shape)}, got {tuple(g.shape)}"
            problems.append(f"{'shape/dtype' if check_dtype else 'shape'}: {k}: expected {what}")
    return problems


def check_params(params, target, *, what: str, check_dtype: bool = False) -> None:
    """Raises one ValueError listing every `param_mismatches` problem, prefixed by `what`."""
    problems = param_mismatches(params, target, check_dtype=check_dtype)
    if problems:
        raise ValueError(f"{what}: params do not match the config ({len(problems)} problems):\n  "
                         + "\n  ".join(problems))
