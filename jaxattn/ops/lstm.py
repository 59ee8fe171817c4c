"""Long short-term memory: one cell, a scan over time, stacked and bidirectional layers.

Shape glossary: B batch, T time, I input features, h hidden size (also the name of the
hidden state in the formulas), L layers, dirs 1 or 2 directions.

The LSTM of Hochreiter & Schmidhuber (1997, "Long Short-Term Memory"), with the forget
gate of Gers et al. (2000), in PyTorch's gate order (i, f, g, o)::

    [i, f, g, o] = x_t W_ih + h_{t-1} W_hh + b          # each [B, h]; W_ih [I, 4h]
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)   # memory cell
    h_t = sigmoid(o) * tanh(c_t)                        # output / hidden state

``W_ih`` and ``W_hh`` are PyTorch's ``weight_ih_l0.T`` and ``weight_hh_l0.T``; ``b`` is
``bias_ih_l0 + bias_hh_l0`` (two biases that are only ever added are one bias).

Speed: ``x_t W_ih + b`` does not depend on the recurrence, so on accelerators
``lstm_scan`` computes it for all T steps as one ``[T*B, I] x [I, 4h]`` matmul before
``lax.scan``; each step then runs a single ``[B, h] x [h, 4h]`` matmul and splits the
result into the four gates. On CPU each step projects its own ``x_t`` instead (measured
faster on XLA:CPU; see ``_hoist``).

The backward is written by hand (``jax.custom_vjp``): the forward saves the activated
gates and the states, a reverse scan carries only ``(dh, dc)`` and emits the gate
pre-activation gradients ``dz: [T, B, 4h]``, and the weight gradients are then single
matmuls over all T*B rows (``dW_hh = h_prev^T dz``, ``dW_ih = x^T dz``, ``dxs = dz W_ih^T``)
instead of T small accumulations inside the scan. On GPU, float32 layers can run cuDNN's
fused LSTM (``implementation="cudnn"``, through ``jax.experimental.rnn``).
``benchmarks/lstm.py`` compares with Flax and PyTorch.

Padding: with ``lengths`` a row's steps ``t >= length`` leave its state unchanged and
output zeros, so the final state is PyTorch's on a ``pack_padded_sequence`` input; run in
reverse, such a row starts from its last valid step ``length - 1``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.ops.layers import dropout, project

Array = jax.Array
DType = jnp.dtype | type | str
Carry = tuple[Array, Array]


class LSTMWeights(NamedTuple):
    """One LSTM layer, gates in PyTorch order (i, f, g, o).

    ``w_ih: [I, 4h]``, ``w_hh: [h, 4h]``, ``b: [4h]`` (PyTorch's ``b_ih + b_hh``).
    """

    w_ih: Array
    w_hh: Array
    b: Array


class BidirectionalWeights(NamedTuple):
    """A bidirectional layer: one ``LSTMWeights`` per direction, same shapes."""

    forward: LSTMWeights
    backward: LSTMWeights


def init_lstm(
    rng: Array,
    input_size: int,
    hidden_size: int,
    *,
    forget_bias: float = 0.0,
    dtype: DType = jnp.float32,
) -> LSTMWeights:
    """Initialise one LSTM layer like ``torch.nn.LSTM``.

    Every entry of ``W_ih``, ``W_hh`` and of PyTorch's two biases is drawn from
    ``U(-k, k)``, ``k = 1/sqrt(h)``; ``b`` is the sum of the two bias draws, so it has the
    same (triangular) distribution as PyTorch's effective bias.

    Forget bias: Gers et al. (2000) and Jozefowicz et al. (2015, "An Empirical Exploration
    of Recurrent Network Architectures") add 1 to the forget-gate bias so that the cell
    remembers by default early in training. PyTorch does not; ``forget_bias`` (default 0,
    PyTorch's init) is added to ``b[h:2h]``.

    Args:
      rng: PRNG key.
      input_size: I.
      hidden_size: h.
      forget_bias: constant added to the forget-gate bias.
      dtype: parameter dtype.

    Returns:
      ``LSTMWeights(w_ih [I, 4h], w_hh [h, 4h], b [4h])``.
    """
    k = 1.0 / math.sqrt(hidden_size)
    r_ih, r_hh, r_b1, r_b2 = jax.random.split(rng, 4)
    g = 4 * hidden_size
    uniform = lambda r, shape: jax.random.uniform(r, shape, dtype, -k, k)
    b = uniform(r_b1, (g,)) + uniform(r_b2, (g,))
    b = b.at[hidden_size : 2 * hidden_size].add(jnp.asarray(forget_bias, dtype))
    return LSTMWeights(uniform(r_ih, (input_size, g)), uniform(r_hh, (hidden_size, g)), b)


def _check_weights(weights: LSTMWeights, where: str) -> tuple[int, int]:
    """Return ``(I, h)`` after checking that the three arrays agree."""
    w_ih, w_hh, b = weights
    if w_hh.ndim != 2 or w_hh.shape[1] != 4 * w_hh.shape[0]:
        raise ValueError(f"{where}: w_hh must be [h, 4h], got {w_hh.shape}")
    h = w_hh.shape[0]
    if w_ih.ndim != 2 or w_ih.shape[1] != 4 * h or b.shape != (4 * h,):
        raise ValueError(
            f"{where}: expected w_ih [I, {4 * h}] and b [{4 * h}] for w_hh {w_hh.shape}, "
            f"got w_ih {w_ih.shape} and b {b.shape}"
        )
    return w_ih.shape[0], h


def _check_carry(carry: Carry, batch: int, hidden: int, where: str) -> None:
    shapes = tuple(jnp.shape(a) for a in carry) if len(carry) == 2 else None
    if shapes != ((batch, hidden), (batch, hidden)):
        raise ValueError(
            f"{where}: carry must be (h [B, h], c [B, h]) = "
            f"({(batch, hidden)}, {(batch, hidden)}), got {shapes}"
        )


def _check_lengths(lengths: Array, batch: int, steps: int, where: str) -> None:
    if jnp.shape(lengths) != (batch,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
        raise ValueError(
            f"{where}: lengths must be integers of shape [B] = ({batch},), got "
            f"{jnp.result_type(lengths)} {jnp.shape(lengths)}"
        )
    if isinstance(lengths, jax.core.Tracer) or batch == 0:
        return  # values are unknown under jit; the data pipeline validates them
    host = np.asarray(lengths)  # numpy: jnp ops on a closed-over array would trace under jit
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi > steps:
        raise ValueError(f"{where}: lengths must lie in [0, T={steps}], got [{lo}, {hi}]")


def _cell(w_hh: Array, carry: Carry, gx: Array) -> tuple[tuple[Array, ...], Carry]:
    """The LSTM formula, given ``gx = x_t W_ih + b: [B, 4h]``.

    Returns the activated gates ``(i, f, g, o)``, each ``[B, h]`` (the hand-written
    backward needs them), and the new state ``(h, c)``.
    """
    h, c = carry
    z = gx + h @ w_hh  # [B, 4h]
    zi, zf, zg, zo = jnp.split(z, 4, axis=-1)  # each [B, h]
    i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
    c = f * c + i * g
    return (i, f, g, o), (o * jnp.tanh(c), c)


def _step(w_hh: Array, carry: Carry, gx: Array) -> Carry:
    return _cell(w_hh, carry, gx)[1]


def lstm_cell(weights: LSTMWeights, carry: Carry, x: Array) -> Carry:
    """Run one LSTM step (the formula in the module docstring).

    Args:
      weights: ``LSTMWeights(w_ih [I, 4h], w_hh [h, 4h], b [4h])``.
      carry: ``(h [B, h], c [B, h])``, the previous state.
      x: ``[B, I]``, the input at this step.

    Returns:
      The new state ``(h [B, h], c [B, h])`` in ``x``'s dtype; ``h`` is also the output.
    """
    in_size, hidden = _check_weights(weights, "lstm_cell")
    if x.ndim != 2 or x.shape[1] != in_size:
        raise ValueError(f"lstm_cell: x must be [B, I={in_size}], got {x.shape}")
    _check_carry(carry, x.shape[0], hidden, "lstm_cell")
    carry = (carry[0].astype(x.dtype), carry[1].astype(x.dtype))
    return _step(weights.w_hh.astype(x.dtype), carry, project(x, weights.w_ih, weights.b))


IMPLEMENTATIONS = ("scan", "autodiff", "cudnn")


def lstm_scan(
    weights: LSTMWeights,
    xs: Array,
    carry: Carry | None = None,
    *,
    lengths: Array | None = None,
    reverse: bool = False,
    implementation: str | None = None,
) -> tuple[Array, Carry]:
    """Run an LSTM over a batch of sequences.

    ``(h_t, c_t) = lstm_cell(weights, (h_{t-1}, c_{t-1}), xs[:, t])`` for t = 0..T-1, or
    t = T-1..0 when ``reverse``. With ``lengths``, row b's steps ``t >= lengths[b]`` keep
    its state and output 0, so a reverse pass starts at ``t = lengths[b] - 1`` from
    ``carry`` (as PyTorch's packed bidirectional LSTM does).

    Implementations (all compute the same function):

    - ``"scan"``: ``lax.scan`` with a hand-written backward (``jax.custom_vjp``): the reverse
      scan only carries ``dh`` and ``dc``; the weight gradients are matmuls over all T*B
      rows after it. Reverse-mode only (no ``jax.jvp``).
    - ``"autodiff"``: the same ``lax.scan`` differentiated by JAX (slower backward; forward
      mode and higher derivatives work).
    - ``"cudnn"``: cuDNN's fused LSTM via ``jax.experimental.rnn`` (GPU, float32 only; no
      ``vmap`` rule, so use ``"scan"`` under ``jax.vmap``).
    - None: ``"cudnn"`` on GPU when ``xs``, weights and carry are float32, else ``"scan"``.

    Args:
      weights: ``LSTMWeights(w_ih [I, 4h], w_hh [h, 4h], b [4h])``.
      xs: ``[B, T, I]`` inputs, batch first; sets the compute dtype.
      carry: initial ``(h [B, h], c [B, h])``; None means zeros.
      lengths: optional ``[B]`` integers in ``[0, T]``, the valid prefix of each row.
      reverse: run from the last (valid) step to the first.
      implementation: ``"scan"``, ``"autodiff"``, ``"cudnn"`` or None (pick).

    Returns:
      ``(ys [B, T, h], (h [B, h], c [B, h]))``: the output at every step (zero past a row's
      length) and the final state (for ``reverse``, the state after step 0).
    """
    carry, lengths = _check_inputs(weights, xs, carry, lengths, "lstm_scan")
    implementation = _pick(implementation, [weights], xs, [carry], "lstm_scan")
    if implementation == "cudnn":
        ys, (final,) = _cudnn_layer([weights], xs, [carry], lengths, reverse)
        return ys, final
    if implementation == "autodiff":
        ys, carry = _scan_autodiff(weights, xs, carry, lengths, reverse)  # ys [T, B, h]
    else:
        ys, carry = _scan(weights, xs, carry, lengths, reverse, _hoist())
    return jnp.swapaxes(ys, 0, 1), carry  # [B, T, h]


def _check_inputs(weights, xs, carry, lengths, where) -> tuple[Carry, Array | None]:
    """Check ``lstm_scan``'s arguments; return the carry (zeros for None) and lengths."""
    in_size, hidden = _check_weights(weights, where)
    if xs.ndim != 3 or xs.shape[2] != in_size:
        raise ValueError(
            f"{where}: xs must be [B, T, I={in_size}] for w_ih {weights.w_ih.shape}, got {xs.shape}"
        )
    batch, steps, _ = xs.shape
    if carry is None:
        carry = (jnp.zeros((batch, hidden), xs.dtype), jnp.zeros((batch, hidden), xs.dtype))
    _check_carry(carry, batch, hidden, where)
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        _check_lengths(lengths, batch, steps, where)
    return carry, lengths


def _pick(implementation, directions, xs, carries, where) -> str:
    """Resolve ``implementation=None`` and check an explicit choice."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{where}: implementation must be one of {IMPLEMENTATIONS} or None, "
            f"got {implementation!r}"
        )
    dtypes = {xs.dtype, *(a.dtype for w in directions for a in w)}
    dtypes |= {jnp.result_type(a) for c in carries for a in c}
    cudnn_ok = jax.default_backend() == "gpu" and dtypes == {jnp.dtype(jnp.float32)}
    if implementation is None:
        return "cudnn" if cudnn_ok else "scan"
    if implementation == "cudnn" and not cudnn_ok:
        raise ValueError(
            f"{where}: implementation='cudnn' needs a GPU backend and float32 inputs, weights "
            f"and carry; got backend {jax.default_backend()!r}, dtypes {sorted(map(str, dtypes))}"
        )
    return implementation


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
    # Time-major before the projection: the transpose moves I (not 4h) features per step.
    gx = project(jnp.swapaxes(xs, 0, 1), weights.w_ih, weights.b)  # [T, B, 4h]
    valid = _valid(lengths, xs.shape[1])
    (hs, _), carry = _forward(w_hh, gx, carry, valid, reverse)
    return _outputs(hs, valid), carry


# Whether "scan" hoists the input projection out of the loop. XLA:CPU runs the loop
# faster with x_t W_ih inside each step (about 25% less CPU time forward, 10% forward +
# backward at B=64, T=200, I=256, h=512; benchmarks/README.md): the hoisted
# [T*B, I] x [I, 4h] product streams a [T, B, 4h] buffer through memory, while a step's
# [B, 4h] stays in cache. Accelerators prefer the one big matmul.
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
    if hoist:
        gx = project(jnp.swapaxes(xs, 0, 1), weights.w_ih, weights.b)  # [T, B, 4h]
        return _recurrence(None, w_hh, gx, carry, valid, reverse)
    proj = (weights.w_ih.astype(dtype), weights.b.astype(dtype))
    return _recurrence(proj, w_hh, jnp.swapaxes(xs, 0, 1), carry, valid, reverse)  # [T, B, I]


def _valid(lengths: Array | None, steps: int) -> Array | None:
    if lengths is None:
        return None
    return jnp.arange(steps, dtype=lengths.dtype)[:, None, None] < lengths[None, :, None]


def _outputs(hs: Array, valid: Array | None) -> Array:
    """Outputs from the state sequence: zero where a row is past its length."""
    return hs if valid is None else jnp.where(valid, hs, jnp.zeros_like(hs))


def _forward(w_hh, gx, carry, valid, reverse, save_gates=False, proj=None):
    """Scan the recurrence: returns ``((hs, cs), final)`` or, with ``save_gates``, also
    the gates ``(i, f, g, o)``, each ``[T, B, h]``; ``hs, cs`` are the states after each
    step (a row past its length repeats its state). With ``proj = (w_ih, b)``, ``gx`` is
    the input ``[T, B, I]`` and each step projects its slice."""

    def body(state: Carry, inputs: tuple[Array, Array | None]):
        gx_t, valid_t = inputs
        if proj is not None:
            gx_t = gx_t @ proj[0] + proj[1]  # [B, 4h]
        gates, new = _cell(w_hh, state, gx_t)
        if valid_t is not None:
            new = (jnp.where(valid_t, new[0], state[0]), jnp.where(valid_t, new[1], state[1]))
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
    """Backward: a reverse scan carrying ``(dh, dc)`` that emits the pre-activation
    gradients ``dz: [T, B, 4h]``; then ``dW_hh = h_prev^T dz`` as one matmul over T*B
    rows, and ``dz`` itself is the cotangent of ``gx`` (so ``dW_ih`` and ``dxs`` are also
    single matmuls, in ``project``'s backward)."""
    proj, xs_t, w_hh, gates, hs, cs, (h0, c0), valid = residuals
    dys, (dh_n, dc_n) = cotangents
    h_prev, c_prev = _before(hs, h0, reverse), _before(cs, c0, reverse)
    w_hh_t = w_hh.T  # [4h, h]: the per-step matmul is then a plain dz @ w_hh_t

    def body(d_state: Carry, inputs):
        dh, dc = d_state
        (i, f, g, o), c, c_before, dy, valid_t = inputs
        dh_new, dc_new = dh + dy, dc  # cotangents of this step's new (h, c)
        if valid_t is not None:  # past a row's length the step is the identity
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
        if valid_t is not None:
            dh_prev, dc_prev = jnp.where(valid_t, dh_prev, dh), jnp.where(valid_t, dc_prev, dc)
        return (dh_prev, dc_prev), dz

    inputs = (gates, cs, c_prev, dys, valid)
    (dh0, dc0), dz = jax.lax.scan(body, (dh_n, dc_n), inputs, reverse=not reverse)
    hidden = w_hh.shape[0]
    dz_rows = dz.reshape(-1, 4 * hidden)  # [T*B, 4h]
    dw_hh = h_prev.reshape(-1, hidden).T @ dz_rows  # [h, 4h]
    if proj is None:
        return None, dw_hh, dz, (dh0, dc0), None
    w_ih, _ = proj
    x_rows = xs_t.reshape(-1, w_ih.shape[0])  # [T*B, I]
    dxs = (dz_rows @ w_ih.T).reshape(xs_t.shape)  # [T, B, I]
    return (x_rows.T @ dz_rows, dz_rows.sum(0)), dw_hh, dxs, (dh0, dc0), None


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


def bidirectional_lstm(
    weights: BidirectionalWeights,
    xs: Array,
    carry: tuple[Carry, Carry] | None = None,
    *,
    lengths: Array | None = None,
    implementation: str | None = None,
) -> tuple[Array, tuple[Carry, Carry]]:
    """Run a forward and a backward LSTM over ``xs`` and concatenate their outputs.

    ``ys[:, t] = [h_fwd_t, h_bwd_t]``, where the backward LSTM reads each row from its last
    valid step to step 0 (Schuster & Paliwal, 1997, "Bidirectional Recurrent Neural
    Networks").

    Args:
      weights: ``BidirectionalWeights(forward, backward)``, both ``LSTMWeights`` of one shape.
      xs: ``[B, T, I]``.
      carry: initial ``((h_f, c_f), (h_b, c_b))``, each ``[B, h]``; None means zeros.
      lengths: optional ``[B]`` valid lengths (see ``lstm_scan``).
      implementation: see ``lstm_scan``; with ``"cudnn"`` both directions are one call.

    Returns:
      ``(ys [B, T, 2h], ((h_f, c_f), (h_b, c_b)))``: outputs (forward half first, zero past
      a row's length) and the final state of each direction (the backward one after step 0).
    """
    if not isinstance(weights, BidirectionalWeights):
        raise ValueError(f"bidirectional_lstm: expected BidirectionalWeights, got {type(weights)}")
    shapes = [tuple(a.shape for a in w) for w in weights]
    if shapes[0] != shapes[1]:
        raise ValueError(f"bidirectional_lstm: direction shapes differ: {shapes[0]} vs {shapes[1]}")
    carry_f, carry_b = (None, None) if carry is None else carry
    where = "bidirectional_lstm"
    carry_f, lengths = _check_inputs(weights.forward, xs, carry_f, lengths, where)
    carry_b, _ = _check_inputs(weights.backward, xs, carry_b, None, where)
    implementation = _pick(implementation, weights, xs, [carry_f, carry_b], where)
    if implementation == "cudnn":
        ys, (final_f, final_b) = _cudnn_layer(list(weights), xs, [carry_f, carry_b], lengths)
        return ys, (final_f, final_b)
    run = functools.partial(lstm_scan, xs=xs, lengths=lengths, implementation=implementation)
    ys_f, final_f = run(weights.forward, carry=carry_f)
    ys_b, final_b = run(weights.backward, carry=carry_b, reverse=True)
    return jnp.concatenate([ys_f, ys_b], axis=-1), (final_f, final_b)  # [B, T, 2h]


def init_lstm_stack(
    rng: Array,
    input_size: int,
    hidden_size: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    forget_bias: float = 0.0,
    dtype: DType = jnp.float32,
) -> tuple[LSTMWeights | BidirectionalWeights, ...]:
    """Initialise the layers of a ``torch.nn.LSTM(input_size, hidden_size, num_layers, ...)``.

    Layer 0 reads ``I = input_size`` features, later layers ``dirs * h``; each layer is an
    ``LSTMWeights`` or, if ``bidirectional``, a ``BidirectionalWeights``. See ``init_lstm``.
    """
    if num_layers < 1:
        raise ValueError(f"init_lstm_stack: num_layers must be >= 1, got {num_layers}")
    dirs = 2 if bidirectional else 1
    keys = jax.random.split(rng, num_layers * dirs)
    layers = []
    for layer in range(num_layers):
        in_size = input_size if layer == 0 else dirs * hidden_size
        w = [
            init_lstm(
                keys[layer * dirs + d], in_size, hidden_size, forget_bias=forget_bias, dtype=dtype
            )
            for d in range(dirs)
        ]
        layers.append(BidirectionalWeights(*w) if bidirectional else w[0])
    return tuple(layers)


def lstm_stack(
    layers: tuple[LSTMWeights | BidirectionalWeights, ...],
    xs: Array,
    carry: Carry | None = None,
    *,
    lengths: Array | None = None,
    dropout_rate: float = 0.0,
    rng: Array | None = None,
    deterministic: bool = True,
    implementation: str | None = None,
) -> tuple[Array, Carry]:
    """Run stacked (optionally bidirectional) LSTM layers like ``torch.nn.LSTM``.

    Layer l reads layer l-1's outputs; as in PyTorch, dropout hits the outputs of every
    layer except the last (and never the states), and only when not ``deterministic``.

    Args:
      layers: from ``init_lstm_stack``: all ``LSTMWeights`` or all ``BidirectionalWeights``.
      xs: ``[B, T, I]``.
      carry: initial ``(h_0 [L*dirs, B, h], c_0 [L*dirs, B, h])`` in PyTorch's layout (row
        ``l * dirs + d`` is layer l, direction d, backward d = 1); None means zeros.
      lengths: optional ``[B]`` valid lengths (see ``lstm_scan``).
      dropout_rate: inter-layer dropout probability.
      rng: PRNG key, needed when dropout is active.
      deterministic: disable dropout (evaluation).
      implementation: ``"scan"``, ``"autodiff"``, ``"cudnn"`` or None (see ``lstm_scan``),
        for every layer.

    Returns:
      ``(ys [B, T, dirs*h], (h_n [L*dirs, B, h], c_n [L*dirs, B, h]))``: the last layer's
      outputs and every layer's final state, PyTorch's layout.
    """
    if not layers:
        raise ValueError("lstm_stack: got no layers")
    bidirectional = isinstance(layers[0], BidirectionalWeights)
    if any(isinstance(w, BidirectionalWeights) != bidirectional for w in layers):
        raise ValueError(
            f"lstm_stack: mixed uni- and bidirectional layers: {[type(w).__name__ for w in layers]}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"lstm_stack: dropout_rate must be in [0, 1), got {dropout_rate}")
    dirs = 2 if bidirectional else 1
    hidden = (layers[0].forward if bidirectional else layers[0]).w_hh.shape[0]
    if carry is not None:
        want = (len(layers) * dirs, xs.shape[0] if xs.ndim else 0, hidden)
        got = tuple(jnp.shape(a) for a in carry)
        if got != (want, want):
            raise ValueError(f"lstm_stack: carry must be (h_0 {want}, c_0 {want}), got {got}")
    drop = dropout_rate > 0.0 and not deterministic and len(layers) > 1
    if drop and rng is None:
        raise ValueError("lstm_stack: dropout_rate > 0 with deterministic=False needs an rng key")
    h_n, c_n = [], []
    for layer, weights in enumerate(layers):
        # This layer's initial state per direction (rows l*dirs + d of h_0, c_0).
        rows = range(layer * dirs, (layer + 1) * dirs)
        start = [None] * dirs if carry is None else [(carry[0][i], carry[1][i]) for i in rows]
        if bidirectional:
            xs, finals = bidirectional_lstm(
                weights, xs, tuple(start), lengths=lengths, implementation=implementation
            )
        else:
            xs, final = lstm_scan(
                weights, xs, start[0], lengths=lengths, implementation=implementation
            )
            finals = (final,)
        h_n += [h for h, _ in finals]
        c_n += [c for _, c in finals]
        if drop and layer < len(layers) - 1:
            rng, sub = jax.random.split(rng)
            xs = dropout(sub, xs, dropout_rate)
    return xs, (jnp.stack(h_n), jnp.stack(c_n))
