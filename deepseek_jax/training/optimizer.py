"""AdamW with linear warm-up + cosine decay, per-group gradient clipping and DSA-stage freezing.

Parameters fall into three groups:
  main    : everything trained by the LM losses;
  indexer : the lightning indexers (trained only by their KL loss, spec §4), with their own
            learning rate and their own clipping, so their gradient norm never scales the
            main model's step;
  frozen  : never updated by the optimizer: the MoE selection bias `gate_bias` (moved by the
            aux-loss-free rule instead, spec §5), every non-indexer parameter in the dense
            warm-up, and the indexers when the DSA stage is "off" (nothing trains them).
Norm scales and biases get no weight decay.
"""

import jax
import optax

from deepseek_jax.training.dsa import check_stage

_NO_DECAY = ("scale", "bias")


def _names(path):
    return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def param_labels(params, stage: str):
    """A pytree like params of "main" | "indexer" | "frozen"."""
    check_stage(stage)

    def label(path, _):
        names = _names(path)
        if "gate_bias" in names:
            return "frozen"
        if "indexer" in names:
            return "frozen" if stage == "off" else "indexer"
        return "frozen" if stage == "dense_warmup" else "main"
    return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int, min_ratio: float):
    """0 -> peak linearly over warmup_steps, then cosine down to peak · min_ratio at total_steps."""
    if peak < 0 or warmup_steps < 0 or total_steps < 1 or not 0 <= min_ratio <= 1:
        raise ValueError(f"learning rate schedule: expected peak >= 0, warmup_steps >= 0, total_steps >= 1, "
                         f"0 <= min_ratio <= 1; got {peak}, {warmup_steps}, {total_steps}, {min_ratio}")
    warmup_steps = min(warmup_steps, total_steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, peak * min_ratio)


def make_optimizer(*, stage: str, learning_rate: float, indexer_learning_rate: float, warmup_steps: int,
                   total_steps: int, min_lr_ratio: float = 0.1, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, grad_clip: float = 1.0, indexer_grad_clip: float = 1.0):
    """The optax transformation for one DSA stage (see the module docstring for the groups)."""
    def group(lr, clip):
        decay_mask = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _names(p)[-1] not in _NO_DECAY,
                                                                     params)
        schedule = learning_rate_schedule(lr, warmup_steps, total_steps, min_lr_ratio)
        return optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
                           optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))

    transforms = {"main": group(learning_rate, grad_clip),
                  "indexer": group(indexer_learning_rate, indexer_grad_clip),
                  "frozen": optax.set_to_zero()}
    return optax.multi_transform(transforms, lambda params: param_labels(params, stage))
