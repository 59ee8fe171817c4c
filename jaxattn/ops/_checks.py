"""Argument checks shared by every layer above (sizes and seeds as integers), and the call
helpers that go with them.

Kept in ``ops`` (the bottom layer) so that models, training and the scripts all import
the one check, and the arrows between the layers still point down.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def as_size(value: Any, minimum: int) -> int | None:
    """``value`` as an int if it is an integer ``>= minimum`` (bools are not), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        size = operator.index(value)
    except TypeError:  # a float, a non-scalar array, a tracer
        return None
    return size if size >= minimum else None


def check_size(value: int, name: str, where: str, minimum: int = 1) -> int:
    """Return ``value`` as an int; ``ValueError`` unless it is an integer ``>= minimum``.

    Sizes fix array shapes, so bools and floats such as ``2.0`` are refused here rather
    than deep inside JAX. Integer scalars that ``operator.index`` takes (``np.int64``, a
    concrete 0-d JAX or NumPy integer array, as shapes accept) pass; tracers do not.
    Seeds use ``minimum=0``: grain's and NumPy's generators refuse a negative one only
    when the first batch is drawn, naming nothing.
    """
    size = as_size(value, minimum)
    if size is None:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return size


def is_real_scalar(value: Any) -> bool:
    """True for a real scalar (a Python, NumPy or 0-d JAX number), not a bool: float("1.0")
    would pass a string, which then fails in a comparison; None and complex numbers are
    refused too. bfloat16 counts: its NumPy kind is "V", not "f"."""
    if np.ndim(value) != 0:
        return False
    dtype = np.asarray(value).dtype
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)


def check_flag(value: bool, name: str, where: str) -> bool:
    """Return ``value`` as a bool; ``ValueError`` unless it is a bool or ``np.bool_``.

    A switch that picks code (``bidirectional``, ``reverse``) would take any truthy value
    as on: ``"no"`` or ``"False"`` from a config file would silently turn it on.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{where}: {name} must be a bool, got {value!r}")
    return bool(value)


def check_int_scalar(value: Any, name: str, where: str) -> None:
    """``ValueError`` unless ``value`` is an integer scalar: a Python int, or a 0-d integer
    array (traced too). Cache indices and fill ids are cast to int32 or indexed with: a
    float would be truncated, a ``[1]`` array would fail inside ``take`` or ``int()``."""
    if jnp.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.integer):
        raise ValueError(
            f"{where}: {name} must be an integer scalar, got {jnp.result_type(value)} of "
            f"shape {jnp.shape(value)}"
        )


def check_float_dtype(dtype: Any, where: str, name: str = "dtype") -> None:
    """``ValueError`` unless ``dtype`` is a floating dtype. Weights are trained and tables
    hold fractions: an integer layer-norm scale silently got no gradient, and an integer
    sinusoid table was all -1, 0 and 1 (the random initialisers failed in ``jax.random``,
    naming neither the function nor the argument)."""
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:  # not a dtype at all
        floating = False
    if dtype is None or not floating:  # (NumPy reads None as float64)
        raise ValueError(f"{where}: {name} must be a floating dtype, got {dtype!r}")


@functools.lru_cache(maxsize=64)
def is_floating_dtype(dtype: Any) -> bool:
    """Whether ``dtype`` is a floating JAX/NumPy dtype. One JAX cannot read (a torch
    tensor's ``torch.float32``) is not: ``issubdtype`` raised "Cannot interpret
    'torch.float32' as a data type", so the checks that call this named nothing."""
    try:
        return bool(jnp.issubdtype(dtype, jnp.floating))
    except TypeError:
        return False


def describe_dtype(value: Any) -> str:
    """``value``'s dtype for an error message: ``int32``; its type without a dtype (``list``,
    ``NoneType``); with its type where the dtype is not JAX's or NumPy's (``Tensor of
    torch.float32 (not a JAX or NumPy array)``: a torch tensor, floating to torch)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return type(value).__name__
    if isinstance(dtype, np.dtype) or isinstance(value, jax.Array):  # (key<fry>: JAX's own)
        return str(dtype)
    return f"{type(value).__name__} of {dtype} (not a JAX or NumPy array)"


def check_floating_leaves(tree: Any, name: str, where: str, leaves: list | None = None) -> None:
    """``ValueError`` naming ``where``, ``name`` and the offending leaves (path and dtype)
    unless every leaf of the weight pytree ``tree`` is floating. A leaf without a dtype is
    left to the caller's shape checks. ``leaves``: ``tree``'s, when the caller has them.

    An integer leaf (a kernel cast with ``astype(jnp.int32)``) ran silently: the layers
    cast it back to the compute dtype, and the truncated values gave wrong outputs. Cheap
    when all leaves are floating (one cached ``issubdtype`` per distinct dtype); the
    paths are only spelled out to name a leaf that is not.
    """
    leaves = jax.tree_util.tree_leaves(tree) if leaves is None else leaves
    dtypes = {getattr(leaf, "dtype", None) for leaf in leaves}
    if all(dtype is None or is_floating_dtype(dtype) for dtype in dtypes):
        return
    bad = [
        f"{jax.tree_util.keystr(path)} {describe_dtype(leaf)}".lstrip()  # (a bare array: no path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if getattr(leaf, "dtype", None) is not None and not is_floating_dtype(leaf.dtype)
    ]
    more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    raise ValueError(
        f"{where}: {name} must be floating (an init's float32, or another float dtype), got "
        f"{', '.join(bad[:3])}{more}"
    )


def check_floating_array(value: Any, name: str, where: str) -> None:
    """``ValueError`` naming ``where`` and ``name`` unless ``value`` is an array (JAX, NumPy,
    a tracer) of a floating dtype. For a weight of a layer: an integer one ran silently
    (cast back to the compute dtype, its truncated values gave wrong outputs; an integer
    table's rows came out as integers), and a nested list or None failed as "'list' object
    has no attribute 'shape'" or with JAX's DeprecationWarning, naming neither. Cheap: one
    cached ``issubdtype`` per distinct dtype (well under a microsecond)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None or not is_floating_dtype(dtype):
        raise ValueError(
            f"{where}: {name} must be a floating array (an init's float32, or another float "
            f"dtype), got {describe_dtype(value)}"
        )


def check_weights_type(weights: Any, cls: type, init: str, where: str) -> None:
    """``TypeError`` naming ``where`` unless ``weights`` is a ``cls``, the NamedTuple that
    ``init`` makes. A bare tuple, a dict (an orbax restore without a target) or a bare array
    failed on an attribute ("'tuple' object has no attribute 'w'"), naming neither."""
    if not isinstance(weights, cls):
        raise TypeError(
            f"{where}: weights must be {cls.__name__} ({init}), got {type(weights).__name__}"
        )


def check_weight_arrays(
    weights: Any, cls: type, init: str, where: str, optional: tuple[str, ...] = ()
) -> None:
    """``check_weights_type``, then ``check_floating_array`` on each field of ``weights``
    (named ``weights.<field>``); a field in ``optional`` (a bias) may also be None."""
    check_weights_type(weights, cls, init, where)
    for field, value in zip(weights._fields, weights):
        if value is not None or field not in optional:
            check_floating_array(value, f"weights.{field}", where)


# jax.random.key takes a seed up to int64's maximum; the scripts seed their validation
# batches with seed + 1.
MAX_SEED = 2**63 - 2


def check_seed(value: int, name: str, where: str) -> int:
    """Return ``value`` as an int; ``ValueError`` unless it is an integer in
    ``[0, MAX_SEED]``. (Above it, ``jax.random.key`` raises ``OverflowError`` naming
    nothing, after a script has made its workdir.)"""
    seed = check_size(value, name, where, minimum=0)
    if seed > MAX_SEED:
        raise ValueError(f"{where}: {name} must be an int in [0, 2**63 - 2], got {value!r}")
    return seed


@contextlib.contextmanager
def forward_mode_hint(kernel: str, fix: str) -> Iterator[None]:
    """Re-raise JAX's refusal of forward-mode autodiff through a ``jax.custom_vjp``
    ("can't apply forward-mode autodiff (jvp) to a custom_vjp function", which names
    nothing) as one that names ``kernel`` and the ``fix``.

    Only where JAX refuses during the call: ``jax.jvp`` and ``jax.jacfwd`` of unjitted
    code. Under ``jit`` (and for ``jax.linearize``) JAX refuses later, while
    differentiating the traced program, with its own message.
    """
    try:
        yield
    except TypeError as error:
        if "forward-mode autodiff" not in str(error):
            raise
        raise TypeError(
            f"{kernel} has a hand-written reverse-mode gradient (jax.custom_vjp), so "
            f"forward mode (jax.jvp, jax.jacfwd) cannot run through it: {fix}"
        ) from error


def jit_when_eager(fun: Callable, **jit_options: Any) -> Callable:
    """``fun`` under ``jax.jit(fun, **jit_options)`` when no argument is a tracer, and
    ``fun`` itself inside a trace (``jit``, ``grad``, ``vmap``).

    Called eagerly, a ``lax.scan`` or ``fori_loop`` over a closure built per call is traced
    and compiled anew every time (about a second for a small GPT); one module-level jit
    keeps one program per shapes and static settings. Inside a trace the plain function
    runs, so the caller's program is the one it always was: an inner jit boundary changed
    it (XLA:CPU then copied a decoding step's KV cache rather than updating it in place).
    """
    jitted = jax.jit(fun, **jit_options)

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        leaves = jax.tree.leaves((args, kwargs))
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in leaves)
        return (fun if traced else jitted)(*args, **kwargs)

    return call


def caller_stacklevel(files: tuple[str, ...], packages: tuple[str, ...] = ()) -> int:
    """``warnings.warn``'s ``stacklevel`` that points the warning at the first frame
    outside ``files`` and outside the top-level ``packages`` (e.g. ``("flax",)``, whose
    constructor runs a module's ``__init__``). Call it in the ``warnings.warn`` call
    itself, from the function that warns."""
    frame, level = sys._getframe(1), 1  # level 1: the frame that calls warnings.warn
    while frame is not None and (
        frame.f_code.co_filename in files
        or frame.f_globals.get("__name__", "").split(".")[0] in packages
    ):
        frame, level = frame.f_back, level + 1
    return level
