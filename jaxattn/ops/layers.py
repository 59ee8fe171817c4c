"""Basic layers: dense projections, embeddings, norms, feed-forward blocks, dropout.

Every layer is a pair ``init_x(rng, ...) -> weights`` (a NamedTuple of arrays; norms:
``init_layer_norm(dim)``, nothing random) and ``x(weights, inputs, ...)``; embeddings pair
``init_embedding`` with ``embed`` and ``unembed``.

Shape glossary: B batch, T time, D model dim, F feed-forward width, V vocab.

Dense layers flatten every leading (token) axis into one before the matmul: XLA:CPU runs
``[B*T, D] @ [D, F]`` about twice as fast (forward + backward) as the same contraction on
``[B, T, D]``, because the weight gradient then contracts a single axis. A kernel with more
inputs than outputs (an MLP's down projection) also has its weight gradient computed as
``(dyᵀ x)ᵀ`` on CPU (``_tokens_matmul``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxattn.ops._checks import (
    as_size,
    check_flag,
    check_float_dtype,
    check_floating_array,
    check_size,
    check_weight_arrays,
    check_weights_type,
    describe_dtype,
    is_floating_dtype,
)

Array = jax.Array
DType = jnp.dtype | type | str


def check_floating(x: Array, name: str, where: str) -> None:
    """Raise ``ValueError`` unless ``x`` is floating: it sets the compute dtype, so integer
    activations (token ids where embeddings belong) would run on weights truncated to ints.
    (An array's own dtype is looked up in ``is_floating_dtype``'s cache: ``jnp.result_type``
    took ~3 us a call, in every layer.)"""
    dtype = getattr(x, "dtype", None)
    if not is_floating_dtype(jnp.result_type(x) if dtype is None else dtype):
        # (A dtype JAX cannot read, a torch tensor's: jnp.result_type raised naming nothing.)
        known = dtype is None or isinstance(dtype, np.dtype)
        got = jnp.result_type(x) if known else describe_dtype(x)
        raise ValueError(f"{where}: {name} must be floating (it sets the compute dtype), got {got}")


def as_floating(x: Any, name: str, where: str) -> Array | np.ndarray:
    """``x [...]`` after ``check_floating``: an array (JAX, NumPy, a tracer) as it is, an
    array-like without a dtype (a nested list) as ``jnp.asarray`` makes it, as the models
    take token ids. A list failed as "'list' object has no attribute 'ndim'"; None or a
    ragged list now fail here, naming ``where`` and ``name``."""
    if not hasattr(x, "dtype"):
        x = as_array(x, name, where, what="a floating array")
    check_floating(x, name, where)
    return x


def as_array(x: Any, name: str, where: str, *, what: str = "an array") -> Array:
    """``jnp.asarray(x)``, with a None or a ragged nested list named: JAX's "None is not a
    valid value for jnp.array" and NumPy's "inhomogeneous shape" named neither the function
    nor the argument."""
    if x is None:
        raise ValueError(f"{where}: {name} must be {what}, got NoneType")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        reason = str(e).splitlines()[0]
        raise ValueError(
            f"{where}: {name} must be {what}, got {type(x).__name__} ({reason})"
        ) from None


def to_rank(x: Array, ndim: int) -> Array:
    """``x`` with leading size-1 axes up to ``ndim`` axes (a ``[D]`` scale or bias against
    ``[..., D]`` activations), so that the library's own broadcasts are explicit: under
    ``jax.numpy_rank_promotion("raise")`` an implicit rank promotion is an error."""
    return jnp.reshape(x, (1,) * (ndim - jnp.ndim(x)) + jnp.shape(x))


def float32_or_wider(dtype: DType) -> jnp.dtype:
    """The dtype that norms, softmax, losses and RoPE compute in for inputs of ``dtype``:
    float32 for bfloat16, float16 and float32 (and non-floats), float64 for float64 (with
    ``jax_enable_x64``), as Flax's norms promote. Never narrower than float32 nor than the
    input, so float64 gradient checks (``jax.test_util.check_grads``) see float64
    arithmetic. (Not ``jnp.promote_types``: under strict promotion it refuses the pair.)"""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > 4:
        return dtype
    return jnp.dtype(jnp.float32)


def _tokens_matmul(x: Array, w: Array) -> Array:
    """``x [M, in] @ w [in, out]`` (``M`` tokens), differentiable to any order in either mode.

    The weight gradient ``xᵀ dy [in, out]`` contracts the token axis, the leading one of
    both operands: XLA:CPU runs it in Eigen's kernel for a transposed left operand, which
    is slow when the output has more rows than columns. For such kernels on CPU the
    gradient is computed as ``(dyᵀ x)ᵀ`` instead (a ``[out, in]`` product, then a small
    transpose). On a 2-core AMD EPYC the weight gradient of ``[768, 512] -> [768, 128]``
    took 0.80 against 1.15 ms, and the Shakespeare GPT's train step 4% less
    (benchmarks/LOG.md, "Session 49").
    """
    if w.shape[0] > w.shape[1] and jax.default_backend() == "cpu":
        return _matmul_out_major_weight_grad(x, w)
    return x @ w


@jax.custom_jvp
def _matmul_out_major_weight_grad(x: Array, w: Array) -> Array:
    return x @ w


def _matmul_jvp(primals, tangents):
    x, w = primals
    dx, dw = tangents  # SymbolicZero for an argument not differentiated
    tangent = None if isinstance(dx, SymbolicZero) else dx @ w
    if not isinstance(dw, SymbolicZero):
        # dw's term written as (dwᵀ xᵀ)ᵀ, with the barrier under the transposed dwᵀ: its
        # transpose, the weight gradient, is then (dyᵀ x)ᵀ with the barrier between the
        # product and the final transpose, where XLA would otherwise fold the transpose
        # back into the product as xᵀ dy.
        from_w = (jax.lax.optimization_barrier(dw.T) @ x.T).T
        tangent = from_w if tangent is None else tangent + from_w
    return x @ w, tangent


_matmul_out_major_weight_grad.defjvp(_matmul_jvp, symbolic_zeros=True)


def project(x: Array, w: Array, b: Array | None = None, *, contract_dims: int = 1) -> Array:
    """Contract the trailing ``contract_dims`` axes of ``x`` with the leading axes of ``w``.

    ``y[..., o] = sum_i x[..., i] w[i, o] + b[o]``, computed as one 2-D matmul over all
    tokens (see the module docstring for why).

    Args:
      x: ``[..., *in_shape]`` activations.
      w: ``[*in_shape, *out_shape]`` kernel, ``in_shape = w.shape[:contract_dims]``.
      b: optional ``[*out_shape]`` bias.
      contract_dims: how many axes of ``x`` (from the end) are contracted.

    Returns:
      ``[..., *out_shape]`` in ``x``'s dtype (the kernel is cast to it).
    """
    # A JAX array from here on: NumPy inputs would otherwise run NumPy's own matmul (in
    # float64, whatever x64 says) on one path and JAX's on the other.
    x = jnp.asarray(as_floating(x, "x", "project"))
    # (An integer kernel or bias was cast to x's dtype and ran silently.)
    check_floating_array(w, "the kernel w", "project")
    if b is not None:
        check_floating_array(b, "the bias b", "project")
    # An int in [0, w.ndim]: -1 silently made an outer product of a 1-D kernel (w.shape[:-1]
    # is empty), and True passed as 1.
    if as_size(contract_dims, 0) is None or contract_dims > jnp.ndim(w):
        raise ValueError(
            f"project: contract_dims must be an int in [0, {jnp.ndim(w)}] (the kernel's rank, "
            f"{jnp.shape(w)}), got {contract_dims!r}"
        )
    in_shape = w.shape[:contract_dims]
    out_shape = w.shape[contract_dims:]
    if tuple(x.shape[x.ndim - contract_dims :]) != tuple(in_shape):
        raise ValueError(
            f"project: x has shape {x.shape} but the kernel {w.shape} expects trailing "
            f"axes {tuple(in_shape)}"
        )
    if b is not None and tuple(jnp.shape(b)) != tuple(out_shape):
        # Not reshaped blindly: a bias of the right size but another shape (``[H, N]`` for
        # ``[N, H]``) would silently be read in the wrong order.
        raise ValueError(
            f"project: bias has shape {jnp.shape(b)} but the kernel {w.shape} gives outputs "
            f"of shape {tuple(out_shape)}"
        )
    lead = x.shape[: x.ndim - contract_dims]
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    # math.prod(lead), not -1: with n_in = 0 (an LSTM with input_size 0) -1 is ambiguous.
    y = _tokens_matmul(x.reshape(math.prod(lead), n_in), w.reshape(n_in, n_out).astype(x.dtype))
    if b is not None:
        y = y + b.reshape(1, n_out).astype(x.dtype)  # (explicit: see to_rank)
    return y.reshape(*lead, *out_shape)


class DenseWeights(NamedTuple):
    """Affine map. ``w: [in, out]``, ``b: [out]`` or None."""

    w: Array
    b: Array | None


def normal(
    rng: Array, shape: tuple[int, ...], std: float = 1.0, dtype: DType = jnp.float32
) -> Array:
    """Draw ``std * N(0, 1)`` samples of ``shape``: the values of ``jax.random.normal``.

    Drawn as a flat vector and reshaped, which gives the same numbers (the generator counts
    elements in row-major order either way) but compiles about twice as fast on XLA:CPU: the
    n-d kernel indexes by position in every axis, and a model's initialisation compiles one
    kernel per weight shape (a 3-D attention kernel's draw: 0.37 against 0.88 s).
    """
    return std * jax.random.normal(rng, (math.prod(shape),), dtype).reshape(shape)


def uniform(
    rng: Array, shape: tuple[int, ...], low: float, high: float, dtype: DType = jnp.float32
) -> Array:
    """Draw ``U(low, high)`` samples of ``shape``: the values of ``jax.random.uniform``,
    drawn flat and reshaped for the same reason as ``normal``."""
    return jax.random.uniform(rng, (math.prod(shape),), dtype, low, high).reshape(shape)


def init_dense(
    rng: Array,
    in_dim: int,
    out_dim: int,
    *,
    use_bias: bool = True,
    std: float | None = None,
    dtype: DType = jnp.float32,
) -> DenseWeights:
    """Initialise a dense layer: ``w ~ N(0, std^2)``, ``std = 1/sqrt(in_dim)`` by default."""
    check_float_dtype(dtype, "init_dense")
    in_dim = check_size(in_dim, "in_dim", "init_dense")
    out_dim = check_size(out_dim, "out_dim", "init_dense")
    use_bias = check_flag(use_bias, "use_bias", "init_dense")
    std = 1.0 / math.sqrt(in_dim) if std is None else std
    w = normal(rng, (in_dim, out_dim), std, dtype)
    b = jnp.zeros((out_dim,), dtype) if use_bias else None
    return DenseWeights(w, b)


def dense(weights: DenseWeights, x: Array) -> Array:
    """Apply ``y = x W + b``.

    Args:
      weights: ``DenseWeights(w [in, out], b [out] | None)``.
      x: ``[..., in]``.

    Returns:
      ``[..., out]``.
    """
    check_weights_type(weights, DenseWeights, "init_dense", "dense")
    return project(x, weights.w, weights.b)


class EmbeddingWeights(NamedTuple):
    """Lookup table. ``table: [V, D]``."""

    table: Array


def init_embedding(
    rng: Array, vocab_size: int, dim: int, *, std: float = 0.02, dtype: DType = jnp.float32
) -> EmbeddingWeights:
    """Initialise an embedding table with ``N(0, std^2)`` entries."""
    check_float_dtype(dtype, "init_embedding")
    vocab_size = check_size(vocab_size, "vocab_size", "init_embedding")
    dim = check_size(dim, "dim", "init_embedding")
    return EmbeddingWeights(normal(rng, (vocab_size, dim), std, dtype))


def ids_to_check(ids: Any) -> Array | np.ndarray:
    """``ids`` as an array for ``check_token_ids``, not yet converted by ``jnp.asarray``.

    JAX arrays (and tracers) come back as they are, anything else as NumPy. Check, then
    convert: with 64-bit types off ``jnp.asarray`` wraps an int64 id of ``2**32 + 5`` to 5,
    which would then pass the range check and silently stand for another token.
    """
    return ids if isinstance(ids, jax.Array) else np.asarray(ids)


def check_token_ids(ids: Array, vocab_size: int, what: str = "token ids") -> None:
    """Raise ``ValueError`` if concrete ``ids`` fall outside ``[0, vocab_size)``.

    Under ``jit`` the ids are tracers and cannot be inspected; callers validate data at the
    boundary (the data pipeline, ``generate``), and this check is then a no-op: ``embed``
    and the losses then give NaN for an id outside ``[0, vocab_size)`` (a negative one
    included), never a silently wrong number. The dtype is checked traced too (float ids
    failed inside ``jnp.take`` or optax, naming neither the function nor the argument).
    """
    if not isinstance(ids, jax.core.Tracer):
        # On the host: a concrete array closed over by a jitted function is not a tracer,
        # but jnp.min of it would be traced and could not be converted to an int.
        ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {ids.dtype}")
    if isinstance(ids, jax.core.Tracer):
        return
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        # The first bad id and where it is: in a long token stream the range alone is no help.
        bad = (ids < 0) | (ids >= vocab_size)
        pos = tuple(int(p) for p in np.unravel_index(int(np.argmax(bad)), ids.shape))
        raise ValueError(
            f"{what} must lie in [0, {vocab_size}), got values in [{lo}, {hi}] "
            f"(first: {int(ids[pos])} at index {pos})"
        )


def embed(weights: EmbeddingWeights, ids: Array) -> Array:
    """Look up ``ids: [...]`` (integers in ``[0, V)``) -> ``[..., D]``.

    Out-of-range ids raise ``ValueError`` when ``ids`` is concrete (see ``check_token_ids``);
    traced under ``jit``, where they cannot be refused, they give rows of NaN.
    """
    # (An integer table gave integer rows, silently.)
    check_weight_arrays(weights, EmbeddingWeights, "init_embedding", "embed")
    if not isinstance(ids, jax.Array | np.ndarray):
        ids = np.asarray(ids)  # lists, tuples: jnp.take refuses them
    vocab = weights.table.shape[0]
    check_token_ids(ids, vocab, "embed: token ids")
    # jnp.take fills an id >= V with NaN but wraps a negative one to a real row (-1: the
    # last), which gave a silently wrong output under jit: both are NaN now.
    ids = jnp.asarray(ids)
    if jnp.issubdtype(ids.dtype, jnp.integer) and jnp.iinfo(ids.dtype).max < vocab:
        ids = ids.astype(jnp.int32)  # (V in int8/int16/uint8 wraps: int16 -1 -> row V-65536)
    ids = jnp.where(ids < 0, vocab, ids)
    return jnp.take(weights.table, ids, axis=0, mode="fill", fill_value=jnp.nan)


def unembed(weights: EmbeddingWeights, x: Array) -> Array:
    """Tied output layer: ``logits = x E^T``. ``x: [..., D]`` -> ``[..., V]``."""
    check_weight_arrays(weights, EmbeddingWeights, "init_embedding", "unembed")
    return project(x, weights.table.T)


def _check_norm_dim(where: str, scale: Array, x: Array) -> None:
    """Raise unless ``x``'s last axis is the norm's ``D`` (broadcasting would hide a mismatch:
    ``x [..., 1]`` against ``scale [D]`` would silently come out ``[..., D]``)."""
    if jnp.ndim(x) == 0 or jnp.shape(x)[-1:] != jnp.shape(scale):
        raise ValueError(
            f"{where}: x must be [..., D] with D = {jnp.shape(scale)[-1:]} (scale "
            f"{jnp.shape(scale)}), got x of shape {jnp.shape(x)}"
        )


class LayerNormWeights(NamedTuple):
    """``scale: [D]``, ``bias: [D]`` or None."""

    scale: Array
    bias: Array | None


def init_layer_norm(
    dim: int, *, use_bias: bool = True, dtype: DType = jnp.float32
) -> LayerNormWeights:
    """Initialise layer norm to the identity affine map (scale 1, bias 0)."""
    check_float_dtype(dtype, "init_layer_norm")
    dim = check_size(dim, "dim", "init_layer_norm")
    use_bias = check_flag(use_bias, "use_bias", "init_layer_norm")
    return LayerNormWeights(jnp.ones((dim,), dtype), jnp.zeros((dim,), dtype) if use_bias else None)


def layer_norm(weights: LayerNormWeights, x: Array, *, eps: float = 1e-5) -> Array:
    """Normalise the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    Statistics are computed in float32 (float64 for float64 ``x``, ``float32_or_wider``);
    the result has ``x``'s dtype.
    (Ba et al., 2016, "Layer Normalization".)

    Args:
      weights: ``LayerNormWeights(scale [D], bias [D] | None)``.
      x: ``[..., D]``.
    """
    # (An integer scale or bias ran silently; None or a list failed naming neither.)
    check_weight_arrays(weights, LayerNormWeights, "init_layer_norm", "layer_norm", ("bias",))
    # (NumPy float64 data: float32 without x64, and no warning.)
    x = jnp.asarray(as_floating(x, "x", "layer_norm"))
    _check_norm_dim("layer_norm", weights.scale, x)
    if weights.bias is not None and jnp.shape(weights.bias) != jnp.shape(weights.scale):
        raise ValueError(
            f"layer_norm: bias {jnp.shape(weights.bias)} must match scale "
            f"{jnp.shape(weights.scale)}"
        )
    wide = float32_or_wider(x.dtype)
    xw = x.astype(wide)
    mean = jnp.mean(xw, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xw - mean), axis=-1, keepdims=True)
    y = (xw - mean) * jax.lax.rsqrt(var + eps) * to_rank(weights.scale.astype(wide), x.ndim)
    if weights.bias is not None:
        y = y + to_rank(weights.bias.astype(wide), x.ndim)
    return y.astype(x.dtype)


class RMSNormWeights(NamedTuple):
    """``scale: [D]``."""

    scale: Array


def init_rms_norm(dim: int, *, dtype: DType = jnp.float32) -> RMSNormWeights:
    """Initialise RMS norm with scale 1."""
    check_float_dtype(dtype, "init_rms_norm")
    dim = check_size(dim, "dim", "init_rms_norm")
    return RMSNormWeights(jnp.ones((dim,), dtype))


def rms_norm(weights: RMSNormWeights, x: Array, *, eps: float = 1e-6) -> Array:
    """Normalise by the root mean square: ``x / sqrt(mean(x^2) + eps) * scale``.

    Computed in float32 (float64 for float64 ``x``); returned in ``x``'s dtype. (Zhang &
    Sennrich, 2019, "Root Mean Square Layer Normalization".)

    Args:
      x: ``[..., D]``.
    """
    check_weight_arrays(weights, RMSNormWeights, "init_rms_norm", "rms_norm")
    # (NumPy float64 data: float32 without x64, and no warning.)
    x = jnp.asarray(as_floating(x, "x", "rms_norm"))
    _check_norm_dim("rms_norm", weights.scale, x)
    wide = float32_or_wider(x.dtype)
    xw = x.astype(wide)
    y = xw * jax.lax.rsqrt(jnp.mean(jnp.square(xw), axis=-1, keepdims=True) + eps)
    return (y * to_rank(weights.scale.astype(wide), x.ndim)).astype(x.dtype)


def gelu(x: Array, *, approximate: bool = True) -> Array:
    """GELU, ``x Φ(x)``; the tanh approximation by default (as GPT-2 and nanoGPT's ``new_gelu``).

    The exact form is ``x (1 + erf(x / √2)) / 2``, as in PyTorch. ``jax.nn.gelu`` writes it
    with ``erfc``, which XLA:CPU evaluates through an ``exp``: in a checkpointed MLP of the
    GPT step, forward+backward took 13% longer with the erfc form than with no activation,
    and 2% longer with this one. The two agree to float32 rounding; they part only in the
    far negative tail, where ``1 + erf`` rounds to 0 and GELU is ~0 anyway.
    """
    if check_flag(approximate, "approximate", "gelu"):
        return jax.nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


class FeedForwardWeights(NamedTuple):
    """Two-layer MLP. ``up: [D, F]``, ``down: [F, D]``."""

    up: DenseWeights
    down: DenseWeights


def init_feed_forward(
    rng: Array,
    dim: int,
    hidden_dim: int,
    *,
    use_bias: bool = True,
    std: float | None = None,
    out_std: float | None = None,
    dtype: DType = jnp.float32,
) -> FeedForwardWeights:
    """Initialise ``down(act(up(x)))``; ``out_std`` lets GPT scale the residual projection."""
    check_float_dtype(dtype, "init_feed_forward")
    rng_up, rng_down = jax.random.split(rng)
    out_std = std if out_std is None else out_std  # not `out_std or std`: 0.0 is a valid std
    return FeedForwardWeights(
        init_dense(rng_up, dim, hidden_dim, use_bias=use_bias, std=std, dtype=dtype),
        init_dense(rng_down, hidden_dim, dim, use_bias=use_bias, std=out_std, dtype=dtype),
    )


def feed_forward(weights: FeedForwardWeights, x: Array, *, approximate_gelu: bool = True) -> Array:
    """Position-wise MLP ``gelu(x W_up + b_up) W_down + b_down``: ``[..., D]`` -> ``[..., D]``."""
    check_weights_type(weights, FeedForwardWeights, "init_feed_forward", "feed_forward")
    return dense(weights.down, gelu(dense(weights.up, x), approximate=approximate_gelu))


class SwiGLUWeights(NamedTuple):
    """Gated MLP. ``gate, up: [D, F]``, ``down: [F, D]``."""

    gate: DenseWeights
    up: DenseWeights
    down: DenseWeights


def init_swiglu(
    rng: Array, dim: int, hidden_dim: int, *, use_bias: bool = False, dtype: DType = jnp.float32
) -> SwiGLUWeights:
    """Initialise a SwiGLU block (Shazeer, 2020, "GLU Variants Improve Transformer")."""
    check_float_dtype(dtype, "init_swiglu")
    rng_gate, rng_up, rng_down = jax.random.split(rng, 3)
    return SwiGLUWeights(
        init_dense(rng_gate, dim, hidden_dim, use_bias=use_bias, dtype=dtype),
        init_dense(rng_up, dim, hidden_dim, use_bias=use_bias, dtype=dtype),
        init_dense(rng_down, hidden_dim, dim, use_bias=use_bias, dtype=dtype),
    )


def swiglu(weights: SwiGLUWeights, x: Array) -> Array:
    """``(silu(x W_gate) * x W_up) W_down``. ``x: [..., D]`` -> ``[..., D]``."""
    check_weights_type(weights, SwiGLUWeights, "init_swiglu", "swiglu")
    return dense(weights.down, jax.nn.silu(dense(weights.gate, x)) * dense(weights.up, x))


def check_dropout_rate(rate: float, name: str) -> None:
    """Raise ValueError naming ``name`` unless ``0 <= rate < 1`` (NaN and None fail too).

    The rate must be concrete: it picks the code path (0 is the identity) and the fused
    kernels' keep threshold, so a value traced by ``jit`` is refused by name.
    """
    if isinstance(rate, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a concrete number, got a traced value (under jax.jit close over "
            "it or make it a static argument; under jax.vmap it cannot vary)"
        )
    try:
        valid = 0.0 <= rate < 1.0
    except TypeError:  # None, a string: not a comparison error naming nothing
        valid = False
    if not valid:
        raise ValueError(f"{name} must be in [0, 1), got {rate!r}")


def check_dropout_key(rng: Array | None, active: bool, what: str, key: str = "an rng key") -> None:
    """Raise ValueError ``"{what} needs {key}"`` when dropout is on and ``rng`` is None.

    Dropout draws from an explicit key (no hidden global RNG), so a missing key is the
    caller's error, reported before ``jax.random.split(None)`` fails with an unrelated
    "unexpected PRNG key type".
    """
    if active and rng is None:
        raise ValueError(f"{what} needs {key}")


def dropout(rng: Array | None, x: Array, rate: float, *, deterministic: bool = False) -> Array:
    """Zero each element with probability ``rate`` and scale survivors by ``1 / (1 - rate)``.

    Identity when ``deterministic`` or ``rate == 0``; otherwise ``rng`` is required (no
    hidden global RNG).
    """
    check_dropout_rate(rate, "dropout rate")
    # x / (1 - rate) would silently turn ints into floats; a list failed naming nothing.
    x = as_floating(x, "x", "dropout")
    if check_flag(deterministic, "deterministic", "dropout") or rate == 0.0:
        return x
    check_dropout_key(rng, True, "dropout with rate > 0 and deterministic=False")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    # float(): a NumPy or JAX float32 rate is not weakly typed, and x / (1 - rate) would
    # then promote bfloat16 (float16) activations, and every layer after them, to float32.
    return jnp.where(keep, x / (1.0 - float(rate)), jnp.zeros_like(x))
