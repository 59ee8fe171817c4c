"""Losses over token logits.

Shape glossary: B batch, T time, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxattn.ops.layers import check_token_ids, ids_to_check

Array = jax.Array


def cross_entropy(
    logits: Array,
    targets: Array,
    mask: Array | None = None,
    *,
    label_smoothing: float | Array = 0.0,
) -> Array:
    """Mean token cross-entropy ``-sum_v p(v) log softmax(logits)_v`` in float32.

    ``p`` is the one-hot target, or with label smoothing ``eps`` the distribution
    ``(1 - eps) onehot + eps / V`` (Szegedy et al., 2016, "Rethinking the Inception
    Architecture"). With a mask the mean runs over the counted tokens only:
    ``sum(CE over counted) / max(number counted, 1)``.

    Args:
      logits: ``[..., V]`` (any float dtype; computed in float32).
      targets: ``[...]`` integer ids in ``[0, V)`` (checked when concrete).
      mask: optional ``[...]``, True (or nonzero) = count this token. Not a weight: a
        count of 2 counts the token once.
      label_smoothing: ``eps`` in ``[0, 1)`` (checked when concrete; may be traced, e.g.
        a scheduled value passed through ``jit``).

    Returns:
      Scalar float32 loss.
    """
    targets = ids_to_check(targets)  # checked before jnp.asarray (see ids_to_check)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: targets {targets.shape} must be logits {logits.shape} without "
            "the vocab axis"
        )
    if mask is not None and jnp.shape(mask) != targets.shape:
        raise ValueError(
            f"cross_entropy: mask {jnp.shape(mask)} must match targets {targets.shape}"
        )
    if jnp.ndim(label_smoothing) != 0:  # (known under jit too: a [V] eps would broadcast)
        raise ValueError(
            f"cross_entropy: label_smoothing must be a scalar, got shape "
            f"{jnp.shape(label_smoothing)}"
        )
    traced = isinstance(label_smoothing, jax.core.Tracer)
    if not traced and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    # An id outside [0, V) would give NaN (>= V) or a silently wrong loss (< 0).
    check_token_ids(targets, logits.shape[-1], "cross_entropy: targets")
    targets = jnp.asarray(targets)
    logits = logits.astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [...]
    if traced or label_smoothing > 0.0:
        # -sum_v p(v) log q(v) = (1 - eps) * nll + eps * mean_v(-log q(v)). Not through
        # optax.smooth_labels: its 0 * log q(v) is NaN where a logit is -inf (a vocab entry
        # the model may never emit), which a traced eps of 0 must not turn into a NaN loss.
        eps = jnp.asarray(label_smoothing, jnp.float32)
        uniform = -jnp.mean(jax.nn.log_softmax(logits), axis=-1)  # [...]
        # where, twice: eps * inf is NaN at eps = 0, and so would be its gradient in eps.
        uniform = jnp.where(eps > 0.0, uniform, 0.0)
        losses = (1.0 - eps) * losses + eps * uniform
    if mask is None:
        return jnp.mean(losses)
    counted = jnp.asarray(mask).astype(bool)
    # where, not losses * counted: an uncounted token's loss may be inf (its target's
    # logit is -inf, e.g. a pad target the model never predicts) and inf * 0 = NaN.
    total = jnp.sum(jnp.where(counted, losses, 0.0))
    return total / jnp.maximum(jnp.sum(counted.astype(jnp.float32)), 1.0)
