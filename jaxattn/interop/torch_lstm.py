"""Convert ``torch.nn.LSTM`` weights to and from ``jaxattn.ops.lstm`` layers.

Shape glossary: I input features, h hidden size, L layers, dirs 1 or 2 directions.

PyTorch stores layer l (direction suffix ``_reverse`` for the backward one) as
``weight_ih_l{l} [4h, I]``, ``weight_hh_l{l} [4h, h]``, ``bias_ih_l{l} [4h]`` and
``bias_hh_l{l} [4h]``, gates in the order (i, f, g, o) that jaxattn also uses. jaxattn keeps
the transposes ``w_ih [I, 4h]``, ``w_hh [h, 4h]`` and one bias ``b = bias_ih + bias_hh``.

Export cannot split ``b`` back into two biases uniquely: it writes ``bias_ih = b`` and
``bias_hh = 0``, which computes the same LSTM, so jaxattn -> torch -> jaxattn is exact
(torch -> jaxattn -> torch gives the same function, not the same two bias tensors).
"""

from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxattn.interop._tensors import check_framework, export, get, state_dict_of
from jaxattn.ops.lstm import BidirectionalWeights, LSTMWeights

Layers = tuple[LSTMWeights | BidirectionalWeights, ...]
_KEY = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


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
        raise KeyError(f"no LSTM tensors 'weight_ih_l0'... found under prefix {prefix!r}")
    if layers != set(range(len(layers))):
        raise KeyError(f"LSTM layer indices under {prefix!r} are not 0..L-1: {sorted(layers)}")
    return len(layers), reverse, bias


def _direction(state, prefix: str, layer: int, suffix: str, in_size: int | None, bias: bool):
    w_ih_name = f"{prefix}weight_ih_l{layer}{suffix}"
    w_hh_name = f"{prefix}weight_hh_l{layer}{suffix}"
    if w_hh_name not in state:
        raise KeyError(f"missing tensor {w_hh_name!r}")
    g = int(np.shape(state[w_hh_name])[0])
    h = g // 4
    w_hh = get(state, w_hh_name, (4 * h, h))
    if in_size is None:  # layer 0: the input size is whatever the checkpoint says
        if w_ih_name not in state:
            raise KeyError(f"missing tensor {w_ih_name!r}")
        in_size = int(np.shape(state[w_ih_name])[-1])
    w_ih = get(state, w_ih_name, (4 * h, in_size))
    if bias:
        b = get(state, f"{prefix}bias_ih_l{layer}{suffix}", (4 * h,)) + get(
            state, f"{prefix}bias_hh_l{layer}{suffix}", (4 * h,)
        )
    else:
        b = np.zeros((4 * h,), w_ih.dtype)
    return LSTMWeights(jnp.asarray(w_ih.T), jnp.asarray(w_hh.T), jnp.asarray(b)), h


def lstm_from_torch(module_or_state_dict: Any, *, prefix: str = "") -> Layers:
    """Import a ``torch.nn.LSTM`` (module or state dict) as ``lstm_stack`` layers.

    ``num_layers``, ``bidirectional`` and ``bias`` are read from the tensor names; with
    ``bias=False`` the imported ``b`` is zeros. The module's ``batch_first`` does not affect
    the weights (``lstm_stack`` always takes ``[B, T, I]``).

    Args:
      module_or_state_dict: a ``torch.nn.LSTM`` or its ``state_dict()`` (torch tensors or
        arrays).
      prefix: prepended to every name, e.g. ``"encoder.rnn."`` for a submodule's entries in
        a whole model's state dict.

    Returns:
      A tuple with one ``LSTMWeights`` (or ``BidirectionalWeights``) per layer, as
      ``init_lstm_stack`` returns.

    Raises:
      KeyError: a tensor is missing (the message names it).
      ValueError: a tensor has the wrong shape (name, expected and actual shape), or the LSTM
        uses ``proj_size``.
    """
    state = state_dict_of(module_or_state_dict)
    num_layers, bidirectional, bias = _scan_keys(state, prefix)
    layers, in_size, hidden = [], None, None
    for layer in range(num_layers):
        dirs = []
        for suffix in ("", "_reverse") if bidirectional else ("",):
            w, h = _direction(state, prefix, layer, suffix, in_size, bias)
            if hidden is not None and h != hidden:
                raise ValueError(
                    f"{prefix}weight_hh_l{layer}{suffix}: hidden size {h} differs from "
                    f"layer 0's {hidden}"
                )
            hidden = h
            dirs.append(w)
        layers.append(BidirectionalWeights(*dirs) if bidirectional else dirs[0])
        in_size = hidden * len(dirs)
    return tuple(layers)


def lstm_to_torch_state_dict(
    layers: Layers, *, prefix: str = "", framework: str = "pt"
) -> dict[str, Any]:
    """Export ``lstm_stack`` layers as a ``torch.nn.LSTM`` state dict.

    Load it with ``torch.nn.LSTM(I, h, num_layers=L, bidirectional=..., batch_first=True)
    .load_state_dict(sd)``. ``bias_ih = b`` and ``bias_hh = 0`` (see the module docstring).

    Args:
      layers: from ``init_lstm_stack`` or ``lstm_from_torch``.
      prefix: prepended to every name.
      framework: ``"pt"`` for torch tensors, ``"np"`` for NumPy arrays.

    Returns:
      ``{name: tensor}`` with ``weight_ih_l{l}[_reverse] [4h, I]`` etc.
    """
    check_framework(framework)
    if not layers:
        raise ValueError("lstm_to_torch_state_dict: got no layers")
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
            out[f"{prefix}bias_ih_l{layer}{suffix}"] = export(b, framework)
            out[f"{prefix}bias_hh_l{layer}{suffix}"] = export(np.zeros_like(b), framework)
    return out
