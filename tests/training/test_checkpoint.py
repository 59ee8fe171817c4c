"""Checkpoints: round trip with the data position, keep-N + best, and clear errors."""

import gc
import hashlib
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.training import optim
from jaxattn.training.checkpoint import (
    Checkpointer,
    CheckpointError,
    IncompatibleCheckpointError,
    NotWritableError,
    check_writable,
    tree_signature,
)
from jaxattn.training.state import create_train_state


def snapshot(directory):
    """Every file under ``directory`` with its size and hash: detects any change."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _trained_state(toy, steps=3):
    """A state whose params, moments and step are all non-trivial."""
    opt = toy.optimizer()

    @jax.jit
    def step(state, batch):
        grads = jax.grad(lambda p: toy.loss(p, batch, None)[0])(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state)

    state, it = toy.state(), toy.iterator()
    for _ in range(steps):
        state = step(state, next(it))
    return state, it


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_restores_state_data_position_and_metadata(tmp_path, toy):
    state, it = _trained_state(toy)
    with Checkpointer(tmp_path / "ckpt", async_save=True) as ckpt:
        ckpt.save(3, state, data_iter=it, metadata={"config": {"lr": 0.1}, "vocab": "ab\n"})
        ckpt.wait()
        expected_next = next(it)  # What a resumed run must see first.
        assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
        assert (tmp_path / "ckpt" / "3" / "state").is_dir()

    fresh_it = toy.iterator()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored, meta = ckpt.restore(toy.state(), data_iter=fresh_it)
    assert_trees_equal(restored, state)
    assert isinstance(restored, type(state))
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert meta["config"] == {"lr": 0.1} and meta["vocab"] == "ab\n" and meta["step"] == 3
    np.testing.assert_array_equal(next(fresh_it)["x"], expected_next["x"])


def test_restore_into_abstract_target(tmp_path, toy):
    state, _ = _trained_state(toy)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        restored, _ = ckpt.restore(jax.eval_shape(lambda: toy.state()))
    assert_trees_equal(restored, state)


def test_restore_params_needs_no_optimizer(tmp_path, toy):
    """A run's weights without its optimizer: restore needs the whole TrainState as its
    target, so a user exporting lm.py's weights had to rebuild the script's optimizer and
    schedule exactly ("leaf 'opt_state/1/2/count' () is not in the target")."""
    state, _ = _trained_state(toy)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
        ckpt.save(2, state, metadata={"vocab": "ab"})
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        params, meta = ckpt.restore_params(jax.eval_shape(toy.params))
        first, _ = ckpt.restore_params(toy.params(), step=1)
        assert meta["vocab"] == "ab" and meta["step"] == 2
        assert_trees_equal(params, state.params)
        assert not np.any(np.asarray(state.params["w"]) == 0)  # (trained, so not step 1's)
        assert_trees_equal(first, toy.state().params)
        wide = {"w": jnp.zeros((toy.D, 2)), "b": jnp.zeros((1,))}
        with pytest.raises(
            IncompatibleCheckpointError, match=r"leaf 'params/w' has shape \(\d+, 1\) float32"
        ):
            ckpt.restore_params(wide)
        with pytest.raises(IncompatibleCheckpointError, match=r"leaf 'params/extra' \(\) float"):
            ckpt.restore_params({**toy.params(), "extra": jnp.zeros(())})


def test_restore_defaults_to_the_latest_step(tmp_path, toy):
    state, _ = _trained_state(toy)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
        ckpt.save(3, state)
        restored, meta = ckpt.restore(toy.state())
        assert meta["step"] == 3 and ckpt.read_metadata()["step"] == 3
    assert_trees_equal(restored, state)


def test_latest_step_is_the_step_restore_reads_after_a_lower_save(tmp_path):
    # orbax's latest_step was the step saved last: 3 here, while restore read 5.
    with Checkpointer(tmp_path, async_save=False, max_to_keep=2) as ckpt:
        for step in (4, 5, 3):
            ckpt.save(step, {"w": jnp.full(2, float(step))})
        assert ckpt.all_steps() == [3, 5] and ckpt.latest_step() == 5
        assert ckpt.restore({"w": jnp.zeros(2)})[1]["step"] == 5


def test_keeps_latest_n_plus_best(tmp_path, toy):
    state = toy.state()
    val_losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 3.0, 6: None}
    with Checkpointer(tmp_path, max_to_keep=2, async_save=False) as ckpt:
        for step, val in val_losses.items():
            ckpt.save(step, state, metrics=None if val is None else {"val_loss": val})
        assert ckpt.all_steps() == [2, 5, 6]  # Latest two, plus step 2 (best val loss).
        assert ckpt.best_step() == 2
    with Checkpointer(tmp_path, max_to_keep=2, async_save=False) as ckpt:  # A resumed run.
        assert ckpt.best_step() == 2
        ckpt.save(7, state)
        assert ckpt.all_steps() == [2, 6, 7]
    with Checkpointer(tmp_path, max_to_keep=2, best_metric=None, async_save=False) as ckpt:
        ckpt.save(8, state, metrics={"val_loss": 9.0})
        assert ckpt.all_steps() == [7, 8]


def test_a_nan_metric_is_never_the_best(tmp_path, toy):
    state = toy.state()
    with Checkpointer(tmp_path, max_to_keep=1, async_save=False) as ckpt:
        for step, val in {1: 1.0, 2: float("nan"), 3: 3.0}.items():
            ckpt.save(step, state, metrics={"val_loss": val})
        assert ckpt.all_steps() == [1, 3]
        assert ckpt.best_step() == 1
    with Checkpointer(tmp_path / "nan", max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, metrics={"val_loss": float("nan")})
        assert ckpt.best_step() is None  # (no step has a number to be the best by)


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_best_step_whose_metrics_were_removed_by_hand_is_refused_not_deleted(
    tmp_path, toy, damage
):
    """orbax read the best step without its metrics file as saved without metrics, so it
    was no longer kept: the next save deleted it without a word (and a metrics file
    without the metric failed that save with a bare KeyError: 'val_loss')."""
    state = toy.state()
    with Checkpointer(tmp_path, max_to_keep=1, async_save=False) as ckpt:
        for step, val in {1: 0.5, 2: 1.0, 3: 2.0}.items():
            ckpt.save(step, state, metrics={"val_loss": val})
        assert ckpt.all_steps() == [1, 3]
    metrics_file = tmp_path / "1" / "metrics" / "metrics"
    if damage == "deleted":
        shutil.rmtree(metrics_file.parent)
    else:
        metrics_file.write_text("{}")
    before = snapshot(tmp_path)
    what = "is missing" if damage == "deleted" else "holds no 'val_loss'"
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f'{metrics_file} {what}, but step 1 was saved with metrics {{"val_loss": 0.5}}'
        ),
    ):
        Checkpointer(tmp_path, max_to_keep=1, async_save=False)
    assert snapshot(tmp_path) == before
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # reading needs no metrics
        assert ckpt.all_steps() == [1, 3]
    metrics_file.parent.mkdir(exist_ok=True)
    metrics_file.write_text('{"val_loss": 0.5}')  # the hint works
    with Checkpointer(tmp_path, max_to_keep=1, async_save=False) as ckpt:
        ckpt.save(4, state, metrics={"val_loss": 3.0})
        assert ckpt.all_steps() == [1, 4] and ckpt.best_step() == 1


def test_steps_saved_without_the_best_metric_rank_last(tmp_path, toy):
    """A folder saved ranking by val_loss, opened to rank by another metric: its steps
    are not candidates (orbax's pruning failed with a bare KeyError: 'bleu')."""
    state = toy.state()
    with Checkpointer(tmp_path, max_to_keep=1, async_save=False) as ckpt:
        for step, val in {1: 0.5, 2: 1.0}.items():
            ckpt.save(step, state, metrics={"val_loss": val})
    with Checkpointer(tmp_path, max_to_keep=1, best_metric="bleu", async_save=False) as ckpt:
        assert ckpt.best_step() is None  # (raised KeyError: 'bleu')
        ckpt.save(3, state, metrics={"bleu": 7.0})
        ckpt.save(4, state)
        assert ckpt.all_steps() == [3, 4] and ckpt.best_step() == 3


def test_saving_an_existing_step_is_refused(tmp_path, toy):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
        before = snapshot(tmp_path)
        with pytest.raises(ValueError, match="already exists"):
            ckpt.save(1, toy.state())
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("step", [4.0, -2, "4", True])
def test_a_step_that_is_not_an_int_is_refused_before_anything_is_written(tmp_path, toy, step):
    """save wrote a float 4.0 or a -2 as a folder "4.0" or "-2" that no restore finds."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        before = snapshot(tmp_path)
        with pytest.raises(ValueError, match=r"Checkpointer\.save: step must be an int >= 0"):
            ckpt.save(step, toy.state())
        assert snapshot(tmp_path) == before and ckpt.all_steps() == []
        ckpt.save(np.int64(5), toy.state())  # an integer scalar is a step
        ckpt.save(jnp.int32(6), toy.state())  # (a state's own step)
        assert ckpt.all_steps() == [5, 6]


@pytest.mark.parametrize("step", [3.0, "3", True, -1])
def test_reading_a_step_that_is_not_an_int_names_the_method_and_the_step(tmp_path, toy, step):
    """A "3" (from argv) was "no checkpoint for step 3 ...; available steps: [3]"; 3.0 or
    True (== 1) read the folder "3.0" or "True" and called the checkpoint corrupt."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
        ckpt.save(3, toy.state())
        params_like = toy.state().params
        for method, call in [
            ("read_metadata", lambda: ckpt.read_metadata(step)),
            ("restore", lambda: ckpt.restore(toy.state(), step=step)),
            ("restore_params", lambda: ckpt.restore_params(params_like, step=step)),
        ]:
            with pytest.raises(ValueError, match=rf"Checkpointer\.{method}: step must be an int"):
                call()
        assert ckpt.read_metadata(np.int64(3))["step"] == 3


def test_metadata_takes_numpy_values_and_refuses_others_before_writing(tmp_path, toy):
    """orbax writes the metadata in its background thread: a NumPy integer from a config
    file (which LoopConfig and make_mesh accept) or any other value JSON cannot hold failed
    there, after the arrays were being written, in pages of thread errors, saving nothing."""
    from pathlib import Path

    with Checkpointer(tmp_path) as ckpt:
        config = {"num_steps": np.int64(8), "lr": np.float32(0.5), "buckets": (8, np.int32(16))}
        ckpt.save(1, toy.state(), metadata={"config": config})
        ckpt.wait()
        saved = ckpt.read_metadata(1)["config"]
        assert saved == {"num_steps": 8, "lr": 0.5, "buckets": [8, 16]}
        assert type(saved["num_steps"]) is int
        before = snapshot(tmp_path)
        bad = {"config": {"data": {"path": Path("corpus.txt")}}}
        message = r"checkpoint metadata\['config'\]\['data'\]\['path'\] is not JSON-serial"
        with pytest.raises(ValueError, match=message):
            ckpt.save(2, toy.state(), metadata=bad)
        # Keys that save writes itself were overwritten without a word.
        message = r"the keys \['step', 'tree_signature'\] are written with every checkpoint"
        with pytest.raises(ValueError, match=message):
            ckpt.save(2, toy.state(), metadata={"step": 9, "tree_signature": "mine", "a": 1})
        ckpt.wait()
        assert ckpt.all_steps() == [1]
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def _put_in_a_steps_place(path, kind):
    if kind == "file":
        path.write_text("my notes")
    else:
        path.mkdir()
        (path / "notes.txt").write_text("my notes")


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_entry_named_like_a_step_that_is_no_checkpoint_is_refused(tmp_path, toy, kind):
    """orbax deleted a file named like a step to save that step, and listed a folder of
    other files as a step, deleting it to keep the latest N: both without a word."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
    _put_in_a_steps_place(tmp_path / "9", kind)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / '9'} is a .*, not a checkpoint"):
        Checkpointer(tmp_path)
    assert snapshot(tmp_path) == before
    with Checkpointer(tmp_path, read_only=True) as ckpt:  # reading deletes nothing
        assert ckpt.latest_step() == (9 if kind == "folder" else 1)
        if kind == "folder":
            with pytest.raises(CheckpointError, match="it is a folder of other files"):
                ckpt.read_metadata()
    assert snapshot(tmp_path) == before


def test_saving_over_a_file_named_like_the_step_is_refused(tmp_path, toy):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        (tmp_path / "2").write_text("my notes")  # after the folder was opened
        with pytest.raises(CheckpointError, match=f"cannot save step 2: {tmp_path / '2'} is a"):
            ckpt.save(2, toy.state())
    assert (tmp_path / "2").read_text() == "my notes"


def test_incompatible_tree_is_a_clear_error_and_changes_nothing(tmp_path, toy):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, toy.state())
    before = snapshot(tmp_path)
    bigger = {"w": jnp.zeros((toy.D + 2, 1)), "b": jnp.zeros((1,))}
    other = create_train_state(bigger, toy.optimizer(), jax.random.key(0))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match=r"'params/w' has shape \(5, 1\)"):
            ckpt.restore(other)
    renamed = {"kernel": jnp.zeros((toy.D, 1)), "b": jnp.zeros((1,))}
    other = create_train_state(renamed, toy.optimizer(), jax.random.key(0))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(IncompatibleCheckpointError, match="params/kernel"):
            ckpt.restore(other)
    assert isinstance(IncompatibleCheckpointError("x"), ValueError)
    assert snapshot(tmp_path) == before


def test_missing_checkpoint_errors(tmp_path, toy):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint found"):
            ckpt.restore(toy.state())
    with Checkpointer(tmp_path / "one", async_save=False) as ckpt:
        ckpt.save(4, toy.state())
        with pytest.raises(FileNotFoundError, match=r"step 9 .*available steps: \[4\]"):
            ckpt.restore(toy.state(), step=9)
        with pytest.raises(CheckpointError, match="no data iterator state"):
            ckpt.restore(toy.state(), data_iter=toy.iterator())
    # Read-only opens of a file and of a missing folder list no step: the error said only
    # "no checkpoint found in X", as for an empty folder.
    (tmp_path / "file").write_text("not a checkpoint")
    for name, why in [("file", "it is a file, not a folder"), ("absent", "no such folder")]:
        with Checkpointer(tmp_path / name, read_only=True) as ckpt:
            with pytest.raises(FileNotFoundError, match=rf"found in .*{name} \({why}\)$"):
                ckpt.read_metadata()
    assert not (tmp_path / "absent").exists()


def test_resume_with_another_process_count(tmp_path, toy):
    """Every process of a run saves the same position of the one global stream (each takes
    its rows of every batch), so another number of processes resumes it; positions that
    differ are refused by name."""
    state, it = _trained_state(toy)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(3, state, data_iter=it)
    data_dir = tmp_path / "3" / "data"
    (written,) = [p for p in data_dir.iterdir() if p.name.startswith("process_")]
    assert written.name == "process_0-of-1.json"
    # As a 2-process run would have saved it.
    written.rename(data_dir / "process_0-of-2.json")
    (data_dir / "process_1-of-2.json").write_text((data_dir / "process_0-of-2.json").read_text())
    want = [next(it)["x"] for _ in range(2)]
    with Checkpointer(tmp_path) as ckpt:
        resumed = toy.iterator()
        ckpt.restore(toy.state(), data_iter=resumed)
    for batch in want:
        np.testing.assert_array_equal(next(resumed)["x"], batch)
    # Positions that differ (a per-process stream) cannot be mapped onto one process.
    other = toy.iterator()
    next(other)
    (data_dir / "process_1-of-2.json").write_text(json.dumps(other.get_state()))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="a run of 2 processes, and they differ; this"):
            ckpt.restore(toy.state(), data_iter=toy.iterator())


# orbax's background event loop may report a closed loop after the failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete_state_files", "garble_meta"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, toy, damage):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
    step_dir = tmp_path / "1"
    if damage == "delete_state_files":
        for p in (step_dir / "state").rglob("*"):
            if p.is_file() and p.name != "_METADATA":
                p.unlink()
    else:
        (step_dir / "meta" / "metadata").write_text("{not json")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"checkpoint .*/1 is corrupt or incomplete"):
            ckpt.restore(toy.state())


# A run killed while writing (or a full disk) can leave any of a step's JSON files cut off:
# orbax and grain then fail with a bare JSONDecodeError that names no file.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "cut", ["state/_METADATA", "state/array_metadatas/process_0", "data/process_0-of-1.json"]
)
def test_a_cut_off_json_file_is_named(tmp_path, toy, cut):
    state, it = _trained_state(toy)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, data_iter=it)
        ckpt.save(2, state, data_iter=it)
    damaged = tmp_path / "2" / cut
    damaged.write_text(damaged.read_text()[:20])
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(toy.state(), data_iter=toy.iterator())
    message = str(info.value)
    assert (
        f"checkpoint {tmp_path / '2'} is corrupt or incomplete: {damaged} is not valid JSON "
        "(empty or cut off): JSONDecodeError: " in message
    )
    assert message.endswith("out of the folder to use step 1")
    assert snapshot(tmp_path) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_deleted_state_index_is_named(tmp_path, toy):
    # orbax's own error was "pytree structure error: different types at key path".
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
        ckpt.save(2, toy.state())
    index = tmp_path / "2" / "state" / "_METADATA"
    index.unlink()
    before = snapshot(tmp_path)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(toy.state())
    message = str(info.value)
    assert f"checkpoint {tmp_path / '2'} is corrupt or incomplete: {index} is missing: " in message
    assert message.endswith("out of the folder to use step 1")
    assert snapshot(tmp_path) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_step_names_the_intact_ones_in_one_line(tmp_path, toy):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
        ckpt.save(2, toy.state())
    # A truncated array chunk: orbax's own message spells out the whole TensorStore spec.
    chunks = [p for p in (tmp_path / "2" / "state").rglob("d/*") if p.is_file()]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(chunk.read_bytes()[:10])
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(toy.state())
    message = str(info.value)
    # One line without TensorStore's spec, keeping the end of the cause: the reason.
    assert len(message) < 600 and "tensorstore_spec" not in message
    reason = str(info.value.__cause__).split(" [tensorstore_spec")[0][-80:]
    assert message.split("; the other steps")[0].endswith(reason)
    assert f"checkpoint {tmp_path / '2'} is corrupt or incomplete" in message
    assert f"the other steps here are [1]: move {tmp_path / '2'} out of the folder" in message
    with Checkpointer(tmp_path) as ckpt:  # and step 1 still restores
        state, _ = ckpt.restore(toy.state(), step=1)
    assert_trees_equal(state, toy.state())


def test_unwritable_checkpoint_folder_fails_before_any_save(tmp_path, toy):
    (tmp_path / "checkpoints").write_text("a file, not a folder")  # fails as root too
    with pytest.raises(NotWritableError, match=f"cannot write to {tmp_path / 'checkpoints'}"):
        Checkpointer(tmp_path / "checkpoints")
    with Checkpointer(tmp_path / "checkpoints", read_only=True):  # reading needs no writes
        pass
    assert (tmp_path / "checkpoints").read_text() == "a file, not a folder"


def test_check_writable_names_the_file_in_the_way(tmp_path):
    # A workdir (or a folder above it) that is a file failed as "cannot write to
    # RUN/checkpoints: Not a directory" (or "RUN: File exists"), naming neither the file
    # nor what was wrong with it.
    (tmp_path / "run").write_text("a file, not a folder")
    for folder in (
        tmp_path / "run",
        tmp_path / "run" / "checkpoints",
        tmp_path / "run" / "a" / "b",
    ):
        with pytest.raises(NotWritableError) as e:
            check_writable(folder)
        reason = "File exists" if folder == tmp_path / "run" else "Not a directory"
        assert str(e.value) == (
            f"cannot write to {folder}: {reason} ({tmp_path / 'run'} is a file, not a folder)"
        )


def test_check_writable_creates_the_folder_and_leaves_no_probe(tmp_path):
    check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
    (tmp_path / "f").write_text("")
    with pytest.raises(NotWritableError, match=f"cannot write to {tmp_path / 'f' / 'x'}: "):
        check_writable(tmp_path / "f" / "x")


def test_tree_signature_lists_paths_shapes_dtypes(toy):
    sig = tree_signature(toy.state(optim.make_optimizer(1e-3)))
    paths = [p for p, _, _ in sig]
    assert ["params/b", [1], "float32"] in sig and ["params/w", [5, 1], "float32"] in sig
    assert "step" in paths and "rng" in paths


def test_a_dtype_or_an_extra_leaf_is_incompatible(tmp_path, toy):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, toy.state())
    before = snapshot(tmp_path)
    half = {"w": jnp.zeros((toy.D, 1), jnp.bfloat16), "b": jnp.zeros((1,), jnp.float32)}
    other = create_train_state(half, toy.optimizer(), jax.random.key(0))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(
            IncompatibleCheckpointError,
            match=r"'params/w' has shape \(5, 1\) float32 in the checkpoint but \(5, 1\) bfloat16",
        ):
            ckpt.restore(other)
    no_bias = {"w": jnp.zeros((toy.D, 1), jnp.float32)}
    other = create_train_state(no_bias, toy.optimizer(), jax.random.key(0))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(
            IncompatibleCheckpointError, match=r"checkpoint leaf 'params/b' \(1,\) is not in"
        ):
            ckpt.restore(other)
    assert snapshot(tmp_path) == before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_step_points_at_the_step_that_would_be_used(tmp_path, toy):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, toy.state())
    (tmp_path / "3" / "meta" / "metadata").write_text("{not json")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"steps here are \[1, 2\]: .* to use step 2$"):
            ckpt.restore(toy.state())


@pytest.mark.parametrize("read_only", [False, True])
def test_a_damaged_metrics_file_names_its_step_and_changes_nothing(tmp_path, toy, read_only):
    # orbax reads every step's metrics when it opens the folder, before any restore.
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step, loss in [(2, 2.0), (3, 1.0), (10, 3.0)]:
            ckpt.save(step, toy.state(), metrics={"val_loss": loss})
    cut = {2: 5, 10: 14}  # steps in numeric order, each file with its own reason
    for step, length in cut.items():
        metrics_file = tmp_path / str(step) / "metrics" / "metrics"
        metrics_file.write_text(metrics_file.read_text()[:length])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path, read_only=read_only)
    message = str(info.value)
    reasons = [f"{tmp_path / str(s) / 'metrics' / 'metrics'} (JSONDecodeError: " for s in cut]
    assert f"corrupt metrics file {reasons[0]}" in message and f"; {reasons[1]}" in message
    assert "(char 1)" in message.split("; ")[0] and "(char 1)" not in message.split("; ")[1]
    assert message.endswith(
        f"move {tmp_path / '2'}, {tmp_path / '10'} out of the folder to use the other steps"
    )
    assert snapshot(tmp_path) == before
    for step in cut:  # the hint works
        (tmp_path / str(step)).rename(tmp_path.parent / f"{tmp_path.name}_moved_{step}")
    with Checkpointer(tmp_path, read_only=read_only) as ckpt:
        assert ckpt.all_steps() == [3] and ckpt.best_step() == 3


@pytest.mark.parametrize("read_only", [False, True])
def test_a_hand_edited_step_record_names_its_step_and_changes_nothing(tmp_path, toy, read_only):
    """A ``_CHECKPOINT_METADATA`` that parses but is not orbax's record (a list, a timestamp
    of another type) fails orbax's opening of the folder: the error named the folder and
    orbax's reason only ("Metadata dict must be a dictionary, but got list")."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (2, 3, 10):
            ckpt.save(step, toy.state())
    edits = {3: "[1, 2]", 10: '{"commit_timestamp_nsecs": "yesterday"}'}
    for step, text in edits.items():
        (tmp_path / str(step) / "_CHECKPOINT_METADATA").write_text(text)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path, read_only=read_only)
    message = str(info.value)
    records = [tmp_path / str(step) / "_CHECKPOINT_METADATA" for step in edits]
    assert f"corrupt step record {records[0]} (ValueError: Metadata dict must be a " in message
    assert f"; {records[1]} (ValueError: " in message
    assert message.endswith(f"delete {records[0]}, {records[1]} (orbax reads a step without one)")
    assert snapshot(tmp_path) == before
    for record in records:  # the hint works
        record.unlink()
    with Checkpointer(tmp_path, read_only=read_only) as ckpt:
        assert ckpt.all_steps() == [2, 3, 10] and ckpt.unreadable_step_records() == records


@pytest.mark.parametrize("record_step", [2, 3])
def test_a_bad_metrics_file_and_a_bad_step_record_get_hints_that_work_together(
    tmp_path, toy, record_step
):
    """Step 2's metrics file cut, and step 2's or 3's ``_CHECKPOINT_METADATA`` a list: the
    hints read "move .../2 ..., or delete .../_CHECKPOINT_METADATA", but either alone left
    the folder unopenable; and a record in a step to be moved needs no deleting."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in (2, 3, 4):
            ckpt.save(step, toy.state(), metrics={"val_loss": 1.0})
    (tmp_path / "2" / "metrics" / "metrics").write_text("{")
    record = tmp_path / str(record_step) / "_CHECKPOINT_METADATA"
    record.write_text("[1, 2]")
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path)
    message = str(info.value)
    assert f"corrupt step record {record} (ValueError: " in message
    move = f"move {tmp_path / '2'} out of the folder to use the other steps"
    delete = f", and delete {record} (orbax reads a step without one)"
    assert message.endswith(move + (delete if record_step == 3 else ""))
    (tmp_path / "2").rename(tmp_path.parent / f"{tmp_path.name}_moved_2")  # the hints work
    if record_step == 3:
        record.unlink()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [3, 4]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_truncated_array_names_the_reason_not_orbaxs_wrapper(tmp_path):
    # orbax raises "Encountered error while reading array index ... <the store's repr>" from
    # TensorStore's error, which says what is wrong: the message takes the innermost cause.
    state = {"w": jnp.arange(4096.0).reshape(64, 64), "b": jnp.ones((64,))}
    with Checkpointer(tmp_path, async_save=False, best_metric=None) as ckpt:
        ckpt.save(1, state)
    data = max(
        (tmp_path / "1" / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size
    )
    data.write_bytes(data.read_bytes()[:100])
    with Checkpointer(tmp_path, best_metric=None) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(state)
    assert "Encountered error while reading array index" in str(info.value.__cause__)
    assert re.search(r"corrupt or incomplete: ValueError: .*not valid for value of size 100$",
                     str(info.value))  # fmt: skip
    # orbax's other reads of the step, still referenced by the error's frames, are closed
    # here, under this test's warning filter, not in whichever test runs next.
    del info
    gc.collect()


def test_first_line_leaves_only_orbaxs_read_wrapper_for_its_cause():
    from jaxattn.training.checkpoint import _first_line

    def chained(outer, inner):
        outer.__cause__ = inner
        return outer

    reason = ValueError(
        "OUT_OF_RANGE: Requested byte range [0, 9) is not valid for value of size 5"
    )
    wrapper = Exception("Encountered error while reading array index: (0,). See full <repr>")
    assert _first_line(chained(wrapper, reason)) == f"ValueError: {reason}"
    # orbax's clear wrappers of vague errors stay as they are.
    clear = chained(ValueError("Topology mismatch detected: provide a target tree"), KeyError(4))
    assert _first_line(clear) == "ValueError: Topology mismatch detected: provide a target tree"
    looped = Exception("Encountered error while reading array index: (1,)")
    assert _first_line(chained(looped, looped)).startswith("Exception: Encountered")  # ends


def test_a_step_another_checkpointer_saved_since_opening_is_not_overwritten(tmp_path, toy):
    # orbax lists the steps when it opens the folder: a second Checkpointer (another run on
    # the same workdir, a notebook's) then saved over a step the first had written since.
    first = Checkpointer(tmp_path, async_save=False)
    second = Checkpointer(tmp_path, async_save=False)
    first.save(2, toy.state())
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=f"checkpoint step 2 already exists in {tmp_path}"):
        second.save(2, toy.state(seed=1))
    second.wait()
    assert snapshot(tmp_path) == before
    second.save(3, toy.state(seed=1))  # and other steps still save
    first.close()
    second.close()


def test_the_reload_for_a_step_saved_elsewhere_keeps_this_checkpointers_own_save(tmp_path):
    # save() reloads orbax's list of steps when the step's folder appeared since it opened;
    # a save of its own still in flight (a temporary folder) then dropped out of the list.
    other = Checkpointer(tmp_path, async_save=False)
    ckpt = Checkpointer(tmp_path, async_save=True)
    other.save(5, {"w": jnp.ones(3)})
    ckpt.save(4, {"w": jnp.ones((2048, 2048))})  # (16 MB: still writing at the next save)
    with pytest.raises(ValueError, match="checkpoint step 5 already exists"):
        ckpt.save(5, {"w": jnp.ones(3)})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
    other.close()
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_tree_that_differs_only_where_it_holds_no_arrays_is_incompatible_not_corrupt(
    tmp_path, toy
):
    # The leaves' paths, shapes and dtypes agree, so only orbax saw the difference, and it
    # was reported as a corrupt step, with the advice to move that (intact) step away.
    import optax

    saved = create_train_state(toy.params(), optax.chain(optax.adam(1e-3)), jax.random.key(0))
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, saved)
        ckpt.save(2, saved._replace(params={"w": saved.params["w"], "b": [saved.params["b"]]}))
    before = snapshot(tmp_path)
    # A stateless transform (its state is an empty node) added to the end of the chain.
    target = create_train_state(
        toy.params(), optax.chain(optax.adam(1e-3), optax.clip(1.0)), jax.random.key(0)
    )
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(IncompatibleCheckpointError) as info:
            ckpt.restore(target, step=1)
        message = str(info.value)
        assert message.startswith(f"checkpoint {tmp_path / '1'} is incompatible: ")
        assert "opt_state" in message and "nothing was restored or overwritten" in message
        assert "corrupt" not in message and "move" not in message
        # saved b as a list, asked for as a dict holding key "0": the same leaf path
        with pytest.raises(IncompatibleCheckpointError, match=r"incompatible: .*params.*b"):
            ckpt.restore_params({"w": toy.params()["w"], "b": {"0": toy.params()["b"]}}, step=2)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("leaf", [1.5, 3, "text"])
def test_a_leaf_that_is_not_an_array_is_named_before_anything_is_written(tmp_path, toy, leaf):
    state = toy.state()._replace(params={**toy.params(), "scale": leaf})
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(
            ValueError, match=rf"leaf 'params/scale' is a {type(leaf).__name__} .*not an array"
        ):
            ckpt.save(1, state)
        assert ckpt.all_steps() == []
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("signature", [5, None, [[1, 2]], [["params/w", 5, "float32"]]])
def test_a_malformed_tree_signature_is_named(tmp_path, toy, signature):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, toy.state())
    metadata = tmp_path / "1" / "meta" / "metadata"
    meta = json.loads(metadata.read_text())
    metadata.write_text(json.dumps(meta | {"tree_signature": signature}))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(
            CheckpointError, match=rf"{metadata}: its tree_signature is not a list of \[path"
        ):
            ckpt.restore(toy.state())
