"""SPMD training on a device mesh: mesh, partition rules, batch and state shardings.

jaxattn scales out with JAX's own engine: the train step is one ``jax.jit`` program whose
inputs carry ``NamedSharding``s over a mesh with three named axes, and XLA's SPMD
partitioner inserts the collectives. Any axis may have size 1.

- ``data``: batch rows split across devices; parameters replicated (plain data parallel).
- ``fsdp``: batch rows split *and* large matrices split along their model dimension
  (ZeRO-3 / FSDP: weights are all-gathered per use, gradients reduce-scattered).
- ``tensor``: attention heads, MLP width and the vocabulary split across devices
  (Megatron-style tensor parallelism); the batch is replicated along it.

Models name the axes of their parameters with *logical* names through path rules (see
``models/partitioning.py``), e.g. ``("attn/w_q$", ("embed", "heads", None))``; this module
maps logical names to mesh axes (``LOGICAL_TO_MESH``), so the training code never needs
to know a model's structure. A rule names the *trailing* axes of a leaf, so stacked
layers (a leading ``[L]`` axis) and optimizer moments (the same paths under
``opt_state/...``) match the same rule. A dimension that a mesh axis does not divide is
replicated instead (e.g. 65 characters over ``tensor=2``); ``tree_shardings`` warns when
an ``fsdp`` or ``tensor`` axis of size > 1 thus splits no parameter at all.

With several processes (``jax.distributed.initialize``), every process runs the same
program; each loads only the batch rows that its own devices hold
(``process_batch_slice``) and ``global_batch`` assembles the global array from them.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxattn.ops._checks import as_size, caller_stacklevel, check_size

MESH_AXES = ("data", "fsdp", "tensor")
# The batch (leading) axis of every input is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")
# Logical parameter axis -> mesh axis; names not listed here stay replicated.
LOGICAL_TO_MESH: Mapping[str, str] = {
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}
# (path regex, logical names of the leaf's trailing axes); first match wins.
Rules = Sequence[tuple[str, tuple[str | None, ...]]]


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """Build a ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices).

    One size may be ``-1``: it takes whatever the others leave. The product must equal
    the number of devices (every device of every process on a multi-host run).

    Raises:
      ValueError: naming the sizes and the device count when they do not fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:  # (the size check below failed with an IndexError naming nothing)
        raise ValueError("make_mesh: devices is empty; pass at least one device (or None)")
    # (a repeat made a mesh, and global_batch then failed asking for twice the batch's rows)
    if len(set(devices)) < len(devices):
        repeated = sorted({str(d) for d in devices if devices.count(d) > 1})
        raise ValueError(f"make_mesh: devices lists {', '.join(repeated)} more than once")
    given = {"data": data, "fsdp": fsdp, "tensor": tensor}
    # (as_size refuses bools, which would read as 1; a NumPy integer from a config file is a
    # size like any int)
    sizes = {name: as_size(s, -1) for name, s in given.items()}
    if any(s in (None, 0) for s in sizes.values()):
        raise ValueError(f"mesh sizes must be integers >= 1 (or one -1), got {given}")
    free = [name for name, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {sizes}")
    if free:
        known = math.prod(s for s in sizes.values() if s != -1)
        if len(devices) % known:
            raise ValueError(f"mesh {sizes} does not divide the {len(devices)} devices")
        sizes[free[0]] = len(devices) // known
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = "
            f"{math.prod(shape)} devices, but there are {len(devices)} "
            f"({devices[0].platform}); the product must equal the device count"
        )
    # Auto axes: the partitioner propagates shardings through model code that has no
    # sharding annotations of its own.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def path_string(path: tuple[Any, ...]) -> str:
    """``(GetAttrKey('params'), DictKey('w'), SequenceKey(0))`` -> ``"params/w/0"``."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _first_rule(path: str, rules: Rules) -> tuple[str, tuple[str | None, ...]] | None:
    """``(regex, logical names)`` of the first rule whose regex ``re.search``-es ``path``."""
    return next(((p, names) for p, names in rules if re.search(p, path)), None)


def leaf_spec(
    path: str,
    shape: tuple[int, ...],
    rules: Rules,
    mesh: Mesh,
    logical_to_mesh: Mapping[str, str] = LOGICAL_TO_MESH,
) -> PartitionSpec:
    """The ``PartitionSpec`` of one leaf: the first rule whose regex ``re.search``-es ``path``.

    The rule's logical names cover the leaf's trailing axes (leading axes are replicated);
    a logical name becomes its mesh axis only when that axis has size > 1, divides the
    dimension and is not used by an earlier dimension of the same leaf.

    Raises:
      ValueError: a rule names more axes than the leaf has, or ``logical_to_mesh`` maps a
        name to an axis the mesh does not have.
    """
    match = _first_rule(path, rules)
    if match is None:
        return PartitionSpec()
    pattern, logical = match
    if len(logical) > len(shape):
        raise ValueError(
            f"partition rule {pattern!r} names {len(logical)} axes {logical} but {path} has "
            f"shape {shape}"
        )
    padded = (None,) * (len(shape) - len(logical)) + tuple(logical)
    spec, used = [], set()
    for dim, name in zip(shape, padded, strict=True):
        axis = logical_to_mesh.get(name) if name is not None else None
        if axis is not None and axis not in mesh.shape:  # (a bare KeyError named the axis only)
            raise ValueError(
                f"logical axis {name!r} of {path} maps to mesh axis {axis!r}, but the mesh's "
                f"axes are {tuple(mesh.shape)}"
            )
        size = mesh.shape[axis] if axis is not None else 1
        if axis is None or size == 1 or dim % size or axis in used:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def tree_shardings(
    tree: Any,
    rules: Rules,
    mesh: Mesh,
    logical_to_mesh: Mapping[str, str] = LOGICAL_TO_MESH,
) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s).

    Pass the whole ``TrainState``: optimizer moments live under paths that end like their
    parameter's (``opt_state/.../mu/blocks/attn/w_q``), so they shard like it; leaves no
    rule matches (step, PRNG key, counters, norms) are replicated, and so is optimizer
    state of fewer axes than its parameter's rule names (Adafactor's factored ``v_row`` /
    ``v_col``, ``[1]`` for a parameter it does not factor).
    """

    def sharding(path, leaf):
        name, shape = path_string(path), tuple(np.shape(leaf))
        try:
            spec = leaf_spec(name, shape, rules, mesh, logical_to_mesh)
        except ValueError:
            # (a rule describes the parameter: the error is for a parameter it does not fit;
            # optax.adafactor's state made every TrainState fail, on one device too)
            rule = _first_rule(name, rules)
            if "opt_state" not in name.split("/") or rule is None or len(rule[1]) <= len(shape):
                raise
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(sharding, tree)
    _warn_about_idle_axes(shardings, mesh, logical_to_mesh)
    return shardings


def _warn_about_idle_axes(shardings: Any, mesh: Mesh, logical_to_mesh: Mapping[str, str]) -> None:
    """Warn for each mesh axis of size > 1 that should split parameters (``fsdp``,
    ``tensor``) but splits no leaf of the tree: no dimension it applies to is a multiple
    of its size (e.g. 6 heads over ``tensor=4``), so every leaf is replicated over it."""
    used = {
        axis
        for s in jax.tree.leaves(shardings)
        for part in s.spec
        for axis in (part if isinstance(part, tuple) else (part,))
        if axis is not None
    }
    for axis in dict.fromkeys(logical_to_mesh.values()):
        size = mesh.shape.get(axis, 1)
        if size > 1 and axis not in used:
            names = ", ".join(n for n, a in logical_to_mesh.items() if a == axis)
            warnings.warn(
                f"mesh axis {axis}={size} splits no parameter (no {names} dimension is a "
                f"multiple of {size}): every parameter is replicated over its devices",
                stacklevel=caller_stacklevel((__file__,)),
            )


def create_sharded(
    init_fn: Callable[[], Any], rules: Rules, mesh: Mesh, *, abstract: bool = False
) -> tuple[Any, Any]:
    """Run ``init_fn`` (e.g. building a ``TrainState``) directly into its shardings.

    One jitted program with ``out_shardings`` from ``rules``: each device computes and
    holds only its own shards, so a model too large for one device can be initialised.

    ``abstract=True`` runs nothing: the tree's leaves are ``jax.ShapeDtypeStruct``s with
    their shardings, the target to restore a checkpoint into (``fit`` resumes from it
    without first compiling, running and holding an initial state the restore replaces).

    Returns:
      ``(tree, shardings)``: the initialised (or abstract) pytree and its ``NamedSharding``
      per leaf.
    """
    shapes = jax.eval_shape(init_fn)
    shardings = tree_shardings(shapes, rules, mesh)
    if abstract:
        struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.tree.map(struct, shapes, shardings), shardings
    return jax.jit(init_fn, out_shardings=shardings)(), shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over ``data`` and ``fsdp``; replicate over ``tensor``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full value on every device (scalars, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def process_batch_slice(
    sharding: NamedSharding, global_batch_size: int, name: str = "batch size"
) -> slice:
    """The rows of a ``[global_batch_size, ...]`` batch that this process's devices hold.

    With the batch split over ``data`` x ``fsdp`` (or the mesh axes that ``sharding``'s
    spec names for the rows, as ``global_batch`` reads them) and devices grouped by
    process, they are one contiguous range; a process loads only those rows.

    Raises:
      ValueError: the size is not an int >= 1, or the batch does not split evenly over the
        devices (the errors name the size as ``name``), or this process's rows are not
        contiguous.
    """
    # (the axes of the spec, not BATCH_AXES: a batch over `data` alone was refused when
    # data x fsdp did not divide it, and one over all three axes met JAX's IndivisibleError)
    # (None failed as "unsupported operand type(s) for %", and 0 passed, as 0 rows)
    global_batch_size = check_size(global_batch_size, name, "process_batch_slice")
    axes, shards, _ = _row_blocks(sharding)
    if global_batch_size % shards:
        raise ValueError(
            f"{name} {global_batch_size} does not split over {' x '.join(axes)} = {shards} devices"
        )
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    rows = sorted({(s[0].start or 0, s[0].stop or global_batch_size) for s in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError(f"this process's batch rows {rows} are not one contiguous range")
    return slice(start, stop)


@functools.lru_cache(maxsize=16)
def _row_blocks(sharding: NamedSharding) -> tuple[tuple[str, ...], int, int]:
    """``(axes, shards, blocks)``: the mesh axes that split a batch's rows, the number of
    row shards they make, and how many distinct row blocks this process's devices hold (all
    of them on one process). Per sharding, not per batch: ``global_batch`` runs every step.
    """
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    index_map = sharding.addressable_devices_indices_map((shards,))
    return axes, shards, len({s[0].start or 0 for s in index_map.values()})


def global_batch(local_batch: Any, sharding: NamedSharding) -> Any:
    """Assemble global arrays from this process's rows (``process_batch_slice``) of a batch.

    Args:
      local_batch: pytree of NumPy arrays ``[local_rows, ...]``; on one process, the
        whole batch.
      sharding: from ``batch_sharding``.

    Returns:
      The same pytree of ``jax.Array``s ``[global_rows, ...]`` split by ``sharding``, the
      global size worked out from the local rows and the mesh: the rows of one row block
      (``local_rows`` over the number of blocks this process's devices hold) times the
      number of blocks (``local_rows * processes`` when each process holds its own rows;
      ``local_rows`` when every process holds the whole batch, e.g. a ``tensor`` axis
      across processes; in between when groups of processes share rows, and processes may
      then hold different numbers of blocks).

    Raises:
      ValueError: a leaf's rows do not split evenly over the batch shards of this
        process's devices (naming the leaf, its shape and the mesh axes).
    """
    axes, shards, blocks = _row_blocks(sharding)

    def place(path, x):
        x = np.asarray(x)
        if not x.ndim:  # (JAX refused it naming neither the leaf nor the batch)
            raise ValueError(
                f"global_batch: batch leaf {path_string(path) or '(root)'} is a scalar "
                f"(shape {x.shape}); every leaf needs a leading batch axis of rows"
            )
        # (JAX's own IndivisibleError named neither the leaf nor the batch, only a shape)
        if x.shape[0] % blocks:
            over = f"{' x '.join(axes)} = {shards}"
            over = (
                f"{over} devices"
                if blocks == shards
                else f"this process's {blocks} (of {over}) devices"
            )
            raise ValueError(
                f"global_batch: batch leaf {path_string(path) or '(root)'} has "
                f"{x.shape[0]} rows (shape {x.shape}), which do not split over {over}"
            )
        # The global shape given, not inferred: JAX cannot infer it when the processes
        # hold different numbers of row blocks (a batch axis across processes, as
        # data=2 x tensor=3 over 3 processes of 2 devices), and failed naming neither.
        shape = (x.shape[0] * shards // blocks, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree_util.tree_map_with_path(place, local_batch)


def to_host(tree: Any) -> Any:
    """Fetch replicated (e.g. metric) arrays to NumPy, also when other processes hold devices
    of the array: every process reads its own copy instead of gathering."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"cannot fetch a sharded array {x.shape} across processes")
            return np.asarray(x.addressable_data(0))
        return x

    return jax.device_get(jax.tree.map(fetch, tree))


def gather_params(tree: Any) -> Any:
    """The whole value of every leaf on this host, for work one host does alone (sampling,
    decoding a test set). One process: the tree itself (jit reads sharded arrays as they
    are). Several: NumPy copies gathered from all processes (a collective: every process
    must call it).
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
