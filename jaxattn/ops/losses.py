"""Losses over token logits.

Shape glossary: B batch, T time, V vocab.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxattn.ops._checks import check_size
from jaxattn.ops.layers import as_array, check_token_ids, float32_or_wider, ids_to_check

Array = jax.Array


def cross_entropy(
    logits: Array,
    targets: Array,
    mask: Array | None = None,
    *,
    label_smoothing: float | Array = 0.0,
) -> Array:
    """Mean token cross-entropy ``-sum_v p(v) log softmax(logits)_v`` in float32 (float64
    for float64 logits).

    ``p`` is the one-hot target, or with label smoothing ``eps`` the distribution
    ``(1 - eps) onehot + eps / V`` (Szegedy et al., 2016, "Rethinking the Inception
    Architecture"). With a mask the mean runs over the counted tokens only:
    ``sum(CE over counted) / max(number counted, 1)``, so no counted token gives 0; without
    one, zero tokens (an empty ``targets``) give NaN, the mean of nothing, as in PyTorch.

    Args:
      logits: ``[..., V]`` (any float dtype; computed in ``float32_or_wider``).
      targets: ``[...]`` integer ids in ``[0, V)`` where counted (checked when concrete;
        traced, a counted id outside it gives a NaN loss); an uncounted one may be any
        integer (a -100 "ignore" label).
      mask: optional ``[...]``, True (or nonzero) = count this token. Not a weight: a
        count of 2 counts the token once.
      label_smoothing: ``eps`` in ``[0, 1)`` (checked when concrete; may be traced, e.g.
        a scheduled value passed through ``jit``).

    Returns:
      Scalar loss, float32 (float64 for float64 logits).
    """
    targets = ids_to_check(targets)  # checked before jnp.asarray (see ids_to_check)
    logits = as_array(logits, "logits", "cross_entropy")  # (a list: no .ndim; None: named)
    # (0-d logits have no vocab axis: logits.shape[-1] below was a bare IndexError.)
    if logits.ndim < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: targets {targets.shape} must be logits {logits.shape} without "
            "the vocab axis, and logits must be [..., V]"
        )
    label_smoothing = _check_mask_and_smoothing(
        mask, targets.shape, label_smoothing, "cross_entropy"
    )
    # An id outside [0, V) would give NaN (>= V) or a silently wrong loss (< 0).
    check_counted_ids(targets, mask, logits.shape[-1], "cross_entropy: targets")
    if mask is None:
        return jnp.mean(_token_losses(logits, jnp.asarray(targets), label_smoothing))
    total, count = _counted_losses(logits, jnp.asarray(targets), jnp.asarray(mask), label_smoothing)
    return total / jnp.maximum(count, 1.0)


def chunked_cross_entropy(
    hidden: Array,
    logits_fn: Callable[[Array], Array],
    targets: Array,
    mask: Array | None = None,
    *,
    chunk_size: int,
    label_smoothing: float | Array = 0.0,
) -> Array:
    """``cross_entropy(logits_fn(hidden), targets, mask, label_smoothing=...)`` without all
    the logits at once.

    The sequence is taken ``chunk_size`` positions at a time (every row of the batch at
    once): each chunk's logits are computed, reduced to its losses and dropped, and
    recomputed in the backward pass (``jax.checkpoint``), so the forward and backward hold
    ``[..., chunk_size, V]`` logits and their gradient instead of ``[..., T, V]`` (MaxText's
    "vocab tiling"). For a GPT-2-sized vocabulary that is a large part of a step's memory:
    the float32 logits of 8 x 1024 tokens are 1.5 GiB, their gradient as much again. The
    price is the output product computed twice. With float32 products the result equals
    ``cross_entropy``'s up to summation order; bfloat16 products of chunk-sized operands
    round differently from whole ones. Chunks keep the batch axes whole, so a batch sharded
    over devices stays sharded the same way in every chunk. Eagerly, each call traces and
    compiles the chunk loop anew (``logits_fn`` is a new closure): call it under ``jit``.

    Args:
      hidden: ``[..., T, D]`` the inputs of the output layer (any float dtype).
      logits_fn: the output layer, ``[..., t, D] -> [..., t, V]`` for any t (e.g. the final
        norm and the unembedding); it may close over weights, whose gradients flow through.
      targets: ``[..., T]`` integer ids in ``[0, V)`` where counted (checked when
        concrete), as in ``cross_entropy``.
      mask, label_smoothing: as in ``cross_entropy``.
      chunk_size: positions per chunk, a positive int; the last chunk is padded (the
        padding is not counted).

    Returns:
      Scalar loss, float32 (float64 for float64 logits).
    """
    targets = ids_to_check(targets)  # checked before jnp.asarray (see ids_to_check)
    if targets.ndim < 1 or targets.shape != np.shape(hidden)[:-1]:
        raise ValueError(
            f"chunked_cross_entropy: targets {targets.shape} must be [..., T] and hidden "
            f"{np.shape(hidden)} [..., T, D]"
        )
    chunk_size = check_size(chunk_size, "chunk_size", "chunked_cross_entropy")
    label_smoothing = _check_mask_and_smoothing(
        mask, targets.shape, label_smoothing, "chunked_cross_entropy"
    )
    hidden = jnp.asarray(hidden)
    *lead, t, d = hidden.shape
    chunk = min(chunk_size, max(t, 1))
    chunks = -(-t // chunk)
    chunk_in = jax.ShapeDtypeStruct((*lead, chunk, d), hidden.dtype)
    logits_shape = jax.eval_shape(logits_fn, chunk_in).shape
    if logits_shape[:-1] != (*lead, chunk):
        raise ValueError(
            f"chunked_cross_entropy: logits_fn must map [..., t, D] to [..., t, V], got "
            f"{logits_shape} for {[*lead, chunk, d]}"
        )
    # An id outside [0, V) would give NaN (>= V) or a silently wrong loss (< 0).
    check_counted_ids(targets, mask, logits_shape[-1], "chunked_cross_entropy: targets")
    counted = jnp.ones(targets.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)

    def chunked(a: Array, mode: str = "constant") -> Array:
        """``[*lead, T, *rest]`` -> ``[chunks, *lead, chunk, *rest]``, the end padded."""
        axis = len(lead)
        padding = [(0, 0)] * a.ndim
        padding[axis] = (0, chunks * chunk - t)  # padded positions are not counted
        a = jnp.pad(a, padding, mode=mode)
        a = a.reshape(*lead, chunks, chunk, *a.shape[axis + 1 :])
        return jnp.moveaxis(a, axis, 0)

    # Saves only each chunk's inputs: the backward recomputes its logits.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_loss(h: Array, ids: Array, keep: Array) -> tuple[Array, Array]:
        # h: [*lead, chunk, D]; ids, keep: [*lead, chunk]
        return _counted_losses(logits_fn(h), ids, keep, label_smoothing)

    # The padding repeats the last position's hidden state, a real input of logits_fn: a
    # zero vector may be one where it has no gradient (a norm without an epsilon), and its
    # NaN would reach the weights' gradient through the zero cotangent.
    xs = (chunked(hidden, "edge"), chunked(jnp.asarray(targets)), chunked(counted))
    totals, counts = jax.lax.map(lambda x: chunk_loss(*x), xs)  # [chunks] each
    total = jnp.sum(totals)
    if mask is None:
        return total / targets.size
    return total / jnp.maximum(jnp.sum(counts), 1.0)


def check_counted_ids(targets: Array, mask: Array | None, vocab_size: int, what: str) -> None:
    """``check_token_ids`` on the targets that a loss counts: where a concrete ``mask`` is 0
    a target may be any integer (a -1 pad, PyTorch's -100 "ignore" label), which the loss
    drops, as it does under ``jit``. (Eager calls refused the uncounted ids that jitted
    ones took.) ``mask`` must already have ``targets``' shape."""
    traced = isinstance(targets, jax.core.Tracer) or isinstance(mask, jax.core.Tracer)
    if mask is not None and not traced:
        # 0 in the uncounted places keeps the shape, so the error's index stays right.
        targets = np.where(np.asarray(mask).astype(bool), np.asarray(targets), 0)
    check_token_ids(targets, vocab_size, what)


def _check_mask_and_smoothing(
    mask, shape: tuple[int, ...], label_smoothing, where: str
) -> float | Array:
    """Check the mask's shape and ``label_smoothing``; return the latter as
    ``check_label_smoothing`` does."""
    # np.shape: JAX's warns (DeprecationWarning) for a list mask, which runs.
    if mask is not None and np.shape(mask) != shape:
        raise ValueError(f"{where}: mask {np.shape(mask)} must match targets {shape}")
    return check_label_smoothing(label_smoothing, where)


def check_label_smoothing(label_smoothing: float | Array, where: str) -> float | Array:
    """Check that ``label_smoothing`` is a scalar in ``[0, 1)`` (when concrete); return it as
    a Python float, or as the tracer it is. (A concrete JAX scalar compared inside a trace,
    as under the caller's ``jit`` or in a chunk, would give a tracer that no ``if`` can
    test.)"""
    if np.ndim(label_smoothing) != 0:  # (known under jit too: a [V] eps would broadcast)
        raise ValueError(
            f"{where}: label_smoothing must be a scalar, got shape {np.shape(label_smoothing)}"
        )
    if isinstance(label_smoothing, jax.core.Tracer):
        return label_smoothing
    try:
        eps = float(label_smoothing)  # (None, a string: float()'s message named nothing)
    except (TypeError, ValueError):
        eps = math.nan  # refused below, by name, as the dropout rate's check does
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1), got {label_smoothing}")
    return eps


def _token_losses(logits: Array, targets: Array, label_smoothing: float | Array) -> Array:
    """Each token's loss ``-sum_v p(v) log softmax(logits)_v``: ``[..., V] -> [...]``, in
    float32 (float64 for float64 logits)."""
    logits = logits.astype(float32_or_wider(logits.dtype))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [...]
    # A traced target outside [0, V) cannot be refused: >= V gave NaN, but a negative one
    # (-1, or PyTorch's -100 "ignore" label) wrapped to a real token, a silently wrong loss.
    # NaN for both; an uncounted one is dropped by _counted_losses' where, gradient too.
    # (V compared in a narrow dtype wraps: uint8 targets < 256 were all False, all NaN.)
    vocab = logits.shape[-1]
    in_vocab = targets >= 0
    if not jnp.issubdtype(targets.dtype, jnp.integer) or jnp.iinfo(targets.dtype).max >= vocab:
        in_vocab = in_vocab & (targets < vocab)
    losses = jnp.where(in_vocab, losses, jnp.nan)
    if isinstance(label_smoothing, jax.core.Tracer) or label_smoothing > 0.0:
        # -sum_v p(v) log q(v) = (1 - eps) * nll + eps * mean_v(-log q(v)). Not through
        # optax.smooth_labels: its 0 * log q(v) is NaN where a logit is -inf (a vocab entry
        # the model may never emit), which a traced eps of 0 must not turn into a NaN loss.
        eps = jnp.asarray(label_smoothing, logits.dtype)
        uniform = -jnp.mean(jax.nn.log_softmax(logits), axis=-1)  # [...]
        # where, twice: eps * inf is NaN at eps = 0, and so would be its gradient in eps.
        uniform = jnp.where(eps > 0.0, uniform, 0.0)
        losses = (1.0 - eps) * losses + eps * uniform
    return losses


def _counted_losses(
    logits: Array, targets: Array, mask: Array, label_smoothing: float | Array
) -> tuple[Array, Array]:
    """``(sum of the counted tokens' losses, number counted)`` in the losses' dtype, for
    ``logits: [..., V]``, ``targets, mask: [...]``; mask nonzero = counted."""
    counted = mask.astype(bool)
    # An uncounted row's logits never reach the loss, nor (as NaN) its gradient: a row of
    # all -inf gives NaN in log_softmax's backward even under a zero cotangent.
    logits = jnp.where(counted[..., None], logits, jnp.zeros_like(logits))
    # Nor its target: a -100 "ignore" label made a NaN loss (dropped by the where below),
    # which jax.debug_nans reported as an error in the user's model.
    targets = jnp.where(counted, targets, jnp.zeros_like(targets))
    losses = _token_losses(logits, targets, label_smoothing)  # [...]
    # where, not losses * counted: an uncounted token's loss may be inf (its target's
    # logit is -inf, e.g. a pad target the model never predicts) and inf * 0 = NaN.
    total = jnp.sum(jnp.where(counted, losses, 0.0))
    return total, jnp.sum(counted.astype(losses.dtype))
