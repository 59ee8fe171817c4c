"""Tests for jaxattn.ops.lstm: a float64 NumPy reference, torch.nn.LSTM parity, transforms."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxattn.ops import lstm as lstm_module
from jaxattn.ops.layers import dropout
from jaxattn.ops.lstm import (
    BidirectionalWeights,
    LSTMWeights,
    bidirectional_lstm,
    init_lstm,
    init_lstm_stack,
    lstm_cell,
    lstm_scan,
    lstm_stack,
)

B, T, IN, HID = 3, 7, 5, 11
LENGTHS = np.array([7, 2, 5])  # one full row, two padded rows (unsorted)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def reference_lstm(weights, xs, h0, c0, lengths=None, reverse=False):
    """Float64 LSTM, one row at a time, visiting only each row's valid steps."""
    w_ih, w_hh, b = (np.asarray(a, np.float64) for a in weights)
    xs = np.asarray(xs, np.float64)
    n_hid = w_hh.shape[0]
    batch, steps, _ = xs.shape
    ys = np.zeros((batch, steps, n_hid))
    h_n, c_n = np.zeros((batch, n_hid)), np.zeros((batch, n_hid))
    for row in range(batch):
        h, c = np.array(h0[row], np.float64), np.array(c0[row], np.float64)
        n = steps if lengths is None else int(lengths[row])
        for t in reversed(range(n)) if reverse else range(n):
            z = xs[row, t] @ w_ih + h @ w_hh + b
            i, f = _sigmoid(z[:n_hid]), _sigmoid(z[n_hid : 2 * n_hid])
            g, o = np.tanh(z[2 * n_hid : 3 * n_hid]), _sigmoid(z[3 * n_hid :])
            c = f * c + i * g
            h = o * np.tanh(c)
            ys[row, t] = h
        h_n[row], c_n[row] = h, c
    return ys, (h_n, c_n)


def _inputs(np_rng, batch=B, steps=T, in_size=IN, hidden=HID):
    xs = np_rng.normal(size=(batch, steps, in_size)).astype(np.float32)
    h0 = np_rng.normal(size=(batch, hidden)).astype(np.float32)
    c0 = np_rng.normal(size=(batch, hidden)).astype(np.float32)
    return jnp.asarray(xs), jnp.asarray(h0), jnp.asarray(c0)


# --- NumPy reference -----------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, LENGTHS, np.array([0, 7, 4])])
def test_lstm_scan_matches_numpy_reference(rng, np_rng, reverse, lengths):
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    ys, (h, c) = lstm_scan(weights, xs, (h0, c0), lengths=lengths, reverse=reverse)
    ys_ref, (h_ref, c_ref) = reference_lstm(weights, xs, h0, c0, lengths, reverse)
    assert ys.shape == (B, T, HID) and h.shape == c.shape == (B, HID)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(c, c_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["scan", "autodiff"])
def test_lstm_scan_under_rank_promotion_raise(rng, np_rng, implementation):
    """The [4h] bias and gate constants against [B, 4h] rows are broadcast explicitly:
    under jax.numpy_rank_promotion("raise") lstm_scan (forward and gradient, so every
    seq2seq model) failed with "Operands could not be broadcast together"."""
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    run = lambda w: lstm_scan(w, xs, (h0, c0), lengths=LENGTHS, implementation=implementation)
    with jax.numpy_rank_promotion("raise"):
        ys, (h, c) = run(weights)
        grads = jax.grad(lambda w: jnp.sum(run(w)[0]))(weights)
    ys_ref, (h_ref, c_ref) = reference_lstm(weights, xs, h0, c0, LENGTHS)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(c, c_ref, atol=1e-5, rtol=1e-5)
    # The bias gradient against the reference's, by central differences in float64.
    eps, b = 1e-6, np.asarray(weights.b, np.float64)
    want_db = [
        (
            reference_lstm((weights.w_ih, weights.w_hh, b + eps * e), xs, h0, c0, LENGTHS)[0].sum()
            - reference_lstm((weights.w_ih, weights.w_hh, b - eps * e), xs, h0, c0, LENGTHS)[
                0
            ].sum()
        )
        / (2 * eps)
        for e in np.eye(4 * HID)
    ]
    np.testing.assert_allclose(grads.b, want_db, atol=1e-4, rtol=1e-4)


def test_lstm_cell_matches_numpy_reference(rng, np_rng):
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    h, c = lstm_cell(weights, (h0, c0), xs[:, 3])
    _, (h_ref, c_ref) = reference_lstm(weights, xs[:, 3:4], h0, c0)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(c, c_ref, atol=1e-5, rtol=1e-5)


def test_zero_carry_is_the_default(rng, np_rng):
    weights = init_lstm(rng, IN, HID)
    xs, _, _ = _inputs(np_rng)
    zeros = jnp.zeros((B, HID))
    ys, carry = lstm_scan(weights, xs, lengths=LENGTHS)
    ys0, carry0 = lstm_scan(weights, xs, (zeros, zeros), lengths=LENGTHS)
    np.testing.assert_array_equal(ys, ys0)
    np.testing.assert_array_equal(carry[1], carry0[1])


# --- scan vs cell --------------------------------------------------------------------------


def test_lstm_cell_equals_one_scan_step(rng, np_rng):
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    ys, (h, c) = lstm_scan(weights, xs[:, :1], (h0, c0))
    h1, c1 = lstm_cell(weights, (h0, c0), xs[:, 0])
    np.testing.assert_allclose(ys[:, 0], h1, atol=1e-6)
    np.testing.assert_allclose(h, h1, atol=1e-6)
    np.testing.assert_allclose(c, c1, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_equals_python_loop_over_cell(rng, np_rng, reverse):
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    ys, (h, c) = lstm_scan(weights, xs, (h0, c0), reverse=reverse)
    carry, outs = (h0, c0), [None] * T
    for t in reversed(range(T)) if reverse else range(T):
        carry = lstm_cell(weights, carry, xs[:, t])
        outs[t] = carry[0]
    np.testing.assert_allclose(ys, jnp.stack(outs, axis=1), atol=1e-5)
    np.testing.assert_allclose(h, carry[0], atol=1e-5)
    np.testing.assert_allclose(c, carry[1], atol=1e-5)


# --- PyTorch parity ------------------------------------------------------------------------


def _torch_lstm(num_layers, bidirectional, seed=0):
    torch = pytest.importorskip("torch")
    torch.manual_seed(seed)
    return torch.nn.LSTM(
        IN, HID, num_layers=num_layers, bidirectional=bidirectional, batch_first=True
    )


def _torch_layers(module, get):
    """``module``'s layers in our layout, reading each torch tensor through ``get``."""
    layers = []
    for layer in range(module.num_layers):
        directions = []
        for suffix in ["", "_reverse"] if module.bidirectional else [""]:
            w = {
                name: get(getattr(module, f"{name}_l{layer}{suffix}"))
                for name in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
            }
            directions.append(
                LSTMWeights(w["weight_ih"].T, w["weight_hh"].T, w["bias_ih"] + w["bias_hh"])
            )
        layers.append(BidirectionalWeights(*directions) if module.bidirectional else directions[0])
    return tuple(layers)


def _weights_from_torch(module):
    return jax.tree.map(jnp.asarray, _torch_layers(module, lambda p: p.detach().numpy()))


def _run_torch(module, xs, carry, lengths):
    """Torch outputs ``[B, T, dirs*h]`` (zeros past length) and ``(h_n, c_n)``."""
    torch = pytest.importorskip("torch")
    pack = torch.nn.utils.rnn
    x = xs if isinstance(xs, torch.Tensor) else torch.from_numpy(np.asarray(xs))
    steps = x.shape[1]
    if lengths is not None:
        x = pack.pack_padded_sequence(
            x, torch.from_numpy(lengths), batch_first=True, enforce_sorted=False
        )
    hc = None if carry is None else tuple(torch.from_numpy(np.asarray(a)) for a in carry)
    ys, (h_n, c_n) = module(x, hc)
    if lengths is not None:
        ys, _ = pack.pad_packed_sequence(ys, batch_first=True, total_length=steps)
    return ys, h_n, c_n


@pytest.mark.parametrize(
    "num_layers, bidirectional, packed, with_carry",
    list(itertools.product([1, 2], [False, True], [False, True], [False, True])),
)
def test_lstm_stack_matches_torch(np_rng, num_layers, bidirectional, packed, with_carry):
    module = _torch_lstm(num_layers, bidirectional)
    layers = _weights_from_torch(module)
    dirs = 2 if bidirectional else 1
    xs = np_rng.normal(size=(B, T, IN)).astype(np.float32)
    carry = None
    if with_carry:
        carry = tuple(
            np_rng.normal(size=(num_layers * dirs, B, HID)).astype(np.float32) for _ in range(2)
        )
    lengths = LENGTHS if packed else None
    ys_t, h_t, c_t = _run_torch(module, xs, carry, lengths)
    ys, (h_n, c_n) = lstm_stack(
        layers,
        jnp.asarray(xs),
        None if carry is None else tuple(map(jnp.asarray, carry)),
        lengths=lengths,
    )
    assert ys.shape == (B, T, dirs * HID)
    assert h_n.shape == c_n.shape == (num_layers * dirs, B, HID)
    np.testing.assert_allclose(ys, ys_t.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h_n, h_t.detach().numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(c_n, c_t.detach().numpy(), atol=1e-5, rtol=1e-5)


def test_lstm_scan_and_bidirectional_match_torch(np_rng):
    """The single-layer entry points give torch's numbers too (not only through the stack)."""
    uni, bi = _torch_lstm(1, False), _torch_lstm(1, True, seed=1)
    xs = np_rng.normal(size=(B, T, IN)).astype(np.float32)
    ys_t, h_t, c_t = _run_torch(uni, xs, None, LENGTHS)
    ys, (h, c) = lstm_scan(_weights_from_torch(uni)[0], jnp.asarray(xs), lengths=LENGTHS)
    np.testing.assert_allclose(ys, ys_t.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(h, h_t[0].detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(c, c_t[0].detach().numpy(), atol=1e-5)

    ys_t, h_t, c_t = _run_torch(bi, xs, None, LENGTHS)
    ys, ((h_f, c_f), (h_b, c_b)) = bidirectional_lstm(
        _weights_from_torch(bi)[0], jnp.asarray(xs), lengths=LENGTHS
    )
    np.testing.assert_allclose(ys, ys_t.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(jnp.stack([h_f, h_b]), h_t.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(jnp.stack([c_f, c_b]), c_t.detach().numpy(), atol=1e-5)


@pytest.mark.parametrize("num_layers, bidirectional, packed", [(1, False, False), (2, True, True)])
def test_gradients_match_torch(np_rng, num_layers, bidirectional, packed):
    torch = pytest.importorskip("torch")
    module = _torch_lstm(num_layers, bidirectional)
    layers = _weights_from_torch(module)
    dirs = 2 if bidirectional else 1
    xs = np_rng.normal(size=(B, T, IN)).astype(np.float32)
    probe = np_rng.normal(size=(B, T, dirs * HID)).astype(np.float32)
    probe_h = np_rng.normal(size=(num_layers * dirs, B, HID)).astype(np.float32)
    lengths = LENGTHS if packed else None

    x_t = torch.from_numpy(xs).requires_grad_()
    ys_t, h_t, _ = _run_torch(module, x_t, None, lengths)
    loss_t = (ys_t * torch.from_numpy(probe)).sum() + (h_t * torch.from_numpy(probe_h)).sum()
    loss_t.backward()

    def loss(layers, xs):
        ys, (h_n, _) = lstm_stack(layers, xs, lengths=lengths)
        return jnp.sum(ys * probe) + jnp.sum(h_n * probe_h)

    g_layers, g_xs = jax.jit(jax.grad(loss, argnums=(0, 1)))(layers, jnp.asarray(xs))
    np.testing.assert_allclose(loss(layers, jnp.asarray(xs)), loss_t.item(), rtol=1e-5)
    np.testing.assert_allclose(g_xs, x_t.grad.numpy(), atol=1e-4, rtol=1e-4)
    g_torch = _torch_grads(module)
    for got, want in zip(jax.tree.leaves(g_layers), jax.tree.leaves(g_torch)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def _torch_grads(module):
    """Torch's gradients in our layout: d/d b = d/d bias_ih = d/d bias_hh, so halve the sum."""
    grads = _torch_layers(module, lambda p: p.grad.numpy())
    is_layer = lambda w: isinstance(w, LSTMWeights)
    return jax.tree.map(lambda w: w._replace(b=w.b / 2), grads, is_leaf=is_layer)


# --- transforms ----------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["scan", "autodiff"])
def test_narrow_integer_lengths_do_not_wrap(rng, np_rng, implementation):
    # uint8 lengths with T = 300: steps counted in uint8 would wrap at 256 and a row of
    # length 100 would run again at steps 256..299.
    steps = 300
    weights = init_lstm(rng, IN, HID)
    xs = jnp.asarray(np_rng.normal(size=(2, steps, IN)), jnp.float32)
    lengths = np.array([100, 250])
    want_ys, want_state = lstm_scan(weights, xs, lengths=lengths, implementation=implementation)
    got_ys, got_state = lstm_scan(
        weights, xs, lengths=lengths.astype(np.uint8), implementation=implementation
    )
    np.testing.assert_array_equal(got_ys, want_ys)
    for got, want in zip(got_state, want_state):
        np.testing.assert_array_equal(got, want)


def test_jit_matches_eager_with_traced_lengths(rng, np_rng):
    layers = init_lstm_stack(rng, IN, HID, num_layers=2, bidirectional=True)
    xs, h0, c0 = _inputs(np_rng)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    eager = lstm_stack(layers, xs, lengths=lengths)
    jitted = jax.jit(lambda w, x, n: lstm_stack(w, x, lengths=n))(layers, xs, lengths)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    scan = jax.jit(lstm_scan, static_argnames="reverse")
    want = lstm_scan(layers[0].forward, xs, (h0, c0), lengths=lengths, reverse=True)
    got = scan(layers[0].forward, xs, (h0, c0), lengths=lengths, reverse=True)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_vmap_over_weights_and_over_inputs(rng, np_rng):
    n = 3
    stacked = jax.vmap(lambda k: init_lstm(k, IN, HID))(jax.random.split(rng, n))
    xs, _, _ = _inputs(np_rng)
    ys = jax.vmap(lambda w: lstm_scan(w, xs, lengths=LENGTHS)[0])(stacked)
    for e in range(n):
        single = jax.tree.map(lambda a, e=e: a[e], stacked)
        np.testing.assert_allclose(ys[e], lstm_scan(single, xs, lengths=LENGTHS)[0], atol=1e-6)

    weights = jax.tree.map(lambda a: a[0], stacked)
    many = jnp.asarray(np_rng.normal(size=(n, B, T, IN)), jnp.float32)
    many_lengths = jnp.asarray(np_rng.integers(0, T + 1, size=(n, B)), jnp.int32)
    fn = jax.jit(lambda x, n_: lstm_scan(weights, x, lengths=n_, reverse=True))
    ys, (h, _) = jax.vmap(fn)(many, many_lengths)
    for e in range(n):
        want_ys, (want_h, _) = fn(many[e], many_lengths[e])
        np.testing.assert_allclose(ys[e], want_ys, atol=1e-6)
        np.testing.assert_allclose(h[e], want_h, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_check_grads(rng, np_rng, reverse):
    batch, steps, in_size, hidden = 2, 3, 3, 5
    weights = init_lstm(rng, in_size, hidden)
    xs, h0, c0 = _inputs(np_rng, batch, steps, in_size, hidden)
    lengths = np.array([3, 2])
    f = lambda w, x, h, c: lstm_scan(w, x, (h, c), lengths=lengths, reverse=reverse)
    args = (weights, xs, h0, c0)
    check_grads(jax.jit(f), args, order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


# --- dropout, dtypes, init -----------------------------------------------------------------


def test_dropout_only_between_layers(rng, np_rng):
    layers = init_lstm_stack(rng, IN, HID, num_layers=2)
    xs, _, _ = _inputs(np_rng)
    ys0, (h0, c0) = lstm_stack(layers, xs, dropout_rate=0.5, rng=rng)  # deterministic default
    ys1, (h1, c1) = lstm_stack(layers, xs, dropout_rate=0.5, rng=rng, deterministic=False)
    np.testing.assert_array_equal(ys0, lstm_stack(layers, xs)[0])
    # Layer 0's states see no dropout; layer 1 reads dropped outputs; the last layer's
    # outputs are not dropped (no exact zeros), as in torch.nn.LSTM.
    np.testing.assert_array_equal(h1[0], h0[0])
    np.testing.assert_array_equal(c1[0], c0[0])
    assert not np.allclose(h1[1], h0[1])
    assert np.all(ys1 != 0)
    single = init_lstm_stack(rng, IN, HID)
    np.testing.assert_array_equal(
        lstm_stack(single, xs, dropout_rate=0.5, rng=rng, deterministic=False)[0],
        lstm_stack(single, xs)[0],
    )


def test_dropout_between_layers_matches_numpy(rng, np_rng):
    # Layer 1 reads layer 0's float64 outputs times an inverted-dropout mask (0 or
    # 1 / (1 - rate)); the stack draws that mask from the second half of split(rng).
    rate = 0.5
    layers = init_lstm_stack(rng, IN, HID, num_layers=2)
    xs, _, _ = _inputs(np_rng)
    ys, (h_n, c_n) = lstm_stack(layers, xs, dropout_rate=rate, rng=rng, deterministic=False)
    _, sub = jax.random.split(rng)
    keep = np.asarray(dropout(sub, jnp.ones((B, T, HID)), rate)) != 0  # that key's mask
    assert 0 < keep.mean() < 1
    zeros = np.zeros((B, HID))
    ys0, _ = reference_lstm(layers[0], xs, zeros, zeros)
    want, (h1, c1) = reference_lstm(layers[1], ys0 * keep / (1.0 - rate), zeros, zeros)
    np.testing.assert_allclose(ys, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h_n[1], h1, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(c_n[1], c1, atol=1e-5, rtol=1e-5)


def test_bfloat16_inputs_compute_in_bfloat16(rng, np_rng):
    weights = init_lstm(rng, IN, HID)
    xs, _, _ = _inputs(np_rng)
    ys, (h, c) = lstm_scan(weights, xs.astype(jnp.bfloat16), lengths=LENGTHS)
    assert ys.dtype == h.dtype == c.dtype == jnp.bfloat16
    ys32, _ = lstm_scan(weights, xs, lengths=LENGTHS)
    np.testing.assert_allclose(ys.astype(jnp.float32), ys32, atol=5e-2)


def _saturating_cell_inputs(dtype, reach):
    """Weights with zero matrices and biases from -reach to reach, so that each gate
    column's pre-activation is its bias: the sigmoids reach into both tails."""
    bias = np.linspace(-reach, reach, 4 * HID)
    weights = LSTMWeights(
        jnp.zeros((IN, 4 * HID)), jnp.zeros((HID, 4 * HID)), jnp.asarray(bias, jnp.float32)
    )
    x = jnp.zeros((B, IN), dtype)
    c0 = jnp.asarray(np.linspace(-2.0, 2.0, B * HID).reshape(B, HID), dtype)
    h0 = jnp.zeros((B, HID), dtype)
    return weights, x, (h0, c0)


def test_cell_gates_in_the_sigmoid_tails(rng):
    # The kernel takes the sigmoids as (1 + tanh(x / 2)) / 2 (one tanh over all four
    # gates): absolute error of a few float32 spacings of 1, even where sigmoid(x) ~ 1e-13.
    weights, x, (h0, c0) = _saturating_cell_inputs(jnp.float32, reach=30.0)
    h, c = lstm_cell(weights, (h0, c0), x)
    _, (h_ref, c_ref) = reference_lstm(weights, x[:, None], h0, c0)
    np.testing.assert_allclose(c, c_ref, atol=4e-7, rtol=0)
    np.testing.assert_allclose(h, h_ref, atol=4e-7, rtol=0)
    # One tanh for the gates [B, 4h] and one for tanh(c) [B, h]; no separate sigmoids.
    jaxpr = jax.make_jaxpr(lstm_cell)(weights, (h0, c0), x)
    eqns = [e for e in jaxpr.jaxpr.eqns for e in [e, *_inner_eqns(e)]]
    assert not [e for e in eqns if e.primitive.name == "logistic"]
    tanh_shapes = sorted(e.outvars[0].aval.shape for e in eqns if e.primitive.name == "tanh")
    assert tanh_shapes == [(B, HID), (B, 4 * HID)]


def _inner_eqns(eqn):
    for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        inner = getattr(inner, "jaxpr", inner)
        for e in getattr(inner, "eqns", []):
            yield e
            yield from _inner_eqns(e)


def test_bfloat16_cell_keeps_small_gates(rng):
    # A bfloat16 tanh rounds 0.5 * tanh(-4) + 0.5 to 0 (its spacing near 1 is 2^-8):
    # the gates are computed in float32 and rounded once, so a gate of sigmoid(-8) ~ 3e-4
    # keeps bfloat16's relative precision. (In float32 that form's relative error is
    # about 6e-8 / sigmoid(x), so the test above bounds the absolute error instead.)
    weights, x, (h0, c0) = _saturating_cell_inputs(jnp.bfloat16, reach=8.0)
    h, c = lstm_cell(weights, (h0, c0), x)
    assert h.dtype == c.dtype == jnp.bfloat16
    h0_ref, c0_ref = (np.asarray(a, np.float64) for a in (h0, c0))
    _, (h_ref, c_ref) = reference_lstm(weights, x[:, None], h0_ref, c0_ref)
    # bfloat16 carries 8 significant bits: relative error within a few units of 2^-8.
    np.testing.assert_allclose(np.asarray(c, np.float64), c_ref, rtol=3e-2, atol=1e-30)
    np.testing.assert_allclose(np.asarray(h, np.float64), h_ref, rtol=3e-2, atol=1e-30)


def test_init_matches_torch_ranges(rng, assert_independent_draws):
    k = 1.0 / np.sqrt(HID)
    w = init_lstm(rng, IN, HID)
    assert_independent_draws(w)  # w_hh from w_ih's key would be w_ih's leading rows
    assert (w.w_ih.shape, w.w_hh.shape, w.b.shape) == ((IN, 4 * HID), (HID, 4 * HID), (4 * HID,))
    for a, bound in [(w.w_ih, k), (w.w_hh, k), (w.b, 2 * k)]:
        assert a.dtype == jnp.float32
        assert np.all(np.abs(a) <= bound) and np.max(np.abs(a)) > 0.5 * bound
    shifted = init_lstm(rng, IN, HID, forget_bias=1.0)
    delta = np.asarray(shifted.b - w.b)
    np.testing.assert_allclose(delta[HID : 2 * HID], 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.delete(delta, np.s_[HID : 2 * HID]), 0.0)
    np.testing.assert_array_equal(shifted.w_ih, w.w_ih)
    # PyTorch's effective bias, bias_ih + bias_hh: the sum of two independent U(-k, k),
    # variance 2k²/3 (one draw doubled would be uniform on [-2k, 2k], variance 4k²/3).
    wide = init_lstm(rng, 3, 512)
    np.testing.assert_allclose(np.var(wide.b), 2 / (3 * 512), rtol=0.1)  # 2048 samples


def test_init_lstm_stack_structure(rng, assert_independent_draws):
    layers = init_lstm_stack(rng, IN, HID, num_layers=3, bidirectional=True)
    assert len(layers) == 3 and all(isinstance(w, BidirectionalWeights) for w in layers)
    assert layers[0].forward.w_ih.shape == (IN, 4 * HID)
    assert layers[1].backward.w_ih.shape == (2 * HID, 4 * HID)
    assert_independent_draws(*layers)  # each layer and direction its own key
    uni = init_lstm_stack(rng, IN, HID, num_layers=2, dtype=jnp.bfloat16)
    assert all(isinstance(w, LSTMWeights) for w in uni)
    assert uni[1].w_ih.shape == (HID, 4 * HID) and uni[1].b.dtype == jnp.bfloat16


@pytest.mark.parametrize("implementation", ["scan", "autodiff"])
@pytest.mark.parametrize("hoist", [False, True])
def test_input_size_zero(rng, np_rng, implementation, hoist, monkeypatch):
    """init_lstm accepts input_size=0 (a recurrence driven by its state alone); the
    projection x W_ih of [B, T, 0] inputs must be b, not a reshape error. ``hoist`` is
    the accelerator path (one projection of all T steps), forced here on CPU."""
    import jaxattn.ops.lstm as lstm_module

    monkeypatch.setattr(lstm_module, "_hoist", lambda: hoist)
    w = init_lstm(rng, 0, HID)
    _, h0, c0 = _inputs(np_rng)
    xs = jnp.zeros((B, T, 0))
    ys, (h, c) = lstm_scan(w, xs, (h0, c0), implementation=implementation)
    state, want = (h0, c0), []
    for _ in range(T):
        state = lstm_cell(w, state, jnp.zeros((B, 0)))
        want.append(state[0])
    np.testing.assert_allclose(ys, jnp.stack(want, 1), atol=1e-6)
    np.testing.assert_allclose(h, state[0], atol=1e-6)
    np.testing.assert_allclose(c, state[1], atol=1e-6)

    def loss(w):
        return lstm_scan(w, xs, (h0, c0), implementation=implementation)[0].sum()

    grads = jax.grad(loss)(w)
    assert grads.w_ih.shape == (0, 4 * HID) and bool(jnp.all(jnp.isfinite(grads.b)))


# --- bad inputs ----------------------------------------------------------------------------


def test_bad_inputs_raise(rng):
    w = init_lstm(rng, IN, HID)
    xs = jnp.zeros((B, T, IN))
    zeros = jnp.zeros((B, HID))
    with pytest.raises(ValueError, match=r"xs must be \[B, T, I=5\].*\(3, 7, 4\)"):
        lstm_scan(w, jnp.zeros((B, T, 4)))
    with pytest.raises(ValueError, match="xs must be"):
        lstm_scan(w, jnp.zeros((T, IN)))
    with pytest.raises(ValueError, match=r"w_hh must be \[h, 4h\], got \(11, 40\)"):
        lstm_scan(w._replace(w_hh=jnp.zeros((HID, 40))), xs)
    with pytest.raises(ValueError, match=r"b \(43,\)"):
        lstm_scan(w._replace(b=jnp.zeros((43,))), xs)
    with pytest.raises(ValueError, match=r"carry must be.*\(3, 13\)"):
        lstm_scan(w, xs, (zeros, jnp.zeros((B, 13))))
    with pytest.raises(ValueError, match=r"lengths must be integers of shape \[B\].*\(2,\)"):
        lstm_scan(w, xs, lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match=r"lengths must be integers.*float32"):
        lstm_scan(w, xs, lengths=np.array([1.0, 2.0, 3.0], np.float32))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=7\], got \[1, 8\]"):
        lstm_scan(w, xs, lengths=np.array([1, 8, 3]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=7\], got \[-1, 3\]"):
        lstm_scan(w, xs, lengths=np.array([1, -1, 3]))
    # Checked before jnp.asarray, which (64-bit types off) would wrap 2**32 + 3 to 3.
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=7\], got \[1, 4294967299\]"):
        lstm_scan(w, xs, lengths=np.array([1, 2**32 + 3, 3]))
    with pytest.raises(ValueError, match=r"x must be \[B, I=5\], got \(3, 6\)"):
        lstm_cell(w, (zeros, zeros), jnp.zeros((B, 6)))
    with pytest.raises(ValueError, match=r"carry must be.*\(2, 11\)"):
        lstm_cell(w, (jnp.zeros((2, HID)), zeros), jnp.zeros((B, IN)))
    # Integer inputs (token ids where embeddings belong) are named, not failed on deep inside.
    with pytest.raises(ValueError, match=r"lstm_scan: xs must be floating.*int32"):
        lstm_scan(w, jnp.zeros((B, T, IN), jnp.int32))
    with pytest.raises(ValueError, match=r"lstm_cell: x must be floating.*bool"):
        lstm_cell(w, (zeros, zeros), jnp.zeros((B, IN), bool))
    with pytest.raises(ValueError, match=r"init_lstm: hidden_size must be an int >= 1, got 0"):
        init_lstm(rng, IN, 0)
    # Weights that are not LSTMWeights (a bare tuple, a restored dict) are named, not failed
    # on inside the scan ("'tuple' object has no attribute 'w_hh'", a dict's keys unpacked).
    for bad, name in ((tuple(w), "tuple"), (w._asdict(), "dict")):
        with pytest.raises(TypeError, match=f"lstm_scan: weights must be LSTMWeights.*{name}"):
            lstm_scan(bad, xs)
        with pytest.raises(TypeError, match=f"lstm_cell: weights must be LSTMWeights.*{name}"):
            lstm_cell(bad, (zeros, zeros), jnp.zeros((B, IN)))
        with pytest.raises(TypeError, match="bidirectional_lstm: weights must be LSTMWeights"):
            bidirectional_lstm(BidirectionalWeights(bad, w), xs)


def test_bad_stack_inputs_raise(rng):
    bi = init_lstm_stack(rng, IN, HID, num_layers=2, bidirectional=True)
    xs = jnp.zeros((B, T, IN))
    with pytest.raises(ValueError, match=r"carry must be \(h_0 \(4, 3, 11\)"):
        lstm_stack(bi, xs, (jnp.zeros((2, B, HID)), jnp.zeros((2, B, HID))))
    # Unbatched xs [T, I] is named as such, not blamed on a correct carry (whose expected
    # shape was built from xs.shape[0] = T).
    good = (jnp.zeros((4, B, HID)), jnp.zeros((4, B, HID)))
    with pytest.raises(ValueError, match=r"lstm_stack: xs must be \[B, T, I\], got \(7, 5\)"):
        lstm_stack(bi, jnp.zeros((T, IN)), good)
    with pytest.raises(ValueError, match="mixed uni- and bidirectional"):
        lstm_stack((bi[0], bi[1].forward), xs)
    # Layer 0's input size, named by lstm_stack (was bidirectional_lstm's / lstm_scan's).
    with pytest.raises(ValueError, match=r"lstm_stack: xs \(3, 7, 4\) must be .* layer 0's I = 5"):
        lstm_stack(bi, jnp.zeros((B, T, IN - 1)))
    with pytest.raises(TypeError, match=r"lstm_stack: layers must be LSTMWeights"):
        lstm_stack((tuple(bi[0].forward),), xs)  # was "'tuple' object has no attribute"
    with pytest.raises(ValueError, match="no layers"):
        lstm_stack((), xs)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\), got 1.0"):
        lstm_stack(bi, xs, dropout_rate=1.0)
    with pytest.raises(ValueError, match="needs an rng key"):
        lstm_stack(bi, xs, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match=r"lstm_stack: xs \(3, 7, 5\) must be .* I = 22"):
        lstm_stack((bi[1],), xs)
    lopsided = BidirectionalWeights(bi[0].forward, bi[1].backward)
    with pytest.raises(ValueError, match="direction shapes differ"):
        bidirectional_lstm(lopsided, xs)
    for bad in (0, 2.0, True):  # 2.0 was range()'s TypeError, True built one layer
        with pytest.raises(ValueError, match=f"num_layers must be an int >= 1, got {bad}"):
            init_lstm_stack(rng, IN, HID, num_layers=bad)
    # A switch given as a string ("no" from a config file) was taken as on.
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match=f"bidirectional must be a bool, got {bad!r}"):
            init_lstm_stack(rng, IN, HID, bidirectional=bad)
        with pytest.raises(ValueError, match=f"lstm_scan: reverse must be a bool, got {bad!r}"):
            lstm_scan(bi[0].forward, xs, reverse=bad)
    init_lstm_stack(rng, IN, HID, bidirectional=np.bool_(True))  # NumPy's bool is a bool
    # A later layer that does not fit the one before it is named before any layer runs.
    uni = init_lstm_stack(rng, IN, HID, num_layers=2)
    wide = init_lstm_stack(rng, 7, HID)[0]  # reads 7 features, not layer 0's h = 11
    with pytest.raises(ValueError, match=r"layer 1 has w_ih \(7, 44\) .* I = 11 .* h = 11"):
        lstm_stack((uni[0], wide), xs)
    other_h = init_lstm_stack(rng, HID, 6)[0]  # h = 6 where layer 0 has 11
    with pytest.raises(ValueError, match=r"layer 1 has w_ih \(11, 24\) and w_hh \(6, 24\)"):
        lstm_stack((uni[0], other_h), xs)
    half = init_lstm_stack(rng, HID, HID, bidirectional=True)[0]  # reads h, not 2h
    with pytest.raises(ValueError, match=r"needs I = 22 \(2 x layer 0's h = 11\)"):
        lstm_stack((bi[0], half), xs)


# --- implementations: hand-written backward, cuDNN packing ----------------------------------


@pytest.mark.parametrize(
    "hoist, lengths, reverse",
    [(False, None, False), (False, None, True), (False, np.array([7, 0, 4]), False)]
    + [(hoist, np.array([7, 0, 4]), True) for hoist in [False, True]]
    + [(True, None, False)],
)
def test_custom_backward_matches_autodiff_of_the_scan(
    rng, np_rng, monkeypatch, reverse, lengths, hoist
):
    """The hand-written backward ("scan") equals jax.grad of the plain scan ("autodiff"),
    with the input projection per step (CPU) and hoisted out of the loop (accelerators)."""
    monkeypatch.setattr(lstm_module, "_hoist", lambda: hoist)
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    cts = (
        jnp.asarray(np_rng.normal(size=(B, T, HID)), jnp.float32),
        (
            jnp.asarray(np_rng.normal(size=(B, HID)), jnp.float32),
            jnp.asarray(np_rng.normal(size=(B, HID)), jnp.float32),
        ),
    )

    def vjp(implementation):
        f = lambda w, x, h, c: lstm_scan(
            w, x, (h, c), lengths=lengths, reverse=reverse, implementation=implementation
        )
        out, pullback = jax.vjp(jax.jit(f), weights, xs, h0, c0)
        return out, pullback(cts)

    (out, grads), (out_ref, grads_ref) = vjp("scan"), vjp("autodiff")
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    if lengths is not None:  # a row of length 0 passes its carry's gradient straight through
        np.testing.assert_array_equal(grads[2][1], cts[1][0][1])
        np.testing.assert_array_equal(grads[1][1], 0.0)


@pytest.mark.parametrize("hoist", [False, True])
def test_custom_backward_over_no_steps(rng, np_rng, monkeypatch, hoist):
    """T = 0: zero weight gradients and the carry's cotangent passed straight through, as
    autodiff gives (the hand-written backward sliced step 0 of an empty gate buffer)."""
    monkeypatch.setattr(lstm_module, "_hoist", lambda: hoist)
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng, steps=0)
    loss = lambda w, h, c, impl: jnp.sum(lstm_scan(w, xs, (h, c), implementation=impl)[1][0] ** 2)
    got = jax.grad(loss, argnums=(0, 1, 2))(weights, h0, c0, "scan")
    want = jax.grad(loss, argnums=(0, 1, 2))(weights, h0, c0, "autodiff")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got[1], 2 * h0)


@pytest.mark.parametrize("hoist", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_custom_backward_writes_dz_over_the_saved_gates(rng, monkeypatch, reverse, hoist):
    """The backward's dz takes the saved gates' [T, B, 4h] buffer, step by step, in place:
    the gradient's temporary memory holds one such buffer, not two (on CPU each fresh page
    costs a fault), and XLA does not copy the buffer inside the loop, as it does when a
    step reads its gates from the buffer after another reader was scheduled."""
    monkeypatch.setattr(lstm_module, "_hoist", lambda: hoist)
    batch, steps, hidden = 8, 50, 32
    weights = init_lstm(rng, 16, hidden)
    xs = jnp.zeros((batch, steps, 16))
    loss = lambda w, x: jnp.sum(lstm_scan(w, x, reverse=reverse, implementation="scan")[0])
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(weights, xs).compile()
    gates_bytes = steps * batch * 4 * hidden * 4  # one float32 [T, B, 4h]
    # Before: 3.0x (gates, dz and the state stacks); now 2.05x. Hoisted, the projected
    # inputs are one more: 4.8x before, now 3.8x.
    bound = 4.3 if hoist else 2.5
    assert compiled.memory_analysis().temp_size_in_bytes < bound * gates_bytes
    stack = f"f32[{steps},{batch},{4 * hidden}]"
    assert not re.search(rf"= {re.escape(stack)}\S* copy\(", compiled.as_text())


@pytest.mark.parametrize("implementation", ["scan", "autodiff"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("hoist", [False, True])
def test_nonfinite_padding_does_not_reach_the_gradients(
    rng, np_rng, monkeypatch, implementation, reverse, hoist
):
    """NaN or inf past a row's length (NaN-padded features, a float16 overflow) is never
    read, as by PyTorch's packed LSTM: gradients equal those of zero padding. Before, the
    padded steps' NaN gates times a zero cotangent made every weight gradient NaN."""
    monkeypatch.setattr(lstm_module, "_hoist", lambda: hoist)
    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    padded = np.arange(T)[None, :] >= LENGTHS[:, None]  # [B, T]
    probe = jnp.asarray(np_rng.normal(size=(B, T, HID)), jnp.float32)

    def loss(w, x, h, c):
        ys, (h_n, c_n) = lstm_scan(
            w, x, (h, c), lengths=LENGTHS, reverse=reverse, implementation=implementation
        )
        return jnp.sum(ys * probe) + jnp.sum(h_n * c_n)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    want = grad(weights, jnp.where(padded[..., None], 0.0, xs), h0, c0)
    for pad in [np.nan, np.inf]:
        got = grad(weights, jnp.where(padded[..., None], pad, xs), h0, c0)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_custom_backward_in_bfloat16(rng, np_rng):
    weights = init_lstm(rng, IN, HID)
    xs = jnp.asarray(np_rng.normal(size=(B, T, IN)), jnp.float32)
    loss = lambda w, x: jnp.sum(lstm_scan(w, x, lengths=LENGTHS)[0].astype(jnp.float32))
    g16 = jax.grad(loss)(weights, xs.astype(jnp.bfloat16))
    g32 = jax.grad(loss)(weights, xs)
    for a, b in zip(g16, g32):
        assert a.dtype == jnp.float32  # gradients of float32 weights stay float32
        np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.max(jnp.abs(b))))


def _lstm_ref_fn(x, h0, c0, packed, n, in_size, hidden, layers, dropout, bidirectional):
    """``jax.experimental.rnn.lstm``'s CPU reference, reading the same packed weights."""
    rnn = pytest.importorskip("jax.experimental.rnn")
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(packed, in_size, hidden, layers, bidirectional)
    args = (n, in_size, hidden, layers, dropout, bidirectional)
    return rnn.lstm_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *args)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, np.array([7, 2, 5])])
def test_cudnn_weight_packing_against_jax_reference(rng, np_rng, reverse, lengths):
    """Our weights packed into cuDNN's flat layout give our numbers through jax's reference.

    The reference unpacks with ``rnn.unpack_lstm_weights`` (independent of our packing);
    the reverse-only case checks our per-row flip. (Its reference mishandles length 0, so
    that case is covered by the GPU test.)
    """
    from jaxattn.ops.lstm import _cudnn_layer

    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    n = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    # Highest precision: on a GPU both sides would otherwise use TF32 matmuls (~1e-4 apart).
    with jax.default_matmul_precision("highest"):
        ys, [(h, c)] = _cudnn_layer([weights], xs, [(h0, c0)], n, reverse, lstm_fn=_lstm_ref_fn)
        ys_want, (h_want, c_want) = lstm_scan(weights, xs, (h0, c0), lengths=n, reverse=reverse)
    np.testing.assert_allclose(ys, ys_want, atol=1e-5)
    np.testing.assert_allclose(h, h_want, atol=1e-5)
    np.testing.assert_allclose(c, c_want, atol=1e-5)


def test_cudnn_bidirectional_packing_against_jax_reference(rng, np_rng):
    from jaxattn.ops.lstm import _cudnn_layer

    layer = init_lstm_stack(rng, IN, HID, bidirectional=True)[0]
    xs, h0, c0 = _inputs(np_rng)
    carries = [(h0, c0), (c0, h0)]
    n = jnp.asarray(LENGTHS, jnp.int32)
    with jax.default_matmul_precision("highest"):  # no TF32 on a GPU, as above
        ys, finals = _cudnn_layer(list(layer), xs, carries, n, lstm_fn=_lstm_ref_fn)
        ys_want, finals_want = bidirectional_lstm(layer, xs, tuple(carries), lengths=n)
    np.testing.assert_allclose(ys, ys_want, atol=1e-5)
    for a, b in zip(jax.tree.leaves(finals), jax.tree.leaves(finals_want)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_cudnn_layer_keeps_the_initial_state_of_an_empty_row(rng, np_rng, reverse):
    """cuDNN leaves a row of length 0 unspecified (jax's reference reads its state at step
    -1); ``_cudnn_layer`` gives it zero outputs and its initial state, as the scan does.
    Checked against the float64 NumPy reference on CPU, not only by the GPU test."""
    from jaxattn.ops.lstm import _cudnn_layer

    weights = init_lstm(rng, IN, HID)
    xs, h0, c0 = _inputs(np_rng)
    lengths = np.array([7, 0, 4])
    with jax.default_matmul_precision("highest"):  # no TF32 on a GPU, as above
        ys, [(h, c)] = _cudnn_layer(
            [weights],
            xs,
            [(h0, c0)],
            jnp.asarray(lengths, jnp.int32),
            reverse,
            lstm_fn=_lstm_ref_fn,
        )
    ys_ref, (h_ref, c_ref) = reference_lstm(weights, xs, h0, c0, lengths, reverse)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5)
    np.testing.assert_allclose(c, c_ref, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cudnn_matches_scan_on_gpu(rng, np_rng, bidirectional):
    layers = init_lstm_stack(rng, IN, HID, num_layers=2, bidirectional=bidirectional)
    xs, _, _ = _inputs(np_rng)
    lengths = jnp.asarray([7, 0, 4], jnp.int32)

    def loss_and_grads(implementation):
        def loss(layers, xs):
            ys, (h_n, c_n) = lstm_stack(layers, xs, lengths=lengths, implementation=implementation)
            return jnp.sum(ys * ys) + jnp.sum(h_n) + jnp.sum(c_n * c_n)

        with jax.default_matmul_precision("highest"):  # no TF32, to compare with float32
            return jax.value_and_grad(loss, argnums=(0, 1))(layers, xs)

    got, want = loss_and_grads("cudnn"), loss_and_grads("scan")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_implementation_choice(rng):
    w = init_lstm(rng, IN, HID)
    xs = jnp.zeros((B, T, IN))
    with pytest.raises(ValueError, match=r"implementation must be one of .* got 'pallas'"):
        lstm_scan(w, xs, implementation="pallas")
    bf16 = xs.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"implementation='cudnn' needs a GPU .*bfloat16"):
        lstm_scan(w, bf16, implementation="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU backend"):
            lstm_stack((w,), xs, implementation="cudnn")
        with pytest.raises(ValueError, match="needs a GPU backend"):
            bidirectional_lstm(BidirectionalWeights(w, w), xs, implementation="cudnn")
    # Forward mode needs the differentiable scan: "autodiff" supports jax.jvp, and the
    # default's refusal names the fix (JAX's own message names nothing).
    ys, tangent = jax.jvp(lambda x: lstm_scan(w, x, implementation="autodiff")[0], (xs,), (xs,))
    assert ys.shape == tangent.shape == (B, T, HID)
    with pytest.raises(TypeError, match=r"implementation='scan' \(the default\).*jax\.jvp.*"
                       r"pass implementation='autodiff'"):  # fmt: skip
        jax.jvp(lambda x: lstm_scan(w, x)[0], (xs,), (xs,))


def test_lstm_stack_takes_nested_lists_as_lstm_scan_does(rng, np_rng):
    """``lstm_scan`` converts ``xs`` with ``jnp.asarray``; ``lstm_stack`` read ``xs.ndim``
    first and failed on a list with "'list' object has no attribute 'ndim'"."""
    layers = init_lstm_stack(rng, IN, HID, num_layers=2)
    xs = np_rng.normal(size=(B, T, IN)).astype(np.float32)
    ys, (h, c) = lstm_stack(layers, xs.tolist())
    ys_want, (h_want, c_want) = lstm_stack(layers, jnp.asarray(xs))
    np.testing.assert_allclose(ys, ys_want)
    np.testing.assert_allclose(h, h_want)
    np.testing.assert_allclose(c, c_want)


def test_integer_weights_and_a_carry_that_is_not_a_pair_are_named(rng):
    # An int32 w_ih was cast back to the compute dtype and ran silently; a None carry
    # failed as "object of type 'NoneType' has no len()", naming neither.
    w = init_lstm(rng, IN, HID)
    xs, zeros = jnp.zeros((B, T, IN)), jnp.zeros((B, HID))
    bad = w._replace(w_ih=w.w_ih.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"lstm_scan: weights must be floating.*\.w_ih int32"):
        lstm_scan(bad, xs)
    with pytest.raises(ValueError, match=r"lstm_cell: weights must be floating.*\.w_ih int32"):
        lstm_cell(bad, (zeros, zeros), xs[:, 0])
    with pytest.raises(ValueError, match=r"lstm_stack: layer 0: weights must be floating"):
        lstm_stack((bad,), xs)
    for carry, got in ((None, "NoneType"), ((zeros,), "a tuple of 1")):
        with pytest.raises(ValueError, match=rf"lstm_cell: carry must be a pair .*got {got}"):
            lstm_cell(w, carry, xs[:, 0])
    with pytest.raises(ValueError, match=r"lstm_stack: carry must be a pair .*got a list of 3"):
        lstm_stack((w,), xs, [zeros[None]] * 3)  # (None: zeros, as lstm_scan's)
    with pytest.raises(
        ValueError, match=r"bidirectional_lstm: carry must be a pair .*a tuple of 3"
    ):
        bidirectional_lstm(BidirectionalWeights(w, w), xs, (None,) * 3)
    # An array of leading size 2 unpacks as (h, c), as before.
    stacked = lstm_cell(w, jnp.stack([zeros, zeros]), xs[:, 0])
    for a, b in zip(stacked, lstm_cell(w, (zeros, zeros), xs[:, 0])):
        np.testing.assert_array_equal(a, b)
