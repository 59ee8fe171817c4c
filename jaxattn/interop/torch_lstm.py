"""Convert ``torch.nn.LSTM`` weights to and from ``jaxattn.ops.lstm`` layers.

Shape glossary: I input features, h hidden size, L layers, dirs 1 or 2 directions.

PyTorch stores layer l (direction suffix ``_reverse`` for the backward one) as
``weight_ih_l{l} [4h, I]``, ``weight_hh_l{l} [4h, h]``, ``bias_ih_l{l} [4h]`` and
``bias_hh_l{l} [4h]``, gates in the order (i, f, g, o) that jaxattn also uses. jaxattn keeps
the transposes ``w_ih [I, 4h]``, ``w_hh [h, 4h]`` and one bias ``b = bias_ih + bias_hh``.

Export cannot split ``b`` back into two biases uniquely: it writes ``bias_ih = b`` and
``bias_hh = 0``, which computes the same LSTM, so jaxattn -> torch -> jaxattn is exact
(torch -> jaxattn -> torch gives the same function, not the same two bias tensors).

jaxattn always has a bias (``torch.nn.LSTM(bias=False)`` imports as ``b = 0``); export with
``bias=False`` writes no bias tensors, for a ``bias=False`` module, and refuses a nonzero ``b``.

``torch.nn.GRU`` and ``torch.nn.RNN`` share the LSTM's tensor names but have 3 and 1 gate
blocks (``weight_hh [3h, h]``, ``[h, h]``): they are refused, not misread.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.interop._tensors import (
    ReadLog,
    check_framework,
    export,
    get,
    pure_weights_of,
    refuse_unread,
    state_dict_of,
    unwrap_compiled,
)
from jaxattn.ops.lstm import BidirectionalWeights, LSTMWeights, lstm_stack

Layers = tuple[LSTMWeights | BidirectionalWeights, ...]
_KEY = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
_NOT_LSTM = {3: "GRU", 1: "RNN"}  # gate blocks in weight_hh [gates * h, h] -> torch.nn class


def _check_not_other_rnn(source: Any) -> None:
    """Refuse a ``torch.nn.GRU`` / ``RNN`` module (by class name: torch is not imported)."""
    for cls in type(unwrap_compiled(source)).__mro__:
        if cls.__module__.startswith("torch.") and cls.__name__ in _NOT_LSTM.values():
            raise ValueError(
                f"lstm_from_torch: got a torch.nn.{cls.__name__}, not an LSTM (only "
                "torch.nn.LSTM weights can be converted)"
            )


def _scan_keys(state, prefix: str) -> tuple[int, bool, bool]:
    """Infer ``(num_layers, bidirectional, has_bias)`` from the parameter names."""
    layers, reverse, bias = set(), False, False
    for key in state:
        if not key.startswith(prefix):
            continue
        m = _KEY.fullmatch(key[len(prefix) :])
        if m is None:
            continue
        if m.group(1) == "weight_hr":
            raise ValueError(f"LSTM with proj_size > 0 is not supported (found {key!r})")
        layers.add(int(m.group(2)))
        reverse |= m.group(3) is not None
        bias |= m.group(1).startswith("bias")
    if not layers:
        # Say where they are: a whole model's state dict holds them under its submodule's
        # name; a torch.nn.LSTMCell's have no layer suffix.
        starts = ((key, _KEY.search(key)) for key in state)
        found = sorted(
            {key[: m.start()] for key, m in starts if m and key[: m.start()][-1:] in ("", ".")}
        )
        if found:
            hint = f"; the state dict has them under {found[:5]}: pass prefix={found[0]!r}"
        elif f"{prefix}weight_ih" in state and f"{prefix}weight_hh" in state:
            hint = (
                f"; {prefix}weight_ih/weight_hh without a layer suffix are a torch.nn.LSTMCell's "
                "(or GRUCell's): only torch.nn.LSTM weights can be converted"
            )
        else:
            hint = ""
        raise KeyError(f"no LSTM tensors 'weight_ih_l0'... found under prefix {prefix!r}{hint}")
    if layers != set(range(len(layers))):
        raise KeyError(f"LSTM layer indices under {prefix!r} are not 0..L-1: {sorted(layers)}")
    return len(layers), reverse, bias


def _direction(state, prefix: str, layer: int, suffix: str, in_size: int | None, bias: bool):
    w_ih_name = f"{prefix}weight_ih_l{layer}{suffix}"
    w_hh_name = f"{prefix}weight_hh_l{layer}{suffix}"
    if w_hh_name not in state:
        raise KeyError(f"missing tensor {w_hh_name!r}")
    shape = tuple(int(n) for n in np.shape(state[w_hh_name]))
    if len(shape) != 2 or shape[0] != 4 * shape[1]:
        gates = shape[0] // shape[1] if len(shape) == 2 and shape[1] else 0
        if gates in _NOT_LSTM and shape[0] == gates * shape[1]:
            raise ValueError(
                f"tensor {w_hh_name!r} has shape {shape}, a torch.nn.{_NOT_LSTM[gates]}'s "
                f"[{'3h' if gates == 3 else 'h'}, h]: not an LSTM (an LSTM's is [4h, h]; only "
                "torch.nn.LSTM weights can be converted)"
            )
        raise ValueError(f"tensor {w_hh_name!r} has shape {shape}: an LSTM's is [4h, h]")
    h = shape[1]
    w_hh = get(state, w_hh_name, (4 * h, h))
    if in_size is None:  # layer 0: the input size is whatever the checkpoint says
        if w_ih_name not in state:
            raise KeyError(f"missing tensor {w_ih_name!r}")
        ih_shape = tuple(int(n) for n in np.shape(state[w_ih_name]))
        if len(ih_shape) != 2:  # (a 0-d one: IndexError; 1-d: "expected (4h, 4h)")
            raise ValueError(f"tensor {w_ih_name!r} has shape {ih_shape}: an LSTM's is [4h, I]")
        in_size = ih_shape[1]
    w_ih = get(state, w_ih_name, (4 * h, in_size))
    if bias:
        b = get(state, f"{prefix}bias_ih_l{layer}{suffix}", (4 * h,)) + get(
            state, f"{prefix}bias_hh_l{layer}{suffix}", (4 * h,)
        )
    else:
        b = np.zeros((4 * h,), w_ih.dtype)
    return LSTMWeights(jnp.asarray(w_ih.T), jnp.asarray(w_hh.T), jnp.asarray(b)), h


def lstm_from_torch(module_or_state_dict: Any, *, prefix: str = "", strict: bool = True) -> Layers:
    """Import a ``torch.nn.LSTM`` (module or state dict) as ``lstm_stack`` layers.

    ``num_layers``, ``bidirectional`` and ``bias`` are read from the tensor names; with
    ``bias=False`` the imported ``b`` is zeros. The module's ``batch_first`` does not affect
    the weights (``lstm_stack`` always takes ``[B, T, I]``), and neither does its
    ``dropout``: to train with it, pass it again (``lstm_stack(..., dropout_rate=)``).

    Args:
      module_or_state_dict: a ``torch.nn.LSTM`` or its ``state_dict()`` (torch tensors or
        arrays).
      prefix: prepended to every name, e.g. ``"encoder.rnn."`` for a submodule's entries in
        a whole model's state dict.
      strict: refuse tensors under ``prefix`` that the layout has no place for (a misspelt
        name), as PyTorch's ``load_state_dict`` does; False skips them.

    Returns:
      A tuple with one ``LSTMWeights`` (or ``BidirectionalWeights``) per layer, as
      ``init_lstm_stack`` returns.

    Raises:
      KeyError: a tensor is missing (the message names it).
      ValueError: a tensor has the wrong shape (name, expected and actual shape), the LSTM
        uses ``proj_size``, or the source is a ``torch.nn.GRU``/``RNN`` (its module, or a
        ``weight_hh`` of shape ``[3h, h]``/``[h, h]``), or (``strict``) a tensor under
        ``prefix`` is left unread.
    """
    _check_not_other_rnn(module_or_state_dict)
    state = ReadLog(state_dict_of(module_or_state_dict))
    num_layers, bidirectional, bias = _scan_keys(state, prefix)
    layers, in_size, hidden = [], None, None
    for layer in range(num_layers):
        dirs, layer_in = [], in_size
        for suffix in ("", "_reverse") if bidirectional else ("",):
            w, h = _direction(state, prefix, layer, suffix, layer_in, bias)
            layer_in = w.w_ih.shape[0]  # layer 0's reverse reads the forward's input size
            if hidden is not None and h != hidden:
                raise ValueError(
                    f"{prefix}weight_hh_l{layer}{suffix}: hidden size {h} differs from "
                    f"layer 0's {hidden}"
                )
            hidden = h
            dirs.append(w)
        layers.append(BidirectionalWeights(*dirs) if bidirectional else dirs[0])
        in_size = hidden * len(dirs)
    if strict:
        refuse_unread(state, "lstm_from_torch", prefix)
    return tuple(layers)


def _check_stack(layers: Layers) -> None:
    """Refuse what ``lstm_stack`` refuses (mixed directions, a layer whose input size is not
    the last one's output, a missing bias): torch would reject the state dict later, with
    missing or unexpected keys. Checked by tracing the stack abstractly (no compute)."""
    first = layers[0].forward if isinstance(layers[0], BidirectionalWeights) else layers[0]
    try:
        size = np.shape(first.w_ih)[0]
        xs = jax.ShapeDtypeStruct((1, 1, size), first.w_ih.dtype)
        jax.eval_shape(lstm_stack, layers, xs)
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"lstm_to_torch_state_dict: not an LSTM stack torch can load: {e}") from e


def lstm_to_torch_state_dict(
    layers: Layers, *, prefix: str = "", framework: str = "pt", bias: bool = True
) -> dict[str, Any]:
    """Export ``lstm_stack`` layers as a ``torch.nn.LSTM`` state dict.

    Load it with ``torch.nn.LSTM(I, h, num_layers=L, bidirectional=..., bias=bias,
    batch_first=True).load_state_dict(sd)``. ``bias_ih = b`` and ``bias_hh = 0`` (see the
    module docstring).

    Args:
      layers: from ``init_lstm_stack`` or ``lstm_from_torch``, or a ``jaxattn.nn.LSTM``
        (its ``pure_weights()`` are exported).
      prefix: prepended to every name.
      framework: ``"pt"`` for torch tensors, ``"np"`` for NumPy arrays.
      bias: False writes no ``bias_ih``/``bias_hh`` tensors, for ``torch.nn.LSTM(bias=False)``;
        every layer's ``b`` must then be zero.

    Returns:
      ``{name: tensor}`` with ``weight_ih_l{l}[_reverse] [4h, I]`` etc.

    Raises:
      ValueError: ``bias=False`` and a layer's ``b`` is nonzero (the message names it).
    """
    check_framework(framework)
    layers = pure_weights_of(layers)
    if isinstance(layers, (LSTMWeights, BidirectionalWeights)):  # one layer, not a tuple
        raise ValueError(
            "lstm_to_torch_state_dict: expected a tuple of layers (as init_lstm_stack returns), "
            f"got a single {type(layers).__name__}: pass (weights,)"
        )
    if not isinstance(layers, (tuple, list)):  # None said "no layers", a dict named a key
        raise TypeError(
            "lstm_to_torch_state_dict: expected a tuple of LSTMWeights/BidirectionalWeights "
            f"layers (as init_lstm_stack returns) or a jaxattn.nn.LSTM, got {type(layers).__name__}"
        )
    if not layers:
        raise ValueError("lstm_to_torch_state_dict: got no layers")
    if all(isinstance(w, (LSTMWeights, BidirectionalWeights)) for w in layers):
        _check_stack(layers)  # (another type is named by the loop below)
    out: dict[str, Any] = {}
    for layer, weights in enumerate(layers):
        if isinstance(weights, BidirectionalWeights):
            dirs = [(weights.forward, ""), (weights.backward, "_reverse")]
        elif isinstance(weights, LSTMWeights):
            dirs = [(weights, "")]
        else:
            raise ValueError(f"layer {layer}: expected LSTMWeights, got {type(weights)}")
        for w, suffix in dirs:
            b = np.asarray(w.b)
            out[f"{prefix}weight_ih_l{layer}{suffix}"] = export(np.asarray(w.w_ih).T, framework)
            out[f"{prefix}weight_hh_l{layer}{suffix}"] = export(np.asarray(w.w_hh).T, framework)
            if not bias:
                if np.any(b):
                    raise ValueError(
                        f"lstm_to_torch_state_dict: bias=False but layer {layer}"
                        f"{' (reverse direction)' if suffix else ''} has a nonzero b (max |b| = "
                        f"{float(np.max(np.abs(b))):g}); a bias-free torch.nn.LSTM would "
                        "compute another function"
                    )
                continue
            out[f"{prefix}bias_ih_l{layer}{suffix}"] = export(b, framework)
            out[f"{prefix}bias_hh_l{layer}{suffix}"] = export(np.zeros_like(b), framework)
    return out
