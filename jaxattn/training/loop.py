"""The training loop: jitted pure step functions and ``fit``, which drives them.

A loss function is all the loop knows about a model::

    loss_fn(params, batch, rng) -> (loss, aux)

``loss`` is a float32 scalar (mean over the batch), ``aux`` a dict of float32 scalars to
log. ``rng`` is a PRNG key while training and ``None`` in evaluation: a loss function uses
dropout exactly when it gets a key. ``train_step(state, batch) -> (state, metrics)`` is
pure, jitted once, and donates the old state; metrics are ``{name: Mean(total, count)}``
reduced on the host (see ``metrics.py``).

``fit`` resumes from the latest checkpoint in the workdir, shows a tqdm bar with loss and
tokens/s, evaluates, logs, checkpoints, stops with ``NonFiniteLossError`` when a loss,
gradient norm or the state to be saved is not finite (saving nothing after the last good
checkpoint), and on SIGTERM/SIGINT saves a checkpoint at the current step and returns
(when it runs in the main thread: Python delivers signals to that thread only); the sums
of a log window the signal cut short go with that checkpoint, for the resumed run to log
at the window's end as an uninterrupted run would (or, with nothing left to train, as its
own record at the stopped step, once).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from jaxattn.ops._checks import as_size, check_size
from jaxattn.training.checkpoint import (
    SAVE_WRITES,
    Checkpointer,
    FolderLock,
    NotWritableError,
    check_writable,
    folder_exists,
    json_metadata,
)
from jaxattn.training.metrics import (
    Mean,
    MetricsWriter,
    is_remote,
    json_value,
    read_metrics,
    reduce_means,
    sum_means,
)
from jaxattn.training.sharding import global_batch, replicated, to_host
from jaxattn.training.state import TrainState

Batch = Any
# The keys fit adds to its caller's metadata in each checkpoint (beside save's own).
_FIT_WRITES = (*SAVE_WRITES, "best_val_loss", "eval", "log_window")
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, Mapping[str, jax.Array]]]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, Mean]]]
EvalFn = Callable[[Any, Batch], dict[str, Mean]]


class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient norm or the state became NaN or infinite; training stopped."""


def _all_finite(tree: Any) -> bool:
    """True iff every floating-point leaf of ``tree`` is finite.

    Arrays held whole on CPU devices are host memory: NumPy reads them in place (2-3 ms
    for the Shakespeare model's state) where the jitted reduction first compiles one
    kernel per leaf (0.5-0.8 s on 2 cores, once per run). Others (accelerators, arrays
    split across processes) take the jitted reduction, which every process runs alike.
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    on_host = all(
        isinstance(x, jax.Array)
        and x.is_fully_addressable
        and all(d.platform == "cpu" for d in x.devices())
        for x in leaves
    )
    if on_host:
        return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)
    return bool(_all_finite_on_device(leaves))


@jax.jit
def _all_finite_on_device(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves] + [jnp.bool_(True)]))


def _checked_loss_fn(loss_fn: LossFn, caller: str) -> LossFn:
    """``loss_fn`` that checks, while tracing, that it returns ``(loss, aux)`` of scalars.

    ``Mean`` totals are summed on the host, so a per-row loss or a vector in ``aux`` was
    logged as the sum of its elements (an eval loss of shape [B], B times the mean), and an
    ``aux`` key ``"loss"`` replaced the loss itself as ``train_loss`` / ``val_loss``.
    """

    def checked(params: Any, batch: Batch, rng: jax.Array | None):
        out = loss_fn(params, batch, rng)
        # (a loss_fn returning the loss alone failed as "iteration over a 0-d array")
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            got = f"a {type(out).__name__}"
            if isinstance(out, (tuple, list)):
                got += f" of {len(out)} items"
            elif hasattr(out, "shape"):  # (a tracer's type name says nothing to a user)
                got = f"an array of shape {jnp.shape(out)}"
            raise ValueError(
                f"{caller}: loss_fn must return a pair (loss, aux), aux a dict of scalars "
                f"(return loss, {{}} for none), got {got}"
            )
        loss, aux = out
        if not isinstance(aux, Mapping):
            raise ValueError(
                f"{caller}: loss_fn must return (loss, aux) with aux a dict of scalars, got "
                f"aux of type {type(aux).__name__}"
            )
        if "loss" in aux:
            raise ValueError(
                f"{caller}: loss_fn's aux has the key 'loss', which would replace the loss "
                f"itself in the metrics; name it otherwise"
            )
        named = [
            ("loss (a mean over the batch)", loss),
            *((f"aux[{k!r}]", v) for k, v in aux.items()),
        ]
        for name, value in named:
            # (jnp.ndim reads a dict or None as 0-d: a nested aux then failed at the first
            # log, after training, as "float() argument must be ... not 'dict'")
            if not (hasattr(value, "shape") or isinstance(value, (int, float, complex, np.number))):
                raise ValueError(
                    f"{caller}: loss_fn's {name} must be a scalar, got a {type(value).__name__}"
                )
            if jnp.ndim(value) != 0:
                raise ValueError(
                    f"{caller}: loss_fn's {name} must be a scalar, got shape {jnp.shape(value)}"
                )
        return loss, aux

    return checked


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    learning_rate_fn: optax.Schedule | None = None,
    state_sharding: Any = None,
    batch_sharding: NamedSharding | None = None,
) -> StepFn:
    """Return a jitted ``train_step(state, batch) -> (state, metrics)`` that donates ``state``.

    With ``grad_accum_steps = k > 1`` every batch leaf's leading axis is dealt into k
    microbatches (row r goes to microbatch r mod k), ``lax.scan`` sums their gradients,
    and the optimizer is applied once to the mean: the same update as one batch of all
    the rows, in the memory of one microbatch, when ``loss_fn`` weighs every microbatch
    alike (a mean over rows, or over tokens when each row has as many; a loss averaged
    over a padding mask instead weighs a microbatch's tokens by 1 / its token count, as
    nanoGPT's accumulation does). Microbatch ``i`` of step ``s`` gets the key
    ``fold_in(fold_in(rng, s), i)``.

    Metrics: ``train_loss`` and ``train_<aux>`` (means over microbatches), ``grad_norm``
    (global norm of the mean gradient, before clipping) and ``learning_rate`` when
    ``learning_rate_fn`` is given. ``fit`` logs each over a window of ``log_every`` steps:
    the window's mean, but for ``learning_rate``, the rate of its last update.

    On a device mesh pass ``state_sharding`` (a ``NamedSharding`` per state leaf, see
    ``sharding.tree_shardings``) and ``batch_sharding``: the step then keeps the state in
    those shardings from step to step and returns replicated metrics.
    """
    k = check_size(grad_accum_steps, "grad_accum_steps", "make_train_step")
    grad_fn = jax.value_and_grad(_checked_loss_fn(loss_fn, "train_step"), has_aux=True)

    def split(x: jax.Array) -> jax.Array:
        if jnp.ndim(x) == 0:  # (x.shape[0] raised a bare IndexError)
            raise ValueError(
                f"grad_accum_steps={k} deals every batch leaf's leading axis into "
                f"microbatches, but a batch leaf is a scalar (shape ())"
            )
        if x.shape[0] % k:
            raise ValueError(
                f"batch leading axis {x.shape[0]} (shape {x.shape}) is not divisible by "
                f"grad_accum_steps={k}"
            )
        # Microbatch i takes rows i, i + k, i + 2k, ...: on a mesh each device's block of
        # rows then feeds every microbatch, so no rows move between devices.
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)  # [k, B/k, ...]

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Mean]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if k == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:

            def body(carry, inputs):
                i, microbatch = inputs
                out = grad_fn(state.params, microbatch, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, out), None  # ((loss, aux), grads) sums

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, state.params, batch, rng))
            ((loss, aux), grads), _ = jax.lax.scan(
                body, zeros, (jnp.arange(k), jax.tree.map(split, batch))
            )
            grads = jax.tree.map(lambda g: g / k, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        count = jnp.float32(k)  # loss and aux above are sums over k microbatch means.
        metrics = {"train_loss": Mean(loss, count)}
        metrics |= {f"train_{name}": Mean(value, count) for name, value in aux.items()}
        metrics["grad_norm"] = Mean(optax.tree.norm(grads), jnp.float32(1))
        if learning_rate_fn is not None:
            lr = jnp.float32(learning_rate_fn(state.step))
            metrics["learning_rate"] = Mean(lr, jnp.float32(1))
        new_state = TrainState(state.step + 1, params, opt_state, state.rng)
        return new_state, metrics

    if state_sharding is None:
        return jax.jit(train_step, donate_argnums=0)
    metrics_sharding = replicated(jax.tree.leaves(state_sharding)[0].mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=0,
    )


def make_eval_step(
    loss_fn: LossFn,
    *,
    prefix: str = "val",
    weight_fn: Callable[[Batch], jax.Array] | None = None,
    params_sharding: Any = None,
    batch_sharding: NamedSharding | None = None,
) -> EvalFn:
    """Return a jitted ``eval_step(params, batch) -> {f"{prefix}_loss": Mean, ...}``, no dropout.

    Each batch's loss (a mean over the batch) counts ``weight_fn(batch)`` times in the
    evaluation's mean. For a loss averaged over a mask's tokens, pass the mask's count
    (``lambda b: b["tgt_mask"].sum()``): the evaluation is then the mean over all its tokens,
    not a mean of batch means that weighs a batch of short sentences like one of long ones.
    None: every batch counts once (right when all batches hold as many tokens).

    ``params_sharding`` and ``batch_sharding`` place it on a mesh as in ``make_train_step``.
    """

    checked_loss_fn = _checked_loss_fn(loss_fn, "eval_step")

    def eval_step(params: Any, batch: Batch) -> dict[str, Mean]:
        loss, aux = checked_loss_fn(params, batch, None)
        weight = jnp.float32(1) if weight_fn is None else jnp.asarray(weight_fn(batch), jnp.float32)
        # (where: a batch of weight 0 adds nothing, even if its loss is NaN)
        weighted = lambda value: Mean(jnp.where(weight > 0, value, 0.0) * weight, weight)
        return {f"{prefix}_loss": weighted(loss)} | {
            f"{prefix}_{name}": weighted(value) for name, value in aux.items()
        }

    if params_sharding is None:
        return jax.jit(eval_step)
    metrics_sharding = replicated(jax.tree.leaves(params_sharding)[0].mesh)
    return jax.jit(
        eval_step,
        in_shardings=(params_sharding, batch_sharding),
        out_shardings=metrics_sharding,
    )


def _check_metrics_writable(workdir: epath.Path) -> None:
    """``NotWritableError`` if the ``metrics.jsonl`` or ``tb/`` that process 0 appends to
    exists but cannot be written (left by another user): the folder may be writable while
    they are not, and the run failed with a traceback after restoring its checkpoint.
    Creates nothing (the folder's own check covers new ones). Every process asks (the
    workdir is shared), so that all of them stop together. A folder named metrics.jsonl
    or a file named tb is named as such (it failed as IsADirectoryError or
    NotADirectoryError after the restore, or as "Permission denied")."""
    if is_remote(workdir):  # object stores have no permission bits to ask
        return
    for path, folder in ((workdir / "metrics.jsonl", False), (workdir / "tb", True)):
        if not path.exists():
            continue
        if path.is_dir() != folder:
            what = "a file, not a folder" if folder else "a folder, not a file"
            raise NotWritableError(f"cannot write to {path}: it is {what}")
        # (a folder's files are created through it: it needs search permission too)
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise NotWritableError(f"cannot write to {path}: Permission denied")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """When ``fit`` trains, evaluates, logs and checkpoints (all counted in updates)."""

    num_steps: int  # Train until state.step == num_steps.
    eval_every: int = 0  # Evaluate every N steps, at step 0 and at the end (0: only those).
    eval_batches: int = 0  # Batches per evaluation; 0 disables evaluation.
    # Write train metrics every N steps (one host sync per window); 0: only at the steps
    # that evaluate or save, and at the end.
    log_every: int = 10
    checkpoint_every: int = 0  # Save every N steps; 0: only at the end and on SIGTERM.
    max_to_keep: int = 3  # Latest checkpoints kept, >= 1 (plus the best by val_loss).
    keep_best: bool = True  # Save whenever val_loss improves; keep the best step.
    async_checkpointing: bool = True  # Write checkpoints in a background thread.
    progress: bool = True  # Show a tqdm progress bar.

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                count = as_size(value, 0)  # bools refused: num_steps=True would train a step
                if count is None:
                    raise ValueError(f"LoopConfig.{f.name} must be an integer >= 0, got {value!r}")
                object.__setattr__(self, f.name, count)  # (a NumPy integer as an int)
            # Any object is truthy: keep_best="false" would keep the best.
            if f.type == "bool" and not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"LoopConfig.{f.name} must be True or False, got {value!r}")
        if self.max_to_keep < 1:  # 0 would delete every checkpoint, the last one included
            raise ValueError(f"LoopConfig.max_to_keep must be >= 1, got {self.max_to_keep}")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> LoopConfig:
        """Read the fields present in an ml_collections config (others keep defaults)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {name: config[name] for name in fields if name in config}
        return cls(**(values | overrides))


@dataclasses.dataclass
class FitResult:
    """What ``fit`` ended with."""

    state: TrainState
    step: int
    # True when a signal stopped the run before num_steps (a checkpoint was saved).
    interrupted: bool
    last_eval: dict[str, float]  # the last evaluation (of a finished run: from its checkpoint)
    # Updates this call ran (0: a finished run, only restored): a script's end-of-run work
    # (a test decode) can tell a rerun from the run that trained.
    trained_steps: int


class _StopOnSignal:
    """Turn SIGTERM/SIGINT into a flag checked between steps (main thread only).

    With several processes a signal reaches one host, but all must stop at the same step
    to save one checkpoint together: JAX's preemption service (started by
    ``jax.distributed.initialize`` unless ``jax_enable_preemption_service`` is off)
    catches SIGTERM on any host and agrees on a step with the others, which ``poll`` asks
    for after every step. No Python handler takes SIGTERM from it then, and a SIGINT
    (Ctrl-C) is passed on to it as a SIGTERM: a KeyboardInterrupt on one host would leave
    the others waiting in a collective (and it in JAX's shutdown barrier) for minutes,
    saving nothing.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}
        self.multihost = jax.process_count() > 1

    def _handle(self, signum: int, frame: Any) -> None:
        # A second Ctrl-C kills as usual; a Ctrl-C after a SIGTERM still waits for the save
        # (it raised KeyboardInterrupt before the checkpoint was written).
        if signum == signal.SIGINT and signal.SIGINT in self._old:
            signal.signal(signal.SIGINT, self._old[signal.SIGINT])
        if self.multihost:  # (SIGINT only) every host stops at the step they agree on
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.signal_name = signal.Signals(signum).name

    def poll(self, step: int) -> None:
        """Call after every step; on several hosts this is where they agree to stop."""
        if self.multihost and multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = "SIGTERM (preemption notice, all processes)"

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            # (several processes: SIGTERM stays with JAX's preemption service)
            for sig in (signal.SIGINT,) if self.multihost else (signal.SIGTERM, signal.SIGINT):
                # A shell starts a script's background jobs with SIGINT ignored, so that a
                # Ctrl-C meant for the foreground stops none of them; Python keeps it
                # ignored, and so does this.
                if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """Run ``train_step`` to ``loop.num_steps`` with evaluation, logging and checkpoints.

    ``Trainer(...).fit(state, train_iter)``; see ``fit`` for the arguments. One instance
    drives one run; the loop is plain Python around the jitted step. On a mesh the state
    arrives sharded (and restores into the same shardings) and each process's batch rows
    become global arrays through ``batch_sharding``; only process 0 prints and logs.
    """

    def __init__(
        self,
        train_step: StepFn,
        *,
        workdir: str | os.PathLike,
        loop: LoopConfig,
        eval_step: EvalFn | None = None,
        eval_data: Callable[[], Iterator[Batch]] | None = None,
        tokens_per_step: int | Callable[[Batch], int] | None = None,
        metadata: Mapping[str, Any] | None = None,
        batch_sharding: NamedSharding | None = None,
    ):
        self.train_step, self.eval_step, self.eval_data = train_step, eval_step, eval_data
        self.workdir, self.loop = epath.Path(workdir), loop
        # (a value JSON cannot hold fails now, not at the first save after training)
        self.metadata = json_metadata(metadata, "fit: metadata", reserved=_FIT_WRITES)
        self.tokens_per_step = tokens_per_step
        self.batch_sharding = batch_sharding
        self.primary = jax.process_index() == 0
        self.say = (tqdm.write if loop.progress else print) if self.primary else _silent
        if eval_data is not None and not callable(eval_data):  # (an iterator ends after one use)
            raise TypeError(
                "fit: eval_data must be a function returning a fresh iterator over the "
                f"validation batches (e.g. lambda: iter(val_batches)), got a "
                f"{type(eval_data).__name__}"
            )
        if loop.eval_batches > 0 and (eval_step is None) != (eval_data is None):
            # (it evaluated nothing, and keep_best never saved, without a word)
            given, missing = ("eval_step", "eval_data")[:: 1 if eval_data is None else -1]
            raise ValueError(
                f"fit: loop.eval_batches={loop.eval_batches} with {given} but no {missing}: "
                f"pass both to evaluate, or eval_batches=0 not to"
            )
        self.evaluating = eval_step is not None and eval_data is not None and loop.eval_batches > 0

    def fit(self, state: TrainState, train_iter: Iterator[Batch]) -> FitResult:
        loop = self.loop
        if not hasattr(train_iter, "__next__"):  # (else "'list' object is not an iterator")
            raise TypeError(
                f"fit: train_iter must be an iterator of batches, got a {type(train_iter).__name__}"
                " (iter() a list; a grain dataset's iterator keeps its position in checkpoints)"
            )
        ckpt_dir = self.workdir / "checkpoints"
        # A finished run only reads its checkpoint, so it may sit in a read-only folder.
        finished = False
        # (folder_exists: process 0's answer; another process may have created it since)
        if folder_exists(ckpt_dir):
            with Checkpointer(ckpt_dir, read_only=True) as peek:
                latest = peek.latest_step()
            finished = latest is not None and latest >= loop.num_steps
        if not finished:
            # metrics.jsonl and tb/ (the Checkpointer checks its own folder). Every process
            # probes, also the files only process 0 writes: were only process 0 to fail,
            # the others would wait 5 minutes at orbax's first barrier for it.
            check_writable(self.workdir)
            _check_metrics_writable(self.workdir)
        # One run at a time in a workdir (a finished run only reads): held to the end.
        lock = None if finished else FolderLock(self.workdir, "fit")
        try:
            self.ckpt = Checkpointer(
                ckpt_dir,
                max_to_keep=loop.max_to_keep,
                best_metric="val_loss" if loop.keep_best else None,
                async_save=loop.async_checkpointing,
                read_only=finished,  # (otherwise it checks that it can write its folder)
            )
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        self.state, self.train_iter = state, train_iter
        # Only grain iterators have a position to save; others restart (resume not exact).
        grain_iterators = (grain.DatasetIterator, grain.DataLoaderIterator)
        self.saved_iter = train_iter if isinstance(train_iter, grain_iterators) else None
        self.saved_step: int | None = None
        self.best_val = math.inf
        self.pending: list[tuple[int, dict[str, Mean]]] = []
        # A log window a signal cut short: its steps' sums, saved with the checkpoint.
        self.open_window: dict[str, Any] | None = None
        # A restored such window's last learning rate (its record's, as _flush gives it).
        self.window_learning_rate: float | None = None
        self.last_eval: dict[str, float] = {}
        self.eval_step_done: int | None = None  # the step last_eval evaluated
        try:
            for unfinished in self.ckpt.unfinished_saves():
                self.say(
                    f"note: {unfinished} is a save that did not finish (the run was stopped "
                    "while writing it): not a checkpoint, ignored"
                )
            for record in self.ckpt.unreadable_step_records():
                self.say(
                    f"note: {record} is empty, cut off or missing (orbax's record of when the "
                    "step was saved); its checkpoint is read without it"
                )
            if self.ckpt.latest_step() is not None:
                self.state, meta = self.ckpt.restore(state, data_iter=self.saved_iter)
                # (not `or math.inf`: a best val_loss of 0.0 is a best like any other)
                best = meta.get("best_val_loss")
                self.best_val = math.inf if best is None else best
                self.last_eval = meta.get("eval") or {}
                self.saved_step = int(self.state.step)
                window = meta.get("log_window")
                self.pending = _window_from_json(window)
                self.window_learning_rate = (window or {}).get("learning_rate")
                if self._window_logged():  # by a rerun that had nothing to train
                    self.pending = []
                self.say(f"Resumed from {self.ckpt.step_dir(self.saved_step)}")
                if not finished:
                    self._note_steps_the_next_save_deletes()
            elif abstract := _abstract_leaves(state):
                raise ValueError(
                    f"fit: the state has abstract leaves ({abstract[0]}, a restore target) but "
                    f"{ckpt_dir} holds no checkpoint to restore; pass a built state"
                )
            # A restored state comes back committed to its devices and a fresh one does not,
            # and jit keys its cache on that: committed (no copy), a run resumed in the same
            # process (a notebook) reuses the steps compiled for the first.
            self.state = _committed(self.state)
            self.step = int(self.state.step)
            if self.step >= self.loop.num_steps and self.saved_step is not None:
                # A finished run: nothing to train, evaluate or write (not even a TB file),
                # but for a log window a signal cut short, which no resume would log.
                if self.pending:
                    self._log_saved_window()
                self.say(f"Step {self.step} >= num_steps={self.loop.num_steps}: nothing to do.")
                return FitResult(self.state, self.step, False, self.last_eval, 0)
            # A resumed run logs from the checkpoint's step + 1, a fresh one from its step
            # (0): TensorBoard hides what a killed run logged from there on, also a run
            # killed before its first checkpoint (metrics.jsonl keeps both; see MetricsWriter).
            resumed = self.saved_step is not None
            start = self.step
            writer = MetricsWriter(
                self.workdir,
                active=self.primary,
                purge_step=self.step + 1 if resumed else self.step,
            )
            with writer as self.writer, _StopOnSignal() as stop:
                if self.evaluating and self.step == 0 and self.saved_step is None:
                    self._evaluate_now()
                    record = self.last_eval | {"tokens_per_s": None}
                    self._stop_on_non_finite_eval(record)
                    self.writer.write(0, record)
                    self.say(f"step 0: val loss {self.last_eval['val_loss']:.4f}")
                self._train(stop)
                if stop.signal_name is None:
                    # _train saved its last step; a run of no steps (num_steps=0) saves its
                    # start here, or it would leave nothing to sample or resume from.
                    self._save()
                # Finish the final (async) save while a SIGTERM still only sets a flag:
                # killed during the write, the run would lose its last checkpoint.
                self.ckpt.wait()
                if stop.signal_name is not None:
                    self._save()
                    self.ckpt.wait()
                    self.say(
                        f"{stop.signal_name}: saved a checkpoint at step {self.step} in "
                        f"{self.ckpt.directory}"
                    )
            # A signal during the final save stopped nothing: the run is complete.
            interrupted = stop.signal_name is not None and self.step < loop.num_steps
            return FitResult(self.state, self.step, interrupted, self.last_eval, self.step - start)
        finally:
            try:
                self.ckpt.close()
            finally:  # (a failed final save is raised, and the lock still dropped)
                if lock is not None:
                    lock.release()

    def _train(self, stop: _StopOnSignal) -> None:
        loop = self.loop
        bar = tqdm(
            total=loop.num_steps, initial=self.step, unit="step",
            disable=not (loop.progress and self.primary),
            dynamic_ncols=True, mininterval=0.5,
        )  # fmt: skip
        t0, timed, timed_tokens, tokens_per_s = None, 0, 0, None
        with bar:
            while self.step < loop.num_steps and stop.signal_name is None:
                try:
                    batch = self._place(next(self.train_iter))
                except StopIteration:
                    self._stop(
                        RuntimeError,
                        f"train_iter ran out at step {self.step} of num_steps={loop.num_steps}",
                    )
                tokens = self._count_tokens(batch)
                self.state, metrics = self.train_step(self.state, batch)
                self.step += 1
                stop.poll(self.step)
                self.pending.append((self.step, metrics))
                if t0 is None:  # The first step compiles: keep it out of the timing.
                    jax.block_until_ready(metrics)
                    t0 = time.perf_counter()
                    bar.unpause()  # ... and out of the bar's rate and ETA.
                else:
                    timed, timed_tokens = timed + 1, timed_tokens + tokens
                bar.update(1)
                last = self.step == loop.num_steps
                eval_now = self.evaluating and (last or _every(self.step, loop.eval_every))
                ckpt_now = last or _every(self.step, loop.checkpoint_every)
                if not (eval_now or ckpt_now or _every(self.step, loop.log_every)):
                    continue
                record, tokens_per_s = self._window_record(t0, timed, timed_tokens, tokens_per_s)
                bar.set_postfix(
                    loss=f"{record['train_loss']:.4f}",
                    tok_s="-" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
                )
                if eval_now:
                    self._evaluate_now()
                    record |= self.last_eval
                    self._stop_on_non_finite_eval(record)
                    val_loss = self.last_eval["val_loss"]
                    self.say(
                        f"step {self.step}: train loss {record['train_loss']:.4f}, "
                        f"val loss {val_loss:.4f}"
                    )
                    improved = val_loss < self.best_val
                    self.best_val = min(self.best_val, val_loss)
                    ckpt_now = ckpt_now or (loop.keep_best and improved)
                # Written before the save: a state the save finds non-finite stops the run,
                # and the window's (finite) train metrics are still logged, as for a NaN
                # val_loss.
                self.writer.write(self.step, record)
                if ckpt_now:
                    self._save()
                # Each log window times its own steps; eval and saving stay out of it.
                t0, timed, timed_tokens = time.perf_counter(), 0, 0
            if self.pending:
                # A signal stopped the run inside a log window. Not written: its sums go
                # into the checkpoint, and the resumed run's record at the window's end
                # takes them in, so metrics.jsonl reads as an uninterrupted run's (a record
                # here, then one of the rest of the window alone, did not).
                self.open_window = _window_to_json(self._fetch_window())

    def _note_steps_the_next_save_deletes(self) -> None:
        """Name the saved steps this run's settings no longer keep: resumed with
        ``keep_best=False`` (the earlier run's best step) or a smaller ``max_to_keep``,
        orbax deleted them at the first save without a word. (That save also rotates out
        the oldest step the settings keep now, as every save does: not named.)"""
        loop, steps = self.loop, self.ckpt.all_steps()
        kept = set(steps[-loop.max_to_keep :])
        if loop.keep_best:
            kept.add(self.ckpt.best_step())
        if doomed := [step for step in steps if step not in kept]:
            settings = f"max_to_keep={loop.max_to_keep}" + (
                "" if loop.keep_best else " and keep_best=False"
            )
            folders = ", ".join(str(self.ckpt.step_dir(step)) for step in doomed)
            self.say(
                f"note: this run's settings ({settings}) no longer keep {folders}: its first "
                "save deletes them (copy them elsewhere first to keep them)"
            )

    def _window_logged(self) -> bool:
        """Whether ``metrics.jsonl`` already holds the record of the restored log window
        (``pending``'s one entry), as ``_log_saved_window`` writes it: a later resume then
        neither writes it again nor merges its steps into its own first record. A file it
        cannot read holds none (a folder of that name: a finished run, which checks nothing
        before, then names it in ``_log_saved_window``'s note; it failed as IsADirectoryError)."""
        path = self.workdir / "metrics.jsonl"
        if not self.pending or not path.exists():
            return False
        try:
            with warnings.catch_warnings():
                # A cut-off line (a run killed mid-write) is no record of the window, and
                # read_metrics's warning of it came again on every such resume.
                warnings.simplefilter("ignore")
                records = read_metrics(path)
        except OSError:
            return False
        step = self.pending[-1][0]
        want = {name: json_value(v) for name, v in self._saved_window_record().items()}
        return any(
            r.get("step") == step and all(k in r and r[k] == v for k, v in want.items())
            for r in records
        )

    def _log_saved_window(self) -> None:
        """Write the restored log window (one a signal cut short) as its own record at its
        last step, for a resumed run with nothing left to train: its steps were otherwise
        missing from the metrics. A workdir it cannot write is named in a note (a finished
        run may sit in a read-only folder)."""
        step = self.pending[-1][0]
        try:
            check_writable(self.workdir)
            _check_metrics_writable(self.workdir)
        except NotWritableError as e:
            self.say(f"note: the log window saved at step {step} is not logged: {e}")
            return
        with MetricsWriter(self.workdir, active=self.primary, purge_step=step) as writer:
            writer.write(step, self._saved_window_record() | {"tokens_per_s": None})
        self.pending = []

    def _saved_window_record(self) -> dict[str, float]:
        """The restored log window's record: its means (``pending``'s one entry, fetched
        and NaN-checked before it was saved), with its last step's learning rate."""
        ((_, sums),) = self.pending
        record = reduce_means([sums])
        if self.window_learning_rate is not None:
            record["learning_rate"] = self.window_learning_rate
        return record

    def _window_record(
        self, t0: float | None, timed: int, timed_tokens: int, tokens_per_s: float | None
    ) -> tuple[dict[str, float], float | None]:
        """The log window's record (``_flush``'s means, and its tokens/s and step time when
        it timed any step) and the tokens/s to show: the last window's if this one timed none
        (the first step, which compiles, is not timed)."""
        record = self._flush()
        if timed:
            elapsed = time.perf_counter() - t0
            tokens_per_s = timed_tokens / elapsed
            record["step_time_ms"] = 1000 * elapsed / timed
        record["tokens_per_s"] = tokens_per_s
        return record, tokens_per_s

    def _evaluate_now(self) -> None:
        """Evaluate the current state into ``last_eval``, noting its step."""
        self.last_eval = self._evaluate()
        self.eval_step_done = self.step

    def _evaluate(self) -> dict[str, float]:
        batches = iter(self.eval_data())  # (a list of batches too)
        params = self.state.params
        means = []
        for i in range(self.loop.eval_batches):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(
                    f"eval_data ran out after {i} of loop.eval_batches="
                    f"{self.loop.eval_batches} batches at step {self.step}"
                ) from None
            means.append(self.eval_step(params, self._place(batch)))
        # One host sync after the loop: the next batch is read while the last one runs.
        result = reduce_means(to_host(means))
        if "val_loss" not in result:  # best-by-val_loss, the NaN guard and the log read it
            raise ValueError(
                f"eval_step must return a 'val_loss' (make_eval_step's prefix='val'), got "
                f"{sorted(result)}"
            )
        return result

    def _stop_on_non_finite_eval(self, record: dict[str, float]) -> None:
        """A NaN val_loss would otherwise be saved as the step's metric (and compare as
        neither better nor worse than the best): stop as for a NaN train loss, after writing
        ``record``, the log window's (finite) train metrics with ``val_loss`` null."""
        val_loss = record["val_loss"]
        if not math.isfinite(val_loss):
            self.writer.write(self.step, record)
            self._stop_non_finite(f"val_loss is {val_loss} at step {self.step}")

    def _place(self, batch: Batch) -> Batch:
        """This process's rows -> global arrays on the mesh (a no-op without one)."""
        if self.batch_sharding is None:
            return batch
        return global_batch(batch, self.batch_sharding)

    def _save(self) -> None:
        """Save the current step, with its evaluation if it had one (also when a signal
        stops the run at an evaluated step that did not save: a resumed or finished run
        reports it, and keep-best ranks it)."""
        if self.saved_step == self.step:
            return
        metrics = self.last_eval if self.eval_step_done == self.step else None
        # The loss and gradients checked by _flush come from the state before the last
        # update; an update can still make the state non-finite (e.g. a huge learning
        # rate). Never save such a state: the last saved checkpoint must stay a good one.
        if not _all_finite((self.state.params, self.state.opt_state)):
            self._stop_non_finite(
                f"the parameters or optimizer state after step {self.step} are not finite"
            )
        best = self.best_val if math.isfinite(self.best_val) else None
        evaluation = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        meta = self.metadata | {"best_val_loss": best, "eval": evaluation}
        if self.open_window is not None:
            meta["log_window"] = self.open_window
        self.ckpt.save(
            self.step, self.state, data_iter=self.saved_iter, metadata=meta, metrics=metrics
        )
        self.saved_step = self.step

    def _count_tokens(self, batch: Batch) -> int:
        """Tokens in one step's batch, for tokens/s (shapes only: no wait for the device)."""
        count = self.tokens_per_step
        if count is None:
            return math.prod(jax.tree.leaves(batch)[0].shape)
        return int(count(batch) if callable(count) else count)

    def _fetch_window(self) -> list[tuple[int, dict[str, Mean]]]:
        """Fetch the pending step metrics (one host sync), apply the NaN guard and clear
        them."""
        host = to_host(self.pending)
        self.pending.clear()
        for step, metrics in host:
            for name in ("train_loss", "grad_norm"):
                value = float(metrics[name].total)
                if not math.isfinite(value):
                    self._stop_non_finite(f"{name} is {value} at step {step}")
        return host

    def _flush(self) -> dict[str, float]:
        """The pending steps' means (``_fetch_window``), the learning rate the last one's."""
        host = self._fetch_window()
        means = reduce_means(m for _, m in host)
        if (rate := _last_learning_rate(host)) is not None:
            means["learning_rate"] = rate
        return means

    def _stop_non_finite(self, what: str) -> None:
        self._stop(NonFiniteLossError, what, good=" good")

    def _stop(self, error: type[Exception], what: str, good: str = "") -> None:
        """Raise ``error`` naming ``what`` and the last checkpoint (once it is written)."""
        self.ckpt.wait()
        kept = self.ckpt.latest_step()
        where = "none" if kept is None else f"step {kept} in {self.ckpt.directory}"
        raise error(
            f"{what}: training stopped. Nothing was saved after it; the last{good} "
            f"checkpoint is {where}."
        ) from None


def _window_to_json(host: list[tuple[int, dict[str, Mean]]]) -> dict[str, Any]:
    """A log window's fetched steps as ``{"steps": [first, last], "sums": {name: [total,
    count]}}``: ``sum_means``' sums, which ``reduce_means`` then continues in the same
    order (so a resumed window's mean is the uninterrupted one's, bit for bit)."""
    sums = sum_means(metrics for _, metrics in host)
    window = {"steps": [host[0][0], host[-1][0]], "sums": {k: list(v) for k, v in sums.items()}}
    if (rate := _last_learning_rate(host)) is not None:
        window["learning_rate"] = rate  # (the record of a rerun with no steps left shows it)
    return window


def _last_learning_rate(host: list[tuple[int, dict[str, Mean]]]) -> float | None:
    """The learning rate of a fetched window's last update, as nanoGPT and optax's loggers
    report it (the window's mean lags a warmup ramp by half a window); None without one."""
    if not host or "learning_rate" not in host[-1][1]:
        return None
    last = host[-1][1]["learning_rate"]
    return float(np.sum(last.total) / np.sum(last.count))


def _window_from_json(window: Any) -> list[tuple[int, dict[str, Mean]]]:
    """``_window_to_json``'s record back as one pending step (none for None)."""
    if window is None:
        return []
    sums = {name: Mean(np.float64(total), np.float64(count)) for name, (total, count) in
            window["sums"].items()}  # fmt: skip
    return [(int(window["steps"][-1]), sums)]


def _abstract_leaves(tree: Any) -> list[str]:
    """The paths of ``tree``'s ``jax.ShapeDtypeStruct`` leaves (shapes without data)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    abstract = [path for path, x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
    return [f"state{jax.tree_util.keystr(path)}" for path in abstract]


def _committed(tree: Any) -> Any:
    """``tree`` with each uncommitted array committed to the device it is on (the same
    buffer); committed arrays, e.g. sharded ones, are left as they are."""
    commit = lambda x: jax.device_put(x, next(iter(x.devices()))) if not x.committed else x
    return jax.tree.map(lambda x: commit(x) if isinstance(x, jax.Array) else x, tree)


def fit(
    state: TrainState,
    train_step: StepFn,
    train_iter: Iterator[Batch],
    *,
    workdir: str | os.PathLike,
    loop: LoopConfig,
    eval_step: EvalFn | None = None,
    eval_data: Callable[[], Iterator[Batch]] | None = None,
    tokens_per_step: int | Callable[[Batch], int] | None = None,
    metadata: Mapping[str, Any] | None = None,
    batch_sharding: NamedSharding | None = None,
) -> FitResult:
    """Train ``state`` to ``loop.num_steps``, resuming from ``workdir/checkpoints`` if present.

    Evaluates at step 0 (fresh runs), every ``eval_every`` steps and at the end; writes
    train metrics every ``log_every`` steps; saves every ``checkpoint_every`` steps, at the
    end, whenever val loss improves (``keep_best``), and on SIGTERM/SIGINT (then returns
    with ``interrupted=True``, unless the signal came after the last step). ``eval_step``
    must return a ``val_loss`` (``make_eval_step``'s default prefix). A finished run
    (``state.step >= num_steps`` after restoring) returns at once, with ``trained_steps=0``,
    and writes nothing, but for the record of a log window a signal cut short (once).

    Args:
      state: the initial state (also the restore target: a checkpoint must match its tree).
        When ``workdir`` holds a checkpoint it may be abstract, ``jax.ShapeDtypeStruct``
        leaves with shardings (``sharding.create_sharded(..., abstract=True)``): a resume
        then never builds an initial state beside the restored one.
      train_step: from ``make_train_step``.
      train_iter: batches; the position of a grain iterator (``DatasetIterator``, or a
        ``grain.DataLoader``'s) is saved and restored (any other iterator starts afresh on
        resume, so the resume is not exact).
      workdir: holds ``checkpoints/<step>/``, ``metrics.jsonl`` and ``tb/``.
      loop: when to evaluate, log and checkpoint.
      eval_step: from ``make_eval_step``; used with ``eval_data`` (one without the other is
        a ``ValueError`` unless ``loop.eval_batches`` is 0).
      eval_data: a function returning a fresh iterator (or list) of validation batches, the
        same ones each time.
      tokens_per_step: the tokens a step trains on, for tokens/s: an int, or a function of
        the (global) batch, called on every step, that reads shapes only (a value would
        wait for the device), e.g. ``lambda b: b["targets"].size``. Default: the size of
        each batch's first leaf (in ``jax.tree.leaves`` order), so batches whose lengths
        vary (buckets) are counted as they come.
      metadata: JSON-serialisable dict saved with every checkpoint (config, vocabulary);
        NumPy values are saved as the Python values they hold.
      batch_sharding: on a device mesh, how batches are split (``sharding.batch_sharding``);
        ``train_iter`` and ``eval_data`` then yield this process's rows only
        (``sharding.process_batch_slice``). ``state`` must already be on the mesh.

    Returns:
      A ``FitResult``.

    Raises:
      NonFiniteLossError: a loss or gradient norm, or the parameters or optimizer state
        about to be saved, were not finite (names the step). A non-finite ``val_loss`` is
        written to ``metrics.jsonl`` as null, with that log window's train metrics.
      IncompatibleCheckpointError, CheckpointError: the workdir's checkpoint cannot be used.
      NotWritableError: the workdir or its checkpoint folder cannot be written (checked
        before the first step); ``FolderInUseError`` (one) when another process is training
        in the workdir (``checkpoint.FolderLock``), before anything is written.
      ValueError: ``metadata`` holds a value JSON cannot hold (checked before the first step),
        or a batch's rows do not split over ``batch_sharding`` (``sharding.global_batch``).
      RuntimeError: ``train_iter`` ran out before ``num_steps`` (names the step and the last
        checkpoint; the steps after it are not saved), or ``eval_data`` held fewer than
        ``eval_batches`` batches.
    """
    trainer = Trainer(
        train_step,
        workdir=workdir,
        loop=loop,
        eval_step=eval_step,
        eval_data=eval_data,
        tokens_per_step=tokens_per_step,
        metadata=metadata,
        batch_sharding=batch_sharding,
    )
    return trainer.fit(state, train_iter)


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` for the processes that do not report (all but process 0)."""
