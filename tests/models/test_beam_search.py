"""Tests for jaxattn.models.beam_search on hand-built step functions whose answers are known.

The step function looks up log-probabilities in a random table indexed by (sentence, whole
prefix), so every sequence has a log-probability that the tests can enumerate in NumPy.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.models.beam_search import (
    BeamSearchResult,
    beam_search,
    decode_sequences,
    gather_rows,
    gnmt_length_penalty,
    greedy_decode,
)

BOS = 0  # a token of every table; fed first, it starts the empty prefix (see make_step)


def prefix_table(np_rng, batch, vocab, max_len, *, scale=2.0, bias=None):
    """Random log-probabilities ``[B, C, V]`` for every prefix code C (see ``code_of``)."""
    codes = sum((vocab + 1) ** d for d in range(max_len + 1))
    logits = scale * np_rng.standard_normal((batch, codes, vocab))
    if bias is not None:
        logits = logits + bias  # [V], e.g. to make EOS rarer
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # float64 log-softmax


def code_of(prefix, vocab):
    """Unique code of a token prefix: base-(V+1) digits ``token + 1``."""
    code = 0
    for t in prefix:
        code = code * (vocab + 1) + t + 1
    return code


def make_step(table, *, axis=0):
    """``step_fn`` over state ``(sentence id, prefix code)``, rows on ``axis``.

    The code is -1 before the first token: BOS fed then starts the empty prefix, any other
    first token (a prefilled prompt's last) the prefix of that token.
    """
    table = jnp.asarray(table, jnp.float32)
    vocab = table.shape[-1]

    def step(tokens, state):
        sent, code = state
        if axis == 1:
            sent, code = sent[0], code[0]
        extended = jnp.maximum(code, 0) * (vocab + 1) + tokens + 1
        code = jnp.where((code < 0) & (tokens == BOS), 0, extended)
        log_probs = table[sent, code]  # [R, V]
        new = (sent, code) if axis == 0 else (sent[None], code[None])
        return log_probs, new

    return step


def init_state(batch, axis=0):
    sent, code = jnp.arange(batch, dtype=jnp.int32), jnp.full((batch,), -1, jnp.int32)
    return (sent, code) if axis == 0 else (sent[None], code[None])


@functools.partial(
    jax.jit, static_argnames=("beam_size", "max_len", "eos_id", "alpha", "pad_id", "axis")
)
def run_beam(table, *, beam_size, max_len, eos_id, alpha=0.6, pad_id=0, axis=0):
    """Jitted beam search over ``make_step(table)`` (compiled once per setting)."""
    b = table.shape[0]
    return beam_search(
        make_step(table, axis=axis),
        init_state(b, axis),
        b,
        beam_size=beam_size,
        max_len=max_len,
        bos_id=BOS,
        eos_id=eos_id,
        length_penalty=alpha,
        pad_id=pad_id,
        state_batch_axis=axis,
    )


@functools.partial(jax.jit, static_argnames=("max_len", "eos_id", "pad_id"))
def run_greedy(table, *, max_len, eos_id, pad_id=0):
    b = table.shape[0]
    return greedy_decode(
        make_step(table),
        init_state(b),
        b,
        max_len=max_len,
        bos_id=BOS,
        eos_id=eos_id,
        pad_id=pad_id,
    )


def enumerate_hypotheses(table_b, vocab, max_len, eos, alpha):
    """All hypotheses of one sentence: (tokens, score), EOS only last or length max_len."""
    out = []
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if eos in seq[:-1] or (length < max_len and seq[-1] != eos):
                continue
            logp = sum(table_b[code_of(seq[:t], vocab), seq[t]] for t in range(length))
            lp = ((5.0 + length) / 6.0) ** alpha
            out.append((seq, logp / lp))
    return sorted(out, key=lambda h: -h[1])


def padded(seq, max_len, pad):
    return list(seq) + [pad] * (max_len - len(seq))


@pytest.mark.parametrize(("alpha", "axis"), [(0.0, 0), (0.6, 1), (3.0, 0)])
def test_exhaustive_beam_equals_enumeration(np_rng, alpha, axis):
    # V=3 (EOS=1), L=3: the last step has 4 live prefixes x 3 tokens = 12 candidates, so a
    # beam of 12 keeps every hypothesis and must rank all 1 + 2 + 4 + 8 = 15 exactly.
    b, vocab, max_len, eos, k, pad = 2, 3, 3, 1, 12, -1
    table = prefix_table(np_rng, b, vocab, max_len)
    result = run_beam(
        table, beam_size=k, max_len=max_len, eos_id=eos, alpha=alpha, pad_id=pad, axis=axis
    )
    assert isinstance(result, BeamSearchResult)
    assert result.beam_sequences.shape == (b, k, max_len) and result.beam_scores.shape == (b, k)
    for row in range(b):
        hyps = enumerate_hypotheses(table[row], vocab, max_len, eos, alpha)
        assert len(hyps) == 15
        want_scores = np.array([s for _, s in hyps[:k]])
        np.testing.assert_allclose(result.beam_scores[row], want_scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(result.sequences[row], padded(hyps[0][0], max_len, pad))
        np.testing.assert_allclose(result.scores[row], hyps[0][1], rtol=1e-5)
        got = {tuple(s) for s in np.asarray(result.beam_sequences[row]).tolist()}
        assert got == {tuple(padded(s, max_len, pad)) for s, _ in hyps[:k]}


def test_length_penalty_changes_the_winner():
    # Built by hand, table[sentence, code, token], EOS = 0. With beam 2:
    #   step 0: [2] 0.55 and [EOS] 0.45 are the top 2 -> [EOS] ends, log P = log 0.45.
    #   step 1: [2, 2] and [2, 1] beat [2, EOS] -> nothing ends.
    #   step 2: [2, 2, EOS] ends with log P = log(0.55 * 0.95 * 0.8) = log 0.418.
    # Unpenalised [EOS] wins; with alpha = 1 (lp 1 vs 8/6) the longer hypothesis wins.
    vocab, eos, max_len = 3, 0, 3
    table = np.full((1, code_of([2, 2, 2], vocab) + 1, vocab), np.log(1 / 3))
    table[0, 0] = np.log([0.45, 1e-4, 0.55 - 1e-4])
    table[0, code_of([2], vocab)] = np.log([0.01, 0.04, 0.95])
    table[0, code_of([2, 2], vocab)] = np.log([0.8, 0.1, 0.1])
    short, long = np.log(0.45), np.log((0.55 - 1e-4) * 0.95 * 0.8)
    for alpha, want, score in [
        (0.0, [eos, -1, -1], short),
        (1.0, [2, 2, eos], long / (8 / 6)),
    ]:
        res = run_beam(table, beam_size=2, max_len=max_len, eos_id=eos, alpha=alpha, pad_id=-1)
        np.testing.assert_array_equal(res.sequences[0], want)
        np.testing.assert_allclose(res.scores[0], score, rtol=1e-5)
        # Both ended hypotheses are kept with their own (penalised) scores.
        np.testing.assert_allclose(
            sorted(np.asarray(res.beam_scores[0])),
            sorted([short, long / (8 / 6) ** alpha]),
            rtol=1e-5,
        )
    greedy = run_greedy(table, max_len=max_len, eos_id=eos)
    np.testing.assert_array_equal(greedy[0], [2, 2, eos])


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_beam_one_equals_greedy(np_rng, alpha):
    b, vocab, max_len, eos = 7, 4, 5, 3
    table = prefix_table(np_rng, b, vocab, max_len, scale=1.0, bias=np.array([0, 0, 0, -1.0]))
    greedy = run_greedy(table, max_len=max_len, eos_id=eos)
    beam = run_beam(table, beam_size=1, max_len=max_len, eos_id=eos, alpha=alpha)
    np.testing.assert_array_equal(beam.sequences, greedy)
    assert beam.beam_sequences.shape == (b, 1, max_len)
    # Independent greedy reference in NumPy.
    for row in range(b):
        prefix = []
        while len(prefix) < max_len and (not prefix or prefix[-1] != eos):
            prefix.append(int(np.argmax(table[row, code_of(prefix, vocab)])))
        np.testing.assert_array_equal(greedy[row], padded(prefix, max_len, 0))
    # Both endings occur: some rows stop at EOS, some run to max_len.
    assert np.any(np.asarray(greedy) == eos) and np.any(np.asarray(greedy)[:, -1] != 0)


def test_greedy_under_x64_equals_default(np_rng):
    table = prefix_table(np_rng, 3, 4, 4)
    with jax.enable_x64(True):
        wide = run_greedy(table, max_len=4, eos_id=3)
    np.testing.assert_array_equal(wide, run_greedy(table, max_len=4, eos_id=3))


def test_beam_search_under_x64_takes_a_traced_float64_length_penalty(np_rng):
    # A float64 alpha made the penalised scores float64, and the loop's carry (float32 scores)
    # changed dtype: a TypeError from lax.while_loop. The scores stay float32.
    b, vocab, max_len, eos = 2, 4, 4, 3
    table = prefix_table(np_rng, b, vocab, max_len)
    want = run_beam(table, beam_size=3, max_len=max_len, eos_id=eos, alpha=0.6)
    search = jax.jit(
        lambda t, alpha: beam_search(
            make_step(t), init_state(b), b, beam_size=3, max_len=max_len, bos_id=BOS,
            eos_id=eos, length_penalty=alpha,
        )
    )  # fmt: skip
    with jax.enable_x64(True):
        got = search(jnp.asarray(table, jnp.float32), jnp.asarray(0.6, jnp.float64))
        assert gnmt_length_penalty(3, np.float64(0.6)).dtype == jnp.float32
    assert got.scores.dtype == got.beam_scores.dtype == jnp.float32
    np.testing.assert_array_equal(got.beam_sequences, want.beam_sequences)
    np.testing.assert_allclose(got.beam_scores, want.beam_scores, rtol=1e-6)


def test_per_row_first_tokens(np_rng):
    # Row 1 is fed token 2 first instead of BOS, as after prefilling a prompt ending in 2:
    # its output continues the prefix [2].
    b, vocab, max_len, eos = 2, 4, 3, 3
    table = prefix_table(np_rng, b, vocab, max_len + 1, scale=1.0, bias=np.array([0, 0, 0, -2.0]))
    first = jnp.array([BOS, 2], jnp.int32)
    greedy = jax.jit(
        lambda t, f: greedy_decode(
            make_step(t), init_state(b), b, max_len=max_len, bos_id=f, eos_id=eos
        )
    )(table, first)
    beam = jax.jit(
        lambda t, f: (
            beam_search(
                make_step(t), init_state(b), b, beam_size=1, max_len=max_len, bos_id=f, eos_id=eos
            ).sequences
        )
    )(table, first)
    np.testing.assert_array_equal(beam, greedy)
    for row, prefix in [(0, []), (1, [2])]:
        out = []
        while len(out) < max_len and (not out or out[-1] != eos):
            out.append(int(np.argmax(table[row, code_of(prefix + out, vocab)])))
        np.testing.assert_array_equal(greedy[row], padded(out, max_len, 0))
    with pytest.raises(ValueError, match="bos_id"):
        greedy_decode(make_step(table), init_state(b), b, max_len=2, bos_id=first[:1], eos_id=eos)


def test_eos_handling():
    # Row 0 ends at once (EOS is almost certain); row 1 never produces EOS.
    vocab, eos, max_len, k = 4, 2, 4, 3
    codes = code_of([3] * max_len, vocab) + 1
    table = np.full((2, codes, vocab), np.log(0.3))
    table[0, :, eos] = np.log(0.97)
    table[0, :, [0, 1, 3]] = np.log(0.01)
    table[1, :, eos] = -1e9
    res = run_beam(table, beam_size=k, max_len=max_len, eos_id=eos, alpha=1.0)
    np.testing.assert_array_equal(res.sequences[0], [eos, 0, 0, 0])
    np.testing.assert_allclose(res.scores[0], np.log(0.97) / (6 / 6), rtol=1e-6)
    assert not np.any(np.asarray(res.beam_sequences[1]) == eos)  # cut at max_len, no EOS
    np.testing.assert_allclose(res.beam_scores[1], 4 * np.log(0.3) / (9 / 6), rtol=1e-5)
    seqs = np.asarray(res.beam_sequences).reshape(-1, max_len)
    for seq in seqs:  # nothing but padding follows an EOS
        hit = np.flatnonzero(seq == eos)
        if hit.size:
            assert np.all(seq[hit[0] + 1 :] == 0)
    # Greedy pads after EOS too.
    greedy = run_greedy(table, max_len=max_len, eos_id=eos)
    np.testing.assert_array_equal(greedy[0], [eos, 0, 0, 0])
    assert not np.any(np.asarray(greedy[1]) == eos)


def test_a_done_sentence_takes_no_more_hypotheses():
    # Beam 1, EOS = 0. Row 0: [EOS] ends at step 0 (p 0.6, score log 0.6), so row 0 is done.
    # [2, EOS] (p 0.4 * 0.999) would score higher under alpha = 5 (lp (7/6)^5 = 2.16), but
    # a done sentence takes no more hypotheses, even while row 1 (which never emits EOS)
    # keeps the loop running: row 0's result must be the one it gets when decoded alone.
    vocab, eos, max_len = 3, 0, 3
    table = np.full((2, code_of([2, 2, 2], vocab) + 1, vocab), np.log(1 / 3))
    table[0, 0] = np.log([0.6, 1e-4, 0.4 - 1e-4])
    table[0, code_of([2], vocab)] = np.log([0.999, 5e-4, 5e-4])
    table[1, :] = np.log([1e-9, 0.5, 0.5 - 1e-9])
    for rows in (table[:1], table):
        res = run_beam(rows, beam_size=1, max_len=max_len, eos_id=eos, alpha=5.0, pad_id=-1)
        np.testing.assert_array_equal(res.sequences[0], [eos, -1, -1])
        np.testing.assert_allclose(res.scores[0], np.log(0.6), rtol=1e-5)


def test_jit_matches_eager(np_rng):
    b, vocab, max_len, eos = 3, 5, 4, 4
    table = prefix_table(np_rng, b, vocab, max_len)

    def run(table):
        step = make_step(table)
        res = beam_search(
            step, init_state(b), b, beam_size=3, max_len=max_len, bos_id=BOS, eos_id=eos
        )
        return res, greedy_decode(step, init_state(b), b, max_len=max_len, bos_id=BOS, eos_id=eos)

    eager = run(jnp.asarray(table, jnp.float32))
    jitted = jax.jit(run)(jnp.asarray(table, jnp.float32))
    for a, c in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, c, rtol=1e-6)


def test_length_penalty_and_gather_rows():
    np.testing.assert_allclose(gnmt_length_penalty(jnp.int32(7), 0.6), (12 / 6) ** 0.6, rtol=1e-6)
    np.testing.assert_allclose(gnmt_length_penalty(3, 0.0), 1.0)
    tree = {"x": jnp.arange(6).reshape(3, 2), "n": jnp.int32(5), "y": jnp.arange(3)}
    out = gather_rows(tree, jnp.array([2, 0]))
    np.testing.assert_array_equal(out["x"], [[4, 5], [0, 1]])
    np.testing.assert_array_equal(out["y"], [2, 0])
    assert int(out["n"]) == 5
    out = gather_rows(tree, jnp.array([1, 1, 0]), axis=1)
    np.testing.assert_array_equal(out["x"], [[1, 1, 0], [3, 3, 2], [5, 5, 4]])
    np.testing.assert_array_equal(out["y"], jnp.arange(3))  # rank 1 <= axis: shared


@functools.partial(jax.jit, static_argnames=("beam_size", "max_len", "eos_id", "alpha", "pad_id"))
def run_decode_sequences(logits, *, beam_size, max_len, eos_id, alpha, pad_id=0):
    b = logits.shape[0]
    return decode_sequences(
        make_step(logits),
        init_state(b),
        b,
        beam_size=beam_size,
        max_len=max_len,
        bos_id=BOS,
        eos_id=eos_id,
        pad_id=pad_id,
        length_penalty=alpha,
    )


def test_decode_sequences_normalises_logits_and_applies_the_length_penalty(np_rng):
    # The table of test_length_penalty_changes_the_winner, as logits: every prefix gets its
    # own offset, +4 after [2] and [2, 2]. Beam search must rank by log-probabilities
    # (log_softmax removes the offsets; raw logits would favour the long hypothesis by 8)
    # and with the given alpha (at the default 0.6 the long one would win as well).
    vocab, eos, max_len = 3, 0, 3
    table = np.full((1, code_of([2, 2, 2], vocab) + 1, vocab), np.log(1 / 3))
    table[0, 0] = np.log([0.45, 1e-4, 0.55 - 1e-4])
    table[0, code_of([2], vocab)] = np.log([0.01, 0.04, 0.95])
    table[0, code_of([2, 2], vocab)] = np.log([0.8, 0.1, 0.1])
    offset = np_rng.standard_normal((1, table.shape[1], 1))
    offset[0, [code_of([2], vocab), code_of([2, 2], vocab)]] = 4.0
    kw = dict(max_len=max_len, eos_id=eos, pad_id=-1)
    for alpha, want in [(0.0, [eos, -1, -1]), (1.0, [2, 2, eos])]:
        got = run_decode_sequences(table + offset, beam_size=2, alpha=alpha, **kw)
        np.testing.assert_array_equal(got[0], want, err_msg=f"alpha={alpha}")
        beam = run_beam(table, beam_size=2, alpha=alpha, **kw)
        np.testing.assert_array_equal(got, beam.sequences)
    greedy = run_decode_sequences(table + offset, beam_size=1, alpha=0.0, **kw)
    np.testing.assert_array_equal(greedy[0], [2, 2, eos])
    # Random tables: the same sequences as beam_search on the normalised log-probabilities.
    b, vocab, max_len, eos = 3, 4, 4, 3
    table = prefix_table(np_rng, b, vocab, max_len)
    logits = table + 3.0 * np_rng.standard_normal((b, table.shape[1], 1))
    for alpha in (0.0, 2.0):
        kw = dict(beam_size=3, max_len=max_len, eos_id=eos, alpha=alpha)
        np.testing.assert_array_equal(
            run_decode_sequences(logits, **kw), run_beam(table, **kw).sequences
        )


def test_bad_inputs_raise(np_rng):
    table = prefix_table(np_rng, 2, 3, 2)
    step = make_step(table)
    kw = dict(max_len=2, bos_id=BOS, eos_id=1)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(step, init_state(2), 2, beam_size=0, **kw)
    for alpha in (-1.0, float("inf"), float("nan"), jnp.array([0.6])):
        with pytest.raises(ValueError, match="beam_search: length_penalty must be a finite"):
            beam_search(step, init_state(2), 2, beam_size=2, length_penalty=alpha, **kw)
    with pytest.raises(ValueError, match="decode_sequences: length_penalty must be a finite"):
        decode_sequences(step, init_state(2), 2, beam_size=1, length_penalty=-1.0, **kw)
    with pytest.raises(ValueError, match="beam_search: length_penalty must be a finite"):
        beam_search(step, init_state(2), 2, beam_size=2, length_penalty=10**400, **kw)
    # A large alpha would overflow the float32 penalty of the longest hypothesis to inf.
    beam_search(step, init_state(2), 2, beam_size=2, length_penalty=100.0, **kw)  # L = 2: fits
    with pytest.raises(ValueError, match=r"length_penalty=100.0 is too large for max_len=50"):
        beam_search(
            step, init_state(2), 2, beam_size=2, length_penalty=100.0, **{**kw, "max_len": 50}
        )
    # Traced (under an outer jit) it cannot be checked, and greedy ignores it.
    greedy = jax.jit(
        lambda alpha: decode_sequences(
            step, init_state(2), 2, beam_size=1, length_penalty=alpha, **kw
        )
    )
    np.testing.assert_array_equal(
        greedy(0.6), decode_sequences(step, init_state(2), 2, beam_size=1, **kw)
    )
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(step, init_state(2), 2, max_len=0, bos_id=BOS, eos_id=1)
    with pytest.raises(ValueError, match="rows"):
        greedy_decode(step, init_state(3), 2, **kw)
    with pytest.raises(ValueError, match=r"init_state: a state leaf .* has no 2 rows"):
        beam_search(step, init_state(3), 2, beam_size=2, **kw)  # not rows 0, 1 of 3
    with pytest.raises(
        ValueError, match=r"beam_search: eos_id must lie in \[0, 3\), got values in \[5, 5\]"
    ):
        beam_search(step, init_state(2), 2, beam_size=2, max_len=2, bos_id=BOS, eos_id=5)
    with pytest.raises(
        ValueError, match=r"greedy_decode: eos_id must lie in \[0, 3\), got .*\[3, 3\]"
    ):
        greedy_decode(step, init_state(2), 2, max_len=2, bos_id=BOS, eos_id=3)
    # Forbidden ids outside [0, V) are refused like EOS (they would be ignored).
    for bad in (3, -1):
        got = rf"\[{min(bad, 2)}, {max(bad, 2)}\]"  # the range of (2, bad)
        with pytest.raises(ValueError, match=rf"forbidden ids must lie in \[0, 3\), got .*{got}"):
            decode_sequences(step, init_state(2), 2, beam_size=1, forbidden=(2, bad), **kw)
    # The output is filled with pad_id as int32: 2.5 came out as 2, True as 1.
    for pad in (2.5, True, jnp.array([0])):
        with pytest.raises(ValueError, match=r"greedy_decode: pad_id must be an integer"):
            greedy_decode(step, init_state(2), 2, pad_id=pad, **kw)
        with pytest.raises(ValueError, match=r"beam_search: pad_id must be an integer"):
            beam_search(step, init_state(2), 2, beam_size=2, pad_id=pad, **kw)
    # BOS is only fed in, so it may lie past the V predicted tokens; a negative one may not.
    greedy_decode(step, init_state(2), 2, max_len=2, bos_id=3, eos_id=1)
    beam_search(step, init_state(2), 2, beam_size=2, max_len=2, bos_id=3, eos_id=1)
    with pytest.raises(ValueError, match=r"greedy_decode: bos_id must be >= 0, got -1"):
        greedy_decode(step, init_state(2), 2, max_len=2, bos_id=-1, eos_id=1)
    with pytest.raises(ValueError, match=r"beam_search: bos_id must be >= 0, got \[0, -2\]"):
        beam_search(step, init_state(2), 2, beam_size=2, bos_id=jnp.array([0, -2]), max_len=2,
                    eos_id=1)  # fmt: skip
    # Sizes fix shapes: floats and bools are refused by name, not deep inside JAX.
    for size in (2.0, True):
        with pytest.raises(ValueError, match=r"greedy_decode: batch_size must be an int"):
            greedy_decode(step, init_state(2), size, **kw)
        with pytest.raises(ValueError, match=r"beam_search: beam_size must be an int"):
            beam_search(step, init_state(2), 2, beam_size=size, **kw)
        with pytest.raises(ValueError, match=r"decode_sequences: beam_size must be an int"):
            decode_sequences(step, init_state(2), 2, beam_size=size, **kw)
    with pytest.raises(ValueError, match=r"greedy_decode: max_len must be an int >= 1, got 2.0"):
        greedy_decode(step, init_state(2), 2, max_len=2.0, bos_id=BOS, eos_id=1)
    bad_shape = lambda tokens, state: (jnp.zeros((tokens.shape[0],)), state)
    with pytest.raises(ValueError, match="log_probs"):
        greedy_decode(bad_shape, init_state(2), 2, **kw)
    bad_state = lambda tokens, state: (jnp.zeros((tokens.shape[0], 3)), state[0])
    with pytest.raises(ValueError, match="structure"):
        beam_search(bad_state, init_state(2), 2, beam_size=2, **kw)


def test_sizes_take_integer_scalars_that_shapes_take(np_rng):
    """np.int64 and concrete 0-d JAX/NumPy integers are sizes (as before the int checks);
    floats, bools (np.bool_ too) and 1-d arrays are not."""
    table = prefix_table(np_rng, 2, 3, 2)
    step = make_step(table)
    kw = dict(bos_id=BOS, eos_id=1)
    want = np.asarray(greedy_decode(step, init_state(2), 2, max_len=2, **kw))
    for size in (np.int64(2), jnp.int32(2), np.array(2)):
        got = greedy_decode(step, init_state(2), size, max_len=size, **kw)
        np.testing.assert_array_equal(np.asarray(got), want)
    for size in (np.True_, np.float64(2.0), jnp.array([2])):
        with pytest.raises(ValueError, match=r"greedy_decode: max_len must be an int >= 1"):
            greedy_decode(step, init_state(2), 2, max_len=size, **kw)
