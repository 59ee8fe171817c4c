"""Convert Hugging Face ``transformers`` GPT-2 weights to and from ``jaxattn.models.gpt``.

Shape glossary: L layers, N heads, H head dim, D model dim, F MLP width, V vocab, P
positions (``n_positions``, jaxattn's ``block_size``).

GPT-2 stores its linear layers as ``Conv1D`` with the weight already ``[in, out]`` (jaxattn's
layout, no transpose): ``attn.c_attn.weight [D, 3D]`` holds q, k, v side by side (columns
n H .. (n+1) H - 1 of each third are head n), ``attn.c_proj.weight [D, D]``,
``mlp.c_fc.weight [D, F]``, ``mlp.c_proj.weight [F, D]``; ``wte [V, D]``, learned
positions ``wpe [P, D]``, and ``lm_head.weight`` tied to ``wte``. Its ``"gelu_new"`` is the
tanh GELU (``GPTConfig.gelu_approximate=True``).
"""

from __future__ import annotations

import functools
import os
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
    read_safetensors,
    refuse_unread,
    state_dict_of,
)
from jaxattn.models._config import check_weights
from jaxattn.models.gpt import BlockWeights, GPTConfig, GPTWeights, init_gpt
from jaxattn.ops.attention import MultiHeadAttentionWeights
from jaxattn.ops.layers import DenseWeights, EmbeddingWeights, FeedForwardWeights, LayerNormWeights
from jaxattn.ops.positions import LearnedPositionWeights

# Prefixes of a wrapped model's state dict: DistributedDataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_GELU = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


def gpt2_config_from_hf(hf_config: Any, **overrides: Any) -> GPTConfig:
    """Build the ``GPTConfig`` of a ``transformers.GPT2Config`` (or its ``to_dict()``).

    Dropout is 0 (inference); pass ``dropout=...`` (or any other ``GPTConfig`` field) in
    ``overrides`` to change it. Raises ValueError for GPT-2 options jaxattn does not
    implement (``scale_attn_by_inverse_layer_idx``, unscaled attention, other activations,
    cross-attention, an MLP width that is not a multiple of D).
    """
    if isinstance(hf_config, dict):
        c = hf_config
    elif callable(getattr(hf_config, "to_dict", None)):
        c = hf_config.to_dict()
    else:  # else an AttributeError about to_dict, for None or a path
        raise TypeError(
            "gpt2_config_from_hf: expected a transformers.GPT2Config or its to_dict(), got "
            f"{type(hf_config).__name__}"
        )
    missing = [
        k for k in ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size") if k not in c
    ]
    if missing:  # else a bare KeyError: 'vocab_size'
        raise KeyError(f"gpt2_config_from_hf: the GPT-2 config has no {', '.join(missing)}")
    d = c["n_embd"]
    inner = c.get("n_inner") or 4 * d
    act = c.get("activation_function", "gelu_new")
    problems = []
    if inner % d:
        problems.append(f"n_inner={inner} is not a multiple of n_embd={d}")
    if act not in _GELU:
        problems.append(f"activation_function={act!r} (supported: {sorted(_GELU)})")
    if c.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if not c.get("scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if c.get("add_cross_attention", False):
        problems.append("add_cross_attention=True")
    if problems:
        raise ValueError("gpt2_config_from_hf: unsupported GPT-2 options: " + "; ".join(problems))
    fields = dict(
        vocab_size=c["vocab_size"],
        block_size=c["n_positions"],
        num_layers=c["n_layer"],
        num_heads=c["n_head"],
        embed_dim=d,
        mlp_ratio=inner // d,
        dropout=0.0,
        use_bias=True,
        positions="learned",
        tie_embeddings=c.get("tie_word_embeddings", True),
        layer_norm_eps=c.get("layer_norm_epsilon", 1e-5),
        gelu_approximate=_GELU[act],
    )
    fields.update(overrides)
    return GPTConfig(**fields)


def _load_state(source: Any) -> dict[str, Any]:
    """A state dict from a module, a mapping or a ``.safetensors`` path; drop the prefix."""
    if isinstance(source, (str, os.PathLike)):
        from safetensors.numpy import load_file

        state = read_safetensors(source, load_file)
    else:
        state = dict(state_dict_of(source))
    # GPT2LMHeadModel prefixes "transformer."; GPT2Model and the hub's files do not. A
    # wrapper's state dict (saved from DistributedDataParallel, or torch.compile's
    # OptimizedModule, as nanoGPT's checkpoints are) puts "module." / "_orig_mod." before
    # it: gpt2_from_hf takes no prefix=, so those are dropped too.
    names = {}
    for key, value in state.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        name = name.removeprefix("transformer.")
        if name in names:  # one of the two would silently win
            raise ValueError(
                f"gpt2_from_hf: the source holds {name!r} twice (with and without the "
                f"prefixes {('transformer.', *_WRAPPER_PREFIXES)})"
            )
        names[name] = value
    return names


def _check_config(config: GPTConfig, where: str) -> None:
    bad = []
    if config.positions != "learned":
        bad.append(f"positions={config.positions!r} (GPT-2 has learned positions)")
    if not config.use_bias:
        bad.append("use_bias=False (GPT-2's layers all have biases)")
    if config.kv_heads != config.num_heads:
        bad.append(f"num_kv_heads={config.num_kv_heads} (GPT-2 has a K/V head per query head)")
    if config.attention_window is not None:  # the same weights, another function
        bad.append(f"attention_window={config.attention_window} (GPT-2 sees its whole context)")
    if bad:
        raise ValueError(
            f"{where}: GPT-2's layout has no place for a GPTConfig with " + ", ".join(bad)
        )


def gpt2_from_hf(source: Any, config: GPTConfig, *, strict: bool = True) -> GPTWeights:
    """Import GPT-2 weights from a ``GPT2LMHeadModel``/``GPT2Model``, its state dict, or a
    ``model.safetensors`` path.

    The ``attn.bias``/``attn.masked_bias`` causal-mask buffers of older ``transformers`` are
    not weights and are skipped; with ``config.tie_embeddings`` a stored ``lm_head.weight``
    must equal ``wte`` (it is a copy), and stands for it in a source without ``wte`` (a
    file that kept the tied pair's other name, as ``safetensors.torch.save_model`` does).
    Blocks beyond ``config.num_layers`` are an error, not dropped.

    Args:
      source: module, ``{name: tensor or array}``, or a path to a ``.safetensors`` file.
        Names may start with ``transformer.``, and before it with the ``module.`` or
        ``_orig_mod.`` of a ``DistributedDataParallel`` or ``torch.compile`` wrapper.
      config: from ``gpt2_config_from_hf``.
      strict: refuse tensors that GPT-2's layout has no place for (a misspelt name,
        cross-attention, another head such as ``score.weight``), as PyTorch's
        ``load_state_dict`` does; False skips them.

    Returns:
      float32 ``GPTWeights`` with blocks stacked ``[L, ...]``.

    Raises:
      KeyError: a tensor is missing (the message names it and its expected shape).
      ValueError: a tensor's shape differs (name, expected and actual shape), the source
        has more blocks than ``config.num_layers``, a tied config meets an untied head, or
        (``strict``) the source holds tensors the layout has no place for.
    """
    _check_config(config, "gpt2_from_hf")
    state = _load_state(source)
    if config.tie_embeddings and "wte.weight" not in state and "lm_head.weight" in state:
        # A tied pair saved once under the other name (safetensors.torch.save_model keeps
        # lm_head.weight): the same tensor, else "missing tensor 'wte.weight'".
        state["wte.weight"] = state.pop("lm_head.weight")
    blocks = {k.split(".")[1] for k in state if k.startswith("h.")}
    if not all(b.isdigit() for b in blocks):  # else int()'s message, naming no tensor
        bad = next(k for k in state if k.startswith("h.") and not k.split(".")[1].isdigit())
        raise ValueError(f"gpt2_from_hf: tensor {bad!r} does not name a block h.<int>")
    extra = sorted(blocks, key=int)
    extra = [i for i in extra if int(i) >= config.num_layers]
    if extra:
        raise ValueError(
            f"gpt2_from_hf: the source has blocks h.{extra[0]}..h.{extra[-1]} beyond "
            f"config.num_layers={config.num_layers}"
        )
    state = ReadLog(state)
    read = functools.partial(get, state)  # (name, shape) -> array, noting the name
    d, n, h, f, v = (config.embed_dim, config.num_heads, config.head_dim, config.mlp_dim,
                     config.vocab_size)  # fmt: skip
    f32 = lambda a: np.asarray(a, np.float32)

    def layer_norm(name: str) -> LayerNormWeights:
        scale = f32(read(f"{name}.weight", (d,)))
        return LayerNormWeights(scale, f32(read(f"{name}.bias", (d,))))

    blocks = []
    for i in range(config.num_layers):
        p = f"h.{i}."
        w_qkv = f32(read(p + "attn.c_attn.weight", (d, 3 * d))).reshape(d, 3, n, h)
        b_qkv = f32(read(p + "attn.c_attn.bias", (3 * d,))).reshape(3, n, h)
        attn = MultiHeadAttentionWeights(
            w_q=w_qkv[:, 0], w_k=w_qkv[:, 1], w_v=w_qkv[:, 2],
            w_o=f32(read(p + "attn.c_proj.weight", (d, d))).reshape(n, h, d),
            b_q=b_qkv[0], b_k=b_qkv[1], b_v=b_qkv[2],
            b_o=f32(read(p + "attn.c_proj.bias", (d,))),
        )  # fmt: skip
        mlp = FeedForwardWeights(
            up=DenseWeights(f32(read(p + "mlp.c_fc.weight", (d, f))),
                            f32(read(p + "mlp.c_fc.bias", (f,)))),
            down=DenseWeights(f32(read(p + "mlp.c_proj.weight", (f, d))),
                              f32(read(p + "mlp.c_proj.bias", (d,)))),
        )  # fmt: skip
        blocks.append(BlockWeights(layer_norm(p + "ln_1"), attn, layer_norm(p + "ln_2"), mlp))
    stacked = jax.tree.map(lambda *leaves: jnp.asarray(np.stack(leaves)), *blocks)
    wte = f32(read("wte.weight", (v, d)))
    head = None
    if not config.tie_embeddings:
        head = DenseWeights(jnp.asarray(f32(read("lm_head.weight", (v, d))).T), None)
    # equal_nan: a tied model's lm_head is wte itself, NaNs (a diverged run) and all.
    elif "lm_head.weight" in state and not np.array_equal(
        f32(read("lm_head.weight", (v, d))), wte, equal_nan=True
    ):
        raise ValueError(
            "gpt2_from_hf: config.tie_embeddings is True but the source's lm_head.weight "
            "differs from wte.weight (an untied model: use tie_embeddings=False)"
        )
    position_table = f32(read("wpe.weight", (config.block_size, d)))
    ln_f = jax.tree.map(jnp.asarray, layer_norm("ln_f"))
    if strict:  # (old transformers' causal-mask buffers are not weights)
        refuse_unread(state, "gpt2_from_hf", skip=(".attn.bias", ".attn.masked_bias"))
    return GPTWeights(
        token_embedding=EmbeddingWeights(jnp.asarray(wte)),
        position_embedding=LearnedPositionWeights(jnp.asarray(position_table)),
        blocks=stacked,
        ln_f=ln_f,
        head=head,
    )


def gpt2_to_hf_state_dict(
    weights: GPTWeights, config: GPTConfig, *, framework: str = "pt"
) -> dict[str, Any]:
    """Export ``GPTWeights`` as a ``GPT2LMHeadModel`` state dict.

    Load it with ``GPT2LMHeadModel(hf_config).load_state_dict(sd)``, where ``hf_config`` has
    ``n_embd=D, n_head=N, n_layer=L, n_positions=block_size, vocab_size=V, n_inner=F``,
    ``activation_function="gelu_new"`` (or ``"gelu"`` if not ``gelu_approximate``),
    ``layer_norm_epsilon`` and ``tie_word_embeddings`` matching ``config``. With tied
    embeddings ``lm_head.weight`` is a separate copy of ``wte`` (safetensors refuses shared
    tensors).

    Args:
      framework: ``"pt"`` for torch tensors, ``"np"`` for NumPy arrays.

    Returns:
      ``{"transformer.wte.weight": [V, D], ..., "lm_head.weight": [V, D]}``.
    """
    check_framework(framework)
    _check_config(config, "gpt2_to_hf_state_dict")
    d, f = config.embed_dim, config.mlp_dim
    np_w = jax.tree.map(np.asarray, pure_weights_of(weights))  # a jaxattn.nn.GPT too
    b = np_w.blocks
    if (np_w.head is None) != config.tie_embeddings:
        has = "no output head (tied)" if np_w.head is None else "their own output head"
        raise ValueError(
            f"gpt2_to_hf_state_dict: the weights have {has} but config.tie_embeddings is "
            f"{config.tie_embeddings}; a tied GPT2LMHeadModel would load lm_head into wte"
        )
    # Every other shape (layers, widths, vocabulary, block size) against the config.
    check_weights(np_w, init_gpt, config, "gpt2_to_hf_state_dict")
    a = b.attn
    out: dict[str, np.ndarray] = {
        "transformer.wte.weight": np_w.token_embedding.table,
        "transformer.wpe.weight": np_w.position_embedding.table,
    }
    for i in range(config.num_layers):
        p = f"transformer.h.{i}."
        w_qkv = np.stack([a.w_q[i], a.w_k[i], a.w_v[i]], axis=1).reshape(d, 3 * d)
        out.update({
            p + "ln_1.weight": b.ln1.scale[i], p + "ln_1.bias": b.ln1.bias[i],
            p + "attn.c_attn.weight": w_qkv,
            p + "attn.c_attn.bias": np.stack([a.b_q[i], a.b_k[i], a.b_v[i]]).reshape(3 * d),
            p + "attn.c_proj.weight": a.w_o[i].reshape(d, d),
            p + "attn.c_proj.bias": a.b_o[i],
            p + "ln_2.weight": b.ln2.scale[i], p + "ln_2.bias": b.ln2.bias[i],
            p + "mlp.c_fc.weight": b.mlp.up.w[i].reshape(d, f), p + "mlp.c_fc.bias": b.mlp.up.b[i],
            p + "mlp.c_proj.weight": b.mlp.down.w[i], p + "mlp.c_proj.bias": b.mlp.down.b[i],
        })  # fmt: skip
    out["transformer.ln_f.weight"] = np_w.ln_f.scale
    out["transformer.ln_f.bias"] = np_w.ln_f.bias
    head = np_w.token_embedding.table if np_w.head is None else np_w.head.w.T
    out["lm_head.weight"] = head
    return {k: export(val, framework) for k, val in out.items()}
