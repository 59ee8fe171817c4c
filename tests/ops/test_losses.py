"""cross_entropy (and chunked_cross_entropy) against a float64 NumPy reference and torch."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.ops.losses import chunked_cross_entropy, cross_entropy

B, T, V = 3, 5, 7


def np_cross_entropy(logits, targets, mask=None, eps=0.0):
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    p = np.eye(V)[targets] * (1 - eps) + eps / V
    losses = -(p * logp).sum(-1)
    if mask is None:
        return losses.mean()
    return (losses * mask).sum() / max(mask.sum(), 1)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_numpy(np_rng, eps, masked):
    logits = np_rng.normal(size=(B, T, V)).astype(np.float32)
    targets = np_rng.integers(0, V, (B, T))
    mask = (np_rng.random((B, T)) > 0.4) if masked else None
    got = jax.jit(lambda lg, t, m: cross_entropy(lg, t, m, label_smoothing=eps))(
        logits, jnp.asarray(targets, jnp.int32), mask
    )
    want = np_cross_entropy(logits, targets, None if mask is None else mask.astype(float), eps)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_traced_label_smoothing(np_rng):
    # A scheduled eps reaches the loss as a tracer: no Python bool of it, same numbers.
    logits = np_rng.normal(size=(B, T, V)).astype(np.float32)
    targets = np_rng.integers(0, V, (B, T))
    mask = np_rng.random((B, T)) > 0.4
    loss = jax.jit(lambda e: cross_entropy(logits, jnp.asarray(targets), mask, label_smoothing=e))
    for eps in (0.0, 0.1):
        want = np_cross_entropy(logits, targets, mask.astype(float), eps)
        np.testing.assert_allclose(loss(jnp.float32(eps)), want, rtol=1e-5)


def test_traced_zero_smoothing_with_a_minus_inf_logit_is_the_plain_loss(np_rng):
    # A vocab entry the model never emits has logit -inf. With eps = 0 it carries no label
    # mass, so a traced 0 must give the concrete 0's loss, not 0 * -inf = NaN.
    logits = np_rng.normal(size=(B, T, V)).astype(np.float32)
    logits[..., -1] = -np.inf
    targets = jnp.asarray(np_rng.integers(0, V - 1, (B, T)), jnp.int32)
    loss = jax.jit(lambda lg, e: cross_entropy(lg, targets, label_smoothing=e))
    plain = cross_entropy(jnp.asarray(logits), targets)
    np.testing.assert_allclose(loss(logits, jnp.float32(0.0)), plain, rtol=1e-6)
    d_logits, d_eps = jax.grad(loss, argnums=(0, 1))(jnp.asarray(logits), jnp.float32(0.0))
    assert np.isfinite(d_logits).all() and np.isfinite(d_eps)
    assert loss(logits, jnp.float32(0.1)) == np.inf  # smoothed mass on a -inf logit: as torch


def test_matches_torch(np_rng):
    torch = pytest.importorskip("torch")
    logits = np_rng.normal(size=(B, T, V)).astype(np.float32)
    targets = np_rng.integers(0, V, (B, T))
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(-1, V),
        torch.from_numpy(targets).reshape(-1),
        label_smoothing=0.1,
    )
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets, jnp.int32), label_smoothing=0.1)
    np.testing.assert_allclose(got, want.item(), rtol=1e-5)


def test_empty_mask_gives_zero_not_nan(np_rng):
    logits = jnp.asarray(np_rng.normal(size=(B, T, V)), jnp.float32)
    targets = jnp.zeros((B, T), jnp.int32)
    loss, grad = jax.value_and_grad(cross_entropy)(logits, targets, jnp.zeros((B, T), bool))
    assert loss == 0.0 and bool(jnp.all(jnp.isfinite(grad)))
    # No tokens at all: a mask still gives 0; without one, the mean of nothing is NaN (as
    # torch's cross_entropy), as the docstring says.
    empty_logits, empty_targets = jnp.zeros((0, V)), jnp.zeros((0,), jnp.int32)
    assert cross_entropy(empty_logits, empty_targets, jnp.zeros((0,), bool)) == 0.0
    assert bool(jnp.isnan(cross_entropy(empty_logits, empty_targets)))


def test_bad_shapes_raise():
    logits = jnp.zeros((B, T, V))
    with pytest.raises(ValueError, match=r"targets \(3, 4\)"):
        cross_entropy(logits, jnp.zeros((B, T - 1), jnp.int32))
    with pytest.raises(ValueError, match=r"mask \(3,\)"):
        cross_entropy(logits, jnp.zeros((B, T), jnp.int32), jnp.ones((B,), bool))
    # 0-d logits have no vocab axis (was an IndexError naming nothing).
    with pytest.raises(ValueError, match=r"cross_entropy: targets \(\) must be logits \(\)"):
        cross_entropy(jnp.zeros(()), jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, jnp.zeros((B, T), jnp.int32), label_smoothing=1.0)
    for bad in (None, "0.1x"):  # were float()'s TypeError / ValueError, naming nothing
        with pytest.raises(ValueError, match=r"cross_entropy: label_smoothing must be in \[0, 1\)"):
            cross_entropy(logits, jnp.zeros((B, T), jnp.int32), label_smoothing=bad)
    # A [V] eps broadcast into a loss under jit, and failed as NumPy's truth-value error
    # outside it.
    eps = jnp.full((V,), 0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must be a scalar, got shape \(7,\)"):
        cross_entropy(logits, jnp.zeros((B, T), jnp.int32), label_smoothing=eps)
    with pytest.raises(ValueError, match=r"label_smoothing must be a scalar, got shape \(7,\)"):
        jax.jit(cross_entropy)(logits, jnp.zeros((B, T), jnp.int32), label_smoothing=eps)
    out_of_range = r"cross_entropy: targets must lie in \[0, 7\), got values in \[7, 7\]"
    with pytest.raises(ValueError, match=out_of_range):
        cross_entropy(logits, jnp.full((B, T), V, jnp.int32))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\), got values in \[-1, 0\]"):
        cross_entropy(logits, jnp.zeros((B, T), jnp.int32).at[0, 0].set(-1))
    # An int64 id that jnp.asarray (64-bit types off) would wrap to the valid id 1.
    wrapped = np.zeros((B, T), np.int64)
    wrapped[1, 2] = 2**32 + 1
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 7\).*first: 4294967297 at"):
        cross_entropy(logits, wrapped)


def test_integer_mask_counts_tokens_it_does_not_weight_them(np_rng):
    logits = jnp.asarray(np_rng.normal(size=(B, T, V)), jnp.float32)
    targets = jnp.asarray(np_rng.integers(0, V, (B, T)), jnp.int32)
    counts = np_rng.integers(0, 3, (B, T))  # 0, 1 or 2
    counts[0, 0] = 2
    got = cross_entropy(logits, targets, jnp.asarray(counts, jnp.int32))
    want = np_cross_entropy(np.asarray(logits), np.asarray(targets), (counts != 0).astype(float))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_uncounted_token_with_infinite_loss_is_ignored_like_torch_ignore_index(np_rng):
    # A model that never predicts the pad id gives it logit -inf; padded positions hold the
    # pad id as target and are masked out. Their loss is inf and must not leak as inf*0=NaN.
    torch = pytest.importorskip("torch")
    pad = 0
    logits = np_rng.normal(size=(B, T, V)).astype(np.float32)
    logits[..., pad] = -np.inf
    targets = np_rng.integers(1, V, (B, T))
    targets[:, -2:] = pad
    mask = targets != pad
    loss, grad = jax.value_and_grad(cross_entropy)(
        jnp.asarray(logits), jnp.asarray(targets, jnp.int32), jnp.asarray(mask)
    )
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(-1, V),
        torch.from_numpy(targets).reshape(-1),
        ignore_index=pad,
    )
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_bfloat16_logits_are_reduced_in_float32(np_rng, eps):
    # Mixed-precision models hand over bfloat16 logits: the softmax and the mean must not
    # run in bfloat16 (8 bits of mantissa would be visible at the 1e-3 level).
    logits = jnp.asarray(4.0 * np_rng.normal(size=(B, T, V)), jnp.bfloat16)
    targets = np_rng.integers(0, V, (B, T))
    mask = np_rng.random((B, T)) > 0.4
    exact = np.asarray(logits, np.float64)  # the bfloat16 values, exactly
    for m in (None, mask):
        got = cross_entropy(logits, jnp.asarray(targets, jnp.int32), m, label_smoothing=eps)
        assert got.dtype == jnp.float32
        want = np_cross_entropy(exact, targets, None if m is None else m.astype(float), eps)
        np.testing.assert_allclose(got, want, rtol=1e-5)


# chunked_cross_entropy: the output layer and the loss a chunk of positions at a time.
D = 6


def _output_layer(np_rng, v=V):
    hidden = np_rng.normal(size=(B, T, D)).astype(np.float32)
    w = (np_rng.normal(size=(D, v)) / np.sqrt(D)).astype(np.float32)
    return hidden, w


@pytest.mark.parametrize("chunk_size", [1, 2, 3, T, 100])  # 2, 3: the last chunk padded
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_numpy_and_the_whole_loss(np_rng, chunk_size, eps, masked):
    hidden, w = _output_layer(np_rng)
    targets = np_rng.integers(0, V, (B, T))
    mask = (np_rng.random((B, T)) > 0.4) if masked else None

    def chunked(hidden, w):
        return chunked_cross_entropy(
            hidden, lambda h: h @ w, jnp.asarray(targets), mask,
            chunk_size=chunk_size, label_smoothing=eps,
        )  # fmt: skip

    def whole(hidden, w):
        return cross_entropy(hidden @ w, jnp.asarray(targets), mask, label_smoothing=eps)

    got, got_grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, w)
    logits64 = hidden.astype(np.float64) @ w.astype(np.float64)
    want = np_cross_entropy(logits64, targets, None if mask is None else mask.astype(float), eps)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The gradients (hidden's and the output weights', accumulated over the chunks) are
    # those of the loss over the whole logits.
    for g, w_ in zip(got_grads, jax.grad(whole, argnums=(0, 1))(hidden, w)):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-7)


def test_chunked_holds_one_chunk_of_logits_not_all_of_them(np_rng):
    # The point of chunking: the backward of the whole loss holds [tokens, V] float32 logits
    # and their gradient; the chunked one holds a chunk's (recomputed) instead.
    tokens, d, vocab, chunk = 2048, 32, 2048, 128
    hidden = jnp.asarray(np_rng.normal(size=(tokens, d)), jnp.float32)
    w = jnp.asarray(np_rng.normal(size=(d, vocab)) / np.sqrt(d), jnp.float32)
    targets = jnp.asarray(np_rng.integers(0, vocab, (tokens,)), jnp.int32)
    logits_bytes = tokens * vocab * 4  # 16 MiB

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(hidden, w).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(lambda h, w: cross_entropy(h @ w, targets))
    chunked = temp_bytes(
        lambda h, w: chunked_cross_entropy(h, lambda x: x @ w, targets, chunk_size=chunk)
    )
    assert whole >= logits_bytes  # at least the logits
    assert chunked < logits_bytes / 4, (chunked, whole)


def test_chunked_bfloat16_logits_are_reduced_in_float32(np_rng):
    # A bfloat16 model's output layer hands each chunk bfloat16 logits (here the hidden
    # states themselves): the loss over them must still be a float32 one.
    logits = jnp.asarray(4.0 * np_rng.normal(size=(B, T, V)), jnp.bfloat16)
    targets = np_rng.integers(0, V, (B, T))
    got = chunked_cross_entropy(logits, lambda h: h, jnp.asarray(targets), chunk_size=4)
    assert got.dtype == jnp.float32
    want = np_cross_entropy(np.asarray(logits, np.float64), targets)  # bfloat16 values, exactly
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_float64_logits_give_a_float64_loss(np_rng, eps):
    """With jax_enable_x64 the loss of float64 logits is computed in float64, whole or in
    chunks (float32 would leave a 1e-7 error in a float64 gradient check)."""
    logits = 4.0 * np_rng.normal(size=(B, T, V))
    targets = np_rng.integers(0, V, (B, T))
    mask = np_rng.random((B, T)) > 0.4
    with jax.enable_x64(True):
        x, ids = jnp.asarray(logits), jnp.asarray(targets)
        whole = cross_entropy(x, ids, jnp.asarray(mask), label_smoothing=eps)
        chunked = chunked_cross_entropy(x, lambda h: h, ids, chunk_size=2, label_smoothing=eps)
    assert whole.dtype == chunked.dtype == jnp.float64
    want = np_cross_entropy(logits, targets, mask.astype(float), eps)
    np.testing.assert_allclose(whole, want, rtol=1e-13)
    np.testing.assert_allclose(chunked, np_cross_entropy(logits, targets, None, eps), rtol=1e-13)


def test_chunked_bad_inputs_raise():
    hidden = jnp.zeros((B, T, D))
    targets = jnp.zeros((B, T), jnp.int32)
    project = lambda h: h @ jnp.zeros((D, V))
    with pytest.raises(ValueError, match=r"targets \(3, 4\) must be \[..., T\] and hidden"):
        chunked_cross_entropy(hidden, project, targets[:, :-1], chunk_size=4)
    for bad in (0, -1, 2.0, True, None):
        message = f"chunked_cross_entropy: chunk_size must be an int >= 1, got {bad!r}"
        with pytest.raises(ValueError, match=message):
            chunked_cross_entropy(hidden, project, targets, chunk_size=bad)
    wrong = r"logits_fn must map \[..., t, D\] to \[..., t, V\], got \(4, 7\) for \[3, 4, 6\]"
    with pytest.raises(ValueError, match=wrong):
        chunked_cross_entropy(hidden, lambda h: project(h)[0], targets, chunk_size=4)
    with pytest.raises(ValueError, match=r"mask \(3,\) must match targets \(3, 5\)"):
        chunked_cross_entropy(hidden, project, targets, jnp.ones((B,), bool), chunk_size=4)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        chunked_cross_entropy(hidden, project, targets, chunk_size=4, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"chunked_cross_entropy: targets must lie in \[0, 7\)"):
        chunked_cross_entropy(hidden, project, targets.at[1, 1].set(V), chunk_size=4)


_SHARDED_CHUNKS = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxattn.ops.losses import chunked_cross_entropy, cross_entropy
# Auto axes, as jaxattn.training.sharding.make_mesh builds them.
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
r = np.random.default_rng(0)
rows = NamedSharding(mesh, P("data"))
h = jax.device_put(jnp.asarray(r.normal(size=(16, 12, 8)), jnp.float32), rows)
t = jax.device_put(jnp.asarray(r.integers(0, 40, (16, 12)), jnp.int32), rows)
w = jnp.asarray(r.normal(size=(8, 40)) / 3, jnp.float32)
chunked = jax.jit(jax.value_and_grad(
    lambda h, w: chunked_cross_entropy(h, lambda x: x @ w, t, chunk_size=5), (0, 1)))
whole = jax.value_and_grad(lambda h, w: cross_entropy(h @ w, t), (0, 1))
(a, ga), (b, gb) = chunked(h, w), whole(h, w)
print(json.dumps(dict(
    loss_diff=abs(float(a - b)),
    grad_diff=max(float(jnp.abs(x - y).max()) for x, y in zip(ga, gb)),
    all_gathers=chunked.lower(h, w).compile().as_text().count("all-gather"),
    rows_sharded=tuple(ga[0].sharding.spec)[:1] == ("data",),  # hidden's gradient
)))
"""


def test_chunks_keep_a_batch_sharded_over_devices(run_on_8_devices):
    # The chunks cut the sequence, not the rows: a batch sharded over 8 devices is never
    # gathered onto one, and the loss and gradients are the unsharded whole loss's.
    result = run_on_8_devices(["-c", _SHARDED_CHUNKS], timeout=300)
    assert result["loss_diff"] < 1e-5 and result["grad_diff"] < 1e-6, result
    assert result["all_gathers"] == 0, result
    assert result["rows_sharded"], result


def test_a_concrete_jax_array_label_smoothing_works_eagerly_and_under_jit(np_rng):
    # A JAX scalar (not traced) compared inside a trace is a tracer no `if` can test: it
    # failed in the chunks, and in cross_entropy under the caller's jit.
    hidden, w = _output_layer(np_rng)
    targets = jnp.asarray(np_rng.integers(0, V, (B, T)))
    want = np_cross_entropy(hidden.astype(np.float64) @ w, np.asarray(targets), eps=0.1)
    eps = jnp.float32(0.1)
    got = [
        chunked_cross_entropy(hidden, lambda h: h @ w, targets, chunk_size=2, label_smoothing=eps),
        jax.jit(lambda h: cross_entropy(h @ w, targets, label_smoothing=eps))(hidden),
    ]
    np.testing.assert_allclose(got, [want, want], rtol=1e-5)


def test_chunk_padding_is_a_real_input_of_the_output_layer(np_rng):
    # A cosine output layer has no gradient at h = 0: zero padding made the weights'
    # gradient NaN (0 cotangent x NaN Jacobian), though the padding is never counted.
    hidden, w = _output_layer(np_rng)
    targets = jnp.asarray(np_rng.integers(0, V, (B, T)))

    def cosine(h, w):
        return (h / jnp.linalg.norm(h, axis=-1, keepdims=True)) @ w

    def chunked(w):
        return chunked_cross_entropy(hidden, lambda h: cosine(h, w), targets, chunk_size=3)

    got = jax.grad(chunked)(w)  # T = 5: the second chunk holds one padded position
    want = jax.grad(lambda w: cross_entropy(cosine(hidden, w), targets))(w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunked", [False, True])
def test_an_uncounted_row_of_minus_inf_logits_leaves_the_gradient_finite(np_rng, chunked):
    """A masked-out position whose logits are all -inf (a vocabulary mask at padding) does not
    count, and must not reach the gradient as NaN (log_softmax's backward of -inf - -inf)."""
    h = jnp.asarray(np_rng.normal(size=(2, 3, 4)), jnp.float32).at[0, 2, 0].set(-1e3)
    w = jnp.asarray(np_rng.normal(size=(4, 5)), jnp.float32)
    targets = jnp.asarray([[1, 2, 0], [4, 0, 0]])
    mask = jnp.asarray([[True, True, False], [True, False, False]])

    def loss(w):
        def logits_fn(x):  # [..., t, 4] -> [..., t, 5]; position (0, 2) all -inf (log 0)
            return x @ w + jnp.log((x[..., :1] > -100.0).astype(x.dtype))

        if chunked:
            return chunked_cross_entropy(h, logits_fn, targets, mask, chunk_size=2)
        return cross_entropy(logits_fn(h), targets, mask)

    value, grad = jax.value_and_grad(loss)(w)
    np.testing.assert_allclose(value, cross_entropy(h @ w, targets, mask), rtol=1e-6)
    assert bool(jnp.isfinite(grad).all())  # the output layer's gradient was all NaN


def test_nested_list_logits_are_taken_as_an_array():
    # Lists, as targets take them: logits.ndim was an AttributeError naming nothing.
    logits = [[0.0, 1.0, 2.0], [2.0, 0.0, -1.0]]
    logp = np.array(logits) - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(logp[0, 2] + logp[1, 0]) / 2
    np.testing.assert_allclose(cross_entropy(logits, [2, 0]), expected, rtol=1e-6)


@pytest.mark.parametrize("bad", [-1, -7, 7])  # -7 = -V: wrapped to id 0
def test_traced_targets_outside_the_vocab_give_nan_unless_masked(np_rng, bad):
    """Under jit an id cannot be refused: one >= V gave NaN, but a negative one (PyTorch's
    -100 "ignore" label among them) wrapped to a real token and gave a silently wrong loss."""
    logits = jnp.asarray(np_rng.normal(size=(2, 3, 7)), jnp.float32)
    targets = jnp.asarray(np_rng.integers(0, 7, size=(2, 3))).at[0, 2].set(bad)
    keep = jnp.ones((2, 3), bool).at[0, 2].set(False)
    w = jnp.asarray(np_rng.normal(size=(7, 7)), jnp.float32)
    losses = {
        "whole": jax.jit(lambda x, t, m: cross_entropy(x, t, m)),
        "smoothed": jax.jit(lambda x, t, m: cross_entropy(x, t, m, label_smoothing=0.1)),
        "chunked": jax.jit(
            lambda x, t, m: chunked_cross_entropy(x, lambda h: h @ w, t, m, chunk_size=2)
        ),
    }
    for name, loss in losses.items():
        assert bool(jnp.isnan(loss(logits, targets, None))), name
        # Left out by the mask, it counts for nothing, nor reaches the gradient as NaN.
        fixed = targets.at[0, 2].set(0)
        np.testing.assert_allclose(
            loss(logits, targets, keep), loss(logits, fixed, keep), rtol=1e-6
        )
        grad = jax.grad(loss)(logits, targets, keep)
        np.testing.assert_allclose(grad, jax.grad(loss)(logits, fixed, keep), rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_eager_calls_take_any_uncounted_target_as_jitted_ones_do(np_rng, eps):
    """PyTorch's -100 "ignore" label (or a -1 or V pad) where the mask is 0: a jitted call
    dropped it, but an eager one refused it as outside [0, V). A counted one is refused by
    its index still."""
    logits = np_rng.normal(size=(B, T, V)).astype(np.float32)
    targets = np_rng.integers(0, V, (B, T))
    mask = np.ones((B, T), bool)
    mask[:, -2:] = False
    padded = np.where(mask, targets, -100)
    padded[0, -1], padded[1, -1] = -1, V
    w = np_rng.normal(size=(V, V)).astype(np.float32)
    want = np_cross_entropy(logits, targets, mask.astype(float), eps)
    want_chunked = np_cross_entropy(logits @ w, targets, mask.astype(float), eps)
    for mask_of in (np.asarray, jnp.asarray, lambda m: m.tolist()):
        got = cross_entropy(logits, padded, mask_of(mask), label_smoothing=eps)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        got = chunked_cross_entropy(
            logits, lambda h: h @ w, padded, mask_of(mask), chunk_size=2, label_smoothing=eps
        )
        np.testing.assert_allclose(got, want_chunked, rtol=1e-5)
    counted_bad = padded.copy()
    counted_bad[2, 1] = -100  # counted
    for fn in (
        lambda t: cross_entropy(logits, t, mask),
        lambda t: chunked_cross_entropy(logits, lambda h: h @ w, t, mask, chunk_size=2),
    ):
        with pytest.raises(ValueError, match=r"first: -100 at index \(2, 1\)"):
            fn(counted_bad)


@pytest.mark.parametrize(
    ("dtype", "vocab"), [(jnp.uint8, 256), (jnp.int8, 200), (jnp.int16, 40000)]
)
def test_narrow_targets_of_a_vocab_beyond_their_range_are_not_nan(dtype, vocab):
    # V compared in the targets' dtype wrapped (uint8: 256 -> 0): every loss was NaN.
    logits = jnp.zeros((2, 3, vocab), jnp.float32)
    targets = jnp.asarray([[0, 1, 2], [3, 4, 5]], dtype)
    want = np.log(vocab)
    for loss in (cross_entropy, jax.jit(cross_entropy)):
        np.testing.assert_allclose(loss(logits, targets), want, rtol=1e-6)
    if jnp.issubdtype(dtype, jnp.signedinteger):
        assert bool(jnp.isnan(jax.jit(cross_entropy)(logits, targets.at[0, 0].set(-1))))


def test_a_list_mask_runs_without_a_warning_and_float_targets_are_named_under_jit():
    """A list mask warned from jnp.shape (JAX's DeprecationWarning) before it ran; float
    targets under jit failed inside optax ("Expected the input to have a dtype that is a
    subdtype of <class 'numpy.integer'>"), naming neither the function nor the argument."""
    logits = jnp.asarray([[0.0, 1.0, 2.0], [2.0, 0.0, -1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cross_entropy(logits, [2, 0], [True, False])
    np.testing.assert_allclose(got, cross_entropy(logits[:1], [2]), rtol=1e-6)
    match = r"^cross_entropy: targets must be integers, got dtype float32"
    with pytest.raises(ValueError, match=match):
        jax.jit(cross_entropy)(logits, jnp.asarray([2.0, 0.0]))


def test_chunked_cross_entropy_takes_a_list_hidden_without_a_warning():
    """A nested-list ``hidden`` ran, but warned from jnp.shape (JAX's DeprecationWarning,
    "shape requires ndarray or scalar arguments"), as a list mask did."""
    hidden = np.linspace(-1.0, 1.0, 2 * 3 * 4).reshape(2, 3, 4)
    w = jnp.linspace(-1.0, 1.0, 4 * V).reshape(4, V)
    targets = jnp.asarray([[0, 1, 2], [3, 4, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = chunked_cross_entropy(hidden.tolist(), lambda h: h @ w, targets, chunk_size=2)
    np.testing.assert_allclose(got, cross_entropy(jnp.asarray(hidden, jnp.float32) @ w, targets))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_ignored_targets_make_no_nan_under_debug_nans(np_rng, chunk_size):
    """An uncounted -100 "ignore" label gave a NaN token loss (then dropped), which
    jax.debug_nans reported as "invalid value (nan) encountered in gather": a false alarm
    for a user hunting a NaN in their model. The loss and its gradient are the reference's."""
    logits = np_rng.normal(size=(B, T, V)).astype(np.float32)
    targets = np_rng.integers(0, V, (B, T))
    mask = np_rng.random((B, T)) > 0.4
    ignored = jnp.asarray(np.where(mask, targets, -100), jnp.int32)

    def loss(x):
        if chunk_size is None:
            return cross_entropy(x, ignored, mask, label_smoothing=0.1)
        return chunked_cross_entropy(
            x, lambda h: h, ignored, mask, chunk_size=chunk_size, label_smoothing=0.1
        )

    with jax.debug_nans(True):
        got, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
    np.testing.assert_allclose(got, np_cross_entropy(logits, targets, mask, 0.1), rtol=1e-5)
    # d/dlogits of the mean: (softmax - p) / count on counted tokens, 0 elsewhere.
    x = logits.astype(np.float64)
    q = np.exp(x - x.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p = np.eye(V)[targets] * 0.9 + 0.1 / V
    want = (q - p) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
