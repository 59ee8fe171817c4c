"""Attention: seq2seq scores, scaled dot-product attention and multi-head attention.

Shape glossary: B batch, T query time, S key time, N query heads, K key/value heads
(``N % K == 0``), G = N // K query heads per key/value head, H head dim, D model dim
(Dq for queries, Dkv for keys/values, Dout for the output).

Seq2seq scores (one query sequence against one key sequence, any leading axes ``...``):

- dot (Luong et al., 2015, "Effective Approaches to Attention-based NMT"): ``q · k``;
- general (Luong et al., 2015): ``q W kᵀ``;
- additive (Bahdanau et al., 2015, "Neural Machine Translation by Jointly Learning to
  Align and Translate"): ``v · tanh(q W_q + k W_k)``;

and ``attend`` turns scores into ``weights = softmax(scores)`` and ``context = weights V``.

Scaled dot-product attention (Vaswani et al., 2017, "Attention Is All You Need"):
``softmax(scale · Q Kᵀ + bias, masked) V`` with ``scale = 1/sqrt(H)``, per head, in the
``[B, T, N, H]`` layout of ``jax.nn.dot_product_attention``. With K < N key/value heads
(grouped-query attention, Ainslie et al., 2023, "GQA: Training Generalized Multi-Query
Transformer Models from Multi-Head Checkpoints"; K = 1 is multi-query attention) query head
n reads key/value head ``n // (N // K)``.

Masks are boolean with True = attend (see ``jaxattn.ops.masks``); a query with nothing to
attend to gets a zero output and finite gradients, never NaN. Causal masks treat the T
queries as the last T of the S key positions (cached decoding), and so do sliding windows
(``local_window_size``, as in ``jax.nn.dot_product_attention``; Beltagy et al., 2020,
"Longformer"; Jiang et al., 2023, "Mistral 7B").
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops._checks import (
    check_flag,
    check_float_dtype,
    check_floating_array,
    check_int_scalar,
    check_size,
    check_weight_arrays,
)
from jaxattn.ops.flash import (
    as_qkv,
    check_attention_dropout,
    check_attention_inputs,
    check_scale,
    flash_attention,
    fold_traced_scale,
)
from jaxattn.ops.layers import (
    as_array,
    as_floating,
    check_dropout_key,
    check_dropout_rate,
    check_floating,
    check_token_ids,
    float32_or_wider,
    normal,
    project,
)
from jaxattn.ops.masks import (
    attention_dropout_mask,
    causal_mask,
    check_local_window,
    check_mask,
    combine_masks,
    dropout_scale,
    dropout_seed,
    local_window_mask,
    masked_softmax,
    window_visible,
)

Array = jax.Array
DType = jnp.dtype | type | str

# ----------------------------------------------------------------------------------------
# Seq2seq scores
# ----------------------------------------------------------------------------------------


def _check_qk(name: str, query: Array, keys: Array) -> tuple[Array, Array]:
    """``(query, keys)`` as ``as_floating`` gives them (a nested list failed as "'list'
    object has no attribute 'ndim'"; integer ones gave integer scores), checked as a
    score function's ``[..., Tq, dq]`` and ``[..., Tk, dk]``."""
    query, keys = as_floating(query, "query", name), as_floating(keys, "keys", name)
    if query.ndim < 2 or keys.ndim < 2:
        raise ValueError(
            f"{name}: query [..., Tq, dq] and keys [..., Tk, dk] need rank >= 2, got "
            f"{query.shape} and {keys.shape}"
        )
    try:  # (else einsum's or add's message, naming neither argument)
        np.broadcast_shapes(query.shape[:-2], keys.shape[:-2])
    except ValueError:
        raise ValueError(
            f"{name}: the leading axes of query {query.shape} and keys {keys.shape} do not "
            "broadcast"
        ) from None
    return query, keys


def dot_scores(query: Array, keys: Array, *, scale: float | None = None) -> Array:
    """Score each query against each key by a dot product: ``s_ij = scale · q_i · k_j``.

    Args:
      query: ``[..., Tq, d]``.
      keys: ``[..., Tk, d]``.
      scale: optional multiplier (e.g. ``1/sqrt(d)``), a finite real scalar; None =
        unscaled (Luong's "dot").

    Returns:
      ``[..., Tq, Tk]``.
    """
    query, keys = _check_qk("dot_scores", query, keys)
    check_scale(scale, "dot_scores")  # (NaN gave NaN scores; "0.5" an einsum index error)
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"dot_scores: feature dims differ: query {query.shape}, keys {keys.shape}")
    scores = jnp.einsum("...qd,...kd->...qk", query, keys)  # [..., Tq, Tk]
    return scores if scale is None else scores * scale


def init_general(
    rng: Array,
    query_dim: int,
    key_dim: int,
    *,
    std: float | None = None,
    dtype: DType = jnp.float32,
) -> Array:
    """Initialise Luong's "general" bilinear matrix ``W: [dq, dk] ~ N(0, std^2)``.

    ``std`` defaults to ``1/sqrt(dq)``.
    """
    check_float_dtype(dtype, "init_general")
    query_dim = check_size(query_dim, "query_dim", "init_general")  # (not a math error)
    key_dim = check_size(key_dim, "key_dim", "init_general")
    std = 1.0 / math.sqrt(query_dim) if std is None else std
    return normal(rng, (query_dim, key_dim), std, dtype)


def general_scores(w: Array, query: Array, keys: Array) -> Array:
    """Score with a learned bilinear form: ``s_ij = q_i W k_jᵀ`` (Luong et al., 2015).

    Args:
      w: ``[dq, dk]``.
      query: ``[..., Tq, dq]``.
      keys: ``[..., Tk, dk]``.

    Returns:
      ``[..., Tq, Tk]``.
    """
    query, keys = _check_qk("general_scores", query, keys)
    check_floating_array(w, "w", "general_scores")  # (an integer one ran silently)
    if w.ndim != 2 or w.shape != (query.shape[-1], keys.shape[-1]):
        raise ValueError(
            f"general_scores: w must be [dq, dk] = {(query.shape[-1], keys.shape[-1])}, got "
            f"{w.shape} (query {query.shape}, keys {keys.shape})"
        )
    return dot_scores(project(query, w), keys)  # [..., Tq, Tk]


class AdditiveWeights(NamedTuple):
    """Bahdanau attention. ``w_query: [dq, d]``, ``w_key: [dk, d]``, ``v: [d]``."""

    w_query: Array
    w_key: Array
    v: Array


def init_additive(
    rng: Array, query_dim: int, key_dim: int, hidden_dim: int, *, dtype: DType = jnp.float32
) -> AdditiveWeights:
    """Initialise additive attention with ``N(0, 1/fan_in)`` entries."""
    check_float_dtype(dtype, "init_additive")
    sizes = dict(query_dim=query_dim, key_dim=key_dim, hidden_dim=hidden_dim)
    query_dim, key_dim, hidden_dim = (check_size(v, k, "init_additive") for k, v in sizes.items())
    rng_q, rng_k, rng_v = jax.random.split(rng, 3)
    return AdditiveWeights(
        normal(rng_q, (query_dim, hidden_dim), 1 / math.sqrt(query_dim), dtype),
        normal(rng_k, (key_dim, hidden_dim), 1 / math.sqrt(key_dim), dtype),
        normal(rng_v, (hidden_dim,), 1 / math.sqrt(hidden_dim), dtype),
    )


def additive_scores(weights: AdditiveWeights, query: Array, keys: Array) -> Array:
    """Score with a one-hidden-layer MLP: ``s_ij = v · tanh(q_i W_q + k_j W_k)``.

    (Bahdanau et al., 2015.) Keys are projected once, not once per query.

    Args:
      weights: ``AdditiveWeights(w_query [dq, d], w_key [dk, d], v [d])``.
      query: ``[..., Tq, dq]``.
      keys: ``[..., Tk, dk]``.

    Returns:
      ``[..., Tq, Tk]``.
    """
    # (A bare tuple failed as "'tuple' object has no attribute 'v'"; an integer v ran.)
    check_weight_arrays(weights, AdditiveWeights, "init_additive", "additive_scores")
    query, keys = _check_qk("additive_scores", query, keys)
    d = weights.v.shape[-1] if weights.v.ndim == 1 else None
    if d is None or weights.w_query.shape[-1] != d or weights.w_key.shape[-1] != d:
        raise ValueError(
            f"additive_scores: inconsistent weights w_query {weights.w_query.shape}, "
            f"w_key {weights.w_key.shape}, v {weights.v.shape}"
        )
    if weights.w_query.shape != (query.shape[-1], d) or weights.w_key.shape != (keys.shape[-1], d):
        raise ValueError(
            f"additive_scores: w_query must be [dq, d] = {(query.shape[-1], d)} and w_key "
            f"[dk, d] = {(keys.shape[-1], d)}, got w_query {weights.w_query.shape}, w_key "
            f"{weights.w_key.shape} (query {query.shape}, keys {keys.shape})"
        )
    q = project(query, weights.w_query)[..., :, None, :]  # [..., Tq, 1, d]
    k = project(keys, weights.w_key)[..., None, :, :]  # [..., 1, Tk, d]
    return jnp.tanh(q + k) @ weights.v.astype(q.dtype)  # [..., Tq, Tk]


def attend(scores: Array, values: Array, mask: Array | None = None) -> tuple[Array, Array]:
    """Normalise scores and average the values: ``w = softmax(s)``, ``c_i = sum_j w_ij v_j``.

    Args:
      scores: ``[..., Tq, Tk]``.
      values: ``[..., Tk, dv]``.
      mask: boolean, broadcastable to ``scores``; True = attend.

    Returns:
      ``(context [..., Tq, dv]`` in ``values``' dtype, ``weights [..., Tq, Tk]`` float32, or
      float64 for float64 scores).
    """
    # (NumPy float64: no warning; a None named)
    scores, values = as_array(scores, "scores", "attend"), as_array(values, "values", "attend")
    if scores.ndim < 2 or values.ndim < 2 or scores.shape[-1] != values.shape[-2]:
        raise ValueError(
            f"attend: scores [..., Tq, Tk] and values [..., Tk, dv] disagree: scores "
            f"{scores.shape}, values {values.shape}"
        )
    # The probabilities are cast to the values' dtype: integers would truncate them to 0.
    check_floating(scores, "scores", "attend")
    check_floating(values, "values", "attend")
    if mask is not None:
        mask = check_mask(mask, scores.shape, "attend")
    weights = masked_softmax(scores, mask)  # [..., Tq, Tk]
    context = jnp.einsum("...qk,...kd->...qd", weights.astype(values.dtype), values)
    return context, weights


# ----------------------------------------------------------------------------------------
# Scaled dot-product attention, [B, T, N, H] layout
# ----------------------------------------------------------------------------------------

IMPLEMENTATIONS = ("xla", "cudnn", "blockwise", "pallas")
DROPOUT_IMPLEMENTATIONS = ("xla", "blockwise")  # the kernels that take attention dropout


def head_rows(x: Array) -> Array:
    """``[B, S, K, H]`` -> ``[B*K, S, H]``: keys or values as one row block per (batch, key/value
    head), batch-major.

    The einsum path's batched products take this layout as it is. A per-layer KV cache
    (``gpt.unstack_layers``) is kept in it, so that a decoding step reads the cache with
    no transposing copy: in ``[B, S, K, H]`` XLA:CPU copied each layer's keys and values
    into it on every token (8 of the 4-layer Shakespeare model's ~170 operations per token,
    about a fifth of its time; benchmarks/LOG.md, "Session 44").
    """
    if jnp.ndim(x) != 4:  # (a bare unpacking error named neither the function nor the shape)
        raise ValueError(f"head_rows: x must be [B, S, K, H], got shape {jnp.shape(x)}")
    b, s, kh, h = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * kh, s, h)


def from_head_rows(x: Array, batch_size: int) -> Array:
    """``[B*K, S, H]`` -> ``[B, S, K, H]``, the inverse of ``head_rows``."""
    batch_size = check_size(batch_size, "batch_size", "from_head_rows")
    if jnp.ndim(x) != 3 or x.shape[0] % batch_size:  # (was a reshape error, or 1 / 0)
        raise ValueError(
            f"from_head_rows: x must be [B*K, S, H] with B = batch_size = {batch_size} "
            f"dividing its rows, got shape {jnp.shape(x)}"
        )
    r, s, h = x.shape
    return x.reshape(batch_size, r // batch_size, s, h).transpose(0, 2, 1, 3)


def _probs(q, k, mask, bias, is_causal, scale) -> Array:
    """The one formula: ``softmax(scale q kᵀ + bias, mask)`` -> float32 ``[B, N, T, S]``
    (float64 for float64 inputs). ``k``: ``[B, S, K, H]``, or ``head_rows`` ``[B*K, S, H]``."""
    b, t, n, h = q.shape
    s = k.shape[1]
    # Accumulate in float32 even for bf16 inputs; softmax needs the precision.
    wide = float32_or_wider(q.dtype)
    if k.ndim == 3:
        # Head rows: the G * T queries of each key/value head (head n = k * G + g) form one
        # row block, and the product reads the keys as they are.
        kh = k.shape[0] // b
        q_rows = q.reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4).reshape(b * kh, -1, h)
        logits = jnp.einsum("rmh,rsh->rms", q_rows, k, preferred_element_type=wide)
    elif n == k.shape[2]:
        # No group axis: XLA:CPU runs this ~20% faster (fwd+bwd) than the same product
        # with a size-1 group axis, and it is the common case.
        logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=wide)
    else:
        # GQA groups the query heads instead of repeating k/v in memory: head n = k * G + g.
        qg = q.reshape(b, t, k.shape[2], -1, h)  # [B, T, K, G, H]
        logits = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=wide)
    logits = logits.reshape(b, n, t, s)  # [B, N, T, S]
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    logits = logits * jnp.asarray(scale, wide)  # [B, N, T, S]
    if bias is not None:
        logits = logits + bias.astype(wide)
    mask = combine_masks(mask, causal_mask(t, s) if is_causal else None)
    return masked_softmax(logits, mask)  # [B, N, T, S]


def _attention_xla_core(q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng):
    """Reference einsum path -> (out ``[B, T, N, Hv]``, pre-dropout probs ``[B, N, T, S]``).

    ``k``, ``v``: ``[B, S, K, H]``, or both as ``head_rows``, ``[B*K, S, H]``."""
    b, t, n, _ = q.shape
    s, hv = v.shape[1], v.shape[-1]  # (axis 1 is S in both layouts)
    kh = v.shape[0] // b if v.ndim == 3 else v.shape[2]
    probs = _probs(q, k, mask, bias, is_causal, scale)  # [B, N, T, S]
    p = probs
    if dropout_rate > 0.0:  # the blockwise kernel's mask, built whole (masks.py)
        keep = attention_dropout_mask(dropout_seed(dropout_rng), probs.shape, dropout_rate)
        p = probs * dropout_scale(keep, dropout_rate, probs.dtype)
    p = p.astype(v.dtype)
    if v.ndim == 3:
        out = jnp.einsum("rms,rsh->rmh", p.reshape(b * kh, -1, s), v)  # [B*K, G*T, Hv]
        out = out.reshape(b, kh, -1, t, hv).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, Hv]
    elif n == kh:
        return jnp.einsum("bnts,bsnh->btnh", p, v), probs  # [B, T, N, Hv]
    else:
        pg = p.reshape(b, kh, n // kh, t, s)  # [B, K, G, T, S]
        out = jnp.einsum("bkgts,bskh->btkgh", pg, v)  # [B, T, K, G, Hv]
    return out.reshape(b, t, n, hv), probs  # [B, T, N, Hv]


def _attention_xla(q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng):
    return _attention_xla_core(q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng)[0]


def _cudnn_fill(dtype) -> float:
    """The bias cuDNN gets on hidden keys: jax's own fill for a mask (-2^41 in bfloat16,
    -2^15 in float16; jax's workaround for a cuDNN bug with two large negative values)."""
    return -(2.0**15) if dtype == jnp.float16 else -(2.0**41)


# Where cuDNN's bias is clipped (see _cudnn_bias).
_CUDNN_BIAS_LIMIT = 2.0**14


def _cudnn_bias(visible: Array, bias: Array | None, t: int, s: int, dtype) -> Array:
    """A mask and a bias as the one ``[B|1, N|1, T, S]`` bias in ``dtype`` that cuDNN takes.

    The bias, clipped to ±2^14, where ``visible``; the fill elsewhere.
    ``visible`` must already hide the bias's -inf entries. Folding here rather than in jax
    keeps every hidden key below every visible one: jax adds its fill to the bias in
    ``dtype``, where it vanishes next to a bias of float32's ``finfo.min`` (Hugging Face's
    mask value), which a plain cast also rounds to -inf.

    The clip at ±2^14 keeps every hidden key below every visible one (the fill is -2^41
    in bfloat16, -2^15 in float16), and keeps cuDNN's backward exact: it recomputes the
    probabilities from the row's float32 log-sum-exp, which near a bias of 2^40 (the clip
    until 2026-12-04) has a spacing of 2^17, so a row whose keys all carried float32's
    ``finfo.min`` got the right output but a bias gradient 12x off on the H200. A bias
    below -2^14 still hides its key next to any key with an ordinary bias; a row whose
    keys all carry one gives the other kernels' result for the clipped bias (softmax of
    the logits), and a row mixing different biases beyond ±2^14 (ALiBi past 16k
    positions, say) differs from them. +inf becomes 2^14 (the other kernels give NaN);
    NaN stays NaN. The gradient passes through the clip.
    """
    fill = _cudnn_fill(dtype)
    folded = 0.0
    if bias is not None:
        bias = bias.astype(jnp.float32)
        clipped = jnp.clip(bias, -_CUDNN_BIAS_LIMIT, _CUDNN_BIAS_LIMIT)  # NaN stays
        identity = jnp.where(jnp.isfinite(bias), bias - jax.lax.stop_gradient(bias), 0.0)
        folded = jax.lax.stop_gradient(clipped) + identity  # identity: 0, gradient 1
    folded = jnp.where(visible, folded, fill)
    return jnp.broadcast_to(folded, (*folded.shape[:2], t, s)).astype(dtype)


def _attention_cudnn(q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng):
    """cuDNN fused attention via ``jax.nn.dot_product_attention`` (GPU only)."""
    del dropout_rng  # rejected earlier: dropout_rate == 0 here
    if jax.default_backend() != "gpu":
        raise ValueError(
            f'dot_product_attention: implementation="cudnn" needs a GPU, but the default '
            f"backend is {jax.default_backend()!r}; use implementation=None or 'xla'"
        )
    t, s = q.shape[1], k.shape[1]
    if is_causal and t != s:
        # cuDNN's causal mask is top-left aligned; ours puts the queries last.
        mask, is_causal = combine_masks(mask, causal_mask(t, s)), False
    if bias is not None:
        # A -inf bias hides its key, as in the other kernels (and a row of them gives 0);
        # a NaN stays visible, and its row NaN, as there.
        mask = combine_masks(mask, bias != -jnp.inf)
    # jax's cuDNN path takes masks as part of the bias, with whole T and S axes, in the
    # inputs' dtype; its own causal mask gives hidden keys float32's lowest value. (A bias
    # always comes with a mask here, from its -inf entries.)
    if mask is not None:
        bias = _cudnn_bias(mask, bias, t, s, q.dtype)
    out = jax.nn.dot_product_attention(
        q, k, v, bias, None, scale=scale, is_causal=is_causal, implementation="cudnn"
    )
    if mask is not None:
        # A row with no visible key averages its keys under the fill; the other kernels
        # give 0 there. Visible = mask and causal.
        visible = combine_masks(mask, causal_mask(t, s) if is_causal else None)
        has_key = jnp.any(visible, axis=-1)  # [B|1, N|1, T]
        out = jnp.where(jnp.transpose(has_key, (0, 2, 1))[..., None], out, jnp.zeros_like(out))
    return out


def _mask_with_window(mask, window: tuple[int, int] | None, t: int, s: int):
    """``mask`` ANDed with the window as a ``[1, 1, T, S]`` mask, for the kernels whose
    scores are dense anyway (the blockwise kernel skips tiles instead)."""
    if window is None:
        return mask
    return combine_masks(mask, local_window_mask(t, s, *window))


def _attention_blockwise(
    q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng, window=None
):
    """Blockwise online-softmax kernel (``jaxattn.ops.flash``): O(T) memory, any backend."""
    return flash_attention(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        scale=scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        local_window_size=window,
    )


def _pallas_fits(q, k, v, mask, bias, is_causal) -> bool:
    """Whether the Pallas TPU kernel computes exactly our function for these inputs.

    It takes no bias; a mask only over keys (rank-4 ``[B or 1, 1, 1, S or 1]``, as a padding
    mask is), which it gets as segment ids; GQA with its key/value heads repeated; equal
    query/value head dims, up to 128 or a multiple of 128; lengths in whole 128-row blocks;
    and a top-left causal mask (ours only if T == S).
    """
    t, h = q.shape[1], q.shape[3]
    s = k.shape[1]
    return (
        (mask is None or mask.shape[1:3] == (1, 1))
        and bias is None
        and v.shape[-1] == h
        # Its blocks of 128 keys raise NotImplementedError for H = 192, say.
        and (h <= 128 or h % 128 == 0)
        and t % 128 == 0
        and s % 128 == 0
        and (t == s or not is_causal)
    )


def _attention_pallas(q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng):
    """Pallas FlashAttention for TPU (``jax.experimental.pallas.ops.tpu.flash_attention``).

    Grouped key/value heads are repeated to N heads first (K/V memory grows N/K-fold, still
    O(S)); a mask over keys becomes the kernel's segment ids. Untested on hardware here (CI
    runs it in Pallas' TPU interpret mode on CPU).
    """
    del dropout_rate, dropout_rng  # rejected earlier: dropout_rate == 0 here
    if jax.default_backend() != "tpu":
        raise ValueError(
            f'dot_product_attention: implementation="pallas" needs a TPU, but the default '
            f"backend is {jax.default_backend()!r}; use implementation=None or 'blockwise'"
        )
    if not _pallas_fits(q, k, v, mask, bias, is_causal):
        raise ValueError(
            'dot_product_attention: implementation="pallas" needs no bias, no mask or one '
            "over keys only ([B, 1, 1, S]), equal q and v head dims up to 128 or a multiple "
            f"of 128, lengths divisible by 128 and T == S if causal; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}, mask {None if mask is None else mask.shape}, "
            f"bias={bias is not None}, is_causal={is_causal}; use implementation=None or "
            "'blockwise'"
        )
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    (b, t, n, _), (s, kh) = q.shape, k.shape[1:3]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if kh != n:  # GQA: the kernel wants one key/value head per query head
        k, v = (jnp.repeat(x, n // kh, axis=2) for x in (k, v))
    segment_ids = None
    if mask is not None:  # keys with segment 0 are hidden from every query (segment 1)
        key_visible = jnp.broadcast_to(mask[:, 0, 0, :], (b, s))
        segment_ids = tpu_flash.SegmentIds(
            q=jnp.ones((b, t), jnp.int32), kv=key_visible.astype(jnp.int32)
        )
    heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # [B, N, T, H]
    out = heads_first(
        tpu_flash.flash_attention(
            heads_first(q),
            heads_first(k),
            heads_first(v),
            segment_ids=segment_ids,
            causal=is_causal,
            sm_scale=scale,
        )
    )  # [B, T, N, H]
    if mask is not None:
        # A query that sees no key: ours outputs zeros, the kernel a mean of hidden values
        # (it masks with a finite fill). Causal with T == S: query t sees keys 0..t.
        if is_causal:
            sees_a_key = jnp.cumsum(key_visible, axis=1) > 0  # [B, T]
        else:
            sees_a_key = jnp.any(key_visible, axis=1, keepdims=True)  # [B, 1]
        out = jnp.where(sees_a_key[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out


_KERNELS = {
    "xla": _attention_xla,
    "cudnn": _attention_cudnn,
    "blockwise": _attention_blockwise,
    "pallas": _attention_pallas,
}

# CPU: blockwise wins once both T and S reach this (measured crossovers, benchmarks/README.md
# "Kernel selection"): from 384 for plain multi-head attention, from 256 with GQA, whose
# einsum path keeps a group axis that XLA:CPU runs more slowly. A sliding window does not
# move it: below 512 the blockwise tiles span the sequence, so the window skips nothing.
_CPU_BLOCKWISE_MIN_LEN = 384
_CPU_BLOCKWISE_MIN_LEN_GQA = 256
# With attention dropout the einsum path also passes a dense mask through memory: the
# blockwise kernel led from T = S = 256 (85.8 against 108.3 ms at B = 4, N = 8, H = 64,
# rate 0.1) and trailed at 128 (41.5 against 35.6 ms); benchmarks/LOG.md, "Session 24".
_CPU_BLOCKWISE_MIN_LEN_DROPOUT = 256
# Any backend: never materialise dense float32 scores larger than this.
_DENSE_SCORES_MAX_BYTES = 1 << 30


def _pallas_importable() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _select_implementation(q, k, v, mask, bias, is_causal, dropout_rate, window=None) -> str:
    """Pick the fastest kernel that computes exactly our function (``implementation=None``).

    - GPU, without dropout (which cuDNN's and Pallas' kernels do not take here):
      ``"cudnn"`` for float16/bfloat16 with equal q/v head dims, a multiple of 8 up to 128
      (cuDNN's fused kernels), and even T and S when there is a mask, bias or window
      (cuDNN's backward refuses odd lengths with one, and a ``T != S`` causal mask or a
      window is one), else as below;
    - TPU, without dropout: ``"pallas"`` when importable and ``_pallas_fits`` and there is
      no window, else as below;
    - CPU: ``"blockwise"`` when T and S are both >= ``_CPU_BLOCKWISE_MIN_LEN`` (384), or
      ``_CPU_BLOCKWISE_MIN_LEN_GQA`` (256) with grouped key/value heads, or
      ``_CPU_BLOCKWISE_MIN_LEN_DROPOUT`` (256) with dropout;
    - otherwise ``"xla"``, or ``"blockwise"`` when the dense float32 scores ``[B, N, T, S]``
      would exceed ``_DENSE_SCORES_MAX_BYTES``.
    """
    (b, t, n, h), s = q.shape, k.shape[1]
    backend = jax.default_backend()
    dropout = dropout_rate > 0.0  # cuDNN's and Pallas' kernels take none here
    if backend == "gpu" and not dropout:
        low_precision = q.dtype in (jnp.float16, jnp.bfloat16)
        # cuDNN takes a mask as a bias, and its bias gradient needs even T and S.
        biased = mask is not None or bias is not None or window is not None
        biased = biased or (is_causal and t != s)
        even = t % 2 == 0 and s % 2 == 0
        if low_precision and v.shape[-1] == h and h % 8 == 0 and h <= 128 and (even or not biased):
            return "cudnn"
    elif backend == "tpu" and not dropout and window is None:
        if _pallas_fits(q, k, v, mask, bias, is_causal) and _pallas_importable():
            return "pallas"
    elif backend == "cpu":
        min_len = _CPU_BLOCKWISE_MIN_LEN
        if k.shape[2] != n:  # grouped: the einsum path keeps a group axis
            min_len = min(min_len, _CPU_BLOCKWISE_MIN_LEN_GQA)
        if dropout:  # the einsum path passes a dense mask through memory too
            min_len = min(min_len, _CPU_BLOCKWISE_MIN_LEN_DROPOUT)
        if min(t, s) >= min_len:
            return "blockwise"
    return "blockwise" if 4 * b * n * t * s > _DENSE_SCORES_MAX_BYTES else "xla"


def _check_implementation(implementation: str, where: str) -> None:
    # (Not a str: a list failed as "unhashable type: 'list'" in the dict lookup.)
    if not isinstance(implementation, str) or implementation not in _KERNELS:
        raise ValueError(
            f"{where}: unknown implementation {implementation!r}; expected None or one of "
            f"{IMPLEMENTATIONS}"
        )


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> Array:
    """Scaled dot-product attention: ``out = softmax(scale · q kᵀ + bias, mask) v`` per head.

    (Vaswani et al., 2017; grouped-query attention, Ainslie et al., 2023.) Query head n
    reads key/value head ``n // (N // K)``. Logits and softmax are float32 (float64 for
    float64 inputs); the matmuls run in the inputs' dtype. A query row with nothing to
    attend to outputs zeros.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys, ``N % K == 0``.
      v: ``[B, S, K, Hv]`` values (same dtype as q and k).
      mask: boolean, broadcastable to ``[B, N, T, S]``; True = attend.
      bias: float, broadcastable to ``[B, N, T, S]``, added to the scaled logits. cuDNN
        takes it in the inputs' dtype, clipped to ±2^14 so that a float32 ``finfo.min``
        mask value stays finite and above the fill that cuDNN gives masked keys, and its
        backward exact (see ``_cudnn_bias``).
      is_causal: also mask key ``s > t + S - T`` (queries are the last T key positions).
      scale: logit scale, default ``1/sqrt(H)``. A traced one (a learned temperature) gets
        a gradient: ``"xla"`` and ``"blockwise"`` multiply the float32 logits by it,
        ``"cudnn"`` and ``"pallas"`` (which need a number) take ``q`` times it instead,
        rounded to q's dtype.
      implementation: None picks the fastest exact kernel for the backend and shape (see
        ``_select_implementation``: cuDNN on GPU, Pallas on TPU, blockwise on CPU for long
        sequences, else the einsum path); or one of ``"xla"`` (einsum reference, dense
        ``[B, N, T, S]`` scores), ``"blockwise"`` (``jaxattn.ops.flash``: online softmax,
        O(T) memory, any backend), ``"cudnn"`` (GPU only), ``"pallas"`` (TPU only; no
        bias, masks over keys only, T and S in whole 128-row blocks, H up to 128 or a
        multiple of 128). All support ``jax.grad``; only ``"xla"`` supports forward mode
        (``jax.jvp``), since the others have custom gradients. ``"blockwise"`` has
        forward-over-reverse second derivatives (``jax.hessian``) but not ``jax.grad`` of
        ``jax.grad``. None's choice moves with the shape (on CPU the blockwise kernel
        from T = 256 or 384, see ``_select_implementation``), so code that needs forward
        mode or ``jax.grad`` of ``jax.grad`` passes ``"xla"``.
      dropout_rate: a concrete number (static under ``jit``): dropout on the attention
        probabilities (``"xla"`` and
        ``"blockwise"``, which drop the same entries for one key: the mask is a hash of
        each entry's position, ``jaxattn.ops.masks.attention_dropout_keep``).
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      local_window_size: sliding-window attention, ``(left, right)`` or one int for both:
        query t (key position ``t + S - T``) also hides keys more than ``left`` before it
        or ``right`` after it (``jaxattn.ops.masks.local_window_mask``; for T == S
        ``jax.nn.dot_product_attention``'s ``local_window_size``; with ``is_causal`` only
        ``left`` counts). ``"blockwise"`` skips the tiles outside the window (O(T W) for
        a window of W keys); ``"xla"`` and ``"cudnn"`` take it as a dense ``[T, S]`` mask;
        ``"pallas"`` takes none.

    Returns:
      ``[B, T, N, Hv]`` in q's dtype.
    """
    q, k, v = as_qkv(q, k, v, "dot_product_attention")
    return _dot_product_attention(
        q, k, v, mask, bias, is_causal, scale, implementation, dropout_rate, dropout_rng,
        local_window_size,
    )  # fmt: skip


def _dot_product_attention(
    q, k, v, mask=None, bias=None, is_causal=False, scale=None, implementation=None,
    dropout_rate=0.0, dropout_rng=None, local_window_size=None, *, heads=None,
):  # fmt: skip
    """``dot_product_attention`` on arrays. ``heads``: ``(B, K)`` when ``k`` and ``v`` come as
    ``head_rows`` (``cached_attention``'s per-layer caches, of a chunk of B rows and K heads):
    the einsum path reads them as they are, the other kernels get them back as
    ``[B, S, K, H]``. The checks and the kernel's choice see them as ``[B, S, K, H]``."""
    if heads is not None:
        b, kh = heads
        k_in, v_in = (
            jax.ShapeDtypeStruct((b, x.shape[1], kh, x.shape[2]), x.dtype) for x in (k, v)
        )
    else:
        k_in, v_in = k, v
    mask, bias = check_attention_inputs("dot_product_attention", q, k_in, v_in, mask, bias)
    check_scale(scale, "dot_product_attention")
    is_causal = check_flag(is_causal, "is_causal", "dot_product_attention")
    window = check_local_window(local_window_size, "dot_product_attention")
    # Before the selection, which compares the rate with 0.
    check_attention_dropout("dot_product_attention", dropout_rate, dropout_rng)
    if implementation is None:
        implementation = _select_implementation(
            q, k_in, v_in, mask, bias, is_causal, dropout_rate, window
        )
    _check_implementation(implementation, "dot_product_attention")
    if dropout_rate > 0.0 and implementation not in DROPOUT_IMPLEMENTATIONS:
        raise ValueError(
            f"dot_product_attention: attention dropout is only supported by the 'xla' and "
            f"'blockwise' implementations, got implementation={implementation!r}"
        )
    if window is not None and implementation == "pallas":
        raise ValueError(
            'dot_product_attention: implementation="pallas" takes no local_window_size; use '
            "implementation=None or 'blockwise'"
        )
    if heads is not None and implementation != "xla":
        k, v = from_head_rows(k, heads[0]), from_head_rows(v, heads[0])
    # cuDNN and Pallas take the scale as a Python number; the blockwise kernel takes a
    # traced one as an array, which is more accurate in bfloat16 than one folded into q.
    if implementation not in ("xla", "blockwise"):
        q, scale = fold_traced_scale(q, scale)
        # A concrete array (jnp.float32(0.5)) is not hashable, as cuDNN's and Pallas'
        # static scale must be.
        scale = None if scale is None else float(scale)
    if implementation == "blockwise":
        return _attention_blockwise(
            q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng, window=window
        )
    mask = _mask_with_window(mask, window, q.shape[1], k.shape[1])
    return _KERNELS[implementation](
        q, k, v, mask, bias, is_causal, scale, dropout_rate, dropout_rng
    )


def attention_weights(
    q: Array,
    k: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> Array:
    """Return the attention probabilities ``softmax(scale · q kᵀ + bias, mask)``.

    The same formula as the ``"xla"`` path of ``dot_product_attention`` (for plotting).

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; mask, bias, is_causal, scale,
        local_window_size: as in ``dot_product_attention``.

    Returns:
      ``[B, N, T, S]`` float32 (float64 for float64 inputs); rows sum to 1, or are all 0
      if nothing may be attended.
    """
    q, k = jnp.asarray(q), jnp.asarray(k)
    mask, bias = check_attention_inputs("attention_weights", q, k, k, mask, bias)
    check_scale(scale, "attention_weights")
    is_causal = check_flag(is_causal, "is_causal", "attention_weights")
    window = check_local_window(local_window_size, "attention_weights")
    mask = _mask_with_window(mask, window, q.shape[1], k.shape[1])
    return _probs(q, k, mask, bias, is_causal, scale)  # [B, N, T, S]


# ----------------------------------------------------------------------------------------
# Multi-head attention
# ----------------------------------------------------------------------------------------


class MultiHeadAttentionWeights(NamedTuple):
    """Multi-head attention projections; N, K, H are read from the shapes.

    ``w_q: [Dq, N, H]``, ``w_k, w_v: [Dkv, K, H]``, ``w_o: [N, H, Dout]``,
    ``b_q: [N, H]``, ``b_k, b_v: [K, H]``, ``b_o: [Dout]`` (biases may be None).
    """

    w_q: Array
    w_k: Array
    w_v: Array
    w_o: Array
    b_q: Array | None
    b_k: Array | None
    b_v: Array | None
    b_o: Array | None


def init_multi_head_attention(
    rng: Array,
    q_dim: int,
    num_heads: int,
    *,
    head_dim: int | None = None,
    kv_dim: int | None = None,
    num_kv_heads: int | None = None,
    out_dim: int | None = None,
    use_bias: bool = True,
    std: float | None = None,
    out_std: float | None = None,
    dtype: DType = jnp.float32,
) -> MultiHeadAttentionWeights:
    """Initialise multi-head attention with ``N(0, std^2)`` kernels and zero biases.

    Defaults: ``head_dim = q_dim // num_heads``, ``kv_dim = out_dim = q_dim``,
    ``num_kv_heads = num_heads``; ``std = 1/sqrt(fan_in)`` per input projection and
    ``out_std = 1/sqrt(N H)`` (GPT-2 passes a smaller ``out_std`` for the residual branch).
    """
    check_float_dtype(dtype, "init_multi_head_attention")
    where = "init_multi_head_attention"
    num_heads = check_size(num_heads, "num_heads", where)
    q_dim = check_size(q_dim, "q_dim", where)
    head_dim = None if head_dim is None else check_size(head_dim, "head_dim", where)
    kv_dim = None if kv_dim is None else check_size(kv_dim, "kv_dim", where)
    out_dim = None if out_dim is None else check_size(out_dim, "out_dim", where)
    if num_kv_heads is not None:
        num_kv_heads = check_size(num_kv_heads, "num_kv_heads", where)
    if head_dim is None:
        if q_dim % num_heads != 0:
            raise ValueError(
                f"init_multi_head_attention: q_dim={q_dim} is not divisible by "
                f"num_heads={num_heads}; pass head_dim"
            )
        head_dim = q_dim // num_heads
    kv_dim = q_dim if kv_dim is None else kv_dim
    out_dim = q_dim if out_dim is None else out_dim
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"init_multi_head_attention: num_heads={num_heads} must be a multiple of "
            f"num_kv_heads={num_kv_heads}"
        )
    use_bias = check_flag(use_bias, "use_bias", where)
    n, kh, h = num_heads, num_kv_heads, head_dim
    std_q = 1.0 / math.sqrt(q_dim) if std is None else std
    std_kv = 1.0 / math.sqrt(kv_dim) if std is None else std
    out_std = 1.0 / math.sqrt(n * h) if out_std is None else out_std
    rq, rk, rv, ro = jax.random.split(rng, 4)

    def zeros(*shape):
        return jnp.zeros(shape, dtype) if use_bias else None

    return MultiHeadAttentionWeights(
        w_q=normal(rq, (q_dim, n, h), std_q, dtype),
        w_k=normal(rk, (kv_dim, kh, h), std_kv, dtype),
        w_v=normal(rv, (kv_dim, kh, h), std_kv, dtype),
        w_o=normal(ro, (n, h, out_dim), out_std, dtype),
        b_q=zeros(n, h),
        b_k=zeros(kh, h),
        b_v=zeros(kh, h),
        b_o=zeros(out_dim),
    )


def _check_mha_weights(weights: MultiHeadAttentionWeights, where: str) -> None:
    """``check_weight_arrays`` for ``MultiHeadAttentionWeights`` (the biases may be None):
    an integer kernel ran silently, a dict (an orbax restore without a target) failed as
    "'dict' object has no attribute 'w_q'"."""
    biases = ("b_q", "b_k", "b_v", "b_o")
    check_weight_arrays(
        weights, MultiHeadAttentionWeights, "init_multi_head_attention", where, biases
    )


def _check_qkv_inputs(weights: MultiHeadAttentionWeights, x_q: Array, x_kv: Array | None):
    """Name the input and kernel that disagree (``project``'s own error names neither)."""
    d_q, d_k, d_v = (jnp.shape(w)[0] for w in (weights.w_q, weights.w_k, weights.w_v))
    if d_k != d_v:  # e.g. a torch MultiheadAttention with kdim != vdim
        raise ValueError(
            f"project_qkv: w_k takes {d_k} input features but w_v takes {d_v}: keys and values "
            "are projected from the same x_kv, so the two must agree"
        )
    if jnp.shape(x_q)[-1:] != (d_q,):
        raise ValueError(f"project_qkv: x_q {jnp.shape(x_q)} must end in w_q's {d_q} features")
    if x_kv is None and d_k != d_q:
        raise ValueError(
            f"project_qkv: x_kv is None (self-attention, keys from x_q), but w_k and w_v take "
            f"{d_k} features and x_q has {d_q}: pass the keys' inputs as x_kv"
        )
    if x_kv is not None and jnp.shape(x_kv)[-1:] != (d_k,):
        raise ValueError(
            f"project_qkv: x_kv {jnp.shape(x_kv)} must end in w_k's and w_v's {d_k} features"
        )


def project_qkv(
    weights: MultiHeadAttentionWeights,
    x_q: Array,
    x_kv: Array | None = None,
    *,
    fused: bool = False,
) -> tuple[Array, Array, Array]:
    """Project inputs to per-head queries, keys and values: ``q = x_q W_q + b_q`` etc.

    Args:
      weights: ``MultiHeadAttentionWeights``.
      x_q: ``[B, T, Dq]``.
      x_kv: ``[B, S, Dkv]``, or None for self-attention (``x_kv = x_q``).
      fused: self-attention only: the three products as one, over the kernels joined along
        their outputs. Faster for one token at a time in a decoding loop over weights the
        loop does not slice (XLA hoists the join out of the loop: ~1.6 of the ~62 us of a
        token of the Shakespeare GPT on CPU); slower where the join is paid each call (a
        layer scan slices the kernels every step) and, on XLA:CPU, for many tokens.

    Returns:
      ``(q [B, T, N, H], k [B, S, K, H], v [B, S, K, H])``.

    Raises:
      ValueError: naming the input and kernel whose feature counts disagree (also ``w_k``
        against ``w_v``: one ``x_kv`` feeds both, so torch's ``kdim != vdim`` cannot run).
    """
    fused = check_flag(fused, "fused", "project_qkv")
    _check_mha_weights(weights, "project_qkv")
    x_q = as_floating(x_q, "x_q", "project_qkv")  # (a list warned from jnp.shape)
    x_kv = None if x_kv is None else as_floating(x_kv, "x_kv", "project_qkv")
    _check_qkv_inputs(weights, x_q, x_kv)
    if fused and x_kv is None:
        kernels = (weights.w_q, weights.w_k, weights.w_v)  # [Dq, N|K, H]
        biases = (weights.b_q, weights.b_k, weights.b_v)
        for w, b in zip(kernels, biases):  # (checked before the reshape below)
            if b is not None and jnp.shape(b) != w.shape[1:]:
                raise ValueError(
                    f"project_qkv: a bias of shape {jnp.shape(b)} for a kernel {w.shape} "
                    f"must be {w.shape[1:]}"
                )
        bias = None
        if any(b is not None for b in biases):  # (a missing one adds 0)
            bias = jnp.concatenate(
                [jnp.zeros(w.shape[1:], w.dtype).reshape(-1) if b is None else
                 jnp.reshape(b, -1) for w, b in zip(kernels, biases)]
            )  # fmt: skip
        joined = jnp.concatenate([w.reshape(w.shape[0], -1) for w in kernels], axis=1)
        y = project(x_q, joined, bias)  # [B, T, (N + 2K) H]
        ends = np.cumsum([math.prod(w.shape[1:]) for w in kernels])[:-1]
        q, k, v = (
            part.reshape(*x_q.shape[:-1], *w.shape[1:])
            for part, w in zip(jnp.split(y, ends, axis=-1), kernels)
        )
        return q, k, v
    x_kv = x_q if x_kv is None else x_kv
    q = project(x_q, weights.w_q, weights.b_q)  # [B, T, N, H]
    k = project(x_kv, weights.w_k, weights.b_k)  # [B, S, K, H]
    v = project(x_kv, weights.w_v, weights.b_v)  # [B, S, K, H]
    return q, k, v


def project_output(weights: MultiHeadAttentionWeights, context: Array) -> Array:
    """Merge the heads: ``out = sum_{n,h} context[..., n, h] W_o[n, h, :] + b_o``.

    Args:
      context: ``[B, T, N, H]``.

    Returns:
      ``[B, T, Dout]``.
    """
    _check_mha_weights(weights, "project_output")
    return project(context, weights.w_o, weights.b_o, contract_dims=2)  # [B, T, Dout]


def write_kv_cache(
    k_cache: Array,
    v_cache: Array,
    k: Array,
    v: Array,
    index: Array,
    *,
    layer: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> tuple[Array, Array, Array]:
    """Write a chunk's keys and values into a KV cache at position ``index``.

    Args:
      k_cache, v_cache: ``[B, S, K, H]`` cached keys and values (any dtype), or one layer's
        as ``head_rows``, ``[B*K, S, H]`` (the layout ``gpt.unstack_layers`` gives a decoding
        loop: its attention reads them with no transposing copy; the rows do not record B,
        so write chunks of the B and K the cache was made for); with ``layer``, every
        layer's caches stacked, ``[L, B, S, K, H]``.
      k, v: ``[B, T, K, H]`` the chunk's keys and values, for positions ``index ..
        index + T - 1``.
      index: int32 scalar (may be traced), the position of the chunk's first token;
        ``0 <= index <= S - T``. A concrete index outside that range is an error; a traced
        one cannot be checked, and ``dynamic_update_slice`` would clamp it (overwriting
        earlier keys), so callers keep count (``gpt.generate`` checks the room up front).
      layer: int scalar, the layer of a stacked cache to write (read it back with
        ``k_cache[layer]``); None for one layer's ``[B, S, K, H]`` caches. A concrete layer
        outside ``[0, L)`` is an error; a traced one is clamped into it, as the index
        would be, so callers pass ``0 .. L-1`` (a layer scan's counter). A layer loop
        that carries the stack then writes only the chunk's rows: one that took each layer's
        cache as a ``lax.scan`` input and returned it as an output rebuilt the whole stack
        per step (XLA:CPU zero-filled and copied it, three times the cache per token).
      local_window_size: a causal sliding window, as in ``dot_product_attention`` (only
        its ``left`` counts): ``visible`` also hides keys more than ``left`` before p.

    Returns:
      ``(k_cache, v_cache, visible)`` with the chunk written (stacked as given) and
      ``visible: [1, 1, T, S]`` True where cached key j is visible to the chunk's query at
      position p, ``j <= p``; this also hides the slots not written yet.
    """
    window = check_local_window(local_window_size, "write_kv_cache")
    chunk, cache = (k.shape, v.shape), (k_cache.shape, v_cache.shape)
    stacked = layer is not None
    if stacked:
        if k_cache.ndim != 5 or v_cache.shape[:4] != k_cache.shape[:4]:
            raise ValueError(
                f"write_kv_cache: with layer=, k_cache [L, B, S, K, H] and v_cache "
                f"[L, B, S, K, Hv] must share L, B, S and K, got k_cache {k_cache.shape}, "
                f"v_cache {v_cache.shape}"
            )
        check_int_scalar(layer, "layer", "write_kv_cache")
        if not isinstance(layer, jax.core.Tracer) and not 0 <= int(layer) < k_cache.shape[0]:
            raise ValueError(
                f"write_kv_cache: layer {int(layer)} is not in [0, {k_cache.shape[0]})"
            )
        cache = (k_cache.shape[1:], v_cache.shape[1:])
    elif k_cache.ndim == 5:  # (else "must share B, S and K", which they may well do)
        raise ValueError(
            f"write_kv_cache: k_cache {k_cache.shape} is a stack of layers [L, B, S, K, H]; "
            "pass layer= to write one of them"
        )
    elif k_cache.ndim == 3:  # head rows [B*K, S, H]
        b, kh = k.shape[0], k.shape[2] if k.ndim == 4 else 0
        if (
            v_cache.ndim != 3
            or v_cache.shape[:2] != k_cache.shape[:2]
            or k_cache.shape[0] != b * kh
        ):
            raise ValueError(
                f"write_kv_cache: head-row caches k_cache [B*K, S, H] and v_cache [B*K, S, Hv] "
                f"must share S and have B*K rows for the chunk's k [B, T, K, H], got k_cache "
                f"{k_cache.shape}, v_cache {v_cache.shape}, k {k.shape}"
            )
        cache = tuple((b, c[1], kh, c[2]) for c in cache)  # as [B, S, K, H], for the checks
    elif k_cache.ndim != 4 or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"write_kv_cache: k_cache [B, S, K, H] and v_cache [B, S, K, Hv] must share B, S "
            f"and K, got k_cache {k_cache.shape}, v_cache {v_cache.shape}"
        )
    check_int_scalar(index, "index", "write_kv_cache")
    if any(c[:1] + c[2:] != x[:1] + x[2:] or c[1] < x[1] for c, x in zip(cache, chunk)):
        raise ValueError(
            f"write_kv_cache: the chunk's k {k.shape}, v {v.shape} must be [B, T, K, H] with "
            f"the caches' B, K, H and T <= S: k_cache {k_cache.shape}, v_cache {v_cache.shape}"
        )
    slots = cache[0][1]
    room = slots - k.shape[1]
    if not isinstance(index, jax.core.Tracer) and not 0 <= int(index) <= room:
        raise ValueError(
            f"write_kv_cache: a chunk of {k.shape[1]} tokens at index {int(index)} does not "
            f"fit a cache of {slots} positions (need 0 <= index <= {room})"
        )
    # int32 positions: in index's dtype (uint8, int8) a cache longer than its range would
    # wrap and show unwritten slots. (The start indices must share one dtype: int32.)
    index = jnp.asarray(index).astype(jnp.int32)
    if stacked:
        zero = jnp.zeros((), jnp.int32)  # (a Python 0 is int64 under x64)
        start = (jnp.asarray(layer).astype(jnp.int32), zero, index, zero, zero)
        write = lambda c, x: jax.lax.dynamic_update_slice(c, x[None].astype(c.dtype), start)
    else:  # (axis 1 is S in both layouts)
        rows = k_cache.ndim == 3
        write = lambda c, x: jax.lax.dynamic_update_slice_in_dim(
            c, (head_rows(x) if rows else x).astype(c.dtype), index, 1
        )
    k_cache, v_cache = write(k_cache, k), write(v_cache, v)
    positions = index + jnp.arange(k.shape[1], dtype=jnp.int32)  # [T]
    keys = jnp.arange(slots, dtype=jnp.int32)  # [S]
    visible = keys[None, :] <= positions[:, None]  # [T, S]
    if window is not None:
        visible &= window_visible(positions, keys, window[0], 0)
    return k_cache, v_cache, visible[None, None]


def cached_attention(
    q: Array,
    k: Array,
    v: Array,
    k_cache: Array,
    v_cache: Array,
    index: Array,
    *,
    layer: Array | None = None,
    mask: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    slot_rows: Array | None = None,
    **attention_options: Any,
) -> tuple[Array, Array, Array]:
    """One step of incremental decoding: write a chunk's keys and values into a KV cache
    (``write_kv_cache``), then attend its queries over every cached key it may see.

    Args:
      q: ``[B, T, N, H]`` the chunk's queries, at positions ``index .. index + T - 1``.
      k, v: ``[B, T, K, H]`` its keys and values.
      k_cache, v_cache, index, layer, local_window_size: as in ``write_kv_cache``; the
        cache is read in q's dtype.
      mask: boolean, broadcastable to ``[B, N, T, S]``, also True = attend (e.g. a
        ``[B, 1, 1, S]`` mask hiding left padding); None for none.
      slot_rows: ``[B, S]`` integers in ``[0, B)`` or None: row b attends to slot s of
        cache row ``slot_rows[b, s]`` instead of its own (beam search: the cache keeps the
        rows as they were written and ``slot_rows`` follows each hypothesis' ancestors, so
        the cache is never reordered). The slots this chunk writes are read as the chunk
        wrote them, so those entries should be ``b``. Not for head-row caches. The result
        is that of the cache reordered by ``slot_rows``, without writing it. Concrete
        values outside ``[0, B)`` raise; traced ones (under ``jit``) are clipped to it.
      attention_options: passed to ``dot_product_attention`` (``implementation``,
        ``dropout_rate``, ``dropout_rng``, ``scale``).

    Returns:
      ``(out [B, T, N, Hv], k_cache, v_cache)`` with the chunk written (stacked as given).
    """
    k_cache, v_cache, visible = write_kv_cache(
        k_cache, v_cache, k, v, index, layer=layer, local_window_size=local_window_size
    )  # visible: [1, 1, T, S], causal (and the window) by cache slot
    if mask is not None:
        visible = combine_masks(visible, mask)
    keys, values = (k_cache, v_cache) if layer is None else (k_cache[layer], v_cache[layer])
    if slot_rows is not None:
        if (
            keys.ndim != 4
            or jnp.shape(slot_rows) != keys.shape[:2]
            or not jnp.issubdtype(jnp.result_type(slot_rows), jnp.integer)
        ):
            raise ValueError(
                f"cached_attention: slot_rows must be [B, S] = {keys.shape[:2]} integers for "
                f"a [B, S, K, H] cache (not head rows), got {jnp.shape(slot_rows)} "
                f"{jnp.result_type(slot_rows)}"
            )
        # Checked when concrete; under jit an out-of-range row would be clipped to B - 1.
        check_token_ids(slot_rows, keys.shape[0], "cached_attention: slot_rows (cache rows)")
        # On XLA:CPU the gather fuses into the copy that lays the keys out for the einsum
        # path's product: no pass over the cache beyond the one it makes anyway.
        slots = jnp.arange(keys.shape[1])[None, :]
        keys, values = (x.at[slot_rows, slots].get(mode="clip") for x in (keys, values))
    q = jnp.asarray(q)
    heads = (k.shape[0], k.shape[2]) if keys.ndim == 3 else None  # head rows: the chunk's B, K
    out = _dot_product_attention(
        q, keys.astype(q.dtype), values.astype(q.dtype), mask=visible, heads=heads,
        **attention_options,
    )  # fmt: skip
    return out, k_cache, v_cache


def multi_head_attention(
    weights: MultiHeadAttentionWeights,
    x_q: Array,
    x_kv: Array | None = None,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    return_weights: bool = False,
    implementation: str | None = None,
    dropout_rate: float = 0.0,
    rng: Array | None = None,
    deterministic: bool = True,
    local_window_size: int | tuple[int, int] | None = None,
) -> Array | tuple[Array, Array]:
    """Multi-head attention: ``concat_n(attention(x_q W_q^n, x_kv W_k^n, x_kv W_v^n)) W_o``.

    (Vaswani et al., 2017; K < N key/value heads is GQA, Ainslie et al., 2023.)

    Args:
      weights: ``MultiHeadAttentionWeights``.
      x_q: ``[B, T, Dq]`` queries' inputs.
      x_kv: ``[B, S, Dkv]`` keys'/values' inputs, or None for self-attention.
      mask: boolean, broadcastable to ``[B, N, T, S]``; True = attend.
      bias: float, broadcastable to ``[B, N, T, S]``.
      is_causal: causal masking (queries are the last T key positions).
      return_weights: also return the attention probabilities (forces the "xla" path).
      implementation: see ``dot_product_attention``.
      dropout_rate: dropout on the attention probabilities when not ``deterministic``.
      rng: PRNG key for dropout.
      deterministic: disable dropout (evaluation).
      local_window_size: sliding-window attention, see ``dot_product_attention``.

    Returns:
      ``[B, T, Dout]``, or ``(out, weights [B, N, T, S])`` when ``return_weights``; the
      returned weights are the probabilities before dropout.
    """
    # (NumPy float64 data: float32 without x64, and no warning; a list x_kv warned.)
    x_q = jnp.asarray(as_floating(x_q, "x_q", "multi_head_attention"))
    x_kv = None if x_kv is None else jnp.asarray(as_floating(x_kv, "x_kv", "multi_head_attention"))
    if x_q.ndim != 3 or (x_kv is not None and jnp.ndim(x_kv) != 3):
        raise ValueError(
            f"multi_head_attention: x_q [B, T, Dq] and x_kv [B, S, Dkv] must be rank 3, got "
            f"x_q {x_q.shape}, x_kv {None if x_kv is None else jnp.shape(x_kv)}"
        )
    for name, flag in (
        ("is_causal", is_causal),
        ("return_weights", return_weights),
        ("deterministic", deterministic),
    ):
        check_flag(flag, name, "multi_head_attention")
    # Also when deterministic: a bad rate is a config error, not one to surface at training
    # (a traced rate passes there, as it always has: it is unused).
    if not (deterministic and isinstance(dropout_rate, jax.core.Tracer)):
        check_dropout_rate(dropout_rate, "multi_head_attention: dropout_rate")
    rate = 0.0 if deterministic else dropout_rate
    q, k, v = project_qkv(weights, x_q, x_kv)
    check_dropout_key(
        rng, rate > 0.0, f"multi_head_attention: dropout_rate={rate} with deterministic=False"
    )
    if not return_weights:
        context = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            bias=bias,
            is_causal=is_causal,
            implementation=implementation,
            dropout_rate=rate,
            dropout_rng=rng,
            local_window_size=local_window_size,
        )
        return project_output(weights, context)
    if implementation is not None:  # (the weights come from the einsum path whatever it says)
        _check_implementation(implementation, "multi_head_attention")
    mask, bias = check_attention_inputs("multi_head_attention", q, k, v, mask, bias)
    window = check_local_window(local_window_size, "multi_head_attention")
    mask = _mask_with_window(mask, window, q.shape[1], k.shape[1])
    context, probs = _attention_xla_core(q, k, v, mask, bias, is_causal, None, rate, rng)
    return project_output(weights, context), probs  # probs: [B, N, T, S]
