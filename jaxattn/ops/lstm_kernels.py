"""LSTM kernels behind ``jaxattn.ops.lstm``: the scan with a hand-written backward, the
scan differentiated by JAX, and cuDNN's fused LSTM.

Shape glossary: B batch, T time, I input features, h hidden size.

The formula and the public functions are in ``lstm.py``; this file holds how the
recurrence runs. The hand-written backward (``jax.custom_vjp``): the forward saves the
activated gates ``[T, B, 4h]`` and the states; a reverse loop carries only ``(dh, dc)``
and overwrites each step's gates with the gate pre-activation gradients ``dz`` (one
``[T, B, 4h]`` buffer for both: on CPU every fresh page of a temporary costs a page
fault, about 3% of forward + backward here); the weight gradients are then single
matmuls over all T*B rows (``dW_hh = h_prev^T dz``, ``dW_ih = x^T dz``,
``dxs = dz W_ih^T``) instead of T small accumulations inside the loop.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jaxattn.ops.layers import project, to_rank

if TYPE_CHECKING:
    from jaxattn.ops.lstm import LSTMWeights

Array = jax.Array
Carry = tuple[Array, Array]


def _cell(w_hh: Array, carry: Carry, gx: Array) -> tuple[Array, Carry]:
    """The LSTM formula, given ``gx = x_t W_ih + b: [B, 4h]``.

    Returns the activated gates ``[B, 4h]`` (i, f, g, o along the last axis; the
    hand-written backward needs them) and the new state ``(h, c)``.
    """
    return _activate(gx + carry[0] @ w_hh, carry[1])


def _activate(z: Array, c: Array) -> tuple[Array, Carry]:
    """Gates ``[B, 4h]`` and new state from ``z = x_t W_ih + h W_hh + b: [B, 4h]``.

    All four gates come from one ``tanh`` over the whole row, with ``sigmoid(x) = (1 +
    tanh(x / 2)) / 2`` on the i, f and o blocks: one elementwise pass writes the gates as
    the backward stores them, where three sigmoids and a tanh over the split blocks
    took four passes and a concatenation (XLA:CPU: 1-5% less forward + backward time at
    B=64, T=200, I=256, h=512; benchmarks/README.md, LSTM). Its error is absolute, not
    relative: a few float32 spacings of 1 (about 1.6e-7 on XLA:CPU, against 9e-8 for
    ``jax.nn.sigmoid``; below the rounding of the matmul that made ``z``). So half
    precision computes it in float32 and rounds once: a bfloat16 tanh would round every
    sigmoid to a multiple of 2^-9.
    """
    hidden = z.shape[-1] // 4
    work = jnp.float32 if z.dtype.itemsize < 4 else z.dtype
    # Per column: 1/2 on the sigmoid blocks (i, f, o), 1 on the tanh block (g).
    is_g = jnp.arange(4 * hidden) // hidden == 2
    scale = to_rank(jnp.where(is_g, 1.0, 0.5).astype(work), z.ndim)  # [1, 4h]
    offset = to_rank(jnp.where(is_g, 0.0, 0.5).astype(work), z.ndim)
    gates = (scale * jnp.tanh(scale * z.astype(work)) + offset).astype(z.dtype)
    i, f, g, o = jnp.split(gates, 4, axis=-1)  # each [B, h]
    c = f * c + i * g
    return gates, (o * jnp.tanh(c), c)


def _step(w_hh: Array, carry: Carry, gx: Array) -> Carry:
    return _cell(w_hh, carry, gx)[1]


# Jitted so that eager callers (notebooks, tests) reuse one compiled scan per shape
# instead of re-tracing the closure on every call; under an outer jit it is inlined.
@functools.partial(jax.jit, static_argnames="reverse")
def _scan_autodiff(
    weights: LSTMWeights, xs: Array, carry: Carry, lengths: Array | None, reverse: bool
) -> tuple[Array, Carry]:
    """``lstm_scan`` on checked inputs, differentiated by JAX; ``ys [T, B, h]``."""
    dtype = xs.dtype
    carry = (carry[0].astype(dtype), carry[1].astype(dtype))
    w_hh = weights.w_hh.astype(dtype)
    valid = _valid(lengths, xs.shape[1])
    # Time-major before the projection: the transpose moves I (not 4h) features per step.
    xs_t = _zero_padding(jnp.swapaxes(xs, 0, 1), valid)  # [T, B, I]
    gx = project(xs_t, weights.w_ih, weights.b)  # [T, B, 4h]
    (hs, _), carry = _forward(w_hh, gx, carry, valid, reverse)
    return _outputs(hs, valid), carry


# Whether "scan" hoists the input projection out of the loop. XLA:CPU runs the loop
# faster with x_t W_ih inside each step (about 25% less CPU time forward, 10% forward +
# backward at B=64, T=200, I=256, h=512, measured before the per-step product was fused
# with h W_hh; benchmarks/README.md): the hoisted [T*B, I] x [I, 4h] product streams a
# [T, B, 4h] buffer through memory, while a step's [B, 4h] stays in cache. Accelerators
# prefer the one big matmul.
def _hoist() -> bool:
    # Asked at call time, never at import: querying the backend initialises it, after
    # which jax.distributed.initialize can no longer join processes.
    return jax.default_backend() != "cpu"


@functools.partial(jax.jit, static_argnames=("reverse", "hoist"))
def _scan(
    weights: LSTMWeights,
    xs: Array,
    carry: Carry,
    lengths: Array | None,
    reverse: bool,
    hoist: bool,
) -> tuple[Array, Carry]:
    """``lstm_scan`` on checked inputs with the hand-written backward; ``ys [T, B, h]``."""
    dtype = xs.dtype
    carry = (carry[0].astype(dtype), carry[1].astype(dtype))
    valid = _valid(lengths, xs.shape[1])
    w_hh = weights.w_hh.astype(dtype)
    xs_t = _zero_padding(jnp.swapaxes(xs, 0, 1), valid)  # [T, B, I]
    if hoist:
        gx = project(xs_t, weights.w_ih, weights.b)  # [T, B, 4h]
        return _recurrence(None, w_hh, gx, carry, valid, reverse)
    proj = (weights.w_ih.astype(dtype), weights.b.astype(dtype))
    return _recurrence(proj, w_hh, xs_t, carry, valid, reverse)


def _valid(lengths: Array | None, steps: int) -> Array | None:
    if lengths is None:
        return None
    # Compare in int32: steps in a narrow dtype (uint8 lengths, T = 300) would wrap, and
    # a row would come back to life at t = 256.
    steps_t = jnp.arange(steps, dtype=jnp.int32)[:, None, None]  # [T, 1, 1]
    return steps_t < lengths.astype(jnp.int32)[None, :, None]  # [T, B, 1]


def _zero_padding(xs_t: Array, valid: Array | None) -> Array:
    """``xs_t: [T, B, I]`` with the steps past each row's length set to 0.

    Padded steps are computed and then discarded, so their values never reach the outputs;
    but a NaN or inf there (NaN-padded features, a float16 overflow) makes NaN gates, and
    the backward's zero cotangent times a NaN gate derivative is NaN in every weight
    gradient. PyTorch's packed LSTM never reads the padding; neither do these gradients.
    """
    return xs_t if valid is None else jnp.where(valid, xs_t, jnp.zeros_like(xs_t))


def _outputs(hs: Array, valid: Array | None) -> Array:
    """Outputs from the state sequence: zero where a row is past its length."""
    return hs if valid is None else jnp.where(valid, hs, jnp.zeros_like(hs))


def _forward(w_hh, gx, carry, valid, reverse, save_gates=False, proj=None):
    """Scan the recurrence: returns ``((hs, cs), final)`` or, with ``save_gates``, also
    the activated gates ``[T, B, 4h]`` (i, f, g, o along the last axis); ``hs, cs`` are
    the states after each step (a row past its length repeats its state). With ``proj =
    (w_ih, b)``, ``gx`` is the input ``[T, B, I]`` and each step computes ``[x_t, h]
    [W_ih; W_hh] + b``."""

    if proj is not None:
        # Both products of a step as one: [x_t, h] @ [W_ih; W_hh] (5-13% less forward
        # time on CPU than x_t W_ih + h W_hh, which makes two GEMM calls and an add pass).
        w_in_hh = jnp.concatenate([proj[0], w_hh])  # [I + h, 4h]

    def body(state: Carry, inputs: tuple[Array, Array | None]):
        gx_t, valid_t = inputs
        if proj is None:
            gates, new = _cell(w_hh, state, gx_t)
        else:
            x_h = jnp.concatenate([gx_t, state[0]], axis=-1)  # [B, I + h]
            gates, new = _activate(x_h @ w_in_hh + to_rank(proj[1], 2), state[1])
        if valid_t is not None:
            new = (jnp.where(valid_t, new[0], state[0]), jnp.where(valid_t, new[1], state[1]))
        # The gates as one [B, 4h] row: the backward overwrites it with dz (see there).
        return new, (new, gates) if save_gates else new

    # Reversed, a row is frozen at its initial carry until t = length - 1: exactly
    # PyTorch's packed reverse direction, with no flipping of the padded rows.
    final, per_step = jax.lax.scan(body, carry, (gx, valid), reverse=reverse)
    return (*per_step, final) if save_gates else (per_step, final)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _recurrence(proj, w_hh, gx, carry, valid, reverse):
    """``(ys [T, B, h], final)`` of the recurrence over ``gx: [T, B, 4h]``, or over the
    inputs ``[T, B, I]`` projected per step when ``proj = (w_ih, b)``."""
    (hs, _), final = _forward(w_hh, gx, carry, valid, reverse, proj=proj)
    return _outputs(hs, valid), final


def _recurrence_fwd(proj, w_hh, gx, carry, valid, reverse):
    (hs, cs), gates, final = _forward(w_hh, gx, carry, valid, reverse, True, proj)
    inputs = None if proj is None else gx
    return (_outputs(hs, valid), final), (proj, inputs, w_hh, gates, hs, cs, carry, valid)


def _before(seq: Array, first: Array, reverse: bool) -> Array:
    """The state before each step: ``seq`` shifted one step against the scan direction."""
    if reverse:
        return jnp.concatenate([seq, first[None]])[1:]  # [T, B, h]
    return jnp.concatenate([first[None], seq])[:-1]  # [T, B, h]


def _recurrence_bwd(reverse, residuals, cotangents):
    """Backward: a reverse loop carrying ``(dh, dc)`` that overwrites the saved gates
    ``[T, B, 4h]``, step by step, with the pre-activation gradients ``dz`` (no second
    ``[T, B, 4h]`` buffer); then ``dW_hh = h_prev^T dz`` as one matmul over T*B rows.
    With ``proj`` (the per-step projection, on CPU) ``dW_ih = x^T dz`` and ``dxs = dz
    W_ih^T`` are single matmuls here too; hoisted, ``dz`` is the cotangent of ``gx`` and
    ``project``'s backward forms them."""
    proj, xs_t, w_hh, gates, hs, cs, (h0, c0), valid = residuals
    dys, (dh_n, dc_n) = cotangents
    steps = hs.shape[0]
    h_prev, c_prev = _before(hs, h0, reverse), _before(cs, c0, reverse)
    w_hh_t = w_hh.T  # [4h, h]: the per-step matmul is then a plain dz @ w_hh_t

    def step_at(k):
        return k if reverse else steps - 1 - k  # against the forward's direction

    def body(k, state):
        dh, dc, buf, gates_t = state
        t = step_at(k)
        i, f, g, o = jnp.split(gates_t, 4, -1)
        c, c_before, dy = (jax.lax.dynamic_index_in_dim(a, t, 0, False) for a in (cs, c_prev, dys))
        dh_new, dc_new = dh + dy, dc  # cotangents of this step's new (h, c)
        if valid is not None:  # past a row's length the step is the identity
            valid_t = jax.lax.dynamic_index_in_dim(valid, t, keepdims=False)
            dh_new, dc_new = jnp.where(valid_t, dh_new, 0), jnp.where(valid_t, dc_new, 0)
        tanh_c = jnp.tanh(c)
        dc_new = dc_new + dh_new * o * (1 - tanh_c * tanh_c)
        dz = jnp.concatenate(
            [
                dc_new * g * i * (1 - i),
                dc_new * c_before * f * (1 - f),
                dc_new * i * (1 - g * g),
                dh_new * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )  # [B, 4h]
        dh_prev, dc_prev = dz @ w_hh_t, dc_new * f
        if valid is not None:
            dh_prev, dc_prev = jnp.where(valid_t, dh_prev, dh), jnp.where(valid_t, dc_prev, dc)
        buf = jax.lax.dynamic_update_index_in_dim(buf, dz, t, 0)
        # The next step's gates are read from the buffer after this write (other rows), so
        # the buffer's only reader is the write and XLA updates it in place; a read before
        # the write would make XLA copy the whole buffer every step.
        t_next = step_at(jnp.minimum(k + 1, steps - 1))
        return dh_prev, dc_prev, buf, jax.lax.dynamic_index_in_dim(buf, t_next, 0, False)

    if steps == 0:  # T = 0: no step to read (a 1-row slice of 0 rows fails); dz is empty
        dh0, dc0, dz = dh_n, dc_n, gates
    else:
        gates_first = jax.lax.dynamic_index_in_dim(gates, step_at(0), 0, False)
        dh0, dc0, dz, _ = jax.lax.fori_loop(0, steps, body, (dh_n, dc_n, gates, gates_first))
    # The weight gradients contract (t, b) as two axes, not as h_prev.reshape(-1, h).T @
    # dz_rows: XLA:CPU then copies h_prev (and x) to [h, T*B] and runs a plain product in
    # YNNPACK, where the transposed-operand form falls back to a slower Eigen kernel (115
    # against 141-150 GFLOP/s at [12800, 768]^T [12800, 2048]; fwd+bwd 3-7% faster;
    # benchmarks/README.md). tensordot keeps the axes in (t, b) order, so dz is read as
    # it lies ([T*B, 4h]); einsum would contract them as (b, t) and copy dz too.
    dw_hh = jnp.tensordot(h_prev, dz, axes=((0, 1), (0, 1)))  # [h, 4h]
    if proj is None:
        return None, dw_hh, dz, (dh0, dc0), None
    w_ih, _ = proj
    dw_ih = jnp.tensordot(xs_t, dz, axes=((0, 1), (0, 1)))  # [I, 4h]
    dxs = jnp.einsum("tbg,ig->tbi", dz, w_ih)  # [T, B, I]
    return (dw_ih, dz.sum((0, 1))), dw_hh, dxs, (dh0, dc0), None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def _cudnn_layer(directions, xs, carries, lengths, reverse=False, lstm_fn=None):
    """One layer (one or two directions, bidirectional when two) through cuDNN.

    ``jax.experimental.rnn.lstm`` takes PyTorch's weights (gate order i, f, g, o) packed
    into one flat vector: per direction ``W_ih [4h, I]`` then ``W_hh [4h, h]`` (row-major),
    then per direction ``b_ih`` and ``b_hh``; our single bias is ``b_ih`` and ``b_hh = 0``.
    A reverse-only run flips each row's valid prefix, runs forward and flips back.
    ``lstm_fn`` replaces ``rnn.lstm`` (tests run its reference on CPU).

    Returns ``(ys [B, T, dirs*h], [(h, c) per direction])``.
    """
    from jax.experimental import rnn  # imported late: only the cuDNN path needs it

    batch, steps, in_size = xs.shape
    hidden = directions[0].w_hh.shape[0]
    dirs = len(directions)
    packed = jnp.concatenate(
        [m for w in directions for m in (w.w_ih.T.ravel(), w.w_hh.T.ravel())]
        + [v for w in directions for v in (w.b, jnp.zeros_like(w.b))]
    )
    h0 = jnp.stack([c[0] for c in carries]).astype(xs.dtype)  # [dirs, B, h]
    c0 = jnp.stack([c[1] for c in carries]).astype(xs.dtype)
    n = jnp.full((batch,), steps, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    if reverse:
        # Position t of row b reads step n_b - 1 - t (t < n_b); the map is its own inverse.
        t = jnp.arange(steps, dtype=jnp.int32)[None, :]
        flip = jnp.where(t < n[:, None], n[:, None] - 1 - t, t)  # [B, T]
        xs = jnp.take_along_axis(xs, flip[:, :, None], axis=1)
    lstm_fn = rnn.lstm if lstm_fn is None else lstm_fn
    ys, h_n, c_n = lstm_fn(xs, h0, c0, packed, n, in_size, hidden, 1, 0.0, dirs == 2)
    if reverse:
        ys = jnp.take_along_axis(ys, flip[:, :, None], axis=1)
    if lengths is not None:
        # Our semantics for what cuDNN leaves unspecified: zero outputs past a row's
        # length, and the initial state for a row of length 0.
        mask = jnp.arange(steps)[None, :, None] < n[:, None, None]  # [B, T, 1]
        ys = jnp.where(mask, ys, jnp.zeros_like(ys))
        h_n = jnp.where((n == 0)[None, :, None], h0, h_n)
        c_n = jnp.where((n == 0)[None, :, None], c0, c_n)
    return ys, [(h_n[d], c_n[d]) for d in range(dirs)]
