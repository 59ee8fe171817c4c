"""Tests for jaxattn.models.transformer: PyTorch parity (pre- and post-LN), cached decoding
vs the teacher-forced pass, padding invariance, the masked loss, dropout, bfloat16, bad
inputs, and overfitting a tiny corpus that includes "let's go" -> "vamos"."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattn.models import beam_search as search
from jaxattn.models import transformer
from jaxattn.models.transformer import (
    CrossKV,
    TransformerConfig,
    cross_kv,
    decode,
    decode_step,
    encode,
    init_cache,
    init_transformer,
    transformer_logits,
    transformer_loss,
    translate,
)
from jaxattn.ops.masks import padding_mask

PAD, BOS, EOS = 0, 1, 2
# Odd, distinct sizes: Vs=11, V=13, D=12 (N=3, H=4), F=24, Le=2, Ld=3, max_len=9.
BASE = TransformerConfig(
    src_vocab_size=11,
    tgt_vocab_size=13,
    embed_dim=12,
    num_heads=3,
    num_encoder_layers=2,
    num_decoder_layers=3,
    mlp_ratio=2,
    max_len=9,
)
POST_LN_UNTIED = dataclasses.replace(BASE, pre_ln=False, tie_embeddings=False)

# Compiled once per config and shape and shared by the tests; XLA's backend optimisations
# are off (halves compile time, the tests' main cost; results differ only by rounding).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
logits_jit = jit(transformer_logits, static_argnames=("config", "deterministic"))
encode_jit = jit(encode, static_argnames=("config",))
loss_and_grad_jit = jit(jax.value_and_grad(transformer_loss), static_argnames=("config",))


@functools.partial(jit, static_argnames=("config",))
def cached_logits(weights, src, lengths, tgt_in, config):
    """Teacher-forced logits recomputed one ``decode_step`` at a time (a Python loop)."""
    memory = encode(weights, src, lengths, config)
    cross = cross_kv(weights, memory, config)
    src_mask = jnp.arange(src.shape[1])[None] < lengths[:, None]
    cache = init_cache(config, src.shape[0], config.max_len)
    out = []
    for t in range(tgt_in.shape[1]):
        logits, cache = decode_step(weights, cache, tgt_in[:, t], cross, src_mask, config)
        out.append(logits)
    return jnp.stack(out, axis=1), cache.index


def random_weights(config, seed=0, scale=0.5):
    """Weights of ``init_transformer``'s structure filled with N(0, scale^2) NumPy draws."""
    shapes = jax.eval_shape(lambda key: init_transformer(key, config), jax.random.key(0))
    np_rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * np_rng.standard_normal(s.shape), s.dtype), shapes
    )


def example_batch(config, np_rng):
    """B=3 sources of lengths 5, 2, 4 (S=5) and targets of T=4."""
    lengths = np.array([5, 2, 4], np.int32)
    src = np_rng.integers(3, config.src_vocab_size, (3, 5)).astype(np.int32)
    src[np.arange(5)[None] >= lengths[:, None]] = PAD
    tgt_in = np_rng.integers(3, config.tgt_vocab_size, (3, 4)).astype(np.int32)
    tgt_in[:, 0] = BOS
    return jnp.asarray(src), jnp.asarray(lengths), jnp.asarray(tgt_in)


# --------------------------------------------------------------------------------------
# PyTorch reference: nn.TransformerEncoder / nn.TransformerDecoder in float64.
# --------------------------------------------------------------------------------------


def np_sinusoidal(length, dim):
    angles = np.arange(length)[:, None] / 10000 ** (np.arange(0, dim, 2) / dim)
    pe = np.zeros((length, dim))
    pe[:, 0::2], pe[:, 1::2] = np.sin(angles), np.cos(angles)
    return pe


def torch_model(weights, config):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    d = config.embed_dim
    t = lambda a: torch.tensor(np.asarray(a, np.float64))
    gelu = lambda x: nn.functional.gelu(x, approximate="tanh")
    kw = dict(
        d_model=d,
        nhead=config.num_heads,
        dim_feedforward=config.mlp_ratio * d,
        dropout=0.0,
        activation=gelu,
        batch_first=True,
        norm_first=config.pre_ln,
        layer_norm_eps=config.layer_norm_eps,
        dtype=torch.float64,
    )

    def load_attention(mha, w, layer):
        get = lambda a: np.asarray(a[layer], np.float64)
        qkv = [get(x).reshape(d, d).T for x in (w.w_q, w.w_k, w.w_v)]
        mha.in_proj_weight.copy_(t(np.concatenate(qkv)))
        mha.in_proj_bias.copy_(
            t(np.concatenate([get(b).reshape(d) for b in (w.b_q, w.b_k, w.b_v)]))
        )
        mha.out_proj.weight.copy_(t(get(w.w_o).reshape(d, d).T))
        mha.out_proj.bias.copy_(t(get(w.b_o)))

    def load_norm(norm, w, layer=None):
        norm.weight.copy_(t(w.scale if layer is None else w.scale[layer]))
        norm.bias.copy_(t(w.bias if layer is None else w.bias[layer]))

    def load_mlp(mod, w, layer):
        mod.linear1.weight.copy_(t(np.asarray(w.up.w[layer]).T))
        mod.linear1.bias.copy_(t(w.up.b[layer]))
        mod.linear2.weight.copy_(t(np.asarray(w.down.w[layer]).T))
        mod.linear2.bias.copy_(t(w.down.b[layer]))

    eps = config.layer_norm_eps
    final = (
        (lambda: nn.LayerNorm(d, eps=eps, dtype=torch.float64)) if config.pre_ln else (lambda: None)
    )
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(**kw),
        config.num_encoder_layers,
        norm=final(),
        enable_nested_tensor=False,
    )
    dec = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(**kw), config.num_decoder_layers, norm=final()
    )
    with torch.no_grad():
        for i, layer in enumerate(enc.layers):
            load_attention(layer.self_attn, weights.encoder.attn, i)
            load_norm(layer.norm1, weights.encoder.ln1, i)
            load_norm(layer.norm2, weights.encoder.ln2, i)
            load_mlp(layer, weights.encoder.mlp, i)
        for i, layer in enumerate(dec.layers):
            load_attention(layer.self_attn, weights.decoder.self_attn, i)
            load_attention(layer.multihead_attn, weights.decoder.cross_attn, i)
            for n, ln in enumerate((weights.decoder.ln1, weights.decoder.ln2, weights.decoder.ln3)):
                load_norm(getattr(layer, f"norm{n + 1}"), ln, i)
            load_mlp(layer, weights.decoder.mlp, i)
        if config.pre_ln:
            load_norm(enc.norm, weights.encoder_norm)
            load_norm(dec.norm, weights.decoder_norm)
    return enc.eval(), dec.eval()


def torch_forward(enc, dec, w, config, src, lengths, tgt_in):
    """Memory ``[B, S, D]`` and logits ``[B, T, V]`` (float64 NumPy) of ``torch_model``'s
    encoder–decoder pair."""
    torch = pytest.importorskip("torch")
    d, (s, t) = config.embed_dim, (src.shape[1], tgt_in.shape[1])
    pe = np_sinusoidal(config.max_len, d)
    x = np.asarray(w.src_embedding.table, np.float64)[np.asarray(src)] * math.sqrt(d) + pe[:s]
    y = np.asarray(w.tgt_embedding.table, np.float64)[np.asarray(tgt_in)] * math.sqrt(d) + pe[:t]
    ignore = torch.tensor(np.arange(s)[None] >= np.asarray(lengths)[:, None])  # True = padding
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # True = masked
    with torch.no_grad():
        memory = enc(torch.tensor(x), src_key_padding_mask=ignore)
        out = dec(torch.tensor(y), memory, tgt_mask=causal, memory_key_padding_mask=ignore)
    head = w.tgt_embedding.table.T if w.head is None else w.head.w
    return memory.numpy(), out.numpy() @ np.asarray(head, np.float64)


@pytest.mark.parametrize("config", [BASE, POST_LN_UNTIED], ids=["pre-ln-tied", "post-ln-untied"])
def test_matches_pytorch(config, np_rng):
    pytest.importorskip("torch")
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    enc, dec = torch_model(w, config)
    memory, want_logits = torch_forward(enc, dec, w, config, src, lengths, tgt_in)
    got_memory = encode_jit(w, src, lengths, config)
    real = np.arange(5)[None] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(got_memory)[real], memory[real], rtol=2e-4, atol=2e-4)
    got = logits_jit(w, src, lengths, tgt_in, config)
    assert got.shape == (3, 4, 13) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want_logits, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("config", [BASE, POST_LN_UNTIED], ids=["pre-ln-tied", "post-ln-untied"])
def test_cached_decode_step_equals_teacher_forcing(config, np_rng):
    w = random_weights(config, seed=3)
    src, lengths, tgt_in = example_batch(config, np_rng)
    want = logits_jit(w, src, lengths, tgt_in, config)
    got, index = cached_logits(w, src, lengths, tgt_in, config)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert int(index) == tgt_in.shape[1]


def test_logits_and_translate_under_rank_promotion_raise(np_rng):
    """Under jax.numpy_rank_promotion("raise") the [T, D] position encodings added to the
    [B, T, D] embeddings (and the norms' scales) failed with "Operands could not be
    broadcast together" from inside the model."""
    pytest.importorskip("torch")
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    _, want_logits = torch_forward(*torch_model(w, BASE), w, BASE, src, lengths, tgt_in)
    run = functools.partial(translate, w, BASE, src, lengths, beam_size=2, max_len=5)
    with jax.numpy_rank_promotion("raise"):
        got = transformer_logits(w, src, lengths, tgt_in, BASE)
        beams = run()
    np.testing.assert_allclose(got, want_logits, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(beams, run())


@pytest.mark.parametrize("beam_size", [1, 2])
def test_translate_under_x64_equals_default(np_rng, beam_size):
    """With jax_enable_x64 the cache write's start indices must share the index's dtype."""
    w = random_weights(BASE, seed=3)
    src, lengths, _ = example_batch(BASE, np_rng)
    run = functools.partial(translate, w, BASE, src, lengths, beam_size=beam_size, max_len=5)
    with jax.enable_x64(True):
        wide = run()
    np.testing.assert_array_equal(wide, run())


def test_padding_does_not_change_a_sentence(np_rng):
    config = BASE
    w = random_weights(config, seed=5)
    src, lengths, tgt_in = example_batch(config, np_rng)  # row 1: 2 real tokens of 5
    np.testing.assert_allclose(
        encode_jit(w, src, lengths, config)[1, :2],
        encode_jit(w, src[1:2, :2], lengths[1:2], config)[0],
        rtol=1e-5,
        atol=1e-5,
    )
    batch_logits = logits_jit(w, src, lengths, tgt_in, config)
    alone = logits_jit(w, src[1:2, :2], lengths[1:2], tgt_in[1:2], config)
    np.testing.assert_allclose(batch_logits[1], alone[0], rtol=1e-5, atol=1e-5)
    junk = logits_jit(w, src.at[1, 2:].set(7), lengths, tgt_in, config)  # other pad ids
    np.testing.assert_allclose(junk, batch_logits, rtol=1e-6, atol=1e-6)
    # Causality: changing a later target token leaves earlier logits alone.
    later = logits_jit(w, src, lengths, tgt_in.at[:, 2].set(4), config)
    np.testing.assert_array_equal(later[:, :2], batch_logits[:, :2])
    assert not np.allclose(later[:, 2:], batch_logits[:, 2:])


def test_loss_masks_padding_and_grads(np_rng):
    config = BASE
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    tgt_out = jnp.concatenate([tgt_in[:, 1:], jnp.full((3, 1), EOS, jnp.int32)], axis=1)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_out, tgt_mask=mask)
    loss, grads = loss_and_grad_jit(w, batch, config)
    logits = np.asarray(logits_jit(w, src, lengths, tgt_in, config), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(tgt_out)[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    np.testing.assert_allclose(loss, (nll * m).sum() / m.sum(), rtol=1e-5)
    junk = dict(batch, tgt_out=jnp.where(mask, tgt_out, 5))
    np.testing.assert_allclose(loss_and_grad_jit(w, junk, config)[0], loss, rtol=1e-6)
    # So is a -100 "ignore" label there, in an eager call too (which refused it before).
    ignored = dict(batch, tgt_out=jnp.where(mask, tgt_out, -100))
    np.testing.assert_allclose(transformer_loss(w, ignored, config), loss, rtol=1e-5)
    # Label smoothing eps (the translate configs use 0.1): (1 - eps) nll + eps mean_v(-log p_v).
    eps = 0.1
    smooth = (1 - eps) * nll + eps * (-logp.mean(-1))
    smoothed = functools.partial(transformer_loss, label_smoothing=eps)
    smoothed = jit(smoothed, static_argnames="config")
    np.testing.assert_allclose(smoothed(w, batch, config), (smooth * m).sum() / m.sum(), rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # The source embedding gets gradient exactly for the real source tokens: padding is
    # never read.
    src_grad = np.abs(np.asarray(grads.src_embedding.table)).sum(-1)
    used = np.unique(np.asarray(src)[np.arange(5)[None] < np.asarray(lengths)[:, None]])
    assert np.all(src_grad[used] > 0) and np.all(np.delete(src_grad, used) == 0)


@pytest.mark.parametrize("config", [BASE, POST_LN_UNTIED], ids=["pre-ln-tied", "post-ln-untied"])
def test_loss_chunks_give_the_same_loss_and_grads(config, np_rng):
    # 4 target positions in chunks of 3 (the last padded), with label smoothing, a mask and
    # dropout drawn from the same key: the loss and gradients of the whole loss.
    dropped = dataclasses.replace(config, dropout=0.2)
    chunked = dataclasses.replace(dropped, loss_chunk_size=3)
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    tgt_out = jnp.concatenate([tgt_in[:, 1:], jnp.full((3, 1), EOS, jnp.int32)], axis=1)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_out, tgt_mask=mask)

    def loss(w, config):
        return transformer_loss(
            w, batch, config, rng=jax.random.key(4), deterministic=False, label_smoothing=0.1
        )

    grad = jit(jax.value_and_grad(loss), static_argnames="config")
    (whole, grads), (parts, grads_c) = grad(w, dropped), grad(w, chunked)
    np.testing.assert_allclose(parts, whole, rtol=1e-6)
    for g, g_c in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_c)):
        np.testing.assert_allclose(g_c, g, rtol=1e-5, atol=1e-6)
    # Eagerly, the smoothing is checked, and a JAX scalar works, as for the whole loss.
    eager = transformer_loss(w, batch, chunked, label_smoothing=jnp.float32(0.1))
    np.testing.assert_allclose(eager, transformer_loss(w, batch, config, label_smoothing=0.1))
    with pytest.raises(ValueError, match=r"transformer_loss: label_smoothing must be in \[0, 1\)"):
        transformer_loss(w, batch, chunked, label_smoothing=1.5)


def test_dropout_and_bfloat16(np_rng):
    config = dataclasses.replace(BASE, dropout=0.3)
    w = random_weights(config, seed=2)
    src, lengths, tgt_in = example_batch(config, np_rng)
    plain = logits_jit(w, src, lengths, tgt_in, BASE)  # = config's deterministic pass
    kw = dict(config=config, deterministic=False)
    a = logits_jit(w, src, lengths, tgt_in, rng=jax.random.key(1), **kw)
    b = logits_jit(w, src, lengths, tgt_in, rng=jax.random.key(2), **kw)
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="rng"):
        transformer_logits(w, src, lengths, tgt_in, config, deterministic=False)
    bf16 = dataclasses.replace(BASE, dtype="bfloat16")
    low = logits_jit(w, src, lengths, tgt_in, bf16)
    assert low.dtype == jnp.float32
    scale = float(np.abs(np.asarray(plain)).max())
    np.testing.assert_allclose(low, plain, atol=0.08 * scale)


def test_dropout_reaches_every_site(np_rng, monkeypatch):
    """dropout > 0 drops the embeddings, every residual branch and every attention's
    probabilities (a site left out still changes the logits, so the test above cannot
    tell)."""
    config = dataclasses.replace(BASE, dropout=0.3)
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    drops, attention = [], []
    real_dropout, real_attention = transformer.dropout, transformer.dot_product_attention

    def spy_dropout(rng, x, rate, **kw):
        drops.append((rate, rng is not None))
        return real_dropout(rng, x, rate, **kw)

    def spy_attention(*args, **kw):
        attention.append((kw["dropout_rate"], kw["dropout_rng"] is not None))
        return real_attention(*args, **kw)

    monkeypatch.setattr(transformer, "dropout", spy_dropout)
    monkeypatch.setattr(transformer, "dot_product_attention", spy_attention)
    logits = jax.eval_shape(
        functools.partial(transformer_logits, config=config, deterministic=False),
        w, src, lengths, tgt_in, rng=jax.random.key(0),
    )  # fmt: skip
    assert logits.shape == (3, 4, 13)
    # Each layer body is traced at least once: 2 embeddings + 2 encoder and 3 decoder
    # residual branches; encoder self-, decoder self- and cross-attention.
    assert len(drops) >= 2 + 2 + 3 and set(drops) == {(0.3, True)}
    assert len(attention) >= 3 and set(attention) == {(0.3, True)}


@pytest.mark.parametrize("beam_size", [1, 3])
def test_new_length_penalty_reuses_the_compiled_translate(
    np_rng, beam_size, check_length_penalty_reuses_translate
):
    """length_penalty only feeds arithmetic (greedy never reads it): it enters traced."""
    config = BASE
    w = random_weights(config, scale=1.0)
    src, lengths, _ = example_batch(config, np_rng)
    check_length_penalty_reuses_translate(transformer, w, config, src, lengths, beam_size)


def test_translate_passes_its_settings_to_the_search(np_rng, search_calls):
    """length_penalty, beam_size, max_len and the never-generated PAD and BOS reach the
    beam search (length_penalty as a traced value, seen once the program has run)."""
    w = random_weights(BASE)
    src, lengths, _ = example_batch(BASE, np_rng)
    transformer._translate.clear_cache()  # so that translate's jit traces (and calls the spy)
    out = translate(w, BASE, src, lengths, beam_size=3, max_len=3, length_penalty=1.375)
    jax.effects_barrier()  # the spy's callback has run
    assert out.shape == (3, 3)
    settings = dict(beam_size=3, max_len=3, length_penalty=1.375, forbidden=(PAD, BOS))
    assert search_calls == [settings]


def test_init_draws_each_leaf_at_its_fan_in(assert_independent_draws):
    """Embeddings N(0, 1/D) (unit variance after the sqrt(D) scale), every projection
    N(0, 1/fan_in), and every leaf, layer and attention block its own draw."""
    w = init_transformer(jax.random.key(3), POST_LN_UNTIED)
    d, f = POST_LN_UNTIED.embed_dim, POST_LN_UNTIED.mlp_ratio * POST_LN_UNTIED.embed_dim
    for arr, fan_in in [
        (w.src_embedding.table, d), (w.tgt_embedding.table, d),
        (w.encoder.attn.w_q, d), (w.encoder.attn.w_o, d), (w.encoder.mlp.up.w, d),
        (w.encoder.mlp.down.w, f), (w.decoder.cross_attn.w_v, d), (w.head.w, d),
    ]:  # fmt: skip
        np.testing.assert_allclose(np.std(np.asarray(arr)), 1 / math.sqrt(fan_in), rtol=0.2)
    per_layer = lambda stack, n: [jax.tree.map(lambda a, i=i: a[i], stack) for i in range(n)]
    assert_independent_draws(
        w._replace(encoder=None, decoder=None),
        *per_layer(w.encoder, POST_LN_UNTIED.num_encoder_layers),
        *per_layer(w.decoder, POST_LN_UNTIED.num_decoder_layers),
    )


def test_eager_calls_reuse_their_compiled_programs(np_rng, assert_compiled_once):
    """As for GPT: the encoder and decoder layer scans, run eagerly, were traced and
    compiled again on every call; the second call now traces nothing."""
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    memory = encode(w, src, lengths, BASE)
    cross = cross_kv(w, memory, BASE)
    src_mask = padding_mask(lengths, src.shape[1])
    cache = init_cache(BASE, src.shape[0], 4)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=tgt_in > 0)
    chunked = dataclasses.replace(BASE, loss_chunk_size=3)
    calls = {
        "transformer_logits": lambda: transformer_logits(w, src, lengths, tgt_in, BASE),
        "decode_step": lambda: decode_step(w, cache, tgt_in[:, 0], cross, src_mask, BASE),
        "transformer_loss in chunks": lambda: transformer_loss(w, batch, chunked),
    }
    assert_compiled_once(calls)


def test_a_decoding_loop_updates_the_kv_cache_in_place(np_rng):
    """A token loop over decode_step holds no copy of the self-attention cache: the layer
    scan took each layer's cache as an input and returned it as an output, so every step
    zero-filled a new [Ld, B, T_max, N, H] stack and copied it (translate, greedy and beam):
    3.4 k-stacks of temporary memory here, now 0.8."""
    config = dataclasses.replace(BASE, max_len=256)
    w = random_weights(config)
    src, lengths, _ = example_batch(config, np_rng)
    cross = cross_kv(w, encode(w, src, lengths, config), config)
    src_mask = padding_mask(lengths, src.shape[1])
    cache = init_cache(config, src.shape[0], 256)

    def loop(w, cache, cross):
        step = lambda i, c: decode_step(w, c, jnp.full((3,), 3 + i % 8), cross, src_mask, config)
        return jax.lax.fori_loop(0, 8, lambda i, c: step(i, c)[1], cache)

    compiled = jax.jit(loop).lower(w, cache, cross).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2 * cache.k.nbytes  # < k and v


def test_init_cache_dtype():
    bf16 = dataclasses.replace(BASE, dtype="bfloat16")
    cache = init_cache(bf16, 2, 5)
    assert cache.k.shape == cache.v.shape == (3, 2, 5, 3, 4)  # [Ld, B, T_max, N, H]
    assert cache.k.dtype == cache.v.dtype == jnp.bfloat16 and cache.index.dtype == jnp.int32
    assert init_cache(bf16, 2, 5, dtype="float32").k.dtype == jnp.float32
    assert init_cache(BASE, 2, 5, dtype=jnp.bfloat16).v.dtype == jnp.bfloat16


def test_beam_one_equals_greedy_on_the_model(np_rng):
    config = POST_LN_UNTIED
    w = random_weights(config, seed=11)
    src, lengths, _ = example_batch(config, np_rng)

    @jit
    def greedy_and_beam_one(w, src, lengths):
        # translate's compiled body, here without XLA optimisations (faster to compile).
        greedy = transformer._translate.__wrapped__(w, src, lengths, config, 1, 6, 0.6)
        memory = encode(w, src, lengths, config)
        cross, src_mask = cross_kv(w, memory, config), jnp.arange(5)[None] < lengths[:, None]

        def step(token, cache):
            logits, cache = decode_step(w, cache, token, cross, src_mask, config)
            return jax.nn.log_softmax(search.forbid_tokens(logits, (PAD, BOS))), cache

        cache = init_cache(config, 3, 6)
        kw = dict(max_len=6, bos_id=BOS, eos_id=EOS, state_batch_axis=1)
        return greedy, search.beam_search(step, cache, 3, beam_size=1, **kw).sequences

    greedy, beam = greedy_and_beam_one(w, src, lengths)
    np.testing.assert_array_equal(beam, greedy)
    assert greedy.shape == (3, 6) and not np.any(np.asarray(greedy) == BOS)


def test_beam_search_reading_the_cache_through_slot_rows_equals_reordering_it(np_rng):
    """translate's beam search leaves the KV cache in place and reads it through the beams'
    ancestor rows (decode_step's slot_rows): the same tokens, bit for bit, as reordering
    the cache by the parents after every step (beam_search's gather_rows), which it did
    before. The beams change parents here: not following them changes the result."""
    config = BASE
    w = random_weights(config, seed=3)  # (seeds whose beams all repeat one token test less)
    src, lengths, _ = example_batch(config, np_rng)
    k, steps, alpha = 3, 8, jnp.float32(0.6)

    @jit
    def followed_and_reordered(w, src, lengths, alpha):
        new = transformer._translate.__wrapped__(w, src, lengths, config, k, steps, alpha)
        memory = encode(w, src, lengths, config)
        cross = jax.tree.map(lambda a: jnp.repeat(a, k, axis=1), cross_kv(w, memory, config))
        src_mask = jnp.repeat(jnp.arange(5)[None] < lengths[:, None], k, axis=0)

        def step(token, cache):
            logits, cache = decode_step(w, cache, token, cross, src_mask, config)
            return jax.nn.log_softmax(search.forbid_tokens(logits, (PAD, BOS))), cache

        kw = dict(beam_size=k, max_len=steps, bos_id=BOS, eos_id=EOS, length_penalty=alpha)
        cache = init_cache(config, 3, steps)
        old = search.beam_search(step, cache, 3, state_batch_axis=1, **kw).sequences
        # The cache neither reordered nor followed: each row reads its own history.
        unfollowed = search.beam_search(
            step, cache, 3, state_batch_axis=1, reorder_state=lambda s, parents: s, **kw
        ).sequences
        return new, old, unfollowed

    new, old, unfollowed = followed_and_reordered(w, src, lengths, alpha)
    np.testing.assert_array_equal(new, old)
    assert np.any(np.asarray(unfollowed) != np.asarray(old))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(num_heads=5), "divisible"),
        (dict(embed_dim=9, num_heads=3), "even"),
        (dict(num_decoder_layers=0), "num_decoder_layers"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout="0.1"), "TransformerConfig.dropout must be a number"),
        (dict(layer_norm_eps=float("inf")), "layer_norm_eps must be positive"),
        (dict(dtype="float16"), "dtype"),
        (dict(dtype=np.dtype("float32")), r"TransformerConfig.dtype must be one of .*got dtype"),
        (dict(bos_id=EOS), "must differ"),
        (dict(mlp_ratio=1.5), "mlp_ratio must be a positive int, got 1.5"),
        (dict(num_encoder_layers=2.5), "num_encoder_layers must be a positive int"),
        (dict(layer_norm_eps=-1.0), "layer_norm_eps must be positive"),
        (dict(layer_norm_eps=float("nan")), "layer_norm_eps must be positive"),
        (dict(pre_ln="no"), "pre_ln must be a bool, got 'no'"),
        (dict(tie_embeddings=0), "tie_embeddings must be a bool"),
        (dict(remat="yes"), "remat must be a bool"),
        (dict(loss_chunk_size=0), "TransformerConfig.loss_chunk_size must be a positive int"),
        # Ids that passed a range check and failed later, inside decoding (or not at all).
        (dict(bos_id=1.5), r"bos_id must be an int in \[0, 11\) .*got 1.5"),
        (dict(eos_id=2.0), r"eos_id must be an int in \[0, 11\) .*got 2.0"),
        (dict(pad_id=True, bos_id=3), r"pad_id must be an int in \[0, 11\) .*got True"),
        (dict(pad_id=-1), r"pad_id must be an int in \[0, 11\) .*got -1"),
        (dict(eos_id=11), r"eos_id must be an int in \[0, 11\) .*got 11"),
        (dict(attention_implementation="flash"), "attention_implementation must be None or"),
        (
            dict(attention_implementation="cudnn", dropout=0.1),
            r"TransformerConfig.attention_implementation='cudnn' takes no attention dropout",
        ),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **changes)


def test_jit_takes_the_config_as_static_without_static_argnames(np_rng):
    """As for GPT: TransformerConfig is a pytree with no leaves, so plain jit works."""
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    np.testing.assert_array_equal(
        jit(transformer_logits)(w, src, lengths, tgt_in, BASE),
        logits_jit(w, src, lengths, tgt_in, BASE),
    )
    assert jit(lambda c: init_cache(c, 1, 4))(BASE).k.shape == init_cache(BASE, 1, 4).k.shape
    jitted, eager = (f(jax.random.key(0), BASE) for f in (jit(init_transformer), init_transformer))
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_bad_inputs_raise(np_rng):
    config = BASE
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    with pytest.raises(ValueError, match="src_lengths"):
        encode(w, src, lengths[:2], config)
    with pytest.raises(ValueError, match=r"src_lengths: lengths must lie in \[0, T="):
        encode(w, src, lengths.at[0].set(-1), config)  # seq2seq refuses it too
    with pytest.raises(ValueError, match="max_len"):
        encode(w, jnp.zeros((1, 10), jnp.int32), jnp.array([3]), config)
    # An empty source or target is named; it failed inside attention, naming q and k.
    empty = jnp.zeros((1, 0), jnp.int32)
    with pytest.raises(ValueError, match=r"encode: src must be \[B, T\] with 1 <= T"):
        encode(w, empty, jnp.array([0]), config)
    with pytest.raises(ValueError, match=r"translate: src must be \[B, T\] with 1 <= T"):
        translate(w, config, empty, jnp.array([0]), max_len=4)
    with pytest.raises(ValueError, match=r"decode: tgt_in must be \[B, T\] with 1 <= T"):
        decode(w, jnp.zeros((3, 5, 12)), jnp.ones((3, 5), bool), tgt_in[:, :0], config)
    with pytest.raises(ValueError, match="src"):
        encode(w, src.at[0, 0].set(11), lengths, config)
    memory = jnp.zeros((3, 5, 12))
    with pytest.raises(ValueError, match="src_mask"):
        decode(w, memory, jnp.ones((3, 4), bool), tgt_in, config)
    with pytest.raises(ValueError, match="max_len"):
        init_cache(config, 3, 10)
    with pytest.raises(ValueError, match="full"):
        cache = init_cache(config, 3, 2)._replace(index=jnp.int32(2))
        cross = cross_kv(w, memory, config)
        decode_step(w, cache, tgt_in[:, 0], cross, jnp.ones((3, 5), bool), config)
    # A hand-made cache: longer than the position table (its positions embedded as NaN), a
    # negative index (embedded as the last position), another layer count (jax's scan error).
    cross, step_mask = cross_kv(w, memory, config), jnp.ones((3, 5), bool)
    long_cache = init_cache(dataclasses.replace(config, max_len=10), 3, 10)._replace(index=9)
    bad_caches = [
        (long_cache, r"holds 10 positions, more than config.max_len=9"),
        (init_cache(config, 3, 4)._replace(index=jnp.int32(-1)), r"cache.index must be >= 0"),
        (init_cache(dataclasses.replace(config, num_decoder_layers=1), 3, 4), r"decoder layers"),
    ]
    for cache, match in bad_caches:
        with pytest.raises(ValueError, match=rf"decode_step: .*{match}"):
            decode_step(w, cache, tgt_in[:, 0], cross, step_mask, config)
    # Cache rows outside [0, B): the jitted decoder stack clipped them, reading row 0 or 2.
    own_rows = np.tile(np.arange(3, dtype=np.int32)[:, None], (1, 4))  # [B, T_max]
    for bad in (own_rows + (np.arange(4) == 1), -own_rows):
        with pytest.raises(ValueError, match=r"decode_step: slot_rows \(cache rows\) must lie"):
            decode_step(
                w, init_cache(config, 3, 4), tgt_in[:, 0], cross, step_mask, config, slot_rows=bad
            )
    with pytest.raises(ValueError, match="max_len"):
        translate(w, config, src, lengths, max_len=10)
    with pytest.raises(ValueError, match=r"translate: beam_size must be an int >= 1, got 2.0"):
        translate(w, config, src, lengths, beam_size=2.0)
    with pytest.raises(ValueError, match=r"translate: max_len must be an int >= 1, got 4.0"):
        translate(w, config, src, lengths, max_len=4.0)
    with pytest.raises(ValueError, match=r"translate: src's batch size B must be an int >= 1"):
        translate(w, config, src[:0], lengths[:0], max_len=4)  # not greedy_decode's message
    for beam, alpha in [(1, -1.0), (2, float("inf"))]:  # greedy checks it too
        with pytest.raises(ValueError, match=r"translate: length_penalty must be a finite nu"):
            translate(w, config, src, lengths, beam_size=beam, max_len=4, length_penalty=alpha)
    with pytest.raises(ValueError, match=r"init_cache: batch_size must be an int >= 1, got 3.0"):
        init_cache(config, 3.0, 4)
    # translate jits its encoder: it checks the lengths first (not clipped to [0, S]).
    for bad in (src.shape[1] + 1, -1):
        with pytest.raises(ValueError, match=r"translate: src_lengths: lengths must lie in"):
            translate(w, config, src, lengths.at[0].set(bad), max_len=4)
    # Checked before jnp.asarray, which (64-bit types off) would wrap 2**32 + 3 to 3.
    wrapping = np.asarray(lengths).astype(np.int64)
    wrapping[0] = 2**32 + 3
    for call in (
        lambda: encode(w, src, wrapping, config),
        lambda: translate(w, config, src, wrapping),
    ):
        with pytest.raises(ValueError, match=r"src_lengths: lengths must lie in.*4294967299"):
            call()
    # An additive float mask (0 = attend, -inf = hide) read as booleans hid every real key.
    additive = jnp.where(padding_mask(lengths, src.shape[1]), 0.0, -jnp.inf)
    memory = encode(w, src, lengths, config)
    with pytest.raises(ValueError, match=r"decode: src_mask must be boolean.*float32"):
        decode(w, memory, additive, tgt_in, config)
    with pytest.raises(ValueError, match=r"decode_step: src_mask must be boolean.*float32"):
        cross = cross_kv(w, memory, config)
        decode_step(w, init_cache(config, 3, 2), tgt_in[:, 0], cross, additive, config)
    with pytest.raises(ValueError, match=r"init_cache: dtype must be floating, got int32"):
        init_cache(config, 3, 2, dtype="int32")  # the cached keys would be truncated


def test_an_empty_batch_is_named(np_rng):
    """B = 0 failed inside attention ("dot_product_attention: empty batch"), naming neither
    the function called nor its input; gpt and translate name it."""
    w = random_weights(BASE)
    src, lengths, tgt_in = (x[:0] for x in example_batch(BASE, np_rng))
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=tgt_in > 0)
    calls = [
        ("encode: src", lambda: encode(w, src, lengths, BASE)),
        ("transformer_logits: src", lambda: transformer_logits(w, src, lengths, tgt_in, BASE)),
        ("transformer_loss: src", lambda: transformer_loss(w, batch, BASE)),
        (
            "decode: tgt_in",
            lambda: decode(w, jnp.zeros((0, 5, 12)), jnp.zeros((0, 5), bool), tgt_in, BASE),
        ),
    ]
    for where, call in calls:
        with pytest.raises(ValueError, match=rf"{where}'s batch size B must be an int >= 1, got 0"):
            call()


def test_the_logits_and_the_loss_name_themselves_not_encode_or_decode(np_rng):
    """Their inputs were checked inside encode and decode, whose names the errors gave."""
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=tgt_in > 0)
    long_tgt = jnp.zeros((3, BASE.max_len + 1), jnp.int32)
    long = dict(batch, tgt_in=long_tgt, tgt_out=long_tgt, tgt_mask=long_tgt > 0)
    bad_src, bad_lengths = dict(batch, src=src.at[0, 0].set(11)), lengths.at[0].set(-1)
    calls = [
        ("transformer_loss: src", lambda: transformer_loss(w, bad_src, BASE)),
        ("transformer_loss: tgt_in must be", lambda: transformer_loss(w, long, BASE)),
        (
            "transformer_logits: src_lengths",
            lambda: transformer_logits(w, src, bad_lengths, tgt_in, BASE),
        ),
        (
            r"transformer_logits: src \[B, S\] and tgt_in \[B, T\] must share B, got src "
            r"\(3, 5\) and tgt_in \(2, 4\)",
            lambda: transformer_logits(w, src, lengths, tgt_in[:2], BASE),
        ),
        (
            "transformer_logits: the weights",
            lambda: transformer_logits(w._replace(decoder=None), src, lengths, tgt_in, BASE),
        ),
    ]
    for where, call in calls:
        with pytest.raises(ValueError, match=f"^{where}"):
            call()


def test_cross_kv_refuses_memory_that_is_not_b_s_d(np_rng):
    # One sentence's [S, D] came out as k [Ld, S, N, H], its S read as the batch; integer
    # memory (token ids where encode's output belongs) was cast and projected.
    w = random_weights(BASE)
    src, lengths, _ = example_batch(BASE, np_rng)
    memory = encode(w, src, lengths, BASE)  # [3, 5, 12]
    for bad in (memory[0], memory[None], memory[..., :6]):
        with pytest.raises(ValueError, match=r"cross_kv: memory must be \[B, S, D=12\]"):
            cross_kv(w, bad, BASE)
    with pytest.raises(ValueError, match=r"cross_kv: memory must be floating.*int32"):
        cross_kv(w, jnp.zeros((3, 5, 12), jnp.int32), BASE)


def test_decode_and_cross_kv_take_memory_as_a_nested_list(np_rng):
    # decode failed on memory.ndim ("'list' object has no attribute 'ndim'") and cross_kv
    # on its dtype, while tgt_in and src_mask may be lists; None is named.
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    memory = encode(w, src, lengths, BASE)
    mask = padding_mask(lengths, src.shape[1])
    want = decode(w, memory, mask, tgt_in, BASE)
    np.testing.assert_array_equal(decode(w, memory.tolist(), mask, tgt_in, BASE), want)
    for a, b in zip(cross_kv(w, memory.tolist(), BASE), cross_kv(w, memory, BASE)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"decode: memory must be a floating array, got NoneType"):
        decode(w, None, mask, tgt_in, BASE)


def test_decode_step_takes_a_python_int_index_and_names_a_bad_one(np_rng):
    # A Python int index (KVCache(k, v, 0), as gpt_decode takes it) failed on index[None];
    # a float or [1] index failed inside take or int(), naming neither the cache nor its index.
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    cross = cross_kv(w, encode(w, src, lengths, BASE), BASE)
    src_mask = padding_mask(lengths, src.shape[1])
    cache = init_cache(BASE, 3, 4)
    want, want_cache = decode_step(w, cache, tgt_in[:, 0], cross, src_mask, BASE)
    got, got_cache = decode_step(w, cache._replace(index=0), tgt_in[:, 0], cross, src_mask, BASE)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_cache.k, want_cache.k)
    assert int(got_cache.index) == 1
    for bad, shown in [(jnp.float32(0.0), r"float32 of shape \(\)"), (jnp.array([0]), r"\(1,\)")]:
        with pytest.raises(
            ValueError, match=rf"decode_step: cache.index must be an integer scalar.*{shown}"
        ):
            decode_step(w, cache._replace(index=bad), tgt_in[:, 0], cross, src_mask, BASE)


def test_int64_ids_are_checked_before_the_int32_conversion(np_rng):
    # jnp.asarray (64-bit types off) wraps the int64 id 2**32 + 3 to the valid id 3.
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    src64, tgt64 = np.asarray(src, np.int64), np.asarray(tgt_in, np.int64)
    src64[0, 0] = tgt64[0, 1] = 2**32 + 3
    with pytest.raises(ValueError, match=r"encode: src must lie in"):
        encode(w, src64, lengths, BASE)
    with pytest.raises(ValueError, match=r"translate: src must lie in"):
        translate(w, BASE, src64, lengths, max_len=4)
    with pytest.raises(ValueError, match=r"decode: tgt_in must lie in"):
        decode(w, jnp.zeros((3, 5, 12)), jnp.ones((3, 5), bool), tgt64, BASE)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt64, tgt_mask=tgt64 > 0)
    with pytest.raises(ValueError, match=r"transformer_loss: tgt_out ids must lie in"):
        transformer_loss(w, batch, BASE)


def test_translate_defaults_to_the_config_max_len(np_rng):
    # The default max_len is config.max_len (9 here), the most the position table allows.
    w = random_weights(BASE)
    src, lengths, _ = example_batch(BASE, np_rng)
    out = jax.eval_shape(lambda: translate(w, BASE, src, lengths))  # traced, not compiled
    assert out.shape == (3, BASE.max_len) and out.dtype == jnp.int32


def test_weights_must_match_the_config(np_rng):
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    untied = random_weights(POST_LN_UNTIED)  # a head, no final norms
    with pytest.raises(
        ValueError,
        match=r"translate: the weights .* missing: .encoder_norm.scale.*unexpected: .head.w",
    ):
        translate(untied, BASE, src, lengths, max_len=4)
    shallow = random_weights(dataclasses.replace(BASE, num_decoder_layers=2))
    with pytest.raises(
        ValueError, match=r"decode: .* shape .*\.decoder\.ln1\.scale \(2, 12\) != \(3, 12\)"
    ):
        decode(shallow, jnp.zeros((3, 5, 12)), jnp.ones((3, 5), bool), tgt_in, BASE)
    with pytest.raises(ValueError, match=r"encode: the weights .* do not match"):
        encode(shallow, src, lengths, BASE)
    with pytest.raises(ValueError, match=r"cross_kv: the weights .* do not match"):
        cross_kv(shallow, jnp.zeros((3, 5, 12)), BASE)
    cache, cross = init_cache(BASE, 3, 4), CrossKV(*(jnp.zeros((3, 3, 5, 3, 4)),) * 2)
    with pytest.raises(ValueError, match=r"decode_step: the weights .* do not match"):
        decode_step(shallow, cache, tgt_in[:, 0], cross, jnp.ones((3, 5), bool), BASE)


# --------------------------------------------------------------------------------------
# Overfitting a tiny corpus: "let's go" -> "vamos" and friends.
# --------------------------------------------------------------------------------------

PAIRS = [
    ("let's go", "vamos"),
    ("let's eat", "comamos"),
    ("i am cold", "tengo frío"),
    ("she is here", "ella está aquí"),
    ("we are very happy", "estamos muy felices"),
    ("go away", "vete"),
]


def tiny_corpus():
    """Word-level ids as the batch dict of ``transformer_loss`` (pad 0, BOS 1, EOS 2)."""
    vocab = lambda sents: {
        w: i
        for i, w in enumerate(
            ["<pad>", "<bos>", "<eos>", *sorted({w for s in sents for w in s.split()})]
        )
    }
    sv, tv = vocab(p[0] for p in PAIRS), vocab(p[1] for p in PAIRS)
    src = [[sv[w] for w in s.split()] for s, _ in PAIRS]
    tgt = [[tv[w] for w in t.split()] for _, t in PAIRS]
    s_len, t_len = max(map(len, src)), max(map(len, tgt)) + 1
    pad = lambda seqs, n: np.array([s + [PAD] * (n - len(s)) for s in seqs], np.int32)
    batch = dict(
        src=pad(src, s_len),
        src_lengths=np.array([len(s) for s in src], np.int32),
        tgt_in=pad([[BOS, *t] for t in tgt], t_len),
        tgt_out=pad([[*t, EOS] for t in tgt], t_len),
        tgt_mask=pad([[1] * (len(t) + 1) for t in tgt], t_len).astype(bool),
    )
    return batch, len(sv), len(tv)


@functools.partial(jit, static_argnames=("config", "steps"))
def train(weights, batch, config, steps):
    optimizer = optax.adam(3e-3)

    def update(carry, _):
        weights, opt_state = carry
        loss, grads = jax.value_and_grad(transformer_loss)(weights, batch, config)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
            updates, opt_state = optimizer.update(grads, opt_state, weights)
        return (optax.apply_updates(weights, updates), opt_state), loss

    (weights, _), losses = jax.lax.scan(update, (weights, optimizer.init(weights)), length=steps)
    return weights, losses


@pytest.mark.slow  # compiling training and decoding dominates (several seconds each)
def test_overfits_tiny_corpus():
    batch, vs, vt = tiny_corpus()
    config = TransformerConfig(
        src_vocab_size=vs,
        tgt_vocab_size=vt,
        embed_dim=32,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        mlp_ratio=2,
        max_len=8,
    )
    weights = jit(init_transformer, static_argnames="config")(jax.random.key(0), config)
    assert weights.head is None and weights.decoder.self_attn.w_q.shape == (2, 32, 4, 8)
    std = float(jnp.std(weights.tgt_embedding.table))
    assert 0.7 / math.sqrt(32) < std < 1.3 / math.sqrt(32)
    weights, losses = train(weights, batch, config, 150)
    assert float(losses[-1]) < 0.05 < float(losses[0])
    want = batch["tgt_out"]
    for beam in (1, 3):
        out = np.asarray(
            translate(
                weights, config, batch["src"], batch["src_lengths"], beam_size=beam, max_len=5
            )
        )
        np.testing.assert_array_equal(out[:, : want.shape[1]], want)
        np.testing.assert_array_equal(out[:, want.shape[1] :], PAD)


def test_translate_default_max_len_stays_50_when_the_table_allows():
    """The default was 50 before the None default: a config with a longer table keeps it."""
    config = dataclasses.replace(BASE, max_len=64)
    w = random_weights(config)
    src, lengths = jnp.ones((3, 5), jnp.int32), jnp.array([5, 4, 3])
    out = jax.eval_shape(lambda: translate(w, config, src, lengths))
    assert out.shape == (3, 50)


def torch_logits_case(config, np_rng):
    """Random weights, a batch ``(src, lengths, tgt_in)`` and PyTorch's logits for them."""
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    _, want = torch_forward(*torch_model(w, config), w, config, src, lengths, tgt_in)
    return w, (src, lengths, tgt_in), want


def test_layer_norm_eps_reaches_every_norm(np_rng):
    # Elsewhere eps is PyTorch's default, so a norm that dropped it still matched.
    pytest.importorskip("torch")
    config = dataclasses.replace(BASE, layer_norm_eps=0.5)
    w, (src, lengths, tgt_in), want_logits = torch_logits_case(config, np_rng)
    got = logits_jit(w, src, lengths, tgt_in, config)  # (the encoder's norms via memory)
    np.testing.assert_allclose(got, want_logits, rtol=2e-4, atol=2e-4)


def test_translate_rows_do_not_depend_on_their_neighbours(np_rng):
    # Beam search repeats each sentence's source mask k times: repeat, not tile, or beam j
    # of sentence b reads sentence (b*k + j) mod B's padding.
    w = random_weights(BASE, seed=3)
    src, lengths, _ = example_batch(BASE, np_rng)
    run = lambda s, n: np.asarray(translate(w, BASE, s, n, beam_size=2, max_len=5))
    np.testing.assert_array_equal(run(src[::-1], lengths[::-1])[::-1], run(src, lengths))


def test_swapped_arguments_name_the_argument_order(np_rng):
    """translate and init_cache take the config early, the others last: a config in the
    wrong place failed as "unhashable type: 'jaxlib._jax.ArrayImpl'" (or an AttributeError
    of an int), naming neither the function nor the argument."""
    w = init_transformer(jax.random.key(0), BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=tgt_in > 0)
    mask = padding_mask(lengths, src.shape[1])
    calls = {
        r"translate: config must be a TransformerConfig, got ArrayImpl; the arguments are "
        r"translate\(weights, config, src, src_lengths\)": lambda: translate(w, src, lengths, BASE),
        "encode": lambda: encode(w, BASE, src, lengths),
        "cross_kv": lambda: cross_kv(w, BASE, src),
        "decode": lambda: decode(w, BASE, src, mask, tgt_in),
        "transformer_logits": lambda: transformer_logits(w, BASE, src, lengths, tgt_in),
        "transformer_loss: config must be a TransformerConfig, got dict": lambda: transformer_loss(
            w, BASE, batch
        ),
        r"init_cache: config must be a TransformerConfig, got int; the arguments are "
        r"init_cache\(config, batch_size, max_len\)": lambda: init_cache(3, BASE, 4),
        "decode_step": lambda: decode_step(w, BASE, None, tgt_in[:, 0], None, mask),
    }
    for match, call in calls.items():
        with pytest.raises(TypeError, match=match if ":" in match else f"{match}: config must"):
            call()


def test_deterministic_pass_of_a_dropout_config_is_the_reference(np_rng):
    """deterministic=True (the default) switches dropout off even with an rng at hand: the
    logits of a dropout=0.3 config are PyTorch's eval-mode ones (a rate taken from the config
    regardless of ``deterministic`` would drop at evaluation)."""
    pytest.importorskip("torch")
    config = dataclasses.replace(BASE, dropout=0.3)
    w, (src, lengths, tgt_in), want = torch_logits_case(config, np_rng)
    for rng in (None, jax.random.key(1)):
        got = transformer_logits(w, src, lengths, tgt_in, config, rng=rng, deterministic=True)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_decode_step_names_a_cache_of_the_wrong_rank(np_rng):
    """One layer's [B, T_max, N, H] cache (init_cache's without its layer axis) failed as
    "not enough values to unpack (expected 5, got 4)", naming neither function nor cache."""
    w = random_weights(BASE)
    _, _, tgt_in = example_batch(BASE, np_rng)
    cache, cross = init_cache(BASE, 3, 4), CrossKV(*(jnp.zeros((3, 3, 5, 3, 4)),) * 2)
    one_layer = cache._replace(k=cache.k[0], v=cache.v[0])
    with pytest.raises(
        ValueError,
        match=r"decode_step: cache k and v must be \[Ld, B, T_max, N, H\].*\(3, 4, 3, 4\)",
    ):
        decode_step(w, one_layer, tgt_in[:, 0], cross, jnp.ones((3, 5), bool), BASE)
    # gpt.unstack_layers' per-layer tuples (ndim 5 as an array) failed as "'tuple' object
    # has no attribute 'shape'".
    per_layer = cache._replace(k=tuple(cache.k), v=tuple(cache.v))
    with pytest.raises(ValueError, match=r"decode_step: cache k and v must be .*a tuple of"):
        decode_step(w, per_layer, tgt_in[:, 0], cross, jnp.ones((3, 5), bool), BASE)


def test_decode_step_names_a_cache_cross_or_token_of_the_wrong_kind(np_rng):
    """A cache or cross that is no KVCache / CrossKV (a restored dict, encode's memory) failed
    as "AttributeError: ... has no attribute 'k'"; an integer cache (init_cache refuses one)
    silently truncated the keys and values; token ids were converted before their check, so
    an int64 2**32 + 5 wrapped to id 5 (seq2seq.decode_step refuses it), and the errors named
    no function."""
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    memory = encode(w, src, lengths, BASE)
    cross, src_mask = cross_kv(w, memory, BASE), padding_mask(lengths, src.shape[1])
    cache = init_cache(BASE, 3, 4)
    token = tgt_in[:, 0]
    for bad, kind in [(cache._asdict(), "dict"), (None, "NoneType")]:
        with pytest.raises(ValueError, match=rf"decode_step: cache must be a KVCache.*got {kind}"):
            decode_step(w, bad, token, cross, src_mask, BASE)
    ints = cache._replace(k=cache.k.astype(jnp.int32), v=cache.v.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"decode_step: cache.k must be floating.*int32"):
        decode_step(w, ints, token, cross, src_mask, BASE)
    with pytest.raises(ValueError, match=r"decode_step: cross must be a CrossKV.*ArrayImpl"):
        decode_step(w, cache, token, memory, src_mask, BASE)
    wrapped = np.asarray(token, np.int64)
    wrapped[0] = 2**32 + 5
    with pytest.raises(ValueError, match=r"decode_step: token ids must lie in \[0, 13\)"):
        decode_step(w, cache, wrapped, cross, src_mask, BASE)
    with pytest.raises(ValueError, match=r"decode_step: token ids must be integers"):
        decode_step(w, cache, token.astype(jnp.float32), cross, src_mask, BASE)


def test_dropout_rng_that_is_not_one_key_raises_naming_rng(np_rng):
    """An int seed or a batch of keys failed inside jax.random ("invalid PRNG key data",
    "split accepts a single key"), naming neither the function nor rng; transformer_logits
    and transformer_loss split it even with dropout off, where encode and gpt ignore it."""
    config = dataclasses.replace(BASE, dropout=0.1)
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=tgt_in > 0)
    for bad in [0, jax.random.split(jax.random.key(0), 2)]:
        for where, call in [
            (
                "transformer_logits",
                lambda **kw: transformer_logits(w, src, lengths, tgt_in, config, **kw),
            ),
            ("transformer_loss", lambda **kw: transformer_loss(w, batch, config, **kw)),
            ("encode", lambda **kw: encode(w, src, lengths, config, **kw)),
        ]:
            with pytest.raises(ValueError, match=rf"{where}: dropout > 0 .*one PRNG key"):
                call(rng=bad, deterministic=False)
            call(rng=bad)  # deterministic: the key is not used
