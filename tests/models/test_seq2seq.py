"""Tests for jaxattn.models.seq2seq: a float64 NumPy reference of the whole model, teacher
forcing vs step-by-step decoding, padding invariance, attention weights, the masked loss,
dropout, bad inputs, and overfitting a tiny corpus that includes "let's go" -> "vamos"."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxattn.models import beam_search as search
from jaxattn.models import seq2seq
from jaxattn.models.seq2seq import (
    Seq2SeqConfig,
    decode_step,
    encode,
    init_decode_state,
    init_seq2seq,
    seq2seq_logits,
    seq2seq_loss,
    translate,
)
from jaxattn.ops.lstm import BidirectionalWeights

PAD, BOS, EOS = 0, 1, 2
# Odd, distinct sizes: Vs=11, V=13, E=5, h=7, attention_dim=3.
BASE = Seq2SeqConfig(src_vocab_size=11, tgt_vocab_size=13, embed_dim=5, hidden_size=7)
VARIANTS = [
    dataclasses.replace(BASE, attention="none", bidirectional_encoder=True, num_layers=2),
    dataclasses.replace(BASE, attention="dot", bidirectional_encoder=True),
    dataclasses.replace(BASE, attention="general", num_layers=2),
    dataclasses.replace(BASE, attention="additive", attention_dim=3),
]
IDS = [f"{c.attention}-bi{c.bidirectional_encoder:d}-L{c.num_layers}" for c in VARIANTS]
WITH_ATTENTION = VARIANTS[1:]

# Compiled once per config and shape and shared by the tests (eager dispatch compiles every
# op separately). XLA's backend optimisations are off: this halves compile time, which is
# most of these tests' cost, and changes no result beyond float rounding.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
logits_jit = jit(seq2seq_logits, static_argnames=("config", "deterministic"))
encode_jit = jit(encode, static_argnames=("config",))
loss_and_grad_jit = jit(jax.value_and_grad(seq2seq_loss), static_argnames=("config",))
step_jit = jit(decode_step, static_argnames=("config",))


def random_weights(config, seed=0, scale=0.5):
    """Weights of ``init_seq2seq``'s structure filled with N(0, scale^2) NumPy draws.

    (Drawing them with jax.random would compile a PRNG kernel per shape.)
    """
    shapes = jax.eval_shape(lambda key: init_seq2seq(key, config), jax.random.key(0))
    np_rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * np_rng.standard_normal(s.shape), s.dtype), shapes
    )


def example_batch(config, np_rng):
    """B=3 sources of lengths 5, 2, 4 (padded to S=5) and targets of T=4."""
    lengths = np.array([5, 2, 4], np.int32)
    src = np_rng.integers(3, config.src_vocab_size, (3, 5)).astype(np.int32)
    src[np.arange(5)[None] >= lengths[:, None]] = PAD
    tgt_in = np_rng.integers(3, config.tgt_vocab_size, (3, 4)).astype(np.int32)
    tgt_in[:, 0] = BOS
    return jnp.asarray(src), jnp.asarray(lengths), jnp.asarray(tgt_in)


# --------------------------------------------------------------------------------------
# float64 NumPy reference: explicit loops over rows and time.
# --------------------------------------------------------------------------------------


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_lstm(w, xs, lengths, h0, c0, reverse=False):
    """One LSTM layer over rows of different lengths; returns (ys, h, c)."""
    w_ih, w_hh, b = (np.asarray(a, np.float64) for a in w)
    hid = w_hh.shape[0]
    ys = np.zeros((*xs.shape[:2], hid))
    h, c = h0.copy(), c0.copy()
    for row in range(xs.shape[0]):
        steps = range(lengths[row])
        for t in reversed(steps) if reverse else steps:
            i, f, g, o = np.split(xs[row, t] @ w_ih + h[row] @ w_hh + b, 4)
            c[row] = sigmoid(f) * c[row] + sigmoid(i) * np.tanh(g)
            h[row] = sigmoid(o) * np.tanh(c[row])
            ys[row, t] = h[row]
    return ys, h, c


def np_forward(w, config, src, lengths, tgt_in):
    """Teacher-forced logits [B, T, V] and attention [B, T, S] of the whole model."""
    f64 = lambda a: np.asarray(a, np.float64)
    src, lengths, tgt_in = np.asarray(src), np.asarray(lengths), np.asarray(tgt_in)
    b, s = src.shape
    hid = config.hidden_size
    zeros = lambda: np.zeros((b, hid))
    xs, finals = f64(w.src_embedding.table)[src], []
    for layer in w.encoder:
        if isinstance(layer, BidirectionalWeights):
            yf, hf, cf = np_lstm(layer.forward, xs, lengths, zeros(), zeros())
            yb, hb, cb = np_lstm(layer.backward, xs, lengths, zeros(), zeros(), reverse=True)
            xs = np.concatenate([yf, yb], -1)
            finals.append((hf + hb, cf + cb))  # bridge: sum of the directions
        else:
            xs, h, c = np_lstm(layer, xs, lengths, zeros(), zeros())
            finals.append((h, c))
    memory = xs @ f64(w.memory.w) if w.memory is not None else xs
    ys = f64(w.tgt_embedding.table)[tgt_in]
    t_len = np.full(b, tgt_in.shape[1])
    for layer, (h0, c0) in zip(w.decoder, finals):
        ys, _, _ = np_lstm(layer, ys, t_len, h0, c0)
    if config.attention == "none":
        hidden, att = ys, None
    else:
        if config.attention == "dot":
            scores = ys @ memory.transpose(0, 2, 1)
        elif config.attention == "general":
            scores = ys @ f64(w.attention) @ memory.transpose(0, 2, 1)
        else:
            wq, wk, v = (f64(a) for a in w.attention)
            scores = np.tanh((ys @ wq)[:, :, None] + (memory @ wk)[:, None]) @ v
        real = np.arange(s)[None, None] < lengths[:, None, None]  # [B, 1, S]
        e = np.where(real, np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
        att = e / e.sum(-1, keepdims=True)
        context = att @ memory
        hidden = np.tanh(np.concatenate([context, ys], -1) @ f64(w.combine.w) + f64(w.combine.b))
    return hidden @ f64(w.output.w) + f64(w.output.b), att


@pytest.mark.parametrize("config", VARIANTS, ids=IDS)
def test_matches_numpy_reference(config, np_rng):
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    logits, att = logits_jit(w, src, lengths, tgt_in, config)
    want_logits, want_att = np_forward(w, config, src, lengths, tgt_in)
    assert logits.shape == (3, 4, 13) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, want_logits, rtol=2e-4, atol=2e-4)
    if config.attention == "none":
        assert att is None
    else:
        assert att.shape == (3, 4, 5)
        np.testing.assert_allclose(att, want_att, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("config", VARIANTS, ids=IDS)
def test_teacher_forcing_equals_decode_step_loop(config, np_rng):
    w = random_weights(config, seed=3)
    src, lengths, tgt_in = example_batch(config, np_rng)
    logits, att = logits_jit(w, src, lengths, tgt_in, config)
    memory, final = encode_jit(w, src, lengths, config)
    state = init_decode_state(final, config)
    src_mask = jnp.arange(src.shape[1])[None] < lengths[:, None]
    for t in range(tgt_in.shape[1]):
        step_logits, state, step_att = step_jit(w, state, tgt_in[:, t], memory, src_mask, config)
        np.testing.assert_allclose(step_logits, logits[:, t], rtol=1e-5, atol=1e-5)
        if att is None:
            assert step_att is None
        else:
            np.testing.assert_allclose(step_att, att[:, t], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", VARIANTS[1:2], ids=IDS[1:2])
def test_padding_does_not_change_a_sentence(config, np_rng):
    w = random_weights(config, seed=5)
    src, lengths, tgt_in = example_batch(config, np_rng)  # row 1 has 2 real tokens of 5
    alone = src[1:2, :2], lengths[1:2], tgt_in[1:2]
    mem_alone, (h_alone, c_alone) = encode_jit(w, *alone[:2], config)
    mem_batch, (h_batch, c_batch) = encode_jit(w, src, lengths, config)
    np.testing.assert_allclose(mem_batch[1, :2], mem_alone[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mem_batch[1, 2:], 0.0)  # padding outputs are zero
    np.testing.assert_allclose(h_batch[:, 1], h_alone[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_batch[:, 1], c_alone[:, 0], rtol=1e-5, atol=1e-6)
    logits_alone, att_alone = logits_jit(w, *alone, config)
    logits_batch, att_batch = logits_jit(w, src, lengths, tgt_in, config)
    np.testing.assert_allclose(logits_batch[1], logits_alone[0], rtol=1e-5, atol=1e-5)
    if att_alone is not None:
        np.testing.assert_allclose(att_batch[1, :, :2], att_alone[0], rtol=1e-5, atol=1e-6)
    # Different pad ids behind the real tokens change nothing either.
    logits_junk, _ = logits_jit(w, src.at[1, 2:].set(7), lengths, tgt_in, config)
    np.testing.assert_array_equal(logits_junk, logits_batch)


@pytest.mark.parametrize(
    "config",
    [c for c in VARIANTS if c.attention != "none"],
    ids=[i for i, c in zip(IDS, VARIANTS) if c.attention != "none"],
)
def test_attention_sums_to_one_over_real_tokens(config, np_rng):
    w = random_weights(config, seed=7)
    src, lengths, tgt_in = example_batch(config, np_rng)
    _, att = logits_jit(w, src, lengths, tgt_in, config)
    real = np.arange(5)[None, None] < np.asarray(lengths)[:, None, None]  # [B, 1, S]
    np.testing.assert_array_equal(np.where(real, 0.0, att), 0.0)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(att)[np.broadcast_to(real, att.shape)] > 0)


def test_loss_masks_padding_and_label_smoothing(np_rng):
    config = VARIANTS[3]
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    tgt_out = jnp.concatenate([tgt_in[:, 1:], jnp.full((3, 1), EOS, jnp.int32)], axis=1)
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_out, tgt_mask=mask)
    loss, grads = loss_and_grad_jit(w, batch, config)
    logits = np.asarray(logits_jit(w, src, lengths, tgt_in, config)[0], np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(tgt_out)[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    np.testing.assert_allclose(loss, (nll * m).sum() / m.sum(), rtol=1e-5)
    # Targets under the mask are ignored.
    junk = dict(batch, tgt_out=jnp.where(mask, tgt_out, 5))
    np.testing.assert_allclose(loss_and_grad_jit(w, junk, config)[0], loss, rtol=1e-6)
    # So is a -100 "ignore" label there, in an eager call too (which refused it before).
    ignored = dict(batch, tgt_out=jnp.where(mask, tgt_out, -100))
    np.testing.assert_allclose(seq2seq_loss(w, ignored, config), loss, rtol=1e-5)
    # Label smoothing eps (the translate configs use 0.1), through the model's loss:
    # (1 - eps) * nll + eps * mean_v(-log p_v).
    eps = 0.1
    smooth = (1 - eps) * nll + eps * (-logp.mean(-1))
    smoothed = jit(functools.partial(seq2seq_loss, label_smoothing=eps), static_argnames="config")
    np.testing.assert_allclose(smoothed(w, batch, config), (smooth * m).sum() / m.sum(), rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_forward_mode_through_the_autodiff_lstm(np_rng):
    """``lstm_implementation="autodiff"`` lets ``jax.jvp`` through the model: its tangent is
    the default kernel's gradient along the direction. The default's refusal names it."""
    config = VARIANTS[1]  # bidirectional encoder, dot attention
    w, direction = random_weights(config), random_weights(config, seed=1)
    src, lengths, tgt_in = example_batch(config, np_rng)
    tgt_out = jnp.concatenate([tgt_in[:, 1:], jnp.full((3, 1), EOS, jnp.int32)], axis=1)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_out,
                 tgt_mask=jnp.ones(tgt_in.shape, bool))  # fmt: skip
    forward = dataclasses.replace(config, lstm_implementation="autodiff")
    loss, tangent = jit(
        lambda w, d: jax.jvp(lambda w: seq2seq_loss(w, batch, forward), (w,), (d,))
    )(w, direction)
    want_loss, grads = loss_and_grad_jit(w, batch, config)
    along = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(tangent, along, rtol=1e-4)
    with pytest.raises(TypeError, match=r"Seq2SeqConfig\.lstm_implementation"):
        jax.jvp(lambda w: seq2seq_loss(w, batch, config), (w,), (direction,))


def test_dropout(np_rng):
    config = dataclasses.replace(VARIANTS[2], dropout=0.3)
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    plain = logits_jit(w, src, lengths, tgt_in, VARIANTS[2])[0]  # = config's deterministic pass
    kw = dict(config=config, deterministic=False)
    a = logits_jit(w, src, lengths, tgt_in, rng=jax.random.key(1), **kw)[0]
    b = logits_jit(w, src, lengths, tgt_in, rng=jax.random.key(2), **kw)[0]
    assert not np.allclose(a, plain) and not np.allclose(a, b)
    np.testing.assert_array_equal(
        a, logits_jit(w, src, lengths, tgt_in, rng=jax.random.key(1), **kw)[0]
    )
    with pytest.raises(ValueError, match="rng"):
        seq2seq_logits(w, src, lengths, tgt_in, config, deterministic=False)
    # encode alone too, not jax.random.split(None)'s "unexpected PRNG key type".
    with pytest.raises(ValueError, match="encode: dropout > 0 with deterministic=False needs"):
        encode(w, src, lengths, config, deterministic=False)


def test_dropout_reaches_every_site(np_rng, monkeypatch):
    """dropout > 0 drops both embeddings, the LSTMs' inter-layer outputs of encoder and
    decoder, and the output layer's input (a site left out still changes the logits, so
    test_dropout cannot tell)."""
    config = dataclasses.replace(VARIANTS[2], dropout=0.3)  # 2 layers: inter-layer dropout
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    drops, stacks = [], []
    real_dropout, real_stack = seq2seq.dropout, seq2seq.lstm_stack

    def spy_dropout(rng, x, rate, *, deterministic=False):
        drops.append((rate, deterministic, rng is not None))
        return real_dropout(rng, x, rate, deterministic=deterministic)

    def spy_stack(*args, **kw):
        stacks.append(
            (kw.get("dropout_rate", 0.0), kw.get("deterministic"), kw.get("rng") is not None)
        )
        return real_stack(*args, **kw)

    monkeypatch.setattr(seq2seq, "dropout", spy_dropout)
    monkeypatch.setattr(seq2seq, "lstm_stack", spy_stack)
    logits, _ = jax.eval_shape(
        functools.partial(seq2seq_logits, config=config, deterministic=False),
        w, src, lengths, tgt_in, rng=jax.random.key(0),
    )  # fmt: skip
    assert logits.shape == (3, 4, 13)
    assert drops == [(0.3, False, True)] * 3  # source and target embeddings, output layer
    assert stacks == [(0.3, False, True)] * 2  # encoder, decoder


@pytest.mark.parametrize("beam_size", [1, 3])
def test_new_length_penalty_reuses_the_compiled_translate(
    np_rng, beam_size, check_length_penalty_reuses_translate
):
    """length_penalty only feeds arithmetic (greedy never reads it): it enters traced."""
    config = VARIANTS[1]
    w = random_weights(config, scale=1.0)
    src, lengths, _ = example_batch(config, np_rng)
    check_length_penalty_reuses_translate(seq2seq, w, config, src, lengths, beam_size)


def test_translate_passes_its_settings_to_the_search(np_rng, search_calls):
    """length_penalty, beam_size, max_len and the never-generated PAD and BOS reach the
    beam search (length_penalty as a traced value, seen once the program has run)."""
    config = VARIANTS[1]
    w = random_weights(config)
    src, lengths, _ = example_batch(config, np_rng)
    seq2seq._translate.clear_cache()  # so that translate's jit traces (and calls the spy)
    out = translate(w, config, src, lengths, beam_size=3, max_len=3, length_penalty=1.375)
    jax.effects_barrier()  # the spy's callback has run
    assert out.shape == (3, 3)
    settings = dict(beam_size=3, max_len=3, length_penalty=1.375, forbidden=(PAD, BOS))
    assert search_calls == [settings]


@pytest.mark.parametrize("config", VARIANTS[1:], ids=lambda c: c.attention)
def test_empty_source_attends_to_nothing(config):
    """S = 0 reads like a source of length 0: zero attention weights, zero context."""
    w = random_weights(config)
    tgt_in = jnp.array([[BOS, 4, 5], [BOS, 6, 7]])
    empty = jnp.zeros((2, 0), jnp.int32), jnp.zeros((2,), jnp.int32)
    padded = jnp.full((2, 1), PAD), jnp.zeros((2,), jnp.int32)
    logits, attn = seq2seq_logits(w, *empty, tgt_in, config)
    np.testing.assert_allclose(logits, seq2seq_logits(w, *padded, tgt_in, config)[0], atol=1e-6)
    assert attn.shape == (2, 3, 0)
    np.testing.assert_array_equal(
        translate(w, config, *empty, beam_size=2, max_len=4),
        translate(w, config, *padded, beam_size=2, max_len=4),
    )


@pytest.mark.parametrize("config", [VARIANTS[0], VARIANTS[3]], ids=lambda c: c.attention)
def test_empty_source_has_the_gradient_of_a_padded_one(config):
    """S = 0 trains as a source of length 0: the LSTM's hand-written backward over no
    steps gave "slice_sizes must be less than or equal to operand shape"."""
    w = random_weights(config)
    tgt_in = jnp.array([[BOS, 4, 5], [BOS, 6, 7]])
    target = dict(tgt_in=tgt_in, tgt_out=jnp.roll(tgt_in, -1, 1), tgt_mask=jnp.ones((2, 3), bool))
    empty = dict(target, src=jnp.zeros((2, 0), jnp.int32), src_lengths=jnp.zeros((2,), jnp.int32))
    padded = dict(empty, src=jnp.full((2, 1), PAD))
    grads = [jax.grad(seq2seq_loss)(w, batch, config) for batch in (empty, padded)]
    for got, want in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_beam_one_equals_greedy_on_the_model(np_rng):
    config = VARIANTS[1]
    w = random_weights(config, seed=11)
    src, lengths, _ = example_batch(config, np_rng)

    @jit
    def greedy_and_beam_one(w, src, lengths):
        # translate's compiled body, here without XLA optimisations (faster to compile).
        greedy = seq2seq._translate.__wrapped__(w, src, lengths, config, 1, 6, 0.6)
        memory, final = encode(w, src, lengths, config)
        src_mask = jnp.arange(5)[None] < lengths[:, None]

        def step(token, state):
            logits, state, _ = decode_step(w, state, token, memory, src_mask, config)
            return jax.nn.log_softmax(search.forbid_tokens(logits, (PAD, BOS))), state

        state = init_decode_state(final, config)
        beam = search.beam_search(
            step, state, 3, beam_size=1, max_len=6, bos_id=BOS, eos_id=EOS, state_batch_axis=1
        )
        return greedy, beam.sequences

    greedy, beam = greedy_and_beam_one(w, src, lengths)
    np.testing.assert_array_equal(beam, greedy)
    assert greedy.shape == (3, 6) and greedy.dtype == jnp.int32
    assert not np.any(np.asarray(greedy) == BOS)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (dict(attention="luong"), "attention must be one of"),
        (dict(attention_dim=4), "attention_dim"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout="0.1"), "Seq2SeqConfig.dropout must be a number"),
        (dict(dropout=None), "Seq2SeqConfig.dropout must be a number"),
        (dict(eos_id=BOS), "must differ"),
        (dict(pad_id=11), "pad_id"),
        (dict(bos_id=1.5), r"Seq2SeqConfig.bos_id must be an int in \[0, .*got 1.5"),
        (dict(pad_id=True), r"Seq2SeqConfig.pad_id must be an int in \[0, .*got True"),
        (dict(bidirectional_encoder="no"), "bidirectional_encoder must be a bool, got 'no'"),
        (dict(bidirectional_encoder=1), "bidirectional_encoder must be a bool"),
        (dict(lstm_implementation="pallas"), "lstm_implementation must be None or one of"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **changes)


def test_jit_takes_the_config_as_static_without_static_argnames(np_rng):
    """Seq2SeqConfig is a pytree with no leaves, as GPTConfig: plain jit and grad take it."""
    w = random_weights(BASE)
    src, lengths, tgt_in = example_batch(BASE, np_rng)
    for got, want in zip(
        jit(seq2seq_logits)(w, src, lengths, tgt_in, BASE),
        logits_jit(w, src, lengths, tgt_in, BASE),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    mask = jnp.ones(tgt_in.shape, bool)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=mask)
    loss, grads = jit(jax.value_and_grad(seq2seq_loss))(w, batch, BASE)
    want_loss, want_grads = loss_and_grad_jit(w, batch, BASE)
    np.testing.assert_array_equal(loss, want_loss)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_array_equal(got, want)


def test_bad_inputs_raise(np_rng):
    config = VARIANTS[3]
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    with pytest.raises(ValueError, match="src_lengths"):
        encode(w, src, lengths[:2], config)
    with pytest.raises(ValueError, match="src ids"):
        encode(w, src.at[0, 0].set(11), lengths, config)
    with pytest.raises(ValueError, match="tgt_in"):
        seq2seq_logits(w, src, lengths, tgt_in[:2], config)
    # A 1-D src is named as such, not blamed on a correct tgt_in.
    with pytest.raises(ValueError, match=r"seq2seq_logits: src must be \[B, S\], got \(5,\)"):
        seq2seq_logits(w, src[0, :5], lengths[:1], tgt_in[:1], config)
    with pytest.raises(ValueError, match="lacks"):
        seq2seq_loss(w, dict(src=src, src_lengths=lengths, tgt_in=tgt_in), config)
    # translate jits its encoder: it checks the lengths first (not clipped to [0, S]).
    for bad in (src.shape[1] + 1, -1):
        with pytest.raises(ValueError, match=r"translate: src_lengths: lengths must lie in"):
            translate(w, config, src, lengths.at[0].set(bad), max_len=4)
    wrapping = np.asarray(lengths).astype(np.int64)  # not wrapped to 3 by jnp.asarray
    wrapping[0] = 2**32 + 3
    with pytest.raises(ValueError, match=r"encode: src_lengths: lengths must lie in.*4294967299"):
        encode(w, src, wrapping, config)
    memory, final = encode_jit(w, src, lengths, config)
    with pytest.raises(ValueError, match="state"):
        decode_step(w, final, tgt_in[:2, 0], memory, lengths > 0, config)
    state = init_decode_state(final, config)
    with pytest.raises(ValueError, match=r"decode_step: token ids must lie in \[0, 13\)"):
        decode_step(w, state, tgt_in[:, 0].at[1].set(13), memory, lengths > 0, config)
    with pytest.raises(ValueError, match=r"translate: beam_size must be an int >= 1, got 2.0"):
        translate(w, config, src, lengths, beam_size=2.0, max_len=4)
    with pytest.raises(ValueError, match=r"translate: max_len must be an int >= 1, got True"):
        translate(w, config, src, lengths, max_len=True)
    # alpha is checked for greedy too (which ignores it), and inf is refused like NaN.
    with pytest.raises(ValueError, match=r"translate: src's batch size B must be an int >= 1"):
        translate(w, config, src[:0], lengths[:0], max_len=4)  # not greedy_decode's message
    for beam, alpha in [(1, -1.0), (2, math.inf), (2, math.nan), (1, "0.6"), (2, None)]:
        with pytest.raises(ValueError, match=r"translate: length_penalty must be a finite nu"):
            translate(w, config, src, lengths, beam_size=beam, max_len=4, length_penalty=alpha)
    # A NumPy or JAX scalar is checked as the float it holds.
    got = translate(w, config, src, lengths, beam_size=2, max_len=4, length_penalty=jnp.float32(1))
    want = translate(w, config, src, lengths, beam_size=2, max_len=4, length_penalty=1.0)
    np.testing.assert_array_equal(got, want)
    # A bidirectional encoder's state of [L*2, B, h] (here L=2), not another shape.
    h_n = jnp.zeros((3, 1, config.hidden_size))
    with pytest.raises(
        ValueError, match=r"init_decode_state: h_n must be \[L\*dirs, B, h\] with L\*dirs = 4 "
    ):
        init_decode_state((h_n, h_n), VARIANTS[0])
    h_n = jnp.zeros((4, 1, config.hidden_size))
    with pytest.raises(ValueError, match=r"h_n \(4, 1, 7\) and c_n \(4, 2, 7\) differ"):
        init_decode_state((h_n, jnp.zeros((4, 2, 7))), VARIANTS[0])
    # One example's [L*dirs, h], as a vmap over B sees it, is summed like the whole batch.
    h_n = jnp.arange(4 * 3 * 7.0).reshape(4, 3, 7)
    batched = init_decode_state((h_n, -h_n), VARIANTS[0])
    per_row = jax.vmap(lambda s: init_decode_state(s, VARIANTS[0]), in_axes=1, out_axes=1)
    for got, want in zip(per_row((h_n, -h_n)), batched):
        np.testing.assert_array_equal(got, want)


def test_decode_step_reads_src_mask_as_transformer_decode_step_does(np_rng):
    """0/1 integers are the boolean mask; an additive float mask is refused naming
    decode_step (masked_softmax refused both, naming itself)."""
    config = VARIANTS[1]
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    memory, final = encode_jit(w, src, lengths, config)
    state = init_decode_state(final, config)
    mask = np.arange(src.shape[1])[None] < np.asarray(lengths)[:, None]
    want = decode_step(w, state, tgt_in[:, 0], memory, mask, config)
    got = decode_step(w, state, tgt_in[:, 0], memory, mask.astype(np.int32), config)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"decode_step: src_mask must be boolean"):
        decode_step(w, state, tgt_in[:, 0], memory, np.where(mask, 0.0, -np.inf), config)


def test_decode_step_names_a_state_that_is_not_a_pair_and_takes_lists(np_rng):
    # A None state failed as "cannot unpack non-iterable NoneType object", a list state or
    # encoder_outputs as "'list' object has no attribute 'shape'".
    config = VARIANTS[1]
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    memory, final = encode_jit(w, src, lengths, config)
    state, mask = init_decode_state(final, config), lengths[:, None] > jnp.arange(src.shape[1])
    for bad, got in (
        (None, "NoneType"),
        (state[:1], "a tuple of 1"),
        ((*state, state[0]), "a tuple of 3"),
    ):
        with pytest.raises(
            ValueError,
            match=rf"decode_step: state must be a pair \(h, c\), each \[L, B, h\].*got {got}",
        ):
            decode_step(w, bad, tgt_in[:, 0], memory, mask, config)
    with pytest.raises(
        ValueError, match=r"init_decode_state: final_state must be a pair.*NoneType"
    ):
        init_decode_state(None, config)
    want = decode_step(w, state, tgt_in[:, 0], memory, mask, config)
    listed = [a.tolist() for a in state]
    got = decode_step(w, listed, tgt_in[:, 0], memory.tolist(), mask, config)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"decode_step: encoder_outputs must be floating.*int32"):
        decode_step(w, state, tgt_in[:, 0], memory.astype(jnp.int32), mask, config)


def test_the_logits_and_the_loss_name_themselves_not_encode(np_rng):
    """seq2seq_loss's inputs were checked inside seq2seq_logits and encode, whose names the
    errors gave."""
    config = VARIANTS[3]
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=tgt_in > 0)
    logits = functools.partial(seq2seq_logits, config=config)
    calls = [
        ("seq2seq_loss: src ids", dict(batch, src=src.at[0, 0].set(11))),
        ("seq2seq_loss: src must be", dict(batch, src=src[0])),
        ("seq2seq_loss: src_lengths: lengths", dict(batch, src_lengths=lengths.at[0].set(-1))),
    ]
    for where, bad in calls:
        with pytest.raises(ValueError, match=f"^{where}"):
            seq2seq_loss(w, bad, config)
    with pytest.raises(ValueError, match=r"^seq2seq_logits: src_lengths: lengths"):
        logits(w, src, lengths.at[0].set(-1), tgt_in)
    with pytest.raises(ValueError, match=r"^seq2seq_logits: the weights"):
        logits(w._replace(decoder=None), src, lengths, tgt_in)


def test_int64_ids_are_checked_before_the_int32_conversion(np_rng):
    # With 64-bit types off jnp.asarray wraps the int64 id 2**32 + 3 to 3, a valid id: it
    # passed the range check and silently stood for token 3.
    config = VARIANTS[3]
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    src64, tgt64 = np.asarray(src, np.int64), np.asarray(tgt_in, np.int64)
    src64[0, 0] = tgt64[0, 1] = 2**32 + 3
    with pytest.raises(ValueError, match=r"encode: src ids must lie in"):
        encode(w, src64, lengths, config)
    with pytest.raises(ValueError, match=r"translate: src ids must lie in"):
        translate(w, config, src64, lengths, max_len=4)
    with pytest.raises(ValueError, match=r"seq2seq_logits: tgt_in ids must lie in"):
        seq2seq_logits(w, src, lengths, tgt64, config)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt64, tgt_mask=tgt64 > 0)
    with pytest.raises(ValueError, match=r"seq2seq_loss: tgt_out ids must lie in"):
        seq2seq_loss(w, batch, config)


def test_weights_must_match_the_config(np_rng):
    config = VARIANTS[2]  # general attention, 2 layers
    src, lengths, tgt_in = example_batch(config, np_rng)
    dot = random_weights(dataclasses.replace(config, attention="dot"))  # no attention matrix
    with pytest.raises(
        ValueError, match=r"translate: the weights .* do not match .*missing: .attention$"
    ):
        translate(dot, config, src, lengths, max_len=4)
    wide = random_weights(dataclasses.replace(config, hidden_size=8))
    with pytest.raises(
        ValueError, match=r"seq2seq_logits: .* shape .*\.encoder\[0\]\.w_hh \(8, 32\) != \(7, 28\)"
    ):
        seq2seq_logits(wide, src, lengths, tgt_in, config)
    one_layer = random_weights(dataclasses.replace(config, num_layers=1))
    state, memory = (jnp.zeros((2, 3, 7)),) * 2, jnp.zeros((3, 5, 7))  # [L, B, h], [B, S, h]
    with pytest.raises(ValueError, match=r"decode_step: .*missing: .encoder\[1\]"):
        decode_step(one_layer, state, tgt_in[:, 0], memory, lengths > 0, config)


def test_swapped_arguments_name_the_argument_order(np_rng):
    """translate takes (weights, config, src, src_lengths), the others take the config last:
    a config in the wrong place failed as "unhashable type: 'jaxlib._jax.ArrayImpl'" (or an
    AttributeError of a dict or tuple), naming neither the function nor the argument."""
    config = VARIANTS[1]
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    batch = dict(src=src, src_lengths=lengths, tgt_in=tgt_in, tgt_out=tgt_in, tgt_mask=tgt_in > 0)
    memory, final = encode_jit(w, src, lengths, config)
    state = init_decode_state(final, config)
    calls = {
        r"translate: config must be a Seq2SeqConfig, got ArrayImpl; the arguments are "
        r"translate\(weights, config, src, src_lengths\)": lambda: translate(
            w, src, lengths, config, max_len=3
        ),
        r"encode: config must be a Seq2SeqConfig": lambda: encode(w, config, src, lengths),
        r"seq2seq_logits: config must be a Seq2SeqConfig": lambda: seq2seq_logits(
            w, config, src, lengths, tgt_in
        ),
        r"seq2seq_loss: config must be a Seq2SeqConfig, got dict": lambda: seq2seq_loss(
            w, config, batch
        ),
        r"decode_step: config must be a Seq2SeqConfig": lambda: decode_step(
            w, config, state, tgt_in[:, 0], memory, lengths > 0
        ),
        r"init_decode_state: config must be a Seq2SeqConfig, got tuple": lambda: init_decode_state(
            config, final
        ),
    }
    for match, call in calls.items():
        with pytest.raises(TypeError, match=match):
            call()


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


def vocab(sentences):
    words = sorted({w for s in sentences for w in s.split()})
    return {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", *words])}


def tiny_corpus():
    """Word-level ids, the batch dict of ``seq2seq_loss`` and the expected outputs."""
    src_vocab, tgt_vocab = vocab(p[0] for p in PAIRS), vocab(p[1] for p in PAIRS)
    src_ids = [[src_vocab[w] for w in s.split()] for s, _ in PAIRS]
    tgt_ids = [[tgt_vocab[w] for w in t.split()] for _, t in PAIRS]
    s_len, t_len = max(map(len, src_ids)), max(map(len, tgt_ids)) + 1
    pad = lambda seqs, n: np.array([s + [PAD] * (n - len(s)) for s in seqs], np.int32)
    batch = dict(
        src=pad(src_ids, s_len),
        src_lengths=np.array([len(s) for s in src_ids], np.int32),
        tgt_in=pad([[BOS, *t] for t in tgt_ids], t_len),
        tgt_out=pad([[*t, EOS] for t in tgt_ids], t_len),
        tgt_mask=pad([[1] * (len(t) + 1) for t in tgt_ids], t_len).astype(bool),
    )
    return batch, batch["tgt_out"], len(src_vocab), len(tgt_vocab)


@functools.partial(jit, static_argnames=("config", "steps"))
def train(weights, batch, config, steps):
    """``steps`` Adam updates on one batch, all inside one compiled ``lax.scan``."""
    optimizer = optax.adam(0.03)

    def update(carry, _):
        weights, opt_state = carry
        loss, grads = jax.value_and_grad(seq2seq_loss)(weights, batch, config)
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
            updates, opt_state = optimizer.update(grads, opt_state, weights)
        return (optax.apply_updates(weights, updates), opt_state), loss

    (weights, _), losses = jax.lax.scan(update, (weights, optimizer.init(weights)), length=steps)
    return weights, losses


@pytest.mark.slow  # compiling training and decoding dominates (several seconds each)
@pytest.mark.parametrize(
    ("attention", "bidirectional", "layers"),
    [("none", False, 1), ("dot", True, 1), ("general", False, 2), ("additive", False, 1)],
)
def test_overfits_tiny_corpus(attention, bidirectional, layers):
    batch, want, vs, vt = tiny_corpus()
    config = Seq2SeqConfig(
        src_vocab_size=vs,
        tgt_vocab_size=vt,
        embed_dim=15,
        hidden_size=31,
        num_layers=layers,
        bidirectional_encoder=bidirectional,
        attention=attention,
    )
    weights = init_seq2seq(jax.random.key(0), config)  # eager: PRNG kernels shared by variants
    weights, losses = train(weights, batch, config, 150)
    assert float(losses[-1]) < 0.05 < float(losses[0])
    src, lengths = batch["src"], batch["src_lengths"]
    for beam in (1, 3) if attention == "dot" else (1,):  # beam search compiles slowly
        out = np.asarray(translate(weights, config, src, lengths, beam_size=beam, max_len=5))
        np.testing.assert_array_equal(out[:, : want.shape[1]], want)
        np.testing.assert_array_equal(out[:, want.shape[1] :], PAD)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        # Passed the config and failed in init naming no field, or (True) made a size of 1.
        (dict(attention="additive", attention_dim=2.5), "attention_dim must be a positive int"),
        (dict(attention="additive", attention_dim=True), "attention_dim must be a positive int"),
        (dict(attention="additive", attention_dim="3"), "attention_dim must be a positive int"),
        (dict(attention="additive", attention_dim=0), "attention_dim must be a positive int"),
        # NaN or inf reached every forget-gate bias: a NaN loss from the first step.
        (dict(forget_bias=float("nan")), "forget_bias must be a finite number"),
        (dict(forget_bias=float("inf")), "forget_bias must be a finite number"),
        (dict(forget_bias="1.0"), "forget_bias must be a finite number"),
    ],
)
def test_config_refuses_bad_attention_dim_and_forget_bias(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **changes)


def test_init_follows_attention_dim_and_forget_bias(monkeypatch):
    # Traced only (eval_shape): the sizes, and the forget bias each LSTM stack is given.
    real, seen = seq2seq.init_lstm_stack, []

    def spy(*args, **kw):
        seen.append(kw["forget_bias"])
        return real(*args, **kw)

    monkeypatch.setattr(seq2seq, "init_lstm_stack", spy)
    config = dataclasses.replace(VARIANTS[3], forget_bias=-0.5)
    shapes = jax.eval_shape(lambda: init_seq2seq(jax.random.key(0), config))
    assert shapes.attention.w_query.shape == (7, 3) and shapes.attention.v.shape == (3,)
    assert seen == [-0.5, -0.5]  # encoder, decoder


@pytest.mark.parametrize("config", [VARIANTS[0], VARIANTS[3]])
def test_init_gives_every_leaf_its_own_draw(config, assert_independent_draws):
    """The encoder and decoder LSTMs, the embeddings and the attention each their own key
    (one reused would start two of them equal)."""
    assert_independent_draws(init_seq2seq(jax.random.key(2), config))


def test_translate_rows_do_not_depend_on_their_neighbours(np_rng):
    # Beam search repeats each sentence's encoder outputs k times: repeat, not tile, or
    # beam j of sentence b reads sentence (b*k + j) mod B's source.
    config = VARIANTS[1]
    w = random_weights(config, seed=11)
    src, lengths, _ = example_batch(config, np_rng)
    run = lambda s, n: np.asarray(translate(w, config, s, n, beam_size=2, max_len=5))
    np.testing.assert_array_equal(run(src[::-1], lengths[::-1])[::-1], run(src, lengths))


def test_greedy_translate_matches_numpy_reference(np_rng):
    # Greedy decoding of the float64 reference, one token at a time: translate must mask
    # the source padding as teacher forcing does (its encoder outputs there are zero, but
    # additive attention still scores them, tanh(W_q h) v).
    config = VARIANTS[3]
    w = random_weights(config, seed=13, scale=1.0)
    src, lengths, _ = example_batch(config, np_rng)
    src, lengths = jnp.pad(src, ((0, 0), (0, 4))), lengths.at[0].set(1)  # mostly padding
    max_len = 5
    got = np.asarray(translate(w, config, src, lengths, beam_size=1, max_len=max_len))
    for row in range(src.shape[0]):
        out = []
        while len(out) < max_len and (not out or out[-1] != EOS):
            tgt_in = np.array([[BOS, *out]])
            logits, _ = np_forward(w, config, src[row : row + 1], lengths[row : row + 1], tgt_in)
            logits = logits[0, -1].copy()
            logits[[PAD, BOS]] = -np.inf  # never generated
            out.append(int(np.argmax(logits)))
        np.testing.assert_array_equal(got[row], out + [PAD] * (max_len - len(out)))


@pytest.mark.parametrize("attention", ["none", "dot", "general", "additive"])
def test_weight_decay_mask_takes_every_matrix_and_table(attention):
    """Every leaf with ndim >= 2 (nothing is stacked over layers here), general attention's
    bare [h, h] matrix included; no bias, and not additive attention's v."""
    config = dataclasses.replace(BASE, attention=attention, num_layers=2)
    weights = init_seq2seq(jax.random.key(0), config)
    mask = seq2seq.weight_decay_mask(weights)
    for (path, decays), leaf in zip(
        jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(weights), strict=True
    ):
        assert decays == (leaf.ndim >= 2), jax.tree_util.keystr(path)
    if attention == "general":
        assert mask.attention is True


def test_dropout_rng_that_is_not_one_key_raises_naming_rng(np_rng):
    """An int seed or a batch of keys failed inside jax.random, naming neither the function
    nor rng (generate and the NNX modules name it)."""
    config = dataclasses.replace(BASE, dropout=0.2)
    w = random_weights(config)
    src, lengths, tgt_in = example_batch(config, np_rng)
    for bad in [0, jax.random.split(jax.random.key(0), 2)]:
        with pytest.raises(ValueError, match=r"seq2seq_logits: dropout > 0 .*one PRNG key"):
            seq2seq_logits(w, src, lengths, tgt_in, config, rng=bad, deterministic=False)
        with pytest.raises(ValueError, match=r"encode: dropout > 0 .*one PRNG key"):
            encode(w, src, lengths, config, rng=bad, deterministic=False)
