"""Position information: sinusoidal tables, learned tables and rotary embeddings (RoPE).

Self-attention is permutation-equivariant (shuffle the tokens and its outputs shuffle the
same way: it cannot tell an order), so a transformer is told where each token sits either
by adding a position vector to the token embedding (sinusoidal, learned) or by rotating the
queries and keys so that their dot product depends on the relative offset (RoPE).

Shape glossary: B batch, T time (positions), N heads, H head dim, D model dim.

Formulas (``i`` indexes frequency pairs, ``0 <= i < D/2`` or ``H/2``):

- Sinusoidal (Vaswani et al., 2017, "Attention Is All You Need"), interleaved::

      PE[pos, 2i]     = sin(pos / base^(2i/D))
      PE[pos, 2i + 1] = cos(pos / base^(2i/D))

- Learned (GPT-2): ``P[pos] = table[pos]``, a trained ``[max_len, D]`` table.
- RoPE (Su et al., 2021, "RoFormer"), in the rotate-half convention of GPT-NeoX and
  Hugging Face LLaMA, which pairs ``x[i]`` with ``x[i + H/2]``::

      theta_i = pos / base^(2i/H)
      y[i]       = x[i] cos(theta_i) - x[i + H/2] sin(theta_i)
      y[i + H/2] = x[i + H/2] cos(theta_i) + x[i] sin(theta_i)

  Each pair is rotated by an angle proportional to its position, so
  ``<rope(q, m), rope(k, n)>`` depends on ``m - n`` only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops._checks import as_size, check_float_dtype, check_size, check_weight_arrays
from jaxattn.ops.layers import (
    as_array,
    check_floating,
    check_token_ids,
    float32_or_wider,
    ids_to_check,
    normal,
    to_rank,
)

Array = jax.Array
DType = jnp.dtype | type | str


def _check_wavelengths(dim: int, base: float, name: str, where: str) -> int:
    """``dim`` as an int; ``ValueError`` unless it is a positive even integer (a float, a
    bool, None or a string named here, not by NumPy) and ``base > 0`` (also rejects NaN: a
    base <= 0 gave NaN or inf angles without a word)."""
    size = as_size(dim, 1)
    if size is None or size % 2:
        raise ValueError(f"{where}: {name} must be a positive even number, got {dim!r}")
    if not base > 0:
        raise ValueError(f"{where}: base must be positive, got {base}")
    return size


def _inverse_frequencies(dim: int, base: float) -> np.ndarray:
    """``base^(-2i/dim)`` for ``i < dim/2`` in float64 (``dim`` is static: a constant)."""
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim/2]


def sinusoidal_positions(
    length: int, dim: int, *, base: float = 10000.0, dtype: DType = jnp.float32
) -> Array:
    """Return the fixed sinusoidal position table of Vaswani et al. (2017).

    ``PE[pos, 2i] = sin(pos / base^(2i/D))``, ``PE[pos, 2i+1] = cos(pos / base^(2i/D))``.

    ``length`` and ``dim`` are Python ints, so the table is a constant: it is computed in
    float64 NumPy (angles up to ``length`` radians lose ~1e-3 rad in float32) whether or not
    ``jax_enable_x64`` is set, then cast to ``dtype``.

    Args:
      length: number of positions ``T`` (``pos = 0 .. T-1``).
      dim: model dim ``D``; must be even.
      base: wavelength base (10000 in the paper).
      dtype: dtype of the result.

    Returns:
      ``[T, D]`` table.
    """
    check_float_dtype(dtype, "sinusoidal_positions")
    dim = _check_wavelengths(dim, base, "dim", "sinusoidal_positions")
    length = check_size(length, "length", "sinusoidal_positions", minimum=0)
    angles = np.arange(length, dtype=np.float64)[:, None] * _inverse_frequencies(dim, base)
    table = np.stack([np.sin(angles), np.cos(angles)], axis=-1)  # [T, D/2, 2]
    return jnp.asarray(table.reshape(length, dim), dtype=dtype)  # [T, D], interleaved


class LearnedPositionWeights(NamedTuple):
    """Trained position table. ``table: [max_len, D]``."""

    table: Array


def init_learned_positions(
    rng: Array, max_len: int, dim: int, *, std: float = 0.02, dtype: DType = jnp.float32
) -> LearnedPositionWeights:
    """Initialise a learned position table with ``N(0, std^2)`` entries (as GPT-2)."""
    check_float_dtype(dtype, "init_learned_positions")
    max_len = check_size(max_len, "max_len", "init_learned_positions")
    dim = check_size(dim, "dim", "init_learned_positions")
    return LearnedPositionWeights(normal(rng, (max_len, dim), std, dtype))


def learned_positions(weights: LearnedPositionWeights, positions: Array) -> Array:
    """Look up ``table[positions]``.

    Concrete positions outside ``[0, max_len)`` raise ``ValueError``: the model was asked for
    a longer context than it was built for. Under ``jit`` positions are tracers and are not
    checked (validate at the boundary, as for token ids).

    Args:
      weights: ``LearnedPositionWeights(table [max_len, D])``.
      positions: ``[...]`` integer positions, e.g. ``[T]`` or ``[B, T]``.

    Returns:
      ``[..., D]``.
    """
    check_weight_arrays(  # (an integer table gave integer rows, silently)
        weights, LearnedPositionWeights, "init_learned_positions", "learned_positions"
    )
    max_len = weights.table.shape[0]
    positions = ids_to_check(positions)  # checked before jnp.asarray, which wraps int64s
    check_token_ids(positions, max_len, f"positions (the table was built for max_len={max_len})")
    return jnp.take(weights.table, jnp.asarray(positions), axis=0)  # [..., D]


def _check_rope_positions(positions: Array, where: str) -> None:
    """Integers, or floats of at least 32 bits: a bool reads as 0/1, and bfloat16 (float16)
    holds whole numbers exactly only up to 256 (2048), so later positions would snap to
    coarser steps (float16 overflows to inf past 65504)."""
    dtype = positions.dtype
    if jnp.issubdtype(dtype, jnp.integer):
        return
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 4:
        raise ValueError(
            f"{where}: positions must be integers (or float32/float64), got dtype {dtype}"
        )


def rope_frequencies(
    positions: Array, head_dim: int, *, base: float = 10000.0, dtype: DType = jnp.float32
) -> tuple[Array, Array]:
    """Return ``sin(theta)``, ``cos(theta)`` for ``theta[..., t, i] = pos[..., t] / base^(2i/H)``.

    Args:
      positions: ``[T]`` or ``[B, T]`` positions, integers (or float32/float64; may be
        traced, e.g. a decoding offset).
      head_dim: ``H``; must be even.
      base: wavelength base (10000 in RoFormer and LLaMA).
      dtype: what the angles are computed in: float32, or float64 (with
        ``jax_enable_x64``); narrower floats are refused (see ``apply_rope``).

    Returns:
      ``(sin, cos)``, each ``[..., T, H/2]`` in ``dtype``.
    """
    head_dim = _check_wavelengths(head_dim, base, "head_dim", "rope_frequencies")
    positions = as_array(positions, "positions", "rope_frequencies")
    _check_rope_positions(positions, "rope_frequencies")
    if positions.ndim not in (1, 2):
        raise ValueError(
            f"rope_frequencies: positions must be [T] or [B, T], got {positions.shape}"
        )
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize < 4:
        # Past 256 (bfloat16) or 2048 (float16) positions would snap to coarser steps.
        raise ValueError(f"rope_frequencies: dtype must be float32 or float64, got {dtype}")
    inv_freq = jnp.asarray(_inverse_frequencies(head_dim, base), dtype=dtype)  # [H/2]
    inv_freq = to_rank(inv_freq, positions.ndim + 1)  # [1.., H/2]: broadcast explicitly
    theta = positions.astype(dtype)[..., None] * inv_freq  # [..., T, H/2]
    return jnp.sin(theta), jnp.cos(theta)


def apply_rope(x: Array, positions: Array, *, base: float = 10000.0) -> Array:
    """Rotate queries or keys by their positions (RoPE, rotate-half convention).

    ``y[i] = x[i] cos(theta_i) - x[i + H/2] sin(theta_i)``,
    ``y[i + H/2] = x[i + H/2] cos(theta_i) + x[i] sin(theta_i)``, ``theta_i = pos / base^(2i/H)``.
    Computed in float32 (float64 for float64 ``x``); returned in ``x``'s dtype. (Su et
    al., 2021, "RoFormer".)

    Args:
      x: ``[B, T, N, H]`` queries or keys; ``H`` must be even.
      positions: ``[T]`` (shared by the batch) or ``[B, T]`` (per-row, e.g. left padding or
        a KV-cache offset); integers (or float32/float64).
      base: wavelength base.

    Returns:
      ``[B, T, N, H]``.
    """
    x = as_array(x, "x", "apply_rope")  # (NumPy float64: float32 without x64, no warning)
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x must be [B, T, N, H], got shape {x.shape}")
    check_floating(x, "x", "apply_rope")
    b, t, _, h = x.shape
    positions = as_array(positions, "positions", "apply_rope")
    _check_rope_positions(positions, "apply_rope")
    if positions.shape not in ((t,), (b, t)):
        raise ValueError(
            f"apply_rope: positions must be [T]={(t,)} or [B, T]={(b, t)} for x of shape "
            f"{x.shape}, got {positions.shape}"
        )
    if h % 2:
        raise ValueError(f"apply_rope: head dim H must be even, got x of shape {x.shape}")
    wide = float32_or_wider(x.dtype)
    sin, cos = rope_frequencies(positions, h, base=base, dtype=wide)  # [T|B, T, H/2]
    if positions.ndim == 1:
        sin, cos = sin[None], cos[None]  # [1, T, H/2]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]  # [B or 1, T, 1, H/2]
    xw = x.astype(wide)
    x1, x2 = xw[..., : h // 2], xw[..., h // 2 :]  # [B, T, N, H/2] each
    y = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, T, N, H]
    return y.astype(x.dtype)
