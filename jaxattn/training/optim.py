"""Optimizer: AdamW with warmup + cosine learning rate, decoupled weight decay on matrices
only, and global-norm gradient clipping, built from optax pieces.

Learning rate at update ``t`` (0-based count of updates already applied; nanoGPT's
``get_lr``)::

    t <  warmup:       lr * (t + 1) / (warmup + 1)
    t >  decay_steps:  min_lr
    otherwise:         min_lr + 0.5 * (1 + cos(pi * (t - warmup) / (decay_steps - warmup)))
                                * (lr - min_lr)

By default weight decay applies to leaves with ``ndim >= 2`` (weight matrices and
embeddings), never to biases, norm scales or other vectors, like nanoGPT's two parameter
groups. Models whose biases are not 1-D (per-head ``[N, H]`` biases) or whose layers are
stacked along a leading ``[L]`` axis pass their own ``decay_mask``.

Gradient accumulation is not an optax wrapper here: ``loop.make_train_step`` scans over
``grad_accum_steps`` microbatches inside one jitted step and applies this optimizer once to
the mean gradient. Compared with ``optax.MultiSteps`` that keeps one train step = one
optimizer update (so ``step``, the schedule, ``eval_every`` and checkpoints all count
updates), adds nothing to the optimizer state that checkpoints carry, and needs one host
call per update instead of one per microbatch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn.ops._checks import check_size, is_real_scalar

# The schedule runs in float32: a larger rate would be inf there.
_F32_MAX = float(np.finfo(np.float32).max)


def learning_rate_schedule(
    learning_rate: float,
    *,
    warmup_steps: int,
    lr_decay_steps: int,
    min_lr: float,
) -> optax.Schedule:
    """Return nanoGPT's linear-warmup + cosine-decay schedule as an optax schedule.

    Args:
      learning_rate: peak rate, reached at the end of the warmup.
      warmup_steps: updates of linear warmup, ``lr * (t + 1) / (warmup + 1)``.
      lr_decay_steps: update at which the cosine reaches ``min_lr`` (kept after it).
      min_lr: final rate.

    Returns:
      ``schedule(count) -> rate``, ``count`` the number of updates already applied.
    """
    where = "learning_rate_schedule"  # (2.5 warmup steps would bend the ramp; None fails later)
    warmup_steps = check_size(warmup_steps, "warmup_steps", where, minimum=0)
    lr_decay_steps = check_size(lr_decay_steps, "lr_decay_steps", where, minimum=0)
    if lr_decay_steps < warmup_steps:
        raise ValueError(
            f"need 0 <= warmup_steps <= lr_decay_steps, got warmup_steps={warmup_steps}, "
            f"lr_decay_steps={lr_decay_steps}"
        )
    # (a string failed in the comparison, True ran as a rate of 1.0; NaN fails it too)
    if not all(is_real_scalar(v) and 0 <= float(v) <= _F32_MAX for v in (learning_rate, min_lr)):
        raise ValueError(
            f"learning rates must be finite float32 values >= 0, got {learning_rate=}, {min_lr=}"
        )
    cosine_steps = max(lr_decay_steps - warmup_steps, 1)

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count).astype(jnp.float32)
        warm = learning_rate * (t + 1.0) / (warmup_steps + 1.0)
        ratio = jnp.clip((t - warmup_steps) / cosine_steps, 0.0, 1.0)
        cosine = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (learning_rate - min_lr)
        return jnp.where(t < warmup_steps, warm, jnp.where(t > lr_decay_steps, min_lr, cosine))

    return schedule


def decay_mask(params: Any) -> Any:
    """Return a pytree of bools like ``params``: True where weight decay applies (ndim >= 2)."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


_NDIM_DECAY_MASK = decay_mask  # (make_optimizer's argument of the same name hides it)


def make_optimizer(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    decay_mask: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformation:
    """Build AdamW (decay on matrices only) preceded by global-norm clipping.

    ``g <- g * min(1, grad_clip / ||g||_2)`` over all leaves, then AdamW with
    ``p <- p - lr * (adam(g) + weight_decay * p * [p.ndim >= 2])``
    (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization").

    Args:
      learning_rate: a constant or an optax schedule (e.g. ``learning_rate_schedule``).
      b1, b2, eps: Adam moment decay rates, in ``[0, 1)``, and denominator epsilon, a
        finite float32 ``>= 0`` (PyTorch's default eps).
      weight_decay: decoupled decay coefficient (a finite float32 ``>= 0``) for leaves
        with ``ndim >= 2``.
      grad_clip: maximum global gradient norm; None or <= 0 disables clipping (NaN is
        refused).
      decay_mask: ``params -> pytree of bools`` (True = decay); None: ``decay_mask``
        (``ndim >= 2``).

    Every number may be injected with ``optax.inject_hyperparams(make_optimizer)(...)``
    (to log or change it during training); values traced there are not range-checked.
    inject_hyperparams calls any function it is given as a schedule of the step count, so
    a custom ``decay_mask`` goes in its ``static_args=("decay_mask",)``.

    Raises:
      ValueError: a setting out of its range, or a ``decay_mask`` that is not a function.

    Returns:
      An optax gradient transformation.
    """
    # The ranges PyTorch's AdamW accepts (and finite). optax takes anything: eps=-1 climbs
    # the gradient, b1=1 turns the weights to NaN a step later, weight_decay<0 grows them.
    # (float32's range: the updates are float32, and 1e39 would make every weight -inf)
    unit, finite = (lambda v: 0.0 <= v < 1.0), (lambda v: 0.0 <= v <= _F32_MAX)
    _check_setting("b1", b1, unit, "in [0, 1)")
    _check_setting("b2", b2, unit, "in [0, 1)")
    _check_setting("eps", eps, finite, "a finite float32 >= 0")
    _check_setting("weight_decay", weight_decay, finite, "a finite float32 >= 0")
    if not callable(learning_rate):
        _check_setting("learning_rate", learning_rate, finite, "a finite float32 >= 0")
    if grad_clip is not None:
        _check_setting("grad_clip", grad_clip, lambda v: not math.isnan(v), "a number or None")
    if decay_mask is None:
        decay_mask = _NDIM_DECAY_MASK
    elif not callable(decay_mask):
        # optax.inject_hyperparams called a decay_mask passed to it as a schedule of the
        # count and handed on the result, a 0-d False: AdamW then decayed no weight at all.
        raise ValueError(
            f"make_optimizer: decay_mask must be a function params -> pytree of bools, got "
            f"{type(decay_mask).__name__} {decay_mask!r} (under optax.inject_hyperparams "
            "pass static_args=('decay_mask',))"
        )
    parts = []
    if isinstance(grad_clip, jax.Array):
        # optax.inject_hyperparams passes a JAX array, traced in a jitted update (where
        # `> 0` is no bool), concrete in init: one chain for both, whatever the value.
        parts.append(_clip_by_global_norm_if_positive(grad_clip))
    elif grad_clip is not None and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    adamw = optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask
    )
    parts.append(adamw)
    return _standard_promotion(optax.chain(*parts))


def _clip_by_global_norm_if_positive(max_norm: jax.Array) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm(max_norm)`` for a traced ``max_norm``, a no-op where it is
    ``<= 0`` (the rule a concrete ``grad_clip`` follows)."""
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        clipped, state = clip.update(updates, state, params)
        on = max_norm > 0
        return jax.tree.map(lambda c, u: jnp.where(on, c, u), clipped, updates), state

    return optax.GradientTransformation(clip.init, update)


def _check_setting(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> None:
    """``ValueError`` naming ``name`` unless ``ok(value)`` (NaN fails every range). Traced
    values (``optax.inject_hyperparams`` inside ``jit``) pass unchecked."""
    if isinstance(value, jax.core.Tracer):
        return
    if not (is_real_scalar(value) and ok(float(value))):
        raise ValueError(f"make_optimizer: {name} must be {expected}, got {value!r}")


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run ``tx.update`` under JAX's standard dtype promotion.

    optax's Adam computes its bias correction as ``b ** count`` (a Python float to the
    power of an int32 count), which ``jax_numpy_dtype_promotion="strict"`` (the test
    suite's setting) rejects; standard promotion gives float32, as optax intends.
    """

    def update(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update)


def optimizer_from_config(
    config: Any, *, decay_mask: Callable[[Any], Any] = decay_mask
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Build the optimizer and its schedule from a run config.

    Reads ``learning_rate, min_lr, warmup_steps, lr_decay_steps, b1, b2, weight_decay,
    grad_clip`` (and ``eps`` if present) from ``config`` (an ml_collections ConfigDict or
    any object with those attributes).

    Returns:
      ``(optimizer, schedule)``; the schedule is returned for logging the rate.
    """
    schedule = learning_rate_schedule(
        config.learning_rate,
        warmup_steps=config.warmup_steps,
        lr_decay_steps=config.lr_decay_steps,
        min_lr=config.min_lr,
    )
    optimizer = make_optimizer(
        schedule,
        b1=config.b1,
        b2=config.b2,
        eps=getattr(config, "eps", 1e-8),
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        decay_mask=decay_mask,
    )
    return optimizer, schedule
