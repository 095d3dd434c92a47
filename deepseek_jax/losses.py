"""Training losses (spec §4-§6).

Legend: B batch, T positions, V vocab.
"""

import jax
import jax.numpy as jnp


def lm_loss(logits, targets, mask):
    """Next-token cross-entropy averaged over real tokens: logits [B,T,V] f32, targets/mask [B,T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
