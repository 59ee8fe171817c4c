"""NumPy float64 data (``np.random.randn``, a student's first input) into the ops.

Without ``jax_enable_x64`` JAX computes it in float32, as ``jnp.asarray`` would; an op
that asked for the input's dtype itself (``jnp.zeros(.., xs.dtype)``, ``.astype(x.dtype)``)
warned from inside the library that float64 "is not available". Each op here must give the
float32 result of the same values, with no warning.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops import attention, layers, lstm, positions

KEY = jax.random.key(0)


def _cases(rng):
    x = rng.standard_normal((2, 5, 8))  # float64
    q = rng.standard_normal((2, 5, 4, 8))
    directions = [lstm.init_lstm(key, 8, 4) for key in jax.random.split(KEY)]
    return {
        "lstm_scan": (lambda a: lstm.lstm_scan(lstm.init_lstm(KEY, 8, 4), a)[0], x),
        "bidirectional_lstm": (
            lambda a: lstm.bidirectional_lstm(lstm.BidirectionalWeights(*directions), a)[0],
            x,
        ),
        "lstm_stack": (
            lambda a: lstm.lstm_stack(lstm.init_lstm_stack(KEY, 8, 4, num_layers=2), a)[0],
            x,
        ),
        # scores [2, 5, 8], values [2, 8, 5]
        "attend": (lambda a: attention.attend(a, a.swapaxes(-1, -2))[0], x),
        "layer_norm": (lambda a: layers.layer_norm(layers.init_layer_norm(8), a), x),
        "rms_norm": (lambda a: layers.rms_norm(layers.init_rms_norm(8), a), x),
        "dense": (lambda a: layers.dense(layers.init_dense(KEY, 8, 3), a), x),
        "apply_rope": (lambda a: positions.apply_rope(a, jnp.arange(5)), q),
        "dot_product_attention": (
            lambda a: attention.dot_product_attention(a, a, a, is_causal=True),
            q,
        ),
    }


@pytest.mark.parametrize("name", sorted(_cases(np.random.default_rng(0))))
def test_numpy_float64_data_runs_in_float32_without_a_warning(name):
    if jax.config.jax_enable_x64:
        pytest.skip("with x64 on, float64 is computed as float64")
    op, data = _cases(np.random.default_rng(0))[name]
    assert data.dtype == np.float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = op(data)
    want = op(jnp.asarray(data, jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
