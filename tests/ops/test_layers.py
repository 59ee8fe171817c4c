"""Tests for jaxattn.ops.layers against float64 NumPy references and PyTorch layers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxattn import ops
from jaxattn.ops.layers import (
    DenseWeights,
    EmbeddingWeights,
    FeedForwardWeights,
    LayerNormWeights,
    RMSNormWeights,
    SwiGLUWeights,
    check_dropout_key,
    check_token_ids,
    dense,
    dropout,
    embed,
    feed_forward,
    float32_or_wider,
    gelu,
    init_dense,
    init_embedding,
    init_feed_forward,
    init_layer_norm,
    init_rms_norm,
    init_swiglu,
    layer_norm,
    normal,
    project,
    rms_norm,
    swiglu,
    unembed,
    uniform,
)

B, T, D, F, V = 3, 5, 7, 11, 13
TOL = {"rtol": 1e-5, "atol": 1e-5}
GRAD_TOL = {"order": 1, "modes": ["rev"], "eps": 1e-2, "atol": 1e-2, "rtol": 1e-2}


def f32(np_rng, *shape, scale=1.0):
    return jnp.asarray(scale * np_rng.standard_normal(shape), jnp.float32)


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ----- NumPy float64 references (written independently of jaxattn) -----


def np_gelu_exact(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def np_layer_norm(x, scale, bias, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def np_rms_norm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def random_dense(np_rng, n_in, n_out, bias=True):
    return DenseWeights(f32(np_rng, n_in, n_out), f32(np_rng, n_out) if bias else None)


# ----- project / dense -----


@pytest.mark.parametrize("lead", [(), (3,), (3, 5), (2, 3, 5)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_project_contract_one_matches_numpy(np_rng, lead, with_bias):
    x, w = f32(np_rng, *lead, D), f32(np_rng, D, F)
    b = f32(np_rng, F) if with_bias else None
    y = project(x, w, b)
    want = np.einsum("...i,io->...o", f64(x), f64(w)) + (f64(b) if with_bias else 0.0)
    assert y.shape == (*lead, F) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, **TOL)


@pytest.mark.parametrize("lead", [(), (3,), (3, 2)])
@pytest.mark.parametrize("out_shape", [(11,), (3, 11)])
def test_project_contract_two_matches_numpy(np_rng, lead, out_shape):
    # e.g. the output projection of attention: [B, T, N, H] x [N, H, D] -> [B, T, D].
    x, w, b = f32(np_rng, *lead, 5, 7), f32(np_rng, 5, 7, *out_shape), f32(np_rng, *out_shape)
    y = project(x, w, b, contract_dims=2)
    want = np.tensordot(f64(x), f64(w), axes=([-2, -1], [0, 1])) + f64(b)
    assert y.shape == (*lead, *out_shape)
    np.testing.assert_allclose(y, want, **TOL)


def test_project_heads_out(np_rng):
    # [B, T, D] x [D, N, H] -> [B, T, N, H]: contract one axis, several out axes.
    x, w = f32(np_rng, B, T, D), f32(np_rng, D, 3, 11)
    np.testing.assert_allclose(project(x, w), np.einsum("btd,dnh->btnh", f64(x), f64(w)), **TOL)


def test_project_casts_kernel_to_x_dtype(np_rng):
    x, w, b = f32(np_rng, B, D).astype(jnp.bfloat16), f32(np_rng, D, F), f32(np_rng, F)
    y = project(x, w, b)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(y), f64(x) @ f64(w) + f64(b), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("n_out", [F // 4, 4 * F])  # narrower and wider kernels
def test_project_of_numpy_inputs_is_a_jax_array(np_rng, n_out):
    # NumPy float64 inputs: the result is a JAX array in the dtype JAX gives x (float32
    # unless x64 is on) whatever the kernel's shape; it was a NumPy array, float64 or
    # float32 by the kernel's shape.
    x, w = np_rng.normal(size=(B, T, D)), np_rng.normal(size=(D, n_out))
    y = project(x, w, np.ones(n_out))
    assert isinstance(y, jax.Array) and y.dtype == jnp.asarray(x).dtype
    np.testing.assert_allclose(y, x @ w + 1, **TOL)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "contract_dims"),
    [((B, T, D), (F, D), 1), ((B, 5, 7), (7, 5, F), 2), ((D,), (D, F), 2), ((B, D), (D + 1, F), 1)],
)
def test_project_shape_error(x_shape, w_shape, contract_dims):
    with pytest.raises(ValueError, match=r"project: x has shape"):
        project(jnp.zeros(x_shape), jnp.zeros(w_shape), contract_dims=contract_dims)


@pytest.mark.parametrize("shape", [(D,), (V, D), (D, 3, 5), (2, 3, 5, 7)])
def test_normal_is_jax_random_normal_of_the_shape(rng, shape):
    # The flat draw must not change the numbers: checkpoints and seeds stay comparable.
    expected = 0.25 * jax.random.normal(rng, shape)
    np.testing.assert_array_equal(normal(rng, shape, 0.25), expected)
    x = jax.jit(normal, static_argnums=(1, 2, 3))(rng, shape, 1.0, jnp.bfloat16)
    assert x.shape == shape and x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(x, jax.random.normal(rng, shape, jnp.bfloat16))


@pytest.mark.parametrize("shape", [(D,), (V, 4 * D), (D, 3, 5)])
def test_uniform_is_jax_random_uniform_of_the_shape(rng, shape):
    expected = jax.random.uniform(rng, shape, jnp.float32, -0.3, 0.2)
    np.testing.assert_array_equal(uniform(rng, shape, -0.3, 0.2), expected)
    x = uniform(rng, shape, -1.0, 1.0, jnp.bfloat16)
    assert x.shape == shape and x.dtype == jnp.bfloat16


@pytest.mark.parametrize("use_bias", [True, False])
def test_init_dense(rng, use_bias):
    w = init_dense(rng, 64, 96, use_bias=use_bias)
    assert w.w.shape == (64, 96) and w.w.dtype == jnp.float32
    np.testing.assert_allclose(np.std(np.asarray(w.w)), 1 / 8, rtol=0.05)
    if use_bias:
        assert w.b.shape == (96,) and not np.any(np.asarray(w.b))
    else:
        assert w.b is None
    w = init_dense(rng, 64, 96, std=0.5, dtype=jnp.bfloat16)
    assert w.w.dtype == jnp.bfloat16 and w.b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.std(f64(w.w)), 0.5, rtol=0.05)


def test_dense_matches_numpy_and_torch_linear(np_rng):
    torch = pytest.importorskip("torch")
    weights, x = random_dense(np_rng, D, F), f32(np_rng, B, T, D)
    y = dense(weights, x)
    np.testing.assert_allclose(y, f64(x) @ f64(weights.w) + f64(weights.b), **TOL)
    lin = torch.nn.Linear(D, F).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(f64(weights.w).T))  # torch stores [out, in]
        lin.bias.copy_(torch.from_numpy(f64(weights.b)))
        want = lin(torch.from_numpy(f64(x))).numpy()
    np.testing.assert_allclose(y, want, **TOL)


def test_dense_grads_jit_vmap(np_rng):
    weights, x = random_dense(np_rng, D, F), f32(np_rng, T, D)
    check_grads(dense, (weights, x), **GRAD_TOL)
    xs = f32(np_rng, B, T, D)
    np.testing.assert_allclose(
        jax.vmap(dense, in_axes=(None, 0))(weights, xs), dense(weights, xs), **TOL
    )
    np.testing.assert_allclose(jax.jit(dense)(weights, xs), dense(weights, xs), **TOL)


def test_project_and_norms_under_rank_promotion_raise(np_rng):
    """A [D] bias or scale against [..., D] activations is broadcast explicitly: under
    jax.numpy_rank_promotion("raise") (a user's guard against their own broadcasting bugs)
    dense, layer_norm and rms_norm, so every model, failed with "Operands could not be
    broadcast together" from inside the library."""
    x, w, b = f32(np_rng, B, T, D), f32(np_rng, D, F), f32(np_rng, F)
    scale, bias = f32(np_rng, D), f32(np_rng, D)
    with jax.numpy_rank_promotion("raise"):
        y = project(x, w, b)
        ln, dln = jax.value_and_grad(
            lambda s: jnp.sum(layer_norm(LayerNormWeights(s, bias), x)), argnums=0
        )(scale)
        rms = rms_norm(RMSNormWeights(scale), x)
    np.testing.assert_allclose(y, f64(x) @ f64(w) + f64(b), **TOL)
    want_ln = np_layer_norm(f64(x), f64(scale), f64(bias), 1e-5)
    np.testing.assert_allclose(ln, want_ln.sum(), rtol=1e-5)
    normalised = np_layer_norm(f64(x), np.ones(D), None, 1e-5)  # d sum / d scale
    np.testing.assert_allclose(dln, normalised.sum((0, 1)), **TOL)
    np.testing.assert_allclose(rms, np_rms_norm(f64(x), f64(scale), 1e-6), **TOL)


def test_project_grad_matches_torch(np_rng):
    torch = pytest.importorskip("torch")
    x, w, b = f32(np_rng, B, 5, 7), f32(np_rng, 5, 7, F), f32(np_rng, F)
    g = f32(np_rng, B, F)
    grads = jax.grad(lambda x, w, b: jnp.sum(project(x, w, b, contract_dims=2) * g), (0, 1, 2))(
        x, w, b
    )
    tx, tw, tb = (torch.tensor(f64(a), requires_grad=True) for a in (x, w, b))
    (torch.einsum("bij,ijo->bo", tx, tw) + tb).backward(torch.from_numpy(f64(g)))
    for got, want in zip(grads, (tx.grad, tw.grad, tb.grad)):
        np.testing.assert_allclose(got, want.numpy(), **TOL)


@pytest.mark.parametrize("n_in, n_out", [(11, 7), (7, 11)])
def test_project_derivatives_in_both_modes_to_second_order(np_rng, n_in, n_out):
    """A kernel with more inputs than outputs goes through a custom JVP on CPU (the weight
    gradient as (dyᵀ x)ᵀ): forward, reverse and second-order derivatives must all still be
    those of the matmul, with either argument alone differentiated."""
    with jax.enable_x64(True):
        x = jnp.asarray(np_rng.standard_normal((2, 3, n_in)))
        w = jnp.asarray(np_rng.standard_normal((n_in, n_out)))
        b = jnp.asarray(np_rng.standard_normal(n_out))
        f = lambda x, w, b: jnp.sin(project(x, w, b))
        check_grads(f, (x, w, b), order=2, modes=["fwd", "rev"])
        check_grads(lambda w: f(x, w, b), (w,), order=2, modes=["fwd", "rev"])
        check_grads(lambda x: f(x, w, b), (x,), order=2, modes=["fwd", "rev"])
        hessian = jax.hessian(lambda w: jnp.sum(f(x, w, b)))(w)
        want = jax.hessian(lambda w: jnp.sum(jnp.sin(x @ w + b)))(w)
        np.testing.assert_allclose(hessian, want, rtol=1e-12, atol=1e-12)


def test_project_weight_gradient_is_out_major_on_cpu(np_rng):
    """XLA:CPU computed the weight gradient of a [768, 512] -> [768, 128] projection as
    xᵀ dy in Eigen's transposed-left kernel, 1.5x the time of (dyᵀ x)ᵀ: the compiled
    gradient must hold the [out, in] product."""
    if jax.default_backend() != "cpu":
        pytest.skip("the out-major weight gradient is XLA:CPU's")
    x, w = f32(np_rng, 96, 32), f32(np_rng, 32, 8)
    grad_w = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(project(x, w))))).lower(w)
    dots = [line for line in grad_w.compile().as_text().splitlines() if " dot(" in line]
    assert any("f32[8,32]" in line for line in dots), dots
    assert not any("f32[32,8]" in line for line in dots), dots
    np.testing.assert_allclose(
        jax.grad(lambda w: jnp.sum(jnp.sin(project(x, w))))(w),
        f64(x).T @ np.cos(f64(x) @ f64(w)),
        **TOL,
    )


# ----- embeddings -----


def test_init_embedding(rng):
    e = init_embedding(rng, 96, 64, std=0.5)
    assert e.table.shape == (96, 64) and e.table.dtype == jnp.float32
    np.testing.assert_allclose(np.std(np.asarray(e.table)), 0.5, rtol=0.05)


def test_embed_and_unembed_match_numpy_and_torch(np_rng):
    torch = pytest.importorskip("torch")
    weights = EmbeddingWeights(f32(np_rng, V, D))
    ids = jnp.asarray(np_rng.integers(0, V, (B, T)), jnp.int32)
    y = embed(weights, ids)
    assert y.shape == (B, T, D)
    np.testing.assert_array_equal(y, np.asarray(weights.table)[np.asarray(ids)])
    emb = torch.nn.Embedding(V, D).double()
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(f64(weights.table)))
        np.testing.assert_allclose(y, emb(torch.from_numpy(np.asarray(ids, np.int64))), **TOL)
        x = f32(np_rng, B, T, D)
        logits = unembed(weights, x)
        assert logits.shape == (B, T, V)
        np.testing.assert_allclose(logits, f64(x) @ f64(weights.table).T, **TOL)
        tied = torch.nn.functional.linear(torch.from_numpy(f64(x)), emb.weight)
        np.testing.assert_allclose(logits, tied.numpy(), **TOL)


def test_embed_grad_accumulates_repeated_ids(np_rng):
    weights = EmbeddingWeights(f32(np_rng, V, D))
    ids = jnp.asarray([[0, 3, 3], [12, 0, 3]], jnp.int32)
    g = f32(np_rng, 2, 3, D)
    grad = jax.grad(lambda w: jnp.sum(embed(w, ids) * g))(weights).table
    want = np.zeros((V, D))
    np.add.at(want, np.asarray(ids), f64(g))
    np.testing.assert_allclose(grad, want, **TOL)
    check_grads(lambda t: embed(EmbeddingWeights(t), ids), (weights.table,), **GRAD_TOL)
    check_grads(unembed, (weights, f32(np_rng, T, D)), **GRAD_TOL)


def test_embed_jit_vmap(np_rng):
    weights = EmbeddingWeights(f32(np_rng, V, D))
    ids = jnp.asarray(np_rng.integers(0, V, (B, T)), jnp.int32)
    np.testing.assert_array_equal(jax.jit(embed)(weights, ids), embed(weights, ids))
    np.testing.assert_array_equal(
        jax.vmap(embed, in_axes=(None, 0))(weights, ids), embed(weights, ids)
    )


def test_embed_gives_nan_rows_for_traced_ids_outside_the_vocab(np_rng):
    # An id >= V gave NaN, but a negative one wrapped to a real row (-1: the last) under jit.
    weights = EmbeddingWeights(f32(np_rng, V, D))
    out = jax.jit(embed)(weights, jnp.asarray([-1, -V, V, 2], jnp.int32))
    assert bool(jnp.isnan(out[:3]).all())
    np.testing.assert_array_equal(out[3], weights.table[2])
    # The gradient reaches the in-range id's row only.
    ids = jnp.asarray([-1, 2])
    grad = jax.grad(lambda t: jnp.sum(jax.jit(embed)(EmbeddingWeights(t), ids)[1]))(weights.table)
    want = np.zeros((V, D))
    want[2] = 1.0
    np.testing.assert_array_equal(grad, want)


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        (
            jnp.asarray([0, 5, V], jnp.int32),
            rf"must lie in \[0, {V}\), got values in \[0, {V}\] "
            rf"\(first: {V} at index \(2,\)\)",
        ),
        (
            jnp.asarray([[1, -1]], jnp.int32),
            r"got values in \[-1, 1\] \(first: -1 at index \(0, 1\)\)",
        ),
        (jnp.asarray([1.0, 2.0], jnp.float32), "must be integers, got dtype float32"),
        (jnp.asarray([True, False]), "must be integers, got dtype bool"),
    ],
)
def test_check_token_ids_errors(ids, match):
    with pytest.raises(ValueError, match=match):
        check_token_ids(ids, V)
    with pytest.raises(ValueError, match=match):
        embed(EmbeddingWeights(jnp.zeros((V, D))), ids)


def test_check_token_ids_accepts_valid_and_names_what():
    check_token_ids(jnp.asarray([0, V - 1], jnp.int32), V)
    check_token_ids(np.asarray([0, V - 1], np.int64), V)
    check_token_ids(jnp.zeros((0,), jnp.int32), V)  # empty batch
    with pytest.raises(ValueError, match="labels must lie"):
        check_token_ids(jnp.asarray([V], jnp.int32), V, "labels")
    # Under jit the ids are tracers: the check is documented to be a no-op there.
    jax.jit(lambda i: check_token_ids(i, V) or i)(jnp.asarray([V + 5], jnp.int32))


# ----- norms -----


@pytest.mark.parametrize("use_bias", [True, False])
def test_layer_norm_matches_numpy_and_torch(np_rng, use_bias):
    torch = pytest.importorskip("torch")
    x = f32(np_rng, B, T, D, scale=3.0) + 2.0
    weights = LayerNormWeights(f32(np_rng, D), f32(np_rng, D) if use_bias else None)
    y = layer_norm(weights, x, eps=1e-5)
    bias = f64(weights.bias) if use_bias else None
    want = np_layer_norm(f64(x), f64(weights.scale), bias, 1e-5)
    np.testing.assert_allclose(y, want, **TOL)
    ln = torch.nn.LayerNorm(D, eps=1e-5, bias=use_bias).double()
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(f64(weights.scale)))
        if use_bias:
            ln.bias.copy_(torch.from_numpy(f64(weights.bias)))
        np.testing.assert_allclose(y, ln(torch.from_numpy(f64(x))).numpy(), **TOL)


def test_layer_norm_eps_and_init(np_rng):
    x = f32(np_rng, T, D, scale=0.01)
    init = init_layer_norm(D)
    assert init.scale.shape == init.bias.shape == (D,)
    assert init_layer_norm(D, use_bias=False).bias is None
    for eps in (1e-5, 1e-3):
        want = np_layer_norm(f64(x), 1.0, 0.0, eps)
        np.testing.assert_allclose(layer_norm(init, x, eps=eps), want, **TOL)
    # The default eps is PyTorch's 1e-5; with var(x) ~ 1e-4 another default would show.
    want = np_layer_norm(f64(x), 1.0, 0.0, 1e-5)
    np.testing.assert_allclose(layer_norm(init, x), want, **TOL)


def test_layer_norm_bfloat16_keeps_stats_in_float32(np_rng):
    # A large offset with small spread: bfloat16 statistics would lose the spread.
    x = (f32(np_rng, B, T, 64, scale=4.0) + 100.0).astype(jnp.bfloat16)
    weights = LayerNormWeights(f32(np_rng, 64), f32(np_rng, 64))
    y = layer_norm(weights, x)
    assert y.dtype == jnp.bfloat16
    want = np_layer_norm(f64(x), f64(weights.scale), f64(weights.bias), 1e-5)
    np.testing.assert_allclose(f64(y), want, rtol=1e-2, atol=2e-2)
    # Params in bfloat16 are upcast as well; the output follows x.
    half = LayerNormWeights(*(p.astype(jnp.bfloat16) for p in weights))
    assert layer_norm(half, x.astype(jnp.float32)).dtype == jnp.float32


def test_rms_norm_matches_numpy_and_torch(np_rng):
    torch = pytest.importorskip("torch")
    x = f32(np_rng, B, T, D, scale=3.0)
    weights = RMSNormWeights(f32(np_rng, D))
    y = rms_norm(weights, x, eps=1e-6)
    np.testing.assert_allclose(y, np_rms_norm(f64(x), f64(weights.scale), 1e-6), **TOL)
    rms = torch.nn.RMSNorm(D, eps=1e-6).double()
    with torch.no_grad():
        rms.weight.copy_(torch.from_numpy(f64(weights.scale)))
        np.testing.assert_allclose(y, rms(torch.from_numpy(f64(x))).numpy(), **TOL)
    init = init_rms_norm(D)
    assert init.scale.shape == (D,)
    np.testing.assert_allclose(rms_norm(init, x), np_rms_norm(f64(x), 1.0, 1e-6), **TOL)
    # The default eps (1e-6) only shows when mean(x^2) is near it.
    small = f32(np_rng, B, T, D, scale=1e-3)
    np.testing.assert_allclose(rms_norm(init, small), np_rms_norm(f64(small), 1.0, 1e-6), **TOL)


def test_rms_norm_bfloat16(np_rng):
    x = f32(np_rng, B, T, 64, scale=30.0).astype(jnp.bfloat16)
    weights = RMSNormWeights(f32(np_rng, 64))
    y = rms_norm(weights, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        f64(y), np_rms_norm(f64(x), f64(weights.scale), 1e-6), rtol=1e-2, atol=2e-2
    )


@pytest.mark.parametrize(
    ("dtype", "wide"),
    [("bfloat16", "float32"), ("float16", "float32"), ("float32", "float32"), ("int32", "float32")],
)
def test_float32_or_wider(dtype, wide):
    assert float32_or_wider(dtype) == jnp.dtype(wide)
    with jax.enable_x64(True):
        assert float32_or_wider(jnp.float64) == jnp.dtype(jnp.float64)


def test_norms_of_float64_inputs_compute_in_float64(np_rng):
    """With jax_enable_x64, float64 activations are normalised in float64 (as Flax's norms
    promote), not through float32: float64 gradient checks need the precision."""
    x = 3.0 * np_rng.standard_normal((B, T, D)) + 2.0
    scale, bias = np_rng.standard_normal((2, D))
    with jax.enable_x64(True):
        ln = layer_norm(LayerNormWeights(jnp.asarray(scale), jnp.asarray(bias)), jnp.asarray(x))
        rms = rms_norm(RMSNormWeights(jnp.asarray(scale)), jnp.asarray(x))
    assert ln.dtype == rms.dtype == jnp.float64
    np.testing.assert_allclose(ln, np_layer_norm(x, scale, bias, 1e-5), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rms, np_rms_norm(x, scale, 1e-6), rtol=1e-12, atol=1e-12)


def test_norm_grads_jit_vmap(np_rng):
    x = f32(np_rng, T, D) + 1.0
    ln = LayerNormWeights(f32(np_rng, D), f32(np_rng, D))
    rms = RMSNormWeights(f32(np_rng, D))
    check_grads(layer_norm, (ln, x), **GRAD_TOL)
    check_grads(rms_norm, (rms, x), **GRAD_TOL)
    xs = f32(np_rng, B, T, D)
    for fn, w in ((layer_norm, ln), (rms_norm, rms)):
        np.testing.assert_allclose(jax.jit(fn)(w, xs), fn(w, xs), **TOL)
        np.testing.assert_allclose(jax.vmap(fn, in_axes=(None, 0))(w, xs), fn(w, xs), **TOL)


def test_layer_norm_grad_matches_torch(np_rng):
    torch = pytest.importorskip("torch")
    x, g = f32(np_rng, B, D), f32(np_rng, B, D)
    weights = LayerNormWeights(f32(np_rng, D), f32(np_rng, D))
    grads = jax.grad(lambda w, x: jnp.sum(layer_norm(w, x) * g), (0, 1))(weights, x)
    tx = torch.tensor(f64(x), requires_grad=True)
    ts, tb = (torch.tensor(f64(p), requires_grad=True) for p in weights)
    torch.nn.functional.layer_norm(tx, (D,), ts, tb, eps=1e-5).backward(torch.from_numpy(f64(g)))
    np.testing.assert_allclose(grads[0].scale, ts.grad.numpy(), **TOL)
    np.testing.assert_allclose(grads[0].bias, tb.grad.numpy(), **TOL)
    np.testing.assert_allclose(grads[1], tx.grad.numpy(), rtol=1e-4, atol=1e-4)


# ----- activations and feed-forward blocks -----


def test_gelu_matches_formulas_and_torch(np_rng):
    torch = pytest.importorskip("torch")
    x = f32(np_rng, B, T, D, scale=3.0)
    np.testing.assert_allclose(gelu(x, approximate=False), np_gelu_exact(f64(x)), **TOL)
    np.testing.assert_allclose(gelu(x, approximate=True), np_gelu_tanh(f64(x)), **TOL)
    np.testing.assert_array_equal(gelu(x), gelu(x, approximate=True))  # tanh is the default
    tx = torch.from_numpy(f64(x))
    F_ = torch.nn.functional
    np.testing.assert_allclose(gelu(x), F_.gelu(tx, approximate="tanh").numpy(), **TOL)
    np.testing.assert_allclose(gelu(x, approximate=False), F_.gelu(tx).numpy(), **TOL)
    # The two differ by up to ~1e-3 (e.g. near x = -2.6), so the flag really matters.
    grid = jnp.linspace(-4.0, 4.0, 801, dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(gelu(grid) - gelu(grid, approximate=False)))) > 1e-4
    check_grads(lambda x: gelu(x, approximate=False), (x,), **GRAD_TOL)
    check_grads(gelu, (x,), **GRAD_TOL)


def random_feed_forward(np_rng, bias=True):
    return FeedForwardWeights(random_dense(np_rng, D, F, bias), random_dense(np_rng, F, D, bias))


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("use_bias", [True, False])
def test_feed_forward_matches_numpy(np_rng, approximate, use_bias):
    weights, x = random_feed_forward(np_rng, use_bias), f32(np_rng, B, T, D)
    y = feed_forward(weights, x, approximate_gelu=approximate)
    act = np_gelu_tanh if approximate else np_gelu_exact
    up, down = weights
    h = f64(x) @ f64(up.w) + (f64(up.b) if use_bias else 0.0)
    want = act(h) @ f64(down.w) + (f64(down.b) if use_bias else 0.0)
    assert y.shape == (B, T, D)
    np.testing.assert_allclose(y, want, **TOL)


def test_feed_forward_matches_torch(np_rng):
    torch = pytest.importorskip("torch")
    weights, x = random_feed_forward(np_rng), f32(np_rng, B, T, D)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(D, F), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(F, D)
    ).double()
    with torch.no_grad():
        for layer, w in ((mlp[0], weights.up), (mlp[2], weights.down)):
            layer.weight.copy_(torch.from_numpy(f64(w.w).T))
            layer.bias.copy_(torch.from_numpy(f64(w.b)))
        want = mlp(torch.from_numpy(f64(x))).numpy()
    np.testing.assert_allclose(feed_forward(weights, x), want, **TOL)


def test_init_feed_forward(rng):
    ff = init_feed_forward(rng, 64, 96, std=0.5, out_std=0.25)
    assert ff.up.w.shape == (64, 96) and ff.down.w.shape == (96, 64)
    assert ff.up.b.shape == (96,) and ff.down.b.shape == (64,)
    np.testing.assert_allclose(np.std(np.asarray(ff.up.w)), 0.5, rtol=0.05)
    np.testing.assert_allclose(np.std(np.asarray(ff.down.w)), 0.25, rtol=0.05)
    assert not np.any(np.asarray(init_feed_forward(rng, 64, 96, out_std=0.0).down.w))
    ff = init_feed_forward(rng, 64, 96, use_bias=False)  # default std 1/sqrt(fan_in)
    assert ff.up.b is None and ff.down.b is None
    np.testing.assert_allclose(np.std(np.asarray(ff.up.w)), 1 / 8, rtol=0.05)
    np.testing.assert_allclose(np.std(np.asarray(ff.down.w)), 1 / math.sqrt(96), rtol=0.05)


def test_swiglu_matches_numpy(np_rng, rng):
    weights = SwiGLUWeights(*(random_dense(np_rng, *s) for s in ((D, F), (D, F), (F, D))))
    x = f32(np_rng, B, T, D)
    gate, up, down = weights
    a = f64(x) @ f64(gate.w) + f64(gate.b)
    want = (np_silu(a) * (f64(x) @ f64(up.w) + f64(up.b))) @ f64(down.w) + f64(down.b)
    np.testing.assert_allclose(swiglu(weights, x), want, **TOL)
    init = init_swiglu(rng, D, F)
    assert init.gate.w.shape == init.up.w.shape == (D, F) and init.down.w.shape == (F, D)
    assert init.gate.b is None and init_swiglu(rng, D, F, use_bias=True).down.b.shape == (D,)
    # The gate and up projections get different keys.
    assert not np.allclose(init.gate.w, init.up.w)


def test_feed_forward_grads_jit_vmap(np_rng):
    ff, x = random_feed_forward(np_rng), f32(np_rng, T, D)
    sw = SwiGLUWeights(*(random_dense(np_rng, *s) for s in ((D, F), (D, F), (F, D))))
    check_grads(feed_forward, (ff, x), **GRAD_TOL)
    check_grads(swiglu, (sw, x), **GRAD_TOL)
    xs = f32(np_rng, B, T, D)
    for fn, w in ((feed_forward, ff), (swiglu, sw)):
        np.testing.assert_allclose(jax.jit(fn)(w, xs), fn(w, xs), **TOL)
        np.testing.assert_allclose(jax.vmap(fn, in_axes=(None, 0))(w, xs), fn(w, xs), **TOL)


# ----- dropout -----


def test_dropout_identity_cases(np_rng, rng):
    x = f32(np_rng, B, T, D)
    np.testing.assert_array_equal(dropout(None, x, 0.5, deterministic=True), x)
    np.testing.assert_array_equal(dropout(rng, x, 0.5, deterministic=True), x)
    np.testing.assert_array_equal(dropout(None, x, 0.0), x)
    np.testing.assert_array_equal(dropout(rng, x, 0.0), x)


def test_dropout_statistics(rng):
    rate, n = 0.3, 200_000
    x = jnp.ones((n,), jnp.float32)
    y = np.asarray(dropout(rng, x, rate))
    zeros = y == 0.0
    assert abs(zeros.mean() - rate) < 0.01  # std of the fraction ~ 1e-3
    np.testing.assert_allclose(y[~zeros], 1.0 / (1.0 - rate), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01  # inverted dropout keeps the expectation


def test_dropout_keys_and_values(np_rng, rng):
    x = f32(np_rng, 3, 5, 77)
    k1, k2 = jax.random.split(rng)
    a, b, c = dropout(k1, x, 0.5), dropout(k1, x, 0.5), dropout(k2, x, 0.5)
    np.testing.assert_array_equal(a, b)  # same key, same mask
    assert np.any(np.asarray(a != c))
    kept = np.asarray(a) != 0
    np.testing.assert_allclose(np.asarray(a)[kept], 2 * np.asarray(x)[kept], rtol=1e-6)
    np.testing.assert_array_equal(jax.jit(dropout, static_argnums=2)(k1, x, 0.5), a)
    # vmap over keys: each row its own mask.
    rows = jax.vmap(lambda k: dropout(k, x[0], 0.5))(jax.random.split(k1, 3))
    assert rows.shape == (3, 5, 77) and np.any(np.asarray(rows[0] != rows[1]))
    # Gradient is the same mask, scaled.
    g = jax.grad(lambda x: jnp.sum(dropout(k1, x, 0.5)))(x)
    np.testing.assert_array_equal(np.asarray(g), np.where(kept, 2.0, 0.0))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dropout_keeps_x_dtype_for_any_float_rate(rng, dtype):
    # A NumPy or JAX float32 rate (a config from np.linspace) is not weakly typed: x / (1 -
    # rate) promoted bfloat16 activations, and every layer after them, to float32.
    x = jnp.ones((4, 8), dtype)
    want = dropout(rng, x, 0.25)
    for rate in (np.float32(0.25), np.float64(0.25), jnp.float32(0.25)):
        got = dropout(rng, x, rate)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, want)


def test_dropout_bad_inputs(rng):
    x = jnp.ones((3, 5))
    with pytest.raises(ValueError, match="needs an rng"):
        dropout(None, x, 0.1)
    for rate in (-0.1, 1.0, 1.5, float("nan"), None, "0.1"):  # None: was a TypeError
        with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
            dropout(rng, x, rate)
    # A rate traced by jit is valid or not only at run time: named as traced, not as out
    # of range ("got JitTracer(...)").
    with pytest.raises(ValueError, match="dropout rate must be a concrete number, got a traced"):
        jax.jit(lambda rate: dropout(rng, x, rate))(0.5)
    with pytest.raises(ValueError, match="dropout: x must be floating"):  # was cast silently
        dropout(rng, jnp.ones((3, 5), jnp.int32), 0.1)


def test_check_dropout_key(rng):
    check_dropout_key(None, False, "f")  # dropout off: no key needed
    check_dropout_key(rng, True, "f")
    with pytest.raises(ValueError, match=r"^f: rate 0\.1 needs a dropout_rng key$"):
        check_dropout_key(None, True, "f: rate 0.1", "a dropout_rng key")


def test_check_token_ids_on_constant_closed_over_by_jit():
    """A concrete array captured by a jitted function is still checked, not traced."""
    table = EmbeddingWeights(jnp.ones((V, 3)))
    good = jnp.asarray([0, V - 1], jnp.int32)
    bad = jnp.asarray([0, V], jnp.int32)
    assert jax.jit(lambda w: embed(w, good))(table).shape == (2, 3)
    with pytest.raises(ValueError, match=rf"\[0, {V}\)"):
        jax.jit(lambda w: embed(w, bad))(table)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("d", [1, 5])
def test_norms_refuse_a_last_axis_other_than_d(norm, d):
    from jaxattn.ops import layers

    weights = layers.init_layer_norm(4) if norm == "layer_norm" else layers.init_rms_norm(4)
    with pytest.raises(ValueError, match=f"{norm}: x must be"):
        getattr(layers, norm)(weights, jnp.ones((2, d)))


def test_layer_norm_refuses_a_bias_that_does_not_match_the_scale():
    from jaxattn.ops import layers

    weights = layers.init_layer_norm(4)
    for bias in (jnp.zeros((1,)), jnp.zeros((4, 1))):  # broadcast silently: [4, 1] per row
        with pytest.raises(ValueError, match=r"layer_norm: bias \(.*\) must match scale \(4,\)"):
            layers.layer_norm(weights._replace(bias=bias), jnp.ones((4, 4)))


def test_embed_takes_a_list_of_ids():
    from jaxattn.ops import layers

    weights = layers.EmbeddingWeights(jnp.arange(15.0).reshape(5, 3))
    assert (layers.embed(weights, [1, 4]) == weights.table[jnp.array([1, 4])]).all()
    with pytest.raises(ValueError, match="token ids"):
        layers.embed(weights, (1, 5))


def test_init_embedding_default_std_is_gpt2s(rng):
    e = init_embedding(rng, 96, 64)
    np.testing.assert_allclose(np.std(np.asarray(e.table)), 0.02, rtol=0.05)


def test_project_refuses_a_bias_of_another_shape():
    # [H, N] for an [N, H] output has the right size: a blind reshape scrambled it silently.
    x, w = jnp.ones((2, 4)), jnp.ones((4, 3, 2))
    with pytest.raises(ValueError, match=r"project: bias has shape \(2, 3\)"):
        project(x, w, jnp.ones((2, 3)))
    assert project(x, w, jnp.ones((3, 2))).shape == (2, 3, 2)


def test_integer_activations_are_refused_by_name(rng):
    # x sets the compute dtype: integer x (token ids where embeddings belong) ran on weights
    # truncated to ints, and the norms returned their result truncated.
    from jaxattn.ops import layers

    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"project: x must be floating.*int32"):
        layers.dense(layers.init_dense(rng, 4, 3), ids)
    with pytest.raises(ValueError, match=r"project: x must be floating.*bool"):
        layers.feed_forward(layers.init_feed_forward(rng, 4, 8), ids.astype(bool))
    with pytest.raises(ValueError, match=r"layer_norm: x must be floating.*int32"):
        layers.layer_norm(layers.init_layer_norm(4), ids)
    with pytest.raises(ValueError, match=r"rms_norm: x must be floating.*int32"):
        layers.rms_norm(layers.init_rms_norm(4), ids)


@pytest.mark.parametrize(
    ("init", "args", "match"),
    [
        ("init_dense", (0, 3), r"init_dense: in_dim must be an int >= 1, got 0"),
        ("init_dense", (-2, 3), r"init_dense: in_dim must be an int >= 1, got -2"),
        ("init_dense", (2.0, 3), r"init_dense: in_dim must be an int >= 1, got 2\.0"),
        ("init_dense", (2, 0), r"init_dense: out_dim must be an int >= 1, got 0"),
        ("init_embedding", (0, 3), r"init_embedding: vocab_size must be an int >= 1, got 0"),
        ("init_embedding", (5, True), r"init_embedding: dim must be an int >= 1, got True"),
        ("init_feed_forward", (4, 0), r"init_dense: out_dim must be an int >= 1, got 0"),
    ],
)
def test_inits_refuse_sizes_that_are_not_positive_ints(rng, init, args, match):
    from jaxattn.ops import layers

    with pytest.raises(ValueError, match=match):
        getattr(layers, init)(rng, *args)


@pytest.mark.parametrize("init", ["init_layer_norm", "init_rms_norm"])
def test_norm_inits_refuse_sizes_that_are_not_positive_ints(init):
    from jaxattn.ops import layers

    with pytest.raises(ValueError, match=rf"{init}: dim must be an int >= 1, got 0"):
        getattr(layers, init)(0)


_KEY = jax.random.key(0)
# Every initialiser (and table) of ops that takes a dtype, with valid sizes (rope_frequencies
# has its own check: float32 or float64).
_DTYPE_TAKERS = {
    "init_dense": lambda dtype: ops.init_dense(_KEY, 4, 3, dtype=dtype),
    "init_embedding": lambda dtype: ops.init_embedding(_KEY, 5, 4, dtype=dtype),
    "init_layer_norm": lambda dtype: ops.init_layer_norm(4, dtype=dtype),
    "init_rms_norm": lambda dtype: ops.init_rms_norm(4, dtype=dtype),
    "init_feed_forward": lambda dtype: ops.init_feed_forward(_KEY, 4, 8, dtype=dtype),
    "init_swiglu": lambda dtype: ops.init_swiglu(_KEY, 4, 8, dtype=dtype),
    "init_general": lambda dtype: ops.init_general(_KEY, 4, 4, dtype=dtype),
    "init_additive": lambda dtype: ops.init_additive(_KEY, 4, 4, 6, dtype=dtype),
    "init_multi_head_attention": lambda dtype: ops.init_multi_head_attention(
        _KEY, 8, 2, dtype=dtype
    ),
    "init_lstm": lambda dtype: ops.init_lstm(_KEY, 4, 3, dtype=dtype),
    "init_lstm_stack": lambda dtype: ops.init_lstm_stack(_KEY, 4, 3, num_layers=2, dtype=dtype),
    "sinusoidal_positions": lambda dtype: ops.sinusoidal_positions(6, 4, dtype=dtype),
    "init_learned_positions": lambda dtype: ops.init_learned_positions(_KEY, 6, 4, dtype=dtype),
}


@pytest.mark.parametrize("name", sorted(_DTYPE_TAKERS))
def test_weights_and_tables_refuse_a_dtype_that_is_not_floating(name):
    """An integer layer-norm scale got no gradient and an integer sinusoid table was all
    -1, 0 and 1, silently; the random initialisers failed inside jax.random, naming
    neither the function nor the argument."""
    make = _DTYPE_TAKERS[name]
    for dtype in (jnp.int32, jnp.bool_, "int8", None):
        with pytest.raises(ValueError, match=rf"{name}: dtype must be a floating dtype, got"):
            make(dtype)
    for dtype in (jnp.float32, jnp.bfloat16, np.float16):  # (each leaf in the dtype asked)
        leaves = jax.tree.leaves(make(dtype))
        assert leaves and all(leaf.dtype == jnp.dtype(dtype) for leaf in leaves), name


@pytest.mark.parametrize("contract_dims", [-1, True, 1.0, 3])
def test_project_refuses_a_contract_dims_outside_the_kernel_rank(contract_dims):
    # -1 took w.shape[:-1] = () as the contracted axes of a [F] kernel and silently returned
    # the outer product [B, D, F]; True and 1.0 passed as 1.
    with pytest.raises(ValueError, match=r"project: contract_dims must be an int in \[0, "):
        project(
            jnp.ones((B, D)),
            jnp.ones((F,) if contract_dims == -1 else (D, F)),
            contract_dims=contract_dims,
        )


@pytest.mark.parametrize(("dtype", "vocab"), [(jnp.int8, 200), (jnp.int16, 40000)])
def test_embed_gives_nan_for_negative_narrow_ids_of_a_vocab_beyond_their_range(dtype, vocab):
    # jnp.where(ids < 0, V, ids) wrapped V in the ids' dtype: int16 -1 became row V - 65536.
    weights = EmbeddingWeights(jnp.arange(vocab, dtype=jnp.float32)[:, None])
    out = jax.jit(embed)(weights, jnp.asarray([-1, 5, 100], dtype))
    assert bool(jnp.isnan(out[0]).all())
    np.testing.assert_array_equal(out[1:, 0], [5.0, 100.0])


@pytest.mark.parametrize(
    ("fn", "field", "kind"),
    [
        ("dense", "w", "int"),
        ("dense", "b", "int"),
        ("dense", "w", "list"),
        ("embed", "table", "int"),
        ("embed", "table", "None"),
        ("unembed", "table", "int"),
        ("layer_norm", "scale", "int"),
        ("layer_norm", "bias", "list"),
        ("rms_norm", "scale", "int"),
        ("rms_norm", "scale", "None"),
    ],
)
def test_layers_refuse_weights_that_are_not_floating_arrays(rng, fn, field, kind):
    """An integer kernel, bias, norm scale or table ran silently (cast to x's dtype: the
    truncated values gave wrong outputs; embed returned integer rows); a list or None leaf
    failed with JAX's DeprecationWarning or an AttributeError, naming neither."""
    from jaxattn.ops import layers

    good = {
        "dense": init_dense(rng, D, F),
        "embed": init_embedding(rng, V, D),
        "unembed": init_embedding(rng, V, D),
        "layer_norm": init_layer_norm(D),
        "rms_norm": init_rms_norm(D),
    }[fn]
    value = getattr(good, field)
    bad = {"int": jnp.asarray(value).astype(jnp.int32), "list": value.tolist(), "None": None}
    weights = good._replace(**{field: bad[kind]})
    x = jnp.asarray([1, 2]) if fn == "embed" else jnp.ones((B, D))
    name = {"w": "project: the kernel w", "b": "project: the bias b"}.get(field)
    match = (name or f"{fn}: weights.{field}") + " must be a floating array"
    with pytest.raises(ValueError, match=rf"^{match} \(an init's float32, .*got {kind}"):
        getattr(layers, fn)(weights, x)
    with pytest.raises(ValueError, match=rf"^{match}"):  # (under jit too)
        jax.jit(lambda x: getattr(layers, fn)(weights, x))(x)


def test_layers_name_weights_of_another_container(rng):
    """A bare tuple, a dict (an orbax restore without a target) or the bare table failed as
    "'tuple' object has no attribute 'w'", naming neither the function nor the argument."""
    x = jnp.ones((B, D))
    dense_w, ff, sw = init_dense(rng, D, F), init_feed_forward(rng, D, F), init_swiglu(rng, D, F)
    table = init_embedding(rng, V, D).table
    cases = [
        (lambda: dense(tuple(dense_w), x), r"dense: weights must be DenseWeights \(init_dense\)"),
        (lambda: dense(dense_w._asdict(), x), r"dense: weights must be DenseWeights.*got dict"),
        (lambda: embed(table, [1]), r"embed: weights must be EmbeddingWeights"),
        (lambda: unembed({"table": table}, x), r"unembed: weights must be EmbeddingWeights"),
        (lambda: layer_norm(tuple(init_layer_norm(D)), x), r"layer_norm: weights must be Layer"),
        (lambda: rms_norm(jnp.ones(D), x), r"rms_norm: weights must be RMSNormWeights.*ArrayImpl"),
        (lambda: feed_forward(tuple(ff), x), r"feed_forward: weights must be FeedForwardWeights"),
        (lambda: swiglu(tuple(sw), x), r"swiglu: weights must be SwiGLUWeights \(init_swiglu\)"),
    ]
    for call, match in cases:
        with pytest.raises(TypeError, match=match):
            call()


def test_layers_take_nested_list_activations_and_name_none(rng):
    """A nested list of floats failed in project and dropout as "Cannot determine dtype of
    [[...]]" (the norms took one); None failed as "None is not a valid value for jnp.array"
    or "'NoneType' object has no attribute 'shape'", naming neither."""
    x = np.linspace(-1.0, 1.0, B * D).reshape(B, D)
    ff, sw = init_feed_forward(rng, D, F), init_swiglu(rng, D, F)
    for fn in (
        lambda x: dense(init_dense(rng, D, F), x),
        lambda x: unembed(init_embedding(rng, V, D), x),
        lambda x: feed_forward(ff, x),
        lambda x: swiglu(sw, x),
        lambda x: dropout(rng, x, 0.5),
    ):
        np.testing.assert_array_equal(fn(x.tolist()), fn(jnp.asarray(x, jnp.float32)))
    for call, where in (
        (lambda: dense(init_dense(rng, D, F), None), "project"),
        (lambda: layer_norm(init_layer_norm(D), None), "layer_norm"),
        (lambda: rms_norm(init_rms_norm(D), None), "rms_norm"),
        (lambda: dropout(rng, None, 0.5), "dropout"),
    ):
        with pytest.raises(
            ValueError, match=rf"^{where}: x must be a floating array, got NoneType"
        ):
            call()


def test_embed_names_float_ids_under_jit():
    # Concrete float ids were refused by name; traced ones failed in jnp.take as "indices
    # must have an integer type", naming neither embed nor the ids.
    weights = EmbeddingWeights(jnp.ones((V, D)))
    match = r"^embed: token ids must be integers, got dtype float32"
    for fn in (embed, jax.jit(embed)):
        with pytest.raises(ValueError, match=match):
            fn(weights, jnp.asarray([1.0, 2.0]))


def test_weights_and_activations_of_torch_tensors_are_named(rng):
    """A torch tensor (its dtype torch.float32, which JAX cannot read) as a weight or an
    activation failed inside the floating checks as "Cannot interpret 'torch.float32' as a
    data type", naming neither the function nor the argument."""
    torch = pytest.importorskip("torch")
    from jaxattn.ops.lstm import init_lstm, lstm_scan

    x = jnp.ones((B, D))
    dense_w, ln = init_dense(rng, D, F), init_layer_norm(D)
    as_torch = lambda a: torch.from_numpy(np.array(a))
    got = r"Tensor of torch.float32 \(not a JAX or NumPy array\)"
    cases = [
        (lambda: dense(dense_w._replace(w=as_torch(dense_w.w)), x), r"project: the kernel w"),
        (lambda: layer_norm(ln._replace(scale=as_torch(ln.scale)), x), r"layer_norm: weights."),
        (lambda: dense(dense_w, as_torch(x)), r"project: x must be floating"),
        (lambda: lstm_scan(jax.tree.map(as_torch, init_lstm(rng, D, 3)), x[None]), r"lstm_scan"),
    ]
    for call, where in cases:
        with pytest.raises(ValueError, match=rf"^{where}.*got (.w_ih )?{got}"):
            call()
