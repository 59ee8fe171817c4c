"""Save and load any jaxattn weight pytree as a ``.safetensors`` file.

Each array leaf is stored under its key path joined by ``/``: NamedTuple fields by name, dict
keys as strings, tuple/list items by index, e.g. ``blocks/attn/w_q`` or ``0/forward/w_ih``.
``None`` leaves (absent biases) are not stored; loading takes a template (``like``) with the
same structure, so they come back as ``None``. The file holds each leaf's own dtype (bfloat16
and 64-bit NumPy leaves included); loaded leaves are JAX arrays, so 64-bit tensors come back
as 64-bit only with ``jax_enable_x64`` (as ``jnp.asarray`` would give them).

A ``jaxattn.nn`` module stands for its ``pure_weights()``: saved under the pure tree's names
(``0/w_ih``), and as ``like`` it gives the pure tree back (``Module.from_weights(tree)``
makes a module of it).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.interop._tensors import (
    names_ending_alike,
    naming_the_file,
    pure_weights_of,
    read_safetensors,
    to_numpy,
)


def _key_name(entry: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def flatten_with_names(tree: Any) -> dict[str, Any]:
    """Return ``{"a/b/c": leaf}`` for every leaf of ``tree`` (``None`` leaves are skipped)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out: dict[str, Any] = {}
    for path, leaf in leaves:
        name = "/".join(_key_name(p) for p in path)
        if name in out:
            raise ValueError(f"two leaves share the name {name!r}")
        out[name] = leaf
    return out


def save_safetensors(
    weights: Any, path: str | os.PathLike, *, metadata: dict[str, str] | None = None
) -> None:
    """Write every array leaf of ``weights`` to ``path`` (see the module docstring for names).

    Args:
      weights: any pytree of arrays (``GPTWeights``, LSTM layers, a dict ...), or a
        ``jaxattn.nn`` module: its ``pure_weights()`` are saved, so the names (``0/w_ih``)
        match the pure trees' templates (an ``nnx.state`` would give
        ``weights/0/w_ih/value``, which they do not).
      path: the file to write. An existing file there is replaced (as ``np.save`` and
        ``torch.save`` do), but only by a whole new file: it is written beside it and
        renamed over it, so a save that fails (a bad leaf, a full disk) leaves it as it was.
        A symbolic link is followed: the file it names is replaced and the link kept.
      metadata: optional string-to-string metadata stored in the header (read it back
        with ``read_safetensors_metadata``), e.g. a JSON config.
    """
    from safetensors.flax import save_file

    # np.asarray, not jnp.asarray: without x64, jnp would turn float64 / int64 leaves into
    # 32-bit ones before they reach the file. order="C": safetensors writes the raw buffer
    # from the array's data pointer, so a transposed or strided NumPy view would be stored
    # in its memory order (silently scrambled); a C-contiguous copy is taken only for those.
    leaves = flatten_with_names(pure_weights_of(weights))
    for name, leaf in leaves.items():
        # (JAX's own error says what to do but not which leaf; safetensors has no key dtype)
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise TypeError(
                f"save_safetensors: leaf {name!r} is a typed PRNG key, which safetensors "
                "cannot store; save jax.random.key_data(key) (a uint32 array) instead"
            )
    flat = {
        # (torch tensors, e.g. a framework="pt" export, through to_numpy: bfloat16, grads)
        name: np.asarray(to_numpy(leaf) if hasattr(leaf, "detach") else leaf, order="C")
        for name, leaf in leaves.items()
    }
    for name, arr in flat.items():
        # An abstract module's ShapeDtypeStructs (or a string): safetensors' own error,
        # 'Unknown dtype "object"', names neither the leaf nor why.
        if arr.dtype.kind in "OSU":
            raise TypeError(
                f"save_safetensors: leaf {name!r} is a {type(leaves[name]).__name__}, not an "
                "array (an abstract, eval_shape'd tree holds shapes, not values)"
            )
    # The link's target, as np.save writes through a link; os.replace would swap the link
    # itself for a regular file and leave the file it names with the old weights.
    target = os.path.realpath(os.fspath(path))
    # Else safetensors' I/O error names the temporary file, or os.replace names both.
    if os.path.isdir(target):
        raise IsADirectoryError(f"save_safetensors: {os.fspath(path)} is a directory, not a file")
    if not os.path.isdir(os.path.dirname(target)):
        raise FileNotFoundError(
            f"save_safetensors: the folder of {os.fspath(path)} does not exist (create it first)"
        )
    partial = f"{target}.partial-{uuid.uuid4().hex}"  # one per call, also across threads
    try:
        save_file(flat, partial, metadata=metadata)
        os.replace(partial, target)  # atomic on one file system
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string-to-string ``metadata`` a ``save_safetensors`` call (or any safetensors
    writer) stored in ``path``'s header; ``{}`` when it stored none. No tensor is read.

    Raises:
      ValueError: ``path`` is not a valid safetensors file.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    with naming_the_file(path), safe_open(path, framework="np") as f:
        return dict(f.metadata() or {})


def _kind(dtype: Any) -> str:
    """``floating-point``, ``integer``, ``bool`` or ``complex``: the dtypes one leaf may
    take from a file (any width)."""
    kinds = {"bool": jnp.bool_, "integer": jnp.integer, "floating-point": jnp.floating,
             "complex": jnp.complexfloating}  # fmt: skip
    return next((k for k, parent in kinds.items() if jnp.issubdtype(dtype, parent)), str(dtype))


def load_safetensors(path: str | os.PathLike, like: Any = None, *, strict: bool = True) -> Any:
    """Read a file written by ``save_safetensors`` into the structure of ``like``.

    Args:
      path: the ``.safetensors`` file.
      like: a template pytree (e.g. ``init_gpt(rng, config)`` or ``jax.eval_shape`` of it)
        whose leaves give the expected shapes; None returns the flat ``{name: array}`` dict.
        A ``jaxattn.nn`` module is read as its ``pure_weights()`` (that tree is returned).
      strict: raise if the file holds tensors the template has no place for.

    Returns:
      A pytree like ``like`` with the file's arrays (their stored dtype: a bfloat16 file
      loads as bfloat16 into a float32 template).

    Raises:
      ValueError: ``path`` is not a valid safetensors file (truncated, empty, other format).
      KeyError: a leaf of ``like`` has no tensor in the file (the message names it).
      ValueError: a tensor's shape differs from the template's (name and both shapes), its
        kind does (an integer or bool tensor for a floating-point leaf, or the reverse:
        the numbers would be read as weights), or with ``strict`` the file has unexpected
        tensors.
    """
    from safetensors.flax import load_file

    # (jnp.asarray: a file with float8 tensors is read as NumPy arrays)
    stored = {k: jnp.asarray(v) for k, v in read_safetensors(path, load_file).items()}
    if like is None:
        return stored
    like = pure_weights_of(like)
    expected = flatten_with_names(like)
    missing = [name for name in expected if name not in stored]
    if missing:
        # Each with its shape, and the file's names ending like the first: a tree saved
        # whole (a TrainState's params/...) or from nnx.state (.../value) holds them all.
        listed = ", ".join(f"{n!r} {tuple(jnp.shape(expected[n]))}" for n in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        near = names_ending_alike(stored, missing[0], sep="/")
        hint = f"; keys ending alike: {near}" if near else ""
        raise KeyError(
            f"load_safetensors: {os.fspath(path)}: {len(missing)} missing tensor(s) (expected "
            f"shapes after each): {listed}{more}{hint}"
        )
    for name, leaf in expected.items():
        if tuple(stored[name].shape) != tuple(jnp.shape(leaf)):
            raise ValueError(
                f"{os.fspath(path)}: tensor {name!r} has shape {tuple(stored[name].shape)}, "
                f"expected {tuple(jnp.shape(leaf))}"
            )
        # (a leaf's own dtype: jnp.result_type refuses a big-endian NumPy leaf)
        want = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
        got = stored[name].dtype
        if _kind(want) != _kind(got):
            raise ValueError(
                f"{os.fspath(path)}: tensor {name!r} is {got}, expected {_kind(want)} "
                f"values like the template's {want}"
            )
    extra = sorted(set(stored) - set(expected))
    if strict and extra:
        raise ValueError(
            f"{os.fspath(path)}: unexpected tensors {extra}: the template has no place for "
            "them (a model of another config, e.g. one with biases into use_bias=False?); "
            "strict=False drops them"
        )
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(treedef, [stored[name] for name in expected])
