"""Shared checks for the end-to-end script tests."""

import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest


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
