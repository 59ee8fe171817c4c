"""Tests for jaxattn.ops.positions against float64 NumPy references (and a PyTorch RoPE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxattn.ops.positions import (
    LearnedPositionWeights,
    apply_rope,
    init_learned_positions,
    learned_positions,
    rope_frequencies,
    sinusoidal_positions,
)

B, T, N, H = 3, 5, 7, 22  # H/2 = 11, distinct from every other axis
TOL = {"rtol": 1e-5, "atol": 1e-5}


def f32(np_rng, *shape):
    return jnp.asarray(np_rng.standard_normal(shape), jnp.float32)


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ----- NumPy float64 references (written independently of jaxattn) -----


def np_sinusoidal(length, dim, base=10000.0):
    pe = np.zeros((length, dim))
    for pos in range(length):
        for i in range(dim // 2):
            angle = pos / base ** (2 * i / dim)
            pe[pos, 2 * i] = np.sin(angle)
            pe[pos, 2 * i + 1] = np.cos(angle)
    return pe


def np_rope(x, positions, base=10000.0):
    """Rotate pairs (x[i], x[i + H/2]) as the complex number x[i] + j x[i + H/2]."""
    x = f64(x)
    h = x.shape[-1] // 2
    positions = np.broadcast_to(f64(positions), x.shape[:2])  # [B, T]
    theta = positions[..., None] / base ** (np.arange(h) * 2.0 / (2 * h))  # [B, T, H/2]
    z = (x[..., :h] + 1j * x[..., h:]) * np.exp(1j * theta)[:, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


# ----- sinusoidal -----


@pytest.mark.parametrize(("length", "dim", "base"), [(13, 6, 10000.0), (5, 22, 100.0), (1, 2, 1e4)])
def test_sinusoidal_matches_numpy(length, dim, base):
    pe = sinusoidal_positions(length, dim, base=base)
    assert pe.shape == (length, dim) and pe.dtype == jnp.float32
    np.testing.assert_allclose(pe, np_sinusoidal(length, dim, base), rtol=0, atol=1e-6)


def test_sinusoidal_long_is_accurate():
    # Angles of ~2000 rad: float32 angle arithmetic would be off by ~1e-4 here.
    pe = sinusoidal_positions(2053, 10)
    np.testing.assert_allclose(pe, np_sinusoidal(2053, 10), rtol=0, atol=1e-6)


def test_sinusoidal_dtype_and_jit():
    pe = sinusoidal_positions(11, 6, dtype=jnp.bfloat16)
    assert pe.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(pe), np_sinusoidal(11, 6), atol=1e-2)
    jitted = jax.jit(sinusoidal_positions, static_argnums=(0, 1))(11, 6)
    np.testing.assert_array_equal(jitted, sinusoidal_positions(11, 6))
    # Used inside a jitted model: added to embeddings of shape [B, T, D].
    x = jnp.zeros((B, 11, 6), jnp.float32)
    y = jax.jit(lambda x: x + sinusoidal_positions(x.shape[1], x.shape[2]))(x)
    np.testing.assert_allclose(y[2], np_sinusoidal(11, 6), atol=1e-6)


@pytest.mark.parametrize(
    ("length", "dim"), [(5, 7), (5, 0), (5, -2), (-1, 6), (4.0, 6), (5, 6.0), (5, True)]
)
def test_sinusoidal_bad_inputs(length, dim):  # (floats and bools were NumPy's TypeError)
    with pytest.raises(ValueError, match="sinusoidal_positions"):
        sinusoidal_positions(length, dim)


def test_sinusoidal_refuses_a_base_that_is_not_positive():
    # Was a table of NaN (base < 0) or inf/NaN (base 0) with only NumPy's RuntimeWarning.
    for base in (0.0, -10000.0, float("nan")):
        with pytest.raises(ValueError, match="sinusoidal_positions: base must be positive"):
            sinusoidal_positions(4, 6, base=base)


# ----- learned -----


@pytest.mark.parametrize(
    ("max_len", "dim", "name"), [(-1, 4, "max_len"), (4.0, 4, "max_len"), (0, 4, "max_len"),
                                 (4, True, "dim")]
)  # fmt: skip
def test_init_learned_positions_names_a_bad_size(rng, max_len, dim, name):
    # Were an MLIRError, a shape TypeError, a (4, 1) table from True, and an empty table.
    with pytest.raises(ValueError, match=f"init_learned_positions: {name} must be an int"):
        init_learned_positions(rng, max_len, dim)


def test_init_learned_positions(rng):
    w = init_learned_positions(rng, 96, 64, std=0.5)
    assert w.table.shape == (96, 64) and w.table.dtype == jnp.float32
    np.testing.assert_allclose(np.std(np.asarray(w.table)), 0.5, rtol=0.05)
    assert init_learned_positions(rng, 13, 6, dtype=jnp.bfloat16).table.dtype == jnp.bfloat16


def test_init_learned_positions_default_std_is_gpt2s(rng):
    w = init_learned_positions(rng, 96, 64)
    np.testing.assert_allclose(np.std(np.asarray(w.table)), 0.02, rtol=0.05)


@pytest.mark.parametrize("shape", [(T,), (B, T)])
def test_learned_positions_lookup_and_grad(np_rng, shape):
    weights = LearnedPositionWeights(f32(np_rng, 13, 6))
    positions = jnp.asarray(np_rng.integers(0, 13, shape), jnp.int32)
    y = learned_positions(weights, positions)
    assert y.shape == (*shape, 6)
    np.testing.assert_array_equal(y, np.asarray(weights.table)[np.asarray(positions)])
    g = f32(np_rng, *shape, 6)
    grad = jax.grad(lambda w: jnp.sum(learned_positions(w, positions) * g))(weights).table
    want = np.zeros((13, 6))
    np.add.at(want, np.asarray(positions), f64(g))
    np.testing.assert_allclose(grad, want, **TOL)
    check_grads(
        lambda t: learned_positions(LearnedPositionWeights(t), positions),
        (weights.table,),
        order=1,
        modes=["rev"],
        eps=1e-2,
        atol=1e-2,
        rtol=1e-2,
    )


def test_learned_positions_jit_vmap(np_rng):
    weights = LearnedPositionWeights(f32(np_rng, 13, 6))
    positions = jnp.asarray(np_rng.integers(0, 13, (B, T)), jnp.int32)
    want = learned_positions(weights, positions)
    np.testing.assert_array_equal(jax.jit(learned_positions)(weights, positions), want)
    np.testing.assert_array_equal(
        jax.vmap(learned_positions, in_axes=(None, 0))(weights, positions), want
    )
    # A traced decoding offset is not checked (it cannot be), but still looks up correctly.
    at = jax.jit(lambda w, t: learned_positions(w, t + jnp.arange(2)))(weights, jnp.int32(4))
    np.testing.assert_array_equal(at, np.asarray(weights.table)[4:6])


@pytest.mark.parametrize(
    ("positions", "match"),
    [
        (np.arange(14), r"max_len=13.*got values in \[0, 13\]"),
        (np.asarray([[0, 20]]), r"max_len=13.*got values in \[0, 20\]"),
        (np.asarray([3, -1]), r"max_len=13.*got values in \[-1, 3\]"),
        (np.asarray([1.0, 2.0], np.float32), "must be integers"),
        # Not wrapped to 3 by jnp.asarray (64-bit types off) before the check.
        (np.asarray([2**32 + 3]), r"max_len=13.*got values in \[4294967299, 4294967299\]"),
    ],
)
def test_learned_positions_bad_inputs(positions, match):
    weights = LearnedPositionWeights(jnp.zeros((13, 6), jnp.float32))
    with pytest.raises(ValueError, match=match) as error:
        learned_positions(weights, positions)  # as given: jnp.asarray would wrap the int64
    assert "token" not in str(error.value)  # positions, not token ids


# ----- RoPE -----


@pytest.mark.parametrize("shape", [(T,), (B, T)])
def test_rope_frequencies_match_numpy(np_rng, shape):
    positions = jnp.asarray(np_rng.integers(0, 50, shape), jnp.int32)
    sin, cos = rope_frequencies(positions, H, base=500.0)
    assert sin.shape == cos.shape == (*shape, H // 2)
    assert sin.dtype == cos.dtype == jnp.float32
    theta = f64(positions)[..., None] / 500.0 ** (np.arange(0, H, 2) / H)
    np.testing.assert_allclose(sin, np.sin(theta), **TOL)
    np.testing.assert_allclose(cos, np.cos(theta), **TOL)


@pytest.mark.parametrize("pos_shape", [(T,), (B, T)])
@pytest.mark.parametrize("base", [10000.0, 50.0])
def test_apply_rope_matches_numpy(np_rng, pos_shape, base):
    x = f32(np_rng, B, T, N, H)
    positions = jnp.asarray(np_rng.integers(0, 40, pos_shape), jnp.int32)
    y = apply_rope(x, positions, base=base)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, np_rope(x, positions, base), **TOL)


def test_apply_rope_matches_torch_rotate_half(np_rng):
    torch = pytest.importorskip("torch")
    x = f32(np_rng, B, T, N, H)
    positions = np.asarray([0, 3, 4, 9, 17])

    def rotate_half(t):
        a, b = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2 :]
        return torch.cat([-b, a], dim=-1)

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, H, 2, dtype=torch.float64) / H))
    freqs = torch.outer(torch.from_numpy(positions).double(), inv_freq)  # [T, H/2]
    emb = torch.cat([freqs, freqs], dim=-1)[None, :, None, :]  # [1, T, 1, H]
    tx = torch.from_numpy(f64(x))
    want = tx * emb.cos() + rotate_half(tx) * emb.sin()
    np.testing.assert_allclose(apply_rope(x, jnp.asarray(positions)), want.numpy(), **TOL)


def test_rope_dot_product_depends_only_on_offset(np_rng):
    q, k = f32(np_rng, 1, 1, 1, H), f32(np_rng, 1, 1, 1, H)

    def score(m, n):
        rq = apply_rope(q, jnp.asarray([m], jnp.int32))
        rk = apply_rope(k, jnp.asarray([n], jnp.int32))
        return float(jnp.sum(rq * rk))

    for offset in (0, 3, -5):
        scores = [score(n + offset, n) for n in (0, 1, 7, 40, 123)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    assert abs(score(3, 0) - score(4, 0)) > 1e-3  # ...but it does depend on the offset
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)


def test_apply_rope_per_row_offsets_equal_shifting(np_rng):
    offsets = np.asarray([0, 2, 6])  # e.g. left padding, or where each row's cache ends
    x = f32(np_rng, B, T, N, H)
    positions = jnp.asarray(offsets[:, None] + np.arange(T)[None], jnp.int32)  # [B, T]
    y = apply_rope(x, positions)
    for b, off in enumerate(offsets):
        # Rotating row b at positions off..off+T-1 equals placing it after `off` other tokens.
        longer = jnp.concatenate([f32(np_rng, 1, off, N, H), x[b : b + 1]], axis=1)
        shifted = apply_rope(longer, jnp.arange(off + T))[:, off:]
        np.testing.assert_allclose(y[b : b + 1], shifted, **TOL)
    # Positions [T] are shared by every row: same as tiling them to [B, T].
    shared = jnp.arange(T) + 4
    np.testing.assert_allclose(
        apply_rope(x, shared), apply_rope(x, jnp.tile(shared, (B, 1))), rtol=0, atol=0
    )


def test_apply_rope_is_a_rotation(np_rng):
    x = f32(np_rng, B, T, N, H)
    positions = jnp.arange(T) * 7
    y = apply_rope(x, positions)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), **TOL)
    np.testing.assert_allclose(apply_rope(y, -positions), x, **TOL)  # inverse rotation


def test_apply_rope_bfloat16_computes_in_float32(np_rng):
    x = f32(np_rng, B, T, N, H).astype(jnp.bfloat16)
    positions = jnp.arange(T) + 1000
    y = apply_rope(x, positions)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(f64(y), np_rope(x, positions), rtol=1e-2, atol=2e-2)


def test_apply_rope_of_float64_inputs_computes_in_float64(np_rng):
    x = np_rng.standard_normal((2, 6, 3, 8))
    positions = np.array([0, 1, 5, 100, 4095, 70000])  # far angles show float32's rounding
    with jax.enable_x64(True):
        got = apply_rope(jnp.asarray(x), jnp.asarray(positions))
        sin, _ = rope_frequencies(jnp.asarray(positions), 8, dtype=jnp.float64)
    assert got.dtype == sin.dtype == jnp.float64
    np.testing.assert_allclose(got, np_rope(x, positions), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_row", [False, True], ids=["[T]", "[B, T]"])
def test_apply_rope_under_rank_promotion_raise(np_rng, per_row):
    """positions [..., T, 1] times the [H/2] frequencies, broadcast explicitly: under
    jax.numpy_rank_promotion("raise") rope failed with "Operands could not be broadcast
    together" from inside rope_frequencies."""
    x = f32(np_rng, B, T, N, H)
    positions = np_rng.integers(0, 50, (B, T) if per_row else (T,))
    with jax.numpy_rank_promotion("raise"):
        got = apply_rope(x, jnp.asarray(positions))
    np.testing.assert_allclose(got, np_rope(x, positions), **TOL)


def test_apply_rope_jit_vmap_grad(np_rng):
    x = f32(np_rng, B, T, N, H)
    positions = jnp.asarray(np_rng.integers(0, 30, (B, T)), jnp.int32)
    want = np_rope(x, positions)
    np.testing.assert_allclose(jax.jit(apply_rope)(x, positions), want, **TOL)
    # A traced start offset, as in KV-cached decoding.
    step = jax.jit(lambda x, start: apply_rope(x, start + jnp.arange(T)))
    np.testing.assert_allclose(step(x, jnp.int32(9)), np_rope(x, 9 + np.arange(T)), **TOL)
    stacked = jnp.stack([x, 2 * x])  # vmap over an extra leading axis
    out = jax.vmap(apply_rope, in_axes=(0, None))(stacked, positions)
    np.testing.assert_allclose(out[1], 2 * want, **TOL)
    check_grads(
        lambda x: apply_rope(x, positions),
        (x,),
        order=1,
        modes=["rev"],
        eps=1e-2,
        atol=1e-2,
        rtol=1e-2,
    )
    # The rotation is orthogonal: the VJP of a cotangent g is g rotated backwards.
    g = f32(np_rng, B, T, N, H)
    grad = jax.grad(lambda x: jnp.sum(apply_rope(x, positions) * g))(x)
    np.testing.assert_allclose(grad, np_rope(g, -np.asarray(positions)), **TOL)


@pytest.mark.parametrize(
    ("x_shape", "pos_shape", "match"),
    [
        ((B, T, N, 7), (T,), "H must be even"),
        ((T, N, H), (T,), r"x must be \[B, T, N, H\]"),
        ((B, T, N, H), (T + 1,), r"positions must be \[T\]"),
        ((B, T, N, H), (B + 1, T), r"positions must be \[T\]"),
        ((B, T, N, H), (T, B), r"positions must be \[T\]"),
        ((B, T, N, H), (1, B, T), r"positions must be \[T\]"),
    ],
)
def test_apply_rope_bad_inputs(x_shape, pos_shape, match):
    with pytest.raises(ValueError, match=match):
        apply_rope(jnp.zeros(x_shape), jnp.zeros(pos_shape, jnp.int32))


def test_apply_rope_refuses_integer_activations():
    # The result is cast back to x's dtype: integer x would come back rotated and truncated.
    with pytest.raises(ValueError, match=r"apply_rope: x must be floating.*int32"):
        apply_rope(jnp.ones((B, T, N, H), jnp.int32), jnp.arange(T))


def test_rope_frequencies_bad_inputs():
    for head_dim in (7, 0, -2, None, "8", True, 8.0):  # None, "8": a bare TypeError
        with pytest.raises(ValueError, match="head_dim must be a positive even number"):
            rope_frequencies(jnp.arange(T), head_dim)
    with pytest.raises(ValueError, match=r"positions must be \[T\] or \[B, T\]"):
        rope_frequencies(jnp.zeros((B, T, 1), jnp.int32), H)
    for base in (0.0, -10000.0, float("nan")):
        with pytest.raises(ValueError, match="base must be positive"):
            rope_frequencies(jnp.arange(T), H, base=base)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.int32):
        with pytest.raises(ValueError, match="dtype must be float32 or float64"):
            rope_frequencies(jnp.arange(T), H, dtype=dtype)


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.bfloat16, jnp.float16])
def test_rope_refuses_positions_that_cannot_count(dtype):
    """A bool position reads as 0/1, and bfloat16 (float16) holds whole numbers exactly only
    up to 256 (2048): position 4095 came out rotated as 4096 (error ~1 in the output), and a
    float16 131071 as inf (NaN)."""
    positions = jnp.arange(T).astype(dtype)
    match = rf"positions must be integers \(or float32/float64\), got dtype {jnp.dtype(dtype)}"
    with pytest.raises(ValueError, match=f"apply_rope: {match}"):
        apply_rope(jnp.zeros((B, T, N, H)), positions)
    with pytest.raises(ValueError, match=f"rope_frequencies: {match}"):
        rope_frequencies(positions, H)
    # Integers of any width, and float32 positions (e.g. interpolated ones), still rotate.
    for ok in (jnp.int8, jnp.uint16, jnp.int32, jnp.float32):
        apply_rope(jnp.zeros((B, T, N, H)), jnp.arange(T).astype(ok))


def test_learned_positions_refuse_a_table_that_is_not_a_floating_array():
    """An integer table gave integer rows silently; a list or the bare table failed as
    "'list' object has no attribute 'shape'", naming neither; float positions under jit
    failed in jnp.take as "indices must have an integer type"."""
    table = jnp.linspace(-1, 1, 12).reshape(4, 3)
    match = r"^learned_positions: weights.table must be a floating array .*got"
    for bad, got in ((table.astype(jnp.int32), "int32"), (table.tolist(), "list")):
        with pytest.raises(ValueError, match=rf"{match} {got}"):
            learned_positions(LearnedPositionWeights(bad), jnp.arange(2))
    with pytest.raises(TypeError, match=r"^learned_positions: weights must be LearnedPosition"):
        learned_positions(table, jnp.arange(2))
    with pytest.raises(ValueError, match=r"positions .* must be integers, got dtype float32"):
        jax.jit(learned_positions)(LearnedPositionWeights(table), jnp.arange(2.0))
