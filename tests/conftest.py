"""Test settings shared by the whole suite.

Strict dtype promotion makes an accidental int/float or f32/f64 mix an error instead of a
silent upcast. Tests compare against float64 NumPy references, so JAX stays in float32.

XLA's backend (LLVM) optimisation is off: the suite's time is mostly XLA compiling small
programs once each, and the tests check numbers and program structure (HLO, buffers,
shardings), not how fast the generated code runs, which is what ``benchmarks/`` measures
with the default level. The setting reaches the scripts and notebooks the tests start,
through the environment. To run the suite on optimised code, set the level yourself:
``XLA_FLAGS=--xla_backend_optimization_level=3 pytest ...`` (3 is XLA's default).
"""

import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # after XLA_FLAGS: the CPU backend reads them once, as it starts
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng() -> jax.Array:
    """A fixed PRNG key; tests split it, never share global state."""
    return jax.random.key(0)


@pytest.fixture
def np_rng() -> np.random.Generator:
    """A seeded NumPy generator for reference inputs."""
    return np.random.default_rng(0)
