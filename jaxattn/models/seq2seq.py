"""LSTM encoder–decoder with optional attention: the "let's go" -> "vamos" model.

Shape glossary: B batch, S source time, T target time, E embedding dim, h LSTM hidden
size, L layers, V target vocab.

The encoder (Sutskever et al., 2014, "Sequence to Sequence Learning with Neural
Networks") reads the embedded source with a stacked, optionally bidirectional LSTM; the
decoder LSTM starts from the encoder's final state and is fed its previous target token.
Without attention that final state is the whole message. With attention (Luong et al.,
2015, "Effective Approaches to Attention-based Neural Machine Translation") each decoder
output ``h_t`` scores every encoder output ``m_s`` (dot, general or additive), and::

    a_t = softmax_s(score(h_t, m_s))         # zero on source padding
    c_t = sum_s a_ts m_s                     # context
    h~_t = tanh(W_c [c_t; h_t] + b_c)        # Luong's attentional hidden state (eq. 5)
    logits_t = W_s h~_t + b_s                # without attention: W_s h_t + b_s

Attention joins after the LSTM and is not fed back into it (no "input feeding"), so in
teacher forcing one ``lax.scan`` runs the decoder and all T attention steps are one
batched matmul.

Bidirectional encoder: its outputs ``[fwd; bwd]`` (2h) are projected to h by a bias-free
dense layer ``memory`` so that every score (dot included) and the context have size h;
the decoder's initial state per layer is the sum of the two directions' final (h, c)
(parameter-free; a dense "bridge" is the alternative).

Batch dict (``seq2seq_loss``, also used by the transformer): ``src [B, S]`` and
``src_lengths [B]`` (real tokens first, then padding), ``tgt_in [B, T]`` (BOS y_1 ..
y_n), ``tgt_out [B, T]`` (y_1 .. y_n EOS) and ``tgt_mask [B, T]`` (True on the n + 1 real
target positions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.models import beam_search as search
from jaxattn.models._config import (
    check_bools,
    check_dropout_rng,
    check_finite,
    check_key,
    check_positive_ints,
    check_rate,
    check_size,
    check_special_ids,
    check_weights,
    config_checker,
    float32_argument,
)
from jaxattn.ops._checks import check_flag
from jaxattn.ops.attention import (
    AdditiveWeights,
    additive_scores,
    attend,
    dot_scores,
    general_scores,
    init_additive,
    init_general,
)
from jaxattn.ops.layers import (
    DenseWeights,
    EmbeddingWeights,
    as_floating,
    check_token_ids,
    dense,
    dropout,
    embed,
    ids_to_check,
    init_dense,
    init_embedding,
)
from jaxattn.ops.losses import check_counted_ids, cross_entropy
from jaxattn.ops.lstm import (
    IMPLEMENTATIONS,
    BidirectionalWeights,
    LSTMWeights,
    check_pair,
    init_lstm_stack,
    lstm_cell,
    lstm_stack,
)
from jaxattn.ops.masks import as_bool_mask, check_lengths, padding_mask

Array = jax.Array
Carry = tuple[Array, Array]
ATTENTION = ("none", "dot", "general", "additive")


# A pytree with no leaves: jit, vmap, grad and scan pass the config through as static data,
# so `jax.jit(f)(weights, ..., config)` needs no static_argnames (one compile per config).
@jax.tree_util.register_static
@dataclass(frozen=True)
class Seq2SeqConfig:
    """Seq2seq hyper-parameters; frozen and hashable (a static ``jit`` argument)."""

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int  # E, both embeddings
    hidden_size: int  # h, every LSTM layer (per direction in the encoder)
    num_layers: int = 1  # L, encoder and decoder alike
    bidirectional_encoder: bool = False
    attention: str = "none"  # "none", "dot", "general" or "additive"
    attention_dim: int | None = None  # additive attention's hidden size (default h)
    dropout: float = 0.0  # on embeddings, between LSTM layers and before the output layer
    forget_bias: float = 1.0  # added to the LSTM forget gates at init (Jozefowicz et al.)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    # ops.lstm_scan's kernel: None (the hand-written backward), or "autodiff" for forward
    # mode (jax.jvp) and every higher derivative, or "cudnn" on a GPU.
    lstm_implementation: str | None = None

    def __post_init__(self):
        check_positive_ints(
            self, ("src_vocab_size", "tgt_vocab_size", "embed_dim", "hidden_size", "num_layers")
        )
        if self.lstm_implementation not in (None, *IMPLEMENTATIONS):
            raise ValueError(
                f"Seq2SeqConfig.lstm_implementation must be None or one of "
                f"{IMPLEMENTATIONS}, got {self.lstm_implementation!r}"
            )
        check_bools(self, ("bidirectional_encoder",))
        if self.attention not in ATTENTION:
            raise ValueError(
                f"Seq2SeqConfig.attention must be one of {ATTENTION}, got {self.attention!r}"
            )
        if self.attention_dim is not None and self.attention != "additive":
            raise ValueError(
                f"Seq2SeqConfig.attention_dim={self.attention_dim} needs attention='additive', "
                f"got attention={self.attention!r}"
            )
        if self.attention_dim is not None:  # 2.5 failed in init naming no field; True was 1
            check_positive_ints(self, ("attention_dim",))
        check_finite(self, "forget_bias")  # NaN would reach every forget-gate bias
        check_rate(self, "dropout")
        check_special_ids(self, min(self.src_vocab_size, self.tgt_vocab_size))


class Seq2SeqWeights(NamedTuple):
    """All seq2seq parameters (float32); ``None`` where the config has no such part."""

    src_embedding: EmbeddingWeights  # [Vs, E]
    tgt_embedding: EmbeddingWeights  # [V, E]
    encoder: tuple[LSTMWeights | BidirectionalWeights, ...]  # L layers
    decoder: tuple[LSTMWeights, ...]  # L layers, hidden h
    memory: DenseWeights | None  # [2h, h], no bias: bidirectional outputs -> h (attention only)
    attention: Array | AdditiveWeights | None  # general W [h, h] or additive weights
    combine: DenseWeights | None  # W_c [2h, h], b_c [h] over [c; h] (attention only)
    output: DenseWeights  # W_s [h, V], b_s [V]


def init_seq2seq(rng: Array, config: Seq2SeqConfig) -> Seq2SeqWeights:
    """Initialise: N(0, 1) embeddings (PyTorch's), PyTorch's LSTM init plus
    ``config.forget_bias`` on the forget gates' bias (1.0 by default), N(0, 1/fan_in) dense."""
    _check_config(config, "init_seq2seq")
    check_key(rng, "init_seq2seq")
    keys = jax.random.split(rng, 8)
    e, h, att = config.embed_dim, config.hidden_size, config.attention
    lstm = functools.partial(
        init_lstm_stack,
        hidden_size=h,
        num_layers=config.num_layers,
        forget_bias=config.forget_bias,
    )
    attention = None
    if att == "general":
        attention = init_general(keys[4], h, h)
    elif att == "additive":
        attention = init_additive(keys[4], h, h, config.attention_dim or h)
    use_memory = att != "none" and config.bidirectional_encoder
    return Seq2SeqWeights(
        src_embedding=init_embedding(keys[0], config.src_vocab_size, e, std=1.0),
        tgt_embedding=init_embedding(keys[1], config.tgt_vocab_size, e, std=1.0),
        encoder=lstm(keys[2], e, bidirectional=config.bidirectional_encoder),
        decoder=lstm(keys[3], e),
        memory=init_dense(keys[5], 2 * h, h, use_bias=False) if use_memory else None,
        attention=attention,
        combine=init_dense(keys[6], 2 * h, h) if att != "none" else None,
        output=init_dense(keys[7], h, config.tgt_vocab_size),
    )


# Each public function's argument order, for the error that names a swapped config.
_check_config = config_checker(
    Seq2SeqConfig,
    {
        "init_seq2seq": "init_seq2seq(rng, config)",
        "encode": "encode(weights, src, src_lengths, config)",
        "init_decode_state": "init_decode_state(final_state, config)",
        "seq2seq_logits": "seq2seq_logits(weights, src, src_lengths, tgt_in, config)",
        "seq2seq_loss": "seq2seq_loss(weights, batch, config)",
        "decode_step": "decode_step(weights, state, token, encoder_outputs, src_mask, config)",
        "translate": "translate(weights, config, src, src_lengths)",
    },
)


def weight_decay_mask(weights: Seq2SeqWeights) -> Any:
    """True for the leaves nanoGPT's rule decays: matrices and embedding tables, here every
    leaf with ``ndim >= 2`` (optax's default rule is right for this tree: no leaf is stacked
    over layers). False for biases and additive attention's ``v``. Not the name rule of
    ``gpt`` and ``transformer``: general attention's ``[h, h]`` matrix is a bare array."""
    return jax.tree.map(lambda leaf: jnp.ndim(leaf) >= 2, weights)


def _split(rng: Array | None, n: int, active: bool) -> tuple[Array | None, ...]:
    return tuple(jax.random.split(rng, n)) if active else (None,) * n


def _as_source(src, src_lengths, config: Seq2SeqConfig, where: str) -> tuple[Array, Array]:
    """Check ``src [B, S]`` (ids checked before ``jnp.asarray``, see ``ids_to_check``) and
    ``src_lengths [B]``, then return both as JAX arrays."""
    src = ids_to_check(src)
    if src.ndim != 2 or jnp.shape(src_lengths) != src.shape[:1]:
        raise ValueError(
            f"{where}: expected src [B, S] and src_lengths [B], got {src.shape} and "
            f"{jnp.shape(src_lengths)}"
        )
    check_token_ids(src, config.src_vocab_size, f"{where}: src ids")
    # translate() jits its encoder, where lstm_scan's check would see only a tracer.
    src_lengths = check_lengths(src_lengths, src.shape[0], src.shape[1], f"{where}: src_lengths")
    return jnp.asarray(src), src_lengths


def encode(
    weights: Seq2SeqWeights,
    src: Array,
    src_lengths: Array,
    config: Seq2SeqConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
) -> tuple[Array, Carry]:
    """Run the encoder LSTM over padded source sentences.

    Args:
      src: ``[B, S]`` ids; row b's tokens ``>= src_lengths[b]`` are padding, ignored by the
        model but still checked as ids in ``[0, V)`` (pad with ``pad_id``, not -1).
      src_lengths: ``[B]`` integers in ``[0, S]``.
      rng: dropout key (needed when ``deterministic=False`` and ``config.dropout > 0``).

    Returns:
      ``(outputs [B, S, h'], (h_n, c_n) [L*dirs, B, h])``: the encoder outputs (zero on
      padding; ``h' = h`` when attention reads them, else ``dirs * h``) and PyTorch-layout
      final states (row ``l * dirs + d``).
    """
    _check_config(config, "encode")
    return _encode(weights, src, src_lengths, config, rng, deterministic, "encode")


def _encode(weights, src, src_lengths, config, rng, deterministic, where: str):
    """``encode``, its errors naming ``where`` (the function the user called)."""
    check_weights(weights, init_seq2seq, config, where)
    src, src_lengths = _as_source(src, src_lengths, config, where)
    active = not check_flag(deterministic, "deterministic", where) and config.dropout > 0
    check_dropout_rng(rng, active, where)
    rng_embed, rng_lstm = _split(rng, 2, active)
    x = dropout(
        rng_embed, embed(weights.src_embedding, src), config.dropout, deterministic=not active
    )
    ys, final = lstm_stack(
        weights.encoder,
        x,
        lengths=src_lengths,
        dropout_rate=config.dropout,
        rng=rng_lstm,
        deterministic=not active,
        implementation=config.lstm_implementation,
    )
    if weights.memory is not None:
        ys = dense(weights.memory, ys)  # [B, S, h]; zero stays zero (no bias)
    return ys, final


def init_decode_state(final_state: Carry, config: Seq2SeqConfig) -> Carry:
    """Decoder's initial state from the encoder's: as is, or summed over the two directions.

    Args:
      final_state: ``(h_n, c_n)``, each ``[L*dirs, B, h]`` from ``encode``.

    Returns:
      ``(h, c)``, each ``[L, B, h]``.
    """
    _check_config(config, "init_decode_state")
    dirs = 2 if config.bidirectional_encoder else 1
    check_pair(final_state, "final_state", "(h_n, c_n) (encode's)", "init_decode_state")
    h_n, c_n = final_state
    layers, hidden = config.num_layers * dirs, config.hidden_size
    for name, x in (("h_n", h_n), ("c_n", c_n)):
        shape = jnp.shape(x)  # [L*dirs, h] too: one example of a vmap over B
        if len(shape) not in (2, 3) or (shape[0], shape[-1]) != (layers, hidden):
            raise ValueError(
                f"init_decode_state: {name} must be [L*dirs, B, h] with L*dirs = {layers} "
                f"and h = {hidden}, as encode returns it; got shape {shape}"
            )
    if jnp.shape(c_n) != jnp.shape(h_n):
        raise ValueError(
            f"init_decode_state: h_n {jnp.shape(h_n)} and c_n {jnp.shape(c_n)} differ in shape"
        )
    if dirs == 1:
        return final_state
    lb = (config.num_layers, 2, *h_n.shape[1:])
    return h_n.reshape(lb).sum(1), c_n.reshape(lb).sum(1)  # [L, B, h]


def _scores(weights: Seq2SeqWeights, query: Array, memory: Array, config: Seq2SeqConfig) -> Array:
    """Score ``query [B, T, h]`` against ``memory [B, S, h]`` -> ``[B, T, S]``."""
    if config.attention == "dot":
        return dot_scores(query, memory)
    if config.attention == "general":
        return general_scores(weights.attention, query, memory)
    return additive_scores(weights.attention, query, memory)


def _head(
    weights: Seq2SeqWeights,
    dec_out: Array,
    memory: Array,
    src_mask: Array,
    config: Seq2SeqConfig,
    rng: Array | None,
    active: bool,
) -> tuple[Array, Array | None]:
    """Attention and output layer: ``dec_out [B, T, h]`` -> (logits [B, T, V], a [B, T, S])."""
    hidden, weights_ts = dec_out, None
    if config.attention != "none":
        if memory.shape[1] == 0:
            # S = 0: nothing to attend to, as for a row of src_lengths 0 (zero weights, zero
            # context); masked_softmax cannot reduce an empty axis.
            b, t = dec_out.shape[:2]
            context = jnp.zeros((b, t, memory.shape[-1]), dec_out.dtype)  # [B, T, memory width]
            weights_ts = jnp.zeros((b, t, 0), jnp.float32)
        else:
            scores = _scores(weights, dec_out, memory, config)  # [B, T, S]
            context, weights_ts = attend(scores, memory, src_mask[:, None, :])  # [B, T, h]
        hidden = jnp.tanh(dense(weights.combine, jnp.concatenate([context, dec_out], -1)))
    hidden = dropout(rng, hidden, config.dropout, deterministic=not active)
    return dense(weights.output, hidden).astype(jnp.float32), weights_ts


def seq2seq_logits(
    weights: Seq2SeqWeights,
    src: Array,
    src_lengths: Array,
    tgt_in: Array,
    config: Seq2SeqConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
) -> tuple[Array, Array | None]:
    """Teacher-forced decoding: the decoder reads ``tgt_in`` (BOS, then the true tokens).

    ``jax.jit`` treats ``config`` as static by itself (a pytree with no leaves); make
    ``deterministic`` static when you pass it (``static_argnames="deterministic"``).

    Args:
      src: ``[B, S]`` ids, ``src_lengths: [B]``.
      tgt_in: ``[B, T]`` target ids fed to the decoder; position t sees ``tgt_in[:, :t+1]``.
      rng: dropout key; deterministic: disable dropout.

    Returns:
      ``(logits [B, T, V] float32, attention [B, T, S] float32 or None)``; attention rows sum
      to 1 over the real source tokens and are 0 on padding.
    """
    _check_config(config, "seq2seq_logits")
    return _teacher_forced(
        weights, src, src_lengths, tgt_in, config, rng, deterministic, "seq2seq_logits"
    )


def _teacher_forced(weights, src, src_lengths, tgt_in, config, rng, deterministic, where: str):
    """``seq2seq_logits``, its errors naming ``where`` (the function the user called)."""
    if jnp.ndim(src) != 2:  # (else the check below blamed tgt_in for a 1-D src)
        raise ValueError(f"{where}: src must be [B, S], got {jnp.shape(src)}")
    tgt_in = ids_to_check(tgt_in)
    if tgt_in.ndim != 2 or tgt_in.shape[0] != jnp.shape(src)[0]:
        raise ValueError(
            f"{where}: tgt_in must be [B, T], got {tgt_in.shape} for src {jnp.shape(src)}"
        )
    check_token_ids(tgt_in, config.tgt_vocab_size, f"{where}: tgt_in ids")
    tgt_in = jnp.asarray(tgt_in)
    active = not check_flag(deterministic, "deterministic", where) and config.dropout > 0
    check_dropout_rng(rng, active, where)
    rng_enc, rng_embed, rng_lstm, rng_out = _split(rng, 4, active)
    memory, final = _encode(weights, src, src_lengths, config, rng_enc, deterministic, where)
    x = dropout(
        rng_embed, embed(weights.tgt_embedding, tgt_in), config.dropout, deterministic=not active
    )
    dec_out, _ = lstm_stack(
        weights.decoder,
        x,
        init_decode_state(final, config),
        dropout_rate=config.dropout,
        rng=rng_lstm,
        deterministic=not active,
        implementation=config.lstm_implementation,
    )
    src_mask = padding_mask(jnp.asarray(src_lengths), memory.shape[1])  # [B, S]
    return _head(weights, dec_out, memory, src_mask, config, rng_out, active)


def check_batch(batch: dict, tgt_vocab_size: int, where: str) -> None:
    """Raise ``ValueError`` unless ``batch`` holds the documented keys with matching shapes."""
    keys = ("src", "src_lengths", "tgt_in", "tgt_out", "tgt_mask")
    missing = [key for key in keys if key not in batch]
    if missing:
        raise ValueError(f"{where}: batch lacks {missing}; it needs {keys}")
    shapes = {key: jnp.shape(batch[key]) for key in keys[2:]}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: tgt_in, tgt_out and tgt_mask must be [B, T], got {shapes}")
    # (tgt_out where tgt_mask is 0 may hold any integer: the loss drops it)
    targets, mask = ids_to_check(batch["tgt_out"]), batch["tgt_mask"]
    check_counted_ids(targets, mask, tgt_vocab_size, f"{where}: tgt_out ids")


def seq2seq_loss(
    weights: Seq2SeqWeights,
    batch: dict,
    config: Seq2SeqConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
    label_smoothing: float = 0.0,
) -> Array:
    """Teacher-forced cross-entropy per real target token (``ops.losses.cross_entropy``).

    Args:
      batch: dict with ``src, src_lengths, tgt_in, tgt_out, tgt_mask`` (module docstring).

    Returns:
      Scalar float32 loss.
    """
    _check_config(config, "seq2seq_loss")
    check_batch(batch, config.tgt_vocab_size, "seq2seq_loss")
    src, lengths, tgt_in = batch["src"], batch["src_lengths"], batch["tgt_in"]
    logits, _ = _teacher_forced(
        weights, src, lengths, tgt_in, config, rng, deterministic, "seq2seq_loss"
    )
    return cross_entropy(
        logits, batch["tgt_out"], batch["tgt_mask"], label_smoothing=label_smoothing
    )


def decode_step(
    weights: Seq2SeqWeights,
    state: Carry,
    token: Array,
    encoder_outputs: Array,
    src_mask: Array,
    config: Seq2SeqConfig,
) -> tuple[Array, Carry, Array | None]:
    """Decode one token for inference (no dropout); equals ``seq2seq_logits`` step by step.

    Args:
      state: ``(h, c)``, each ``[L, B, h]``: from ``init_decode_state`` or the last step.
      token: ``[B]`` the previous token (BOS first).
      encoder_outputs: ``[B, S, h']`` from ``encode``.
      src_mask: ``[B, S]`` boolean (or 0/1 integers), True on real source tokens.

    Returns:
      ``(logits [B, V] float32, new state, attention [B, S] or None)``.
    """
    _check_config(config, "decode_step")
    check_weights(weights, init_seq2seq, config, "decode_step")
    token = ids_to_check(token)
    check_token_ids(token, config.tgt_vocab_size, "decode_step: token ids")
    token = jnp.asarray(token)
    layout = "(h, c), each [L, B, h] (init_decode_state's or the last step's)"
    check_pair(state, "state", layout, "decode_step")
    h, c = (jnp.asarray(a) for a in state)  # (nested lists too, as token)
    want = (config.num_layers, token.shape[0] if token.ndim == 1 else -1, config.hidden_size)
    if token.ndim != 1 or h.shape != want or c.shape != want:
        raise ValueError(
            f"decode_step: expected token [B] and state (h, c) of shape {want}, got token "
            f"{token.shape}, h {h.shape}, c {c.shape}"
        )
    encoder_outputs = as_floating(encoder_outputs, "encoder_outputs", "decode_step")
    if jnp.shape(src_mask) != encoder_outputs.shape[:2] or encoder_outputs.shape[0] != want[1]:
        raise ValueError(
            f"decode_step: encoder_outputs [B, S, h'] and src_mask [B, S] disagree with B="
            f"{want[1]}: {encoder_outputs.shape}, {jnp.shape(src_mask)}"
        )
    # 0/1 integers read as booleans, a float (additive) mask refused naming this function,
    # as transformer.decode_step does; masked_softmax refused both, naming itself.
    src_mask = as_bool_mask(src_mask, "src_mask", "decode_step")
    x = embed(weights.tgt_embedding, token)  # [B, E]
    new_h, new_c = [], []
    for layer, w in enumerate(weights.decoder):
        h_l, c_l = lstm_cell(w, (h[layer], c[layer]), x)
        new_h.append(h_l)
        new_c.append(c_l)
        x = h_l
    logits, attention = _head(weights, x[:, None], encoder_outputs, src_mask, config, None, False)
    attention = None if attention is None else attention[:, 0]
    return logits[:, 0], (jnp.stack(new_h), jnp.stack(new_c)), attention


# length_penalty (a float32 scalar) only feeds arithmetic: a new value reuses the program.
@functools.partial(jax.jit, static_argnames=("config", "beam_size", "max_len"))
def _translate(weights, src, src_lengths, config, beam_size, max_len, length_penalty):
    memory, final = encode(weights, src, src_lengths, config)
    src_mask = padding_mask(src_lengths, src.shape[1])  # [B, S]
    state = init_decode_state(final, config)
    # Every beam of a sentence reads the same encoder outputs: repeat them once, here.
    memory_k = jnp.repeat(memory, beam_size, axis=0)
    mask_k = jnp.repeat(src_mask, beam_size, axis=0)

    def logits_fn(token, state):  # [B*k] -> logits [B*k, V]
        logits, state, _ = decode_step(weights, state, token, memory_k, mask_k, config)
        return logits, state

    return search.decode_sequences(
        logits_fn,
        state,
        src.shape[0],
        beam_size=beam_size,
        max_len=max_len,
        bos_id=config.bos_id,
        eos_id=config.eos_id,
        pad_id=config.pad_id,
        length_penalty=length_penalty,
        state_batch_axis=1,
        forbidden=(config.pad_id, config.bos_id),  # never generated
    )


def translate(
    weights: Seq2SeqWeights,
    config: Seq2SeqConfig,
    src: Array,
    src_lengths: Array,
    *,
    beam_size: int = 1,
    max_len: int = 50,
    length_penalty: float = 0.6,
) -> Array:
    """Translate a batch of source sentences: greedy (``beam_size=1``) or beam search.

    The decoder never emits pad or BOS (their logits are set to -inf).

    Compiled once per (source shape, config, beam size, max_len).

    Args:
      src: ``[B, S]`` ids; src_lengths: ``[B]``.
      beam_size: int, 1 = greedy; k > 1 = beam search with the GNMT length penalty.
      length_penalty: the penalty's alpha, a finite number >= 0 (checked for greedy too,
        which does not use it), or a traced scalar; it is not compiled in, so a new value
        reuses the program.
      max_len: int, most target tokens (EOS included); an LSTM has no position limit.

    Returns:
      ``[B, max_len]`` int32 target ids without BOS, ending in EOS (unless cut at max_len)
      and padded with ``pad_id``.
    """
    _check_config(config, "translate")
    check_weights(weights, init_seq2seq, config, "translate")
    src, src_lengths = _as_source(src, src_lengths, config, "translate")
    check_size(src.shape[0], "src's batch size B", "translate")
    beam_size = check_size(beam_size, "beam_size", "translate")
    max_len = check_size(max_len, "max_len", "translate")
    length_penalty = search.check_length_penalty(length_penalty, "translate", max_len)
    length_penalty = float32_argument(length_penalty)  # traced: no compile per value
    return _translate(weights, src, src_lengths, config, beam_size, max_len, length_penalty)
