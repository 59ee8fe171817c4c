"""Checks shared by the models (config fields in ``__post_init__``, sizes, weights), the
two pieces of layer plumbing they share (the compute-dtype cast and the remat policy), and
the weight-decay rule of their weight trees, the options their attention calls share, and
how their decoding programs take scalar settings."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops._checks import (
    as_size,
    check_flag,
    check_floating_leaves,
    check_seed,
    check_size,
)
from jaxattn.ops.attention import DROPOUT_IMPLEMENTATIONS, IMPLEMENTATIONS
from jaxattn.ops.layers import check_dropout_key, check_dropout_rate

__all__ = ["check_seed", "check_size"]  # re-exported: the models import their checks from here

# What the backward pass keeps of each layer: matmul outputs. Everything elementwise (GELU,
# layer norm, softmax) is recomputed from them inside the fused backward; a plain scan would
# instead write every elementwise residual to a stacked [L, ...] buffer, which made the
# nanoGPT-sized CPU step ~1.6x slower. Attention logits (dots with batch dims) are recomputed
# too, so no [B, N, T, S] tensor is stored per layer.
_SAVE_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def config_checker(expected: type, signatures: dict[str, str]) -> Callable[[Any, str], None]:
    """``check(config, where)``: a ``TypeError`` naming ``where``'s argument order when
    ``config`` is not an ``expected``. The models' functions take their config in different
    places (``generate(weights, config, prompt, ...)`` against ``gpt(weights, tokens,
    config)``), and a swapped one failed far inside (e.g. "unhashable type", "tokens must be
    [B, T] ... got shape ()").

    Args:
      signatures: each function's argument order, by name, as the message writes it.
    """

    def check(config: Any, where: str) -> None:
        if not isinstance(config, expected):
            raise TypeError(
                f"{where}: config must be a {expected.__name__}, got {type(config).__name__}; "
                f"the arguments are {signatures[where]}"
            )

    return check


def is_key(rng: Any) -> bool:
    """Whether ``rng`` is PRNG key data: typed keys (``jax.random.key``) or raw uint32 ones
    (``jax.random.PRNGKey``: ``[..., 2]`` for threefry, ``[..., 4]`` under
    ``jax_default_prng_impl="rbg"``), of any leading shape; tracers of either too."""
    dtype = getattr(rng, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = (
        dtype == jnp.uint32
        and jnp.ndim(rng) >= 1
        and jnp.shape(rng)[-1] == _raw_key_size(jax.config.jax_default_prng_impl)
    )
    return typed or raw


def key_shape(rng: Any) -> tuple[int, ...]:
    """The shape of the keys ``rng`` holds (``is_key`` data): a typed key array's own shape,
    a raw one's without its trailing data axis. ``()`` is one key."""
    typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
    return tuple(jnp.shape(rng) if typed else jnp.shape(rng)[:-1])


@functools.lru_cache
def _raw_key_size(impl: str) -> int:
    """The trailing size of ``jax.random.PRNGKey``'s data under the default PRNG ``impl``
    (JAX reads raw keys as that implementation's). (Not ``eval_shape(PRNGKey, 0)``: its
    cached trace keeps the implementation of its first call.)"""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape[-1]


def check_key(rng: Any, where: str) -> None:
    """Raise ``TypeError`` naming ``where`` unless ``rng`` is a PRNG key (``is_key``): an int
    seed failed inside JAX as "invalid PRNG key data", None as "unexpected PRNG key type"."""
    if not is_key(rng):
        raise TypeError(
            f"{where}: rng must be a PRNG key such as jax.random.key(seed), got {describe_key(rng)}"
        )


def check_dropout_rng(rng: Any, active: bool, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` and ``rng`` when dropout is ``active`` and ``rng``
    is not one PRNG key: None (``check_dropout_key``), or an int seed, a float array or a
    batch of keys, which failed inside JAX as "invalid PRNG key data" or "split accepts a
    single key", naming neither (``generate`` and the NNX modules refuse them the same way).
    Not checked when dropout is off: the key is then unused."""
    check_dropout_key(rng, active, f"{where}: dropout > 0 with deterministic=False")
    if active and not (is_key(rng) and key_shape(rng) == ()):
        raise ValueError(
            f"{where}: dropout > 0 with deterministic=False needs rng to be one PRNG key such "
            f"as jax.random.key(seed), got {describe_key(rng)}"
        )


def describe_key(rng: Any) -> str:
    """What a refused ``rng`` is, for an error: an array's dtype and shape, a seed's or
    None's repr, or another object's type (a config or a weights tree: not its whole repr)."""
    dtype = getattr(rng, "dtype", None)
    if dtype is not None:
        return f"{dtype} {jnp.shape(rng)}"
    if rng is None or isinstance(rng, numbers.Number):
        return repr(rng)
    return type(rng).__name__


def checkpointed_layer(body: Callable, remat: bool) -> Callable:
    """A layer scan's ``body`` under ``jax.checkpoint``: saving its matmul outputs, or with
    ``remat`` nothing but its inputs (each layer recomputed in the backward)."""
    policy = jax.checkpoint_policies.nothing_saveable if remat else _SAVE_DOTS
    return jax.checkpoint(body, policy=policy, prevent_cse=False)  # safe inside a scan


def weight_decay_mask(weights: Any) -> Any:
    """True for the leaves nanoGPT decays: matmul kernels (``w``, ``w_q``, ``w_ih`` ...) and
    embedding tables; False for biases, norm scales and other vectors, by leaf name.
    ``gpt`` and ``transformer`` re-export it; ``seq2seq``, whose layers are not stacked,
    keeps ``ndim >= 2`` (its general attention matrix is a bare array, named by its field).

    ``optim.decay_mask``'s ``ndim >= 2`` does not fit these trees: stacked layers carry a
    leading layer axis (a layer-norm scale is ``[L, D]``) and attention biases are ``[N, H]``.
    """

    def decays(path, leaf):
        # An nnx.state of a jaxattn.nn module (what nnx.Optimizer's tx.init gets) wraps each
        # array in a Variable, whose path ends in ``.value``: the name is the entry before.
        if len(path) > 1 and getattr(path[-1], "name", None) == "value":
            path = path[:-1]
        name = getattr(path[-1], "name", getattr(path[-1], "key", ""))
        return name == "table" or name == "w" or name.startswith("w_")

    return jax.tree_util.tree_map_with_path(decays, weights)


def attention_options(config: Any, rate: float, rng: Any) -> dict[str, Any]:
    """``dot_product_attention``'s keyword options for a model layer: the config's kernel
    (``attention_implementation``) and attention dropout at ``rate`` with key ``rng``."""
    return dict(implementation=config.attention_implementation, dropout_rate=rate, dropout_rng=rng)


def float32_argument(value: Any) -> Any:
    """A scalar setting (temperature, top_p, length penalty) as a float32 argument of a jitted
    decoding program, so that a new value reuses the program: a NumPy float32 scalar of a
    concrete value (one program whether it came as a number or an array), a float32 array
    of a traced one.

    Not ``jnp.asarray`` of a number: the program then waited on every call for that fresh
    device array's transfer (~0.15 ms a call of ``gpt.generate``, 2-3 us per token at
    batch 1 on CPU; benchmarks/LOG.md, "Session 44").
    """
    if isinstance(value, jax.core.Tracer):
        return jnp.asarray(value, jnp.float32)
    return np.float32(value)


def cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
    """Cast the floating leaves of a pytree to the compute dtype (a no-op for float32)."""
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def check_positive_ints(owner: Any, names: tuple[str, ...]) -> None:
    """Raise unless each field is an integer > 0 (bools, floats such as 2.5 and NaN fail).

    ``int(2.5)`` would pass and fail later, in ``init``, as a shape TypeError. Unlike
    ``check_size`` this refuses 0-d arrays: config fields are hashed.
    """
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, numbers.Integral) or as_size(value, minimum=1) is None:
            raise ValueError(f"{type(owner).__name__}.{name} must be a positive int, got {value!r}")


def check_special_ids(owner: Any, vocab_size: int) -> None:
    """Raise unless ``owner.pad_id``, ``bos_id`` and ``eos_id`` are distinct ints in
    ``[0, vocab_size)`` (the smaller vocabulary of an encoder–decoder): 1.5 or True would
    pass a range check and fail, or mislead, only in decoding."""
    ids = {"pad_id": owner.pad_id, "bos_id": owner.bos_id, "eos_id": owner.eos_id}
    for name, value in ids.items():
        size = as_size(value, minimum=0) if isinstance(value, numbers.Integral) else None
        if size is None or size >= vocab_size:
            raise ValueError(
                f"{type(owner).__name__}.{name} must be an int in [0, {vocab_size}) (inside "
                f"both vocabularies), got {value!r}"
            )
    if len(set(ids.values())) != 3:
        raise ValueError(f"{type(owner).__name__}: pad, bos and eos ids must differ, got {ids}")


def check_attention_implementation(owner: Any) -> None:
    """Raise unless ``owner.attention_implementation`` is None or a kernel name of
    ``dot_product_attention`` that takes ``owner.dropout``: a typo, or cuDNN or Pallas with
    attention dropout, would otherwise pass until the first (training) forward pass."""
    value = owner.attention_implementation
    if value not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"{type(owner).__name__}.attention_implementation must be None or one of "
            f"{IMPLEMENTATIONS}, got {value!r}"
        )
    if owner.dropout > 0 and value not in (None, *DROPOUT_IMPLEMENTATIONS):
        raise ValueError(
            f"{type(owner).__name__}.attention_implementation={value!r} takes no attention "
            f"dropout, got dropout={owner.dropout}; use None, 'xla' or 'blockwise', or "
            f"dropout=0 (a config for inference only)"
        )


def check_bools(owner: Any, names: tuple[str, ...]) -> None:
    """Raise unless each field is a bool or ``np.bool_`` (a string such as ``"no"`` would count
    as true)."""
    for name in names:
        check_flag(getattr(owner, name), name, type(owner).__name__)


# The compute dtypes a model config takes, by name.
COMPUTE_DTYPES = ("float32", "bfloat16")


def check_compute_dtype(owner: Any) -> None:
    """Raise unless ``owner.dtype`` is one of ``COMPUTE_DTYPES`` as a string: a dtype object
    (``np.dtype("bfloat16") == "bfloat16"``) would give a config equal to the string one
    but of another hash (jit's static arguments and cached inits then miss), and not
    JSON-serialisable."""
    if not isinstance(owner.dtype, str) or owner.dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"{type(owner).__name__}.dtype must be one of {COMPUTE_DTYPES}, got {owner.dtype!r}"
        )


def _is_real(value: Any) -> bool:
    """A plain real number: not a bool, a string, None or a (0-d, unhashable) JAX array."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_finite_real(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value)  # NaN is not finite either


def check_positive(owner: Any, name: str) -> None:
    """Raise unless the field is a finite real number > 0.

    A string (``"1e-5"``) would otherwise fail with a ``TypeError`` naming no field, and
    ``inf`` would pass and silently switch the layer off (a layer norm with ``eps = inf``
    outputs its bias; rope with ``base = inf`` rotates nothing). A 0-d JAX array is
    refused too: the config must stay hashable for ``jit``.
    """
    value = getattr(owner, name)
    if not (_is_finite_real(value) and value > 0):
        raise ValueError(
            f"{type(owner).__name__}.{name} must be positive (a finite number), got {value!r}"
        )


def check_finite(owner: Any, name: str) -> None:
    """Raise unless the field is a finite real number (of either sign).

    NaN or inf (an LSTM's ``forget_bias``) would pass into every weight it initialises and
    show only as a NaN loss; a string would fail in ``init`` naming no field, or not at all.
    """
    value = getattr(owner, name)
    if not _is_finite_real(value):
        raise ValueError(f"{type(owner).__name__}.{name} must be a finite number, got {value!r}")


def check_rate(owner: Any, name: str) -> None:
    """Raise unless the field is a real number in ``[0, 1)`` (a dropout rate)."""
    check_rate_value(getattr(owner, name), f"{type(owner).__name__}.{name}")


def check_rate_value(value: Any, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``value`` is a real number in ``[0, 1)``.

    ``check_dropout_rate`` alone takes a 0-d array, which leaves a config unhashable for
    ``jit`` and becomes an NNX module's state, traced by ``nnx.jit`` (whose first call then
    failed "must be a concrete number, got a traced value", for a value nobody traced).
    """
    if not _is_real(value):
        raise ValueError(
            f"{where} must be a number in [0, 1) (a scalar, not an array), got {value!r}"
        )
    check_dropout_rate(value, where)


@functools.lru_cache(maxsize=32)
def _init_tree(init_fn: Callable, config: Any) -> Any:
    """``init_fn(key, config)``'s tree of shapes, traced once per config (no FLOPs)."""
    return jax.eval_shape(lambda: init_fn(jax.random.key(0), config))


@functools.lru_cache(maxsize=32)
def _init_signature(init_fn: Callable, config: Any) -> tuple[Any, tuple[tuple[int, ...], ...]]:
    """(tree structure, leaf shapes) of ``init_fn(key, config)``, for a quick comparison."""
    leaves, treedef = jax.tree_util.tree_flatten(_init_tree(init_fn, config))
    return treedef, tuple(tuple(leaf.shape) for leaf in leaves)


@functools.lru_cache(maxsize=32)
def init_shapes(init_fn: Callable, config: Any) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of ``init_fn(key, config)``'s leaves, traced once per config."""
    leaves = jax.tree_util.tree_flatten_with_path(_init_tree(init_fn, config))[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}


def check_weights(weights: Any, init_fn: Callable, config: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``weights`` has the leaves (paths and shapes) that
    ``init_fn(key, config)`` gives, e.g. dot-attention weights for a general config, and
    every leaf is floating (any float dtype: an integer one gave wrong outputs silently).

    Cheap: compares ``jax.eval_shape`` of the init, cached per config, with the tree
    structure and shapes (a few µs; ``generate`` checks on every call). The tree paths, which
    cost about ten times as much to spell, are only worked out to name a difference.
    """
    leaves, treedef = jax.tree_util.tree_flatten(weights)
    leaf_shapes = tuple(tuple(getattr(leaf, "shape", ("not an array",))) for leaf in leaves)
    want_treedef, want_shapes = _init_signature(init_fn, config)
    if treedef != want_treedef or leaf_shapes != want_shapes:
        _check_weight_paths(weights, leaf_shapes, init_fn, config, where)
    check_floating_leaves(weights, "weights", where, leaves)


def _check_weight_paths(
    weights: Any,
    leaf_shapes: tuple[tuple[int, ...], ...],
    init_fn: Callable,
    config: Any,
    where: str,
) -> None:
    """``check_weights``' slow path: raise ``ValueError`` naming the paths that are missing,
    unexpected or of another shape than ``init_fn``'s (``leaf_shapes``: ``weights``' leaves'
    shapes, in ``tree_flatten``'s order)."""
    want = init_shapes(init_fn, config)
    # The same leaves in the same order (tree_flatten's), now with their paths.
    paths = jax.tree_util.tree_flatten_with_path(weights)[0]
    got = {jax.tree_util.keystr(path): shape for (path, _), shape in zip(paths, leaf_shapes)}
    if got == want:
        return
    missing = [key for key in want if key not in got]
    extra = [key for key in got if key not in want]
    shapes = [f"{k} {got[k]} != {want[k]}" for k in want if k in got and got[k] != want[k]]
    found = [("missing", missing), ("unexpected", extra), ("shape (weights != config)", shapes)]
    differences = "; ".join(
        f"{what}: {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
        for what, items in found
        if items
    )
    raise ValueError(
        f"{where}: the weights ({type(weights).__name__}) do not match the "
        f"{type(config).__name__}: {differences}"
    )
