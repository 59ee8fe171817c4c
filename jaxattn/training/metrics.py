"""Metrics: device-side sums and counts, reduced on the host; JSONL and TensorBoard output.

A step function returns ``{name: Mean(total, count)}``. The host adds totals and counts over
any number of steps (a logging window, all eval batches) and divides once, so averages are
exact whatever the window and nothing is averaged on the device.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath


class Mean(NamedTuple):
    """A running mean as ``total / count``; both are scalars (device arrays in steps)."""

    total: Any
    count: Any


def sum_means(steps: Iterable[Mapping[str, Mean]]) -> dict[str, Mean]:
    """Fetch and add up per-step ``{name: Mean}`` dicts into ``{name: Mean(total, count)}``
    of Python floats, in step order (so sums resumed from saved ones come out the same).

    One ``jax.device_get`` for the whole list, so a window costs one host sync.
    """
    totals: dict[str, float] = {}
    counts: dict[str, float] = {}
    for metrics in jax.device_get(list(steps)):
        for name, mean in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(np.sum(mean.total))
            counts[name] = counts.get(name, 0.0) + float(np.sum(mean.count))
    return {name: Mean(totals[name], counts[name]) for name in totals}


def reduce_means(steps: Iterable[Mapping[str, Mean]]) -> dict[str, float]:
    """Fetch and combine per-step ``{name: Mean}`` dicts into ``{name: total / count}``
    (``sum_means``, then one division each; NaN for a count of 0)."""
    sums = sum_means(steps).items()
    return {name: total / count if count else math.nan for name, (total, count) in sums}


def json_value(value: Any) -> Any:
    """Plain-JSON version of a scalar: non-finite floats become null (JSON has no NaN)."""
    # Any one-element value, not only arrays: a list [nan] was written as [NaN], not JSON.
    if value is not None and not isinstance(value, str):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Append one JSON object per record to ``WORKDIR/metrics.jsonl``; mirror to TensorBoard.

    Each line is ``{"step": int, "time": unix seconds, **scalars}``. After a resume the
    steps after the restored checkpoint are written again; readers keep the last record
    per step and key. TensorBoard event files go to ``WORKDIR/tb/``.

    ``active=False`` writes nothing (the processes other than 0 of a multi-host run, which
    all compute the same replicated metrics).

    ``purge_step``: a run passes the first step it will log (a resumed run the checkpoint's
    step + 1, a fresh run 0); TensorBoard then hides the events that an earlier, killed
    run wrote from that step on, instead of drawing both. Events reach the disk within a
    second: with tensorboardX's default of two minutes, a killed run lost events from
    before its last checkpoint, which the resumed run does not write again.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        active: bool = True,
        purge_step: int | None = None,
    ):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.active = active
        # Object stores (gs://) cannot append: keep the lines and rewrite the file, which
        # stays small (one line per logged step). TensorBoard files stay local-only.
        self.remote = is_remote(self.workdir)
        self._lines: list[str] = []
        self._file = None
        self._tb = None
        if not active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A run killed while writing a record (full disk, power loss) can leave the file
        # ending mid-line: the next record then starts a line of its own.
        if self.remote:
            if self.path.exists():
                self._lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            if self._lines and not self._lines[-1].endswith("\n"):
                self._lines[-1] += "\n"
        else:
            cut = False
            if os.path.exists(self.path) and os.path.getsize(self.path):
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    cut = f.read(1) != b"\n"
            self._file = open(self.path, "a", encoding="utf-8")
            if cut:
                self._file.write("\n")
        if tensorboard and not self.remote:
            # tensorboardX names a file by the second it opened it, so a run resumed within
            # the same second would overwrite the last one's events; the nanosecond suffix
            # keeps the names apart and in the order TensorBoard reads them.
            self._tb = _summary_writer()(
                logdir=str(self.workdir / "tb"), purge_step=purge_step, flush_secs=1,
                filename_suffix=f".{time.time_ns()}",
            )  # fmt: skip

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record ``scalars`` at ``step``: real numbers and bools (one-element arrays and
        lists too), strs and None; numbers go to TensorBoard as well, None to JSON only, as
        null.

        Raises:
          ValueError: naming the first value that is none of these, and its step.
        """
        if not self.active:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        for name, value in scalars.items():
            if value is None or isinstance(value, str):
                continue
            if np.size(value) != 1:
                raise ValueError(
                    f"MetricsWriter.write: {name} at step {step} must be a scalar, got shape "
                    f"{np.shape(value)}"
                )
            # A dict (np.size 1) was written as a nested JSON object; a complex number or
            # another object failed in json.dumps as "Object of type ... is not JSON
            # serializable", naming neither the metric nor the step.
            dtype = np.asarray(value).dtype
            if not any(jnp.issubdtype(dtype, kind) for kind in (jnp.number, jnp.bool_)) or (
                jnp.issubdtype(dtype, jnp.complexfloating)
            ):
                raise ValueError(
                    f"MetricsWriter.write: {name} at step {step} must be a real number, a "
                    f"bool, a str or None, got a {type(value).__name__} ({value!r:.60})"
                )
        record.update({k: json_value(v) for k, v in scalars.items()})
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines), encoding="utf-8")
        else:
            self._file.write(line)
            self._file.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                value = json_value(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(name, value, global_step=int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_IMPORT_LOCK = threading.Lock()


def _summary_writer() -> type:
    """tensorboardX's ``SummaryWriter``, imported without importing PyTorch.

    tensorboardX imports torch when it is installed, only to accept torch tensors, which
    this writer never passes; that import costs ~2 s of every training run's start. A
    ``None`` entry in ``sys.modules`` makes ``import torch`` fail fast for that one import
    (another thread importing torch at that instant would fail too; writers are made once,
    at the start of a run).
    """
    with _IMPORT_LOCK:  # sys.modules is process-wide: one importer at a time.
        if "torch" in sys.modules or "tensorboardX" in sys.modules:
            from tensorboardX import SummaryWriter
        else:
            sys.modules["torch"] = None  # type: ignore[assignment]
            try:
                from tensorboardX import SummaryWriter
            finally:
                sys.modules.pop("torch", None)
    return SummaryWriter


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-store paths such as ``gs://bucket/run`` (not a local folder)."""
    return "://" in str(path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl file into a list of dicts (one per line).

    A line that is not JSON (a record cut off when a run was killed while writing it) is
    skipped with a warning naming its line number.
    """
    records = []
    with epath.Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(
                    f"{path}: line {number} is not a JSON record (cut off?); skipped", stacklevel=2
                )
    return records
