"""Convert ``torch.nn.MultiheadAttention`` weights to and from ``MultiHeadAttentionWeights``.

Shape glossary: N heads, H head dim, E = N H embed dim, Dkv key input dim, Dv value input dim.

PyTorch computes ``q = x_q W_q^T + b_q`` with ``W_q [E, E]`` (rows n H .. (n+1) H - 1 are
head n), stored as one ``in_proj_weight [3E, E]`` (q, k, v rows) when ``kdim = vdim = E``
and as ``q_proj_weight [E, E]``, ``k_proj_weight [E, Dkv]``, ``v_proj_weight [E, Dv]``
otherwise; ``in_proj_bias [3E]``, ``out_proj.weight [E, E]``, ``out_proj.bias [E]``.
jaxattn keeps ``w_q [E, N, H]``, ``w_k [Dkv, N, H]``, ``w_v [Dv, N, H]``, ``w_o [N, H, E]``
and per-head biases. ``batch_first`` does not touch the weights. Not supported:
``add_bias_kv`` (``bias_k``/``bias_v``) and ``add_zero_attn`` (it has no weights: detected
only when converting the module, not its state dict).

``multi_head_attention`` feeds one ``x_kv`` to both the key and value projections, so it can
run imported weights only when ``kdim == vdim``; the conversion itself handles any dims.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxattn.interop._tensors import (
    ReadLog,
    check_framework,
    export,
    get,
    missing_tensor,
    pure_weights_of,
    refuse_unread,
    state_dict_of,
    unwrap_compiled,
)
from jaxattn.models._config import check_size
from jaxattn.ops.attention import MultiHeadAttentionWeights


def _heads(w: np.ndarray, num_heads: int) -> np.ndarray:
    """PyTorch ``[N H, Din]`` -> jaxattn ``[Din, N, H]``."""
    return w.T.reshape(w.shape[1], num_heads, w.shape[0] // num_heads)


def mha_from_torch(
    module_or_state_dict: Any,
    *,
    num_heads: int | None = None,
    prefix: str = "",
    strict: bool = True,
) -> MultiHeadAttentionWeights:
    """Import a ``torch.nn.MultiheadAttention`` (module or state dict).

    The module's ``dropout`` is not part of the weights: to train with it, pass it again
    (``multi_head_attention(..., dropout_rate=)``).

    Args:
      module_or_state_dict: the module (``num_heads`` is read from it) or its state dict.
      num_heads: N; required for a state dict (it holds no head count); for a module it must
        equal the module's.
      prefix: prepended to every name, e.g. ``"layers.0.self_attn."``.
      strict: refuse tensors under ``prefix`` that the layout has no place for (a misspelt
        name), as PyTorch's ``load_state_dict`` does; False skips them.

    Returns:
      ``MultiHeadAttentionWeights`` (biases None when the module has ``bias=False``).

    Raises:
      KeyError / ValueError naming a missing or mis-shaped tensor, or (``strict``) one left
      unread.
    """
    # (by name: torch stays an optional dependency, not imported here; a torch.compile'd
    # module is read as the module it wraps, its names without the wrapper's "_orig_mod.")
    module_or_state_dict = unwrap_compiled(module_or_state_dict)
    module_types = [cls.__name__ for cls in type(module_or_state_dict).__mro__]
    if hasattr(module_or_state_dict, "state_dict") and "MultiheadAttention" not in module_types:
        raise ValueError(
            f"mha_from_torch: expected a torch.nn.MultiheadAttention or a state dict, got a "
            f"module of type {type(module_or_state_dict).__name__} (pass its attention module, "
            f"e.g. layer.self_attn, or its state_dict() with prefix= and num_heads=)"
        )
    module_heads = getattr(module_or_state_dict, "num_heads", None)
    if num_heads is None:
        num_heads = module_heads
        if num_heads is None:
            raise ValueError("mha_from_torch: pass num_heads= when converting a state dict")
    num_heads = check_size(num_heads, "num_heads", "mha_from_torch")
    if module_heads is not None and num_heads != module_heads:
        # Another head count splits the same matrices into other heads: a different model.
        raise ValueError(
            f"mha_from_torch: num_heads={num_heads} but the module has num_heads={module_heads}"
        )
    if getattr(module_or_state_dict, "add_zero_attn", False):
        raise ValueError("mha_from_torch: add_zero_attn=True is not supported")
    state = ReadLog(state_dict_of(module_or_state_dict))
    if f"{prefix}bias_k" in state or f"{prefix}bias_v" in state:
        raise ValueError("mha_from_torch: add_bias_kv=True (bias_k/bias_v) is not supported")
    out_name = f"{prefix}out_proj.weight"
    if out_name not in state:  # (a whole layer's state dict: the hint names the prefix)
        raise missing_tensor(state, out_name, "expected shape [E, E]")
    if np.ndim(state[out_name]) != 2:  # (its first axis is read as the embed dim)
        raise ValueError(
            f"tensor {out_name!r} has shape {tuple(np.shape(state[out_name]))}, expected [E, E]"
        )
    e = int(np.shape(state[out_name])[0])
    if e % num_heads:
        raise ValueError(f"{out_name}: embed dim {e} is not divisible by num_heads={num_heads}")
    w_o = get(state, out_name, (e, e))
    if f"{prefix}in_proj_weight" in state:
        w_q, w_k, w_v = np.split(get(state, f"{prefix}in_proj_weight", (3 * e, e)), 3)
    else:
        mats = []
        for name in ("q", "k", "v"):
            key = f"{prefix}{name}_proj_weight"
            if key not in state:
                raise KeyError(
                    f"missing tensor {prefix + 'in_proj_weight'!r} (or {key!r} when kdim/vdim "
                    f"differ from embed_dim)"
                )
            if name != "q" and np.ndim(state[key]) != 2:  # (0-d: IndexError reading Dkv)
                raise ValueError(
                    f"tensor {key!r} has shape {tuple(np.shape(state[key]))}, expected [E, D{name}]"
                )
            d_in = e if name == "q" else int(np.shape(state[key])[-1])
            mats.append(get(state, key, (e, d_in)))
        w_q, w_k, w_v = mats
    # Either bias present means bias=True: a missing partner is an error, not silently None.
    has_bias = f"{prefix}in_proj_bias" in state or f"{prefix}out_proj.bias" in state
    if has_bias:
        b = get(state, f"{prefix}in_proj_bias", (3 * e,)).reshape(3, num_heads, e // num_heads)
        b_o = jnp.asarray(get(state, f"{prefix}out_proj.bias", (e,)))
    if strict:
        refuse_unread(state, "mha_from_torch", prefix)
    return MultiHeadAttentionWeights(
        w_q=jnp.asarray(_heads(w_q, num_heads)),
        w_k=jnp.asarray(_heads(w_k, num_heads)),
        w_v=jnp.asarray(_heads(w_v, num_heads)),
        w_o=jnp.asarray(w_o.T.reshape(num_heads, e // num_heads, e)),
        b_q=jnp.asarray(b[0]) if has_bias else None,
        b_k=jnp.asarray(b[1]) if has_bias else None,
        b_v=jnp.asarray(b[2]) if has_bias else None,
        b_o=b_o if has_bias else None,
    )


def mha_to_torch_state_dict(
    weights: MultiHeadAttentionWeights, *, prefix: str = "", framework: str = "pt"
) -> dict[str, Any]:
    """Export to a ``torch.nn.MultiheadAttention(E, N, kdim=Dkv, vdim=Dv)`` state dict.

    Writes ``in_proj_weight`` when ``Dkv = Dv = E`` and ``q/k/v_proj_weight`` otherwise, as
    PyTorch expects for those dims. Requires ``K = N`` heads, ``N H = E`` and either all four
    biases or none (PyTorch's layout has no room for GQA or partial biases). A
    ``jaxattn.nn.MultiHeadAttention`` module exports its ``pure_weights()``.

    Returns:
      ``{name: tensor}``; ``framework="np"`` gives NumPy arrays instead of torch tensors.
    """
    check_framework(framework)
    weights = pure_weights_of(weights)
    if not isinstance(weights, MultiHeadAttentionWeights):  # else "not enough values to unpack"
        raise TypeError(
            "mha_to_torch_state_dict: expected MultiHeadAttentionWeights (or a "
            f"jaxattn.nn.MultiHeadAttention), got {type(weights).__name__}"
        )
    w_q, w_k, w_v, w_o = (np.asarray(w) for w in weights[:4])
    e, n, h = w_q.shape if w_q.ndim == 3 else (0, 0, 0)  # (0: refused below, naming w_q)
    if w_k.shape[1:] != (n, h) or w_v.shape[1:] != (n, h) or w_o.shape != (n, h, e) or n * h != e:
        raise ValueError(
            "mha_to_torch_state_dict: PyTorch needs w_q [E, N, H], w_k/w_v [D, N, H], "
            f"w_o [N, H, E] with N*H = E; got w_q {w_q.shape}, w_k {w_k.shape}, "
            f"w_v {w_v.shape}, w_o {w_o.shape}"
        )
    biases = weights[4:]
    if any(b is None for b in biases) != all(b is None for b in biases):
        raise ValueError("mha_to_torch_state_dict: PyTorch needs all four biases or none")
    # Each is flattened below: a b_q of another layout ([H, N]) would pass scrambled.
    for name, b, shape in zip(("b_q", "b_k", "b_v", "b_o"), biases, [(n, h)] * 3 + [(e,)]):
        if b is not None and np.shape(b) != shape:
            raise ValueError(
                f"mha_to_torch_state_dict: {name} has shape {np.shape(b)}, expected {shape}"
            )
    mats = [w.reshape(w.shape[0], e).T for w in (w_q, w_k, w_v)]  # each [E, Din]
    out: dict[str, Any] = {}
    if w_k.shape[0] == e and w_v.shape[0] == e:
        out[f"{prefix}in_proj_weight"] = export(np.concatenate(mats), framework)
    else:
        for name, m in zip(("q", "k", "v"), mats):
            out[f"{prefix}{name}_proj_weight"] = export(m, framework)
    if biases[0] is not None:
        qkv_b = np.concatenate([np.asarray(b).reshape(e) for b in biases[:3]])
        out[f"{prefix}in_proj_bias"] = export(qkv_b, framework)
    out[f"{prefix}out_proj.weight"] = export(w_o.reshape(e, e).T, framework)
    if biases[3] is not None:
        out[f"{prefix}out_proj.bias"] = export(np.asarray(biases[3]), framework)
    return out
