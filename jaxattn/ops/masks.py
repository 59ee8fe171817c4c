"""Attention masks and a softmax that respects them.

Every mask here is boolean with **True = attend** (the convention of
``jax.nn.dot_product_attention``; PyTorch's ``key_padding_mask`` is the opposite).

Shape glossary: B batch, T query time, S key time, N heads.

A query row that may attend to nothing (a padded query, or a cached decode step whose keys
are all padding) is legal: ``masked_softmax`` gives it all-zero probabilities and zero,
finite gradients, so the attention output there is 0 instead of NaN or a uniform average.

Attention dropout draws its mask from a counter-based hash of each entry's (row, key)
position (``attention_dropout_keep``), not from a stream over the array's shape, so any tile
of the ``[B, N, T, S]`` mask can be rebuilt on its own: the blockwise kernel regenerates its
tiles in the backward pass, and every implementation drops the same entries for one key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

from jaxattn.ops._checks import check_size
from jaxattn.ops.layers import (
    as_array,
    check_dropout_rate,
    float32_or_wider,
    ids_to_check,
    to_rank,
)

Array = jax.Array
DType = jnp.dtype | type | str


def causal_mask(q_len: int, kv_len: int | None = None, *, dtype: DType = bool) -> Array:
    """Build a causal mask whose queries are the last ``q_len`` key positions.

    ``mask[i, j] = j <= i + (S - T)``: query ``i`` sits at key position ``i + S - T`` (as in
    cached decoding, where T new tokens follow S - T cached ones) and may see itself and the
    past. For ``T == S`` this is the usual lower triangle. If ``S < T`` the first ``T - S``
    queries see nothing.

    Args:
      q_len: T, the number of queries.
      kv_len: S, the number of keys (default ``q_len``).
      dtype: the result's dtype.

    Returns:
      ``[1, 1, T, S]``, True where attention is allowed.
    """
    # Python ints: jnp.arange(2.5) would silently give 3 queries, None a bare TypeError.
    q_len = check_size(q_len, "q_len", "causal_mask", minimum=0)
    kv_len = q_len if kv_len is None else check_size(kv_len, "kv_len", "causal_mask", minimum=0)
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)  # [T, 1] absolute positions
    k_pos = jnp.arange(kv_len)[None, :]  # [1, S]
    return (k_pos <= q_pos).astype(dtype)[None, None]  # [1, 1, T, S]


def check_local_window(local_window_size, where: str) -> tuple[int, int] | None:
    """Normalise ``local_window_size`` to ``(left, right)`` ints >= 0, or None.

    An int w means ``(w, w)``, as in ``jax.nn.dot_product_attention``. Python ints only
    (the window is static: it decides which blocks a kernel skips).
    """
    if local_window_size is None:
        return None
    sizes = local_window_size
    if not isinstance(sizes, (tuple, list)):
        sizes = (sizes, sizes)
    ok = len(sizes) == 2 and all(
        isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0 for w in sizes
    )
    if not ok:
        raise ValueError(
            f"{where}: local_window_size must be an int >= 0 or a pair (left, right) of "
            f"them, got {local_window_size!r}"
        )
    return int(sizes[0]), int(sizes[1])


def local_window_mask(q_len: int, kv_len: int, left: int, right: int) -> Array:
    """Build a sliding-window mask whose queries are the last ``q_len`` key positions.

    ``mask[i, j] = -right <= (i + S - T) - j <= left``: query ``i``, at key position
    ``i + S - T`` as in ``causal_mask``, sees itself, ``left`` keys before it and ``right``
    after it. For ``T == S`` this is ``jax.nn.dot_product_attention``'s
    ``local_window_size=(left, right)``; with ``is_causal`` only ``left`` matters.

    Args:
      q_len: T, the number of queries.
      kv_len: S, the number of keys.
      left, right: ints >= 0, the keys seen before and after each query.

    Returns:
      ``[1, 1, T, S]`` booleans, True where attention is allowed.
    """
    # Python ints, as in causal_mask: q_len=2.5 gave 3 queries at fractional positions, and
    # a negative side an all-False mask (dot_product_attention refuses such a window).
    q_len = check_size(q_len, "q_len", "local_window_mask", minimum=0)
    kv_len = check_size(kv_len, "kv_len", "local_window_mask", minimum=0)
    left = check_size(left, "left", "local_window_mask", minimum=0)
    right = check_size(right, "right", "local_window_mask", minimum=0)
    q_pos = jnp.arange(q_len) + (kv_len - q_len)  # [T] absolute positions
    return window_visible(q_pos, jnp.arange(kv_len), left, right)[None, None]  # [1, 1, T, S]


def window_visible(q_positions: Array, k_positions: Array, left: int, right: int) -> Array:
    """``[T, S]``: True where key position ``k`` lies in ``[q - left, q + right]`` of query
    position ``q``. ``q_positions: [T]``, ``k_positions: [S]`` (e.g. KV-cache slots).

    A side beyond int32's range hides nothing: it is clipped to it (``2**31`` or
    ``sys.maxsize`` for "unbounded" raised an OverflowError naming nothing against the
    int32 offsets, where the blockwise kernel takes it)."""
    limit = int(np.iinfo(np.int32).max)
    left, right = (min(w, limit) if isinstance(w, (int, np.integer)) else w for w in (left, right))
    offset = q_positions[:, None] - k_positions[None, :]  # [T, S] how far back the key is
    return (offset <= left) & (offset >= -right)


def padding_mask(lengths: Array, max_len: int) -> Array:
    """Mark the first ``lengths[b]`` positions of each sequence as real tokens.

    ``mask[b, t] = t < lengths[b]``.

    Args:
      lengths: ``[B]`` integer lengths in ``[0, max_len]`` (checked when concrete).
      max_len: the padded length.

    Returns:
      ``[B, max_len]``, True for real tokens.
    """
    # Checked before jnp.asarray: with 64-bit types off it wraps an int64 2**32 + 3 to 3.
    lengths = ids_to_check(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"padding_mask: lengths must have shape [B], got {lengths.shape}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"padding_mask: lengths must be integers, got dtype {lengths.dtype}")
    max_len = check_size(max_len, "max_len", "padding_mask", minimum=0)  # (2.5: 3 columns)
    lengths = check_lengths(lengths, lengths.shape[0], max_len, "padding_mask")
    # Compare in int32: positions in a narrow dtype (uint8 lengths, max_len 300) would wrap.
    positions = jnp.arange(max_len, dtype=jnp.int32)
    return positions[None, :] < lengths[:, None].astype(jnp.int32)  # [B, max_len]


def check_lengths(
    lengths: Any,
    batch: int,
    steps: int,
    where: str,
    *,
    least: int = 0,
    name: str = "lengths",
    bound: str = "T",
) -> Array:
    """Return ``lengths`` as a JAX array; raise unless they are ``[B]`` integers in
    ``[least, steps]`` (checked when concrete).

    Checked before ``jnp.asarray``, which (64-bit types off) would wrap an int64 2**32 + 3
    to 3 (see ``ids_to_check``); lists and tuples are taken. Under ``jit`` the values are
    unknown and only the shape and dtype are checked; the data pipelines validate lengths
    when they build batches. ``name`` and ``bound`` label the values and ``steps`` in the
    error (``start must lie in [0, S-1=5]``).
    """
    lengths = ids_to_check(lengths)
    if jnp.shape(lengths) != (batch,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(
            f"{where}: {name} must be integers of shape [B] = ({batch},), got "
            f"{jnp.result_type(lengths)} {jnp.shape(lengths)}"
        )
    if not isinstance(lengths, jax.core.Tracer) and batch > 0:
        host = np.asarray(lengths)  # numpy: jnp ops on a closed-over array would trace
        lo, hi = int(host.min()), int(host.max())
        if lo < least or hi > steps:
            raise ValueError(
                f"{where}: {name} must lie in [{least}, {bound}={steps}], got [{lo}, {hi}]"
            )
    return jnp.asarray(lengths)


def attention_mask(q_valid: Array | None, kv_valid: Array) -> Array:
    """Combine query and key padding into a mask over (query, key) pairs.

    ``mask[b, 0, t, s] = q_valid[b, t] and kv_valid[b, s]``.

    Args:
      q_valid: ``[B, T]`` True for real queries, or None (every query is real).
      kv_valid: ``[B, S]`` True for real keys.

    Returns:
      ``[B, 1, T, S]`` (``[B, 1, 1, S]`` when ``q_valid`` is None), True = attend.
    """
    kv_valid = as_bool_mask(kv_valid, "kv_valid")
    if kv_valid.ndim != 2:
        raise ValueError(f"attention_mask: kv_valid must have shape [B, S], got {kv_valid.shape}")
    mask = kv_valid[:, None, None, :]  # [B, 1, 1, S]
    if q_valid is None:
        return mask
    q_valid = as_bool_mask(q_valid, "q_valid")
    if q_valid.ndim != 2 or q_valid.shape[0] != kv_valid.shape[0]:
        raise ValueError(
            f"attention_mask: q_valid must have shape [B, T] with B={kv_valid.shape[0]}, "
            f"got {q_valid.shape} (kv_valid {kv_valid.shape})"
        )
    return jnp.logical_and(q_valid[:, None, :, None], mask)  # [B, 1, T, S]


def as_bool_mask(mask: Array, name: str, where: str = "attention_mask") -> Array:
    """``mask`` (True = attend) as bool; 0/1 integers are read as booleans. A float mask is
    refused, naming ``where: name``: an additive mask (0 = attend, -inf = hide) would be
    read the other way round."""
    mask = jnp.asarray(mask)
    if jnp.issubdtype(mask.dtype, jnp.floating):
        raise ValueError(
            f"{where}: {name} must be boolean (True = attend), got {mask.dtype}: an additive "
            "float mask (0 = attend, -inf = hide) would be read inverted (attention takes one "
            "as bias=)"
        )
    return mask.astype(bool)


def combine_masks(*masks: Array | None) -> Array | None:
    """AND boolean masks together with broadcasting, skipping None.

    Integer 0/1 masks are read as booleans; float masks are refused, since an additive
    float mask (0 = attend, -inf = hide) would be read the other way round.

    Returns:
      The broadcast logical AND, or None if every mask is None.
    """
    present = [as_bool_mask(m, "masks", "combine_masks") for m in masks if m is not None]
    if not present:
        return None
    try:
        np.broadcast_shapes(*(m.shape for m in present))
    except ValueError:
        shapes = ", ".join(str(m.shape) for m in present)
        raise ValueError(f"combine_masks: shapes do not broadcast: {shapes}") from None
    # Ranks made equal first: an implicit rank promotion is an error under
    # jax.numpy_rank_promotion("raise"), and the broadcasting is this function's promise.
    ndim = max(m.ndim for m in present)
    out = to_rank(present[0], ndim)
    for m in present[1:]:
        out = jnp.logical_and(out, to_rank(m, ndim))
    return out


def check_mask(mask: Array, shape: tuple[int, ...], where: str) -> Array:
    """``mask`` as an array, after checking that it is boolean and broadcasts to ``shape``
    (the scores'); ``where`` names the public function in the message."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"{where}: mask must be boolean, got dtype {mask.dtype}")
    try:
        broadcast = np.broadcast_shapes(mask.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(f"{where}: mask {mask.shape} does not broadcast to scores {tuple(shape)}")
    return mask


def masked_softmax(scores: Array, mask: Array | None = None, axis: int = -1) -> Array:
    """Softmax over ``axis`` in float32 (float64 for float64 scores) that ignores masked
    entries.

    ``p_j = mask_j exp(x_j - m) / sum_k mask_k exp(x_k - m)`` with ``m`` the row max; a row
    with no unmasked entry gives all zeros (not NaN, not uniform) and zero, finite gradients.

    Args:
      scores: ``[..., S]`` logits (any float dtype).
      mask: boolean, broadcastable to ``scores.shape``; True = attend. None = no mask.
      axis: the axis to normalise over.

    Returns:
      Probabilities with ``scores``' shape, in ``float32_or_wider(scores.dtype)``.
    """
    scores = as_array(scores, "scores", "masked_softmax")
    x = scores.astype(float32_or_wider(scores.dtype))
    if mask is not None:
        mask = check_mask(mask, x.shape, "masked_softmax")
    if x.shape[axis] == 0:  # no keys at all: an empty result, as jax.nn.softmax gives
        return x
    # The max over visible entries only, so huge masked logits cannot dominate it. Masked
    # entries are then shifted to 0 and their exp zeroed, never set to -inf: an inf (or
    # -inf - -inf = NaN) made by the mask itself was a false alarm under jax.debug_infs,
    # and zeroing after the exp keeps visible logits at float32's min (a bias) exact.
    visible = x if mask is None else jnp.where(mask, x, jnp.finfo(x.dtype).min)
    row_max = jax.lax.stop_gradient(jnp.max(visible, axis=axis, keepdims=True))
    # A row whose visible logits are all -inf would give -inf - -inf = NaN: exp(-inf) = 0.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    if mask is not None:
        x = jnp.where(mask, x, row_max)
    e = jnp.exp(x - row_max)
    if mask is not None:
        e = jnp.where(mask, e, 0.0)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def dropout_seed(rng: Array) -> Array:
    """The two uint32 words ``attention_dropout_keep`` hashes with, drawn from a PRNG key
    (typed or raw, any implementation): ``[2]`` uint32."""
    return jax.random.bits(rng, (2,), jnp.uint32)


def attention_dropout_keep(
    seed: Array,
    rows: Array,
    first_col,
    num_cols: int,
    rate: float,
    *,
    col_axis: int = -1,
    even_start: bool | None = None,
) -> Array:
    """Which attention entries survive dropout, for a block of rows and contiguous keys.

    Entry ``(row, col)`` is kept iff word ``col % 2`` of ``threefry2x32(seed, (row, col //
    2))`` is at least ``rate · 2^32``: a pure function of the position, so a tile computed
    alone matches the same entries of the whole mask, and each hash serves two neighbouring
    keys. ``row`` numbers the rows of ``[B, N, T, S]`` as ``(b N + n) T + t`` (modulo
    2^32); ``attention_dropout_mask`` builds the whole mask this way.

    Args:
      seed: ``[2]`` uint32 (``dropout_seed``).
      rows: ``[R]`` integer row numbers.
      first_col: the first key's index (an int or a traced scalar).
      num_cols: C, the number of keys.
      rate: drop probability in ``[0, 1)``.
      col_axis: where the key axis goes: -1 gives ``[R, C]``, 0 gives ``[C, R]``.
      even_start: the caller knows ``first_col`` is even (a traced block start), which
        saves the hashes of one extra column pair. None: known only for an int.

    Returns:
      Boolean, True = keep, ``[R, C]`` (or ``[C, R]``).
    """
    check_dropout_rate(rate, "attention_dropout_keep: rate")
    if col_axis not in (0, -1):
        raise ValueError(f"attention_dropout_keep: col_axis must be 0 or -1, got {col_axis!r}")
    if even_start is None:
        even_start = isinstance(first_col, int) and first_col % 2 == 0
    rows = jnp.asarray(rows).astype(jnp.uint32)
    first = jnp.asarray(first_col).astype(jnp.uint32)
    # float: a JAX scalar rate would keep round()'s result an array, and min() would then
    # parse 2^32 - 1 as an int32 (OverflowError).
    threshold = jnp.uint32(min(round(float(rate) * 2.0**32), 2**32 - 1))
    # The column pairs C keys can touch: one more when the start may be odd.
    pairs = -(-num_cols // 2) + (0 if even_start else 1)
    pair_ids = first // 2 + jnp.arange(pairs, dtype=jnp.uint32)
    key_axis = 0 if col_axis == 0 else 1
    row_ids, pair_ids = (
        (rows[None, :], pair_ids[:, None]) if key_axis == 0 else (rows[:, None], pair_ids[None, :])
    )
    row_ids, pair_ids = jnp.broadcast_arrays(row_ids, pair_ids)
    # Under vmap, threefry2x32's batching rule gives an unbatched counter size-1 batch axes,
    # which its CPU lowering cannot broadcast: tie both counters to each other and to the
    # seed, so that each carries every batch axis (over heads, tile starts or keys). The
    # seed's words stay scalars. (``zeros_like`` would stay unbatched.)
    zero = seed[0] * jnp.uint32(0) + seed[1] * jnp.uint32(0)
    row_ids, pair_ids = (
        row_ids + pair_ids * jnp.uint32(0) + zero,
        pair_ids + row_ids * jnp.uint32(0) + zero,
    )
    even, odd = threefry2x32_p.bind(seed[0], seed[1], row_ids, pair_ids)
    # Interleave the two words along the key axis: key 2c takes word 0, key 2c + 1 word 1.
    bits = jnp.stack([even, odd], axis=key_axis + 1)  # [P, 2, R] or [R, P, 2]
    r = rows.shape[0]  # (not -1: with num_cols = 0 there are no pairs to divide by)
    bits = bits.reshape((2 * pairs, r) if key_axis == 0 else (r, 2 * pairs))
    if even_start:
        bits = jax.lax.slice_in_dim(bits, 0, num_cols, axis=key_axis)
    else:  # an odd first key starts at the second word of its pair
        bits = jax.lax.dynamic_slice_in_dim(bits, first % 2, num_cols, axis=key_axis)
    return bits >= threshold


def dropout_scale(keep: Array, rate: float, dtype: Any = jnp.float32) -> Array:
    """The multiplier of the probabilities under a dropout mask: ``1 / (1 - rate)`` where
    ``keep``, else 0 (in ``dtype``, the probabilities' float32 or float64; ``keep``'s
    shape). One formula for every attention path, so that they agree to the bit."""
    check_dropout_rate(rate, "dropout_scale: rate")
    dtype = jnp.dtype(dtype)
    return jnp.where(keep, dtype.type(1.0 / (1.0 - float(rate))), dtype.type(0.0))


def attention_dropout_mask(seed: Array, shape: tuple[int, int, int, int], rate: float) -> Array:
    """The whole dropout mask ``[B, N, T, S]`` (True = keep) that ``attention_dropout_keep``
    builds tile by tile."""
    b, n, t, s = shape
    rows = jnp.arange(b * n * t, dtype=jnp.uint32)
    return attention_dropout_keep(seed, rows, 0, s, rate).reshape(shape)
