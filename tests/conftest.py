"""Test settings shared by the whole suite.

Strict dtype promotion makes an accidental int/float or f32/f64 mix an error instead of a
silent upcast. Tests compare against float64 NumPy references, so JAX stays in float32.
"""

import jax
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
