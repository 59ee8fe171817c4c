"""Shared checks for the end-to-end script tests."""

import functools
import importlib
import importlib.util
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from ml_collections import config_flags
from script_runs import REPO  # tests/train/script_runs.py


def _saved_state(workdir, step):
    """The raw saved TrainState of a step, restored without a target (nested dicts)."""
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


@pytest.fixture
def assert_same_saved_state():
    """``check(workdir_a, workdir_b, step)``: both runs saved bit-identical states at step."""

    def check(workdir_a, workdir_b, step):
        a, b = _saved_state(workdir_a, step), _saved_state(workdir_b, step)
        assert int(a["step"]) == int(b["step"]) == step
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x, y = jax.random.key_data(x), jax.random.key_data(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    return check


@pytest.fixture
def killed_run_copy(tmp_path):
    """``copy(workdir, step)``: a copy of a finished run's workdir without its checkpoint at
    ``step``, as a run killed before saving it would have left it."""

    def copy(workdir, step):
        resumed = tmp_path / "resumed"
        shutil.copytree(workdir, resumed)
        shutil.rmtree(resumed / "checkpoints" / str(step))
        return resumed

    return copy


@pytest.fixture
def load_script(monkeypatch):
    """``load(name)``: ``train/<name>.py`` imported in this process as a fresh module, its
    absl flags defined in a ``FlagValues`` of their own and parsed at their defaults.

    lm.py and translate.py define flags of the same names (``--config``, ``--workdir``);
    defined in absl's global ``FLAGS`` they would outlive the test and change what
    ``train/common.py``'s helpers read in the tests that run after it in the worker.
    """
    monkeypatch.syspath_prepend(str(REPO / "train"))
    importlib.import_module("common")  # train/common.py: its own flags stay in absl's FLAGS

    def load(name):
        values = flags.FlagValues()
        for define in (
            "DEFINE_string",
            "DEFINE_multi_string",
            "DEFINE_bool",
            "DEFINE_integer",
            "DEFINE_float",
        ):
            # The original function, even when an earlier load has already patched it.
            original = getattr(flags, define)
            original = getattr(original, "func", original)
            monkeypatch.setattr(flags, define, functools.partial(original, flag_values=values))
        original = getattr(config_flags.DEFINE_config_file, "func", config_flags.DEFINE_config_file)
        define = functools.partial(original, flag_values=values)
        monkeypatch.setattr(config_flags, "DEFINE_config_file", define)
        path = REPO / "train" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_script", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # defines the script's flags, in `values`
        values([path.name])
        return module

    return load
