"""Checkpoints: orbax ``CheckpointManager`` in ``WORKDIR/checkpoints/<step>/``.

Each step directory holds three items:

- ``state``: the ``TrainState`` pytree (orbax ``StandardSave``),
- ``data``: the grain iterator state (grain's orbax handler; optional),
- ``meta``: a JSON object with the caller's metadata (config, vocabulary, ...) and the
  *tree signature* of the state: ``[path, shape, dtype]`` of every leaf; and, for a step
  saved with metrics that rank it, a copy of them (``ranked_metrics``) beside orbax's own.

Before any array is read, ``restore`` compares the saved signature with the target tree and
raises ``IncompatibleCheckpointError`` naming the first mismatched leaf, so a workdir that
holds another model's checkpoint is an error that deletes and overwrites nothing. Saves are
asynchronous (orbax copies the arrays to host memory before ``save`` returns, so the
caller may donate them to the next step). Kept: the ``max_to_keep`` most recently saved
steps (in a run, the latest; orbax counts a step saved below a later one as the newest),
plus the step with the best ``best_metric`` (lowest) among those saved with metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from jaxattn.ops._checks import check_size
from jaxattn.training.metrics import is_remote
from jaxattn.training.sharding import path_string


class _DropOrbaxWarnings(logging.Filter):
    """Hide orbax's log lines about what this module does on purpose or reports itself: a
    save without metrics (see ``save``), the removal of a save that did not finish when
    its step is saved again, and a step's unreadable ``_CHECKPOINT_METADATA``, which orbax
    logs on every read of the step and then does without (``fit`` names both of the last
    when it opens the folder, see ``unfinished_saves`` and ``unreadable_step_records``)."""

    _DROPPED = (
        "did not provide metrics",
        "Removing existing directory since it is not finalized",
    )
    # orbax's messages for a step's _CHECKPOINT_METADATA that is empty, cut off or missing.
    _STEP_RECORD = ("Failed to json parse Metadata file", "Metadata file does not exist")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(text in message for text in self._STEP_RECORD):
            return _STEP_RECORD_NAME not in message
        return not any(text in message for text in self._DROPPED)


logging.getLogger("absl").addFilter(_DropOrbaxWarnings())

# orbax's record of a step's save (its start and commit times, the items' handlers), in
# the step's folder; a restore that names its items (as ``restore`` does) reads without it.
_STEP_RECORD_NAME = "_CHECKPOINT_METADATA"
# What orbax and this module write in a step's folder (a folder named like a step that
# holds none of them is not a checkpoint).
_STEP_ENTRIES = frozenset(
    {_STEP_RECORD_NAME, "commit_success.txt", "state", "meta", "data", "metrics", "descriptor"}
)


def _step_number(name: str) -> int | None:
    """The step a folder's name stands for in orbax's naming (``0``, ``12``; not ``012``)."""
    return int(name) if re.fullmatch(r"0|[1-9]\d*", name) else None


def holds_step_folders(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds folders named like orbax's steps, as a run's
    ``checkpoints`` folder does (False for a missing or unreadable one)."""
    try:
        return any(
            _step_number(p.name) is not None and p.is_dir() for p in epath.Path(directory).iterdir()
        )
    except Exception:  # missing, a file, unreadable: no steps to see
        return False


def _not_a_checkpoint(path: epath.Path) -> str | None:
    """Why ``path``, named like a step, is not one of orbax's step folders (None if it is):
    a file (orbax would delete it to save that step) or a folder that holds none of the
    files orbax writes (orbax would list it as a step, and delete it to keep the latest N).
    An empty folder holds nothing to lose and counts as a (broken) step."""
    try:
        if not path.exists():
            return None
        if not path.is_dir():
            return "a file, not a checkpoint folder"
        names = {child.name for child in path.iterdir()}
    except Exception:  # an unreadable entry is reported when it is read
        return None
    if names and not names & _STEP_ENTRIES:
        return f"a folder of other files ({', '.join(sorted(names)[:3])}), not a checkpoint"
    return None


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be read (corrupt, incomplete, or missing an item), or
    the checkpoints folder holds something else under a step's name."""


class IncompatibleCheckpointError(ValueError):
    """A checkpoint's tree (structure, shapes or dtypes) differs from the restore target."""


class NotWritableError(OSError):
    """A folder the run must write to (workdir, checkpoints) cannot be created or written."""


def check_writable(directory: str | os.PathLike) -> None:
    """Create ``directory`` if needed and check that this process can write a file in it.

    Run before any work that a failed save would lose. Without it a read-only checkpoint
    folder failed only at the first save, inside orbax's background thread, and the run
    then waited 5 minutes at a barrier before failing with an unrelated timeout.

    Raises:
      NotWritableError: naming the folder and the reason.
    """
    directory = epath.Path(directory)
    # One probe per process: the processes of a multi-host run share the folder.
    probe = directory / f".write_test.{jax.process_index()}.{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # OSError locally; object stores raise their own types.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, (FileExistsError, NotADirectoryError)) and not is_remote(directory):
            # (the folder or one above it is a file: "File exists" or "Not a directory"
            # alone named neither)
            file = next((p for p in (directory, *directory.parents) if p.is_file()), None)
            if file is not None:
                reason += f" ({file} is a file, not a folder)"
        raise NotWritableError(f"cannot write to {directory}: {reason}") from e


class FolderInUseError(NotWritableError):
    """Another process holds the folder's lock: a run is already training there."""


class FolderLock:
    """An exclusive lock on a local folder, held by process 0 while it trains there.

    Two runs in one workdir deleted and overwrote each other's checkpoints (each one's
    keep-N removed the other's steps; the later one then failed as "checkpoint step N
    already exists", or in orbax's thread at the first save) and interleaved their metrics.
    ``flock`` on the folder itself: no file is left behind, and the kernel drops the lock
    when its process ends, however it ends. Best effort: an object store (``gs://``), a
    filesystem without ``flock`` or a platform without ``fcntl`` is not locked. On several
    processes only process 0 locks (they share the folder) and all get its answer (a
    collective: all must call it).

    Raises:
      FolderInUseError: another process holds the lock (naming the folder and ``what``).
    """

    def __init__(self, directory: str | os.PathLike, what: str):
        self._fd: int | None = None
        directory = epath.Path(directory)
        in_use = False
        if jax.process_index() == 0 and not is_remote(directory):
            in_use = not self._acquire(str(directory))
        if jax.process_count() > 1:
            in_use = bool(multihost_utils.broadcast_one_to_all(np.int32(in_use)))
        if in_use:
            raise FolderInUseError(
                f"{what}: another process is training in {directory} (it holds the folder's "
                "lock): two runs there would delete and overwrite each other's checkpoints "
                "and metrics. Let it finish (or stop it: SIGTERM saves its checkpoint), or "
                "use another folder; nothing was changed"
            )

    def _acquire(self, path: str) -> bool:
        """Lock ``path``; False only if another process holds it."""
        try:
            import fcntl
        except ImportError:  # (Windows)
            return True
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # unreadable: the writes that follow report it
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # no flock on this filesystem (some network ones): unlocked
            os.close(fd)
            return True
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (again: nothing)."""
        if self._fd is not None:
            os.close(self._fd)  # (closing the only descriptor drops the flock)
            self._fd = None


def folder_exists(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a folder, as process 0 sees it: one answer on every process.

    Opening a ``Checkpointer`` is collective on a multi-process run (orbax's manager meets
    the other processes at barriers), so all processes must decide alike whether to open
    one. Each asking the filesystem for itself, a process that asks after another one has
    created the folder sees it where the others did not, opens a Checkpointer that they do
    not, and all of them fail at the next barrier (``sync_global_devices name mismatch``).
    """
    exists = epath.Path(directory).is_dir()
    if jax.process_count() == 1:
        return exists
    return bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))


def check_checkpoints_folder(directory: str | os.PathLike) -> None:
    """``check_writable(directory)``, then refuse an entry of it named like a step that is
    not a checkpoint: orbax deletes a file of that name to save the step, and lists a
    folder of other files as a step, deleting it to keep the latest N. Creates only the
    folder. A script calls it before it builds anything; ``Checkpointer`` on opening.

    Raises:
      NotWritableError: as ``check_writable``.
      CheckpointError: naming the entry (the first, by step).
    """
    check_writable(directory)
    directory = epath.Path(directory)
    try:
        entries = [p for p in directory.iterdir() if _step_number(p.name) is not None]
    except Exception:  # the folder was just written to; orbax reports the rest
        return
    for path in sorted(entries, key=lambda p: _step_number(p.name)):
        if (what := _not_a_checkpoint(path)) is not None:
            raise CheckpointError(
                f"{path} is {what}, but its name is that of step {path.name}'s checkpoint, "
                f"which a save would delete; move it out of {directory} (nothing was changed)"
            )


# How orbax's wrapper of a failed array read begins: it says only which slice, then prints
# the store's repr; the error it was raised from (TensorStore's) says what failed.
ORBAX_READ_ERROR = "Encountered error while reading array index"


def _first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``e`` cut to its first line (orbax's errors run to pages).

    orbax's array-read wrapper gives way to its cause. TensorStore's errors nest their
    causes (``opening: reading: <the reason>``) and then append the whole spec: the spec
    goes, and a long message keeps its end, the reason.
    """
    seen = set()
    while str(e).startswith(ORBAX_READ_ERROR) and e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    text = text if len(text) <= limit else "..." + text[-(limit - 3) :]
    return f"{type(e).__name__}: {text}"


# The JSON files orbax and grain write in a step folder (all but the array data, the OCDBT
# manifests and commit_success.txt): a truncated one fails a restore as a bare
# JSONDecodeError that names no file.
_JSON_NAMES = (_STEP_RECORD_NAME, "_METADATA", "_sharding", "metadata", "metrics")


def _unparsable_json(step_dir: epath.Path) -> list[epath.Path]:
    """The JSON files under ``step_dir`` that do not parse (empty or cut off)."""
    found = []
    try:
        # The step, its items (state/, data/, ...) and state/array_metadatas/; not the
        # folders of array data (d/, ocdbt.process_<i>/), which hold no JSON.
        folders = [step_dir]
        while folders:
            folder = folders.pop()
            for path in sorted(folder.iterdir(), key=lambda p: p.name):
                if path.is_dir():
                    if path.name != "d" and not path.name.startswith("ocdbt."):
                        folders.append(path)
                elif (
                    path.name in _JSON_NAMES
                    or path.name.endswith(".json")
                    or (folder.name == "array_metadatas")
                ):
                    try:
                        json.loads(path.read_text())
                    except ValueError:  # JSONDecodeError, UnicodeDecodeError
                        found.append(path)
    except Exception:  # the scan only refines the message
        return []
    return sorted(found, key=str)


def _unreadable_step_record(step_dir: epath.Path) -> tuple[epath.Path, Exception] | None:
    """``(path, error)`` when ``step_dir``'s ``_CHECKPOINT_METADATA`` parses as JSON but not
    as orbax's record of the save (edited by hand: a list, a timestamp of another type),
    which fails orbax's opening of the whole folder; None otherwise (a record that is
    missing or does not parse is only logged by orbax, see ``unreadable_step_records``)."""
    record = step_dir / _STEP_RECORD_NAME
    try:
        saved = json.loads(record.read_text())
    except Exception:  # missing, or not JSON
        return None
    try:
        ocp.path.step.step_metadata_serialization.deserialize(saved)
    except Exception as e:
        return record, e
    return None


def _rankable(metrics: Any, name: str) -> float:
    """``metrics[name]`` for ranking by "lower is better": NaN ranks last, never as the best,
    and so does a step whose saved metrics lack ``name`` or hold no number there (saved
    with another ``best_metric``, or a metrics file edited by hand), where orbax's pruning
    failed with a bare ``KeyError: 'val_loss'``."""
    try:
        value = float(metrics[name])
    except (KeyError, IndexError, TypeError, ValueError):
        return math.inf
    return math.inf if math.isnan(value) else value


def _position_for_other_process_count(data_dir: epath.Path) -> Any | None:
    """The data position to resume from when ``data_dir`` was saved by another number of
    processes; None when this run has as many (grain then reads this process's file).

    grain keeps one iterator position per process (``process_<i>-of-<n>.json``). The
    project's pipelines (``data.lm_dataset``, the translation batches) draw one global
    stream of batches, each process taking its rows of every batch, so every process saves
    the same position and any number of processes resumes it exactly. Positions that
    differ cannot be mapped onto another process count: ``CheckpointError``.
    """
    saved: dict[str, int] = {}
    for path in data_dir.iterdir():
        match = re.fullmatch(r"process_\d+-of-(\d+)\.json", path.name)
        if match:
            saved[path.name] = int(match.group(1))
    counts = set(saved.values())
    if not counts or jax.process_count() in counts:
        return None
    try:
        positions = [json.loads((data_dir / name).read_text()) for name in sorted(saved)]
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{data_dir}: cannot read a data position: {e}") from e
    if any(p != positions[0] for p in positions):
        raise CheckpointError(
            f"{data_dir} holds the data positions of a run of {max(counts)} processes, and "
            f"they differ; this run has {jax.process_count()}: resume with the same number "
            "of processes"
        )
    return positions[0]


def _numpy_to_python(value: Any) -> Any:
    """``json.dumps``'s ``default``: NumPy scalars and arrays as the Python values they hold
    (a config file may set ``np.int64(8)``, which LoopConfig and make_mesh take as ints)."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} ({value!r}) is not a JSON value")


def _first_unserialisable(value: Any, path: str, seen: frozenset[int] = frozenset()) -> str:
    """The path under ``path`` of the first value ``json.dumps`` refuses (``path`` itself
    when it is one of the keys or values there, or a container that holds itself)."""
    items = value.items() if isinstance(value, Mapping) else None
    if items is None and isinstance(value, (list, tuple)):
        items = enumerate(value)
    if items is None or id(value) in seen:
        return path
    for key, child in items:
        try:
            json.dumps(child, default=_numpy_to_python)
        except (TypeError, ValueError):
            return _first_unserialisable(child, f"{path}[{key!r}]", seen | {id(value)})
    return path


# The keys Checkpointer.save adds to the caller's metadata.
SAVE_WRITES = ("step", "tree_signature", "ranked_metrics")


def json_metadata(
    metadata: Mapping[str, Any] | None, where: str = "metadata", reserved: Sequence[str] = ()
) -> dict[str, Any]:
    """``metadata`` as the plain JSON object a checkpoint stores (NumPy values as Python).

    orbax writes it in a background thread: a value JSON cannot hold failed only there, at
    the first save after training, with pages of orbax's thread errors, and left no
    checkpoint. Checked up front instead (``fit`` checks before the first step).

    Raises:
      ValueError: naming the first value JSON cannot hold and where it is, or a key of
        ``reserved`` (those the caller writes itself, which would overwrite it).
    """
    try:
        meta = json.loads(json.dumps(dict(metadata or {}), default=_numpy_to_python))
    except (TypeError, ValueError) as e:
        at = _first_unserialisable(dict(metadata or {}), where)
        raise ValueError(f"{at} is not JSON-serialisable: {e}") from None
    taken = sorted(set(meta) & set(reserved))
    if taken:  # (they would be overwritten without a word)
        raise ValueError(
            f"{where}: the keys {taken} are written with every checkpoint; give these "
            "values other names"
        )
    return meta


def tree_signature(tree: Any) -> list[list[Any]]:
    """Return ``[[path, shape, dtype], ...]`` for every array leaf of ``tree`` (JSON-ready).

    Raises:
      ValueError: naming the first leaf that is not an array (a Python number or string;
        without a shape and dtype the tree cannot be compared with a checkpoint's).
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for p, x in leaves:
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise ValueError(
                f"leaf {path_string(p)!r} is a {type(x).__name__} ({x!r:.40}), not an array: "
                "a checkpoint holds arrays (jnp.asarray it)"
            )
    return [[path_string(p), list(np.shape(x)), str(x.dtype)] for p, x in leaves]


def _is_signature(saved: Any) -> bool:
    """Whether ``saved`` (read from a checkpoint's meta) is a list of ``[path, shape,
    dtype]`` rows, as ``tree_signature`` writes."""
    return isinstance(saved, list) and all(
        isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], str)
        and isinstance(row[1], list)
        and all(isinstance(n, int) for n in row[1])
        and isinstance(row[2], str)
        for row in saved
    )


# How orbax's errors for a tree that differs from the checkpoint's only in its structure (no
# leaf's path, shape or dtype, which ``check_compatible`` compares) begin: the state's (a
# missing empty node, a dict for a list) and the partial reader's (``restore_params``).
_STRUCTURE_ERRORS = (
    "User-provided restore item and on-disk value metadata tree structures do not match",
    "Type mismatch at key path",
)


def error_chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, then the error it was raised from (``__cause__``) or during
    (``__context__``), and so on, each once (a chain may loop)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _structure_difference(error: BaseException) -> str | None:
    """Where orbax found the target's tree structure to differ from the checkpoint's, on
    one line (None when ``error`` is another error)."""
    for link in error_chain(error):
        text = str(link)
        if text.startswith(_STRUCTURE_ERRORS):
            # orbax's diff: "<path>:\n    - Source: <target's>\n    - Target: <saved>"
            lines = [line.strip() for line in text.splitlines()[1:]]
            lines = [line for line in lines if line and not line.startswith("If this mismatch")]
            diff = " ".join(lines).replace("- Source:", "target:").replace("- Target:", "saved:")
            diff = diff or text
            return diff if len(diff) <= 300 else diff[:297] + "..."
    return None


def check_compatible(saved: list[list[Any]], target: Any, *, where: str = "checkpoint") -> None:
    """Raise IncompatibleCheckpointError naming the first leaf where the trees differ.

    Args:
      saved: a ``tree_signature`` stored with a checkpoint.
      target: the pytree to restore into (arrays or ``jax.ShapeDtypeStruct``).
      where: the checkpoint's location, for the message.
    """
    wanted = tree_signature(target)
    saved_by_path = {p: (tuple(s), d) for p, s, d in saved}
    wanted_by_path = {p: (tuple(s), d) for p, s, d in wanted}
    hint = " (a different model or config?); nothing was restored or overwritten"
    for path, (shape, dtype) in wanted_by_path.items():
        if path not in saved_by_path:
            raise IncompatibleCheckpointError(
                f"{where} is incompatible: leaf {path!r} {shape} {dtype} of the target is "
                f"missing from the checkpoint{hint}"
            )
        s_shape, s_dtype = saved_by_path[path]
        if (s_shape, s_dtype) != (shape, dtype):
            raise IncompatibleCheckpointError(
                f"{where} is incompatible: leaf {path!r} has shape {s_shape} {s_dtype} in the "
                f"checkpoint but {shape} {dtype} in the target{hint}"
            )
    extra = [p for p in saved_by_path if p not in wanted_by_path]
    if extra:
        raise IncompatibleCheckpointError(
            f"{where} is incompatible: checkpoint leaf {extra[0]!r} "
            f"{saved_by_path[extra[0]][0]} is not in the target{hint}"
        )


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    """Shape, dtype (PRNG key dtypes included) and sharding of a leaf, without its data.

    The restored array takes this sharding whatever mesh saved it (8 devices -> 1); a
    leaf without one goes to this process's first device.
    """
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


class Checkpointer:
    """Save and restore ``(TrainState, data iterator, metadata)`` by step under ``directory``.

    Args:
      directory: the checkpoints folder (``WORKDIR/checkpoints``); steps go in ``<step>/``.
      max_to_keep: how many of the most recently saved steps to keep (None keeps all):
        with steps 4 and 5 kept, ``save(3)`` removes 4, and ``restore()`` still takes 5.
      best_metric: metric name (lower is better) whose best step is kept as well; None to
        keep only the latest.
      async_save: write in a background thread; ``wait()``/``close()`` joins it.
      read_only: for reading (sampling, inspection): never creates the folder; ``save``
        raises.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = "val_loss",
        async_save: bool = True,
        read_only: bool = False,
    ):
        # epath: local folders and object stores alike (gs://bucket/run/checkpoints on TPU
        # pods, where every host must see the same folder).
        self.directory = epath.Path(directory)
        if not is_remote(self.directory):
            self.directory = self.directory.absolute()
        self.best_metric = best_metric
        self.read_only = read_only
        if not read_only:
            check_checkpoints_folder(self.directory)
            if best_metric is not None:
                self._check_saved_metrics_present()
        policy: Any = ocm.LatestN(max_to_keep)
        if best_metric is not None:
            best = ocm.BestN(
                get_metric_fn=lambda m: -_rankable(m, best_metric),  # BestN keeps the largest.
                n=1,
                keep_checkpoints_without_metrics=False,
            )
            policy = ocm.AnyPreservationPolicy([policy, best])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # With best_fn set orbax also writes each step's metrics to disk, so the best
            # step survives a restart (retention itself is the policy above).
            best_fn=None if best_metric is None else (lambda m: _rankable(m, best_metric)),
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=not read_only,  # (orbax's own read_only mode logs a warning on open)
        )
        try:
            # Opening reads every step's saved metrics (``<step>/metrics/metrics``).
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:
            raise self._unopenable(e) from e

    def _check_saved_metrics_present(self) -> None:
        """Refuse a step saved with metrics (its ``meta`` records them) whose orbax metrics
        file (``<step>/metrics/metrics``) is gone or no longer holds ``best_metric`` (deleted
        or edited by hand): orbax reads such a step as saved without metrics, so the best
        step was no longer kept and was deleted, without a word, once it was not among the
        latest ``max_to_keep`` (a file that does not parse fails orbax's opening).

        Raises:
          CheckpointError: naming the file and the metrics it held; changes nothing.
        """
        try:
            steps = self._steps_on_disk()
        except Exception:  # an unreadable folder fails when orbax opens it
            return
        for step in steps:
            step_dir = self.step_dir(step)
            metrics_file = step_dir / "metrics" / "metrics"
            try:
                meta = json.loads((step_dir / "meta" / "metadata").read_text())
                saved = meta.get("ranked_metrics")
                if not math.isfinite(_rankable(saved, self.best_metric)):
                    continue  # not ranked by best_metric when saved
                if not metrics_file.exists():
                    what = "is missing"
                elif math.isfinite(
                    _rankable(json.loads(metrics_file.read_text()), self.best_metric)
                ):
                    continue
                else:
                    what = f"holds no {self.best_metric!r}"
            except Exception:  # no readable meta or metrics: reported when they are read
                continue
            raise CheckpointError(
                f"{metrics_file} {what}, but step {step} was saved with metrics "
                f"{json.dumps(saved)} (its meta records them): without them orbax no longer "
                f"ranks it by {self.best_metric!r} and deletes it once it is not among the "
                f"latest steps kept; write that JSON to {metrics_file}, or move {step_dir} "
                f"out of {self.directory} (nothing was changed)"
            )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The highest step saved (what ``restore`` takes by default); None: none yet.

        (orbax's own is the step saved last in this session: after steps 4, 5 and then 3
        it said 3 while ``restore`` read 5.)
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def unfinished_saves(self) -> list[epath.Path]:
        """The folders of saves that did not finish (a run killed while writing them).

        orbax writes a step into a temporary folder (``<step>.orbax-checkpoint-tmp``) and
        renames it when complete (on object stores, it marks the step's folder complete
        with a file): an unfinished one is never listed as a step nor read, and orbax
        removes it when that step is saved again.
        """
        try:
            found = ocp.path.step.all_temporary_paths(self.directory)
        except Exception:  # only for a note: an unreadable folder fails elsewhere
            return []
        return sorted((path.get() for path in found), key=lambda path: path.name)

    def unreadable_step_records(self) -> list[epath.Path]:
        """The steps' ``_CHECKPOINT_METADATA`` files that are empty, cut off or missing.

        orbax writes this record of a step's save beside its items, logs an error on every
        read of a step whose record does not parse, and restores the step without it; the
        checkpoint's state, data position and metadata are intact.
        """
        found = []
        try:
            for step in self.all_steps():
                if _not_a_checkpoint(self.step_dir(step)) is not None:
                    continue  # reported as what it is when it is read
                record = self.step_dir(step) / _STEP_RECORD_NAME
                try:
                    json.loads(record.read_text())
                except (OSError, ValueError):  # missing; JSONDecodeError, UnicodeDecodeError
                    found.append(record)
        except Exception:  # only for a note: an unreadable folder fails elsewhere
            return []
        return found

    def best_step(self) -> int | None:
        """The kept step with the lowest ``best_metric`` (None if no kept step was saved
        with a number for it)."""
        if self.best_metric is None:
            return None
        self.wait()  # A step's metrics are registered when its save finishes.
        step = self._manager.best_step()
        if step is None:
            return None
        # orbax ranks steps without the metric (or NaN) last but still names one of them.
        try:
            saved = json.loads((self.step_dir(step) / "metrics" / "metrics").read_text())
        except (OSError, ValueError):
            return None
        return step if math.isfinite(_rankable(saved, self.best_metric)) else None

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iter: grain.DatasetIterator | grain.DataLoaderIterator | None = None,
        metadata: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Start saving ``state`` (and ``data_iter``'s position) as ``<step>/``.

        Args:
          step: the step number (directory name), an int >= 0; must not exist yet.
          state: the train state pytree.
          data_iter: a grain iterator whose ``get_state`` is saved (optional).
          metadata: JSON-serialisable dict saved as the ``meta`` item (NumPy values as
            Python ones; any other value JSON cannot hold is a ValueError, before
            anything is written).
          metrics: e.g. ``{"val_loss": 1.9}``; ranks this step for keep-best.
        """
        if self.read_only:
            raise ValueError(f"cannot save: Checkpointer({self.directory}) is read-only")
        # (a float 4.0 or a -2 was saved as a folder "4.0" or "-2", which no restore finds)
        step = check_size(step, "step", "Checkpointer.save", minimum=0)
        if (what := _not_a_checkpoint(self.step_dir(step))) is not None:
            # (orbax's forced save deletes whatever has the step's name)
            raise CheckpointError(
                f"cannot save step {step}: {self.step_dir(step)} is {what}; move it out of "
                f"{self.directory}"
            )
        if step not in self._manager.all_steps() and folder_exists(self.step_dir(step)):
            # orbax lists the steps when it opens the folder: one saved since (by another
            # Checkpointer on it) its forced save replaced. (A save that did not finish on an
            # object store, not listed after the reload either, orbax replaces as before.)
            # The reload lists the folder: this one's own save still in flight (a temporary
            # folder until it commits) would drop out of all_steps and max_to_keep.
            self._manager.wait_until_finished()
            self._manager.reload()
        if step in self._manager.all_steps():
            raise ValueError(f"checkpoint step {step} already exists in {self.directory}")
        # (before orbax writes anything)
        meta = json_metadata(metadata, "checkpoint metadata", reserved=SAVE_WRITES)
        meta["step"] = int(step)
        meta["tree_signature"] = tree_signature(state)
        if self.best_metric is not None and self.best_metric in (metrics or {}):
            metrics = {k: float(v) for k, v in metrics.items()}
            # (a copy of orbax's metrics item: see _check_saved_metrics_present)
            meta["ranked_metrics"] = metrics
        else:
            metrics = None  # Not a candidate for "best" (BestN needs best_metric).
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def _resolve_step(self, step: int | None, where: str) -> int:
        """``step`` as an int (None: the latest); ``where`` names the caller."""
        if step is not None:
            # A "3" (from argv) failed as "no checkpoint for step 3; available steps: [3]",
            # and 3.0 or True as "checkpoint <dir>/3.0 is corrupt or incomplete".
            step = check_size(step, "step", where, minimum=0)
        steps = self.all_steps()
        if not steps:
            # (a read-only open of a file, or a folder that is not there, lists no step)
            what = (
                " (it is a file, not a folder)"
                if self.directory.is_file()
                else " (no such folder)"
                if not self.directory.exists()
                else ""
            )
            raise FileNotFoundError(f"no checkpoint found in {self.directory}{what}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}"
            )
        return step

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Return the ``meta`` JSON of ``step`` (default: latest)."""
        step = self._resolve_step(step, "Checkpointer.read_metadata")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            meta = dict(restored["meta"])
        except Exception as e:
            raise self._corrupt(step, f"cannot read its metadata ({_first_line(e)})") from e
        if "tree_signature" not in meta:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} has no tree signature")
        if not _is_signature(meta["tree_signature"]):  # (a meta edited by hand)
            raise CheckpointError(
                f"{self.step_dir(step) / 'meta' / 'metadata'}: its tree_signature is not a list "
                f"of [path, shape, dtype] ({json.dumps(meta['tree_signature'])[:80]})"
            )
        return meta

    def restore(
        self,
        target: Any,
        *,
        step: int | None = None,
        data_iter: grain.DatasetIterator | grain.DataLoaderIterator | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restore ``step`` (default: latest) into the structure of ``target``.

        Args:
          target: a pytree like the saved state (arrays or ``jax.ShapeDtypeStruct``).
          step: which step; None for the latest.
          data_iter: if given, its position is set to the saved one (in place); also from a
            run of another number of processes, when all of them saved the same position.

        Returns:
          ``(state, metadata)``.

        Raises:
          FileNotFoundError: no checkpoint (or not that step).
          IncompatibleCheckpointError: the saved tree differs from ``target``.
          CheckpointError: the checkpoint cannot be read.
        """
        step = self._resolve_step(step, "Checkpointer.restore")
        meta = self.read_metadata(step)
        check_compatible(meta["tree_signature"], target, where=f"checkpoint {self.step_dir(step)}")
        abstract = jax.tree.map(_abstract, target)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract)}
        position = None  # set when the data positions were saved by another process count
        if data_iter is not None:
            data_dir = self.step_dir(step) / "data"
            if not data_dir.is_dir():
                raise CheckpointError(
                    f"checkpoint {self.step_dir(step)} has no data iterator state to resume from"
                )
            position = _position_for_other_process_count(data_dir)
            if position is not None and not isinstance(data_iter, grain.DatasetIterator):
                raise CheckpointError(
                    f"{data_dir} holds the data position of a run of another number of "
                    f"processes; a {type(data_iter).__name__} resumes only with as many "
                    f"processes as saved it ({jax.process_count()} now)"
                )
            if position is None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise self._unreadable(step, e) from e
        if position is not None:
            data_iter.set_state(position)
            data_iter.start_prefetch()  # (as grain's own restore does)
        return restored["state"], meta

    def restore_params(self, like: Any, *, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restore only the ``params`` of ``step``'s train state, into the structure of
        ``like``: a run's weights for sampling, export or fine-tuning, without rebuilding
        the optimizer (and schedule) whose state ``restore`` needs as its target.

        Args:
          like: a params pytree like the saved one (arrays or ``jax.ShapeDtypeStruct``, e.g.
            ``jax.eval_shape(lambda: init_gpt(key, config))``); a leaf's sharding, when it
            has one, is the restored leaf's.
          step: which step; None for the latest.

        Returns:
          ``(params, metadata)``.

        Raises:
          FileNotFoundError: no checkpoint (or not that step).
          IncompatibleCheckpointError: the saved params differ from ``like``.
          CheckpointError: the checkpoint cannot be read.
        """
        step = self._resolve_step(step, "Checkpointer.restore_params")
        meta = self.read_metadata(step)
        saved = [row for row in meta["tree_signature"] if row[0].split("/")[0] == "params"]
        target = {"params": like}
        check_compatible(saved, target, where=f"checkpoint {self.step_dir(step)}")
        abstract = jax.tree.map(_abstract, target)
        # The manager restores its "state" item whole; a plain PyTree reader restores a
        # part of the same files.
        args = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        try:
            with ocp.PyTreeCheckpointer() as reader:
                restored = reader.restore(self.step_dir(step) / "state", args=args)
        except Exception as e:
            raise self._unreadable(step, e) from e
        return restored["params"], meta

    def _unreadable(self, step: int, error: Exception) -> ValueError:
        """The error for a failed read of ``step``'s arrays: ``IncompatibleCheckpointError``
        when orbax found the target's tree to differ in structure where it holds no arrays
        (an empty node more or less, a dict for a list: leaves ``check_compatible`` found
        alike), else ``CheckpointError`` (``_corrupt``)."""
        if (diff := _structure_difference(error)) is not None:
            return IncompatibleCheckpointError(
                f"checkpoint {self.step_dir(step)} is incompatible: the target's tree differs "
                f"from the checkpoint's in structure ({diff}) (a different model or "
                "optimizer?); nothing was restored or overwritten"
            )
        return self._corrupt(step, _first_line(error))

    def _corrupt(self, step: int, detail: str) -> CheckpointError:
        """The error for an unreadable ``step``, pointing at the steps that could be used."""
        unparsable = _unparsable_json(self.step_dir(step))
        # An item's index file deleted: orbax then reads the state's tree as "different
        # types at key path", which names no file.
        missing = [
            path
            for path in (self.step_dir(step) / "state" / "_METADATA",)
            if path.parent.is_dir() and not path.exists()
        ]
        if (what := _not_a_checkpoint(self.step_dir(step))) is not None:
            detail = f"it is {what}"
        elif missing:
            detail = f"{', '.join(map(str, missing))} is missing: {detail}"
        elif unparsable:
            files = ", ".join(str(path) for path in unparsable)
            verb = "is" if len(unparsable) == 1 else "are"
            detail = f"{files} {verb} not valid JSON (empty or cut off): {detail}"
        others = [s for s in self.all_steps() if s != step]
        hint = (
            f"; the other steps here are {others}: move {self.step_dir(step)} out of the "
            f"folder to use step {others[-1]}"
            if others
            else ""
        )
        return CheckpointError(
            f"checkpoint {self.step_dir(step)} is corrupt or incomplete: {detail}{hint}"
        )

    def _steps_on_disk(self) -> list[int]:
        """The step folders in the directory, before orbax has read them."""
        names = (_step_number(p.name) for p in self.directory.iterdir())
        return sorted(step for step in names if step is not None)

    def _unopenable(self, error: Exception) -> CheckpointError:
        """The error for a folder orbax cannot open, naming the steps whose saved metrics
        or step record (``_CHECKPOINT_METADATA``), which orbax reads on opening, it cannot
        read, each with its own reason."""
        damaged: list[tuple[epath.Path, Exception]] = []  # metrics files
        records: list[tuple[epath.Path, Exception]] = []  # step records
        try:
            # Not orbax's *.orbax-checkpoint-tmp-* folders: never read.
            for step in self._steps_on_disk():
                metrics_file = self.step_dir(step) / "metrics" / "metrics"
                if metrics_file.exists():
                    try:
                        json.loads(metrics_file.read_text())
                    except Exception as e:  # object stores raise their own types
                        damaged.append((metrics_file, e))
                if (found := _unreadable_step_record(self.step_dir(step))) is not None:
                    records.append(found)
        except Exception:  # the scan only refines the message
            damaged, records = [], []
        if not (damaged or records):
            return CheckpointError(
                f"cannot open the checkpoints in {self.directory}: {_first_line(error)}"
            )
        listed = lambda found: "; ".join(f"{path} ({_first_line(e)})" for path, e in found)
        parts, hints = [], []
        moved = [path.parent.parent for path, _ in damaged]  # (their records go with them)
        if damaged:
            parts.append(f"corrupt metrics file {listed(damaged)}")
            hints.append(
                f"move {', '.join(map(str, moved))} out of the folder to use the other steps"
            )
        if records:
            parts.append(f"corrupt step record {listed(records)}")
            if names := ", ".join(str(path) for path, _ in records if path.parent not in moved):
                hints.append(f"delete {names} (orbax reads a step without one)")
        # Both hints when both kinds are damaged: either alone leaves the folder unopenable.
        return CheckpointError(
            f"cannot open the checkpoints in {self.directory}: {'; '.join(parts)}; "
            f"{', and '.join(hints)}"
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
