"""Tests for jaxattn.ops.flash (blockwise attention) and the kernel dispatch.

Outputs and gradients (q, k, v, bias) are checked against a float64 NumPy forward and
backward written here, and against ``dot_product_attention(implementation="xla")``, with
small blocks so that every case spans many tiles, partial tiles and the causal diagonal.
"""

import itertools
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxattn.ops import attention, flash
from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.flash import (
    ACCELERATOR_BLOCK,
    DEFAULT_BLOCK,
    _key_range,
    _Plan,
    _query_range,
    block_sizes,
    default_batch_heads,
    flash_attention,
)
from jaxattn.ops.masks import attention_dropout_mask, dropout_seed

B, N, H = 2, 6, 8
TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-4}


def normal(np_rng, *shape):
    return jnp.asarray(np_rng.standard_normal(shape), jnp.float32)


def np_causal(t, s):
    """Query i is at key position i + s - t and sees keys up to it."""
    return np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)


def sum_to(x, shape):
    """Sum a [B, N, T, S] array down to a shape that broadcasts to it."""
    lead = x.ndim - len(shape)
    x = x.sum(axis=tuple(range(lead)))
    axes = tuple(a for a, d in enumerate(shape) if d == 1 and x.shape[a] > 1)
    return x.sum(axis=axes, keepdims=True).reshape(shape)


def np_window(t, s, left, right):
    """Query i, at key position i + s - t, sees keys from left before it to right after."""
    offset = np.arange(t)[:, None] + (s - t) - np.arange(s)[None, :]  # query minus key position
    return (offset <= left) & (offset >= -right)


def np_attention_vjp(
    q, k, v, cot, mask=None, bias=None, is_causal=False, scale=None, drop=None, window=None,
    with_dscale=False,
):  # fmt: skip
    """Float64 attention and its vector-Jacobian product, one (batch, head) at a time.

    ``drop``: a ``[B, N, T, S]`` dropout multiplier (0 or 1 / (1 - rate)) on the
    probabilities; ``window``: ``(left, right)``. Returns ``(out, (dq, dk, dv, dbias))``;
    rows with nothing to attend to give 0. ``with_dscale``: the gradients end with the
    scale's, ``sum(ds * q kᵀ)``.
    """
    q, k, v, cot = (np.asarray(a, np.float64) for a in (q, k, v, cot))
    b_, t_, n_, h_ = q.shape
    s_, k_ = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h_) if scale is None else scale
    allowed = np.ones((b_, n_, t_, s_), bool)
    if mask is not None:
        allowed &= np.asarray(mask)
    if is_causal:
        allowed &= np_causal(t_, s_)
    if window is not None:
        allowed &= np_window(t_, s_, *window)
    full_bias = np.zeros(allowed.shape)
    if bias is not None:
        full_bias = np.broadcast_to(np.asarray(bias, np.float64), allowed.shape)
    drop = np.ones(allowed.shape) if drop is None else np.asarray(drop, np.float64)
    out, dq = np.zeros((b_, t_, n_, v.shape[-1])), np.zeros(q.shape)
    dk, dv, dlogits = np.zeros(k.shape), np.zeros(v.shape), np.zeros(allowed.shape)
    dscale = 0.0
    for b in range(b_):
        for n in range(n_):
            j = n // (n_ // k_)
            raw = q[b, :, n] @ k[b, :, j].T
            logits = scale * raw + full_bias[b, n]
            probs = np.zeros_like(logits)
            for t in range(t_):
                keep = allowed[b, n, t]
                if keep.any():
                    e = np.exp(logits[t, keep] - logits[t, keep].max())
                    probs[t, keep] = e / e.sum()
            dropped = probs * drop[b, n]
            out[b, :, n] = dropped @ v[b, :, j]
            dprobs = (cot[b, :, n] @ v[b, :, j].T) * drop[b, n]
            ds = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))
            dq[b, :, n] = scale * ds @ k[b, :, j]
            dk[b, :, j] += scale * ds.T @ q[b, :, n]
            dv[b, :, j] += dropped.T @ cot[b, :, n]
            dlogits[b, n] = ds
            dscale += np.sum(ds * raw)
    dbias = None if bias is None else sum_to(dlogits, np.shape(bias))
    return out, (dq, dk, dv, dbias) + ((dscale,) if with_dscale else ())


def random_mask(np_rng, shape, empty_row=False):
    mask = np_rng.random(shape) > 0.3
    if empty_row:
        mask[0, ..., 3, :] = False  # query 3 of batch 0 sees nothing (in every head)
    return mask


# name: (t, s, K, mask shape, bias shape, is_causal, scale, block_q, block_k)
# name: (t, s, K, mask shape, bias shape, is_causal, scale, block_q, block_k, vs xla too)
CASES = {
    # Odd length; the last query block is one row whose diagonal opens key block 4.
    "causal": (33, 33, 6, None, None, True, None, 16, 8, False),
    "padding_causal_t<s_gqa2": (21, 53, 2, "padding", None, True, None, 8, 16, False),
    "causal_t>s_gqa3": (53, 21, 3, None, None, True, 0.3, 16, 16, True),  # 32 empty rows
    "mask_bias_gqa3": (37, 53, 3, (B, N, 37, 53), (1, N, 37, 53), False, None, 8, 16, True),
    "cross_mqa_key_bias": (29, 53, 1, None, (B, 1, 1, 53), False, 0.5, 16, 8, False),
    "rank2_bias_mask": (37, 37, 2, (1, 1, 37, 37), (37, 37), True, None, 16, 16, False),
    # Masks without a bias: with batch_heads the backward is vmapped too.
    "head_mask_causal_gqa2": (37, 53, 2, (1, N, 37, 53), None, True, None, 16, 8, False),
    # Equal blocks, S - T a whole number of them: diagonal tiles in two halves (per head).
    "padding_causal_t<s_split": (21, 53, 6, "padding", None, True, None, 16, 16, False),
    "causal_bias_gqa3_split": (48, 48, 3, None, (N, 48, 48), True, None, 16, 16, True),
    "batch_mask_gqa3": (37, 37, 3, (B, 1, 37, 37), None, False, None, 8, 8, True),
}


def make_case(np_rng, name):
    t, s, k_heads, mask_shape, bias_shape, is_causal, scale, bq, bk, _ = CASES[name]
    q, k = normal(np_rng, B, t, N, H), normal(np_rng, B, s, k_heads, H)
    v = normal(np_rng, B, s, k_heads, H)
    mask = None
    if mask_shape == "padding":
        lengths = np.array([s, s // 2])
        mask = (np.arange(s)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    elif mask_shape is not None:
        mask = random_mask(np_rng, mask_shape, empty_row=True)
    bias = None if bias_shape is None else normal(np_rng, *bias_shape)
    kw = {"mask": None if mask is None else jnp.asarray(mask), "is_causal": is_causal}
    kw["scale"] = scale
    return (q, k, v, bias), kw, (bq, bk)


def vjp_of(impl, q, k, v, bias, cot, kw, blocks, batch_heads=False, **dropout):
    """Output and (dq, dk, dv, dbias) of ``impl`` ("flash" with ``blocks`` and the
    ``batch_heads`` layout, or "xla"); ``dropout``: ``dropout_rate`` and ``dropout_rng``."""

    def f(q, k, v, bias):
        if impl == "flash":
            bq, bk = blocks
            return flash_attention(
                q, k, v, bias=bias, block_q=bq, block_k=bk, batch_heads=batch_heads, **kw, **dropout
            )
        return dot_product_attention(q, k, v, bias=bias, implementation=impl, **kw, **dropout)

    out, vjp = jax.vjp(f, q, k, v, bias)
    return out, vjp(cot)


def assert_all_close(out, grads, want, want_grads):
    np.testing.assert_allclose(out, want, **TOL)
    for got, ref in zip(grads, want_grads):
        assert (got is None) == (ref is None)
        if ref is not None:
            np.testing.assert_allclose(got, ref, **GRAD_TOL)


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
@pytest.mark.parametrize("name", list(CASES))
def test_outputs_and_grads_match_numpy_and_xla(np_rng, name, batch_heads):
    """Both loop orders: one (batch, kv-head) pair at a time (CPU) and all pairs batched
    in each tile step (GPU/TPU)."""
    (q, k, v, bias), kw, blocks = make_case(np_rng, name)
    cot = normal(np_rng, *q.shape)
    impls = ("flash", "xla") if CASES[name][-1] else ("flash",)
    results = jax.jit(lambda *a: [vjp_of(i, *a, kw, blocks, batch_heads) for i in impls])(
        q, k, v, bias, cot
    )
    (out, grads), others = results[0], results[1:]
    assert_all_close(out, grads, *np_attention_vjp(q, k, v, cot, bias=bias, **kw))
    for want, want_grads in others:  # the einsum path of dot_product_attention
        assert_all_close(out, grads, want, want_grads)


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
@pytest.mark.parametrize("name", ["causal_t>s_gqa3", "mask_bias_gqa3"])
def test_rows_that_see_no_key_make_no_inf_under_debug_infs(np_rng, name, batch_heads):
    """A row with nothing to attend to stored log l = +inf for the backward: run eagerly
    under jax.debug_infs, the gradient failed with "invalid value (inf) encountered in
    scan" though nothing the user gave was infinite."""
    (q, k, v, bias), kw, blocks = make_case(np_rng, name)
    cot = normal(np_rng, *q.shape)
    with jax.debug_infs(True):
        out, grads = vjp_of("flash", q, k, v, bias, cot, kw, blocks, batch_heads)
    assert_all_close(out, grads, *np_attention_vjp(q, k, v, cot, bias=bias, **kw))


@pytest.mark.parametrize("name", ["causal", "mask_bias_gqa3", "causal_bias_gqa3_split"])
def test_float64_inputs_compute_in_float64(np_rng, name):
    """With jax_enable_x64 the tiles, statistics and accumulators of float64 inputs are
    float64: outputs and gradients match the float64 reference to 1e-10, not float32's
    1e-7. With dropout it agrees with the einsum path as closely."""
    (q, k, v, bias), kw, blocks = make_case(np_rng, name)
    cot = normal(np_rng, *q.shape)
    q, k, v, cot = (np.asarray(a, np.float64) for a in (q, k, v, cot))
    bias = None if bias is None else np.asarray(bias, np.float64)
    want = np_attention_vjp(q, k, v, cot, bias=bias, **kw)
    with jax.enable_x64(True):  # one program (eager, the small ops took most of the time)
        args = [None if a is None else jnp.asarray(a) for a in (q, k, v, bias, cot)]
        drop = {"dropout_rate": 0.25, "dropout_rng": jax.random.key(3)}
        (out, grads), dropped = jax.jit(
            lambda *a: (
                vjp_of("flash", *a, kw, blocks),
                [vjp_of(impl, *a, kw, blocks, **drop) for impl in ("flash", "xla")],
            )
        )(*args)
    assert out.dtype == grads[0].dtype == jnp.float64
    np.testing.assert_allclose(out, want[0], rtol=1e-10, atol=1e-12)
    for got, ref in zip(grads, want[1]):
        if ref is not None:
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    (out_f, grads_f), (out_x, grads_x) = dropped
    np.testing.assert_allclose(out_f, out_x, rtol=1e-10, atol=1e-12)
    for got, ref in zip(grads_f, grads_x):
        if ref is not None:
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


# name: (t, s, K, mask shape, bias shape, is_causal, block_q, block_k, local_window_size)
WINDOW_CASES = {
    # left < block_q - 1: the window's edge crosses the diagonal tiles (no constant mask).
    "causal_left5": (33, 33, 6, None, None, True, 8, 8, 5),
    "causal_left0_gqa2": (21, 21, 2, None, None, True, 8, 8, (0, 4)),  # only itself
    # Equal blocks and left >= block_q - 1: split diagonal tiles plus the window's band.
    "causal_left20_bias_split": (48, 48, 3, None, (N, 48, 48), True, 16, 16, (20, 0)),
    "padding_causal_t<s_gqa2": (21, 53, 2, "padding", None, True, 8, 16, (9, 3)),
    "causal_t>s_gqa3": (53, 21, 3, None, None, True, 16, 16, (4, 0)),  # 32 empty rows
    "two_sided_mask_bias_gqa3": (37, 53, 3, (B, N, 37, 53), (1, N, 37, 53), False, 8, 16, (6, 11)),
    "right_only_mqa": (29, 29, 1, None, None, False, 8, 8, (100, 3)),
    "left_only_key_bias": (29, 40, 2, None, (B, 1, 1, 40), False, 16, 8, (7, 100)),
}


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_local_window_matches_numpy_and_xla(np_rng, name, batch_heads):
    """Sliding windows: the skipped and band-masked tiles give the float64 reference's
    outputs and gradients, and so does the einsum path with the window as a mask."""
    t, s, k_heads, mask_shape, bias_shape, is_causal, bq, bk, window = WINDOW_CASES[name]
    q, k = normal(np_rng, B, t, N, H), normal(np_rng, B, s, k_heads, H)
    v, cot = normal(np_rng, B, s, k_heads, H), normal(np_rng, B, t, N, H)
    mask = None
    if mask_shape == "padding":
        mask = (np.arange(s)[None, :] < np.array([s, s // 2])[:, None])[:, None, None, :]
    elif mask_shape is not None:
        mask = random_mask(np_rng, mask_shape, empty_row=True)
    bias = None if bias_shape is None else normal(np_rng, *bias_shape)
    kw = {"mask": None if mask is None else jnp.asarray(mask), "is_causal": is_causal}
    kw["local_window_size"] = window
    results = jax.jit(
        lambda *a: [vjp_of(i, *a, kw, (bq, bk), batch_heads) for i in ("flash", "xla")]
    )(q, k, v, bias, cot)
    pair = window if isinstance(window, tuple) else (window, window)
    want = np_attention_vjp(q, k, v, cot, mask=mask, bias=bias, is_causal=is_causal, window=pair)
    for out, grads in results:
        assert_all_close(out, grads, *want)


def test_local_window_with_dropout_matches_xla(np_rng):
    """Dropout inside a window: the kernel's rebuilt tiles are the einsum path's mask."""
    q, k, v = normal(np_rng, B, 37, N, H), normal(np_rng, B, 37, 3, H), normal(np_rng, B, 37, 3, H)
    kw = dict(is_causal=True, local_window_size=(9, 0), dropout_rate=0.3)
    kw["dropout_rng"] = jax.random.key(5)
    kernels = {
        "blockwise": partial(flash_attention, block_q=8, block_k=8, **kw),
        "xla": partial(dot_product_attention, implementation="xla", **kw),
    }
    run = lambda impl: jax.value_and_grad(lambda q: jnp.sum(jnp.sin(kernels[impl](q, k, v))))(q)
    (got, got_grad), (want, want_grad) = jax.jit(lambda: (run("blockwise"), run("xla")))()
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(got_grad, want_grad, **GRAD_TOL)


def test_eager_calls_reuse_the_compiled_kernel(
    np_rng, assert_compiled_once, assert_inlined_when_traced
):
    """Run eagerly, the custom_vjp and its tile loops were traced and compiled again on
    every call (about a second each); the second call traces nothing. Inside a trace the
    kernel is inlined, not a nested jit, so the caller's program stays as it was."""
    q, k, v = (jnp.asarray(np_rng.standard_normal((1, 16, 2, 4)), jnp.float32) for _ in "qkv")
    attend = lambda q: flash_attention(q, k, v, is_causal=True, block_q=8, block_k=8)
    assert_compiled_once({"flash_attention": lambda: attend(q)})
    assert_inlined_when_traced("_flash", attend, q)


def test_local_window_matches_jax_nn(np_rng):
    """For T == S the window is ``jax.nn.dot_product_attention``'s ``local_window_size``
    (an implementation of its own): causal and two-sided, GQA, both our kernels."""
    q, k, v = normal(np_rng, B, 40, N, H), normal(np_rng, B, 40, 2, H), normal(np_rng, B, 40, 2, H)
    cases = [(True, 6), (True, (3, 5)), (False, (2, 9)), (False, 0)]
    if jax.__version_info__ < (0, 8, 2):  # jax.nn ignored a window without is_causal or mask
        cases = [case for case in cases if case[0]]
    for is_causal, window in cases:
        want = jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, local_window_size=window)
        for impl in ("xla", "blockwise"):
            got = dot_product_attention(
                q, k, v, is_causal=is_causal, local_window_size=window, implementation=impl
            )
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"{impl} {is_causal} {window}")


def test_a_window_that_hides_nothing_is_the_plain_kernel(np_rng):
    """A side that covers every key is dropped from the plan: the same tiles, bit for bit."""
    q, k, v = normal(np_rng, 1, 20, 2, H), normal(np_rng, 1, 30, 2, H), normal(np_rng, 1, 30, 2, H)
    f = partial(flash_attention, block_q=8, block_k=8)
    for is_causal, window in [(True, (29, 0)), (True, (40, 7)), (False, (29, 19)), (False, 50)]:
        got = f(q, k, v, is_causal=is_causal, local_window_size=window)
        np.testing.assert_array_equal(got, f(q, k, v, is_causal=is_causal))
    narrower = f(q, k, v, is_causal=True, local_window_size=(28, 0))
    assert not np.array_equal(narrower, f(q, k, v, is_causal=True))


# Both layouts, the split diagonal, padding, T > S, GQA/MQA, masks and every bias shape.
DROPOUT_CASES = [
    ("causal", False),
    ("causal", True),
    ("padding_causal_t<s_gqa2", True),
    ("causal_t>s_gqa3", False),
    ("mask_bias_gqa3", False),
    ("cross_mqa_key_bias", True),
    ("padding_causal_t<s_split", False),
    ("causal_bias_gqa3_split", False),
]


@pytest.mark.parametrize("name, batch_heads", DROPOUT_CASES)
def test_dropout_matches_numpy_and_xla(np_rng, name, batch_heads):
    """With attention dropout the kernel rebuilds each tile's mask in the backward; outputs
    and gradients match the float64 reference under the whole mask
    (``attention_dropout_mask``) and the einsum path, which draws the same mask."""
    (q, k, v, bias), kw, blocks = make_case(np_rng, name)
    cot = normal(np_rng, *q.shape)
    rate, rng = 0.3, jax.random.key(4)
    dropout = {"dropout_rate": rate, "dropout_rng": rng}
    results = jax.jit(
        lambda *a: [vjp_of(i, *a, kw, blocks, batch_heads, **dropout) for i in ("flash", "xla")]
    )(q, k, v, bias, cot)
    (out, grads), (want, want_grads) = results
    shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    keep = np.asarray(attention_dropout_mask(dropout_seed(rng), shape, rate))
    assert 0.2 < 1 - keep.mean() < 0.4
    drop = keep / (1 - rate)
    assert_all_close(out, grads, *np_attention_vjp(q, k, v, cot, bias=bias, drop=drop, **kw))
    assert_all_close(out, grads, want, want_grads)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dropout_one_key_has_zero_q_and_k_gradients_in_half_precision(dtype):
    """Over one key softmax is 1 whatever q and k are, with dropout too: dq = dk = 0, as on
    the einsum path. (p / (1 - rate) rounded to bfloat16 before the product with v gave
    the backward a delta off by 2^-9 and dq, dk of about 1e-3 |dp|, here ~1e-2.)"""
    q, k, v = (jnp.full((1, 3, 2, 1), x, dtype) for x in (2.0, 3.0, 5.0))
    rng = jax.random.key(0)

    def f(q, k):
        out = flash_attention(q, k[:, :1], v[:, :1], dropout_rate=0.3, dropout_rng=rng)
        return out.astype(jnp.float32).sum()

    assert float(f(q, k)) != 0.0  # some entries kept
    dq, dk = jax.grad(f, argnums=(0, 1))(q, k)
    for grad in (dq, dk):  # (before: ~1e-2; float32 rounding leaves ~1e-6)
        np.testing.assert_allclose(np.asarray(grad, np.float32), 0.0, atol=1e-5)


def test_dropout_is_one_function_of_the_key_at_any_block_size(np_rng):
    """Odd blocks (tiles starting at odd keys), the default blocks and the einsum path drop
    the same entries, in the forward and in the backward's transposed tiles; under vmap
    over keys too, and another key drops others."""
    q, k, v, cot = (normal(np_rng, 2, 19, 4, H) for _ in range(4))
    keys = jax.random.split(jax.random.key(9), 2)

    @jax.jit
    def run(rngs):  # (out, (dq, dk, dv)) of [odd blocks, default blocks, einsum path] per key
        def flash(q, k, v, rng, **kw):
            return flash_attention(q, k, v, is_causal=True, dropout_rate=0.5, dropout_rng=rng, **kw)

        def dense(q, k, v, rng):
            return dot_product_attention(
                q, k, v, is_causal=True, implementation="xla", dropout_rate=0.5, dropout_rng=rng
            )

        def out_and_grads(f, rng):
            out, vjp = jax.vjp(partial(f, rng=rng), q, k, v)
            return out, vjp(cot)

        fns = (partial(flash, block_q=5, block_k=7), flash, dense)
        return [jax.vmap(partial(out_and_grads, f))(rngs) for f in fns]

    odd, default, dense = run(keys)
    assert_all_close(*odd, *dense)
    assert_all_close(*default, *dense)
    assert not np.allclose(odd[0][0], odd[0][1])


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
@pytest.mark.parametrize("t, s", [(9, 7), (8, 12)], ids=["t>s", "split_diagonal"])
@pytest.mark.parametrize("fill", [float(np.finfo(np.float32).min), -1e9], ids=["min", "-1e9"])
def test_rows_biased_far_below_zero_keep_their_normaliser(np_rng, fill, t, s, batch_heads):
    """A row whose every visible key carries a huge negative bias (float32's finfo.min or
    -1e9, common mask values) averages those keys: its logits all round to the bias. The
    backward must rebuild each of their probabilities as 1 / l, l the number of keys the
    row sees: kept as one lse = m + log l, log l rounded away next to |m| and every
    gradient of the row came out l times too large. Causal with blocks of 4: T > S, and
    S - T = 4 (per head, the diagonal tiles then run as two half products)."""
    q, k, v = normal(np_rng, B, t, N, H), normal(np_rng, B, s, 2, H), normal(np_rng, B, s, 2, H)
    bias = np.zeros((B, N, t, s), np.float32)
    bias[0, :, 4] = fill  # query 4 of batch 0, every head
    bias[1, 3, 6] = fill  # one head of one query
    bias, cot = jnp.asarray(bias), normal(np_rng, *q.shape)
    kw = {"mask": None, "is_causal": True, "scale": None}
    (out, grads), (want, want_grads) = jax.jit(
        lambda *a: [vjp_of(i, *a, kw, (4, 4), batch_heads) for i in ("flash", "xla")]
    )(q, k, v, bias, cot)
    assert_all_close(out, grads, want, want_grads)
    if fill == float(np.finfo(np.float32).min):  # float64 rounds that bias away too
        assert_all_close(out, grads, *np_attention_vjp(q, k, v, cot, bias=bias, is_causal=True))
    # Query 4 of batch 0 sees keys 0 .. 4 + S - T: their mean, in every head.
    seen = 4 + s - t + 1
    mean = np.repeat(np.asarray(v)[0, :seen].mean(0), N // 2, axis=0)
    np.testing.assert_allclose(np.asarray(out)[0, 4], mean, **TOL)


def test_fully_masked_rows_give_zeros_and_finite_grads(np_rng):
    q, k, v = normal(np_rng, B, 13, N, H), normal(np_rng, B, 11, 2, H), normal(np_rng, B, 11, 2, H)
    mask = random_mask(np_rng, (B, N, 13, 11))
    mask[0, :, 5] = False  # every head of query 5, batch 0
    mask[1, 4, 9] = False  # one head of one query
    mask = jnp.asarray(mask)
    f = lambda q, k, v: jnp.sin(flash_attention(q, k, v, mask=mask, block_q=4, block_k=4))
    out, grads = jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b)), (0, 1, 2))(*a)))(
        q, k, v
    )
    assert np.all(np.asarray(out)[0, 5] == 0) and np.all(np.asarray(out)[1, 9, 4] == 0)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[0])[0, 5] == 0) and np.all(np.asarray(grads[0])[1, 9, 4] == 0)
    # Causal with T > S: the first T - S queries see no key at all.
    out = jax.jit(lambda *a: flash_attention(*a, is_causal=True, block_q=4, block_k=4))(q, k, v)
    assert np.all(np.asarray(out)[:, :2] == 0) and np.all(np.asarray(out)[:, 2:] != 0)


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
def test_value_head_dim_unlike_the_query_head_dim(np_rng, batch_heads):
    """v: [B, S, K, Hv] with Hv != H (every other case has Hv == H): the output is
    [B, T, N, Hv] and the accumulators of out and dv are Hv wide, dq and dk H wide."""
    q, k = normal(np_rng, B, 13, N, H), normal(np_rng, B, 11, 2, H)
    v, cot = normal(np_rng, B, 11, 2, 5), normal(np_rng, B, 13, N, 5)
    kw = {"mask": jnp.asarray(random_mask(np_rng, (B, 1, 1, 11))), "is_causal": True}
    out, grads = jax.jit(lambda *a: vjp_of("flash", *a, kw, (4, 4), batch_heads))(
        q, k, v, None, cot
    )
    assert out.shape == (B, 13, N, 5)
    assert_all_close(out, grads, *np_attention_vjp(q, k, v, cot, **kw))


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
@pytest.mark.parametrize("mask_shape", [(B, 1, 13, 1), (13, 1)])
def test_mask_broadcast_along_the_keys(np_rng, mask_shape, batch_heads):
    """A mask with a size-1 key axis (per-query validity, [B, 1, T, 1] or [T, 1]) applies
    to every key block, not only to the first key (the others are not padding)."""
    q, k, v = normal(np_rng, B, 13, N, H), normal(np_rng, B, 11, 3, H), normal(np_rng, B, 11, 3, H)
    valid = np_rng.random(mask_shape) > 0.4
    cot = normal(np_rng, *q.shape)
    kw = {"mask": jnp.asarray(valid)}
    out, grads = jax.jit(lambda *a: vjp_of("flash", *a, kw, (4, 4), batch_heads))(
        q, k, v, None, cot
    )
    assert_all_close(out, grads, *np_attention_vjp(q, k, v, cot, mask=valid))


def _check_block_ranges(t, s, bq, bk, causal, left=None, right=None):
    vis = np.zeros((-(-t // bq) * bq, -(-s // bk) * bk), bool)
    vis[:t, :s] = np_causal(t, s) if causal else True
    if left is not None or right is not None:
        huge = t + s  # an unbounded side
        vis[:t, :s] &= np_window(
            t, s, huge if left is None else left, huge if right is None else right
        )
    # Rows past t are padding that nothing reads: only the columns decide a tile.
    tile = lambda i, j: vis[i * bq : min((i + 1) * bq, t), j * bk : (j + 1) * bk]
    p = _Plan(t, s, bq, bk, causal, 1.0, False, left=left, right=None if causal else right)
    case = (t, s, bq, bk, causal, left, right)

    def check(ranges, n, tile_at):  # masked [lo, a), unmasked [a, b), masked [b, end)
        lo, a, b, end = (int(x) for x in ranges)
        assert 0 <= lo <= a <= b <= end <= n, case
        assert not any(tile_at(x).any() for x in [*range(lo), *range(end, n)]), case
        assert all(tile_at(x).all() for x in range(a, b)), case  # unmasked: all visible
        # Exact: a masked tile is not wholly visible, and the first and last are seen.
        assert not any(tile_at(x).all() for x in [*range(lo, a), *range(b, end)]), case
        assert lo == end or (tile_at(lo).any() and tile_at(end - 1).any()), case
        return lo, a, b, end

    key_ranges = [check(_key_range(i, p), p.nk, partial(tile, i)) for i in range(p.nq)]
    query_ranges = [check(_query_range(j, p), p.nq, lambda i, j=j: tile(i, j)) for j in range(p.nk)]
    if p.diagonal_edges:  # each block's tiles that the causal mask crosses: the diagonal one
        diagonal = np.arange(bk)[None, :] <= np.arange(bq)[:, None]

        def one_diagonal_tile(lo, hi, tile_at):
            assert hi - lo <= 1, case
            if hi > lo:
                rows = tile_at(lo)
                np.testing.assert_array_equal(rows, diagonal[: len(rows)], str(case))

        for i, (_, _, b, end) in enumerate(key_ranges):
            one_diagonal_tile(b, end, partial(tile, i))
        for j, (start, a, _, _) in enumerate(query_ranges):
            one_diagonal_tile(start, a, lambda i, j=j: tile(i, j))


def test_block_ranges_are_exact():
    """Unmasked tiles are fully visible, skipped tiles fully hidden, and no tile is wasted:
    the unmasked range is as long as it can be and the visited range as short, for every
    length up to a few blocks (boundaries are where off-by-ones hide)."""
    sizes = itertools.product(range(1, 42, 4), range(1, 42, 5), (4, 8), (4, 8, 16), (True, False))
    for case in sizes:
        _check_block_ranges(*case)


def test_block_ranges_with_a_window_are_exact():
    """The same with sliding windows: causal ones (left only; left >= bq - 1 keeps the
    diagonal tiles' constant mask) and two-sided ones without causality."""
    sizes = itertools.product(range(1, 38, 6), range(1, 38, 9), (4, 8), (4, 8))
    for t, s, bq, bk in sizes:
        for left in (0, 3, 7, 12, 40):
            _check_block_ranges(t, s, bq, bk, True, left)
            for right in (None, 0, 9):
                _check_block_ranges(t, s, bq, bk, False, left, right)
        _check_block_ranges(t, s, bq, bk, False, None, 5)


def test_diagonal_tiles_are_computed_in_halves(np_rng):
    """Per head (the CPU layout) a diagonal 16 x 16 tile is two products, 8 x 8 and 8 x 16
    logits (16 x 8 transposed in the backward); the batched layout keeps whole tiles."""
    q, k, v = (normal(np_rng, 1, 32, 2, 4) for _ in range(3))

    def logit_shapes(batch_heads):
        f = partial(flash_attention, is_causal=True, block_q=16, block_k=16)
        f = partial(f, batch_heads=batch_heads)
        text = str(jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[1](a[0]))(q, k, v))
        # The last two dims of each product's result (the batched layout adds batch dims).
        return set(re.findall(r":f32\[(?:\d+,)*(\d+,\d+)\] = dot_general", text))

    assert {"8,8", "8,16", "16,8"} <= logit_shapes(False)
    assert "8,8" not in logit_shapes(True) and "16,16" in logit_shapes(True)


def test_half_rows_split_each_head_and_merge_back():
    x = np.arange(2 * 3 * 8 * 5).reshape(2, 3 * 8, 5)  # rows [G = 3, bq = 8] on axis 1
    first, second = (flash._half_rows(x, 3, which, axis=1) for which in (True, False))
    np.testing.assert_array_equal(first, x.reshape(2, 3, 8, 5)[:, :, :4].reshape(2, 12, 5))
    np.testing.assert_array_equal(second, x.reshape(2, 3, 8, 5)[:, :, 4:].reshape(2, 12, 5))
    np.testing.assert_array_equal(flash._merge_halves(first, second, 3, axis=1), x)


@pytest.mark.parametrize("side", ["q", "k"])
def test_one_heads_blocks_match_the_block_layout_and_write_back(side):
    # The per-head loop cuts a head's blocks out of [B, L, heads, D] itself; they must be
    # the block layout's (padding rows included), and writing them back must restore x.
    num_kv, length, d = 2, 11, 3  # 11 rows: the last block of 4 is padded
    heads = 3 * num_kv if side == "q" else num_kv
    plan = _Plan(t=length, s=length, bq=4, bk=4, causal=False, scale=1.0, batch_heads=False)
    x = jnp.arange(2 * length * heads * d, dtype=jnp.float32).reshape(2, length, heads, d)
    blocked = flash._blocks(x, side, num_kv, plan)
    out = jnp.zeros_like(x)
    for z in range(2 * num_kv):
        head = flash._head_blocks(x, side, jnp.int32(z), num_kv, plan)
        np.testing.assert_array_equal(head, blocked[z])
        out = flash._put_head(out, head, side, jnp.int32(z), num_kv)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(flash._unblock(blocked, side, x.shape), x)


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
def test_jit_vmap_check_grads(np_rng, batch_heads):
    q, k = normal(np_rng, 3, B, 9, N, H), normal(np_rng, 3, B, 7, 3, H)
    v = normal(np_rng, 3, B, 7, 3, H)
    mask = jnp.asarray(random_mask(np_rng, (B, 1, 9, 7)))
    kernel = partial(flash_attention, block_q=4, block_k=2, batch_heads=batch_heads)
    f = lambda q, k, v: kernel(q, k, v, mask=mask, is_causal=True)
    batched = jax.jit(jax.vmap(f))(q, k, v)
    for i in range(3):
        want, _ = np_attention_vjp(q[i], k[i], v[i], q[i], mask=mask, is_causal=True)
        np.testing.assert_allclose(batched[i], want, **TOL)
    small = (q[0, :1, :5, :2, :3], k[0, :1, :6, :1, :3], v[0, :1, :6, :1, :3])
    bias = normal(np_rng, 1, 2, 5, 6)
    g = jax.jit(
        lambda q, k, v, bias: flash_attention(
            q, k, v, bias=bias, is_causal=True, scale=0.7, block_q=2, block_k=4,
            batch_heads=batch_heads,
        )
    )  # fmt: skip
    check_grads(g, (*small, bias), order=1, modes=["rev"], eps=1e-2, atol=1e-2, rtol=1e-2)


def test_second_derivatives_forward_over_reverse_only(np_rng):
    """As documented: ``jax.hessian`` (forward over reverse) matches the einsum path, bias
    included; ``jax.grad`` of ``jax.grad`` is refused (the backward's loop bounds are traced)."""
    q, k, v = normal(np_rng, 1, 3, 2, 2), normal(np_rng, 1, 4, 1, 2), normal(np_rng, 1, 4, 1, 2)
    bias = normal(np_rng, 1, 2, 3, 4)

    def loss(impl):
        f = partial(dot_product_attention, k=k, v=v, is_causal=True, implementation=impl)
        return lambda q, bias: jnp.sum(jnp.sin(f(q, bias=bias)))

    # Jitted: op by op, the blockwise loops' Hessian dispatches thousands of small ops.
    got = jax.jit(jax.hessian(loss("blockwise"), argnums=(0, 1)))(q, bias)
    want = jax.jit(jax.hessian(loss("xla"), argnums=(0, 1)))(q, bias)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    grad_q = jax.grad(loss("blockwise"))
    with pytest.raises(ValueError, match="Reverse-mode differentiation"):
        jax.jit(jax.grad(lambda q: jnp.vdot(grad_q(q, bias), q)))(q)
    # Forward mode through the kernel itself is refused naming the kernel and the fix.
    with pytest.raises(TypeError, match=r"flash_attention .*jax\.jvp.*implementation='xla'"):
        jax.jvp(lambda q: loss("blockwise")(q, bias), (q,), (q,))

    # A traced scale (an operand of the kernel) has the same second derivatives, mixed
    # with q's, and its forward mode is refused the same way.
    def loss_scale(impl):
        f = partial(dot_product_attention, k=k, v=v, is_causal=True, implementation=impl)
        return lambda q, scale: jnp.sum(jnp.sin(f(q, scale=scale)))

    scale = jnp.float32(0.6)
    got = jax.jit(jax.hessian(loss_scale("blockwise"), argnums=(0, 1)))(q, scale)
    want = jax.jit(jax.hessian(loss_scale("xla"), argnums=(0, 1)))(q, scale)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, **GRAD_TOL)
    with pytest.raises(TypeError, match=r"flash_attention .*jax\.jvp.*implementation='xla'"):
        jax.jvp(lambda s: loss_scale("blockwise")(q, s), (scale,), (jnp.float32(1.0),))


def test_jit_when_eager_sees_a_tracer_passed_by_keyword(assert_inlined_when_traced):
    """A traced keyword argument is a trace too: the plain function runs (inlined), not a
    nested jit (the callers pass positions and key masks by keyword)."""
    from jaxattn.ops._checks import jit_when_eager

    def scaled(x, *, y):
        return x * y

    call, x = jit_when_eager(scaled), jnp.ones(2)  # (x concrete in both calls)
    assert_inlined_when_traced("scaled", lambda y: call(x, y=y), jnp.float32(2.0))


def test_forward_mode_hint_rewords_only_forward_modes_refusal():
    """Another TypeError raised inside a kernel is not turned into the forward-mode hint
    (which would blame jax.jvp for, say, a bad argument)."""
    from jaxattn.ops._checks import forward_mode_hint

    with pytest.raises(TypeError, match=r"^unsupported operand$"):
        with forward_mode_hint("kernel", "the fix"):
            raise TypeError("unsupported operand")
    with pytest.raises(TypeError, match=r"^kernel has a hand-written .*: the fix$"):
        with forward_mode_hint("kernel", "the fix"):
            raise TypeError("can't apply forward-mode autodiff (jvp) to a custom_vjp function.")


def test_bfloat16_inputs(np_rng):
    q, k, v = normal(np_rng, B, 37, N, H), normal(np_rng, B, 37, 3, H), normal(np_rng, B, 37, 3, H)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    f = lambda *a: flash_attention(*a, is_causal=True, block_q=16, block_k=16)
    cot = q.astype(jnp.bfloat16)
    out, grads = jax.jit(lambda *a: (f(*a), jax.vjp(f, *a)[1](cot)))(*low)
    assert out.dtype == jnp.bfloat16
    want, want_grads = np_attention_vjp(*low, cot, is_causal=True)
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)
    for got, ref in zip(grads, want_grads):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=5e-2, rtol=5e-2)


def _row_error(got, want):
    """Largest relative error of a row (last axis), over rows with >= 1% of the largest norm."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    norms = np.linalg.norm(want, axis=-1)
    big = norms >= 1e-2 * norms.max()
    return np.max(np.linalg.norm(got - want, axis=-1)[big] / norms[big])


def _low_precision_errors(q, k, v, cot, dtype, **kwargs):
    """Each kernel's (output, dq, dk, dv) row errors against float64 on the rounded inputs."""
    low = [x.astype(dtype) for x in (q, k, v, cot)]
    want, want_grads = np_attention_vjp(*low, **kwargs)
    errors = {}
    kernels = {
        "xla": partial(dot_product_attention, implementation="xla", **kwargs),
        "blockwise": partial(flash_attention, block_q=32, block_k=32, **kwargs),
    }
    for name, f in kernels.items():
        out, vjp = jax.vjp(f, *low[:3])
        grads = vjp(low[3])
        pairs = zip((out, *grads), (want, *want_grads))
        errors[name] = [_row_error(x.astype(jnp.float32), y) for x, y in pairs]
    return errors


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_gradients_of_peaked_attention_as_close_as_the_einsum_paths(np_rng, dtype):
    """The backward's delta = rowsum(dout * out) comes from the float32 output: from the
    output rounded to bfloat16 its error swamped ds = p (dp - delta) where a row's
    attention is nearly one-hot (here, at a logit standard deviation of about 9, bfloat16
    dq 0.24 against the einsum path's 0.027)."""
    q, k, v, cot = (normal(np_rng, 1, 256, 2, 64) for _ in range(4))
    errors = _low_precision_errors(3 * q, 3 * k, v, cot, dtype, is_causal=True)  # H = 64: exact 1/8
    for got, einsum in zip(errors["blockwise"], errors["xla"]):
        assert got <= 1.5 * einsum + 1e-3, errors


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_with_a_scale_that_is_not_a_power_of_two(np_rng, dtype):
    """At H = 128 the scale 1/sqrt(128) rounds in bfloat16: the kernel scales its float32
    logit tiles instead of q (q scaled in bfloat16 gave 3x the einsum path's output error
    here and 9x its dq error)."""
    q, k, v, cot = (normal(np_rng, 1, 64, 2, 128) for _ in range(4))
    errors = _low_precision_errors(2 * q, 2 * k, v, cot, dtype, is_causal=True)
    for got, einsum in zip(errors["blockwise"], errors["xla"]):
        assert got <= 1.5 * einsum + 1e-3, errors


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
@pytest.mark.parametrize(
    "name", ["causal", "causal_t>s_gqa3", "mask_bias_gqa3", "causal_bias_gqa3_split"]
)
def test_traced_scale_matches_numpy(np_rng, name, batch_heads):
    """A traced scale (a learned temperature) is an operand of the kernel: the output and
    the gradients of q, k, v, the bias and the scale itself (``sum(ds * q kᵀ)``) match
    the float64 reference, with empty rows, masks, a bias and split diagonal tiles."""
    (q, k, v, bias), kw, (bq, bk) = make_case(np_rng, name)
    cot = normal(np_rng, *q.shape)
    kw["scale"] = 0.37 if kw["scale"] is None else kw["scale"]
    kernel = partial(flash_attention, block_q=bq, block_k=bk, batch_heads=batch_heads)
    mask, is_causal = kw["mask"], kw["is_causal"]

    def run(q, k, v, bias, scale):
        f = lambda *a: kernel(*a[:3], bias=a[3], mask=mask, is_causal=is_causal, scale=a[4])
        out, vjp = jax.vjp(f, q, k, v, bias, scale)
        return out, vjp(cot)

    out, grads = jax.jit(run)(q, k, v, bias, jnp.float32(kw["scale"]))
    want, want_grads = np_attention_vjp(q, k, v, cot, bias=bias, **kw, with_dscale=True)
    assert_all_close(out, grads[:4], want, want_grads[:4])
    assert grads[4].dtype == jnp.float32
    np.testing.assert_allclose(grads[4], want_grads[4], rtol=1e-5)


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
@pytest.mark.parametrize("is_causal, scale", [(True, 128**-0.5), (False, 0.3)])
def test_traced_bfloat16_scale_is_as_accurate_as_a_python_one(
    np_rng, is_causal, scale, batch_heads
):
    """A traced scale multiplies the float32 logit tiles, as a Python scale that is not a
    power of two does. Folded into q and rounded to bfloat16 it gave here 1.8-3.4x the
    Python scale's error in the output and 2-6.5x in dq and dk (relative to the whole
    array; 5-24x in the worst row), and the scale's gradient 3-4% off (now 1e-6)."""
    q, k, v, cot = (2 * normal(np_rng, 1, 64, 4, 128) for _ in range(4))
    low = [x.astype(jnp.bfloat16) for x in (q, k[:, :, :2], v[:, :, :2], cot)]
    want, want_grads = np_attention_vjp(*low, is_causal=is_causal, scale=scale, with_dscale=True)
    kernel = partial(flash_attention, is_causal=is_causal, block_q=32, block_k=32)
    kernel = partial(kernel, batch_heads=batch_heads)

    def vjp_of_kernel(f, *args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(low[3])

    traced = partial(vjp_of_kernel, lambda q, k, v, s: kernel(q, k, v, scale=s))
    python = partial(vjp_of_kernel, lambda q, k, v: kernel(q, k, v, scale=scale))
    out, grads = jax.jit(traced)(*low[:3], jnp.float32(scale))
    out_python, grads_python = jax.jit(python)(*low[:3])
    assert out.dtype == grads[0].dtype == jnp.bfloat16 and grads[3].dtype == jnp.float32
    pairs = zip((out, *grads[:3]), (out_python, *grads_python), (want, *want_grads[:3]))
    for got, got_python, ref in pairs:
        error, error_python = (_row_error(x.astype(jnp.float32), ref) for x in (got, got_python))
        assert error <= 1.05 * error_python + 1e-6, (error, error_python)
    np.testing.assert_allclose(grads[3], want_grads[4], rtol=1e-4)


@pytest.mark.parametrize("batch_heads", [False, True], ids=["per_head", "batch_heads"])
def test_traced_scale_under_jit_vmap_and_grad(np_rng, batch_heads):
    """Per-example scales under ``vmap`` (a batched scale operand), including 0 (uniform
    attention: the scale's gradient divides by nothing) and a negative one; one scale
    shared across a ``vmap`` gets the sum of the examples' gradients."""
    q, cot = normal(np_rng, 3, 1, 9, 4, H), normal(np_rng, 3, 1, 9, 4, H)
    k, v = normal(np_rng, 3, 1, 7, 2, H), normal(np_rng, 3, 1, 7, 2, H)  # query rows 0, 1: empty
    kernel = partial(flash_attention, is_causal=True, block_q=4, block_k=2, batch_heads=batch_heads)
    loss = lambda q, k, v, scale, cot: jnp.sum(kernel(q, k, v, scale=scale) * cot)
    scales = jnp.asarray([0.0, 0.4, -1.3], jnp.float32)
    outs = jax.jit(jax.vmap(lambda q, k, v, s: kernel(q, k, v, scale=s)))(q, k, v, scales)
    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3))))(q, k, v, scales, cot)
    for i, scale in enumerate(scales.tolist()):
        want, want_grads = np_attention_vjp(
            q[i], k[i], v[i], cot[i], is_causal=True, scale=scale, with_dscale=True
        )
        np.testing.assert_allclose(outs[i], want, **TOL)
        for got, ref in zip(grads, (*want_grads[:3], want_grads[4])):
            np.testing.assert_allclose(got[i], ref, **GRAD_TOL)
    # A traced 0 computes what a Python 0 does.
    np.testing.assert_allclose(outs[0], kernel(q[0], k[0], v[0], scale=0.0), **TOL)

    def shared(scale):
        return jnp.sum(jax.vmap(partial(loss, scale=scale))(q, k, v, cot=cot))

    dscale = jax.jit(jax.grad(shared))(jnp.float32(0.4))
    want = sum(
        np_attention_vjp(q[i], k[i], v[i], cot[i], is_causal=True, scale=0.4, with_dscale=True)[1][
            4
        ]
        for i in range(3)
    )
    np.testing.assert_allclose(dscale, want, rtol=1e-5)


def test_backward_memory_is_linear_in_length():
    """XLA's temp buffers for fwd+bwd at T = S = 4096 stay far below one dense [T, S] matrix."""
    t, n, h = 4096, 2, 16
    x = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)

    def temp_bytes(attention):
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(attention(*a)), argnums=(0, 1, 2)))
        return grad.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

    causal = partial(dot_product_attention, is_causal=True)
    dense = 4 * n * t * t  # float32 [N, T, S] scores for one batch element: 128 MiB
    assert temp_bytes(partial(causal, implementation="xla")) >= dense  # materialises them
    assert temp_bytes(partial(causal, implementation="blockwise")) < dense / 16
    # Dropout keeps no mask: each tile's is rebuilt from its positions in the backward.
    dropout = {"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}
    assert temp_bytes(partial(causal, implementation="blockwise", **dropout)) < dense / 16
    # The accelerator layout keeps Z = 2 [512, 512] tiles per step (about 9 MiB in all):
    # still far below dense.
    assert temp_bytes(partial(flash_attention, is_causal=True, batch_heads=True)) < dense / 8


def test_batched_heads_do_not_copy_a_shared_bias_per_head():
    """A [1, N, T, S] bias is read by every batch element: with batch_heads it must stay
    one array, not become one copy per (batch, kv-head) pair (B times the bias)."""
    b, t, n, h = 8, 512, 4, 16
    q, k = (
        jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
        jax.ShapeDtypeStruct((b, t, 2, h), jnp.float32),
    )
    bias = jax.ShapeDtypeStruct((1, n, t, t), jnp.float32)  # 4 MiB

    def temp_bytes(batch_heads):
        f = partial(flash_attention, block_q=64, block_k=64, batch_heads=batch_heads)
        compiled = jax.jit(lambda q, k, v, bias: f(q, k, v, bias=bias)).lower(q, k, k, bias)
        return compiled.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < 2 * temp_bytes(False)
    # One copy per batch element alone would be B x 4 MiB = the dense scores (32 MiB).
    assert temp_bytes(True) < 4 * b * n * t * t / 2


def test_layout_and_block_defaults_follow_the_backend(np_rng, monkeypatch):
    plans = []
    original = flash._Plan

    def spy(*fields):
        plans.append(original(*fields))
        return plans[-1]

    monkeypatch.setattr(flash, "_Plan", spy)
    q, k = normal(np_rng, 1, 600, 2, 8), normal(np_rng, 1, 600, 2, 8)
    bias = jnp.zeros((600, 600))
    for backend, with_bias, batched, block in [
        ("cpu", False, False, DEFAULT_BLOCK),
        ("gpu", False, True, ACCELERATOR_BLOCK),
        ("tpu", False, True, ACCELERATOR_BLOCK),
        ("gpu", True, False, DEFAULT_BLOCK),  # a bias gradient loops over the heads anyway
    ]:
        monkeypatch.setattr(jax, "default_backend", lambda backend=backend: backend)
        assert default_batch_heads(with_bias) == batched
        flash_attention(q, k, k, bias=bias if with_bias else None, is_causal=True)
        assert (plans[-1].batch_heads, plans[-1].bq, plans[-1].bk) == (batched, block, block)
    monkeypatch.undo()
    assert block_sizes(4096, 4096) == (DEFAULT_BLOCK, DEFAULT_BLOCK)
    assert block_sizes(4096, 4096, batch_heads=True) == (ACCELERATOR_BLOCK, ACCELERATOR_BLOCK)
    assert block_sizes(100, 30, batch_heads=True) == (104, 32)  # the lengths rounded up to 8
    assert block_sizes(4096, 4096, 64, 128, batch_heads=True) == (64, 128)


def test_dot_product_attention_dispatches_to_blockwise(np_rng):
    (q, k, v, bias), kw, _ = make_case(np_rng, "mask_bias_gqa3")
    run = lambda impl: dot_product_attention(q, k, v, bias=bias, implementation=impl, **kw)
    got, want = jax.jit(lambda: (run("blockwise"), run("xla")))()
    np.testing.assert_allclose(got, want, **TOL)

    def blockwise_used(impl, *qkv):  # only the blockwise kernel has a custom_vjp
        f = partial(dot_product_attention, implementation=impl)
        return "custom_vjp" in str(jax.make_jaxpr(f)(*qkv))

    assert blockwise_used("blockwise", q, k, v) and not blockwise_used("xla", q, k, v)
    long = jax.ShapeDtypeStruct((1, attention._CPU_BLOCKWISE_MIN_LEN, 2, 8), jnp.float32)
    if jax.default_backend() == "cpu":
        assert blockwise_used(None, long, long, long) and not blockwise_used(None, q, k, v)


def test_select_implementation(monkeypatch):
    def pick(t, s, dtype=jnp.float32, h=64, k_heads=8, backend="cpu", dropout=0.0, **kw):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        q = jax.ShapeDtypeStruct((2, t, 8, h), dtype)
        k = jax.ShapeDtypeStruct((2, s, k_heads, h), dtype)
        kw = {"mask": None, "bias": None, "is_causal": True, **kw}
        return attention._select_implementation(
            q, k, k, kw["mask"], kw["bias"], kw["is_causal"], dropout
        )

    long = attention._CPU_BLOCKWISE_MIN_LEN
    assert pick(long, long) == "blockwise"
    assert pick(4 * long, 4 * long) == "blockwise"
    assert pick(long // 2, long // 2) == "xla"
    assert pick(1, 4 * long) == "xla"  # one decoding step: the dense row is small
    assert pick(4 * long, 4 * long, dropout=0.1) == "blockwise"  # the kernel drops too
    short = attention._CPU_BLOCKWISE_MIN_LEN_DROPOUT
    assert short < long  # the einsum path's dense mask: blockwise takes over sooner
    assert pick(short, short, dropout=0.1) == "blockwise" and pick(short, short) == "xla"
    assert pick(short // 2, short // 2, dropout=0.1) == "xla"
    gqa = attention._CPU_BLOCKWISE_MIN_LEN_GQA
    assert gqa < long  # the grouped einsum path is slower, so blockwise takes over sooner
    assert pick(gqa, gqa, k_heads=2) == "blockwise" and pick(gqa, gqa) == "xla"
    assert pick(gqa // 2, gqa // 2, k_heads=2) == "xla"
    assert pick(256, 256, jnp.bfloat16, backend="gpu") == "cudnn"
    assert pick(256, 256, jnp.bfloat16, backend="gpu", dropout=0.1) == "xla"  # cuDNN: none
    assert pick(16384, 16384, jnp.bfloat16, backend="gpu", dropout=0.1) == "blockwise"
    assert pick(256, 256, jnp.bfloat16, h=73, backend="gpu") == "xla"  # head dim not 8k
    assert pick(256, 256, backend="gpu") == "xla"  # float32: cuDNN's fused path is low precision
    assert pick(16384, 16384, backend="gpu") == "blockwise"  # dense scores would be 16 GiB
    assert pick(256, 256, backend="tpu") == ("pallas" if attention._pallas_importable() else "xla")
    if attention._pallas_importable():
        assert pick(256, 256, backend="tpu", k_heads=2) == "pallas"  # GQA: K/V heads repeated
    assert pick(256, 256, backend="tpu", dropout=0.1) == "xla"  # Pallas: no dropout
    assert pick(256, 384, backend="tpu") == "xla"  # causal needs T == S for Pallas


def test_select_implementation_respects_each_kernels_limits(monkeypatch):
    """The dense [B, N, T, S] float32 scores switch to blockwise above 1 GiB counting all N
    query heads (not the K key/value heads); cuDNN is not picked for head dims above 128 or
    a value head dim unlike the query's; Pallas is not picked for a bias, a mask that is not
    over keys alone, lengths outside whole 128-row blocks, a value head dim unlike the
    query's, or a head dim above 128 that is not a multiple of 128."""

    def pick(t, s, backend, dtype=jnp.float32, h=64, hv=None, k_heads=8, causal=False, **kw):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        q = jax.ShapeDtypeStruct((2, t, 8, h), dtype)
        k = jax.ShapeDtypeStruct((2, s, k_heads, h), dtype)
        v = jax.ShapeDtypeStruct((2, s, k_heads, h if hv is None else hv), dtype)
        mask, bias, window = kw.get("mask"), kw.get("bias"), kw.get("window")
        return attention._select_implementation(q, k, v, mask, bias, causal, 0.0, window)

    # 4 B N T S bytes: 2 * 8 * 4096^2 * 4 is exactly 1 GiB (kept dense), 8192^2 is 4 GiB.
    assert pick(4096, 4096, "gpu") == "xla"
    assert pick(8192, 8192, "gpu") == "blockwise"
    assert pick(8192, 8192, "gpu", k_heads=1) == "blockwise"  # MQA: still N score heads
    assert pick(8192, 8192, "tpu", k_heads=2, hv=32) == "blockwise"  # Hv != H: not Pallas
    if attention._pallas_importable():
        assert pick(8192, 8192, "tpu", k_heads=2) == "pallas"  # O(T) memory too
    bf16 = jnp.bfloat16
    assert pick(256, 256, "gpu", bf16, h=128) == "cudnn"
    assert pick(256, 256, "gpu", bf16, h=136) == "xla"  # a multiple of 8, but above 128
    assert pick(256, 256, "gpu", bf16, hv=32) == "xla"  # Hv != H
    if attention._pallas_importable():
        assert pick(256, 384, "tpu") == "pallas"  # non-causal: T != S is fine
    assert pick(256, 200, "tpu") == "xla"  # S not in whole 128-key blocks
    assert pick(200, 256, "tpu") == "xla"  # T not in whole 128-query blocks
    if attention._pallas_importable():  # a padding mask: the kernel's segment ids
        assert pick(256, 256, "tpu", mask=jnp.ones((2, 1, 1, 256), bool)) == "pallas"
        assert pick(256, 256, "tpu", mask=jnp.ones((1, 1, 1, 1), bool)) == "pallas"
    assert pick(256, 256, "tpu", mask=jnp.ones((2, 1, 256, 256), bool)) == "xla"
    assert pick(256, 256, "tpu", mask=jnp.ones((2, 8, 1, 256), bool)) == "xla"
    assert pick(256, 256, "tpu", bias=jnp.zeros((1, 8, 256, 256))) == "xla"
    assert pick(256, 256, "tpu", hv=32) == "xla"
    assert pick(256, 256, "tpu", h=192) == "xla"  # Pallas raises for H = 192 (not 128 k)
    if attention._pallas_importable():
        assert pick(256, 256, "tpu", h=256) == "pallas"
    # A window is a mask to cuDNN (even lengths) and none that Pallas takes.
    assert pick(256, 256, "gpu", bf16, window=(16, 0)) == "cudnn"
    assert pick(255, 255, "gpu", bf16, window=(16, 0)) == "xla"
    assert pick(256, 256, "tpu", window=(16, 0)) == "xla"
    assert pick(8192, 8192, "tpu", k_heads=2, window=(16, 0)) == "blockwise"


@pytest.mark.parametrize("scale", [0.2, None])
def test_pallas_tpu_kernel_in_interpret_mode(np_rng, monkeypatch, scale):
    """The TPU path's layout and arguments, run by Pallas' TPU interpreter on CPU.

    Forward only: its backward is Pallas' own, and interpreting it takes ~10 s here.
    ``scale=None`` must reach the kernel as ``1/sqrt(H)`` (Pallas' own default is 1).
    """
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    if not hasattr(pltpu, "force_tpu_interpret_mode"):
        pytest.skip("this jax has no Pallas TPU interpret mode")
    q, k, v = (normal(np_rng, 1, 128, 2, 64) for _ in range(3))
    want = dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pltpu.force_tpu_interpret_mode():
        got = dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="pallas")
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.slow  # interpreting the kernel's backward takes ~6 s a case here
@pytest.mark.parametrize("is_causal", [True, False])
def test_pallas_tpu_kernel_takes_gqa_and_padding_in_interpret_mode(np_rng, monkeypatch, is_causal):
    """Grouped key/value heads (repeated for the kernel) and a padding mask (its segment
    ids), outputs and gradients against the einsum path. Queries that see no key (all of
    batch 2; with ``is_causal`` also batch 0's first 100, before its left padding ends)
    output zeros, as ours do, where the kernel alone gives a mean of hidden values."""
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    if not hasattr(pltpu, "force_tpu_interpret_mode"):
        pytest.skip("this jax has no Pallas TPU interpret mode")
    t = 256
    q = normal(np_rng, 3, t, 4, 32)
    k, v = normal(np_rng, 3, t, 2, 32), normal(np_rng, 3, t, 2, 32)
    keys = np.arange(t)
    visible = np.stack([keys >= 100, keys < 200, keys < 0])  # left, right, all padding
    mask = jnp.asarray(visible)[:, None, None, :]  # [B, 1, 1, S]
    cotangent = normal(np_rng, 3, t, 4, 32)

    def out_and_grads(implementation):
        attend = lambda q, k, v: dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, implementation=implementation
        )
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(cotangent)

    want, want_grads = out_and_grads("xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    with pltpu.force_tpu_interpret_mode():
        got, got_grads = out_and_grads("pallas")
    np.testing.assert_allclose(got, want, **TOL)
    assert not np.any(got[2]) and (not is_causal or not np.any(got[0, :100]))
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(g, w, **GRAD_TOL, err_msg=f"d{name}")


def test_bad_inputs(np_rng):
    q, k = normal(np_rng, B, 5, N, H), normal(np_rng, B, 7, 2, H)
    with pytest.raises(ValueError, match="rank 4"):
        flash_attention(q[0], k, k)
    with pytest.raises(ValueError, match="N % K"):
        flash_attention(q, k[:, :, :1].repeat(4, axis=2), k[:, :, :1].repeat(4, axis=2))
    with pytest.raises(ValueError, match="boolean"):
        flash_attention(q, k, k, mask=jnp.ones((B, 1, 5, 7), jnp.float32))
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_attention(q, k, k, bias=jnp.zeros((B, 1, 5, 6)))
    with pytest.raises(ValueError, match=r"flash_attention: empty sequence"):
        flash_attention(q[:, :0], k, k)
    for block in (0, 2.5, True, jnp.int32(4) + jnp.zeros(2, jnp.int32)):
        with pytest.raises(ValueError, match=r"block_q and block_k must be ints >= 1"):
            flash_attention(q, k, k, block_q=block)
    with pytest.raises(ValueError, match=r"ints >= 1 \(or None\), got None, -1"):
        flash_attention(q, k, k, block_k=-1)
    # A concrete NumPy or JAX integer is a block size, as shapes take it.
    want = flash_attention(q, k, k, block_q=4)
    for block in (np.int64(4), jnp.int32(4)):
        np.testing.assert_array_equal(flash_attention(q, k, k, block_q=block), want)
    with pytest.raises(ValueError, match=r"flash_attention: dropout_rate=0.1 needs a dropout_rng"):
        flash_attention(q, k, k, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"flash_attention: dropout_rate must be in \[0, 1\)"):
        flash_attention(q, k, k, dropout_rate=1.0, dropout_rng=jax.random.key(0))
    with pytest.raises(ValueError, match="needs a TPU"):
        dot_product_attention(
            *(normal(np_rng, 1, 128, 2, 8) for _ in range(3)), implementation="pallas"
        )
    for window in (-1, (1,), (1, 2, 3), 1.5, True, (2, None), "4", (np.int32(-2), 1)):
        with pytest.raises(ValueError, match=r"flash_attention: local_window_size must be"):
            flash_attention(q, k, k, local_window_size=window)
        with pytest.raises(ValueError, match=r"dot_product_attention: local_window_size"):
            dot_product_attention(q, k, k, local_window_size=window)
    with pytest.raises(ValueError, match='"pallas" takes no local_window_size'):
        dot_product_attention(
            *(normal(np_rng, 1, 128, 2, 8) for _ in range(3)),
            implementation="pallas",
            local_window_size=16,
        )
    assert block_sizes(5, 1000) == (8, 512) and block_sizes(300, 300, 64, 32) == (64, 32)


@pytest.mark.parametrize("block, t, s", [(4, 11, 11), (8, 32, 32), (8, 24, 32)])
def test_a_causal_window_two_short_of_a_block_matches_xla_with_grads(block, t, s):
    """left = block_q - 2 is where the diagonal tile stops being the causal-only one
    (_Plan.diagonal_edges): a mutation test found no window test at that size, and an
    off-by-one there kept the forward right but gave dq, dk, dv wrong by O(1)."""
    gen = np.random.default_rng(0)
    q, k, v = (jnp.asarray(gen.normal(size=(1, n, 2, 8)), jnp.float32) for n in (t, s, s))
    options = dict(is_causal=True, local_window_size=block - 2)
    blockwise = partial(flash.flash_attention, block_q=block, block_k=block, **options)
    einsum = partial(dot_product_attention, implementation="xla", **options)
    np.testing.assert_allclose(blockwise(q, k, v), einsum(q, k, v), rtol=1e-5, atol=1e-5)

    def grads(attend):
        return jax.grad(lambda *qkv: jnp.sum(attend(*qkv) ** 2), argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads(blockwise), grads(einsum)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
