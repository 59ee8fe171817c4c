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
result into the four gates. On CPU each step instead runs one ``[B, I + h] x [I + h, 4h]``
matmul of ``[x_t, h_{t-1}]`` against ``[W_ih; W_hh]`` (measured faster on XLA:CPU; see
``_hoist`` in ``lstm_kernels.py``).

The backward is written by hand (``jax.custom_vjp``, in ``lstm_kernels.py``): a reverse
scan carries only ``(dh, dc)`` and the weight gradients are single matmuls over all T*B
rows. On GPU, float32 layers can run cuDNN's fused LSTM (``implementation="cudnn"``,
through ``jax.experimental.rnn``); the scan is the default there too, being faster on an
H200 at every shape timed (``benchmarks/README.md``, "GPU"). ``benchmarks/lstm.py``
compares with Flax and PyTorch.

Padding: with ``lengths`` a row's steps ``t >= length`` leave its state unchanged and
output zeros, so the final state is PyTorch's on a ``pack_padded_sequence`` input; run in
reverse, such a row starts from its last valid step ``length - 1``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.ops._checks import (
    check_flag,
    check_float_dtype,
    check_floating_leaves,
    check_size,
    check_weights_type,
    forward_mode_hint,
)
from jaxattn.ops.layers import (
    as_array,
    check_dropout_key,
    check_dropout_rate,
    check_floating,
    dropout,
    project,
    uniform,
)
from jaxattn.ops.lstm_kernels import (
    _cudnn_layer,
    _hoist,
    _scan,
    _scan_autodiff,
    _step,
)
from jaxattn.ops.masks import check_lengths

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
    check_float_dtype(dtype, "init_lstm")
    check_size(input_size, "input_size", "init_lstm", minimum=0)
    hidden_size = check_size(hidden_size, "hidden_size", "init_lstm")
    k = 1.0 / math.sqrt(hidden_size)
    r_ih, r_hh, r_b1, r_b2 = jax.random.split(rng, 4)
    g = 4 * hidden_size
    draw = lambda r, shape: uniform(r, shape, -k, k, dtype)
    b = draw(r_b1, (g,)) + draw(r_b2, (g,))
    b = b.at[hidden_size : 2 * hidden_size].add(jnp.asarray(forget_bias, dtype))
    return LSTMWeights(draw(r_ih, (input_size, g)), draw(r_hh, (hidden_size, g)), b)


def _check_weights(weights: LSTMWeights, where: str) -> tuple[int, int]:
    """Return ``(I, h)`` after checking that the three arrays are floating and agree."""
    # (A bare tuple failed as "no attribute 'w_hh'", a dict's keys unpacked.)
    check_weights_type(weights, LSTMWeights, "init_lstm", where)
    check_floating_leaves(weights, "weights", where)  # (cast back, int ones ran silently)
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


def check_pair(value: Any, name: str, layout: str, where: str) -> None:
    """``ValueError`` naming ``where``, ``name`` and its ``layout`` (e.g. ``"(h, c)"``)
    unless ``value`` unpacks into two: a tuple or list of two, or an array of leading size 2.

    None (a state not made yet), a dict (an orbax restore without a target) or a triple
    failed as "cannot unpack non-iterable NoneType object" and the like, naming neither.
    """
    if isinstance(value, (tuple, list)):
        if len(value) == 2:
            return
        got = f"a {type(value).__name__} of {len(value)}"
    elif getattr(value, "ndim", 0) > 0:
        if len(value) == 2:
            return
        got = f"an array of shape {tuple(value.shape)}"
    else:
        got = type(value).__name__
    raise ValueError(f"{where}: {name} must be a pair {layout}, got {got}")


def _check_carry(carry: Carry, batch: int, hidden: int, where: str) -> None:
    check_pair(carry, "carry", "(h [B, h], c [B, h])", where)
    shapes = tuple(jnp.shape(a) for a in carry)
    if shapes != ((batch, hidden), (batch, hidden)):
        raise ValueError(
            f"{where}: carry must be (h [B, h], c [B, h]) = "
            f"({(batch, hidden)}, {(batch, hidden)}), got {shapes}"
        )


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
    check_floating(x, "x", "lstm_cell")
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
      rows after it. No forward mode through it (``jax.jvp``, ``jax.jacfwd``); every
      derivative that starts in reverse mode works (``jax.grad`` of ``jax.grad``,
      ``jax.hessian``), the backward being plain JAX.
    - ``"autodiff"``: the same ``lax.scan`` differentiated by JAX (slower backward; forward
      mode works too).
    - ``"cudnn"``: cuDNN's fused LSTM via ``jax.experimental.rnn`` (GPU, float32 only; no
      ``vmap`` rule, so use ``"scan"`` under ``jax.vmap``).
    - None: ``"scan"``, on every backend. On an H200 its forward+backward took 0.66x and
      0.71x cuDNN's time (B=64, T=200 and B=8, T=1000; I=256, h=512).

    Args:
      weights: ``LSTMWeights(w_ih [I, 4h], w_hh [h, 4h], b [4h])``.
      xs: ``[B, T, I]`` inputs, batch first; sets the compute dtype.
      carry: initial ``(h [B, h], c [B, h])``; None means zeros.
      lengths: optional ``[B]`` integers in ``[0, T]``, the valid prefix of each row; the
        inputs past it are never read (NaN padding gives finite gradients).
      reverse: run from the last (valid) step to the first.
      implementation: ``"scan"``, ``"autodiff"``, ``"cudnn"`` or None (pick).

    Returns:
      ``(ys [B, T, h], (h [B, h], c [B, h]))``: the output at every step (zero past a row's
      length) and the final state (for ``reverse``, the state after step 0).
    """
    # (NumPy float64 data: float32, as jnp.asarray gives, no warning; a None or ragged list
    # is named.)
    xs = as_array(xs, "xs", "lstm_scan")
    carry, lengths = _check_inputs(weights, xs, carry, lengths, "lstm_scan")
    implementation = _pick(implementation, [weights], xs, [carry], "lstm_scan")
    reverse = check_flag(reverse, "reverse", "lstm_scan")
    return _run(weights, xs, carry, lengths, reverse, implementation)


def _run(weights, xs, carry, lengths, reverse, implementation) -> tuple[Array, Carry]:
    """``lstm_scan`` on checked inputs with a resolved implementation."""
    if implementation == "cudnn":
        ys, (final,) = _cudnn_layer([weights], xs, [carry], lengths, reverse)
        return ys, final
    if implementation == "autodiff":
        ys, carry = _scan_autodiff(weights, xs, carry, lengths, reverse)  # ys [T, B, h]
    else:
        with forward_mode_hint(
            "the LSTM's implementation='scan' (the default)",
            "pass implementation='autodiff' (lstm_scan, lstm_stack, nn.LSTM, "
            "Seq2SeqConfig.lstm_implementation)",
        ):
            ys, carry = _scan(weights, xs, carry, lengths, reverse, _hoist())
    return jnp.swapaxes(ys, 0, 1), carry  # [B, T, h]


def _check_inputs(weights, xs, carry, lengths, where) -> tuple[Carry, Array | None]:
    """Check ``lstm_scan``'s arguments; return the carry (zeros for None) and lengths."""
    in_size, hidden = _check_weights(weights, where)
    if xs.ndim != 3 or xs.shape[2] != in_size:
        raise ValueError(
            f"{where}: xs must be [B, T, I={in_size}] for w_ih {weights.w_ih.shape}, got {xs.shape}"
        )
    check_floating(xs, "xs", where)
    batch, steps, _ = xs.shape
    if carry is None:
        carry = (jnp.zeros((batch, hidden), xs.dtype), jnp.zeros((batch, hidden), xs.dtype))
    _check_carry(carry, batch, hidden, where)
    if lengths is not None:
        lengths = check_lengths(lengths, batch, steps, where)
    return carry, lengths


def _pick(implementation, directions, xs, carries, where) -> str:
    """Resolve ``implementation=None`` and check an explicit choice."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{where}: implementation must be one of {IMPLEMENTATIONS} or None, "
            f"got {implementation!r}"
        )
    if implementation is None:
        return "scan"  # faster than cuDNN's on an H200 at every shape timed
    if implementation != "cudnn":
        return implementation
    dtypes = {xs.dtype, *(a.dtype for w in directions for a in w)}
    dtypes |= {jnp.result_type(a) for c in carries for a in c}
    if jax.default_backend() != "gpu" or dtypes != {jnp.dtype(jnp.float32)}:
        raise ValueError(
            f"{where}: implementation='cudnn' needs a GPU backend and float32 inputs, weights "
            f"and carry; got backend {jax.default_backend()!r}, dtypes {sorted(map(str, dtypes))}"
        )
    return implementation


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
    for w in weights:  # each an LSTMWeights before its shapes are read
        _check_weights(w, "bidirectional_lstm")
    shapes = [tuple(a.shape for a in w) for w in weights]
    if shapes[0] != shapes[1]:
        raise ValueError(f"bidirectional_lstm: direction shapes differ: {shapes[0]} vs {shapes[1]}")
    if carry is not None:
        check_pair(carry, "carry", "((h_f, c_f), (h_b, c_b))", "bidirectional_lstm")
    carry_f, carry_b = (None, None) if carry is None else carry
    xs = as_array(xs, "xs", "bidirectional_lstm")  # (as in lstm_scan)
    where = "bidirectional_lstm"
    carry_f, lengths = _check_inputs(weights.forward, xs, carry_f, lengths, where)
    carry_b, _ = _check_inputs(weights.backward, xs, carry_b, None, where)
    implementation = _pick(implementation, weights, xs, [carry_f, carry_b], where)
    if implementation == "cudnn":
        ys, (final_f, final_b) = _cudnn_layer(list(weights), xs, [carry_f, carry_b], lengths)
        return ys, (final_f, final_b)
    ys_f, final_f = _run(weights.forward, xs, carry_f, lengths, False, implementation)
    ys_b, final_b = _run(weights.backward, xs, carry_b, lengths, True, implementation)
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
    check_float_dtype(dtype, "init_lstm_stack")
    num_layers = check_size(num_layers, "num_layers", "init_lstm_stack")
    dirs = 2 if check_flag(bidirectional, "bidirectional", "init_lstm_stack") else 1
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
    if not all(isinstance(w, (LSTMWeights, BidirectionalWeights)) for w in layers):
        raise TypeError(  # (a bare tuple of arrays failed as "no attribute 'w_hh'")
            "lstm_stack: layers must be LSTMWeights or BidirectionalWeights (init_lstm_stack), "
            f"got {[type(w).__name__ for w in layers]}"
        )
    bidirectional = isinstance(layers[0], BidirectionalWeights)
    if any(isinstance(w, BidirectionalWeights) != bidirectional for w in layers):
        raise ValueError(
            f"lstm_stack: mixed uni- and bidirectional layers: {[type(w).__name__ for w in layers]}"
        )
    check_dropout_rate(dropout_rate, "lstm_stack: dropout_rate")
    xs = as_array(xs, "xs", "lstm_stack")  # (as in lstm_scan)
    dirs = 2 if bidirectional else 1
    hidden = (layers[0].forward if bidirectional else layers[0]).w_hh.shape[0]
    if xs.ndim != 3:  # before the carry, whose expected shape needs B = xs.shape[0]
        raise ValueError(f"lstm_stack: xs must be [B, T, I], got {xs.shape}")
    # Layer 0 reads xs, layer l > 0 layer l-1's [B, T, dirs*h]: checked here, before any
    # layer runs, so that a mismatch names lstm_stack and the layer (lstm_scan or
    # bidirectional_lstm would name themselves, and for l > 0 an xs the caller never passed).
    for w in layers[0] if bidirectional else (layers[0],):
        in_size, _ = _check_weights(w, "lstm_stack: layer 0")
        if xs.shape[-1] != in_size:
            raise ValueError(
                f"lstm_stack: xs {tuple(xs.shape)} must be [B, T, I] with layer 0's I = "
                f"{in_size} (its w_ih is {tuple(w.w_ih.shape)})"
            )
    for layer, weights in enumerate(layers[1:], start=1):
        for w in weights if bidirectional else (weights,):
            in_size, h = _check_weights(w, f"lstm_stack: layer {layer}")
            if (in_size, h) != (dirs * hidden, hidden):
                raise ValueError(
                    f"lstm_stack: layer {layer} has w_ih {tuple(w.w_ih.shape)} and w_hh "
                    f"{tuple(w.w_hh.shape)}; it reads layer {layer - 1}'s outputs, so it needs "
                    f"I = {dirs * hidden} ({dirs} x layer 0's h = {hidden}) and h = {hidden}"
                )
    if carry is not None:
        check_pair(carry, "carry", "(h_0, c_0)", "lstm_stack")
        want = (len(layers) * dirs, xs.shape[0], hidden)
        got = tuple(jnp.shape(a) for a in carry)
        if got != (want, want):
            raise ValueError(f"lstm_stack: carry must be (h_0 {want}, c_0 {want}), got {got}")
    deterministic = check_flag(deterministic, "deterministic", "lstm_stack")
    drop = dropout_rate > 0.0 and not deterministic and len(layers) > 1
    check_dropout_key(rng, drop, "lstm_stack: dropout_rate > 0 with deterministic=False")
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
