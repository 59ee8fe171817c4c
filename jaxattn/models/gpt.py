"""GPT: a decoder-only transformer language model (the nanoGPT / GPT-2 architecture).

``logits = unembed(ln_f(block_L(... block_1(embed(tokens) + pos))))`` where each pre-LN block
is ``x = x + attn(ln1(x))``, ``x = x + mlp(ln2(x))`` with causal multi-head self-attention
(Radford et al., 2019, "Language Models are Unsupervised Multitask Learners").

Shape glossary: B batch, T query time, S key time (cache length), L layers, N heads, K kv
heads, H head dim, D model dim, F MLP width, V vocab.

The blocks' weights are stacked along a leading layer axis ``[L, ...]`` and run with
``lax.scan``, so compile time does not grow with depth. One block function serves both the
full causal pass (``gpt``) and cached decoding (``gpt_decode``). ``generate`` can unroll
the layers instead (``unroll_layers=True``, ``unstack_layers``): slower to compile, but at
batch 1 it takes about 1.7x less time per token on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.models import decoding
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
    check_weights,
    checkpointed_layer,
    config_checker,
    float32_argument,
    weight_decay_mask,  # noqa: F401 (public here: the model's weight-decay rule)
)
from jaxattn.ops._checks import check_flag, check_int_scalar, jit_when_eager
from jaxattn.ops.attention import (
    MultiHeadAttentionWeights,
    cached_attention,
    dot_product_attention,
    head_rows,
    init_multi_head_attention,
    project_output,
    project_qkv,
)
from jaxattn.ops.layers import (
    DenseWeights,
    EmbeddingWeights,
    FeedForwardWeights,
    LayerNormWeights,
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
    to_rank,
    unembed,
)
from jaxattn.ops.losses import check_counted_ids, chunked_cross_entropy, cross_entropy
from jaxattn.ops.masks import check_lengths
from jaxattn.ops.positions import (
    LearnedPositionWeights,
    apply_rope,
    init_learned_positions,
    learned_positions,
)

Array = jax.Array

_POSITIONS = ("learned", "rope")


# A pytree with no leaves: jit, vmap, grad and scan pass the config through as static data,
# so `jax.jit(f)(weights, ..., config)` needs no static_argnames (one compile per config).
@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """GPT hyper-parameters; frozen and hashable, so it can be a static ``jit`` argument."""

    vocab_size: int
    block_size: int  # longest context (the learned position table's length)
    num_layers: int
    num_heads: int
    embed_dim: int
    num_kv_heads: int | None = None  # None = num_heads; fewer = grouped-query attention
    mlp_ratio: int = 4  # F = mlp_ratio * D
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches
    use_bias: bool = True  # biases in dense layers and layer norms
    positions: str = "learned"  # "learned" (GPT-2) or "rope" (rotary, no position table)
    rope_base: float = 10000.0
    tie_embeddings: bool = True  # output layer = token embedding transposed
    # Compute dtype; params, softmax and loss stay float32. In bfloat16 the logits are the
    # output product's bfloat16 result cast to float32 (as under torch.autocast): a float32
    # product would make the largest layer's backward a float32 one.
    dtype: str = "float32"
    remat: bool = False  # jax.checkpoint each block: recompute activations in the backward
    attention_implementation: str | None = None  # passed to dot_product_attention
    layer_norm_eps: float = 1e-5
    gelu_approximate: bool = True  # tanh GELU (GPT-2); False = exact erf GELU (nanoGPT)
    # Sliding-window attention: each token sees itself and the attention_window - 1 tokens
    # before it (Mistral's sliding_window); None = the whole context.
    attention_window: int | None = None
    # gpt_loss takes the output layer and the loss this many positions at a time,
    # recomputing each chunk's logits in the backward: [B, chunk, V] logits in memory
    # instead of [B, T, V] (for large vocabularies); None = all positions at once.
    loss_chunk_size: int | None = None

    def __post_init__(self):
        check_positive_ints(
            self, ("vocab_size", "block_size", "num_layers", "num_heads", "embed_dim", "mlp_ratio")
        )
        check_bools(self, ("use_bias", "tie_embeddings", "remat", "gelu_approximate"))
        check_positive(self, "rope_base")
        check_positive(self, "layer_norm_eps")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"GPTConfig: embed_dim={self.embed_dim} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.num_kv_heads is not None:
            check_positive_ints(self, ("num_kv_heads",))
            if self.num_heads % self.num_kv_heads:
                raise ValueError(
                    f"GPTConfig: num_heads={self.num_heads} must be a multiple of a positive "
                    f"num_kv_heads, got num_kv_heads={self.num_kv_heads}"
                )
        check_rate(self, "dropout")
        if self.positions not in _POSITIONS:
            raise ValueError(
                f"GPTConfig.positions must be one of {_POSITIONS}, got {self.positions!r}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head_dim, got {self.head_dim}")
        check_compute_dtype(self)
        check_attention_implementation(self)
        if self.attention_window is not None:
            check_positive_ints(self, ("attention_window",))
            if self.attention_implementation == "pallas":
                raise ValueError(
                    "GPTConfig: attention_implementation='pallas' takes no attention_window; "
                    "use None or 'blockwise'"
                )
        if self.loss_chunk_size is not None:
            check_positive_ints(self, ("loss_chunk_size",))

    @property
    def local_window_size(self) -> tuple[int, int] | None:
        """``attention_window`` as ``dot_product_attention``'s ``(left, right)``."""
        return None if self.attention_window is None else (self.attention_window - 1, 0)

    @property
    def head_dim(self) -> int:
        """H = D / N."""
        return self.embed_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """K, the number of key/value heads."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def mlp_dim(self) -> int:
        """F, the MLP's hidden width."""
        return self.mlp_ratio * self.embed_dim

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype activations are computed in."""
        return jnp.dtype(self.dtype)


class BlockWeights(NamedTuple):
    """One pre-LN transformer block; in ``GPTWeights.blocks`` every leaf has a leading ``[L]``."""

    ln1: LayerNormWeights
    attn: MultiHeadAttentionWeights
    ln2: LayerNormWeights
    mlp: FeedForwardWeights


class GPTWeights(NamedTuple):
    """All GPT parameters (float32)."""

    token_embedding: EmbeddingWeights  # table [V, D]
    position_embedding: LearnedPositionWeights | None  # table [block_size, D]; None for rope
    blocks: BlockWeights  # stacked: every leaf [L, ...]
    ln_f: LayerNormWeights
    head: DenseWeights | None  # untied output [D, V] (no bias); None when tied


class KVCache(NamedTuple):
    """Keys and values of the tokens decoded so far.

    ``k, v: [L, B, S, K, H]``, or per layer (``unstack_layers``): tuples of L ``[B*K, S, H]``
    (``ops.head_rows``; ``ops.from_head_rows(k[l], B)`` reads one as ``[B, S, K, H]``);
    ``index``: int32 scalar, how many slots are filled: the slot of the next token, and its
    position unless rows are left-padded (``gpt_decode``'s ``start``).
    """

    k: Array
    v: Array
    index: Array


def _init_block(rng: Array, config: GPTConfig) -> BlockWeights:
    """Initialise one block: N(0, 0.02^2) matrices, residual projections scaled by 1/sqrt(2L)."""
    rng_attn, rng_mlp = jax.random.split(rng)
    d, std = config.embed_dim, 0.02
    # GPT-2: the residual stream sums 2L branches, so their output projections shrink.
    out_std = std / math.sqrt(2 * config.num_layers)
    return BlockWeights(
        ln1=init_layer_norm(d, use_bias=config.use_bias),
        attn=init_multi_head_attention(
            rng_attn,
            d,
            config.num_heads,
            head_dim=config.head_dim,
            num_kv_heads=config.kv_heads,
            use_bias=config.use_bias,
            std=std,
            out_std=out_std,
        ),
        ln2=init_layer_norm(d, use_bias=config.use_bias),
        mlp=init_feed_forward(
            rng_mlp, d, config.mlp_dim, use_bias=config.use_bias, std=std, out_std=out_std
        ),
    )


def init_gpt(rng: Array, config: GPTConfig) -> GPTWeights:
    """Initialise GPT weights as nanoGPT does (normal std 0.02, zero biases, unit norms).

    Runs as one jitted program (op-by-op dispatch of the random draws is far slower),
    compiled once per parameter structure: fields that do not change the weights (dropout,
    dtype, remat, ...) are reset so that such configs share the compiled init.

    Returns:
      ``GPTWeights`` (float32) whose ``blocks`` leaves are stacked ``[L, ...]``.
    """
    _check_config(config, "init_gpt")  # (else a "replace() ... dataclass" TypeError)
    check_key(rng, "init_gpt")
    structure = dataclasses.replace(
        config,
        dropout=0.0,
        rope_base=10000.0,
        dtype="float32",
        remat=False,
        attention_implementation=None,
        layer_norm_eps=1e-5,
        gelu_approximate=True,
        attention_window=None,
        loss_chunk_size=None,
    )
    return _init_gpt(rng, structure)


@functools.partial(jax.jit, static_argnames="config")
def _init_gpt(rng: Array, config: GPTConfig) -> GPTWeights:
    rng_tok, rng_pos, rng_blocks, rng_head = jax.random.split(rng, 4)
    d = config.embed_dim
    blocks = jax.vmap(lambda r: _init_block(r, config))(
        jax.random.split(rng_blocks, config.num_layers)
    )
    return GPTWeights(
        token_embedding=init_embedding(rng_tok, config.vocab_size, d, std=0.02),
        position_embedding=(
            init_learned_positions(rng_pos, config.block_size, d, std=0.02)
            if config.positions == "learned"
            else None
        ),
        blocks=blocks,
        ln_f=init_layer_norm(d, use_bias=config.use_bias),
        head=(
            None
            if config.tie_embeddings
            else init_dense(rng_head, d, config.vocab_size, use_bias=False, std=0.02)
        ),
    )


def _block(
    blk: BlockWeights,
    x: Array,
    positions: Array,
    config: GPTConfig,
    *,
    rng: Array | None,
    deterministic: bool,
    cache: tuple[Array, Array, Array, Array | None] | None = None,
    key_mask: Array | None = None,
) -> tuple[Array, tuple[Array, Array] | None]:
    """Apply one pre-LN block; with a cache, write this chunk's k/v into it and attend over it.

    Args:
      blk: one layer's ``BlockWeights`` (no layer axis).
      x: ``[B, T, D]`` residual stream.
      positions: ``[T]`` absolute positions of the T tokens, or ``[B, T]`` per row.
      rng: key for dropout (None when deterministic or dropout is 0).
      cache: ``(k [B, S, K, H], v [B, S, K, H], index, None)``, or every layer's stacked
        ``(k [L, B, S, K, H], v, index, layer)`` with this block's layer index, or None for a
        full causal pass.
      key_mask: ``[B, 1, 1, S]`` False for keys to hide in every row (left padding), or None.

    Returns:
      ``(x [B, T, D], (k, v) the cache with this chunk written, as given, or None)``.
    """
    rate = 0.0 if deterministic else config.dropout
    rng_attn, rng_res1, rng_res2 = jax.random.split(rng, 3) if rate > 0 else (None,) * 3
    eps = config.layer_norm_eps

    # One product for q, k and v where it is faster: a token step over per-layer weights.
    fused = cache is not None and cache[3] is None and x.shape[1] == 1
    # q: [B, T, N, H]; k, v: [B, T, K, H]
    q, k, v = project_qkv(blk.attn, layer_norm(blk.ln1, x, eps=eps), fused=fused)
    if config.positions == "rope":
        q = apply_rope(q, positions, base=config.rope_base)
        k = apply_rope(k, positions, base=config.rope_base)
    options = attention_options(config, rate, rng_attn)
    window = config.local_window_size
    if cache is None:
        ctx = dot_product_attention(
            q, k, v, mask=key_mask, is_causal=True, local_window_size=window, **options
        )
        new_cache = None
    else:
        k_cache, v_cache, index, layer = cache
        ctx, *new_cache = cached_attention(
            q, k, v, k_cache, v_cache, index, layer=layer, mask=key_mask,
            local_window_size=window, **options,
        )  # fmt: skip
    x = x + dropout(rng_res1, project_output(blk.attn, ctx), rate)
    h = feed_forward(
        blk.mlp, layer_norm(blk.ln2, x, eps=eps), approximate_gelu=config.gelu_approximate
    )
    x = x + dropout(rng_res2, h, rate)
    return x, new_cache


def _embed(weights: GPTWeights, tokens: Array, positions: Array, config: GPTConfig) -> Array:
    """Token (+ learned position) embeddings in the compute dtype. -> ``[B, T, D]``."""
    x = embed(weights.token_embedding, tokens)  # [B, T, D]
    if weights.position_embedding is not None:
        # [T, D] or [B, T, D]; to_rank: an explicit broadcast (rank promotion may be "raise")
        x = x + to_rank(learned_positions(weights.position_embedding, positions), x.ndim)
    return x


def _logits(weights: GPTWeights, x: Array, config: GPTConfig) -> Array:
    """Final layer norm and output layer; logits in float32. ``[B, T, D]`` -> ``[B, T, V]``."""
    x = layer_norm(weights.ln_f, x, eps=config.layer_norm_eps)
    if weights.head is None:
        logits = unembed(weights.token_embedding, x)
    else:
        logits = dense(weights.head, x)
    return logits.astype(jnp.float32)


# Each public function's argument order, for the error that names a swapped config.
_check_config = config_checker(
    GPTConfig,
    {
        "init_gpt": "init_gpt(rng, config)",
        "gpt": "gpt(weights, tokens, config)",
        "gpt_loss": "gpt_loss(weights, tokens, targets, config)",
        "gpt_decode": "gpt_decode(weights, tokens, cache, config)",
        "init_cache": "init_cache(config, batch_size, max_len)",
        "generate": "generate(weights, config, prompt, max_new_tokens)",
    },
)


def _as_tokens(tokens, config: GPTConfig, where: str) -> Array:
    """Check ``tokens`` (``[B, T]`` ids in ``[0, V)`` when concrete), then convert them."""
    _check_config(config, where)
    tokens = ids_to_check(tokens)
    if tokens.ndim != 2 or 0 in tokens.shape:  # (empty: else an error from inside attention)
        raise ValueError(f"{where}: tokens must be [B, T] with B, T >= 1, got shape {tokens.shape}")
    check_token_ids(tokens, config.vocab_size, f"{where}: token ids")
    # A JAX array as it is: jnp.asarray of one costs ~8 µs, on every generate call.
    return tokens if isinstance(tokens, jax.Array) else jnp.asarray(tokens)


def _check_weights_type(weights: GPTWeights, config: GPTConfig, where: str) -> None:
    """Raise ``ValueError`` unless ``weights`` is a ``GPTWeights`` whose blocks are a
    ``BlockWeights`` stack or ``unstack_layers``' tuple of them: a dict (an orbax restore
    without a target), another model's weights or None failed as "AttributeError: ...
    has no attribute 'blocks'"; ``check_weights`` names what differs."""
    blocks = getattr(weights, "blocks", None)
    per_layer = (
        isinstance(blocks, tuple)
        and not isinstance(blocks, BlockWeights)
        and len(blocks) > 0
        and all(isinstance(b, BlockWeights) for b in blocks)
    )
    if isinstance(weights, GPTWeights) and (isinstance(blocks, BlockWeights) or per_layer):
        return
    check_weights(weights, init_gpt, config, where)  # raises, naming the difference
    raise ValueError(f"{where}: weights must be GPTWeights, got {type(weights).__name__}")


def check_gpt_weights(
    weights: GPTWeights, config: GPTConfig, where: str, *, per_layer_ok: bool = True
) -> None:
    """Raise ``ValueError`` when ``weights`` were not made for ``config`` (tree paths and
    shapes, as ``init_gpt`` makes them), or hold ``unstack_layers``' per-layer blocks where
    only stacked ones will do."""
    _check_weights_type(weights, config, where)
    per_layer = not isinstance(weights.blocks, BlockWeights)  # a tuple of BlockWeights
    if per_layer and not per_layer_ok:  # the layer scan needs stacks
        raise ValueError(
            f"{where}: the weights hold per-layer blocks (from unstack_layers, for "
            "gpt_decode); pass init_gpt's stacked weights"
        )
    attn = weights.blocks[0].attn if per_layer else weights.blocks.attn
    w_q, w_k = attn.w_q, attn.w_k
    layers = len(weights.blocks) if per_layer else w_q.shape[0]
    d, n, h, k = config.embed_dim, config.num_heads, config.head_dim, config.kv_heads
    got = dict(
        layers=layers, w_q=tuple(w_q.shape[-3:]), w_k=tuple(w_k.shape[-3:]),
        table=weights.token_embedding.table.shape,
    )  # fmt: skip
    want = dict(
        layers=config.num_layers, w_q=(d, n, h), w_k=(d, k, h), table=(config.vocab_size, d)
    )
    learned = config.positions == "learned"
    if got != want or (weights.position_embedding is not None) != learned:
        raise ValueError(
            f"{where}: weights do not fit the config: {config.num_layers} layers, per layer "
            f"w_q [D={d}, N={n}, H={h}] and w_k [D, K={k}, H], token table "
            f"[V={config.vocab_size}, D={d}], {'a' if learned else 'no'} learned position "
            f"table; got {got['layers']} layers, w_q {got['w_q']}, w_k {got['w_k']}, token "
            f"table {got['table']}, "
            f"{'a' if weights.position_embedding is not None else 'no'} position table"
        )
    # The rest (output head, biases, MLP width, position table length) against init_gpt's
    # tree: a tied model's weights would otherwise run silently under an untied config.
    if per_layer:  # shapes only, stacked as init_gpt makes them
        stack = lambda *a: jax.ShapeDtypeStruct((len(a), *a[0].shape), a[0].dtype)
        weights = weights._replace(blocks=jax.tree.map(stack, *weights.blocks))
    check_weights(weights, init_gpt, config, where)


def gpt(
    weights: GPTWeights,
    tokens: Array,
    config: GPTConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
) -> Array:
    """Run the causal language model over whole sequences.

    ``jax.jit(gpt)`` treats ``config`` as static by itself (a pytree with no leaves); make
    ``deterministic`` static when you pass it: ``jax.jit(gpt, static_argnames="deterministic")``.

    Args:
      weights: ``GPTWeights`` from ``init_gpt``.
      tokens: ``[B, T]`` integer ids in ``[0, V)``, ``T <= block_size`` (others are a
        ``ValueError``; traced under ``jit``, where they cannot be checked, NaN logits).
      config: the model's ``GPTConfig``.
      rng: dropout key; required when ``deterministic=False`` and ``config.dropout > 0``.
      deterministic: disable dropout (evaluation).

    Returns:
      ``[B, T, V]`` float32 logits; position t depends only on tokens ``0..t``.
    """
    x, weights = _hidden(weights, tokens, config, rng, deterministic, "gpt")
    return _logits(weights, x, config)


def _hidden(
    weights: GPTWeights,
    tokens: Array,
    config: GPTConfig,
    rng: Array | None,
    deterministic: bool,
    where: str,
) -> tuple[Array, GPTWeights]:
    """Check the inputs, then embed and run the layers: ``(x [B, T, D], cast weights)``."""
    tokens = _as_tokens(tokens, config, where)
    check_gpt_weights(weights, config, where, per_layer_ok=False)
    t = tokens.shape[1]
    if t > config.block_size:
        raise ValueError(
            f"{where}: sequence length T={t} exceeds block_size={config.block_size} "
            f"(tokens shape {tokens.shape})"
        )
    use_dropout = not check_flag(deterministic, "deterministic", where) and config.dropout > 0
    check_dropout_rng(rng, use_dropout, where)
    weights = cast_floating(weights, config.compute_dtype)
    return _trunk(weights, tokens, config, rng, use_dropout), weights


# Jitted for eager calls of gpt/gpt_loss: run eagerly, the layer scan over a fresh closure was
# traced and compiled anew on every call.
@functools.partial(jit_when_eager, static_argnames="use_dropout")
def _trunk(
    weights: GPTWeights,
    tokens: Array,
    config: GPTConfig,
    rng: Array | None,
    use_dropout: bool,
    *,
    positions: Array | None = None,
    key_mask: Array | None = None,
) -> Array:
    """Embeddings and the layer scan (weights already cast). ``[B, T]`` -> ``[B, T, D]``.

    ``positions`` (``[B, T]``) and ``key_mask`` (``[B, 1, 1, T]``) serve left-padded rows;
    by default every row is real from position 0.
    """
    if positions is None:
        positions = jnp.arange(tokens.shape[1])
    rng_embed, rng_layers = jax.random.split(rng) if use_dropout else (None, None)
    x = dropout(
        rng_embed,
        _embed(weights, tokens, positions, config),
        config.dropout,
        deterministic=not use_dropout,
    )

    def body(x, layer):
        blk, rng_layer = layer
        x, _ = _block(
            blk,
            x,
            positions,
            config,
            rng=rng_layer,
            deterministic=not use_dropout,
            key_mask=key_mask,
        )
        return x, None

    body = checkpointed_layer(body, config.remat)
    layer_rngs = jax.random.split(rng_layers, config.num_layers) if use_dropout else None
    x, _ = jax.lax.scan(body, x, (weights.blocks, layer_rngs))
    return x


def gpt_loss(
    weights: GPTWeights,
    tokens: Array,
    targets: Array,
    config: GPTConfig,
    *,
    rng: Array | None = None,
    deterministic: bool = True,
    mask: Array | None = None,
) -> Array:
    """Mean next-token cross-entropy ``-log softmax(logits)[target]`` in float32.

    With ``config.loss_chunk_size`` the final norm, output layer and loss run that many
    positions at a time (``ops.chunked_cross_entropy``), so the backward holds
    ``[B, chunk, V]`` logits instead of ``[B, T, V]``; the loss is the same.

    Args:
      tokens: ``[B, T]`` inputs.
      targets: ``[B, T]`` ids in ``[0, V)`` (usually ``tokens`` shifted left by one); a
        counted one outside it is refused (under ``jit``, where it cannot be, it gives a NaN
        loss); one that ``mask`` leaves out may be any integer (a -100 "ignore" label).
      mask: optional ``[B, T]``; the loss is the mean over positions where it is nonzero
        (True = count this token).

    Returns:
      Scalar float32 loss.
    """
    _check_config(config, "gpt_loss")
    targets = ids_to_check(targets)  # checked before jnp.asarray (see ids_to_check)
    if targets.shape != jnp.shape(tokens):
        raise ValueError(f"gpt_loss: targets {targets.shape} must match tokens {jnp.shape(tokens)}")
    if mask is not None and np.shape(mask) != targets.shape:
        raise ValueError(f"gpt_loss: mask {np.shape(mask)} must match targets {targets.shape}")
    check_counted_ids(targets, mask, config.vocab_size, "gpt_loss: targets")
    targets = jnp.asarray(targets)
    x, weights = _hidden(weights, tokens, config, rng, deterministic, "gpt_loss")  # [B, T, D]
    if config.loss_chunk_size is None:
        return cross_entropy(_logits(weights, x, config), targets, mask)
    return _chunked_loss(weights, x, targets, mask, config)


# Jitted for eager calls (see _trunk): the chunk loop's closure is built per call.
@jit_when_eager
def _chunked_loss(
    weights: GPTWeights, x: Array, targets: Array, mask: Array | None, config: GPTConfig
) -> Array:
    """``gpt_loss`` from the final hidden states ``x: [B, T, D]``, in chunks of positions."""
    return chunked_cross_entropy(
        x,
        lambda h: _logits(weights, h, config),  # [B, chunk, D] -> [B, chunk, V]
        targets,
        mask,
        chunk_size=config.loss_chunk_size,
    )


def init_cache(
    config: GPTConfig, batch_size: int, max_len: int, dtype: jnp.dtype | str | None = None
) -> KVCache:
    """Allocate an empty KV cache: ``k, v: [L, B, max_len, K, H]`` zeros, ``index = 0``.

    ``dtype`` defaults to the compute dtype. ``max_len`` may not exceed ``block_size``.
    """
    _check_config(config, "init_cache")
    layout = (config.num_layers, config.kv_heads, config.head_dim)
    limit = ("block_size", config.block_size)
    dtype = config.compute_dtype if dtype is None else dtype
    return empty_kv_cache(layout, batch_size, max_len, limit, dtype)


def empty_kv_cache(
    layout: tuple[int, int, int],
    batch_size: int,
    max_len: int,
    limit: tuple[str, int],
    dtype: jnp.dtype | str,
) -> KVCache:
    """``KVCache(k, v: [L, B, max_len, K, H] zeros, index 0)`` for ``layout = (L, K, H)``;
    ``max_len`` at most the model's ``limit = (name, size)`` (its position table)."""
    # Sizes as ints: 2.5 failed inside jnp.zeros naming no argument, True made length 1.
    batch_size = check_size(batch_size, "batch_size", "init_cache")
    max_len = check_size(max_len, "max_len", "init_cache")
    if max_len > limit[1]:
        raise ValueError(f"init_cache: max_len={max_len} must be in [1, {limit[0]}={limit[1]}]")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):  # the keys and values would be truncated
        raise ValueError(f"init_cache: dtype must be floating, got {dtype}")
    num_layers, kv_heads, head_dim = layout
    shape = (num_layers, batch_size, max_len, kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def check_kv_cache(cache: KVCache, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``cache`` is a ``KVCache`` with floating
    keys and values, as ``init_cache`` makes it (stacked, or ``unstack_layers``' tuples).

    A dict (an orbax restore without a target), a plain ``(k, v, index)`` tuple or None
    failed as "AttributeError: ... has no attribute 'k'", as weights of the wrong type did;
    integer keys and values (which ``init_cache`` refuses) truncated every written key and
    value and silently gave wrong logits.
    """
    if not isinstance(cache, KVCache):
        hint = " (KVCache(**d) of a restored dict)" if isinstance(cache, dict) else ""
        raise ValueError(
            f"{where}: cache must be a KVCache from init_cache{hint}, got {type(cache).__name__}"
        )
    for name, kv in (("k", cache.k), ("v", cache.v)):
        dtypes = {jnp.result_type(leaf) for leaf in jax.tree.leaves(kv)}
        if not all(jnp.issubdtype(dtype, jnp.floating) for dtype in dtypes):
            raise ValueError(
                f"{where}: cache.{name} must be floating (init_cache's dtype), got "
                f"{sorted(str(dtype) for dtype in dtypes)}: integer keys and values are truncated"
            )


def cache_index(cache: KVCache, where: str) -> int | None:
    """``cache.index`` as an int, or None when it is traced (then the caller's to keep in
    range); ``ValueError`` unless it is an integer scalar ``>= 0`` (a Python int is one).

    A float or ``[1]`` index failed inside ``take`` or ``int()``, naming neither the cache
    nor its index; a negative one would embed at the last position and write to slot 0.
    """
    check_int_scalar(cache.index, "cache.index", where)
    if isinstance(cache.index, jax.core.Tracer):
        return None
    index = int(cache.index)
    if index < 0:
        raise ValueError(f"{where}: cache.index must be >= 0, got {index}")
    return index


def unstack_layers(weights: GPTWeights, cache: KVCache) -> tuple[GPTWeights, KVCache]:
    """Split the stacked ``[L, ...]`` blocks and cache into per-layer tuples for ``gpt_decode``.

    ``gpt_decode`` then runs the layers as straight-line code instead of a ``lax.scan``. Do
    this once, outside a token loop: a layer scan inside the loop slices every weight
    matrix out of its stack on every token, and XLA:CPU copies each slice before its
    matrix-vector product. For the 4-layer Shakespeare model at batch 1 that copying was
    about 40% of the time per token (85 instead of 150 us on a 2-core AMD EPYC). The price
    is a decode step whose compile time grows with depth: ``generate`` for that model
    compiled in 1.6 s instead of 0.8 s.

    Each layer's cache comes as ``ops.head_rows``, ``[B*K, S, H]``: the layout of the
    attention's batched products, which then read it with no copy. Kept as ``[B, S, K, H]``
    it was copied into that layout twice per layer and token (benchmarks/LOG.md, "Session
    44").

    Returns:
      ``(weights with blocks: tuple of L BlockWeights, KVCache(k, v: tuples of L
      [B*K, S, H], index))``.
    """
    if not isinstance(weights, GPTWeights):  # (else "... has no attribute 'blocks'")
        raise ValueError(
            f"unstack_layers: weights must be GPTWeights (init_gpt's), got {type(weights).__name__}"
        )
    check_kv_cache(cache, "unstack_layers")
    if not isinstance(weights.blocks, BlockWeights) or isinstance(cache.k, tuple):
        raise ValueError(
            "unstack_layers: weights.blocks and the cache must both be stacked [L, ...] "
            f"(got {type(weights.blocks).__name__} blocks and {type(cache.k).__name__} "
            "cache keys); unstack them once, together"
        )
    # The depth from both: a[i] past the weights' L clamps (a copy of the last layer), and
    # fewer cache layers dropped the last weights; gpt_decode then blamed the weights.
    depths = {a.shape[0] for a in jax.tree.leaves(weights.blocks)}
    if depths != {cache.k.shape[0]} or cache.v.shape[0] != cache.k.shape[0]:
        raise ValueError(
            f"unstack_layers: the weights' blocks have {sorted(depths)} layers and the cache "
            f"{cache.k.shape[0]} (k) and {cache.v.shape[0]} (v); they must agree (build the "
            "cache with init_cache of the weights' config)"
        )
    layers = range(cache.k.shape[0])
    blocks = tuple(jax.tree.map(lambda a, i=i: a[i], weights.blocks) for i in layers)
    k, v = (tuple(head_rows(stack[i]) for i in layers) for stack in (cache.k, cache.v))
    return weights._replace(blocks=blocks), KVCache(k, v, cache.index)


def _left_padded(
    start: Array, query_slots: Array, key_slots: Array, origin: Array | int = 0
) -> tuple[Array, Array]:
    """Positions and key mask for rows whose first ``start[b]`` slots are padding.

    Row b's real tokens count positions from its slot ``max(start[b], origin)``: its first
    real token, or the first slot of a window cropped past it (``origin``, as nanoGPT's
    crop restarts positions at 0). Padding slots get position 0 and are hidden as keys.

    Args:
      start: ``[B]`` int32, each row's first real slot.
      query_slots: ``[T]`` the queries' slots; key_slots: ``[S]`` the keys'.

    Returns:
      ``(positions [B, T] int32, key_mask [B, 1, 1, S] bool)``.
    """
    first = jnp.maximum(start, origin)[:, None]  # [B, 1]
    positions = jnp.maximum(query_slots[None, :] - first, 0)  # [B, T]
    key_mask = key_slots[None, :] >= start[:, None]  # [B, S]
    return positions, key_mask[:, None, None, :]


def gpt_decode(
    weights: GPTWeights,
    tokens: Array,
    cache: KVCache,
    config: GPTConfig,
    *,
    start: Array | None = None,
) -> tuple[Array, KVCache]:
    """Run T new tokens at positions ``index .. index+T-1`` against a KV cache (no dropout).

    Used to prefill a prompt in one pass (T = prompt length) and to decode one token per
    step (T = 1); either way the logits equal those of ``gpt`` on the whole prefix.
    Under ``jit`` the index is traced and not checked: the caller keeps ``index + T <= S``
    (``dynamic_update_slice`` would otherwise clamp the write silently).

    Stacked weights and cache run the layers with ``lax.scan``; per-layer ones (from
    ``unstack_layers``) run them unrolled, which is faster inside a token loop.

    Called outside ``jit`` it checks the token ids and the cache's room on the host, which
    waits for the previous call's device work: a Python loop of eager calls ran 3x slower
    per token than one calling ``jax.jit(gpt_decode)`` (581 against 188 us, the Shakespeare
    model at batch 1 on CPU). ``generate`` runs the whole loop in one program.

    Args:
      tokens: ``[B, T]`` ids.
      cache: ``KVCache(k, v [L, B, S, K, H], index)``, or per layer from ``unstack_layers``.
      start: ``[B]`` ints, each row's first real slot when prompts of different lengths
        are left-padded to one length (``generate``'s ``prompt_lengths``): the keys in slots
        before it are hidden and the row's positions count from it, so its logits are those
        of ``gpt`` on its real tokens alone. None: every row starts at slot 0.

    Returns:
      ``(logits [B, T, V] float32, cache with the new k/v written and index + T)``, stacked
      or per layer as given.
    """
    tokens = _as_tokens(tokens, config, "gpt_decode")
    _check_weights_type(weights, config, "gpt_decode")
    check_kv_cache(cache, "gpt_decode")
    per_layer = not isinstance(weights.blocks, BlockWeights)  # a tuple of BlockWeights
    if per_layer != isinstance(cache.k, tuple):
        raise ValueError(
            "gpt_decode: weights and cache must both be stacked or both per layer "
            "(unstack_layers splits both)"
        )
    if per_layer and not len(weights.blocks) == len(cache.k) == len(cache.v):
        raise ValueError(
            f"gpt_decode: {len(weights.blocks)} layers of weights but a cache of "
            f"{len(cache.k)} (k) and {len(cache.v)} (v) layers"
        )
    check_gpt_weights(weights, config, "gpt_decode")
    kh, h = config.kv_heads, config.head_dim
    if per_layer:  # head rows [B*K, S, H], B from the tokens
        layer_shape = cache.k[0].shape
        b = tokens.shape[0]
        fits = len(layer_shape) == 3 and layer_shape[0] == b * kh and layer_shape[2] == h
        want = f"[B*K={b}*{kh}, S, H={h}] (unstack_layers of init_cache(config, {b}, ...))"
    else:
        layer_shape = cache.k.shape[1:]  # [B, S, K, H]
        b = layer_shape[0]
        fits = len(layer_shape) == 4 and layer_shape[2:] == (kh, h)
        want = f"[B, S, K={kh}, H={h}] (build it with init_cache(config, ...))"
    layers = len(cache.k) if per_layer else cache.k.shape[0]
    if layers != config.num_layers or not fits:
        raise ValueError(
            f"gpt_decode: the cache does not fit the config and tokens {tokens.shape}: it "
            f"needs {config.num_layers} layers of {want}, got {layers} layers of "
            f"{tuple(layer_shape)}"
        )
    s = layer_shape[1]
    t = tokens.shape[1]
    if tokens.shape[0] != b or t > s:
        raise ValueError(
            f"gpt_decode: tokens {tokens.shape} do not fit a cache of batch {b} and length {s}"
        )
    if s > config.block_size:  # (learned positions past the table would embed as NaN)
        raise ValueError(
            f"gpt_decode: the cache holds S={s} positions, more than "
            f"config.block_size={config.block_size} (init_cache refuses it too)"
        )
    index = cache_index(cache, "gpt_decode")
    if index is not None and index + t > s:
        raise ValueError(
            f"gpt_decode: writing T={t} tokens at index {index} overflows the cache length S={s}"
        )
    slots = cache.index + jnp.arange(t, dtype=jnp.int32)  # [T]
    positions, key_mask = slots, None
    if start is not None:
        # [B] row starts; a start of S would leave a row with no slot.
        start = check_lengths(start, b, s - 1, "gpt_decode", name="start", bound="S-1")
        start = start.astype(jnp.int32)
        positions, key_mask = _left_padded(start, slots, jnp.arange(s, dtype=jnp.int32))
    return _decode_layers(weights, tokens, cache, positions, key_mask, config)


@jit_when_eager  # (see _trunk)
def _decode_layers(
    weights: GPTWeights,
    tokens: Array,
    cache: KVCache,
    positions: Array,
    key_mask: Array | None,
    config: GPTConfig,
) -> tuple[Array, KVCache]:
    """``gpt_decode`` after its checks: embed, run the layers against the cache, logits."""
    t = tokens.shape[1]
    per_layer = isinstance(cache.k, tuple)
    weights = cast_floating(weights, config.compute_dtype)
    x = _embed(weights, tokens, positions, config)

    def block(blk, x, k, v, layer):
        return _block(
            blk,
            x,
            positions,
            config,
            rng=None,
            deterministic=True,
            cache=(k, v, cache.index, layer),
            key_mask=key_mask,
        )

    if per_layer:
        written = []
        for blk, k, v in zip(weights.blocks, cache.k, cache.v):
            x, kv = block(blk, x, k, v, None)
            written.append(kv)
        k, v = (tuple(a) for a in zip(*written))
    else:
        # The stacked caches ride in the carry, each layer writing only its new rows: as the
        # scan's inputs and outputs they were rebuilt whole (zero-filled, copied) per step.
        def body(carry, layer):
            x, k, v = carry
            x, (k, v) = block(layer[0], x, k, v, layer[1])
            return (x, k, v), None

        layers = jnp.arange(config.num_layers, dtype=jnp.int32)
        (x, k, v), _ = jax.lax.scan(body, (x, cache.k, cache.v), (weights.blocks, layers))
    return _logits(weights, x, config), KVCache(k, v, cache.index + t)


@functools.partial(
    jax.jit,
    static_argnames=("config", "max_new_tokens", "greedy", "top_k", "unroll_layers", "eos_id"),
)
def _generate_jit(
    weights, prompt, rng, config, max_new_tokens, greedy, temperature, top_k, top_p,
    unroll_layers, start=None, eos_id=None,
):  # fmt: skip
    # Static: what changes the program. temperature and top_p (float32 scalars, or top_p None
    # when the filter is off) only feed arithmetic, so a new value reuses the compiled program.
    if start is not None:
        # Right-padded rows -> left-padded: every row's last prompt token in the last slot,
        # so one cache index serves the batch; start[b] is the row's first real slot.
        prompt = _roll_rows(prompt, start)
    t0, block = prompt.shape[1], config.block_size
    # New tokens whose whole context fits the model come from the KV cache: the last of them
    # is predicted at position block - 1. Later ones see only the last block tokens.
    cached = min(max_new_tokens, max(block + 1 - t0, 0))
    cropped = max_new_tokens - cached
    settings = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
    # Cast once here rather than on every token.
    weights = cast_floating(weights, config.compute_dtype)
    out = prompt
    # Token i of the max_new_tokens draws with key i of one split, cached or cropped: cut
    # from one split, as split(rng, n)[:m] equals split(rng, m) only under the default
    # jax_threefry_partitionable. Greedy needs none (and may have been given rng=None).
    keys = None if greedy else jax.random.split(rng, max_new_tokens)
    if cached:
        # (The last sample is never fed back, so block positions always suffice.)
        cache = init_cache(config, prompt.shape[0], min(t0 + cached, block))
        stepped, cache = unstack_layers(weights, cache) if unroll_layers else (weights, cache)

        def decode(toks, c):  # the decode function protocol of decoding.generate
            return gpt_decode(stepped, toks, c, config, start=start)

        cached_keys = None if keys is None else keys[:cached]
        out = decoding.generate(decode, cache, prompt, cached, keys=cached_keys, **settings)
    if cropped:

        def next_logits(window, offset):  # [B, block] -> [B, V]: the last position's logits
            positions = key_mask = None
            if start is not None:
                slots = offset + jnp.arange(block, dtype=jnp.int32)
                positions, key_mask = _left_padded(start, slots, slots, origin=offset)
            x = _trunk(weights, window, config, None, False, positions=positions, key_mask=key_mask)
            return _logits(weights, x[:, -1:], config)[:, 0]

        # Rows that drew eos_id in the cached part stay ended.
        ended = None if eos_id is None else jnp.any(out[:, t0:] == eos_id, axis=1)  # [B]
        cropped_keys = None if keys is None else keys[cached:]
        out = decoding.generate_cropped(
            next_logits, out, cropped, context=block, keys=cropped_keys, ended=ended, **settings
        )
    if start is not None:
        out = _roll_rows(out, -start)  # back to right padding, the padding after the new tokens
    return out


def _roll_rows(x: Array, shift: Array) -> Array:
    """Rotate each row right by its own shift: ``out[b, j] = x[b, (j - shift[b]) mod T]``.

    ``x: [B, T]``, ``shift: [B]`` ints -> ``[B, T]``.
    """
    t = x.shape[1]
    source = (jnp.arange(t, dtype=jnp.int32)[None, :] - shift[:, None]) % t  # [B, T]
    return jnp.take_along_axis(x, source, axis=1)


def generate(
    weights: GPTWeights,
    config: GPTConfig,
    prompt: Array,
    max_new_tokens: int,
    *,
    rng: Array | None = None,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
    top_p: float | Array | None = None,
    unroll_layers: bool = False,
    prompt_lengths: Array | None = None,
    eos_id: int | None = None,
) -> Array:
    """Continue ``prompt`` by ``max_new_tokens`` sampled tokens (temperature 0 = greedy).

    Compiled once per (prompt shape, max_new_tokens, top_k, greedy or not, top-p on or off,
    config, unroll_layers, eos_id, padded prompts or not): a new ``temperature``, ``top_p``
    or set of ``prompt_lengths`` reuses the program, as they enter it traced (temperature
    and top_p as float32 scalars). The prompt is prefilled in one
    pass, then one token per ``lax.scan`` step against the KV cache. Beyond ``block_size``
    tokens it goes on as nanoGPT's ``generate``: each token is drawn from a full pass over
    the last ``block_size`` tokens (a longer prompt is cropped the same way), in one
    ``fori_loop`` of the same program.

    New token i is drawn with key i of ``jax.random.split(rng, max_new_tokens)``, as
    ``decoding.sample_logits`` would draw it.

    Args:
      prompt: ``[B, T0]`` ids, ``T0 >= 1``.
      rng: sampling key; None (the default) only for greedy decoding.
      temperature: >= 0; the Python value 0 (not a traced one: see below) decodes greedily.
      top_k: keep the k most likely tokens (a Python int, static); None keeps all.
      top_p: nucleus sampling's mass in (0, 1]; None or 1 keeps all tokens.
        Under your own ``jit`` both may be traced scalars: a traced temperature always
        samples (a traced 0 draws among the tied maxima), and a traced top_p always runs the
        nucleus filter (a traced 1 may then drop the least likely tokens, whose mass rounds
        away in float32).
      unroll_layers: run each cached token's layers unrolled (``unstack_layers``) instead
        of as a layer scan. On CPU at batch 1 about 1.7x faster per token (4-layer
        Shakespeare model: ~85 instead of ~150 us), but slower to compile (1.6 s instead of
        0.8 s) and growing with depth. Worth it when one compiled shape serves many calls
        (serving, benchmarks); the default suits a few one-off samples.
      prompt_lengths: ``[B]`` ints in ``[1, T0]`` for a batch of prompts of different
        lengths, padded on the right to ``T0`` (the padding: any ids in ``[0, V)``). Row b
        continues its first ``prompt_lengths[b]`` tokens as if it were alone: it never sees
        the padding, and its positions and its crop past ``block_size`` are its own. Its new
        tokens are those row b of an unpadded batch would draw from the same logits (the
        same random numbers). None: every row is ``T0`` long.
      eos_id: an end-of-sequence id in ``[0, V)``: a row ends at its first new ``eos_id``
        and repeats it up to ``max_new_tokens``; once every row has ended, generation
        stops (no more model calls). Tokens before a row's end are the same as without it.

    Returns:
      ``[B, T0 + max_new_tokens]`` int32: the prompt followed by the new tokens. With
      ``prompt_lengths``, row b is its prompt, its ``max_new_tokens`` new tokens, then its
      ``T0 - prompt_lengths[b]`` padding ids, moved to the end.
    """
    prompt = _as_tokens(prompt, config, "generate")
    max_new_tokens = decoding.check_max_new_tokens(max_new_tokens)
    check_gpt_weights(weights, config, "generate", per_layer_ok=False)  # (it unstacks them itself)
    # Validate the sampling settings eagerly, before anything is traced.
    decoding.check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    eos_id = decoding.check_eos_id(eos_id, "generate", config.vocab_size)
    decoding.check_sampling_key(rng, temperature, "generate")
    # Only these choose the program; the values go in traced (top_p None: no nucleus filter).
    greedy = decoding.is_greedy(temperature)
    temperature = float32_argument(temperature)
    top_p = float32_argument(top_p) if decoding.top_p_active(top_p) else None
    start = None
    if prompt_lengths is not None:
        b, t0 = prompt.shape
        # Every prompt needs a token: generation continues from a row's last one.
        prompt_lengths = check_lengths(prompt_lengths, b, t0, "generate: prompt_lengths", least=1)
        # Known to be unpadded: the program without masks gives the same tokens.
        unpadded = not isinstance(prompt_lengths, jax.core.Tracer) and np.all(
            np.asarray(prompt_lengths) == t0
        )
        if not unpadded:
            start = t0 - jnp.asarray(prompt_lengths, jnp.int32)  # [B] padding per row
    if prompt.dtype != jnp.int32:  # (a fresh array, converted or not, costs its transfer)
        prompt = prompt.astype(jnp.int32)
    return _generate_jit(
        weights,
        prompt,
        rng,
        config,
        max_new_tokens,
        greedy,
        temperature,
        top_k,
        top_p,
        check_flag(unroll_layers, "unroll_layers", "generate"),
        start,
        eos_id,
    )
