"""Tests for jaxattn.ops.masks against NumPy built independently."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from jaxattn.ops.masks import (
    attention_dropout_keep,
    attention_dropout_mask,
    attention_mask,
    causal_mask,
    check_lengths,
    check_local_window,
    combine_masks,
    dropout_scale,
    dropout_seed,
    local_window_mask,
    masked_softmax,
    padding_mask,
)


def np_causal(t, s):
    """Query i sits at absolute position i + s - t and sees keys at positions <= that."""
    out = np.zeros((t, s), bool)
    for i in range(t):
        for j in range(s):
            out[i, j] = j <= i + (s - t)
    return out


def np_masked_softmax(x, mask):
    x = np.asarray(x, np.float64)
    mask = np.broadcast_to(mask, x.shape)
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        m = mask[idx]
        if m.any():
            e = np.exp(x[idx][m] - x[idx][m].max())
            out[idx][m] = e / e.sum()
    return out


@pytest.mark.parametrize("t, s", [(5, 5), (3, 7), (7, 3), (1, 6), (4, 0)])
def test_causal_mask(t, s):
    got = causal_mask(t, s)
    assert got.shape == (1, 1, t, s) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got)[0, 0], np_causal(t, s))


def test_causal_mask_square_default_is_lower_triangle():
    np.testing.assert_array_equal(np.asarray(causal_mask(5))[0, 0], np.tril(np.ones((5, 5), bool)))
    got = causal_mask(3, 7, dtype=jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got)[0, 0], np_causal(3, 7).astype(np.float32))


def test_causal_mask_last_row_sees_everything_when_decoding():
    # A single decode step after 6 cached tokens sees all 7 keys.
    assert bool(jnp.all(causal_mask(1, 7)))


@pytest.mark.parametrize("t, s", [(5, 5), (3, 7), (7, 3), (1, 6)])
@pytest.mark.parametrize("left, right", [(0, 0), (2, 0), (1, 3), (9, 9)])
def test_local_window_mask(t, s, left, right):
    want = np.zeros((t, s), bool)
    for i in range(t):
        for j in range(s):  # query i sits at key position i + s - t, as in causal_mask
            want[i, j] = i + s - t - left <= j <= i + s - t + right
    got = local_window_mask(t, s, left, right)
    assert got.shape == (1, 1, t, s) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got)[0, 0], want)
    # Causal and a window of `left`: the left + 1 keys ending at the query's position.
    both = np.asarray(causal_mask(t, s) & local_window_mask(t, s, left, right))[0, 0]
    np.testing.assert_array_equal(both, want & np_causal(t, s))


@pytest.mark.parametrize(
    "args, name",
    [((2.5, 3, 1, 0), "q_len"), ((3, -1, 1, 0), "kv_len"), ((3, 3, -1, 0), "left"),
     ((3, 3, 1, 1.5), "right"), ((3, 3, None, 0), "left"), ((3, 3, True, 0), "left")],
)  # fmt: skip
def test_local_window_mask_refuses_what_is_not_an_int_size(args, name):
    # q_len=2.5 gave a [3, 3] mask at fractional positions, left=-1 an all-False mask.
    with pytest.raises(ValueError, match=rf"local_window_mask: {name} must be an int >= 0"):
        local_window_mask(*args)


def test_check_local_window():
    assert check_local_window(None, "f") is None
    assert check_local_window(3, "f") == (3, 3)
    assert check_local_window((2, 0), "f") == (2, 0)
    assert check_local_window([np.int64(4), 1], "f") == (4, 1)
    assert all(type(w) is int for w in check_local_window((np.int64(4), 1), "f"))
    for bad in (-1, (1, -2), (1,), 1.0, True, (1, None), "3"):
        with pytest.raises(ValueError, match=r"f: local_window_size must be an int >= 0"):
            check_local_window(bad, "f")


def test_padding_mask():
    lengths = np.array([3, 0, 7])
    want = np.array([[j < n for j in range(7)] for n in lengths])
    got = padding_mask(jnp.asarray(lengths), 7)
    assert got.shape == (3, 7) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(got), want)
    jitted = jax.jit(padding_mask, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(jitted(lengths, 7)), want)


def test_padding_mask_narrow_length_dtype_does_not_wrap():
    got = padding_mask(jnp.asarray([200, 255], jnp.uint8), 300)
    np.testing.assert_array_equal(np.asarray(got).sum(axis=1), [200, 255])


def test_padding_mask_bad_inputs():
    with pytest.raises(ValueError, match=r"\[B\]"):
        padding_mask(jnp.ones((2, 3), jnp.int32), 5)
    with pytest.raises(ValueError, match="integers"):
        padding_mask(jnp.ones((2,), jnp.float32), 5)
    # Lengths past the padded length or negative were read as "all" and "none".
    with pytest.raises(
        ValueError, match=r"padding_mask: lengths must lie in \[0, T=5\], got \[-1, 7\]"
    ):
        padding_mask(np.array([7, -1]), 5)
    # Checked before jnp.asarray, which (64-bit types off) would wrap 2**32 + 3 to 3.
    with pytest.raises(ValueError, match="got \\[4294967299, 4294967299\\]"):
        padding_mask(np.array([2**32 + 3]), 5)


def test_attention_mask(np_rng):
    q_valid = np_rng.random((3, 5)) > 0.3
    kv_valid = np_rng.random((3, 7)) > 0.3
    want = np.zeros((3, 1, 5, 7), bool)
    for b in range(3):
        for t in range(5):
            for s in range(7):
                want[b, 0, t, s] = q_valid[b, t] and kv_valid[b, s]
    np.testing.assert_array_equal(np.asarray(attention_mask(q_valid, kv_valid)), want)
    only_kv = attention_mask(None, kv_valid)
    assert only_kv.shape == (3, 1, 1, 7)
    np.testing.assert_array_equal(np.asarray(only_kv)[:, 0, 0], kv_valid)


def test_attention_mask_bad_inputs():
    with pytest.raises(ValueError, match=r"\(3, 7, 1\)"):
        attention_mask(None, np.ones((3, 7, 1), bool))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        attention_mask(np.ones((2, 5), bool), np.ones((3, 7), bool))
    # An additive float mask (0 = attend, -inf = hide) would be read the other way round.
    additive = np.array([[0.0, 0.0, -np.inf]], np.float32)
    with pytest.raises(ValueError, match=r"kv_valid must be boolean.*float32.*bias="):
        attention_mask(None, additive)
    with pytest.raises(ValueError, match=r"q_valid must be boolean.*float32"):
        attention_mask(additive, np.ones((1, 3), bool))
    # 0/1 integers are read as booleans, as combine_masks reads them.
    np.testing.assert_array_equal(attention_mask(None, np.array([[1, 0]]))[0, 0, 0], [True, False])


def test_combine_masks(np_rng):
    a = np_rng.random((3, 1, 5, 7)) > 0.5
    b = np_rng.random((1, 6, 5, 1)) > 0.5
    c = np_causal(5, 7)
    got = combine_masks(a, None, b, c)
    np.testing.assert_array_equal(np.asarray(got), a & b & c)
    assert got.shape == (3, 6, 5, 7)
    np.testing.assert_array_equal(np.asarray(combine_masks(None, a)), a)
    assert combine_masks() is None and combine_masks(None, None) is None
    with pytest.raises(ValueError, match=r"\(3, 1, 5, 7\).*\(4, 7\)"):
        combine_masks(a, np.ones((4, 7), bool))
    # 0/1 integers read as booleans; an additive float mask (0 / -inf) is refused.
    np.testing.assert_array_equal(np.asarray(combine_masks(a.astype(np.uint8))), a)
    with pytest.raises(ValueError, match=r"boolean.*float32.*bias="):
        combine_masks(a, np.where(c, 0.0, -np.inf).astype(np.float32))


def test_masked_softmax_matches_numpy(np_rng):
    x = 3 * np_rng.standard_normal((3, 5, 7)).astype(np.float32)
    mask = np_rng.random((3, 5, 7)) > 0.4
    mask[0, 1] = False  # one fully masked row
    got = masked_softmax(jnp.asarray(x), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np_masked_softmax(x, mask), rtol=1e-5, atol=1e-6)
    # No mask: plain softmax; a broadcast mask; another axis.
    np.testing.assert_allclose(
        np.asarray(masked_softmax(x)), np_masked_softmax(x, True), rtol=1e-5, atol=1e-6
    )
    key_mask = mask[:, :1, :]  # [3, 1, 7] broadcasts over queries
    got = masked_softmax(x, key_mask)
    want = np_masked_softmax(x, key_mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(masked_softmax(x, mask, axis=1)),
        np.moveaxis(np_masked_softmax(np.moveaxis(x, 1, -1), np.moveaxis(mask, 1, -1)), -1, 1),
        rtol=1e-5,
        atol=1e-6,
    )


def test_masked_softmax_refuses_a_mask_that_is_not_boolean_or_does_not_fit():
    x = jnp.zeros((3, 7))
    with pytest.raises(ValueError, match=r"^masked_softmax: mask must be boolean, got dtype int32"):
        masked_softmax(x, jnp.ones((3, 7), jnp.int32))
    # A mask with more dims would broadcast the scores up: refused, not silently widened.
    with pytest.raises(ValueError, match=r"mask \(2, 3, 7\) does not broadcast to scores \(3, 7\)"):
        masked_softmax(x, jnp.ones((2, 3, 7), bool))


def test_masked_softmax_bfloat16_input_is_float32(np_rng):
    x = np_rng.standard_normal((5, 7)).astype(np.float32)
    got = masked_softmax(jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.float32
    want = np_masked_softmax(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), True)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_masked_softmax_of_float64_scores_is_float64(np_rng):
    x = 3 * np_rng.standard_normal((3, 5, 7))
    mask = np_rng.random((3, 5, 7)) > 0.4
    with jax.enable_x64(True):
        got = masked_softmax(jnp.asarray(x), jnp.asarray(mask))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, np_masked_softmax(x, mask), rtol=1e-12, atol=1e-15)


def test_masked_softmax_ignores_huge_masked_logits():
    x = jnp.array([[1.0, 2.0, 1e38, -1e38]], jnp.float32)
    mask = jnp.array([[True, True, False, False]])
    got = np.asarray(masked_softmax(x, mask))
    np.testing.assert_allclose(got, np_masked_softmax(np.asarray(x), np.asarray(mask)), rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * jnp.arange(4.0)))(x)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[0, 2:] == 0)


def test_masked_softmax_visible_logits_below_any_finite_fill():
    """A float32-min bias on every visible logit still normalises over the visible keys."""
    low = float(np.finfo(np.float32).min)
    x = jnp.array([[low, low, 5.0], [low, 0.5 * low, 5.0]], jnp.float32)
    mask = jnp.array([[True, True, False]] * 2)
    probs = np.asarray(masked_softmax(x, mask))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * jnp.arange(3.0)))(x)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_masked_softmax_fully_masked_row_zero_with_finite_zero_grad(np_rng):
    x = jnp.asarray(np_rng.standard_normal((3, 7)).astype(np.float32))
    mask = jnp.asarray(np.array([[True] * 7, [False] * 7, [False, True] + [False] * 5]))
    probs = masked_softmax(x, mask)
    np.testing.assert_array_equal(np.asarray(probs)[1], np.zeros(7))
    np.testing.assert_allclose(np.asarray(probs)[2], np.eye(7)[1], atol=1e-7)
    np.testing.assert_allclose(np.asarray(probs).sum(-1), [1.0, 0.0, 1.0], rtol=1e-6)
    w = jnp.asarray(np_rng.standard_normal((3, 7)).astype(np.float32))
    grad = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * w))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[1:], np.zeros((2, 7)))
    # Row 0: the softmax Jacobian p * (w - p·w), independently in NumPy.
    p = np_masked_softmax(np.asarray(x), np.asarray(mask))[0]
    w0 = np.asarray(w, np.float64)[0]
    np.testing.assert_allclose(np.asarray(grad)[0], p * (w0 - p @ w0), rtol=1e-4, atol=1e-6)


def test_masked_softmax_makes_no_inf_under_debug_infs(np_rng):
    """The mask's own fill is finite: a user running jax.debug_infs on a model got an
    "invalid value (inf)" error from masked_softmax's -inf fill (forward and gradient),
    not from anything in their data."""
    x = 3 * np_rng.standard_normal((3, 5, 7)).astype(np.float32)
    mask = np_rng.random((3, 5, 7)) > 0.4
    mask[0, 1] = False  # one fully masked row
    w = np_rng.standard_normal((3, 5, 7))
    with jax.debug_infs(True):
        probs = masked_softmax(jnp.asarray(x), jnp.asarray(mask))
        grad = jax.grad(lambda x: jnp.sum(masked_softmax(x, mask) * w.astype(np.float32)))(
            jnp.asarray(x)
        )
    p = np_masked_softmax(x, mask)
    np.testing.assert_allclose(probs, p, rtol=1e-5, atol=1e-6)
    want = p * (w - np.sum(p * w, axis=-1, keepdims=True))  # the softmax Jacobian, row-wise
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


def test_combine_masks_of_other_ranks_under_rank_promotion_raise(np_rng):
    """A [T, S] mask with a [B, 1, T, S] one is the broadcast combine_masks promises; under
    jax.numpy_rank_promotion("raise") it (and so attention with a mask and is_causal) was
    "Operands could not be broadcast together" from inside the library."""
    a = np_rng.random((3, 1, 5, 7)) > 0.5
    c = np_causal(5, 7)
    with jax.numpy_rank_promotion("raise"):
        got = combine_masks(a, None, c)
    np.testing.assert_array_equal(got, a & c)


def test_masked_softmax_all_neg_inf_row_is_zero():
    x = jnp.array([[-jnp.inf] * 3, [0.0, -jnp.inf, 1.0]], jnp.float32)
    probs = np.asarray(masked_softmax(x))
    np.testing.assert_array_equal(probs[0], np.zeros(3))
    e = np.exp([0.0, 1.0])
    np.testing.assert_allclose(probs[1], [e[0] / e.sum(), 0.0, e[1] / e.sum()], rtol=1e-6)


def test_masked_softmax_of_no_keys_is_empty():
    # A zero-length axis was JAX's "zero-size array to reduction operation max", naming
    # nothing; jax.nn.softmax and torch.softmax give the empty result.
    for mask in (None, jnp.zeros((2, 0), bool)):
        probs = masked_softmax(jnp.zeros((2, 0)), mask)
        assert probs.shape == (2, 0) and probs.dtype == jnp.float32
    assert masked_softmax(jnp.zeros((0, 3)), axis=0).shape == (0, 3)


def test_dropout_keep_of_no_keys_is_empty():
    # Was a ZeroDivisionError from reshape(-1, 0) for an even first key.
    seed = dropout_seed(jax.random.key(0))
    rows = jnp.arange(4, dtype=jnp.uint32)
    for first in (0, 1):
        assert attention_dropout_keep(seed, rows, first, 0, 0.5).shape == (4, 0)
        assert attention_dropout_keep(seed, rows, first, 0, 0.5, col_axis=0).shape == (0, 4)
    assert attention_dropout_mask(seed, (2, 3, 4, 0), 0.5).shape == (2, 3, 4, 0)


def test_mask_sizes_must_be_ints():
    # jnp.arange(2.5) made a 3 x 3 causal mask (and padding_mask 3 columns) without a word;
    # None was a bare TypeError.
    for q_len, kv_len, name in ((2.5, None, "q_len"), (None, 3, "q_len"), (3, 2.0, "kv_len"),
                                (-1, None, "q_len"), (2, -1, "kv_len")):  # fmt: skip
        with pytest.raises(ValueError, match=f"causal_mask: {name} must be an int >= 0"):
            causal_mask(q_len, kv_len)
    assert causal_mask(np.int64(2), jnp.int32(3)).shape == (1, 1, 2, 3)
    for max_len in (2.5, None, -1):
        with pytest.raises(ValueError, match="padding_mask: max_len must be an int >= 0"):
            padding_mask(jnp.zeros((1,), jnp.int32), max_len)


def test_masked_softmax_bad_mask():
    x = jnp.zeros((5, 7))
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(5, 7\)"):
        masked_softmax(x, jnp.ones((5, 3), bool))
    with pytest.raises(ValueError, match="boolean"):
        masked_softmax(x, jnp.ones((5, 7), jnp.float32))


def test_masked_softmax_refuses_a_mask_that_would_grow_the_scores():
    # [2, 5, 7] broadcasts with [5, 7], but the probabilities must keep the scores' shape.
    with pytest.raises(ValueError, match=r"\(2, 5, 7\).*\(5, 7\)"):
        masked_softmax(jnp.zeros((5, 7)), jnp.ones((2, 5, 7), bool))


def test_check_lengths_accepts_0_to_steps_and_names_the_rest():
    check_lengths(jnp.array([0, 5, 3]), 3, 5, "f")  # both ends of [0, T] are lengths
    jax.jit(lambda n: check_lengths(n, 3, 5, "f"))(jnp.array([9, 9, 9]))  # traced: shape only
    check_lengths(jnp.zeros((0,), jnp.int32), 0, 5, "f")  # an empty batch
    for lengths, message in [
        (jnp.array([0, 6, 3]), r"f: lengths must lie in \[0, T=5\], got \[0, 6\]"),
        (jnp.array([-1, 2, 3]), r"f: lengths must lie in \[0, T=5\], got \[-1, 3\]"),
        (jnp.array([1, 2]), r"f: lengths must be integers of shape \[B\] = \(3,\), got int32"),
        (jnp.array([1.0, 2.0, 3.0]), r"must be integers of shape \[B\] = \(3,\), got float32"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_lengths(lengths, 3, 5, "f")
    check_lengths(jnp.array([1, 5]), 2, 5, "f", least=1)
    with pytest.raises(ValueError, match=r"f: lengths must lie in \[1, T=5\], got \[0, 5\]"):
        check_lengths(jnp.array([0, 5]), 2, 5, "f", least=1)


def test_dropout_mask_is_the_threefry_hash_of_each_position():
    """Entry (row, col) keeps iff word col % 2 of threefry2x32(seed, (row, col // 2)) >=
    rate 2^32, with row = (b N + n) T + t: rebuilt here through JAX's public threefry_2x32,
    which hashes count[i] with count[i + n/2]."""
    seed = dropout_seed(jax.random.key(5))
    shape, rate = (2, 3, 5, 7), 0.3
    b, n, t, s = np.meshgrid(*(np.arange(d) for d in shape), indexing="ij")
    rows = ((b * shape[1] + n) * shape[2] + t).astype(np.uint32).ravel()
    pairs = (s // 2).astype(np.uint32).ravel()
    words = np.asarray(threefry_2x32(seed, jnp.asarray(np.concatenate([rows, pairs]))))
    first, second = words[: rows.size], words[rows.size :]
    bits = np.where(s.ravel() % 2 == 0, first, second).reshape(shape)
    want = bits >= np.uint32(round(rate * 2**32))
    np.testing.assert_array_equal(attention_dropout_mask(seed, shape, rate), want)
    # A NumPy or JAX scalar is the same rate (0.375: exact in float32).
    exact = attention_dropout_mask(seed, shape, 0.375)
    for scalar in (np.float32(0.375), jnp.float32(0.375)):
        np.testing.assert_array_equal(attention_dropout_mask(seed, shape, scalar), exact)


def test_dropout_masks_refuse_bad_rates_and_axes():
    # rate 1 dropped everything and divided by zero; 1.5 kept nothing with scale -2.
    seed = dropout_seed(jax.random.key(5))
    for rate in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"attention_dropout_keep: rate must be in \[0, 1\)"):
            attention_dropout_mask(seed, (1, 1, 2, 3), rate)
        with pytest.raises(ValueError, match=r"dropout_scale: rate must be in \[0, 1\)"):
            dropout_scale(jnp.ones((2,), bool), rate)
    with pytest.raises(ValueError, match="col_axis must be 0 or -1, got -2"):  # read as -1
        attention_dropout_keep(seed, jnp.arange(3), 0, 3, 0.5, col_axis=-2)


@pytest.mark.parametrize("col_axis", [-1, 0])
def test_dropout_tiles_match_the_whole_mask(col_axis):
    """Any rows and any run of keys, from an even or odd (traced) start, are the same entries
    of the whole mask; ``col_axis=0`` gives the transposed tile."""
    seed = dropout_seed(jax.random.key(1))
    whole = np.asarray(attention_dropout_mask(seed, (1, 2, 4, 11), 0.4)).reshape(8, 11)
    rows = np.array([6, 1, 4])

    def want(start, count):
        tile = whole[rows, start : start + count]
        return tile.T if col_axis == 0 else tile

    def tiles(starts, count, even_start):  # traced starts, one compile per count
        keep = partial(attention_dropout_keep, seed, rows, num_cols=count, rate=0.4)
        batched = jax.vmap(lambda first: keep(first, col_axis=col_axis, even_start=even_start))
        return jax.jit(batched)(starts)

    for count in (1, 4, 5):
        starts = np.arange(12 - count)
        for start, tile in zip(starts, tiles(starts, count, None)):
            np.testing.assert_array_equal(tile, want(start, count))
        evens = starts[starts % 2 == 0]  # the caller's promise skips the extra column pair
        for start, tile in zip(evens, tiles(evens, count, True)):
            np.testing.assert_array_equal(tile, want(start, count))
    for start, count in [(0, 5), (3, 4)]:  # a Python int start
        tile = attention_dropout_keep(seed, rows, start, count, 0.4, col_axis=col_axis)
        np.testing.assert_array_equal(tile, want(start, count))


def test_dropout_mask_statistics():
    """The keep rate is 1 - rate to within 5 standard deviations; neighbouring keys (the two
    words of one hash), neighbouring rows and two keys are unrelated; rate 0 keeps all."""
    seed = dropout_seed(jax.random.key(2))
    shape, rate = (4, 8, 128, 128), 0.2
    keep = np.asarray(attention_dropout_mask(seed, shape, rate))
    sigma = np.sqrt(rate * (1 - rate) / keep.size)
    assert abs(keep.mean() - (1 - rate)) < 5 * sigma
    x = keep.astype(np.float64) - keep.mean()
    for a, b in [(x[..., ::2], x[..., 1::2]), (x[..., :-1, :], x[..., 1:, :]), (x[0], x[1])]:
        corr = (a * b).mean() / x.var()
        assert abs(corr) < 5 / np.sqrt(a.size), corr
    other = np.asarray(attention_dropout_mask(dropout_seed(jax.random.key(3)), shape, rate))
    assert abs((keep == other).mean() - (rate**2 + (1 - rate) ** 2)) < 0.01
    assert np.asarray(attention_dropout_mask(seed, (1, 1, 3, 5), 0.0)).all()


def test_a_window_side_beyond_int32_hides_nothing(np_rng):
    # 2**31 (or sys.maxsize for "unbounded") raised OverflowError on the einsum path and in
    # the KV cache's mask, while the blockwise kernel took it.
    from jaxattn.ops.attention import cached_attention, dot_product_attention

    big = 2**31
    np.testing.assert_array_equal(local_window_mask(3, 5, big, 2**63 - 1), np.ones((1, 1, 3, 5)))
    q = jnp.asarray(np_rng.standard_normal((1, 3, 2, 4)), jnp.float32)
    want = dot_product_attention(q, q, q, is_causal=True, implementation="xla")
    for implementation in ("xla", "blockwise"):
        got = dot_product_attention(
            q, q, q, is_causal=True, local_window_size=(big, 0), implementation=implementation
        )
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    cache = jnp.zeros((1, 5, 2, 4))
    out, _, _ = cached_attention(q, q, q, cache, cache, 0, local_window_size=big)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
