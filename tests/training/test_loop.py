"""The loop: jitted steps, gradient accumulation, fit, NaN guard, exact resume, SIGTERM."""

import dataclasses
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.training import checkpoint as checkpoint_module
from jaxattn.training import data, optim
from jaxattn.training import loop as loop_module
from jaxattn.training.checkpoint import (
    Checkpointer,
    IncompatibleCheckpointError,
    NotWritableError,
)
from jaxattn.training.loop import (
    LoopConfig,
    NonFiniteLossError,
    fit,
    make_eval_step,
    make_train_step,
)
from jaxattn.training.metrics import read_metrics, reduce_means
from jaxattn.training.state import create_train_state
from tests.processes import cpu_env


def snapshot(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_step_decreases_loss(toy):
    step = make_train_step(toy.loss, toy.optimizer())
    state, it = toy.state(), toy.iterator()
    losses = []
    for _ in range(40):
        state, metrics = step(state, next(it))
        losses.append(float(metrics["train_loss"].total))
    assert int(state.step) == 40
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])
    assert set(metrics) == {"train_loss", "train_mae", "grad_norm"}


def test_train_step_donates_the_state(toy):
    step = make_train_step(toy.loss, toy.optimizer())
    state = toy.state()
    new_state, _ = step(state, next(toy.iterator()))
    assert state.params["w"].is_deleted() and state.opt_state[1][0].mu["w"].is_deleted()
    assert not new_state.params["w"].is_deleted()


def test_learning_rate_is_reported(toy):
    step = make_train_step(
        toy.loss, toy.optimizer(), learning_rate_fn=lambda s: 0.5 * (s.astype(jnp.float32) + 1)
    )
    state, it = toy.state(), toy.iterator()
    for want in (0.5, 1.0):
        state, metrics = step(state, next(it))
        assert float(metrics["learning_rate"].total) == want


def test_fit_logs_the_learning_rate_of_the_windows_last_step(tmp_path, toy):
    """The logged rate is the one the window's last update used, not the window's mean
    (which lags a warmup ramp by half a window)."""
    schedule = lambda count: 1e-2 * (jnp.asarray(count).astype(jnp.float32) + 1.0) / 100.0
    optimizer = optim.make_optimizer(schedule)
    fit(
        create_train_state(toy.params(), optimizer, jax.random.key(7)),
        make_train_step(toy.loss, optimizer, learning_rate_fn=schedule),
        toy.iterator(),
        workdir=tmp_path,
        loop=LoopConfig(num_steps=20, log_every=10, progress=False),
    )
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    for step in (10, 20):  # the update that produced step s ran with schedule(s - 1)
        assert records[step]["learning_rate"] == pytest.approx(1e-2 * step / 100.0)


def test_gradient_accumulation_equals_one_big_batch(toy):
    def loss(params, batch, rng):
        return toy.loss(params, batch, None)  # Deterministic, so both paths are comparable.

    k = 4
    big = make_train_step(loss, toy.optimizer())
    accum = make_train_step(loss, toy.optimizer(), grad_accum_steps=k)
    it = toy.iterator()
    batches = [
        jax.tree.map(lambda *xs: np.concatenate(xs), *[next(it) for _ in range(k)])
        for _ in range(3)
    ]
    s_big, s_acc = toy.state(), toy.state()
    for batch in batches:
        s_big, m_big = big(s_big, batch)
        s_acc, m_acc = accum(s_acc, batch)
        # The accumulated metric is a sum over k microbatch means with count k.
        assert float(m_acc["train_loss"].count) == k
        np.testing.assert_allclose(
            float(m_acc["train_loss"].total) / k, float(m_big["train_loss"].total), rtol=1e-5
        )
        np.testing.assert_allclose(
            float(m_acc["grad_norm"].total), float(m_big["grad_norm"].total), rtol=1e-5
        )
    for x, y in zip(jax.tree.leaves(s_acc.params), jax.tree.leaves(s_big.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    for bad in (0, 2.0, True):  # 2.0 failed at the first step, True ran as 1
        with pytest.raises(ValueError, match=r"make_train_step: grad_accum_steps must be an int"):
            make_train_step(loss, toy.optimizer(), grad_accum_steps=bad)
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps=4"):
        accum(s_acc, next(it))  # 6 rows, not 4 microbatches


def test_gradient_accumulation_names_a_scalar_batch_leaf(toy):
    # A leaf without a leading axis raised a bare "IndexError: tuple index out of range".
    def loss(params, batch, rng):
        return toy.loss(params, batch["rows"], None)[0] * batch["scale"], {}

    batch = {"rows": next(toy.iterator()), "scale": jnp.float32(2.0)}
    step = make_train_step(loss, toy.optimizer(), grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"grad_accum_steps=2 .* a batch leaf is a scalar"):
        step(toy.state(), batch)


def test_train_step_uses_a_fresh_key_each_step(toy):
    def loss(params, batch, rng):
        noise = jax.random.normal(rng, ())
        return jnp.mean(params["w"]) * 0.0 + noise, {}

    step = make_train_step(loss, toy.optimizer())
    state, it = toy.state(), toy.iterator()
    values = []
    for _ in range(3):
        state, metrics = step(state, next(it))
        values.append(float(metrics["train_loss"].total))
    assert len(set(values)) == 3


def test_eval_step_is_deterministic_loss(toy):
    calls = []

    def loss(params, batch, rng):
        calls.append(rng)
        return toy.loss(params, batch, rng)

    evaluate = make_eval_step(loss)
    params, batch = toy.params(), next(toy.iterator())
    metrics = evaluate(params, batch)
    assert calls == [None]
    want = float(toy.loss(params, batch, None)[0])
    assert float(metrics["val_loss"].total) == pytest.approx(want)
    assert set(metrics) == {"val_loss", "val_mae"}


@pytest.mark.parametrize("step_kind", ["train", "eval"])
def test_a_loss_fn_returning_non_scalars_or_an_aux_loss_is_named(toy, step_kind):
    """Mean totals are summed on the host: a per-row eval loss was logged as B times the
    mean (the sum of its rows), a vector aux as the sum of its elements, and an aux key
    'loss' silently replaced the loss as train_loss / val_loss."""

    def make(loss_fn):
        if step_kind == "train":
            step = make_train_step(loss_fn, toy.optimizer())
            return lambda batch: step(toy.state(), batch)
        step = make_eval_step(loss_fn)
        return lambda batch: step(toy.params(), batch)

    def per_row(params, batch, rng):
        err = (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2  # [B, 1]
        return err[:, 0], {}

    def vector_aux(params, batch, rng):
        loss, _ = toy.loss(params, batch, rng)
        return loss, {"abs_x": jnp.mean(jnp.abs(batch["x"]), axis=0)}  # [D]

    def aux_named_loss(params, batch, rng):
        loss, _ = toy.loss(params, batch, rng)
        return loss + 1.0, {"loss": loss}

    def nested_aux(params, batch, rng):
        loss, _ = toy.loss(params, batch, rng)
        return loss, {"grads": {"w": jnp.sum(params["w"])}}

    batch = next(toy.iterator())
    checks = [
        (vector_aux, r"loss_fn's aux\['abs_x'\] must be a scalar, got shape \(5,\)"),
        (aux_named_loss, r"aux has the key 'loss'"),
        (lambda p, b, r: (toy.loss(p, b, r)[0], None), r"aux a dict.*got aux of type NoneType"),
        # (jnp.ndim reads a dict as 0-d: fit failed at its first log, after training)
        (nested_aux, r"loss_fn's aux\['grads'\] must be a scalar, got a dict"),
    ]
    if step_kind == "eval":  # (grad refuses a non-scalar loss itself)
        checks.append((per_row, r"eval_step: loss_fn's loss .* must be a scalar, got shape \(6,\)"))
    for loss_fn, message in checks:
        with pytest.raises(ValueError, match=message):
            make(loss_fn)(batch)


@pytest.mark.parametrize("step_kind", ["train", "eval"])
def test_a_loss_fn_returning_no_pair_is_named(toy, step_kind):
    """A loss_fn returning the loss alone failed as "iteration over a 0-d array" (and a
    triple as "too many values to unpack"), naming neither the step nor loss_fn."""
    batch = next(toy.iterator())
    if step_kind == "train":
        make = lambda f: lambda: make_train_step(f, toy.optimizer())(toy.state(), batch)
    else:
        make = lambda f: lambda: make_eval_step(f)(toy.params(), batch)
    checks = [
        (lambda p, b, r: toy.loss(p, b, r)[0], r"got an array of shape \(\)"),
        (lambda p, b, r: (*toy.loss(p, b, r), 1.0), r"got a tuple of 3 items"),
    ]
    for loss_fn, got in checks:
        message = rf"{step_kind}_step: loss_fn must return a pair \(loss, aux\).*{got}"
        with pytest.raises(ValueError, match=message):
            make(loss_fn)()
    # a list pair is a pair
    as_list = lambda p, b, r: list(toy.loss(p, b, r))
    assert np.isfinite(float(jax.tree.leaves(make(as_list)())[-1]))


def test_eval_step_weights_each_batch_by_weight_fn(tmp_path, toy):
    """With weight_fn the evaluation is the mean over what the weights count (a masked
    loss's tokens), not the mean of the batch means: batches of 1 and 3 counted tokens
    with mean losses 4 and 0 average to 1, not 2."""

    def masked_loss(params, batch, rng):  # the mean over the counted rows
        del params, rng
        counted = batch["mask"]
        return jnp.sum(batch["loss"] * counted) / jnp.sum(counted), {"n": jnp.sum(counted)}

    batches = [
        {
            "loss": np.array([4.0, 9.0, 9.0], np.float32),
            "mask": np.array([1.0, 0.0, 0.0], np.float32),
        },
        {"loss": np.zeros(3, np.float32), "mask": np.ones(3, np.float32)},
    ]
    weighted = make_eval_step(masked_loss, weight_fn=lambda b: jnp.sum(b["mask"]))
    plain = make_eval_step(masked_loss)
    assert reduce_means(weighted({}, b) for b in batches)["val_loss"] == pytest.approx(1.0)
    assert reduce_means(plain({}, b) for b in batches)["val_loss"] == pytest.approx(2.0)
    assert reduce_means(weighted({}, b) for b in batches)["val_n"] == pytest.approx(2.5)
    # A batch of weight 0 counts for nothing, even with a NaN loss (0 / 0 here).
    empty = {"loss": np.zeros(3, np.float32), "mask": np.zeros(3, np.float32)}
    means = reduce_means(weighted({}, b) for b in [*batches, empty])
    assert means["val_loss"] == pytest.approx(1.0)


def _fit(
    toy,
    workdir,
    *,
    num_steps,
    dataset=None,
    state=None,
    eval_step=None,
    eval_data=None,
    **loop_kwargs,
):
    loop_kwargs = dict(eval_every=5, eval_batches=2, log_every=2, checkpoint_every=4) | loop_kwargs
    optimizer = toy.optimizer()
    return fit(
        state
        if state is not None
        else create_train_state(toy.params(), optimizer, jax.random.key(7)),
        make_train_step(toy.loss, optimizer),
        data.batch_iterator(dataset if dataset is not None else toy.dataset(0)),
        workdir=workdir,
        loop=LoopConfig(num_steps=num_steps, progress=False, **loop_kwargs),
        eval_step=eval_step or make_eval_step(toy.loss),
        eval_data=eval_data or (lambda: data.batch_iterator(toy.dataset(1))),
        metadata={"note": "toy"},
    )


def test_fit_refuses_metadata_json_cannot_hold_before_training(tmp_path, toy):
    """It failed only at the first save, in orbax's thread, after training to it (and a
    NumPy integer of a config file failed there too: now saved as an int)."""
    optimizer = toy.optimizer()

    def run(metadata):
        return fit(
            create_train_state(toy.params(), optimizer, jax.random.key(7)),
            make_train_step(toy.loss, optimizer),
            toy.iterator(),
            workdir=tmp_path,
            loop=LoopConfig(num_steps=4, checkpoint_every=2, progress=False),
            metadata=metadata,
        )

    with pytest.raises(ValueError, match=r"fit: metadata\['seen'\] is not JSON-serial"):
        run({"config": {"num_steps": 4}, "seen": {1, 2}})
    # Keys every checkpoint's metadata gets from fit and save were overwritten silently.
    with pytest.raises(ValueError, match=r"fit: metadata: the keys \['eval', 'step'\] are"):
        run({"config": {"num_steps": 4}, "eval": "bleu", "step": 0})
    # (a resume read a user's log_window as fit's own signal-cut log window, and failed)
    with pytest.raises(ValueError, match=r"fit: metadata: the keys \['log_window'\] are"):
        run({"log_window": 50})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing trained or made
    assert run({"config": {"num_steps": np.int64(4)}}).step == 4
    with Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.read_metadata(2)["config"] == {"num_steps": 4}


def test_fit_logs_evaluates_and_checkpoints(tmp_path, toy):
    result = _fit(toy, tmp_path, num_steps=10, max_to_keep=10)
    assert result.step == 10 and not result.interrupted and int(result.state.step) == 10
    records = read_metrics(tmp_path / "metrics.jsonl")
    for r in records:
        assert "step" in r and "tokens_per_s" in r and ("train_loss" in r or "val_loss" in r)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 5, 10]
    assert [r["step"] for r in records if "train_loss" in r] == [2, 4, 5, 6, 8, 10]
    assert all(r["tokens_per_s"] > 0 for r in records if r["step"] > 2)
    assert result.last_eval["val_loss"] == records[-1]["val_loss"]
    # Every 4 steps, at the end, and whenever val loss improved (5).
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 5, 8, 10]
        assert ckpt.read_metadata()["note"] == "toy"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


class _CrashAt(grain.transforms.RandomMap):
    """The toy data, except that reading batch ``index`` kills the run."""

    def __init__(self, toy_data, index):
        self.toy_data, self.index = toy_data, index

    def random_map(self, element, rng):
        if element == self.index:
            raise RuntimeError("simulated crash")
        return self.toy_data.random_map(element, rng)


def test_resume_after_a_crash_gives_bitwise_identical_state(tmp_path, toy):
    straight = _fit(toy, tmp_path / "straight", num_steps=12, checkpoint_every=6)
    crashing = grain.MapDataset.range(sys.maxsize).random_map(_CrashAt(toy.Regression(), 8), seed=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(toy, tmp_path / "resumed", num_steps=12, checkpoint_every=6, dataset=crashing)
    with Checkpointer(tmp_path / "resumed" / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 6  # Steps 7 and 8 were lost with the crash.
    resumed = _fit(toy, tmp_path / "resumed", num_steps=12, checkpoint_every=6)
    assert resumed.step == 12
    leaves_equal(resumed.state, straight.state)

    # The resumed run's train losses after step 6 match the uninterrupted run's.
    def losses(workdir):
        return {
            r["step"]: r["train_loss"]
            for r in read_metrics(workdir / "metrics.jsonl")
            if "train_loss" in r
        }

    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert all(a[s] == b[s] for s in a if s > 6)


def test_a_save_that_did_not_finish_is_named_and_the_run_resumes_before_it(
    tmp_path, toy, capsys, caplog
):
    """A run killed while writing a checkpoint leaves orbax's temporary folder. The resumed
    run restored the step before it without a word, and saving the step again replaced the
    folder with only orbax's raw log line ("W... atomicity.py:134] Attempted to create
    temporary directory ... Removing existing directory since it is not finalized.")."""
    _fit(toy, tmp_path, num_steps=8, checkpoint_every=4, eval_every=0, keep_best=False)
    checkpoints = tmp_path / "checkpoints"
    unfinished = checkpoints / "8.orbax-checkpoint-tmp"
    (checkpoints / "8").rename(unfinished)  # killed after writing step 8, before its rename
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        result = _fit(toy, tmp_path, num_steps=8, checkpoint_every=4, eval_every=0)
    out = capsys.readouterr().out
    assert f"note: {unfinished} is a save that did not finish" in out
    assert f"Resumed from {checkpoints / '4'}" in out
    assert result.step == 8 and not unfinished.exists()
    assert not [r for r in caplog.records if "not finalized" in r.getMessage()]


def test_a_folder_of_other_files_named_like_a_step_stops_the_run_before_training(tmp_path, toy):
    """orbax listed it as an old step and deleted it to keep the latest max_to_keep."""
    _fit(toy, tmp_path, num_steps=4, eval_every=0, keep_best=False)
    stray = tmp_path / "checkpoints" / "2"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(checkpoint_module.CheckpointError, match=f"^{stray} is a folder of"):
        _fit(toy, tmp_path, num_steps=8, checkpoint_every=1, max_to_keep=1, eval_every=0)
    assert snapshot(tmp_path) == before


def test_an_empty_step_record_is_one_note_not_orbaxs_log_lines(tmp_path, toy, capsys, caplog):
    """orbax logged "Failed to json parse Metadata file: .../_CHECKPOINT_METADATA, file
    content: , error: ..." at every read of the step (three times in train/lm.py), then
    restored the step without it."""
    _fit(toy, tmp_path, num_steps=4, eval_every=0, keep_best=False)
    record = tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA"
    record.write_text("")
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        result = _fit(toy, tmp_path, num_steps=6, eval_every=0, keep_best=False)
    out = capsys.readouterr().out
    assert out.count(f"note: {record} is empty, cut off or missing") == 1
    assert f"Resumed from {record.parent}" in out and result.step == 6
    assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]


def test_a_grain_data_loader_resumes_where_it_stopped(tmp_path, toy):
    """A grain.DataLoader's iterator (classic grain) is checkpointed like a DatasetIterator:
    killed after the step-4 checkpoint and resumed, the run ends with the parameters of an
    uninterrupted one (it used to restart the data silently)."""

    class Source:  # batch i of the toy regression
        def __repr__(self):  # grain checks that a restored loader reads the same source
            return "Source()"

        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            x = np.random.default_rng(i).normal(size=(toy.B, toy.D)).astype(np.float32)
            return {"x": x, "y": x @ np.linspace(-1.0, 1.0, toy.D).astype(np.float32)[:, None]}

    def loader():
        sampler = grain.samplers.IndexSampler(10**6, shuffle=False, num_epochs=1, seed=0)
        return iter(grain.DataLoader(data_source=Source(), sampler=sampler, worker_count=0))

    optimizer = toy.optimizer()

    def run(workdir, num_steps):
        return fit(
            create_train_state(toy.params(), optimizer, jax.random.key(7)),
            make_train_step(toy.loss, optimizer),
            loader(),
            workdir=workdir,
            loop=LoopConfig(num_steps=num_steps, checkpoint_every=4, log_every=4, progress=False),
        )

    straight = run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)  # "killed" after its step-4 checkpoint
    assert (tmp_path / "resumed" / "checkpoints" / "4" / "data").is_dir()
    resumed = run(tmp_path / "resumed", 8)
    leaves_equal(straight.state.params, resumed.state.params)


def test_resume_into_an_abstract_state_equals_a_built_one(tmp_path, toy):
    """fit restores into a state of jax.ShapeDtypeStructs (what the scripts pass when they
    resume, so that no initial state is built and held beside the restored one), and names
    such a state when there is no checkpoint to restore."""
    optimizer = toy.optimizer()
    built = create_train_state(toy.params(), optimizer, jax.random.key(7))
    abstract = jax.eval_shape(lambda: built)
    with pytest.raises(ValueError, match=r"abstract leaves \(state\.step, .* holds no checkpoint"):
        _fit(toy, tmp_path / "abstract", num_steps=4, state=abstract)
    assert not (tmp_path / "abstract" / "checkpoints").exists() or not any(
        (tmp_path / "abstract" / "checkpoints").iterdir()
    )
    straight = _fit(toy, tmp_path / "straight", num_steps=8)
    for workdir, state in (("built", built), ("abstract", abstract)):
        _fit(toy, tmp_path / workdir, num_steps=4)
        resumed = _fit(toy, tmp_path / workdir, num_steps=8, state=state)
        assert resumed.step == 8
        leaves_equal(resumed.state, straight.state)


def test_resumed_run_purges_the_killed_runs_tensorboard_steps(tmp_path, toy):
    from test_metrics import scalar_steps, tensorboard_events  # tests/training/test_metrics.py

    crashing = grain.MapDataset.range(sys.maxsize).random_map(_CrashAt(toy.Regression(), 8), seed=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(toy, tmp_path, num_steps=12, checkpoint_every=6, log_every=1, dataset=crashing)
    _fit(toy, tmp_path, num_steps=12, checkpoint_every=6, log_every=1)
    (_, first), (_, second) = tensorboard_events(tmp_path / "tb")
    assert scalar_steps(first, "train_loss") == [1, 2, 3, 4, 5, 6, 7, 8]
    # Resumed from step 6: steps 7 and 8 are logged again, and TensorBoard is told to
    # drop the crashed run's (a START session log at step 7).
    assert [e.step for e in second if e.HasField("session_log")] == [7]
    assert scalar_steps(second, "train_loss") == [7, 8, 9, 10, 11, 12]


def test_a_rerun_after_a_crash_before_any_checkpoint_purges_all_tensorboard_steps(tmp_path, toy):
    from test_metrics import scalar_steps, tensorboard_events  # tests/training/test_metrics.py

    crashing = grain.MapDataset.range(sys.maxsize).random_map(_CrashAt(toy.Regression(), 4), seed=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(toy, tmp_path, num_steps=8, checkpoint_every=6, log_every=1, dataset=crashing)
    assert not list((tmp_path / "checkpoints").iterdir())  # it starts again from step 0
    _fit(toy, tmp_path, num_steps=8, checkpoint_every=6, log_every=1)
    (_, first), (_, second) = tensorboard_events(tmp_path / "tb")
    assert scalar_steps(first, "train_loss") == [1, 2, 3, 4]
    assert [e.step for e in second if e.HasField("session_log")] == [0]  # drops all of first
    assert scalar_steps(second, "train_loss") == list(range(1, 9))


def test_finished_run_is_not_overwritten(tmp_path, toy):
    _fit(toy, tmp_path, num_steps=4)
    before = snapshot(tmp_path / "checkpoints")
    result = _fit(toy, tmp_path, num_steps=4)
    assert result.step == 4 and snapshot(tmp_path / "checkpoints") == before


def test_fit_result_counts_the_steps_this_call_trained(tmp_path, toy):
    """A script tells a rerun of a finished run (nothing trained: its end-of-run decode
    is already recorded) from a run that trained, also a resumed one, by trained_steps."""
    assert _fit(toy, tmp_path, num_steps=4).trained_steps == 4
    resumed = _fit(toy, tmp_path, num_steps=6)
    assert (resumed.step, resumed.trained_steps) == (6, 2)
    rerun = _fit(toy, tmp_path, num_steps=6)
    assert (rerun.step, rerun.trained_steps) == (6, 0)
    assert _fit(toy, tmp_path / "none", num_steps=0).trained_steps == 0


def test_incompatible_checkpoint_in_workdir_is_an_error(tmp_path, toy):
    _fit(toy, tmp_path, num_steps=4)
    before = snapshot(tmp_path / "checkpoints")
    optimizer = toy.optimizer()
    wide = {"w": jnp.zeros((toy.D, 3)), "b": jnp.zeros((3,))}
    with pytest.raises(IncompatibleCheckpointError, match=r"'params/b' has shape \(1,\)"):
        _fit(
            toy, tmp_path, num_steps=8, state=create_train_state(wide, optimizer, jax.random.key(0))
        )
    assert snapshot(tmp_path / "checkpoints") == before


def test_unwritable_workdir_fails_before_training(tmp_path, toy):
    workdir = tmp_path / "run"
    workdir.write_text("a file, not a folder")  # (chmod would not stop root)
    with pytest.raises(NotWritableError, match=f"cannot write to {workdir}: "):
        _fit(toy, workdir, num_steps=4)
    assert workdir.read_text() == "a file, not a folder"


@pytest.mark.parametrize("name", ["metrics.jsonl", "tb"])
def test_an_unwritable_metrics_file_or_tb_folder_fails_before_training(
    tmp_path, toy, monkeypatch, name
):
    """The workdir may be writable while the metrics.jsonl or tb/ left in it are not: that
    is named before the first step (it was a traceback after the restore)."""
    _fit(toy, tmp_path, num_steps=4)
    snapshot_before = snapshot(tmp_path / "checkpoints")
    access = os.access  # root ignores chmod: deny this one path as the OS would
    monkeypatch.setattr(
        os, "access", lambda path, mode: path != tmp_path / name and access(path, mode)
    )
    with pytest.raises(NotWritableError, match=f"cannot write to {tmp_path / name}: "):
        _fit(toy, tmp_path, num_steps=8)
    assert snapshot(tmp_path / "checkpoints") == snapshot_before
    monkeypatch.undo()
    assert _fit(toy, tmp_path, num_steps=8).step == 8


@pytest.mark.parametrize(
    "name, what", [("metrics.jsonl", "a folder, not a file"), ("tb", "a file, not a folder")]
)
def test_a_metrics_file_that_is_a_folder_or_a_tb_folder_that_is_a_file_is_named(
    tmp_path, toy, name, what
):
    """A folder named metrics.jsonl failed as an IsADirectoryError after the restore, a file
    named tb as "Permission denied" (or, executable, as a NotADirectoryError)."""
    _fit(toy, tmp_path, num_steps=4)
    path = tmp_path / name
    if name == "tb":
        shutil.rmtree(path)
        path.write_text("")
        path.chmod(0o755)  # (executable: os.access passed it, tensorboardX failed in it)
    else:
        path.unlink()
        path.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(NotWritableError, match=f"cannot write to {path}: it is {what}"):
        _fit(toy, tmp_path, num_steps=8)
    assert snapshot(tmp_path) == before


def test_a_finished_run_needs_no_write_access(tmp_path, toy, monkeypatch):
    _fit(toy, tmp_path, num_steps=4)

    def unwritable(directory):
        raise NotWritableError(f"cannot write to {directory}: read-only (simulated)")

    # Root ignores chmod, so fail every write probe instead, as a read-only mount would.
    monkeypatch.setattr(loop_module, "check_writable", unwritable)
    monkeypatch.setattr(checkpoint_module, "check_writable", unwritable)
    assert _fit(toy, tmp_path, num_steps=4).step == 4  # reads its checkpoint, writes nothing
    with pytest.raises(NotWritableError, match="read-only"):
        _fit(toy, tmp_path, num_steps=8)  # more to train: fails before the first step


class _NanAt(grain.transforms.RandomMap):
    def __init__(self, toy_data):
        self.toy_data = toy_data

    def random_map(self, element, rng):
        batch = self.toy_data.random_map(element, rng)
        if element == 7:  # The 8th batch, read by step 8.
            batch["x"][0, 0] = np.nan
        return batch


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path, toy):
    poisoned = grain.MapDataset.range(sys.maxsize).random_map(_NanAt(toy.Regression()), seed=0)
    with pytest.raises(NonFiniteLossError, match=r"train_loss is nan at step 8.*step 5 in"):
        _fit(
            toy,
            tmp_path,
            num_steps=20,
            dataset=poisoned,
            checkpoint_every=5,
            log_every=10,
            eval_every=0,
        )
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [5]
        restored, _ = ckpt.restore(toy.state())
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_val_loss_stops_and_keeps_the_best_checkpoint(tmp_path, toy, bad):
    """A NaN (or inf) val_loss must not be saved as a metric: it is neither better nor worse
    than the best, and the best checkpoint could be deleted for it."""
    evaluate, calls = make_eval_step(toy.loss), []

    def bad_from_the_third_evaluation(params, batch):  # steps 0 and 5 fine, bad at step 10
        metrics = evaluate(params, batch)
        calls.append(None)
        if len(calls) > 4:  # (2 batches per evaluation)
            metrics["val_loss"] = metrics["val_loss"]._replace(total=jnp.float32(bad))
        return metrics

    with pytest.raises(NonFiniteLossError, match=rf"val_loss is {bad} at step 10.*step 8 in"):
        _fit(toy, tmp_path, num_steps=20, eval_step=bad_from_the_third_evaluation, max_to_keep=1)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [5, 8]  # the latest, and the best by val_loss
        assert ckpt.best_step() == 5
    # The window's train metrics, finite, are kept with it (they were dropped), and the
    # val_loss is written as JSON's null.
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert last["step"] == 10 and math.isfinite(last["train_loss"]) and last["val_loss"] is None


@pytest.mark.parametrize("best, at_step_8", [(1.0, 2.0), (1.0, 1.0), (0.0, 1.0)])
def test_resume_remembers_the_best_val_loss(tmp_path, toy, best, at_step_8):
    """After a resume, a val_loss worse than the best one before it, or equal to it, is no
    improvement: no extra keep-best save, and the metadata keeps the old best (also a best
    of 0.0, which was read back as no best at all)."""
    evaluate, scripted = make_eval_step(toy.loss), iter([3.0, best, at_step_8, 2.5])

    def eval_step(params, batch):  # val_loss at steps 0, 4 | resumed: 8, 12
        metrics = evaluate(params, batch)
        value = jnp.float32(next(scripted)) * metrics["val_loss"].count
        return metrics | {"val_loss": metrics["val_loss"]._replace(total=value)}

    for num_steps in (4, 12):
        _fit(
            toy, tmp_path, num_steps=num_steps, eval_step=eval_step, eval_every=4,
            eval_batches=1, checkpoint_every=0, max_to_keep=10,
        )  # fmt: skip
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 12]  # not 8: no better than step 4's
        assert ckpt.best_step() == 4
        assert ckpt.read_metadata()["best_val_loss"] == best


@pytest.mark.parametrize("keep_best, max_to_keep, deleted", [(False, 1, [4]), (True, 1, [])])
def test_a_resume_names_the_saved_steps_its_settings_no_longer_keep(
    tmp_path, toy, capsys, keep_best, max_to_keep, deleted
):
    """Resumed with keep_best=False, the earlier run's best step (4 here, better than the
    latest, 8) was deleted at the first save without a word."""
    evaluate, scripted = make_eval_step(toy.loss), iter([3.0, 1.0, 2.0, 2.5])

    def eval_step(params, batch):  # val_loss at steps 0, 4, 8 | resumed: 12
        metrics = evaluate(params, batch)
        value = jnp.float32(next(scripted)) * metrics["val_loss"].count
        return metrics | {"val_loss": metrics["val_loss"]._replace(total=value)}

    kw = dict(eval_step=eval_step, eval_every=4, eval_batches=1, checkpoint_every=4)
    _fit(toy, tmp_path, num_steps=8, max_to_keep=1, **kw)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [4, 8]
    capsys.readouterr()
    _fit(toy, tmp_path, num_steps=12, max_to_keep=max_to_keep, keep_best=keep_best, **kw)
    out = capsys.readouterr().out
    if deleted:
        note = "note: this run's settings (max_to_keep=1 and keep_best=False) no longer keep "
        assert note + f"{checkpoints / '4'}: its first save deletes them" in out
    else:
        assert "no longer keep" not in out
    left = sorted(int(p.name) for p in checkpoints.iterdir())
    assert left == [s for s in [4, 12] if s not in deleted]  # (the note says what happened)


def test_nan_guard_checks_the_gradient_norm(tmp_path, toy):
    """A finite loss with a NaN gradient (d sqrt(x)/dx at 0) stops at that step."""

    def loss(params, batch, rng):
        value, aux = toy.loss(params, batch, rng)
        return value + 0.0 * jnp.sqrt(jnp.sum(params["w"] ** 2)), aux  # w starts at 0

    optimizer = toy.optimizer()
    with pytest.raises(NonFiniteLossError, match=r"grad_norm is nan at step 1\b"):
        fit(
            create_train_state(toy.params(), optimizer, jax.random.key(7)),
            make_train_step(loss, optimizer),
            data.batch_iterator(toy.dataset(0)),
            workdir=tmp_path,
            loop=LoopConfig(num_steps=4, log_every=1, checkpoint_every=1, progress=False),
        )
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == []


def test_loop_config_needs_a_checkpoint_to_keep():
    with pytest.raises(ValueError, match="max_to_keep must be >= 1, got 0"):
        LoopConfig(num_steps=1, max_to_keep=0)


@pytest.mark.parametrize("part", ["params", "opt_state"])
def test_nan_guard_never_saves_a_non_finite_state(tmp_path, toy, part):
    """An update can make the state non-finite while the loss and gradients it was computed
    from were finite (they come from the state before it): that state is not saved, nor
    one whose optimizer state alone is not finite (an Adam moment overflowing). The train
    metrics of the window it ends are logged all the same."""
    optimizer = toy.optimizer()
    step = make_train_step(toy.loss, optimizer)

    def poisoning_step(state, batch):
        state, metrics = step(state, batch)
        poison = jnp.where(state.step == 10, jnp.nan, 0.0)  # only the update to step 10
        poisoned = jax.tree.map(
            lambda x: x + poison if jnp.issubdtype(x.dtype, jnp.inexact) else x,
            getattr(state, part),
        )
        return state._replace(**{part: poisoned}), metrics

    with pytest.raises(NonFiniteLossError, match=r"after step 10 are not finite.*step 5 in"):
        fit(
            create_train_state(toy.params(), optimizer, jax.random.key(7)),
            poisoning_step,
            data.batch_iterator(toy.dataset(0)),
            workdir=tmp_path,
            loop=LoopConfig(num_steps=20, checkpoint_every=5, log_every=5, progress=False),
        )
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [5]
    # The window of steps 6-10 trained on finite losses: it is logged (it was not).
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 10]


_SIGTERM_CHILD = """
import sys
sys.path.insert(0, {tests_dir!r})
import jax
from conftest import toy_dataset, toy_loss, toy_params, toy_optimizer
from jaxattn.training import data
from jaxattn.training.loop import LoopConfig, fit, make_train_step
from jaxattn.training.state import create_train_state

optimizer = toy_optimizer()
result = fit(
    create_train_state(toy_params(), optimizer, jax.random.key(0)),
    make_train_step(toy_loss, optimizer),
    data.batch_iterator(toy_dataset(0)),
    workdir={workdir!r},
    loop=LoopConfig(num_steps=10**9, log_every=50, progress=False),
)
print(f"returned step={{result.step}} interrupted={{result.interrupted}}", flush=True)
"""


def _start_training_child(tmp_path) -> tuple[subprocess.Popen, Path]:
    """``(process, workdir)``: ``_SIGTERM_CHILD`` training in ``tmp_path / "run"``, once it
    has logged its first step."""
    script = tmp_path / "child.py"
    workdir = tmp_path / "run"
    script.write_text(
        _SIGTERM_CHILD.format(tests_dir=str(Path(__file__).parent), workdir=str(workdir))
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cpu_env(),
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the child never logged a step"
        time.sleep(0.1)
    return proc, workdir


def test_sigterm_saves_at_the_current_step_and_exits_cleanly(tmp_path, toy):
    proc, workdir = _start_training_child(tmp_path)
    metrics = workdir / "metrics.jsonl"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = re.search(r"SIGTERM: saved a checkpoint at step (\d+)", out)
    assert saved, out
    step = int(saved.group(1))
    assert f"returned step={step} interrupted=True" in out
    assert step >= json.loads(metrics.read_text().splitlines()[0])["step"]
    with Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.latest_step() == step
        restored, _ = ckpt.restore(toy.state(), data_iter=toy.iterator())
    assert int(restored.step) == step


def test_a_second_run_in_a_workdir_being_trained_in_is_refused(tmp_path, toy):
    """Two runs in one workdir: each one's keep-N deleted the other's steps, and one then
    failed as "checkpoint step N already exists" (or in orbax's thread), their metrics
    interleaved. The second fit trained and saved here (as if the workdir were its own)."""
    proc, workdir = _start_training_child(tmp_path)
    try:
        before = {p.name for p in workdir.iterdir()}
        with pytest.raises(NotWritableError, match="another process is training in") as e:
            fit(
                toy.state(),
                make_train_step(toy.loss, toy.optimizer()),
                toy.iterator(),
                workdir=workdir,
                loop=LoopConfig(num_steps=3, checkpoint_every=1, progress=False),
            )
        assert isinstance(e.value, checkpoint_module.FolderInUseError)
        assert str(workdir) in str(e.value)
        assert {p.name for p in workdir.iterdir()} == before  # (no checkpoints/ yet)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    step = int(re.search(r"SIGTERM: saved a checkpoint at step (\d+)", out).group(1))
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [step]
    # Once the first run has ended, the workdir is free: it resumes there.
    result = fit(
        toy.state(),
        make_train_step(toy.loss, toy.optimizer()),
        toy.iterator(),
        workdir=workdir,
        loop=LoopConfig(num_steps=step + 2, progress=False),
    )
    assert result.step == step + 2 and result.trained_steps == 2


@pytest.fixture
def signal_handlers():
    """The SIGINT and SIGTERM handlers as they were, put back after the test, which runs
    only in the main thread (where fit handles signals)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("fit handles signals in the main thread only")
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield old
    for sig, handler in old.items():
        signal.signal(sig, handler)


def test_a_ctrl_c_after_a_sigterm_still_waits_for_the_save(signal_handlers):
    """The first signal gave SIGINT its old handler back, so a Ctrl-C right after a
    SIGTERM raised KeyboardInterrupt before the checkpoint; a second Ctrl-C still kills."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with loop_module._StopOnSignal() as stop:
        stop._handle(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop._handle(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_an_ignored_sigint_stays_ignored_while_training(signal_handlers):
    """A script's background job starts with SIGINT ignored (Ctrl-C is for the foreground
    job): fit keeps it so, and still saves on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with loop_module._StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop._handle(signal.SIGTERM, None)  # as a SIGTERM would
        assert stop.signal_name == "SIGTERM"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) == signal_handlers[signal.SIGTERM]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with loop_module._StopOnSignal() as stop:  # otherwise both are caught
        assert signal.getsignal(signal.SIGINT) == stop._handle
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_ctrl_c_on_one_of_several_processes_is_a_preemption_notice(signal_handlers):
    """With several processes SIGTERM stays with JAX's preemption service, and a SIGINT is
    passed on to it as a SIGTERM, so that every process stops at the same step and saves:
    a KeyboardInterrupt on one left the others waiting in a collective for minutes."""
    notices = []  # stands in for the preemption service's own SIGTERM handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: notices.append(signum))
    service = signal.getsignal(signal.SIGTERM)
    stop = loop_module._StopOnSignal()
    stop.multihost = True  # as after jax.distributed.initialize with 2+ processes
    with stop:
        assert signal.getsignal(signal.SIGTERM) is service
        assert signal.getsignal(signal.SIGINT) == stop._handle
        signal.raise_signal(signal.SIGINT)  # Ctrl-C
        assert notices == [signal.SIGTERM]
        assert stop.signal_name is None  # the agreed step stops it, in poll
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler  # 2nd kills
    assert signal.getsignal(signal.SIGTERM) is service
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


def test_loop_config_validates_and_reads_a_config():
    ml_collections = pytest.importorskip("ml_collections")
    with pytest.raises(ValueError, match="num_steps must be an integer >= 0"):
        LoopConfig(num_steps=-1)
    config = ml_collections.ConfigDict({"num_steps": 7, "eval_every": 3, "learning_rate": 0.1})
    loop = LoopConfig.from_config(config, progress=False)
    assert (loop.num_steps, loop.eval_every, loop.progress, loop.log_every) == (7, 3, False, 10)


def test_fit_accepts_a_plain_iterator_without_evaluation(tmp_path, toy):
    it = toy.iterator()
    plain = (next(it) for _ in range(100))  # No get_state: the data position is not saved.
    optimizer = toy.optimizer()
    result = fit(
        create_train_state(toy.params(), optimizer, jax.random.key(0)),
        make_train_step(toy.loss, optimizer),
        plain,
        workdir=tmp_path,
        loop=LoopConfig(num_steps=3, progress=False),
    )
    assert result.step == 3 and result.last_eval == {}
    assert not (tmp_path / "checkpoints" / "3" / "data").exists()
    assert all("val_loss" not in r for r in read_metrics(tmp_path / "metrics.jsonl"))


def test_all_finite_reads_float_leaves_only():
    from jaxattn.training.loop import _all_finite

    assert bool(_all_finite({"count": jnp.int32(3), "key": jax.random.key(0)}))  # no floats
    assert bool(_all_finite({"w": jnp.ones(3, jnp.bfloat16), "count": jnp.int32(3)}))
    assert not bool(_all_finite({"w": jnp.array([1.0, jnp.inf]), "count": jnp.int32(3)}))
    assert not _all_finite({"w": jnp.array([1.0, jnp.nan], jnp.bfloat16)})
    # The jitted path (accelerators, multi-process arrays) gives the same answers.
    from jaxattn.training.loop import _all_finite_on_device

    assert bool(_all_finite_on_device([jnp.ones(3, jnp.bfloat16)]))
    assert bool(_all_finite_on_device([]))
    assert not bool(_all_finite_on_device([jnp.ones(2), jnp.array([1.0, -jnp.inf])]))


def test_microbatches_get_their_own_keys_and_rows(toy):
    """Microbatch i of step s draws from fold_in(fold_in(rng, s), i) and holds rows i, i + k,
    ...; its aux metrics are averaged over the k microbatches like the loss."""
    k = 3

    def loss(params, batch, rng):
        noise = jax.random.normal(rng, ())
        return jnp.sum(params["w"]) * 0.0 + noise, {"row0": batch["x"][0, 0]}

    step = make_train_step(loss, toy.optimizer(), grad_accum_steps=k)
    batch = next(toy.iterator())  # B = 6 rows: microbatch i holds rows i and i + 3
    _, metrics = step(toy.state(seed=0), batch)
    step_key = jax.random.fold_in(jax.random.key(0), 0)
    noises = [float(jax.random.normal(jax.random.fold_in(step_key, i), ())) for i in range(k)]
    assert len(set(noises)) == k
    assert float(metrics["train_loss"].total) == pytest.approx(sum(noises), rel=1e-5, abs=1e-6)
    reduced = reduce_means([metrics])
    assert reduced["train_loss"] == pytest.approx(np.mean(noises), rel=1e-5, abs=1e-6)
    assert reduced["train_row0"] == pytest.approx(float(np.mean(batch["x"][:k, 0])), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_grad_norm_is_the_norm_of_the_mean_gradient_before_clipping(toy, k):
    def loss(params, batch, rng):
        return toy.loss(params, batch, None)

    step = make_train_step(loss, toy.optimizer(), grad_accum_steps=k)  # clips at norm 1
    batch = next(toy.iterator())
    _, metrics = step(toy.state(), batch)
    # float64 gradient of mean((x w + b - y)^2) at w = 0, b = 0.
    x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
    dpred = 2.0 * (0.0 - y) / len(x)  # [B, 1]
    want = math.sqrt(np.sum((x.T @ dpred) ** 2) + np.sum(dpred) ** 2)
    assert want > 1.0  # so that a norm taken after clipping would show
    assert float(metrics["grad_norm"].total) == pytest.approx(want, rel=1e-5)


def test_fit_logs_window_means_tokens_per_s_and_evaluates_fresh_batches(tmp_path, toy, monkeypatch):
    """Logged train metrics average every step of the window; val metrics average
    eval_batches batches from a fresh eval iterator; tokens/s leaves out the first (compiling)
    step; a finished run reports its last evaluation again."""
    clock = [0.0]
    monkeypatch.setattr(loop_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    optimizer = toy.optimizer()
    step = make_train_step(toy.loss, optimizer)

    def timed_step(state, batch):  # every step takes 0.25 s on the fake clock
        clock[0] += 0.25
        return step(state, batch)

    def run():
        return fit(
            create_train_state(toy.params(), optimizer, jax.random.key(7)),
            timed_step,
            data.batch_iterator(toy.dataset(0)),
            workdir=tmp_path,
            loop=LoopConfig(num_steps=6, eval_every=3, eval_batches=2, log_every=3, progress=False),
            eval_step=make_eval_step(toy.loss),
            eval_data=lambda: data.batch_iterator(toy.dataset(1)),
        )

    result = run()
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(records) == [0, 3, 6]
    assert set(records[3]) == {
        "step", "time", "train_loss", "train_mae", "grad_norm", "tokens_per_s",
        "step_time_ms", "val_loss", "val_mae",
    }  # fmt: skip

    # The same run by hand: per-step losses, and the params at each evaluation.
    state, it = create_train_state(toy.params(), optimizer, jax.random.key(7)), toy.iterator()
    losses, params_at = [], {0: jax.device_get(state.params)}
    for s in range(1, 7):
        state, metrics = step(state, next(it))
        losses.append(float(metrics["train_loss"].total))
        params_at[s] = jax.device_get(state.params)

    def val_loss(params):
        batches = toy.iterator(1)
        return np.mean([float(toy.loss(params, next(batches), None)[0]) for _ in range(2)])

    for s in (0, 3, 6):
        assert records[s]["val_loss"] == pytest.approx(val_loss(params_at[s]), rel=1e-5)
    for s in (3, 6):
        assert records[s]["train_loss"] == pytest.approx(np.mean(losses[s - 3 : s]), rel=1e-5)
    # Step 1 compiles: the window to step 3 times 2 steps, the next one 3, 0.25 s each.
    tokens = toy.B * toy.D  # the first batch leaf, "x": [B, D]
    for s in (3, 6):
        assert records[s]["tokens_per_s"] == pytest.approx(tokens / 0.25)
        assert records[s]["step_time_ms"] == pytest.approx(250.0)
    assert records[0]["tokens_per_s"] is None

    rerun = run()  # finished: restores the last evaluation from its checkpoint
    assert rerun.step == 6
    assert rerun.last_eval == pytest.approx(result.last_eval)
    assert rerun.last_eval["val_loss"] == pytest.approx(records[6]["val_loss"])


@pytest.mark.parametrize("tokens_per_step", [None, "rows"])
def test_tokens_per_s_counts_every_batch_as_it_comes(tmp_path, toy, monkeypatch, tokens_per_step):
    """Bucketed batches change shape from step to step (translate.py's do): tokens/s sums
    each timed step's batch, not the first batch's size times the steps. A function of the
    batch may count instead (here its rows)."""
    clock = [0.0]
    monkeypatch.setattr(loop_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    step = make_train_step(toy.loss, toy.optimizer())

    def timed_step(state, batch):  # every step takes 0.25 s on the fake clock
        clock[0] += 0.25
        return step(state, batch)

    rows = [2, 8, 2, 8, 2, 8]
    batches = iter(
        {"x": np.ones((r, toy.D), np.float32), "y": np.ones((r, 1), np.float32)} for r in rows
    )
    count = None if tokens_per_step is None else (lambda batch: batch["x"].shape[0])
    per_row = toy.D if tokens_per_step is None else 1
    fit(
        toy.state(),
        timed_step,
        batches,
        workdir=tmp_path,
        loop=LoopConfig(num_steps=6, log_every=3, progress=False),
        tokens_per_step=count,
    )
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    # Each log window's steps (step 1 compiles and is left out): steps 2-3, then 4-6.
    assert records[3]["tokens_per_s"] == pytest.approx(sum(rows[1:3]) * per_row / 0.5)
    assert records[6]["tokens_per_s"] == pytest.approx(sum(rows[3:6]) * per_row / 0.75)


def test_step_s_draws_from_the_base_key_folded_with_s(toy):
    """The state's key never changes: step s uses fold_in(rng, s), not a chain of keys."""

    def loss(params, batch, rng):
        return jnp.sum(params["w"]) * 0.0 + jax.random.normal(rng, ()), {}

    step = make_train_step(loss, toy.optimizer())
    state, it = toy.state(seed=0), toy.iterator()
    for s in range(3):
        state, metrics = step(state, next(it))
        want = float(jax.random.normal(jax.random.fold_in(jax.random.key(0), s), ()))
        assert float(metrics["train_loss"].total) == pytest.approx(want, rel=1e-6)
    leaves_equal(state.rng, jax.random.key(0))


def test_eval_step_names_its_metrics_with_the_prefix(toy):
    metrics = make_eval_step(toy.loss, prefix="test")(toy.params(), next(toy.iterator()))
    assert set(metrics) == {"test_loss", "test_mae"}


def test_fit_evaluates_at_the_end_off_the_eval_grid(tmp_path, toy):
    """num_steps not a multiple of eval_every: the last step is evaluated all the same."""
    result = _fit(toy, tmp_path, num_steps=5, eval_every=3, checkpoint_every=0)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 5]
    assert result.last_eval["val_loss"] == records[-1]["val_loss"]
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.read_metadata()["eval"]["val_loss"] == pytest.approx(records[-1]["val_loss"])


def test_keep_best_false_saves_only_on_schedule(tmp_path, toy):
    _fit(toy, tmp_path, num_steps=6, eval_every=2, checkpoint_every=3, keep_best=False)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3, 6]  # not 2 and 4, where val loss improved


def test_zero_eval_batches_disables_evaluation(tmp_path, toy):
    result = _fit(toy, tmp_path, num_steps=3, eval_batches=0)
    assert result.last_eval == {}
    assert all("val_loss" not in r for r in read_metrics(tmp_path / "metrics.jsonl"))


def test_finished_run_writes_nothing(tmp_path, toy):
    """Not only the checkpoints: no metrics line and no TensorBoard file either."""
    _fit(toy, tmp_path, num_steps=4)
    before = snapshot(tmp_path)
    assert _fit(toy, tmp_path, num_steps=4).step == 4
    assert snapshot(tmp_path) == before


def test_a_run_of_no_steps_saves_its_start(tmp_path, toy):
    """num_steps=0 evaluates the initial state and saves it (something to sample from);
    a rerun then finds the run finished and writes nothing more."""
    result = _fit(toy, tmp_path, num_steps=0)
    assert result.step == 0 and not result.interrupted and "val_loss" in result.last_eval
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [0]
        _, meta = ckpt.restore(result.state)
    assert meta["eval"] == pytest.approx(result.last_eval)
    again = _fit(toy, tmp_path, num_steps=0)
    assert again.last_eval == pytest.approx(result.last_eval)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]


def test_the_final_save_is_finished_while_a_signal_still_only_sets_a_flag(
    tmp_path, toy, monkeypatch
):
    """The last (async) checkpoint is waited for before the signal handlers go back: a
    SIGTERM after that would kill the process during the write and lose it."""
    events = []
    wait, restore = Checkpointer.wait, loop_module._StopOnSignal.__exit__
    monkeypatch.setattr(Checkpointer, "wait", lambda self: events.append("wait") or wait(self))
    monkeypatch.setattr(
        loop_module._StopOnSignal,
        "__exit__",
        lambda self, *exc: events.append("handlers back") or restore(self, *exc),
    )
    _fit(toy, tmp_path, num_steps=4, eval_batches=0, checkpoint_every=0)
    assert "wait" in events[: events.index("handlers back")]


def _fit_signalled_at(toy, workdir, signal_step: int, loop: LoopConfig):
    """``fit`` whose train step sends this process SIGTERM once it reaches ``signal_step``
    (evaluating on the toy's validation data when ``loop.eval_batches`` asks)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("fit handles signals in the main thread only")
    optimizer = toy.optimizer()
    # A logged rate that ramps, so that a window's last rate differs from its mean.
    ramp = lambda count: 1e-3 * (jnp.asarray(count).astype(jnp.float32) + 1.0)
    step = make_train_step(toy.loss, optimizer, learning_rate_fn=ramp)

    def signalling_step(state, batch):
        state, metrics = step(state, batch)
        if int(state.step) == signal_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics

    return fit(
        create_train_state(toy.params(), optimizer, jax.random.key(7)),
        signalling_step,
        data.batch_iterator(toy.dataset(0)),
        workdir=workdir,
        loop=loop,
        eval_step=make_eval_step(toy.loss),
        eval_data=lambda: data.batch_iterator(toy.dataset(1)),
    )


def test_a_signal_at_an_evaluated_step_that_does_not_save_keeps_its_evaluation(tmp_path, toy):
    """SIGTERM at step 6, evaluated but not saved (no checkpoint cadence, no keep-best):
    the signal's checkpoint holds that evaluation, as any evaluated step's save does, so a
    rerun of the finished run reports it (it was saved without one, and reported {})."""
    loop = LoopConfig(num_steps=20, eval_every=3, eval_batches=1, keep_best=False, progress=False)
    result = _fit_signalled_at(toy, tmp_path, 6, loop)
    assert result.interrupted and result.step == 6 and "val_loss" in result.last_eval
    rerun = _fit_signalled_at(toy, tmp_path, 99, dataclasses.replace(loop, num_steps=6))
    assert rerun.trained_steps == 0 and rerun.last_eval == result.last_eval


def test_a_signal_at_a_checkpoint_step_saves_once_and_returns(tmp_path, toy):
    """SIGTERM during a step that checkpoints: the step's checkpoint is the signal's one
    (saving the same step again would raise), and fit returns interrupted."""
    loop = LoopConfig(num_steps=20, checkpoint_every=4, log_every=4, progress=False)
    result = _fit_signalled_at(toy, tmp_path, 4, loop)
    assert result.interrupted and result.step == 4 and result.trained_steps == 4
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4]


def test_a_log_window_cut_by_a_signal_is_logged_by_the_resumed_run_as_uninterrupted(tmp_path, toy):
    """SIGTERM at step 6 of windows of 4: the run wrote steps 5-6 as a record of their own
    and the resumed one steps 7-8 as step 8's, so metrics.jsonl differed from an
    uninterrupted run's. The window's sums now go with the checkpoint: step 8's record
    covers steps 5-8, equal to the uninterrupted run's bit for bit, and is timed."""
    loop = LoopConfig(num_steps=12, log_every=4, progress=False)
    straight = _fit_signalled_at(toy, tmp_path / "straight", 99, loop)
    assert not straight.interrupted
    result = _fit_signalled_at(toy, tmp_path / "resumed", 6, loop)
    assert result.interrupted and result.step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == [4]
    resumed = _fit_signalled_at(toy, tmp_path / "resumed", 99, loop)
    assert resumed.step == 12 and resumed.trained_steps == 6

    def records(run):
        return {r["step"]: r for r in read_metrics(tmp_path / run / "metrics.jsonl")}

    want, got = records("straight"), records("resumed")
    assert sorted(got) == sorted(want) == [4, 8, 12]
    timing = {"tokens_per_s", "step_time_ms", "time"}  # (time: when it was written)
    for step in want:
        assert {"train_loss", "grad_norm"} <= set(want[step])
        for name in set(want[step]) - timing:
            assert got[step][name] == want[step][name], (step, name)
    assert got[8]["tokens_per_s"] > 0 and got[8]["step_time_ms"] > 0


def test_a_log_window_cut_by_a_signal_is_logged_once_by_a_resumed_run_with_nothing_to_train(
    tmp_path, toy
):
    """SIGTERM at step 6 of windows of 4, then reruns with num_steps=6 (or below): the run
    had nothing to train and returned without logging the saved window, so steps 5-6 were
    missing from metrics.jsonl. The rerun writes it as step 6's record, equal to that of an
    uninterrupted run of 6 steps; a second rerun does not write it again, nor does a later
    run that trains on (its first record covers its own steps only)."""
    loop = LoopConfig(num_steps=12, log_every=4, progress=False)
    straight = _fit_signalled_at(
        toy, tmp_path / "straight", 99, dataclasses.replace(loop, num_steps=6)
    )
    assert not straight.interrupted
    _fit_signalled_at(toy, tmp_path / "straight", 99, dataclasses.replace(loop, num_steps=12))
    result = _fit_signalled_at(toy, tmp_path / "resumed", 6, loop)
    assert result.interrupted and result.step == 6

    def records(run):
        return [r for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert [r["step"] for r in records("resumed")] == [4]
    for num_steps in (5, 6):  # below the stopped step, then at it
        rerun = _fit_signalled_at(
            toy, tmp_path / "resumed", 99, dataclasses.replace(loop, num_steps=num_steps)
        )
        assert rerun.trained_steps == 0
        assert [r["step"] for r in records("resumed")] == [4, 6]
    resumed = _fit_signalled_at(toy, tmp_path / "resumed", 99, loop)
    assert resumed.step == 12 and resumed.trained_steps == 6
    want, got = records("straight"), records("resumed")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 6, 8, 12]
    timing = {"tokens_per_s", "step_time_ms", "time"}  # (time: when it was written)
    for w, g in zip(want, got, strict=True):
        assert {"train_loss", "grad_norm", "learning_rate"} <= set(w)
        for name in set(w) - timing:
            assert g[name] == w[name], (w["step"], name)


def test_a_cut_off_line_in_metrics_is_not_warned_of_by_the_saved_window_check(tmp_path, toy):
    """Each rerun of a run with a saved log window reads metrics.jsonl for the window's
    record; a line cut off by a kill (kept in the file, which is appended to) was warned
    of by that read on every rerun, a warning from inside fit about a read the user did
    not ask for. The window is still found (and not written twice)."""
    loop = LoopConfig(num_steps=12, log_every=4, progress=False)
    assert _fit_signalled_at(toy, tmp_path, 6, loop).interrupted
    path = tmp_path / "metrics.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "train_lo')  # a record cut off mid-write
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rerun = _fit_signalled_at(toy, tmp_path, 99, dataclasses.replace(loop, num_steps=6))
        assert rerun.trained_steps == 0
    with pytest.warns(UserWarning, match="line 2 is not a JSON record"):
        assert [r["step"] for r in read_metrics(path)] == [4, 6]


def test_a_finished_run_with_a_saved_log_window_and_a_metrics_folder_notes_it(
    tmp_path, toy, capsys
):
    """A rerun with nothing to train returns without checking metrics.jsonl (a finished
    run may sit in any folder), but reading it for the saved window's record failed as
    IsADirectoryError on a folder of that name; it is now the note of a window not logged."""
    loop = LoopConfig(num_steps=12, log_every=4, progress=False)
    assert _fit_signalled_at(toy, tmp_path, 6, loop).interrupted
    path = tmp_path / "metrics.jsonl"
    path.unlink()
    path.mkdir()
    capsys.readouterr()
    rerun = _fit_signalled_at(toy, tmp_path, 99, dataclasses.replace(loop, num_steps=6))
    assert rerun.trained_steps == 0 and rerun.step == 6
    out = capsys.readouterr().out
    assert f"the log window saved at step 6 is not logged: cannot write to {path}: it is a " in out


def test_a_signal_in_the_last_step_does_not_report_an_interrupted_run(tmp_path, toy):
    """SIGTERM during the last step, seen after it (as one during the final save): every
    step ran, so the run is complete."""
    result = _fit_signalled_at(toy, tmp_path, 3, LoopConfig(num_steps=3, progress=False))
    assert result.step == 3 and not result.interrupted
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]


def test_loop_config_refuses_bools_as_counts_and_strings_as_flags():
    with pytest.raises(ValueError, match=r"LoopConfig.num_steps must be an integer >= 0, got True"):
        LoopConfig(num_steps=True)
    with pytest.raises(ValueError, match=r"LoopConfig.eval_every must be an integer >= 0, got 2.0"):
        LoopConfig(num_steps=4, eval_every=2.0)
    with pytest.raises(
        ValueError, match=r"LoopConfig.keep_best must be True or False, got 'false'"
    ):
        LoopConfig(num_steps=4, keep_best="false")
    with pytest.raises(ValueError, match=r"LoopConfig.progress must be True or False, got 0"):
        LoopConfig(num_steps=4, progress=0)
    loop = LoopConfig(num_steps=np.int64(4), keep_best=np.bool_(False))
    assert type(loop.num_steps) is int and loop.num_steps == 4 and not loop.keep_best


def test_short_evaluation_data_is_named(tmp_path, toy):
    one_batch = lambda: iter([next(data.batch_iterator(toy.dataset(1)))])
    with pytest.raises(RuntimeError, match=r"eval_data ran out after 1 of loop.eval_batches=3 "):
        _fit(toy, tmp_path, num_steps=2, eval_data=one_batch, eval_batches=3)


def test_training_data_that_runs_out_names_the_step_and_the_last_checkpoint(tmp_path, toy):
    """A finite dataset shorter than num_steps: the error said only the step, not that the
    steps since the last checkpoint were lost, nor which checkpoint a rerun resumes from."""
    five = grain.MapDataset.range(5).random_map(toy.Regression(), seed=0)
    message = r"train_iter ran out at step 5 of num_steps=8: .*last checkpoint is step 3 in "
    with pytest.raises(RuntimeError, match=message):
        _fit(toy, tmp_path, num_steps=8, dataset=five, checkpoint_every=3, eval_batches=0)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [3]


def test_an_eval_step_without_eval_data_or_the_reverse_is_named(tmp_path, toy):
    """Either alone evaluated nothing, and keep_best never saved, without a word."""
    optimizer = toy.optimizer()
    for given, missing, kwargs in [
        ("eval_step", "eval_data", {"eval_step": make_eval_step(toy.loss)}),
        ("eval_data", "eval_step", {"eval_data": lambda: toy.iterator(1)}),
    ]:
        with pytest.raises(ValueError, match=rf"eval_batches=2 with {given} but no {missing}"):
            fit(
                create_train_state(toy.params(), optimizer, jax.random.key(7)),
                make_train_step(toy.loss, optimizer),
                toy.iterator(),
                workdir=tmp_path,
                loop=LoopConfig(num_steps=2, eval_batches=2, progress=False),
                **kwargs,
            )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing trained or made


def test_train_iter_and_eval_data_of_the_wrong_kind_are_named(tmp_path, toy):
    # Their errors were "'list' object is not an iterator" and "... is not callable".
    optimizer = toy.optimizer()
    batches = list(itertools.islice(toy.iterator(), 4))
    run = lambda train_iter, **kwargs: fit(
        create_train_state(toy.params(), optimizer, jax.random.key(7)),
        make_train_step(toy.loss, optimizer),
        train_iter,
        workdir=tmp_path / "run",
        loop=LoopConfig(num_steps=2, eval_batches=1, progress=False),
        eval_step=make_eval_step(toy.loss),
        **kwargs,
    )
    with pytest.raises(TypeError, match=r"fit: train_iter must be an iterator .*got a list"):
        run(batches, eval_data=lambda: iter(batches))
    with pytest.raises(TypeError, match=r"fit: eval_data must be a function .*got a list_iter"):
        run(iter(batches), eval_data=iter(batches))
    assert not (tmp_path / "run").exists()
    result = run(iter(batches), eval_data=lambda: batches)  # a list of batches evaluates
    assert "val_loss" in result.last_eval


def test_an_eval_step_without_val_loss_is_named(tmp_path, toy):
    eval_step = make_eval_step(toy.loss, prefix="test")
    with pytest.raises(ValueError, match=r"eval_step must return a 'val_loss'.*\['test_loss'"):
        _fit(toy, tmp_path, num_steps=2, eval_step=eval_step, eval_batches=1)


def test_a_run_resumed_in_the_same_process_reuses_the_compiled_steps(tmp_path, toy, count_traces):
    """A notebook trains, then runs fit again on a fresh state to resume: the restored state
    came back committed to its device, the fresh one had not been, and jit keys its cache on
    that, so both steps compiled a second time."""
    optimizer = toy.optimizer()
    train_step, eval_step = make_train_step(toy.loss, optimizer), make_eval_step(toy.loss)

    def run(num_steps):
        return fit(
            create_train_state(toy.params(), optimizer, jax.random.key(7)),
            train_step,
            data.batch_iterator(toy.dataset(0)),
            workdir=tmp_path,
            loop=LoopConfig(num_steps=num_steps, eval_every=2, log_every=2, progress=False),
            eval_step=eval_step,
            eval_data=lambda: data.batch_iterator(toy.dataset(1)),
        )

    run(4)
    with count_traces() as traced:
        resumed = run(6)
    assert resumed.step == 6
    assert not [name for name in traced if "train_step" in name or "eval_step" in name], traced
