"""Tests for jaxattn.ops.attention against float64 NumPy, PyTorch and jax.nn."""

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxattn.ops.attention import (
    AdditiveWeights,
    MultiHeadAttentionWeights,
    _cudnn_bias,
    _select_implementation,
    additive_scores,
    attend,
    attention_weights,
    cached_attention,
    dot_product_attention,
    dot_scores,
    from_head_rows,
    general_scores,
    head_rows,
    init_additive,
    init_general,
    init_multi_head_attention,
    multi_head_attention,
    project_output,
    project_qkv,
    write_kv_cache,
)
from jaxattn.ops.flash import flash_attention
from jaxattn.ops.masks import attention_dropout_mask, dropout_seed

B, T, S, N, H = 2, 5, 7, 6, 4
TOL = {"rtol": 1e-4, "atol": 1e-5}
GRADS = {"order": 1, "modes": ["rev"], "eps": 1e-2, "atol": 1e-2, "rtol": 1e-2}  # check_grads


def normal(np_rng, *shape, scale=1.0):
    return jnp.asarray(scale * np_rng.standard_normal(shape), jnp.float32)


def f64(x):
    return np.asarray(x, np.float64)


def np_causal(t, s):
    """Query i is at key position i + s - t and sees positions up to it."""
    return np.array([[j <= i + (s - t) for j in range(s)] for i in range(t)])


def np_masked_softmax_rows(logits, allowed):
    """Softmax of each row over its allowed entries; rows with none allowed are zero."""
    probs = np.zeros_like(logits)
    for t in range(logits.shape[0]):
        m = allowed[t]
        if m.any():
            e = np.exp(logits[t, m] - logits[t, m].max())
            probs[t, m] = e / e.sum()
    return probs


def np_attention(q, k, v, mask=None, bias=None, is_causal=False, scale=None):
    """Float64 loop over batch and heads; query head n reads kv head n // (N // K)."""
    q, k, v = f64(q), f64(k), f64(v)
    b_, t_, n_, h_ = q.shape
    s_, k_ = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h_) if scale is None else scale
    allowed = np.ones((b_, n_, t_, s_), bool)
    if mask is not None:
        allowed = allowed & np.asarray(mask)
    if is_causal:
        allowed = allowed & np_causal(t_, s_)
    bias = np.zeros((b_, n_, t_, s_)) if bias is None else np.broadcast_to(f64(bias), allowed.shape)
    out = np.zeros((b_, t_, n_, v.shape[-1]))
    probs = np.zeros((b_, n_, t_, s_))
    for b in range(b_):
        for n in range(n_):
            j = n // (n_ // k_)
            logits = scale * q[b, :, n] @ k[b, :, j].T + bias[b, n]
            probs[b, n] = np_masked_softmax_rows(logits, allowed[b, n])
            out[b, :, n] = probs[b, n] @ v[b, :, j]
    return out, probs


def qkv(np_rng, k_heads, t=T, s=S, h=H, n=N, b=B):
    return (
        normal(np_rng, b, t, n, h),
        normal(np_rng, b, s, k_heads, h),
        normal(np_rng, b, s, k_heads, h),
    )


def random_mask(np_rng, shape):
    """A random boolean mask whose every row keeps key 0 (torch gives NaN on empty rows)."""
    mask = np_rng.random(shape) > 0.4
    mask[..., 0] = True
    return mask


# ------------------------------------------------------------------ seq2seq scores


def test_dot_general_additive_scores_match_numpy(rng, np_rng):
    tq, tk, dq, dk, d = 3, 7, 5, 11, 13
    query, keys, keys5 = (
        normal(np_rng, 2, tq, dq),
        normal(np_rng, 2, tk, dk),
        normal(np_rng, 2, tk, dq),
    )
    want = np.einsum("bqd,bkd->bqk", f64(query), f64(keys5))
    np.testing.assert_allclose(dot_scores(query, keys5), want, **TOL)
    np.testing.assert_allclose(dot_scores(query, keys5, scale=0.3), 0.3 * want, **TOL)

    w = init_general(rng, dq, dk)
    assert w.shape == (dq, dk)
    want = np.array([f64(query[b]) @ f64(w) @ f64(keys[b]).T for b in range(2)])
    np.testing.assert_allclose(general_scores(w, query, keys), want, **TOL)

    aw = init_additive(rng, dq, dk, d)
    assert isinstance(aw, AdditiveWeights)
    assert (aw.w_query.shape, aw.w_key.shape, aw.v.shape) == ((dq, d), (dk, d), (d,))
    want = np.zeros((2, tq, tk))
    for b in range(2):
        for i in range(tq):
            for j in range(tk):
                hidden = np.tanh(
                    f64(query[b, i]) @ f64(aw.w_query) + f64(keys[b, j]) @ f64(aw.w_key)
                )
                want[b, i, j] = hidden @ f64(aw.v)
    np.testing.assert_allclose(additive_scores(aw, query, keys), want, **TOL)


def test_attend_matches_numpy_and_weights_sum_to_one(np_rng):
    tq, tk, dv = 3, 7, 11
    scores, values = normal(np_rng, 2, tq, tk), normal(np_rng, 2, tk, dv)
    mask = np_rng.random((2, 1, tk)) > 0.4
    mask[1] = False  # batch 1 has no keys at all
    mask[0, 0, 2] = True
    context, weights = attend(scores, values, jnp.asarray(mask))
    assert context.shape == (2, tq, dv) and weights.shape == (2, tq, tk)
    want_w = np.stack(
        [np_masked_softmax_rows(f64(scores[b]), np.repeat(mask[b], tq, 0)) for b in range(2)]
    )
    np.testing.assert_allclose(weights, want_w, **TOL)
    np.testing.assert_allclose(context, want_w @ f64(values), **TOL)
    np.testing.assert_allclose(np.sum(weights[0], -1), np.ones(tq), rtol=1e-6)
    assert np.all(np.asarray(weights)[0][:, ~mask[0, 0]] == 0)
    assert np.all(np.asarray(context)[1] == 0)


def test_attend_returns_the_context_in_the_values_dtype(np_rng):
    # The weights are float32; a bfloat16 model must get a bfloat16 context back.
    scores = normal(np_rng, 2, 3, 7)
    values = normal(np_rng, 2, 7, 4).astype(jnp.bfloat16)
    context, weights = attend(scores, values)
    assert context.dtype == jnp.bfloat16 and weights.dtype == jnp.float32
    np.testing.assert_allclose(f64(context), f64(weights) @ f64(values), rtol=2e-2, atol=2e-2)


def test_attend_names_itself_for_a_bad_mask(np_rng):
    scores, values = normal(np_rng, 2, 3, 7), normal(np_rng, 2, 7, 4)
    with pytest.raises(ValueError, match=r"^attend: mask must be boolean, got dtype float32"):
        attend(scores, values, jnp.ones((2, 3, 7)))
    with pytest.raises(ValueError, match=r"^attend: mask \(2, 3, 6\) does not broadcast to "):
        attend(scores, values, jnp.ones((2, 3, 6), bool))


def test_seq2seq_scores_jit_vmap_grad(np_rng):
    query, keys, values = normal(np_rng, 3, 5), normal(np_rng, 7, 11), normal(np_rng, 7, 2)
    aw = AdditiveWeights(normal(np_rng, 5, 3), normal(np_rng, 11, 3), normal(np_rng, 3))
    w = normal(np_rng, 5, 11, scale=0.3)

    def f(aw, w, query, keys, values):
        c1, _ = attend(additive_scores(aw, query, keys), values)
        c2, _ = attend(general_scores(w, query, keys), values)
        return c1 + c2

    jitted = jax.jit(f)
    eager = f(aw, w, query, keys, values)
    np.testing.assert_allclose(jitted(aw, w, query, keys, values), eager, **TOL)
    batched = jax.vmap(f, in_axes=(None, None, 0, 0, 0))(
        aw, w, jnp.stack([query, 2 * query]), jnp.stack([keys, keys]), jnp.stack([values, values])
    )
    np.testing.assert_allclose(batched[0], eager, **TOL)
    np.testing.assert_allclose(batched[1], jitted(aw, w, 2 * query, keys, values), **TOL)
    check_grads(jitted, (aw, w, query, keys, values), **GRADS)


def test_seq2seq_bad_inputs():
    with pytest.raises(ValueError, match=r"\(3, 5\).*\(7, 11\)"):
        dot_scores(jnp.zeros((3, 5)), jnp.zeros((7, 11)))
    with pytest.raises(ValueError, match=r"\(11, 5\)"):
        general_scores(jnp.zeros((11, 5)), jnp.zeros((3, 5)), jnp.zeros((7, 11)))
    with pytest.raises(ValueError, match="rank"):
        dot_scores(jnp.zeros((5,)), jnp.zeros((7, 5)))
    with pytest.raises(ValueError, match=r"\(3, 7\).*\(6, 2\)"):
        attend(jnp.zeros((3, 7)), jnp.zeros((6, 2)))
    # Integer values: the probabilities, cast to their dtype, truncated to 0.
    with pytest.raises(ValueError, match=r"attend: values must be floating.*int32"):
        attend(jnp.zeros((3, 7)), jnp.arange(14).reshape(7, 2))
    additive = partial(additive_scores, init_additive(jax.random.key(0), 5, 5, 4))
    for scores in (dot_scores, additive):
        with pytest.raises(ValueError, match=r"leading axes of query \(2, 3, 5\) and keys"):
            scores(jnp.zeros((2, 3, 5)), jnp.zeros((4, 7, 5)))  # was einsum's / add's message
    aw = AdditiveWeights(jnp.zeros((5, 3)), jnp.zeros((11, 2)), jnp.zeros((3,)))
    with pytest.raises(ValueError, match=r"\(11, 2\)"):
        additive_scores(aw, jnp.zeros((3, 5)), jnp.zeros((7, 11)))


# ------------------------------------------------------------------ dot_product_attention

CASES = {  # name: (make_case kwargs); t=3 < S puts the queries last in the causal cases
    "mha": dict(k_heads=6),
    "gqa2_mask": dict(k_heads=2, mask=(B, 1, T, S), t=3),
    "gqa3_headmask": dict(k_heads=3, mask=(B, N, T, S)),
    "mqa_causal": dict(k_heads=1, is_causal=True, t=3),
    "gqa3_causal_mask_scale": dict(k_heads=3, is_causal=True, mask=(1, N, 1, S), scale=0.37),
    "gqa2_bias": dict(k_heads=2, bias=(B, N, T, S), mask=(B, 1, 1, S)),
    "mha_bias_bcast_causal": dict(k_heads=6, bias=(1, N, 1, S), is_causal=True, t=3),
}


def make_case(np_rng, k_heads, mask=None, bias=None, is_causal=False, scale=None, t=T, s=S):
    q, k, v = qkv(np_rng, k_heads, t=t, s=s)
    kwargs = dict(is_causal=is_causal, scale=scale)
    fit = lambda shape: (*shape[:2], t if shape[2] == T else 1, s if shape[3] == S else 1)
    kwargs["mask"] = None if mask is None else jnp.asarray(random_mask(np_rng, fit(mask)))
    kwargs["bias"] = None if bias is None else normal(np_rng, *fit(bias))
    return q, k, v, kwargs


@pytest.mark.parametrize("name", list(CASES))
def test_dot_product_attention_matches_numpy(np_rng, name):
    q, k, v, kw = make_case(np_rng, **CASES[name])
    t = q.shape[1]
    out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, **kw))(q, k, v)
    want, want_p = np_attention(q, k, v, **kw)
    assert out.shape == (B, t, N, H) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, **TOL)
    probs = jax.jit(lambda q, k: attention_weights(q, k, **kw))(q, k)
    np.testing.assert_allclose(probs, want_p, **TOL)
    np.testing.assert_allclose(np.sum(probs, -1), np.ones((B, N, t)), rtol=1e-5)


def torch_sdpa(q, k, v, cotangent, *, mask=None, is_causal=False, scale=None, gqa="enable"):
    """Torch SDPA in float64 on [B, N, T, H] tensors; returns (out, (dq, dk, dv)) in our layout."""
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.tensor(f64(a).transpose(0, 2, 1, 3), requires_grad=True) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    kwargs = {}
    kk, vv = tk, tv
    if group > 1 and gqa == "enable":
        kwargs["enable_gqa"] = True
    elif group > 1:  # repeat_interleave: kv head j serves query heads j*G .. j*G + G-1
        kk, vv = tk.repeat_interleave(group, dim=1), tv.repeat_interleave(group, dim=1)
    attn_mask = None if mask is None else torch.tensor(np.asarray(mask))
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, kk, vv, attn_mask=attn_mask, is_causal=is_causal, scale=scale, **kwargs
    )
    out.backward(torch.tensor(f64(cotangent).transpose(0, 2, 1, 3)))
    back = lambda x: x.detach().numpy().transpose(0, 2, 1, 3)
    return back(out), (back(tq.grad), back(tk.grad), back(tv.grad))


@pytest.mark.parametrize(
    "k_heads, t, mask, is_causal, scale, gqa",
    [
        (6, T, None, False, None, "enable"),
        (2, T, (B, N, T, S), False, 0.29, "enable"),
        (3, T, None, True, None, "repeat"),  # torch's is_causal is top-left: needs T == S
        (1, 3, (B, 1, 1, S), "mask", 0.5, "enable"),  # bottom-right causal via an explicit mask
        (2, 3, (B, N, 3, S), False, None, "repeat"),
    ],
)
def test_dot_product_attention_matches_torch_with_grads(
    np_rng, k_heads, t, mask, is_causal, scale, gqa
):
    s = S if t != T or not is_causal else T
    q, k, v = qkv(np_rng, k_heads, t=t, s=s)
    mask = None if mask is None else random_mask(np_rng, mask)
    ours_causal = is_causal is not False
    torch_mask = mask
    if is_causal == "mask":
        torch_mask = np.broadcast_to(mask, (B, N, t, s)) & np_causal(t, s)
        mask = torch_mask  # key 0 is kept, so no row is empty (torch would give NaN)
    cot = normal(np_rng, B, t, N, H)

    def f(q, k, v):
        m = None if mask is None else jnp.asarray(mask)
        return dot_product_attention(q, k, v, mask=m, is_causal=ours_causal, scale=scale)

    out, vjp = jax.vjp(jax.jit(f), q, k, v)
    grads = vjp(cot)
    want, want_grads = torch_sdpa(
        q, k, v, cot, mask=torch_mask, is_causal=is_causal is True, scale=scale, gqa=gqa
    )
    np.testing.assert_allclose(out, want, **TOL)
    for got_g, want_g in zip(grads, want_grads):
        np.testing.assert_allclose(got_g, want_g, **TOL)


def test_gqa_head_mapping_is_n_div_group(np_rng):
    # Make kv head j's values the constant j: output head n must then equal n // (N // K).
    k_heads = 3
    q, k, _ = qkv(np_rng, k_heads)
    v = jnp.broadcast_to(
        jnp.arange(k_heads, dtype=jnp.float32)[None, None, :, None], (B, S, k_heads, H)
    )
    out = dot_product_attention(q, k, v)
    want = (np.arange(N) // (N // k_heads)).astype(np.float32)
    np.testing.assert_allclose(
        out, np.broadcast_to(want[None, None, :, None], out.shape), atol=1e-6
    )


@pytest.mark.parametrize("name", ["gqa3_headmask", "mqa_causal", "gqa2_bias"])
def test_dot_product_attention_matches_jax_nn(np_rng, name):
    # jax.nn's causal mask is top-left aligned, so compare with T == S only.
    q, k, v, kw = make_case(np_rng, **{**CASES[name], "t": S})

    @jax.jit
    def both(q, k, v):
        theirs = jax.nn.dot_product_attention(
            q, k, v, kw["bias"], kw["mask"], is_causal=kw["is_causal"], scale=kw["scale"]
        )
        return dot_product_attention(q, k, v, **kw), theirs

    ours, theirs = both(q, k, v)
    np.testing.assert_allclose(ours, theirs, **TOL)


def test_fully_masked_rows_give_zeros_and_finite_grads(np_rng):
    q, k, v = qkv(np_rng, 2, t=5, s=7)
    mask = random_mask(np_rng, (B, N, 5, 7))
    mask[0, :, 1] = False  # query 1 of batch 0 sees nothing in any head
    mask[1, 4, 3] = False  # one head of one query
    mask = jnp.asarray(mask)
    out = dot_product_attention(q, k, v, mask=mask)
    want, _ = np_attention(q, k, v, mask=np.asarray(mask))
    np.testing.assert_allclose(out, want, **TOL)
    assert np.all(np.asarray(out)[0, 1] == 0) and np.all(np.asarray(out)[1, 3, 4] == 0)
    assert np.all(np.asarray(attention_weights(q, k, mask=mask))[0, :, 1] == 0)

    f = lambda q, k, v: dot_product_attention(q, k, v, mask=mask)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[0])[0, 1] == 0) and np.all(np.asarray(grads[0])[1, 3, 4] == 0)
    # Finite differences also agree with the gradients around the empty rows.
    small = (q[:1, :3, :2, :3], k[:1, :4, :1, :3], v[:1, :4, :1, :3])
    small_mask = mask[:1, :2, :3, :4].at[0, :, 1].set(False)
    g = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask=small_mask))
    check_grads(g, small, **GRADS)


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_float32_min_bias_with_a_mask_attends_to_the_visible_keys(np_rng, implementation):
    """A Hugging Face style bias of finfo.min on a row plus the causal mask: the row still
    averages its visible keys, in every kernel (a finite mask fill once zeroed it)."""
    q, k, v = qkv(np_rng, N, t=5, s=5)
    bias = np.zeros((1, 1, 5, 5), np.float32)
    bias[..., 1, :] = np.finfo(np.float32).min
    out = dot_product_attention(q, k, v, bias=bias, is_causal=True, implementation=implementation)
    want, _ = np_attention(q, k, v, bias=bias, is_causal=True)
    np.testing.assert_allclose(out, want, **TOL)
    np.testing.assert_allclose(np.asarray(out)[:, 1], np.asarray(v)[:, :2].mean(1), **TOL)


@pytest.mark.parametrize("t, s", [(5, 5), (3, 7)])
def test_causality_via_grad(np_rng, t, s):
    q, k, v = qkv(np_rng, 2, t=t, s=s)

    def dependence(wrt):
        f = lambda x: dot_product_attention(q, *((x, v) if wrt == 0 else (k, x)), is_causal=True)
        jac = jax.jit(jax.jacrev(f))(k if wrt == 0 else v)  # [B, t, N, H, B, s, K, H]
        return np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))  # [t, s]

    for wrt in (0, 1):
        dep = dependence(wrt)
        allowed = np_causal(t, s)
        assert np.all(dep[~allowed] == 0), "output at t depends on a future key"
        # A query with a single visible key puts weight 1 there whatever the key: skip k.
        informative = allowed & (allowed.sum(1, keepdims=True) > 1) if wrt == 0 else allowed
        assert np.all(dep[informative] > 0)


def test_jit_vmap_check_grads(np_rng):
    q, k, v, kw = make_case(np_rng, k_heads=2, mask=(B, 1, T, S), bias=(1, N, T, S), is_causal=True)
    f = lambda q, k, v: dot_product_attention(q, k, v, **kw)
    eager = f(q, k, v)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), eager, **TOL)
    stacked = [jnp.stack([x, -x, 0.5 * x]) for x in (q, k, v)]
    batched = jax.vmap(f)(*stacked)
    for i in range(3):
        np.testing.assert_allclose(batched[i], f(*(x[i] for x in stacked)), **TOL)
    small = (q[:1, :3, :2, :3], k[:1, :5, :1, :3], v[:1, :5, :1, :3])
    g = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, is_causal=True, scale=0.7))
    check_grads(g, small, **GRADS)


def test_bfloat16_inputs(np_rng):
    q, k, v = qkv(np_rng, 3)
    out = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), is_causal=True)
    assert out.dtype == jnp.bfloat16
    want, _ = np_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kv_heads", [N, 3])  # multi-head and grouped-query einsums
def test_bfloat16_inputs_keep_float32_logits_and_softmax(np_rng, kv_heads):
    """The probabilities of bf16 q and k match float64 on the same bf16-rounded inputs to
    float32 precision; logits rounded to bf16 before the softmax would be off by ~4e-3."""
    q, k, _ = (x.astype(jnp.bfloat16) for x in qkv(np_rng, kv_heads))
    probs = np.asarray(attention_weights(q, k, scale=1.0))  # [B, N, T, S], scale 1: logits ~8
    assert probs.dtype == np.float32
    qf, kf = (np.asarray(x, np.float64) for x in (q, k))
    logits = np.einsum("btnh,bsnh->bnts", qf, np.repeat(kf, N // kv_heads, axis=2))
    want = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(probs, want / want.sum(-1, keepdims=True), atol=1e-6, rtol=0)


def test_float64_inputs_compute_in_float64(np_rng):
    """With jax_enable_x64, float64 inputs get float64 logits and softmax (float32 would
    leave a 1e-7 error, too coarse for a float64 gradient check)."""
    q, k, v = (f64(a) for a in qkv(np_rng, 2))
    mask, bias = random_mask(np_rng, (B, 1, T, S)), f64(normal(np_rng, 1, N, T, S))
    scores, values = f64(normal(np_rng, 2, 3, 7)), f64(normal(np_rng, 2, 7, 4))
    with jax.enable_x64(True):
        args = [jnp.asarray(a) for a in (q, k, v)]
        kw = {"mask": jnp.asarray(mask), "bias": jnp.asarray(bias), "is_causal": True}
        out = dot_product_attention(*args, implementation="xla", **kw)
        probs = attention_weights(args[0], args[1], **kw)
        context, weights = attend(jnp.asarray(scores), jnp.asarray(values))
    assert out.dtype == probs.dtype == context.dtype == weights.dtype == jnp.float64
    want, want_probs = np_attention(q, k, v, mask, bias, is_causal=True)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(probs, want_probs, rtol=1e-12, atol=1e-13)
    want_w = np.stack([np_masked_softmax_rows(s, np.ones(s.shape, bool)) for s in scores])
    np.testing.assert_allclose(weights, want_w, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(context, want_w @ values, rtol=1e-12, atol=1e-13)


def test_attention_dropout(rng, np_rng):
    # With v the identity over keys (Hv = S), each output row IS the dropped probability row.
    rate = 0.4
    q, k, _ = qkv(np_rng, 2)
    v = jnp.broadcast_to(jnp.eye(S, dtype=jnp.float32)[None, :, None, :], (B, S, 2, S))
    probs = np.asarray(attention_weights(q, k)).transpose(0, 2, 1, 3)  # [B, T, N, S]
    out = np.asarray(dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=rng))
    kept = out != 0
    np.testing.assert_allclose(out[kept], probs[kept] / (1 - rate), rtol=1e-5)
    assert 0.2 < 1 - kept.mean() < 0.6
    # The dropped entries are the position hash's, which the blockwise kernel draws too.
    mask = attention_dropout_mask(dropout_seed(rng), (B, q.shape[2], T, S), rate)
    np.testing.assert_array_equal(kept, np.asarray(mask).transpose(0, 2, 1, 3))
    again = dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=rng)
    np.testing.assert_array_equal(out, again)
    # A NumPy or JAX scalar is the same rate (0.375: exact in float32).
    exact = dot_product_attention(q, k, v, dropout_rate=0.375, dropout_rng=rng)
    for scalar in (np.float32(0.375), jnp.float32(0.375)):
        got = dot_product_attention(q, k, v, dropout_rate=scalar, dropout_rng=rng)
        np.testing.assert_array_equal(got, exact)
    with pytest.raises(ValueError, match="rng"):
        dot_product_attention(q, k, v, dropout_rate=rate)


@pytest.mark.parametrize(
    ("scale", "match"),
    [
        (jnp.ones((7,)), r"scale must be a real scalar.*shape \(7,\)"),  # per key on one path
        ([0.5], r"scale must be a real scalar.*list of shape \(1,\)"),  # (warned from jnp.ndim)
        (float("nan"), "scale must be finite, got nan"),
        (float("inf"), "scale must be finite, got inf"),
        ("0.5", "scale must be a real scalar"),
        (True, "scale must be a real scalar"),
        (jnp.complex64(1.0), "scale must be a real number, got dtype complex64"),
    ],
)
def test_a_scale_that_is_not_a_finite_real_scalar_is_refused(np_rng, scale, match):
    q, k, v = qkv(np_rng, 2)
    for implementation in ("xla", "blockwise"):
        with pytest.raises(ValueError, match=f"dot_product_attention: {match}"):
            dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    with pytest.raises(ValueError, match=f"attention_weights: {match}"):
        attention_weights(q, k, scale=scale)
    with pytest.raises(ValueError, match=f"flash_attention: {match}"):
        flash_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("rate", [None, "0.1"])
def test_a_dropout_rate_that_is_not_a_number_is_named_by_every_implementation(np_rng, rate):
    """The automatic choice compared the rate with 0 before it was checked: a TypeError
    naming nothing."""
    q, k, v = qkv(np_rng, 2)
    match = rf"dot_product_attention: dropout_rate must be in \[0, 1\), got {rate!r}"
    for implementation in (None, "xla", "blockwise"):
        with pytest.raises(ValueError, match=match):
            dot_product_attention(q, k, v, dropout_rate=rate, implementation=implementation)


def test_a_traced_dropout_rate_is_named_as_traced_by_every_implementation(np_rng, rng):
    """0.5 is in range: it was refused as "must be in [0, 1), got JitTracer(...)"."""
    q, k, v = qkv(np_rng, 2)
    match = "dot_product_attention: dropout_rate must be a concrete number, got a traced value"
    for implementation in (None, "xla", "blockwise"):
        attend = lambda rate, impl=implementation: dot_product_attention(
            q, k, v, dropout_rate=rate, dropout_rng=rng, implementation=impl
        )
        with pytest.raises(ValueError, match=match):
            jax.jit(attend)(0.5)


def test_dot_product_attention_bad_inputs(np_rng):
    q, k, v = qkv(np_rng, 2)
    with pytest.raises(ValueError, match=r"rank 4.*\(5, 6, 4\)"):
        dot_product_attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"\(2, 5, 6, 4\).*\(1, 7, 2, 4\)"):
        dot_product_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match=r"\(2, 7, 2, 3\)"):
        dot_product_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"N=6.*K=4"):
        dot_product_attention(q, *qkv(np_rng, 4)[1:])
    with pytest.raises(ValueError, match=r"\(2, 6, 5, 6\).*\(2, 6, 5, 7\)"):
        dot_product_attention(q, k, v, mask=jnp.ones((B, N, T, S - 1), bool))
    with pytest.raises(ValueError, match=r"\(3, 1, 1, 7\)"):
        dot_product_attention(q, k, v, mask=jnp.ones((3, 1, 1, S), bool))
    with pytest.raises(ValueError, match="boolean"):
        dot_product_attention(q, k, v, mask=jnp.ones((B, N, T, S), jnp.float32))
    with pytest.raises(ValueError, match=r"bias.*\(2, 6, 4, 7\)"):
        dot_product_attention(q, k, v, bias=jnp.ones((B, N, 4, S)))
    with pytest.raises(ValueError, match="dtypes"):
        dot_product_attention(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match=r"floating point, got int32"):
        dot_product_attention(*(x.astype(jnp.int32) for x in (q, k, v)))
    with pytest.raises(ValueError, match=r"dot_product_attention: empty sequence"):
        dot_product_attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=r"dot_product_attention: no query heads or an empty"):
        dot_product_attention(q[..., :0], k[..., :0], v)  # H = 0
    with pytest.raises(ValueError, match=r"dot_product_attention: no query heads or an empty"):
        dot_product_attention(q[:, :, :0], k, v)  # N = 0
    # B = 0 (GQA: a reshape with -1) and Hv = 0 (blockwise) crashed inside the kernels.
    for impl in ("xla", "blockwise"):
        with pytest.raises(ValueError, match=r"dot_product_attention: empty batch or value"):
            dot_product_attention(q[:0], k[:0, :, :2], v[:0, :, :2], implementation=impl)
        with pytest.raises(ValueError, match=r"dot_product_attention: empty batch or value"):
            dot_product_attention(q, k, v[..., :0], implementation=impl)
    with pytest.raises(ValueError, match="unknown implementation"):
        dot_product_attention(q, k, v, implementation="flash")
    for fn in (dot_product_attention, flash_attention):  # (JAX's error named neither)
        name = fn.__name__
        with pytest.raises(ValueError, match=rf"^{name}: k must be an array \[B, T\|S, heads"):
            fn(q, None, v)
    # (a list failed as "unhashable type: 'list'")
    with pytest.raises(ValueError, match=r"unknown implementation \['xla'\]; expected None"):
        dot_product_attention(q, k, v, implementation=["xla"])
    with pytest.raises(ValueError, match="dropout"):
        dot_product_attention(
            q, k, v, implementation="cudnn", dropout_rate=0.1, dropout_rng=jax.random.key(0)
        )


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off GPU")
def test_cudnn_off_gpu_raises(np_rng):
    with pytest.raises(ValueError, match=r"cudnn.*GPU"):
        dot_product_attention(*qkv(np_rng, 2), implementation="cudnn")


@pytest.mark.parametrize("implementation, t", [("blockwise", 13), (None, 384)])
def test_traced_scale_matches_xla_with_gradients(np_rng, implementation, t):
    """A learned temperature: the scale is traced under grad. The blockwise kernel takes it
    as an array operand (cuDNN and Pallas, which take a Python scale, get it folded into
    q); values and gradients (also the scale's) match the einsum path. At T = 384
    ``implementation=None`` picks blockwise on CPU."""
    q, k, v = qkv(np_rng, 1, t=t, s=t, h=8, n=2, b=1)

    def loss(q, scale, implementation):
        out = dot_product_attention(
            q, k, v, is_causal=True, scale=scale, implementation=implementation
        )
        return jnp.sum(out * jnp.cos(out))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    (value, (dq, dscale)) = grad(q, jnp.float32(0.3), implementation)
    (value_ref, (dq_ref, dscale_ref)) = grad(q, jnp.float32(0.3), "xla")
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    np.testing.assert_allclose(dq, dq_ref, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(dscale, dscale_ref, rtol=1e-4)
    assert abs(float(dscale)) > 0  # the scale does get a gradient


def test_traced_scale_bfloat16_gradient(np_rng):
    """A traced scale with bfloat16 inputs: the scale's gradient (a sum over every logit)
    is not summed in bfloat16. It was 2% off (1712 against 1745 here); the einsum path is
    within 0.1%, and the blockwise kernel, which sums ``ds (q kᵀ - mean)`` in float32 over
    its tiles, within 5e-5 (the cotangent's rounding to bfloat16; folded into q in float32
    the scale's gradient was 0.26% off)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(np_rng, 4, t=64, s=64, h=128, n=4, b=2))
    dout = jnp.asarray(np_rng.standard_normal(q.shape), jnp.float32)

    def dscale(q, k, v, implementation):
        def loss(scale):
            out = dot_product_attention(
                q, k, v, is_causal=True, scale=scale, implementation=implementation
            )
            return jnp.sum(out.astype(jnp.float32) * dout)

        return jax.jit(jax.grad(loss))(jnp.float32(0.121))

    # The exact function of the rounded inputs: the einsum path in float32.
    expected = dscale(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
    np.testing.assert_allclose(dscale(q, k, v, "blockwise"), expected, rtol=2e-4)
    np.testing.assert_allclose(dscale(q, k, v, "xla"), expected, rtol=5e-3)


def _cudnn_case(np_rng, t, is_causal, mask_kind, dtype):
    """Inputs for the cuDNN path: ``mask_kind`` "none", "full" ([B, 1, T, S] with an empty
    row), "padding" ([B, 1, 1, S]; with is_causal and T == S key 0 is padding, so query 0
    sees no key) plus a [1, N, 1, S] float32 bias."""
    q, k, v = (x.astype(dtype) for x in qkv(np_rng, 2, t=t, s=8, h=64, n=4))
    kw = dict(is_causal=is_causal)
    if mask_kind == "full":
        mask = np_rng.random((2, 1, t, 8)) > 0.3
        mask[0, 0, 1] = False  # an empty row must still give zeros
        kw["mask"] = jnp.asarray(mask)
    elif mask_kind == "padding":
        valid = np.ones((2, 1, 1, 8), bool)
        valid[0, ..., 0] = valid[1, ..., 6:] = False
        kw["mask"] = jnp.asarray(valid)
        kw["bias"] = jnp.asarray(np_rng.standard_normal((1, 4, 1, 8)), jnp.float32)
    elif mask_kind == "min_bias":
        kw["bias"] = jnp.asarray(_min_bias_row(t))
    return (q, k, v), kw


_CUDNN_CASES = [(8, True, "none"), (4, True, "full"), (8, False, "full"), (8, True, "padding")]


def _cudnn_kernel(q, k, v, bias, mask, *, scale, is_causal, implementation):
    """cuDNN's fused attention as jax and cudnn-frontend build it: a boolean mask becomes
    -2^41 (bfloat16; -2^15 in float16) added to the bias in the inputs' dtype; logits are
    float32 plus that bias; the causal mask *selects* float32's lowest finite value for
    hidden keys."""
    assert implementation == "cudnn"
    t, s = q.shape[1], k.shape[1]
    for name, x in (("mask", mask), ("bias", bias)):
        if x is not None and x.shape[2:] != (t, s):
            raise ValueError(f"cuDNN: {name} must have whole T, S axes, got {x.shape}")
    if bias is not None and bias.dtype != q.dtype:
        raise ValueError(f"cuDNN: bias dtype {bias.dtype} != {q.dtype}")
    if mask is not None:
        fill = -(2.0**15) if q.dtype == jnp.float16 else -(2.0**41)
        as_bias = jnp.where(mask, 0.0, fill).astype(q.dtype)
        bias = as_bias if bias is None else bias + as_bias
    groups = q.shape[2] // k.shape[2]  # query head n reads key/value head n // groups
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        lowest = float(np.finfo(np.float32).min)
        logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, lowest)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t, is_causal, mask_kind", _CUDNN_CASES)
def test_cudnn_wrapper_on_an_emulated_kernel(monkeypatch, np_rng, t, is_causal, mask_kind, dtype):
    """What our wrapper hands cuDNN and does with its output, off GPU: the kernel is
    emulated (``_cudnn_kernel``) with cuDNN's input rules (whole [T, S] mask and bias, bias
    in the inputs' dtype) and its mask semantics (a large negative bias, so a row with no
    visible key averages its keys instead of giving 0). float32 isolates the wrapper's
    logic (cuDNN itself takes only 16-bit inputs); bfloat16 adds its rounding."""
    (q, k, v), kw = _cudnn_case(np_rng, t, is_causal, mask_kind, dtype)
    want = dot_product_attention(q, k, v, implementation="xla", **kw)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_kernel)
    got = dot_product_attention(q, k, v, implementation="cudnn", **kw)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
    )


@pytest.mark.parametrize(
    "t, is_causal, window", [(8, True, (2, 0)), (4, True, 1), (8, False, (1, 3))]
)
def test_cudnn_wrapper_takes_a_window_as_a_mask(monkeypatch, np_rng, t, is_causal, window):
    """On the emulated kernel: the window reaches cuDNN inside its whole [T, S] bias (T < S
    too, where the window, like our causal mask, puts the queries last)."""
    (q, k, v), kw = _cudnn_case(np_rng, t, is_causal, "padding", jnp.float32)
    kw["local_window_size"] = window
    want = dot_product_attention(q, k, v, implementation="xla", **kw)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_kernel)
    got = dot_product_attention(q, k, v, implementation="cudnn", **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_cudnn_wrapper_non_finite_biases_as_the_other_kernels(monkeypatch, np_rng):
    """A -inf bias hides its key (a row of them gives 0) and a NaN makes its row NaN, as on
    the XLA path. The wrapper must hide the -inf keys itself: clipped, they would only be
    very negative, and a row of them would average its keys."""
    (q, k, v), _ = _cudnn_case(np_rng, 8, False, "none", jnp.bfloat16)
    bias = np.asarray(np_rng.standard_normal((1, 4, 8, 8)), np.float32)
    bias[0, :, 2, :] = -np.inf  # query row 2, every head
    bias[0, 1, 3, ::2] = -np.inf  # every other key of row 3 in head 1
    bias[0, 2, 5, 4] = np.nan
    want = np.asarray(dot_product_attention(q, k, v, bias=bias, implementation="xla"), np.float32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_kernel)
    got = dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
    got = np.asarray(got, np.float32)
    nan = np.isnan(want)
    assert nan[:, 5, 2].all() and nan.sum() == nan[:, 5, 2].size  # row 5 of head 2
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[:, 2], 0)
    np.testing.assert_allclose(np.where(nan, 0, got), np.where(nan, 0, want), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("hidden_by", ["causal", "causal T < S", "padding mask"])
def test_cudnn_float32_min_bias_row_sees_only_its_visible_keys(
    monkeypatch, np_rng, dtype, hidden_by
):
    """Query row 1 carries float32's finfo.min on every key (Hugging Face's mask value),
    and some keys are hidden (cuDNN's own causal mask; a causal mask with T < S, which the
    wrapper passes as a mask; a padding mask). In cuDNN's dtype a plain cast makes that
    bias -inf, and jax's mask fill, added to it, vanishes, so the row would attend to
    hidden keys. The wrapper folds mask and bias itself (``_cudnn_bias``), the bias clipped
    at -2^14: the row gives the other kernels' result for that clipped bias, gradients
    included. (Clipped at -2^40, as until 2026-12-04, the output was right on the H200 but
    the bias gradient 12x off: cuDNN's backward recomputes the probabilities from a float32
    log-sum-exp near 2^40.) Off GPU the kernel is emulated (``_cudnn_kernel``)."""
    if jax.default_backend() != "gpu":
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        monkeypatch.setattr(jax.nn, "dot_product_attention", _cudnn_kernel)
    t = 6 if hidden_by == "causal T < S" else 8
    (q, k, v), kw = _cudnn_case(np_rng, t, hidden_by != "padding mask", "min_bias", dtype)
    if hidden_by == "padding mask":
        valid = np.ones((2, 1, 1, 8), bool)
        valid[:, ..., 0] = valid[1, ..., 5:] = False
        kw["mask"] = jnp.asarray(valid)
    bias = kw.pop("bias")

    def loss(bias, q, k, v, implementation):
        out = dot_product_attention(q, k, v, bias=bias, implementation=implementation, **kw)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
    (want, out_want), grads_want = grad(jnp.maximum(bias, -(2.0**14)), q, k, v, "xla")
    (got, out), grads = grad(bias, q, k, v, "cudnn")
    np.testing.assert_allclose(np.asarray(out, np.float32), out_want, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(got, want, rtol=2e-2)
    for name, g, g_want in zip(["bias", "q", "k", "v"], grads, grads_want):
        g, g_want = np.asarray(g, np.float32), np.asarray(g_want, np.float32)
        assert np.all(np.isfinite(g)), name
        # Entries near 0 carry the rounding of the largest ones (up to ~16 in dbias).
        atol = 1e-2 * np.max(np.abs(g_want))
        np.testing.assert_allclose(g, g_want, atol=atol, rtol=5e-2, err_msg=f"d{name}")


def _min_bias_row(t: int) -> np.ndarray:
    """A ``[1, 1, t, 8]`` float32 bias: finfo.min on every key of query row 1, else 0."""
    bias = np.zeros((1, 1, t, 8), np.float32)
    bias[..., 1, :] = np.finfo(np.float32).min
    return bias


def test_cudnn_bias_folds_mask_and_bias_below_the_visible_keys():
    fill = -(2.0**41)
    bias = [-np.inf, np.finfo(np.float32).min, -1e9, -3.5, 0.0, 2e38, np.inf, np.nan]
    bias = jnp.asarray(bias).reshape(1, 1, 1, 8)
    visible = jnp.asarray([True, True, True, True, False, True, True, True]).reshape(bias.shape)
    got = _cudnn_bias(visible & (bias != -jnp.inf), bias, 1, 8, jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and got.shape == (1, 1, 1, 8)
    limit = 2.0**14  # far above the fill, and near enough to 0 for cuDNN's backward
    want = [fill, -limit, -limit, -3.5, fill, limit, limit, np.nan]
    want = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64)
    np.testing.assert_array_equal(np.asarray(got, np.float64)[0, 0, 0], want)
    everywhere = jnp.ones((1, 1, 1, 5), bool)
    got = _cudnn_bias(everywhere, bias[..., 1:6], 3, 5, jnp.float16)  # to [1, 1, 3, 5]
    np.testing.assert_array_equal(got[0, 0, 2], [-16384, -16384, -3.5, 0, 16384])
    got = _cudnn_bias(visible, None, 1, 8, jnp.float16)
    np.testing.assert_array_equal(got[0, 0, 0], [0, 0, 0, 0, -32768, 0, 0, 0])
    # The gradient passes through the clip; none reaches a hidden or non-finite entry.
    grad = jax.grad(lambda b: jnp.sum(_cudnn_bias(visible, b, 1, 8, jnp.float16)[..., :7]))
    np.testing.assert_array_equal(grad(bias)[0, 0, 0], [0, 1, 1, 1, 0, 1, 0, 0])


@pytest.mark.parametrize(
    "t, s, kw, want",
    [
        (8, 8, {"mask": (2, 1, 1, 8)}, "cudnn"),
        (8, 8, {"is_causal": True}, "cudnn"),
        (9, 9, {"is_causal": True}, "cudnn"),  # no mask or bias: cuDNN's own causal mask
        (9, 9, {"mask": (2, 1, 1, 9)}, "xla"),
        (8, 7, {"bias": (1, 4, 8, 7)}, "xla"),
        (3, 8, {"is_causal": True}, "xla"),  # queries last: a mask
    ],
)
def test_gpu_picks_cudnn_only_where_its_backward_runs(monkeypatch, t, s, kw, want):
    """jax's cuDNN backward refuses a mask or bias with odd T or S (NotImplementedError
    under jax.grad), so implementation=None must not pick cuDNN there."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q = jnp.zeros((2, t, 4, 64), jnp.bfloat16)
    k = v = jnp.zeros((2, s, 4, 64), jnp.bfloat16)
    mask = jnp.ones(kw["mask"], bool) if "mask" in kw else None
    bias = jnp.zeros(kw["bias"], jnp.bfloat16) if "bias" in kw else None
    is_causal = kw.get("is_causal", False)
    assert _select_implementation(q, k, v, mask, bias, is_causal, 0.0) == want


def test_cudnn_gets_a_hashable_scale(monkeypatch, np_rng):
    """A concrete array scale (jnp.float32) works on every backend: cuDNN's scale is a
    static, hashable parameter, so the wrapper hands it a Python float."""
    real_attention = jax.nn.dot_product_attention

    def emulated_cudnn(q, k, v, bias, mask, *, scale, is_causal, implementation):
        hash(scale)  # jax's cuDNN primitive hashes its parameters
        return real_attention(q, k, v, bias, mask, scale=scale, is_causal=is_causal)

    q, k, v = qkv(np_rng, 2, h=8)
    want = dot_product_attention(q, k, v, scale=0.3, implementation="xla")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", emulated_cudnn)
    got = dot_product_attention(q, k, v, scale=jnp.float32(0.3), implementation="cudnn")
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
@pytest.mark.parametrize("t, is_causal, mask_kind", _CUDNN_CASES)
def test_cudnn_matches_xla(np_rng, t, is_causal, mask_kind):
    (q, k, v), kw = _cudnn_case(np_rng, t, is_causal, mask_kind, jnp.bfloat16)
    got = dot_product_attention(q, k, v, implementation="cudnn", **kw)
    want = dot_product_attention(q, k, v, implementation="xla", **kw)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------ multi-head attention


def weights_from_torch(mha, e, n, kdim):
    """Copy torch.nn.MultiheadAttention's parameters into our [D, N, H] layout."""
    h = e // n
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.detach().numpy().reshape(3, e, e)
    else:
        wq, wk, wv = (getattr(mha, f"{p}_proj_weight").detach().numpy() for p in "qkv")
    bq, bk, bv = mha.in_proj_bias.detach().numpy().reshape(3, n, h)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return MultiHeadAttentionWeights(
        w_q=f32(wq.T.reshape(e, n, h)),
        w_k=f32(wk.T.reshape(kdim, n, h)),
        w_v=f32(wv.T.reshape(kdim, n, h)),
        w_o=f32(mha.out_proj.weight.detach().numpy().T.reshape(n, h, e)),
        b_q=f32(bq),
        b_k=f32(bk),
        b_v=f32(bv),
        b_o=f32(mha.out_proj.bias.detach().numpy()),
    )


@pytest.mark.parametrize("kdim, is_causal", [(None, True), (None, False), (11, False)])
def test_multi_head_attention_matches_torch(np_rng, kdim, is_causal):
    torch = pytest.importorskip("torch")
    e, n, t = 24, 6, 5
    s = t if kdim is None else S
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(
        e, n, kdim=kdim, vdim=kdim, batch_first=True, dtype=torch.float64
    ).eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0.0, 0.3)  # nonzero biases too
    weights = weights_from_torch(mha, e, n, kdim or e)
    x_q = normal(np_rng, B, t, e)
    x_kv = None if kdim is None else normal(np_rng, B, s, kdim)
    valid = np_rng.random((B, s)) > 0.3
    valid[:, 0] = True
    cot = normal(np_rng, B, t, e)

    mask = jnp.asarray(valid)[:, None, None, :]  # [B, 1, 1, S]

    def ours(x_q, x_kv):
        return multi_head_attention(
            weights, x_q, x_kv, mask=mask, is_causal=is_causal, return_weights=True
        )

    out, probs = ours(x_q, x_kv)
    tx_q = torch.tensor(f64(x_q), requires_grad=True)
    tx_kv = tx_q if x_kv is None else torch.tensor(f64(x_kv), requires_grad=True)
    attn_mask = torch.tensor(~np_causal(t, s)) if is_causal else None  # torch: True = ignore
    kpm = torch.tensor(~valid)
    want, want_avg = mha(tx_q, tx_kv, tx_kv, key_padding_mask=kpm, attn_mask=attn_mask)
    _, want_heads = mha(
        tx_q, tx_kv, tx_kv, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False
    )
    np.testing.assert_allclose(out, want.detach().numpy(), **TOL)
    assert probs.shape == (B, n, t, s)
    np.testing.assert_allclose(probs, want_heads.detach().numpy(), **TOL)
    np.testing.assert_allclose(np.mean(probs, axis=1), want_avg.detach().numpy(), **TOL)
    plain = multi_head_attention(weights, x_q, x_kv, mask=mask, is_causal=is_causal)
    np.testing.assert_allclose(plain, out, **TOL)

    # Gradients wrt the inputs agree with torch autograd.
    want.backward(torch.tensor(f64(cot)))
    loss = lambda x_q, x_kv: jnp.sum(ours(x_q, x_kv)[0] * cot)
    g_q, g_kv = jax.jit(jax.grad(loss, argnums=(0, 1)))(x_q, x_kv)
    np.testing.assert_allclose(g_q, tx_q.grad.numpy(), **TOL)
    if x_kv is not None:
        np.testing.assert_allclose(g_kv, tx_kv.grad.numpy(), **TOL)


def random_mha_weights(np_rng, dq, n, h, dkv, k_heads, dout):
    """Random weights (nonzero biases) built directly, so init is not under test here."""
    return MultiHeadAttentionWeights(
        *(normal(np_rng, *shape, scale=0.4) for shape in [(dq, n, h), (dkv, k_heads, h)]),
        normal(np_rng, dkv, k_heads, h, scale=0.4),
        normal(np_rng, n, h, dout, scale=0.3),
        *(normal(np_rng, *shape, scale=0.1) for shape in [(n, h), (k_heads, h), (k_heads, h)]),
        normal(np_rng, dout, scale=0.1),
    )


def test_multi_head_attention_gqa_matches_numpy(np_rng):
    dq, dkv, dout, n, k_heads, h = 7, 11, 13, 6, 2, 5
    w = random_mha_weights(np_rng, dq, n, h, dkv, k_heads, dout)
    x_q, x_kv = normal(np_rng, B, T, dq), normal(np_rng, B, S, dkv)
    mask = random_mask(np_rng, (B, 1, T, S))
    f = jax.jit(lambda w, a, b: multi_head_attention(w, a, b, mask=mask, is_causal=True))
    out = f(w, x_q, x_kv)
    assert out.shape == (B, T, dout)
    q = np.einsum("btd,dnh->btnh", f64(x_q), f64(w.w_q)) + f64(w.b_q)
    k = np.einsum("bsd,dkh->bskh", f64(x_kv), f64(w.w_k)) + f64(w.b_k)
    v = np.einsum("bsd,dkh->bskh", f64(x_kv), f64(w.w_v)) + f64(w.b_v)
    ctx, _ = np_attention(q, k, v, mask=mask, is_causal=True)
    want = np.einsum("btnh,nho->bto", ctx, f64(w.w_o)) + f64(w.b_o)
    np.testing.assert_allclose(out, want, **TOL)
    # The pieces agree with the references.
    pq, pk, pv = jax.jit(project_qkv)(w, x_q, x_kv)
    assert (pq.shape, pk.shape, pv.shape) == ((B, T, n, h), (B, S, k_heads, h), (B, S, k_heads, h))
    for got, ref in ((pq, q), (pk, k), (pv, v)):
        np.testing.assert_allclose(got, ref, **TOL)
    np.testing.assert_allclose(project_output(w, jnp.asarray(ctx, jnp.float32)), want, **TOL)


@pytest.mark.parametrize("biases", ["all", "some", "none"])
def test_fused_qkv_projection_matches_numpy(np_rng, biases):
    """fused=True (one product over the joined kernels) gives the three projections of
    self-attention, with GQA, each bias or none; a bias of the wrong shape is named."""
    d, dout, n, k_heads, h = 7, 13, 6, 2, 5
    w = random_mha_weights(np_rng, d, n, h, d, k_heads, dout)
    dropped = {"all": (), "some": ("b_q", "b_v"), "none": ("b_q", "b_k", "b_v")}[biases]
    w = w._replace(**dict.fromkeys(dropped))
    x = normal(np_rng, B, 1, d)
    got = jax.jit(lambda w, x: project_qkv(w, x, fused=True))(w, x)
    for g, kernel, bias in zip(got, (w.w_q, w.w_k, w.w_v), (w.b_q, w.b_k, w.b_v)):
        want = np.einsum("btd,dnh->btnh", f64(x), f64(kernel)) + (0 if bias is None else f64(bias))
        assert g.shape == want.shape
        np.testing.assert_allclose(g, want, **TOL)
    with pytest.raises(
        ValueError, match=r"project_qkv: a bias of shape \(5, 6\) .* must be \(6, 5\)"
    ):
        project_qkv(w._replace(b_q=jnp.zeros((h, n))), x, fused=True)


@pytest.mark.parametrize("return_weights", [False, True])
def test_multi_head_attention_bias_matches_numpy(np_rng, return_weights):
    # An additive bias (e.g. ALiBi or relative positions) reaches the logits on both paths.
    dq, dkv, dout, n, k_heads, h = 7, 11, 13, 6, 2, 5
    w = random_mha_weights(np_rng, dq, n, h, dkv, k_heads, dout)
    x_q, x_kv = normal(np_rng, B, T, dq), normal(np_rng, B, S, dkv)
    mask = random_mask(np_rng, (B, 1, 1, S))
    bias = normal(np_rng, 1, n, T, S, scale=2.0)
    got = multi_head_attention(
        w, x_q, x_kv, mask=mask, bias=bias, is_causal=True, return_weights=return_weights
    )
    q = np.einsum("btd,dnh->btnh", f64(x_q), f64(w.w_q)) + f64(w.b_q)
    k = np.einsum("bsd,dkh->bskh", f64(x_kv), f64(w.w_k)) + f64(w.b_k)
    v = np.einsum("bsd,dkh->bskh", f64(x_kv), f64(w.w_v)) + f64(w.b_v)
    ctx, probs = np_attention(q, k, v, mask=mask, bias=bias, is_causal=True)
    want = np.einsum("btnh,nho->bto", ctx, f64(w.w_o)) + f64(w.b_o)
    if return_weights:
        got, got_probs = got
        np.testing.assert_allclose(got_probs, probs, **TOL)
    np.testing.assert_allclose(got, want, **TOL)


def np_window(t, s, left, right):
    """Query i, at key position i + s - t, sees keys from left before it to right after."""
    return np.array([[-right <= i + (s - t) - j <= left for j in range(s)] for i in range(t)])


@pytest.mark.parametrize("is_causal, window", [(True, 2), (False, (1, 3)), (True, (0, 5))])
def test_local_window_in_every_entry_point(np_rng, is_causal, window):
    """``local_window_size`` is a mask: dot_product_attention (both CPU kernels),
    attention_weights and multi_head_attention (both paths) give the float64 reference
    with the window ANDed into a padding mask, T < S (queries last)."""
    pair = window if isinstance(window, tuple) else (window, window)
    k_heads = 2
    q, k, v = qkv(np_rng, k_heads)
    mask = random_mask(np_rng, (B, 1, 1, S))
    kw = dict(mask=mask, is_causal=is_causal, local_window_size=window)
    want, probs = np_attention(q, k, v, mask=mask & np_window(T, S, *pair), is_causal=is_causal)
    for impl in ("xla", "blockwise"):
        got = dot_product_attention(q, k, v, implementation=impl, **kw)
        np.testing.assert_allclose(got, want, **TOL, err_msg=impl)
    np.testing.assert_allclose(attention_weights(q, k, **kw), probs, **TOL)
    dq, dkv, h = 7, 11, 5
    w = random_mha_weights(np_rng, dq, N, h, dkv, k_heads, dq)
    x_q, x_kv = normal(np_rng, B, T, dq), normal(np_rng, B, S, dkv)
    out = multi_head_attention(w, x_q, x_kv, **kw)
    out_too, weights = multi_head_attention(w, x_q, x_kv, return_weights=True, **kw)
    np.testing.assert_allclose(out_too, out, **TOL)
    assert np.all(np.asarray(weights)[..., ~np_window(T, S, *pair)] == 0)
    with pytest.raises(ValueError, match="attention_weights: local_window_size must be"):
        attention_weights(q, k, local_window_size=(1, -1))
    with pytest.raises(ValueError, match="multi_head_attention: local_window_size must be"):
        multi_head_attention(w, x_q, x_kv, return_weights=True, local_window_size=-3)


def test_init_multi_head_attention(rng, assert_independent_draws):
    w = init_multi_head_attention(rng, 24, 6, kv_dim=11, num_kv_heads=3, out_dim=13)
    assert_independent_draws(w)  # w_v from w_k's key would equal w_k
    shapes = [None if a is None else a.shape for a in w]
    assert shapes == [(24, 6, 4), (11, 3, 4), (11, 3, 4), (6, 4, 13), (6, 4), (3, 4), (3, 4), (13,)]
    assert all(a.dtype == jnp.float32 for a in w)
    assert not np.any(w.b_q) and not np.any(w.b_o)
    np.testing.assert_allclose(np.std(w.w_q), 1 / np.sqrt(24), rtol=0.15)
    np.testing.assert_allclose(np.std(w.w_k), 1 / np.sqrt(11), rtol=0.15)
    np.testing.assert_allclose(np.std(w.w_v), 1 / np.sqrt(11), rtol=0.15)  # kv_dim's fan-in
    np.testing.assert_allclose(np.std(w.w_o), 1 / np.sqrt(24), rtol=0.15)
    # Explicit stds and no biases (same shapes: the eager PRNG compiles are reused).
    w2 = init_multi_head_attention(
        rng, 24, 6, kv_dim=11, num_kv_heads=3, out_dim=13, std=0.5, out_std=0.01, use_bias=False
    )
    assert w2.b_q is None and w2.b_k is None and w2.b_v is None and w2.b_o is None
    np.testing.assert_allclose(np.std(w2.w_v), 0.5, rtol=0.15)
    np.testing.assert_allclose(np.std(w2.w_o), 0.01, rtol=0.15)
    with pytest.raises(ValueError, match=r"num_heads=6.*num_kv_heads=4"):
        init_multi_head_attention(rng, 24, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match="q_dim=25"):
        init_multi_head_attention(rng, 25, 6)


def test_init_default_stds_follow_the_fan_in(rng):
    """Default stds: 1/sqrt(N H) for w_o (not 1/sqrt(Dq): here N H = 64 != Dq = 8),
    1/sqrt(dq) for Luong's general W, 1/sqrt(fan_in) for each additive weight."""
    w = init_multi_head_attention(rng, 8, 2, head_dim=32)
    assert w.w_o.shape == (2, 32, 8)
    np.testing.assert_allclose(np.std(w.w_q), 1 / np.sqrt(8), rtol=0.15)
    np.testing.assert_allclose(np.std(w.w_o), 1 / np.sqrt(64), rtol=0.15)
    np.testing.assert_allclose(np.std(init_general(rng, 4, 64)), 1 / np.sqrt(4), rtol=0.15)
    aw = init_additive(rng, 4, 64, 400)
    np.testing.assert_allclose(np.std(aw.w_query), 1 / np.sqrt(4), rtol=0.15)
    np.testing.assert_allclose(np.std(aw.w_key), 1 / np.sqrt(64), rtol=0.15)
    np.testing.assert_allclose(np.std(aw.v), 1 / np.sqrt(400), rtol=0.15)


def test_multi_head_attention_self_attention_vmap_grad(np_rng):
    w = random_mha_weights(np_rng, 24, 6, 4, 24, 2, 24)
    x = normal(np_rng, B, T, 24)
    f = jax.jit(lambda w, x, x_kv: multi_head_attention(w, x, x_kv, is_causal=True))
    np.testing.assert_allclose(f(w, x, None), f(w, x, x), **TOL)
    batched = jax.vmap(lambda x: multi_head_attention(w, x, is_causal=True))(jnp.stack([x, 2 * x]))
    np.testing.assert_allclose(batched[1], f(w, 2 * x, None), **TOL)
    small = random_mha_weights(np_rng, 5, 2, 3, 5, 1, 5)
    check_grads(jax.jit(lambda w, x: f(w, x, None)), (small, x[:1, :3, :5]), **GRADS)


def test_multi_head_attention_dropout(rng, np_rng):
    w = random_mha_weights(np_rng, 24, 6, 4, 24, 6, 24)
    x = normal(np_rng, B, T, 24)
    f = jax.jit(
        multi_head_attention, static_argnames=("dropout_rate", "deterministic", "return_weights")
    )
    base = f(w, x)
    np.testing.assert_array_equal(f(w, x, dropout_rate=0.5, rng=rng), base)  # deterministic
    # return_weights takes its own path: deterministic=True must switch dropout off there too.
    out_det, _ = f(w, x, dropout_rate=0.5, rng=rng, return_weights=True)
    np.testing.assert_allclose(out_det, base, **TOL)
    dropped = f(w, x, dropout_rate=0.5, rng=rng, deterministic=False)
    assert not np.allclose(dropped, base)
    out, probs = f(w, x, dropout_rate=0.5, rng=rng, deterministic=False, return_weights=True)
    np.testing.assert_allclose(out, dropped, **TOL)  # same key, same dropped entries
    np.testing.assert_allclose(probs, attention_weights(*project_qkv(w, x)[:2]), **TOL)
    with pytest.raises(ValueError, match="rng"):
        multi_head_attention(w, x, dropout_rate=0.5, deterministic=False)
    # A bad rate is refused by name in evaluation too (as the MultiHeadAttention module
    # does), and a traced one in training (it picks the kernel's code path).
    for rate in (1.5, -0.1, None):
        for return_weights in (False, True):
            with pytest.raises(ValueError, match=r"multi_head_attention: dropout_rate must be"):
                multi_head_attention(w, x, dropout_rate=rate, return_weights=return_weights)
    train = jax.jit(
        lambda r: multi_head_attention(w, x, dropout_rate=r, rng=rng, deterministic=False)
    )
    with pytest.raises(ValueError, match=r"multi_head_attention: dropout_rate must be a concrete"):
        train(0.1)
    np.testing.assert_allclose(
        jax.jit(lambda r: multi_head_attention(w, x, dropout_rate=r))(0.1), base, **TOL
    )


def test_multi_head_attention_bad_inputs(np_rng):
    w = random_mha_weights(np_rng, 24, 6, 4, 24, 6, 24)
    with pytest.raises(ValueError, match=r"rank 3.*\(5, 24\)"):
        multi_head_attention(w, normal(np_rng, T, 24))
    with pytest.raises(ValueError, match=r"\(2, 5, 23\)"):
        multi_head_attention(w, normal(np_rng, B, T, 23))
    with pytest.raises(ValueError, match=r"\(2, 5, 6, 4\).*\(3, 7, 6, 4\)"):
        multi_head_attention(w, normal(np_rng, B, T, 24), normal(np_rng, 3, S, 24))
    with pytest.raises(ValueError, match=r"\(2, 6, 5, 7\)"):
        multi_head_attention(
            w, normal(np_rng, B, T, 24), normal(np_rng, B, S, 24), mask=jnp.ones((B, 1, S), bool)
        )


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_write_kv_cache_visible_with_a_narrow_index_dtype(dtype):
    # A cache longer than the index dtype's range: key positions must not wrap.
    cache = jnp.zeros((1, 300, 1, 2))
    chunk = jnp.ones((1, 1, 1, 2))
    visible = write_kv_cache(cache, cache, chunk, chunk, dtype(5))[2]
    np.testing.assert_array_equal(visible, (np.arange(300) <= 5)[None, None, None])


def test_write_kv_cache_with_a_window_hides_the_keys_before_it(np_rng):
    """A causal window by cache slot: the chunk's queries at 4, 5, 6 see 2 keys back (the
    right side, as under is_causal, counts for nothing); a traced index too."""
    cache = jnp.zeros((1, 8, 1, 2))
    chunk = normal(np_rng, 1, 3, 1, 2)
    want = np.array([[p - 2 <= j <= p for j in range(8)] for p in (4, 5, 6)])
    write = partial(write_kv_cache, local_window_size=(2, 5))
    for visible in (
        write(cache, cache, chunk, chunk, jnp.int32(4))[2],
        jax.jit(write)(cache, cache, chunk, chunk, jnp.int32(4))[2],
    ):
        np.testing.assert_array_equal(visible, want[None, None])
    with pytest.raises(ValueError, match="write_kv_cache: local_window_size must be"):
        write_kv_cache(cache, cache, chunk, chunk, 4, local_window_size=(-1, 0))


@pytest.mark.parametrize(
    "layout, implementation",
    [("one", "xla"), ("stacked", "xla"), ("rows", "xla"), ("rows", "blockwise")],
)
def test_cached_attention_in_chunks_equals_causal_attention_over_the_whole(
    np_rng, layout, implementation
):
    """Prefill 3 positions, then 1, then 2: each chunk's outputs are the float64 causal
    attention's rows for its positions, with GQA and a padding mask over the keys; the
    cache holds every chunk's keys and values where they belong. Caches: one layer's
    ``[B, S, K, H]``, layer 1 of a stack, and one layer's ``head_rows`` ``[B*K, S, H]``
    (read as they are by the einsum path, given back as ``[B, S, K, H]`` to the others)."""
    t, n, kh = 6, 4, 2
    q, k, v = qkv(np_rng, kh, t=t, s=t, n=n)
    padding = np.ones((B, 1, 1, t), bool)
    padding[1, ..., :2] = False  # row 1 left-padded by 2 (its first queries see nothing)
    want, _ = np_attention(q, k, v, mask=padding, is_causal=True)
    layer = 1 if layout == "stacked" else None
    shape = {"one": (B, t, kh, H), "stacked": (3, B, t, kh, H), "rows": (B * kh, t, H)}[layout]
    k_cache, v_cache = jnp.zeros(shape, jnp.bfloat16), jnp.zeros(shape, jnp.bfloat16)
    step = jax.jit(partial(cached_attention, implementation=implementation))
    start = 0
    for size in (3, 1, 2):
        chunk = slice(start, start + size)
        out, k_cache, v_cache = step(
            q[:, chunk], k[:, chunk], v[:, chunk], k_cache, v_cache, jnp.int32(start),
            layer=None if layer is None else jnp.int32(layer), mask=jnp.asarray(padding),
        )  # fmt: skip
        assert out.dtype == q.dtype and k_cache.shape == shape
        np.testing.assert_allclose(out, want[:, chunk], rtol=2e-2, atol=2e-2)  # bf16 cache
        start += size
    written = {"one": k_cache, "stacked": k_cache[1], "rows": None}[layout]
    written = from_head_rows(k_cache, B) if layout == "rows" else written
    np.testing.assert_array_equal(written, jnp.asarray(k, jnp.bfloat16))
    if layout == "stacked":
        assert not jnp.any(k_cache[0]) and not jnp.any(v_cache[2])  # other layers untouched


@pytest.mark.parametrize("stacked", [False, True])
def test_cached_attention_through_slot_rows_equals_it_on_the_reordered_cache(np_rng, stacked):
    """slot_rows reads slot s of row b from cache row slot_rows[b, s] (beam search's
    ancestors): the same outputs, bit for bit, as on a cache whose rows were gathered so,
    and the chunk's own slots are written to the row that computed them."""
    b, s, kh, index = 4, 6, 2, 3
    q, k, v = qkv(np_rng, kh, t=1, s=1, n=4, b=b)
    shape = (b, s, kh, H)
    k_cache, v_cache = (normal(np_rng, *shape) for _ in range(2))
    rows = np_rng.integers(0, b, (b, s)).astype(np.int32)
    rows[:, index] = np.arange(b)  # the slot written now: each row's own
    gathered = [x[rows, np.arange(s)[None]] for x in (k_cache, v_cache)]  # [B, S, K, H]
    stack = (lambda x: jnp.stack([jnp.zeros_like(x), x])) if stacked else jnp.asarray
    layer = jnp.int32(1) if stacked else None
    step = jax.jit(partial(cached_attention, implementation="xla", layer=layer))
    out, new_k, _ = step(q, k, v, stack(k_cache), stack(v_cache), 3, slot_rows=rows)
    want = step(q, k, v, stack(gathered[0]), stack(gathered[1]), 3)[0]
    np.testing.assert_array_equal(out, want)
    new_k = new_k[1] if stacked else new_k
    np.testing.assert_array_equal(new_k[:, index], k[:, 0])  # written in place, unreordered
    np.testing.assert_array_equal(np.delete(new_k, index, 1), np.delete(k_cache, index, 1))
    with pytest.raises(ValueError, match=r"slot_rows must be \[B, S\] = \(4, 6\) integers"):
        cached_attention(q, k, v, stack(k_cache), stack(v_cache), 3, layer=layer, slot_rows=rows.T)
    with pytest.raises(ValueError, match="not head rows"):
        cache = head_rows(jnp.asarray(k_cache))
        cached_attention(q, k, v, cache, cache, 3, slot_rows=rows)
    # A row outside the cache (gather's clip would read row B - 1 instead) when concrete.
    bad = rows.copy()
    bad[2, 5] = b
    with pytest.raises(ValueError, match=r"slot_rows \(cache rows\) must lie in \[0, 4\)"):
        cached_attention(q, k, v, stack(k_cache), stack(v_cache), 3, layer=layer, slot_rows=bad)
    with pytest.raises(ValueError, match=r"slot_rows \(cache rows\) must lie in \[0, 4\)"):
        cached_attention(q, k, v, stack(k_cache), stack(v_cache), 3, layer=layer, slot_rows=-rows)


def test_head_rows_is_one_block_of_rows_per_batch_and_head(np_rng):
    x = np_rng.standard_normal((2, 5, 3, 4)).astype(np.float32)  # [B, S, K, H]
    rows = head_rows(x)
    assert rows.shape == (6, 5, 4)
    np.testing.assert_array_equal(rows[1 * 3 + 2], x[1, :, 2])  # row b * K + k
    np.testing.assert_array_equal(from_head_rows(rows, 2), x)


def test_head_rows_and_back_refuse_other_shapes_naming_them():
    # Were "not enough values to unpack", a reshape error, and a ZeroDivisionError.
    with pytest.raises(
        ValueError, match=r"head_rows: x must be \[B, S, K, H\], got shape \(6, 5, 4\)"
    ):
        head_rows(jnp.zeros((6, 5, 4)))
    for bad, batch_size in (((6, 5, 4), 4), ((2, 5, 3, 4), 2)):
        with pytest.raises(ValueError, match=r"from_head_rows: x must be \[B\*K, S, H\]"):
            from_head_rows(jnp.zeros(bad), batch_size)
    with pytest.raises(ValueError, match=r"from_head_rows: batch_size must be an int >= 1"):
        from_head_rows(jnp.zeros((6, 5, 4)), 0)


def test_head_rows_are_only_for_caches_and_checked_against_the_queries(np_rng):
    """dot_product_attention takes no rank-3 keys (head rows are cached_attention's), and
    cached_attention checks q against the chunk that a head-row cache cannot check."""
    q, k, v = qkv(np_rng, 2, t=3, s=5, n=4)  # k, v: [B, 5, 2, H]
    with pytest.raises(ValueError, match="must be rank 4"):
        dot_product_attention(q, head_rows(k), head_rows(v))
    cache = jnp.zeros((B * 2, 5, H))
    for bad_q in (q[:1], q[:, :, :3]):  # another batch; heads not a multiple of K
        with pytest.raises(ValueError, match=r"dot_product_attention: .*q \("):
            cached_attention(bad_q, k[:, :3], v[:, :3], cache, cache, 0)


def test_write_kv_cache_into_head_rows_refuses_a_chunk_of_other_heads():
    cache = jnp.zeros((4, 6, 8))  # [B*K, S, H]
    with pytest.raises(ValueError, match=r"B\*K rows for the chunk's k"):
        chunk = jnp.ones((1, 2, 2, 8))  # B * K = 2
        write_kv_cache(cache, cache, chunk, chunk, 0)
    chunk = jnp.ones((2, 2, 2, 8))  # B * K = 4
    assert write_kv_cache(cache, cache, chunk, chunk, 0)[0].shape == cache.shape


def test_write_kv_cache_writes_the_chunk_and_masks_later_keys(np_rng):
    k_cache = np_rng.standard_normal((B, S, 3, H)).astype(np.float32)
    v_cache = np_rng.standard_normal((B, S, 3, H)).astype(np.float32)
    k, v = (np_rng.standard_normal((B, 2, 3, H)).astype(np.float32) for _ in range(2))
    write = jax.jit(write_kv_cache)
    got_k, got_v, visible = write(k_cache, v_cache, k, v, jnp.int32(3))
    want_k, want_v = k_cache.copy(), v_cache.copy()
    want_k[:, 3:5], want_v[:, 3:5] = k, v
    np.testing.assert_array_equal(got_k, want_k)
    np.testing.assert_array_equal(got_v, want_v)
    # Queries at positions 3 and 4 see keys 0..3 and 0..4.
    want_visible = np.arange(S)[None, :] <= np.array([3, 4])[:, None]
    np.testing.assert_array_equal(visible, want_visible[None, None])
    # The cache keeps its dtype; the chunk is cast to it.
    bf16 = write(k_cache.astype(jnp.bfloat16), v_cache, k, v, jnp.int32(0))[0]
    assert bf16.dtype == jnp.bfloat16
    # A concrete index where the chunk does not fit is refused (dynamic_update_slice
    # would move it back over earlier keys); S - 2 is the last index that fits.
    write_kv_cache(k_cache, v_cache, k, v, S - 2)
    for index in (S - 1, -1):
        with pytest.raises(ValueError, match=rf"2 tokens at index {index} .* {S} positions"):
            write_kv_cache(k_cache, v_cache, k, v, index)
    # A chunk with other heads (or batch, head dim) than the cache is refused, not padded.
    with pytest.raises(ValueError, match=r"the caches' B, K, H"):
        write_kv_cache(k_cache, v_cache, k[:, :, :2], v[:, :, :2], 0)


def test_write_kv_cache_refuses_caches_of_different_lengths():
    # A shorter v_cache used to take the write silently, clamped to rows 2-3 instead of 3-4.
    k_cache, v_cache = jnp.zeros((1, 6, 2, 4)), jnp.zeros((1, 4, 2, 4))
    chunk = jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match=r"k_cache .* v_cache .* must share"):
        write_kv_cache(k_cache, v_cache, chunk, chunk, 3)


def test_write_kv_cache_into_a_layer_stack_writes_that_layer_only(np_rng):
    """``layer=``: the same write into layer 1 of a stacked ``[L, B, S, K, H]`` cache, the
    other layers untouched, with a traced layer and index too (as in a layer scan)."""
    stack = [np_rng.standard_normal((3, B, S, 2, H)).astype(np.float32) for _ in "kv"]
    k, v = (np_rng.standard_normal((B, 2, 2, H)).astype(np.float32) for _ in "kv")
    want_k, want_v, want_visible = write_kv_cache(stack[0][1], stack[1][1], k, v, 3)
    for write in (write_kv_cache, jax.jit(write_kv_cache)):
        got_k, got_v, visible = write(*stack, k, v, jnp.int32(3), layer=jnp.int32(1))
        for got, want, old in ((got_k, want_k, stack[0]), (got_v, want_v, stack[1])):
            np.testing.assert_array_equal(got[1], want)
            np.testing.assert_array_equal(np.delete(np.asarray(got), 1, 0), np.delete(old, 1, 0))
        np.testing.assert_array_equal(visible, want_visible)
    with jax.enable_x64(True):  # (start indices of one dtype: int64 zeros failed)
        got_k = write_kv_cache(*stack, k, v, 3, layer=2)[0]
        np.testing.assert_array_equal(got_k[2, :, 3:5], k)


@pytest.mark.parametrize(
    "layer, cache_shape, match",
    [
        (3, (3, 1, 6, 2, 4), r"layer 3 is not in \[0, 3\)"),
        (-1, (3, 1, 6, 2, 4), r"layer -1 is not in \[0, 3\)"),
        (1.0, (3, 1, 6, 2, 4), "layer must be an integer scalar"),
        (True, (3, 1, 6, 2, 4), "layer must be an integer scalar"),
        (0, (1, 6, 2, 4), r"with layer=, k_cache \[L, B, S, K, H\]"),
        (None, (3, 1, 6, 2, 4), r"k_cache \(3, 1, 6, 2, 4\) is a stack .* pass layer="),
    ],
)
def test_write_kv_cache_refuses_a_bad_layer(layer, cache_shape, match):
    cache, chunk = jnp.zeros(cache_shape), jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match=match):
        write_kv_cache(cache, cache, chunk, chunk, 0, layer=layer)


@pytest.mark.parametrize("index", [1.7, True, jnp.array([2])])
def test_write_kv_cache_refuses_a_non_integer_or_non_scalar_index(index):
    cache, chunk = jnp.zeros((1, 6, 2, 4)), jnp.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match="index must be an integer scalar"):
        write_kv_cache(cache, cache, chunk, chunk, index)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(implementation="foo"), "unknown implementation"),
        (dict(dropout_rate=-0.5, deterministic=False), "dropout_rate"),
        (dict(dropout_rate=float("nan"), deterministic=False), "dropout_rate"),
    ],
)
def test_multi_head_attention_return_weights_checks_its_arguments(kwargs, match):
    w = init_multi_head_attention(jax.random.PRNGKey(0), 4, 2)
    with pytest.raises(ValueError, match=match):
        multi_head_attention(w, jnp.ones((1, 2, 4)), return_weights=True, **kwargs)


def test_init_multi_head_attention_refuses_zero_heads():
    with pytest.raises(ValueError, match="num_heads must be an int >= 1, got 0"):
        init_multi_head_attention(jax.random.PRNGKey(0), 8, 0)


@pytest.mark.parametrize(
    ("x_q_dim", "x_kv_dim", "w_v_rows", "match"),
    [
        (8, 7, 6, r"x_kv \(1, 3, 7\) must end in w_k's and w_v's 6 features"),
        (9, 6, 6, r"x_q \(1, 4, 9\) must end in w_q's 8 features"),
        (8, None, 6, r"x_kv is None .* take 6 features and x_q has 8: pass .* x_kv"),
        (8, 6, 5, r"w_k takes 6 input features but w_v takes 5"),  # torch kdim != vdim
    ],
)
@pytest.mark.parametrize("fused", [False, True])
def test_project_qkv_names_the_input_and_kernel_that_disagree(
    x_q_dim, x_kv_dim, w_v_rows, fused, match
):
    # project's own error named neither ("project: x has shape ... the kernel ...").
    w = init_multi_head_attention(jax.random.key(0), 8, 2, kv_dim=6)
    w = w._replace(w_v=jnp.ones((w_v_rows, *w.w_v.shape[1:])))
    x_kv = None if x_kv_dim is None else jnp.ones((1, 3, x_kv_dim))
    with pytest.raises(ValueError, match=f"project_qkv: {match}"):
        project_qkv(w, jnp.ones((1, 4, x_q_dim)), x_kv, fused=fused)
    with pytest.raises(ValueError, match=f"project_qkv: {match}"):
        multi_head_attention(w, jnp.ones((1, 4, x_q_dim)), x_kv)


def test_dropout_without_a_key_names_the_argument(np_rng):
    q = normal(np_rng, 1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"dot_product_attention: .*dropout_rng"):
        dot_product_attention(q, q, q, dropout_rate=0.1)
    w = init_multi_head_attention(jax.random.key(0), 8, 2)
    with pytest.raises(ValueError, match=r"multi_head_attention: .*rng"):
        multi_head_attention(w, jnp.ones((1, 3, 8)), dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match=r"multi_head_attention: .*rng"):
        multi_head_attention(
            w, jnp.ones((1, 3, 8)), dropout_rate=0.1, deterministic=False, return_weights=True
        )


def test_additive_scores_names_a_projection_of_the_wrong_input_dim():
    weights = init_additive(jax.random.key(0), 4, 6, 7)
    with pytest.raises(ValueError, match=r"additive_scores: w_query must be \[dq, d\]"):
        additive_scores(weights, jnp.ones((2, 3, 5)), jnp.ones((2, 5, 6)))
    with pytest.raises(ValueError, match=r"additive_scores: w_query must be \[dq, d\]"):
        additive_scores(weights, jnp.ones((2, 3, 4)), jnp.ones((2, 5, 5)))
    # A 0-d v (an IndexError before) names the weights.
    with pytest.raises(ValueError, match=r"additive_scores: inconsistent weights .* v \(\)"):
        additive_scores(
            weights._replace(v=jnp.float32(1)), jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6))
        )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"head_dim": 0}, "head_dim"),
        ({"head_dim": 2.5}, "head_dim"),
        ({"num_kv_heads": 2.0}, "num_kv_heads"),
        ({"kv_dim": 0}, "kv_dim"),
        ({"out_dim": 4.0}, "out_dim"),
    ],
)
def test_init_multi_head_attention_checks_sizes(kwargs, name):
    with pytest.raises(ValueError, match=f"init_multi_head_attention: {name} must be an int"):
        init_multi_head_attention(jax.random.key(0), 8, 2, **kwargs)


@pytest.mark.parametrize(
    "init, args, match",
    [
        (init_general, (-1, 3), r"init_general: query_dim must be an int >= 1, got -1"),
        (init_general, (4, 2.0), r"init_general: key_dim must be an int >= 1, got 2\.0"),
        (init_additive, (3, 3, 0), r"init_additive: hidden_dim must be an int >= 1, got 0"),
    ],
)
def test_seq2seq_attention_inits_name_a_bad_size(rng, init, args, match):
    with pytest.raises(ValueError, match=match):  # were "math domain error", ZeroDivisionError
        init(rng, *args)


def test_seq2seq_scores_refuse_bad_scale_and_bare_tuple_weights():
    """``dot_scores`` checks ``scale`` as ``dot_product_attention`` does (NaN gave NaN
    scores silently, a string an einsum index error); ``additive_scores`` names a bare
    tuple (was "'tuple' object has no attribute 'v'")."""
    q, k = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match=r"dot_scores: scale must be finite, got nan"):
        dot_scores(q, k, scale=float("nan"))
    with pytest.raises(ValueError, match=r"dot_scores: scale must be a real scalar.*str"):
        dot_scores(q, k, scale="0.5")
    # A traced scale (a learned temperature) still works.
    scaled = jax.jit(lambda s: dot_scores(q, k, scale=s))(0.5)
    np.testing.assert_allclose(scaled, 0.5 * dot_scores(q, k))
    weights = init_additive(jax.random.key(0), 4, 4, 3)
    with pytest.raises(TypeError, match=r"additive_scores: weights must be AdditiveWeights.*tuple"):
        additive_scores(tuple(weights), q, k)


def test_seq2seq_scores_take_nested_lists_and_refuse_integer_inputs_and_weights(rng):
    """query and keys as nested lists failed as "'list' object has no attribute 'ndim'";
    integer ones gave integer scores (dot) or ran silently (general's keys), as did an
    integer ``w`` or ``v``; a list ``v`` failed as "'list' object has no attribute 'ndim'"."""
    q, k = jnp.linspace(-1, 1, 24).reshape(2, 3, 4), jnp.linspace(1, -1, 40).reshape(2, 5, 4)
    w, aw = init_general(rng, 4, 4), init_additive(rng, 4, 4, 3)
    for score in (dot_scores, partial(general_scores, w), partial(additive_scores, aw)):
        np.testing.assert_array_equal(score(q.tolist(), k.tolist()), score(q, k))
    for name, query, keys in (("query", q.astype(int), k), ("keys", q, k.astype(int))):
        for where, score in (
            ("dot_scores", dot_scores),
            ("general_scores", partial(general_scores, w)),
        ):
            with pytest.raises(ValueError, match=rf"^{where}: {name} must be floating.*int32"):
                score(query, keys)
    with pytest.raises(ValueError, match=r"^dot_scores: query must be a floating array, got None"):
        dot_scores(None, k)
    floating = r"must be a floating array \(an init's float32, or another float dtype\), got"
    with pytest.raises(ValueError, match=rf"^general_scores: w {floating} int32"):
        general_scores(w.astype(jnp.int32), q, k)
    with pytest.raises(ValueError, match=rf"^additive_scores: weights.v {floating} int32"):
        additive_scores(aw._replace(v=aw.v.astype(jnp.int32)), q, k)
    with pytest.raises(ValueError, match=rf"^additive_scores: weights.v {floating} list"):
        additive_scores(aw._replace(v=aw.v.tolist()), q, k)


def test_multi_head_attention_refuses_integer_or_misshapen_weights_and_takes_list_inputs(rng):
    """An integer kernel ran silently (cast to x's dtype); a dict of weights (an orbax restore
    without a target) failed as "'dict' object has no attribute 'w_q'"; a list x_kv, and a
    list x_q of project_qkv, warned from jnp.ndim / jnp.shape (DeprecationWarning)."""
    weights = init_multi_head_attention(rng, 8, 2)
    x = jnp.linspace(-1, 1, 2 * 3 * 8).reshape(2, 3, 8)
    floating = r"must be a floating array \(an init's float32, or another float dtype\), got"
    with pytest.raises(ValueError, match=rf"^project_qkv: weights.w_k {floating} int32"):
        multi_head_attention(weights._replace(w_k=weights.w_k.astype(jnp.int32)), x)
    with pytest.raises(ValueError, match=rf"^project_output: weights.b_o {floating} int32"):
        project_output(weights._replace(b_o=weights.b_o.astype(jnp.int32)), jnp.ones((2, 3, 2, 4)))
    with pytest.raises(TypeError, match=r"^project_qkv: weights must be MultiHeadAttentionWeights"):
        multi_head_attention(weights._asdict(), x)
    want = multi_head_attention(weights, x, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(multi_head_attention(weights, x, x.tolist()), want)
        got = project_qkv(weights, x.tolist())
    np.testing.assert_array_equal(got[0], project_qkv(weights, x)[0])
    with pytest.raises(ValueError, match=r"^multi_head_attention: x_kv must be a floating array"):
        multi_head_attention(weights, x, "keys")
