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
        "attend": (lambda a: attention.attend(a, x.swapaxes(-1, -2))[0], x),
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


# The argument each op names for its first input (dense's is checked in ``project``).
_FIRST_INPUT = {
    "lstm_scan": "lstm_scan: xs",
    "bidirectional_lstm": "bidirectional_lstm: xs",
    "lstm_stack": "lstm_stack: xs",
    "attend": "attend: scores",
    "layer_norm": "layer_norm: x",
    "rms_norm": "rms_norm: x",
    "dense": "project: x",
    "apply_rope": "apply_rope: x",
    "dot_product_attention": "dot_product_attention: q",
}


@pytest.mark.parametrize("name", sorted(_FIRST_INPUT))
@pytest.mark.parametrize("bad", ["None", "ragged"])
def test_none_or_a_ragged_list_is_named(name, bad):
    # JAX's "None is not a valid value for jnp.array" and NumPy's "inhomogeneous shape"
    # named neither the op nor the argument.
    op, data = _cases(np.random.default_rng(0))[name]
    rows = data.tolist()
    value = None if bad == "None" else [rows[0], rows[1][:-1]]  # batch rows of two lengths
    got = "NoneType" if bad == "None" else r"list \(.*inhomogeneous"
    with pytest.raises(ValueError, match=rf"^{_FIRST_INPUT[name]} must be .*, got {got}"):
        op(value)


def test_the_other_arrays_of_the_ops_are_named_when_none():
    from jaxattn.ops import losses, masks

    x = np.ones((2, 3, 1, 4), np.float32)
    for call, what in (
        (lambda: attention.attend(x[:, 0, 0, :2], None), "attend: values"),
        (lambda: masks.masked_softmax(None), "masked_softmax: scores"),
        (lambda: positions.apply_rope(x, None), "apply_rope: positions"),
        (lambda: positions.rope_frequencies(None, 4), "rope_frequencies: positions"),
        (lambda: losses.cross_entropy(None, [0, 1]), "cross_entropy: logits"),
    ):
        with pytest.raises(ValueError, match=rf"^{what} must be an array, got NoneType"):
            call()
