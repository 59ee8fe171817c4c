"""Encoder–decoder Transformer (Vaswani et al., 2017, "Attention Is All You Need").

Shape glossary: B batch, S source time, T target time, L layers, N heads, H head dim,
D model dim, F MLP width, V target vocab.

::

    x = embed_src(src) * sqrt(D) + PE[:S]              # sinusoidal positions
    encoder layer:  x = x + SelfAttn(LN(x); key = real source token)
                    x = x + MLP(LN(x))
    memory = LN_enc(x)
    y = embed_tgt(tgt_in) * sqrt(D) + PE[:T]
    decoder layer:  y = y + SelfAttn(LN(y); causal)
                    y = y + CrossAttn(LN(y), memory; key = real source token)
                    y = y + MLP(LN(y))
    logits = LN_dec(y) E_tgtᵀ                          # tied, or a dense head

That is the pre-LN arrangement (Xiong et al., 2020, "On Layer Normalization in the
Transformer Architecture"), which trains without warm-up tricks; ``pre_ln=False`` gives
the paper's post-LN ``x = LN(x + sublayer(x))`` with no final norms. The MLP is
jaxattn's GELU feed-forward (the paper used ReLU).

Layers of each stack are stacked along a leading axis ``[L, ...]`` and run with
``lax.scan`` (compile time flat in depth), as in ``gpt.py``. Incremental decoding keeps a
``KVCache`` of the decoder's self-attention keys/values (``[L, B, T_max, N, H]``, written
one step at a time) and computes the cross-attention keys/values once per source batch
(``cross_kv``); ``decode_step`` then equals ``decode``'s teacher-forced logits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.models import beam_search as search
from jaxattn.models._config import (
    attention_options,
    cast_floating,
    check_attention_implementation,
    check_bools,
    check_compute_dtype,
    check_dropout_rng,
    check_key,
    check_positive,
    check_positive_ints,
    check_rate,
    check_size,
    check_special_ids,
    check_weights,
    checkpointed_layer,
    config_checker,
    float32_argument,
    weight_decay_mask,  # noqa: F401 (public here: the model's weight-decay rule)
)
from jaxattn.models.gpt import KVCache, cache_index, check_kv_cache, empty_kv_cache
from jaxattn.models.seq2seq import check_batch
from jaxattn.ops._checks import check_flag, jit_when_eager
from jaxattn.ops.attention import (
    MultiHeadAttentionWeights,
    cached_attention,
    dot_product_attention,
    init_multi_head_attention,
    project_output,
    project_qkv,
)
from jaxattn.ops.layers import (
    DenseWeights,
    EmbeddingWeights,
    FeedForwardWeights,
    LayerNormWeights,
    as_floating,
    check_token_ids,
    dense,
    dropout,
    embed,
    feed_forward,
    ids_to_check,
    init_dense,
    init_embedding,
    init_feed_forward,
    init_layer_norm,
    layer_norm,
    project,
    to_rank,
    unembed,
)
from jaxattn.ops.losses import check_label_smoothing, chunked_cross_entropy, cross_entropy
from jaxattn.ops.masks import as_bool_mask, check_lengths, padding_mask
from jaxattn.ops.positions import sinusoidal_positions

Array = jax.Array


# A pytree with no leaves: jit, vmap, grad and scan pass the config through as static data,
# so `jax.jit(f)(weights, ..., config)` needs no static_argnames (one compile per config).
@jax.tree_util.register_static
@dataclass(frozen=True)
class TransformerConfig:
    """Transformer hyper-parameters; frozen and hashable (a static ``jit`` argument)."""

    src_vocab_size: int
    tgt_vocab_size: int
    embed_dim: int  # D
    num_heads: int  # N, H = D / N
    num_encoder_layers: int
    num_decoder_layers: int
    mlp_ratio: int = 4  # F = mlp_ratio * D
    dropout: float = 0.0  # embeddings, attention probabilities, residual branches
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    max_len: int = 256  # longest source or target (the position table's length)
    tie_embeddings: bool = True  # output layer = target embedding transposed
    pre_ln: bool = True  # False: the paper's post-LN
    # Compute dtype; params, softmax and loss stay float32 (the logits: the bfloat16 output
    # product cast to float32, as in GPTConfig).
    dtype: str = "float32"
    remat: bool = False  # recompute each layer in the backward pass (saves memory)
    layer_norm_eps: float = 1e-5
    attention_implementation: str | None = None  # see ops.attention.dot_product_attention
    # transformer_loss takes the output layer and the loss this many target positions at a
    # time ([B, chunk, V] logits, as GPTConfig.loss_chunk_size); None = all at once.
    loss_chunk_size: int | None = None

    def __post_init__(self):
        check_positive_ints(
            self,
            (
                "src_vocab_size",
                "tgt_vocab_size",
                "embed_dim",
                "num_heads",
                "num_encoder_layers",
                "num_decoder_layers",
                "mlp_ratio",
                "max_len",
            ),
        )
        check_bools(self, ("tie_embeddings", "pre_ln", "remat"))
        check_positive(self, "layer_norm_eps")
        if self.embed_dim % self.num_heads or self.embed_dim % 2:
            raise ValueError(
                f"TransformerConfig: embed_dim={self.embed_dim} must be even (sinusoidal "
                f"positions) and divisible by num_heads={self.num_heads}"
            )
        check_rate(self, "dropout")
        check_compute_dtype(self)
        check_attention_implementation(self)
        check_special_ids(self, min(self.src_vocab_size, self.tgt_vocab_size))
        if self.loss_chunk_size is not None:
            check_positive_ints(self, ("loss_chunk_size",))

    @property
    def head_dim(self) -> int:
        """H = D / N."""
        return self.embed_dim // self.num_heads

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class EncoderLayerWeights(NamedTuple):
    """One encoder layer; in ``TransformerWeights.encoder`` every leaf has a leading ``[L]``."""

    ln1: LayerNormWeights
    attn: MultiHeadAttentionWeights
    ln2: LayerNormWeights
    mlp: FeedForwardWeights


class DecoderLayerWeights(NamedTuple):
    """One decoder layer; in ``TransformerWeights.decoder`` every leaf has a leading ``[L]``."""

    ln1: LayerNormWeights
    self_attn: MultiHeadAttentionWeights
    ln2: LayerNormWeights
    cross_attn: MultiHeadAttentionWeights
    ln3: LayerNormWeights
    mlp: FeedForwardWeights


class TransformerWeights(NamedTuple):
    """All parameters (float32); the final norms exist only for pre-LN."""

    src_embedding: EmbeddingWeights  # [Vs, D]
    tgt_embedding: EmbeddingWeights  # [V, D]
    encoder: EncoderLayerWeights  # stacked [Le, ...]
    encoder_norm: LayerNormWeights | None
    decoder: DecoderLayerWeights  # stacked [Ld, ...]
    decoder_norm: LayerNormWeights | None
    head: DenseWeights | None  # [D, V] without bias; None when tied


class CrossKV(NamedTuple):
    """Cross-attention keys and values of every decoder layer: ``k, v: [Ld, B, S, N, H]``."""

    k: Array
    v: Array


# Each public function's argument order, for the error that names a swapped config.
_check_config = config_checker(
    TransformerConfig,
    {
        "init_transformer": "init_transformer(rng, config)",
        "encode": "encode(weights, src, src_lengths, config)",
        "cross_kv": "cross_kv(weights, memory, config)",
        "decode": "decode(weights, memory, src_mask, tgt_in, config)",
        "transformer_logits": "transformer_logits(weights, src, src_lengths, tgt_in, config)",
        "transformer_loss": "transformer_loss(weights, batch, config)",
        "init_cache": "init_cache(config, batch_size, max_len)",
        "decode_step": "decode_step(weights, cache, token, cross, src_mask, config)",
        "translate": "translate(weights, config, src, src_lengths)",
    },
)


def init_transformer(rng: Array, config: TransformerConfig) -> TransformerWeights:
    """Initialise: N(0, 1/D) embeddings (unit variance after the sqrt(D) scale), N(0, 1/fan_in)
    projections, zero biases, unit layer norms."""
    _check_config(config, "init_transformer")
    check_key(rng, "init_transformer")
    d, n, f = config.embed_dim, config.num_heads, config.mlp_ratio * config.embed_dim
    keys = jax.random.split(rng, 5)
    attn = functools.partial(init_multi_head_attention, q_dim=d, num_heads=n)
    norm = functools.partial(init_layer_norm, d)

    def encoder_layer(key):
        k_attn, k_mlp = jax.random.split(key)
        return EncoderLayerWeights(norm(), attn(k_attn), norm(), init_feed_forward(k_mlp, d, f))

    def decoder_layer(key):
        k_self, k_cross, k_mlp = jax.random.split(key, 3)
        return DecoderLayerWeights(
            norm(), attn(k_self), norm(), attn(k_cross), norm(), init_feed_forward(k_mlp, d, f)
        )

    std = 1.0 / math.sqrt(d)
    return TransformerWeights(
        src_embedding=init_embedding(keys[0], config.src_vocab_size, d, std=std),
        tgt_embedding=init_embedding(keys[1], config.tgt_vocab_size, d, std=std),
        encoder=jax.vmap(encoder_layer)(jax.random.split(keys[2], config.num_encoder_layers)),
        encoder_norm=norm() if config.pre_ln else None,
        decoder=jax.vmap(decoder_layer)(jax.random.split(keys[3], config.num_decoder_layers)),
        decoder_norm=norm() if config.pre_ln else None,
        head=(
            None
            if config.tie_embeddings
            else init_dense(keys[4], d, config.tgt_vocab_size, use_bias=False)
        ),
    )


def _embed(table: EmbeddingWeights, tokens: Array, positions: Array, config) -> Array:
    """``embed(tokens) * sqrt(D) + PE[positions]``: ``[B, T]`` -> ``[B, T, D]``."""
    pe = sinusoidal_positions(config.max_len, config.embed_dim, dtype=table.table.dtype)
    x = embed(table, tokens) * math.sqrt(config.embed_dim)  # [B, T, D]
    return x + to_rank(jnp.take(pe, positions, axis=0), x.ndim)  # (explicit: see to_rank)


def _sublayer(x, ln, fn, config, rate, rng):
    """Residual sublayer around ``fn(h) -> (out, aux)``: pre-LN or post-LN; returns (x, aux)."""
    eps = config.layer_norm_eps
    if config.pre_ln:
        out, aux = fn(layer_norm(ln, x, eps=eps))
        return x + dropout(rng, out, rate), aux
    out, aux = fn(x)
    return layer_norm(ln, x + dropout(rng, out, rate), eps=eps), aux


def _keys(rng: Array | None, n: int) -> tuple[Array | None, ...]:
    return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def _attention(config, rate, rng, q, k, v, **kw) -> Array:
    """``dot_product_attention`` with the config's kernel and attention dropout."""
    return dot_product_attention(q, k, v, **kw, **attention_options(config, rate, rng))


def _encoder_layer(lw: EncoderLayerWeights, x, mask, config, rate, rng):
    r_attn, r1, r2 = _keys(rng, 3)

    def self_attention(h):
        ctx = _attention(config, rate, r_attn, *project_qkv(lw.attn, h), mask=mask)
        return project_output(lw.attn, ctx), None

    x, _ = _sublayer(x, lw.ln1, self_attention, config, rate, r1)
    x, _ = _sublayer(x, lw.ln2, lambda h: (feed_forward(lw.mlp, h), None), config, rate, r2)
    return x


def _decoder_layer(lw: DecoderLayerWeights, y, cross, mask, config, rate, rng, cache=None):
    """One decoder layer; for incremental decoding ``cache = (k, v, index, layer,
    slot_rows)``: every decoder layer's caches stacked, ``[Ld, B, T_max, N, H]``, this
    layer's index, and ``decode_step``'s ``slot_rows``.

    Returns ``(y [B, T, D], (k, v) the stacks with this step written, or None)``.
    """
    r_self, r_cross, r1, r2, r3 = _keys(rng, 5)

    def self_attention(h):
        q, k, v = project_qkv(lw.self_attn, h)  # [B, T, N, H]
        if cache is None:
            ctx = _attention(config, rate, r_self, q, k, v, is_causal=True)
            return project_output(lw.self_attn, ctx), None
        k_cache, v_cache, index, layer, slot_rows = cache
        ctx, *new_cache = cached_attention(
            q, k, v, k_cache, v_cache, index, layer=layer, slot_rows=slot_rows,
            **attention_options(config, rate, r_self),
        )  # fmt: skip
        return project_output(lw.self_attn, ctx), tuple(new_cache)

    def cross_attention(h):
        q = project(h, lw.cross_attn.w_q, lw.cross_attn.b_q)  # [B, T, N, H]
        ctx = _attention(config, rate, r_cross, q, cross[0], cross[1], mask=mask)
        return project_output(lw.cross_attn, ctx), None

    y, new_cache = _sublayer(y, lw.ln1, self_attention, config, rate, r1)
    y, _ = _sublayer(y, lw.ln2, cross_attention, config, rate, r2)
    y, _ = _sublayer(y, lw.ln3, lambda h: (feed_forward(lw.mlp, h), None), config, rate, r3)
    return y, new_cache


def _as_tokens(tokens, vocab: int, config: TransformerConfig, what: str) -> Array:
    """Check ``tokens [B, T]`` (ids checked before ``jnp.asarray``, see ``ids_to_check``),
    then convert them."""
    tokens = ids_to_check(tokens)
    # (T = 0: else an error from inside attention, naming q and k rather than this input)
    if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= config.max_len:
        raise ValueError(
            f"{what} must be [B, T] with 1 <= T <= max_len={config.max_len}, got {tokens.shape}"
        )
    check_token_ids(tokens, vocab, what)
    return jnp.asarray(tokens)


def _dropout_setup(rng, deterministic, config, where) -> tuple[float, Array | None]:
    rate = 0.0 if check_flag(deterministic, "deterministic", where) else config.dropout
    check_dropout_rng(rng, rate > 0, where)
    return rate, (rng if rate > 0 else None)


def _scan_layers(body, x, xs, config):
    return jax.lax.scan(checkpointed_layer(body, config.remat), x, xs)


# The layer stacks are jitted for eager calls: run eagerly, a scan over a fresh closure was
# traced and compiled anew on every call.
@functools.partial(jit_when_eager, static_argnames="rate")
def _encoder_stack(layers, x, mask, layer_keys, config: TransformerConfig, rate: float) -> Array:
    def body(x, layer):
        lw, key = layer
        return _encoder_layer(lw, x, mask, config, rate, key), None

    return _scan_layers(body, x, (layers, layer_keys), config)[0]


@functools.partial(jit_when_eager, static_argnames="rate")
def _decoder_stack(layers, y, cross, mask, layer_keys, config: TransformerConfig, rate: float):
    def body(y, layer):
        lw, k, v, key = layer
        return _decoder_layer(lw, y, (k, v), mask, config, rate, key)[0], None

    return _scan_layers(body, y, (layers, cross.k, cross.v, layer_keys), config)[0]


@jit_when_eager
def _decoder_step_stack(
    layers, y, cache: KVCache, cross, mask, slot_rows, config: TransformerConfig
):
    # The stacked caches ride in the carry, each layer writing only its new row: as the
    # scan's inputs and outputs they were rebuilt whole (zero-filled, copied) per step.
    def body(carry, layer):
        y, k_cache, v_cache = carry
        lw, k, v, i = layer
        step_cache = (k_cache, v_cache, cache.index, i, slot_rows)
        y, (k_cache, v_cache) = _decoder_layer(
            lw, y, (k, v), mask, config, 0.0, None, cache=step_cache
        )
        return (y, k_cache, v_cache), None

    index = jnp.arange(cache.k.shape[0], dtype=jnp.int32)
    (y, k, v), _ = jax.lax.scan(body, (y, cache.k, cache.v), (layers, cross.k, cross.v, index))
    return y, (k, v)


def encode(
    weights: TransformerWeights,
    src: Array,
    src_lengths: Array,
    config: TransformerConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
) -> Array:
    """Encode padded source sentences.

    Args:
      src: ``[B, S]`` ids, ``S <= max_len``; row b's tokens ``>= src_lengths[b]`` are padding.
      src_lengths: ``[B]`` integers in ``[0, S]`` (checked when concrete).
      rng: dropout key; deterministic: disable dropout.

    Returns:
      ``memory [B, S, D]`` in the compute dtype (padding rows are defined but never read).
    """
    _check_config(config, "encode")
    return _encode(weights, src, src_lengths, config, rng, deterministic, "encode")


def _encode(weights, src, src_lengths, config, rng, deterministic, where: str) -> Array:
    """``encode``, its errors naming ``where`` (the function the user called)."""
    check_weights(weights, init_transformer, config, where)
    src = _as_tokens(src, config.src_vocab_size, config, f"{where}: src")
    # (B = 0: else an error from inside attention, naming neither the function nor src)
    check_size(src.shape[0], "src's batch size B", where)
    src_lengths = check_lengths(src_lengths, src.shape[0], src.shape[1], f"{where}: src_lengths")
    rate, rng = _dropout_setup(rng, deterministic, config, where)
    w = cast_floating(weights, config.compute_dtype)
    r_embed, r_layers = _keys(rng, 2)
    x = dropout(r_embed, _embed(w.src_embedding, src, jnp.arange(src.shape[1]), config), rate)
    mask = padding_mask(src_lengths, src.shape[1])[:, None, None, :]  # [B, 1, 1, S]
    layer_keys = None if rng is None else jax.random.split(r_layers, config.num_encoder_layers)
    x = _encoder_stack(w.encoder, x, mask, layer_keys, config, rate)
    return x if w.encoder_norm is None else layer_norm(w.encoder_norm, x, eps=config.layer_norm_eps)


def cross_kv(weights: TransformerWeights, memory: Array, config: TransformerConfig) -> CrossKV:
    """Project ``memory [B, S, D]`` to every decoder layer's cross-attention keys and values.

    Returns:
      ``CrossKV(k, v)``, each ``[Ld, B, S, N, H]`` in the compute dtype.
    """
    _check_config(config, "cross_kv")
    check_weights(weights, init_transformer, config, "cross_kv")
    # (Else another rank came out silently mislabelled: [S, D] gave k [Ld, S, N, H].)
    memory = as_floating(memory, "memory", "cross_kv")  # (a nested list too, as decode's)
    if memory.ndim != 3 or memory.shape[-1] != config.embed_dim:
        raise ValueError(
            f"cross_kv: memory must be [B, S, D={config.embed_dim}] (encode's output), got "
            f"{memory.shape}"
        )
    attn = cast_floating(weights.decoder.cross_attn, config.compute_dtype)
    memory = memory.astype(config.compute_dtype)
    kv = lambda a: (project(memory, a.w_k, a.b_k), project(memory, a.w_v, a.b_v))
    return CrossKV(*jax.vmap(kv)(attn))


def _logits(w: TransformerWeights, y: Array, config: TransformerConfig) -> Array:
    if w.decoder_norm is not None:
        y = layer_norm(w.decoder_norm, y, eps=config.layer_norm_eps)
    out = unembed(w.tgt_embedding, y) if w.head is None else dense(w.head, y)
    return out.astype(jnp.float32)


def decode(
    weights: TransformerWeights,
    memory: Array,
    src_mask: Array,
    tgt_in: Array,
    config: TransformerConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
) -> Array:
    """Teacher-forced decoding of ``tgt_in`` (BOS, then the true tokens) against ``memory``.

    Args:
      memory: ``[B, S, D]`` from ``encode``.
      src_mask: ``[B, S]`` boolean, True on real source tokens.
      tgt_in: ``[B, T]`` ids; position t sees ``tgt_in[:, :t+1]``.

    Returns:
      ``[B, T, V]`` float32 logits.
    """
    _check_config(config, "decode")
    y, w = _decoder_hidden(weights, memory, src_mask, tgt_in, config, rng, deterministic, "decode")
    return _logits(w, y, config)


def _decoder_hidden(
    weights: TransformerWeights,
    memory: Array,
    src_mask: Array,
    tgt_in: Array,
    config: TransformerConfig,
    rng: Array | None,
    deterministic: bool,
    where: str,
) -> tuple[Array, TransformerWeights]:
    """``decode`` up to the output layer: ``(y [B, T, D] the decoder stack's output, the
    weights cast to the compute dtype)``; errors name ``where``, the function called."""
    check_weights(weights, init_transformer, config, where)
    tgt_in = _as_tokens(tgt_in, config.tgt_vocab_size, config, f"{where}: tgt_in")
    check_size(tgt_in.shape[0], "tgt_in's batch size B", where)  # (as encode's src)
    # A nested list, as tgt_in and src_mask may be (failed on memory.ndim).
    memory = as_floating(memory, "memory", where)
    if (
        memory.ndim != 3
        or jnp.shape(src_mask) != memory.shape[:2]
        or (memory.shape[0] != tgt_in.shape[0])
    ):
        raise ValueError(
            f"{where}: expected memory [B, S, D], src_mask [B, S], tgt_in [B, T], "
            f"got {memory.shape}, {jnp.shape(src_mask)}, {tgt_in.shape}"
        )
    rate, rng = _dropout_setup(rng, deterministic, config, where)
    w = cast_floating(weights, config.compute_dtype)
    cross = cross_kv(weights, memory, config)
    r_embed, r_layers = _keys(rng, 2)
    positions = jnp.arange(tgt_in.shape[1])
    y = dropout(r_embed, _embed(w.tgt_embedding, tgt_in, positions, config), rate)
    mask = as_bool_mask(src_mask, "src_mask", where)[:, None, None, :]  # [B, 1, 1, S]
    layer_keys = None if rng is None else jax.random.split(r_layers, config.num_decoder_layers)
    return _decoder_stack(w.decoder, y, cross, mask, layer_keys, config, rate), w


def transformer_logits(
    weights: TransformerWeights,
    src: Array,
    src_lengths: Array,
    tgt_in: Array,
    config: TransformerConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
) -> Array:
    """``decode(encode(src), tgt_in)``: teacher-forced logits ``[B, T, V]`` (float32)."""
    _check_config(config, "transformer_logits")
    y, w = _teacher_forced(
        weights, src, src_lengths, tgt_in, config, rng, deterministic, "transformer_logits"
    )
    return _logits(w, y, config)


def _teacher_forced(
    weights: TransformerWeights,
    src: Array,
    src_lengths: Array,
    tgt_in: Array,
    config: TransformerConfig,
    rng: Array | None,
    deterministic: bool,
    where: str,
) -> tuple[Array, TransformerWeights]:
    """``transformer_logits`` up to the output layer: ``(y [B, T, D], cast weights)``."""
    # Checked before the split: an int seed or a batch of keys failed inside jax.random, and
    # an unused key (dropout off) was split all the same, failing where encode ignores it.
    _, rng = _dropout_setup(rng, deterministic, config, where)
    r_enc, r_dec = _keys(rng, 2)
    memory = _encode(weights, src, src_lengths, config, r_enc, deterministic, where)
    # (else decode's check named memory and src_mask, which the caller never passed)
    tgt_in = _as_tokens(tgt_in, config.tgt_vocab_size, config, f"{where}: tgt_in")
    if tgt_in.shape[0] != memory.shape[0]:
        raise ValueError(
            f"{where}: src [B, S] and tgt_in [B, T] must share B, got src "
            f"{memory.shape[:2]} and tgt_in {tgt_in.shape}"
        )
    src_mask = padding_mask(jnp.asarray(src_lengths), memory.shape[1])
    return _decoder_hidden(weights, memory, src_mask, tgt_in, config, r_dec, deterministic, where)


def transformer_loss(
    weights: TransformerWeights,
    batch: dict,
    config: TransformerConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
    label_smoothing: float = 0.0,
) -> Array:
    """Cross-entropy per real target token; ``batch`` as in ``seq2seq`` (src, src_lengths,
    tgt_in, tgt_out, tgt_mask). Returns a float32 scalar.

    With ``config.loss_chunk_size`` the output layer and the loss run that many target
    positions at a time (``ops.chunked_cross_entropy``): the same loss, with ``[B, chunk,
    V]`` logits in memory instead of ``[B, T, V]``.
    """
    _check_config(config, "transformer_loss")
    check_batch(batch, config.tgt_vocab_size, "transformer_loss")
    src, lengths, tgt_in = batch["src"], batch["src_lengths"], batch["tgt_in"]
    y, w = _teacher_forced(
        weights, src, lengths, tgt_in, config, rng, deterministic, "transformer_loss"
    )
    targets, mask = batch["tgt_out"], batch["tgt_mask"]
    if config.loss_chunk_size is None:
        logits = _logits(w, y, config)  # [B, T, V]
        return cross_entropy(logits, targets, mask, label_smoothing=label_smoothing)
    # A Python float from here on (static below), or the tracer of a scheduled value.
    label_smoothing = check_label_smoothing(label_smoothing, "transformer_loss")
    return _chunked_loss(w, y, targets, mask, config, label_smoothing=label_smoothing)


# Jitted for eager calls (as the layer stacks): the chunk loop's closure is built per call.
@functools.partial(jit_when_eager, static_argnames="label_smoothing")
def _chunked_loss(w, y, targets, mask, config: TransformerConfig, *, label_smoothing):
    """``transformer_loss`` from the decoder stack's output ``y: [B, T, D]``, in chunks."""
    return chunked_cross_entropy(
        y,
        lambda h: _logits(w, h, config),  # [B, chunk, D] -> [B, chunk, V]
        targets,
        mask,
        chunk_size=config.loss_chunk_size,
        label_smoothing=label_smoothing,
    )


def init_cache(
    config: TransformerConfig, batch_size: int, max_len: int, dtype: str | None = None
) -> KVCache:
    """Empty decoder self-attention cache: ``k, v [Ld, B, max_len, N, H]`` zeros, index 0."""
    _check_config(config, "init_cache")
    layout = (config.num_decoder_layers, config.num_heads, config.head_dim)
    dtype = config.compute_dtype if dtype is None else dtype
    return empty_kv_cache(layout, batch_size, max_len, ("config.max_len", config.max_len), dtype)


def decode_step(
    weights: TransformerWeights,
    cache: KVCache,
    token: Array,
    cross: CrossKV,
    src_mask: Array,
    config: TransformerConfig,
    *,
    slot_rows: Array | None = None,
) -> tuple[Array, KVCache]:
    """Decode one token at position ``cache.index`` (no dropout).

    Args:
      cache: ``KVCache(k, v [Ld, B, T_max, N, H], index)``; the caller keeps index < T_max.
      token: ``[B]`` the previous token (BOS first).
      cross: ``cross_kv(weights, memory, config)``.
      src_mask: ``[B, S]`` boolean, True on real source tokens.
      slot_rows: ``[B, T_max]`` int32 or None: row b reads slot s of cache row
        ``slot_rows[b, s]`` (``ops.cached_attention``), with ``slot_rows[b, index] = b``;
        beam search follows its hypotheses' ancestors this way instead of reordering the
        cache. None: every row reads its own. Concrete values outside ``[0, B)`` raise.

    Returns:
      ``(logits [B, V] float32, cache with this step's keys/values and index + 1)``.
    """
    _check_config(config, "decode_step")
    check_weights(weights, init_transformer, config, "decode_step")
    check_kv_cache(cache, "decode_step")
    if not isinstance(cross, CrossKV):  # (e.g. encode's memory: "... has no attribute 'k'")
        raise ValueError(
            f"decode_step: cross must be a CrossKV (cross_kv(weights, memory, config)), got "
            f"{type(cross).__name__}"
        )
    # Checked before jnp.asarray (see ids_to_check), naming decode_step as seq2seq's does.
    token = ids_to_check(token)
    check_token_ids(token, config.tgt_vocab_size, "decode_step: token ids")
    token = jnp.asarray(token)
    # (a per-layer tuple, gpt.unstack_layers' layout, has ndim 5 too: "... no attribute 'shape'")
    shape = lambda a: f"a tuple of {len(a)}" if isinstance(a, tuple) else jnp.shape(a)
    if isinstance(cache.k, tuple) or jnp.ndim(cache.k) != 5 or shape(cache.v) != shape(cache.k):
        raise ValueError(  # (else "not enough values to unpack (expected 5, got 4)")
            f"decode_step: cache k and v must be [Ld, B, T_max, N, H] (init_cache(config, B, "
            f"T_max)), got k {shape(cache.k)}, v {shape(cache.v)}"
        )
    layers, b, t_max, _, _ = cache.k.shape
    if layers != config.num_decoder_layers or cross.k.shape[0] != config.num_decoder_layers:
        raise ValueError(  # (else jax's scan error about mismatched leading axes)
            f"decode_step: config has {config.num_decoder_layers} decoder layers; the cache "
            f"has {layers} and cross k/v {cross.k.shape[0]} (init_cache / cross_kv of it)"
        )
    if token.shape != (b,) or cross.k.shape[1] != b or jnp.shape(src_mask) != cross.k.shape[1:3]:
        raise ValueError(
            f"decode_step: expected token [B={b}], cross k/v [Ld, B, S, N, H] and "
            f"src_mask [B, S], got {token.shape}, {cross.k.shape}, "
            f"{jnp.shape(src_mask)}"
        )
    if t_max > config.max_len:  # positions past the table would embed as NaN (take's fill)
        raise ValueError(
            f"decode_step: the cache holds {t_max} positions, more than "
            f"config.max_len={config.max_len}"
        )
    # (A traced index cannot be checked: the caller keeps 0 <= index < T_max.)
    index = cache_index(cache, "decode_step")
    if index is not None and index >= t_max:
        raise ValueError(f"decode_step: the cache of length {t_max} is full")
    if slot_rows is not None:
        # Here, not only in cached_attention: the decoder stack below is jitted, where the
        # rows are traced and an out-of-range one would silently read row 0 or B - 1.
        check_token_ids(slot_rows, b, "decode_step: slot_rows (cache rows)")
    w = cast_floating(weights, config.compute_dtype)
    positions = jnp.asarray(cache.index)[None]  # [1] (a Python int has no [None])
    y = _embed(w.tgt_embedding, token[:, None], positions, config)  # [B, 1, D]
    mask = as_bool_mask(src_mask, "src_mask", "decode_step")[:, None, None, :]
    y, (k, v) = _decoder_step_stack(w.decoder, y, cache, cross, mask, slot_rows, config)
    return _logits(w, y, config)[:, 0], KVCache(k, v, cache.index + 1)


# length_penalty (a float32 scalar) only feeds arithmetic: a new value reuses the program.
@functools.partial(jax.jit, static_argnames=("config", "beam_size", "max_len"))
def _translate(weights, src, src_lengths, config, beam_size, max_len, length_penalty):
    k = beam_size
    memory = encode(weights, src, src_lengths, config)
    # Every beam of a sentence reads the same cross k/v: repeat them once, here.
    cross = jax.tree.map(lambda a: jnp.repeat(a, k, axis=1), cross_kv(weights, memory, config))
    src_mask = jnp.repeat(padding_mask(src_lengths, src.shape[1]), k, axis=0)  # [B*k, S]

    def logits_fn(token, cache):  # [B*k] -> logits [B*k, V]
        return decode_step(weights, cache, token, cross, src_mask, config)

    # Beam search leaves the cache in place (reordering it by the beams' parents copied it
    # whole twice per step, ~14% of the search's time on CPU): rows[s, r] is the cache row
    # that holds slot s of hypothesis r's history, and attention reads through it.
    def follow_logits_fn(token, state):  # state: (cache, rows [T_max, B*k])
        cache, rows = state
        rows = rows.at[cache.index].set(jnp.arange(rows.shape[1], dtype=jnp.int32))
        logits, cache = decode_step(
            weights, cache, token, cross, src_mask, config, slot_rows=rows.T
        )
        return logits, (cache, rows)

    def reorder(state, parents):  # parents [B*k]: the rows the surviving beams extend
        cache, rows = state
        return cache, jnp.take(rows, parents, axis=1)

    state = init_cache(config, src.shape[0], max_len)
    if k > 1:  # beam search's state: (cache, rows); greedy's rows read their own cache
        rows = jnp.zeros((max_len, src.shape[0]), jnp.int32)  # slot s's set when it is written
        state = (state, rows)
    return search.decode_sequences(
        logits_fn if k == 1 else follow_logits_fn,
        state,
        src.shape[0],
        beam_size=k,
        max_len=max_len,
        bos_id=config.bos_id,
        eos_id=config.eos_id,
        pad_id=config.pad_id,
        length_penalty=length_penalty,
        state_batch_axis=1,
        forbidden=(config.pad_id, config.bos_id),  # never generated
        reorder_state=None if k == 1 else reorder,
    )


def translate(
    weights: TransformerWeights,
    config: TransformerConfig,
    src: Array,
    src_lengths: Array,
    *,
    beam_size: int = 1,
    max_len: int | None = None,
    length_penalty: float = 0.6,
) -> Array:
    """Translate: greedy (``beam_size=1``) or beam search, with the KV cache.

    Args:
      src: ``[B, S]`` ids; src_lengths: ``[B]``.
      beam_size: int, 1 = greedy; k > 1 = beam search with the GNMT length penalty.
      length_penalty: the penalty's alpha, a finite number >= 0 (checked for greedy too,
        which does not use it), or a traced scalar; it is not compiled in, so a new value
        reuses the program.
      max_len: int, most target tokens (EOS included), ``<= config.max_len`` (the position
        table's length); None (the default) means ``min(50, config.max_len)``: 50 as before
        (and as ``seq2seq.translate``), capped for a shorter position table.

    Returns:
      ``[B, max_len]`` int32 ids without BOS, ending in EOS (unless cut) and padded with
      ``pad_id``; pad and BOS are never generated.
    """
    _check_config(config, "translate")
    check_weights(weights, init_transformer, config, "translate")
    src = _as_tokens(src, config.src_vocab_size, config, "translate: src")
    check_size(src.shape[0], "src's batch size B", "translate")
    # Checked here: inside _translate's jit encode() would see only a tracer.
    src_lengths = check_lengths(src_lengths, src.shape[0], src.shape[1], "translate: src_lengths")
    beam_size = check_size(beam_size, "beam_size", "translate")
    max_len = check_size(
        min(50, config.max_len) if max_len is None else max_len, "max_len", "translate"
    )
    if max_len > config.max_len:
        raise ValueError(
            f"translate: need 0 < max_len <= config.max_len={config.max_len}, got {max_len}"
        )
    length_penalty = search.check_length_penalty(length_penalty, "translate", max_len)
    length_penalty = float32_argument(length_penalty)  # traced: no compile per value
    return _translate(weights, src, src_lengths, config, beam_size, max_len, length_penalty)
