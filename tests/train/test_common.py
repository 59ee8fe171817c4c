"""train/common.py's helpers, in process: the note a resume with changed settings prints."""

import sys

import jax.numpy as jnp
import ml_collections
import pytest
from script_runs import REPO  # tests/train/script_runs.py

from jaxattn.training.checkpoint import Checkpointer

sys.path.insert(0, str(REPO / "train"))
import common  # train/common.py, as the scripts import it


def _config(**model):
    config = ml_collections.ConfigDict()
    config.batch_size = 12
    config.learning_rate = 1e-3
    config.buckets = (8, 16)  # saved as a JSON list
    config.num_steps = 100
    config.mesh = ml_collections.ConfigDict({"data": -1})
    config.model = ml_collections.ConfigDict({"embed_dim": 32, **model})
    return config


@pytest.fixture
def workdir(tmp_path):
    """A checkpoint saved by a config without ``model.gelu_approximate``, whose resolved
    model (``meta["model"]``, as lm.py saves it) had it True."""
    saved = _config()
    with Checkpointer(tmp_path / "checkpoints", async_save=False) as ckpt:
        ckpt.save(
            5,
            {"w": jnp.zeros(2)},
            metadata={
                "config": saved.to_dict(),
                "model": {"embed_dim": 32, "gelu_approximate": True},
            },
        )
    return tmp_path


def _note(capsys, workdir, config, **kw):
    meta = common.latest_checkpoint_metadata(workdir, config, **kw)
    assert meta["step"] == 5
    return capsys.readouterr().out


def test_no_note_for_the_same_settings_or_free_ones(capsys, workdir):
    assert _note(capsys, workdir, _config()) == ""  # tuples vs the saved lists: the same
    free = _config()
    free.num_steps, free.mesh.data = 200, 2  # the loop's length and the mesh may change
    assert _note(capsys, workdir, free) == ""
    free.batch_size = 8
    assert _note(capsys, workdir, free, also_free=["batch_size"]) == ""
    # A model field the config file gained since, at the value the run resolved it to.
    assert _note(capsys, workdir, _config(gelu_approximate=True)) == ""


def test_note_names_each_changed_setting(capsys, workdir):
    changed = _config(gelu_approximate=False)
    changed.batch_size, changed.learning_rate = 8, 3e-4
    out = _note(capsys, workdir, changed)
    assert out == (
        f"note: {workdir / 'checkpoints' / '5'} was saved with other settings: batch_size 12 "
        "-> 8, learning_rate 0.001 -> 0.0003, model.gelu_approximate True -> False; the "
        "resumed run will not match an uninterrupted one\n"
    )


def test_no_checkpoint_no_metadata(capsys, tmp_path):
    assert common.latest_checkpoint_metadata(tmp_path, _config()) is None
    assert capsys.readouterr().out == ""


def test_workdir_from_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    # The shell leaves ~ in --workdir=~/run: it was a folder named ~ in the current one.
    assert common.workdir_from_flag("~/run") == str(tmp_path / "run")
    assert common.workdir_from_flag("gs://bucket/~run") == "gs://bucket/~run"
    assert common.workdir_from_flag("runs/a") == "runs/a"
    for empty in ("", "  "):  # --workdir=$UNSET would train into the current folder
        with pytest.raises(ValueError, match="--workdir is empty"):
            common.workdir_from_flag(empty)
