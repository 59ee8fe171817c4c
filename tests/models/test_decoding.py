"""Tests for jaxattn.models.decoding (sampling, the generation loop) and GPT's KV cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.models import decoding
from jaxattn.models import gpt as gpt_module
from jaxattn.models.gpt import GPTConfig, gpt, gpt_decode, init_cache, init_gpt
from tests.generation import ended_at_eos

BASE = GPTConfig(vocab_size=13, block_size=11, num_layers=2, num_heads=3, embed_dim=12)
GQA = dataclasses.replace(BASE, num_heads=4, num_kv_heads=2, embed_dim=20)
ROPE = dataclasses.replace(BASE, positions="rope")
# A sliding window of 4 keys, shorter than the prompts and block_size = 11.
WINDOW = dataclasses.replace(BASE, positions="rope", num_kv_heads=1, attention_window=4)
B = 2

gpt_jit = jax.jit(gpt, static_argnames=("config", "deterministic"))
decode_jit = jax.jit(gpt_decode, static_argnames="config")


def key(seed: int) -> jax.Array:
    """A PRNG key whose draws compile ~5x faster on CPU than threefry's (same semantics)."""
    return jax.random.key(seed, impl="rbg")


def random_weights(config: GPTConfig, seed: int = 0):
    """Noisy weights of ``init_gpt``'s structure (NumPy draws: nothing to compile)."""
    np_rng = np.random.default_rng(seed)

    def leaf(path, shape):
        base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.3 * np_rng.standard_normal(shape.shape), jnp.float32)

    shapes = jax.eval_shape(lambda k: init_gpt(k, config), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def tokens_for(config: GPTConfig, shape, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape), jnp.int32)


# --------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_layer", [False, True], ids=["scan", "unstacked"])
@pytest.mark.parametrize("config", [GQA, ROPE, WINDOW], ids=["gqa_learned", "rope", "window"])
def test_cached_decoding_equals_full_pass(config, per_layer):
    """Prefill 4 tokens in one pass, then feed 5 one at a time: same logits as ``gpt``."""
    w = random_weights(config)
    tokens = tokens_for(config, (B, 9))
    full = gpt_jit(w, tokens, config)
    cache = init_cache(config, B, config.block_size)
    if per_layer:
        w, cache = gpt_module.unstack_layers(w, cache)
        assert len(w.blocks) == len(cache.k) == len(cache.v) == config.num_layers
        assert cache.k[0].shape == (B * config.kv_heads, config.block_size, config.head_dim)
    logits, cache = decode_jit(w, tokens[:, :4], cache, config)
    pieces = [logits]
    for t in range(4, 9):
        logits, cache = decode_jit(w, tokens[:, t : t + 1], cache, config)
        pieces.append(logits)
    assert int(cache.index) == 9
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_equals_single_prefill():
    w = random_weights(ROPE)
    tokens = tokens_for(ROPE, (B, 9), seed=1)
    one_logits, one_cache = decode_jit(w, tokens, init_cache(ROPE, B, 11), ROPE)
    cache, pieces = init_cache(ROPE, B, 11), []
    for lo, hi in [(0, 4), (4, 5), (5, 9)]:  # chunk shapes already compiled above
        logits, cache = decode_jit(w, tokens[:, lo:hi], cache, ROPE)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), one_logits, atol=1e-5)
    np.testing.assert_allclose(cache.k, one_cache.k, atol=1e-5)
    np.testing.assert_allclose(cache.v, one_cache.v, atol=1e-5)
    assert int(cache.index) == int(one_cache.index) == 9
    np.testing.assert_array_equal(cache.k[:, :, 9:], 0.0)  # slots past the index stay empty


def test_cache_shapes_and_errors():
    cache = init_cache(GQA, 3, 7)
    assert cache.k.shape == cache.v.shape == (2, 3, 7, 2, 5)  # [L, B, S, K, H]
    assert cache.k.dtype == jnp.float32 and cache.index.dtype == jnp.int32
    bf16 = dataclasses.replace(BASE, dtype="bfloat16")
    assert init_cache(bf16, 1, 4).k.dtype == jnp.bfloat16
    assert init_cache(bf16, 1, 4, dtype=jnp.float32).k.dtype == jnp.float32
    with pytest.raises(ValueError, match="block_size"):
        init_cache(BASE, 1, 12)
    w = random_weights(BASE)
    with pytest.raises(ValueError, match="do not fit"):
        gpt_decode(w, tokens_for(BASE, (1, 5)), init_cache(BASE, 1, 4), BASE)
    cache = init_cache(BASE, 1, 4)._replace(index=jnp.array(3, jnp.int32))  # 3 slots filled
    with pytest.raises(ValueError, match="overflows"):
        gpt_decode(w, tokens_for(BASE, (1, 2)), cache, BASE)
    with pytest.raises(ValueError, match="do not fit"):
        gpt_decode(w, tokens_for(BASE, (2, 1)), cache, BASE)
    per_layer_w, per_layer_cache = gpt_module.unstack_layers(w, cache)
    with pytest.raises(ValueError, match="overflows"):
        gpt_decode(per_layer_w, tokens_for(BASE, (1, 2)), per_layer_cache, BASE)
    with pytest.raises(ValueError, match="both be stacked or both per layer"):
        gpt_decode(per_layer_w, tokens_for(BASE, (1, 1)), cache, BASE)
    short_cache = per_layer_cache._replace(k=per_layer_cache.k[:1], v=per_layer_cache.v[:1])
    with pytest.raises(ValueError, match="2 layers of weights but a cache of 1"):
        gpt_decode(per_layer_w, tokens_for(BASE, (1, 1)), short_cache, BASE)
    # A cache made for another config (other heads, other depth) is named as such.
    for other in (GQA, dataclasses.replace(BASE, num_layers=3)):
        with pytest.raises(ValueError, match="the cache does not fit the config"):
            gpt_decode(w, tokens_for(BASE, (1, 1)), init_cache(other, 1, 4), BASE)


# --------------------------------------------------------------------------------------
# sample_logits
# --------------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.0, 0.0, -1.0, 0.5, -0.5, 1.5])  # argmax 0; V=7
N_SAMPLES = 20_000  # frequency std <= 0.0036; tolerance 0.015 is > 4 sigma


def _frequencies(logits: np.ndarray = LOGITS, **kwargs) -> np.ndarray:
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_SAMPLES, logits.size))
    samples = jax.jit(functools.partial(decoding.sample_logits, **kwargs))(key(0), batch)
    assert samples.shape == (N_SAMPLES,) and samples.dtype == jnp.int32
    return np.bincount(np.asarray(samples), minlength=logits.size) / N_SAMPLES


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_temperature_sampling_matches_softmax():
    freq = _frequencies(temperature=0.7)
    expected = _softmax(LOGITS / 0.7)
    assert np.abs(_softmax(LOGITS) - expected).max() > 0.05  # the check can tell T apart
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_k_sampling():
    freq = _frequencies(top_k=3)  # keeps logits 2.0, 1.5, 1.0 = indices 0, 6, 1
    keep = np.array([0, 1, 6])
    expected = np.zeros(LOGITS.size)
    expected[keep] = _softmax(LOGITS[keep])
    np.testing.assert_array_equal(freq[[2, 3, 4, 5]], 0.0)  # excluded tokens never appear
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_k_keeps_every_logit_tied_with_the_kth():
    """The documented tie rule: top_k=2 over [2, 1, 1, 0, 1, -1] keeps 2 and all three 1s
    (a top-k by index would keep 2 and one 1, giving token 0 a frequency of 0.73)."""
    logits = np.array([2.0, 1.0, 1.0, 0.0, 1.0, -1.0])
    freq = _frequencies(logits, top_k=2)
    keep = np.array([0, 1, 2, 4])
    expected = np.zeros(logits.size)
    expected[keep] = _softmax(logits[keep])
    np.testing.assert_array_equal(freq[[3, 5]], 0.0)
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_p_sampling():
    p = _softmax(LOGITS)  # sorted: 0 (.34), 6 (.21), 1 (.13), 4 (.08), ...
    top_p = p[0] + p[6] + 0.5 * p[1]  # the smallest set reaching it is {0, 6, 1}
    freq = _frequencies(top_p=float(top_p))
    expected = np.zeros(LOGITS.size)
    expected[[0, 1, 6]] = _softmax(LOGITS[[0, 1, 6]])
    np.testing.assert_array_equal(freq[[2, 3, 4, 5]], 0.0)
    np.testing.assert_allclose(freq, expected, atol=0.015)
    # Nucleus after temperature and top-k: T=0.5 sharpens so {0, 6} already hold > 0.8.
    q = _softmax(LOGITS[[0, 1, 6]] / 0.5)  # over tokens (0, 1, 6) after top_k=3
    assert q[0] + q[2] > 0.8 > q[0]
    freq = _frequencies(temperature=0.5, top_k=3, top_p=0.8)
    np.testing.assert_array_equal(freq[[1, 2, 3, 4, 5]], 0.0)
    np.testing.assert_allclose(freq[[0, 6]], q[[0, 2]] / (q[0] + q[2]), atol=0.015)
    # The nucleus is taken from the tempered distribution: at T=0.5 token 0 alone holds
    # more than 0.6, at T=1 it would not (and token 6 would be kept as well).
    assert q[0] > 0.6 > _softmax(LOGITS[[0, 1, 6]])[0]
    freq = _frequencies(temperature=0.5, top_k=3, top_p=0.6)
    np.testing.assert_array_equal(freq, np.eye(LOGITS.size)[0])


def test_top_p_keeps_every_logit_tied_with_the_last_one_kept():
    """The documented tie rule: p = [.53, .20, .20, .07]; top_p=0.6 needs tokens 0 and one
    of the tied 1s, and keeps both 1s (a nucleus by sorted index would drop one)."""
    logits = np.array([2.0, 1.0, 1.0, 0.0])
    p = _softmax(logits)
    assert p[0] < 0.6 < p[0] + p[1]
    freq = _frequencies(logits, top_p=0.6)
    expected = np.zeros(logits.size)
    expected[:3] = _softmax(logits[:3])
    assert freq[3] == 0.0
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_greedy_limits_equal_argmax():
    logits = jax.random.normal(key(5), (9, 11))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    for kwargs in [
        dict(temperature=0.0),
        dict(greedy=True),
        dict(top_k=1),
        dict(top_p=1e-6),
        dict(temperature=2.0, top_k=1),
    ]:
        for seed in range(3):
            out = decoding.sample_logits(key(seed), logits, **kwargs)
            np.testing.assert_array_equal(out, argmax, err_msg=str(kwargs))
    # bfloat16 logits are sampled in float32 and still give int32 ids.
    out = decoding.sample_logits(key(0), logits.astype(jnp.bfloat16), temperature=0.0)
    assert out.dtype == jnp.int32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_k=2.0), "top_k"),  # integral, but lax.top_k takes no float k
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=1e-39), "smallest normal float32"),  # would flush to 0
        (dict(temperature=True), "temperature must be a number, got True"),  # read as 1.0
        (dict(top_p=True), "top_p must be a number, got True"),
        # Once a TypeError or "truth value of an array is ambiguous", naming no setting.
        (dict(temperature=None), "temperature must be a real number, got None"),
        (dict(temperature="0.7"), "temperature must be a real number, got '0.7'"),
        (dict(temperature=jnp.ones(2)), r"temperature must be a real number, got float32 \(2,\)"),
        (dict(temperature=1j), "temperature must be a real number"),
        (dict(top_p="0.9"), "top_p must be a real number, got '0.9'"),
        (dict(top_p=np.array([0.5, 0.9])), r"top_p must be a real number, got float64 \(2,\)"),
    ],
)
def test_sample_logits_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoding.sample_logits(key(0), jnp.zeros((2, 5)), **kwargs)


def test_traced_top_k_is_named():
    # Jitted without static_argnames: said by name, not a TracerBoolConversionError.
    sample = jax.jit(decoding.sample_logits)
    with pytest.raises(ValueError, match="top_k must be a Python number, static under"):
        sample(key(0), jnp.zeros((2, 5)), top_k=2)
    with pytest.raises(ValueError, match=r"temperature must be a number, got a traced .*\(2,\)"):
        sample(key(0), jnp.zeros((2, 5)), temperature=jnp.ones(2))


def test_traced_temperature_and_top_p_sample_as_python_values():
    """They only feed arithmetic: traced (jit without static_argnames) they draw the same
    tokens as the Python numbers, and a traced 0 draws the argmax (it cannot pick the greedy
    program, but the maximum is the only token left with any probability)."""
    logits = jax.random.normal(key(5), (64, 11)) * 3.0
    sample = jax.jit(decoding.sample_logits)
    for temperature, top_p in [(0.7, None), (1.3, 0.9), (1e-30, 0.5), (float("inf"), 0.8)]:
        for seed in range(3):
            python = decoding.sample_logits(key(seed), logits, temperature=temperature, top_p=top_p)
            traced = sample(key(seed), logits, temperature=jnp.float32(temperature),
                            top_p=None if top_p is None else jnp.float32(top_p))  # fmt: skip
            np.testing.assert_array_equal(traced, python, err_msg=str((temperature, top_p)))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    for top_p in (None, jnp.float32(0.9)):
        np.testing.assert_array_equal(sample(key(0), logits, temperature=0.0 * jnp.ones(()),
                                             top_p=top_p), argmax)  # fmt: skip


def test_sampling_draws_as_categorical_on_tempered_logits():
    """An independent check of the draw: Gumbel-max with key k is
    ``jax.random.categorical(k, logits / T)`` (same noise), for Python and traced T."""
    logits = jax.random.normal(key(7), (256, 13)) * 2.0
    for temperature in (0.5, 0.8, 1.0, 1.7):
        for seed in range(3):
            rng = jax.random.key(seed)
            expected = jax.random.categorical(rng, logits / temperature)
            got = decoding.sample_logits(rng, logits, temperature=temperature)
            np.testing.assert_array_equal(got, expected, err_msg=str(temperature))
            traced = jax.jit(decoding.sample_logits)(rng, logits, temperature=temperature)
            np.testing.assert_array_equal(traced, expected, err_msg=str(temperature))


def test_huge_temperature_samples_uniformly():
    """logits / T -> 0: uniform. (T * noise would overflow for T >= ~1e37.)"""
    for temperature in (1e38, float("inf")):
        np.testing.assert_allclose(_frequencies(temperature=temperature), 1 / 7, atol=0.015)


def test_infinite_temperature_keeps_the_filters():
    """-inf / inf is NaN, which argmax would pick: rejected tokens must stay out."""
    freq = _frequencies(temperature=float("inf"), top_k=3)  # keeps indices 0, 1, 6
    np.testing.assert_array_equal(freq[[2, 3, 4, 5]], 0.0)
    np.testing.assert_allclose(freq[[0, 1, 6]], 1 / 3, atol=0.015)


def test_infinite_temperature_keeps_the_nucleus():
    """top_p after top_k at T = inf: the rejects' -inf / inf must not turn the nucleus NaN."""
    # Uniform over the 3 kept tokens: top_p = 0.5 needs 2 of them (sorted order 0, 6).
    freq = _frequencies(temperature=float("inf"), top_k=3, top_p=0.5)
    np.testing.assert_array_equal(freq[[1, 2, 3, 4, 5]], 0.0)
    np.testing.assert_allclose(freq[[0, 6]], 0.5, atol=0.015)


def test_subnormal_top_p_is_greedy():
    """A top_p below float32's smallest normal flushes to 0: the nucleus keeps the argmax."""
    logits = jax.random.normal(key(5), (9, 11))
    argmax = np.argmax(np.asarray(logits), axis=-1)
    for top_p in (1e-39, 1e-45):
        for seed in range(3):
            out = decoding.sample_logits(key(seed), logits, top_p=top_p)
            np.testing.assert_array_equal(out, argmax, err_msg=str(top_p))


def test_tied_logits_stay_equally_likely_at_tiny_temperature():
    """logits + T * noise would lose the noise to rounding and always pick the first tie."""
    logits = jnp.broadcast_to(jnp.array([10.0, 10.0, 0.0]), (N_SAMPLES, 3))
    for temperature in (1e-7, 1e-30):
        samples = decoding.sample_logits(key(1), logits, temperature=temperature)
        freq = np.bincount(np.asarray(samples), minlength=3) / N_SAMPLES
        np.testing.assert_allclose(freq, [0.5, 0.5, 0.0], atol=0.015, err_msg=str(temperature))


def test_tiny_temperature_with_large_logits_samples_the_argmax():
    """logits / T would overflow to inf (ties); (logits - max) / T cannot."""
    logits = jnp.array([[1e3, 3e3, 2e3, -1e3]])
    for temperature in (1e-36, 1e-3):  # 3e3 / 1e-36 = 3e39 is inf in float32
        for seed in range(5):
            got = decoding.sample_logits(key(seed), logits, temperature=temperature, top_p=0.9)
            assert int(got[0]) == 1


def test_sample_logits_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        decoding.sample_logits(key(0), jnp.zeros((5,)))
    # No token to draw: failed inside jnp.max or jnp.argmax ("zero-size array to reduction
    # operation max", "argmax of an empty sequence"), naming neither the call nor the logits.
    for settings in (dict(), dict(temperature=0), dict(top_p=0.5)):
        with pytest.raises(ValueError, match=r"sample_logits: logits must be \[B, V\] with V >= 1"):
            decoding.sample_logits(key(0), jnp.zeros((2, 0)), **settings)


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------


def _reference_greedy(w, prompt, n, config):
    """Greedy continuation by re-running the full causal pass on the growing sequence.

    The sequence is zero-padded to its final length so that one compiled pass serves every
    step; causality makes the padding invisible to the logits read at ``t - 1``.
    """
    t0 = prompt.shape[1]
    seq = np.zeros((prompt.shape[0], t0 + n), np.int32)
    seq[:, :t0] = prompt
    for t in range(t0, t0 + n):
        logits = gpt_jit(w, jnp.asarray(seq), config)
        seq[:, t] = np.argmax(np.asarray(logits[:, t - 1]), -1)
    return seq


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
@pytest.mark.parametrize("config", [BASE, ROPE], ids=["base", "rope"])
def test_greedy_generate_equals_repeated_full_passes(config, unroll):
    w = random_weights(config, seed=2)
    prompt = tokens_for(config, (B, 3), seed=3)
    out = gpt_module.generate(
        w, config, prompt, 6, rng=key(0), temperature=0.0, unroll_layers=unroll
    )
    assert out.shape == (B, 9) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out, _reference_greedy(w, prompt, 6, config))
    if config is BASE:  # top_k=1 sampling is greedy too, whatever the key.
        top1 = gpt_module.generate(w, config, prompt, 6, rng=key(7), top_k=1)
        np.testing.assert_array_equal(top1, out)


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_generate_under_x64_equals_default(unroll):
    """With jax_enable_x64 the cache write's start indices must share the index's dtype."""
    w = random_weights(ROPE, seed=2)
    prompt = tokens_for(ROPE, (B, 3), seed=3)
    run = functools.partial(
        gpt_module.generate, w, ROPE, prompt, 5, rng=key(0), temperature=0.0, unroll_layers=unroll
    )
    with jax.enable_x64(True):
        wide = run()
    np.testing.assert_array_equal(wide, run())


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_sampled_generate_equals_sample_logits_step_by_step(impl):
    """generate draws token i with key i of ``split(rng, n)``, exactly as sample_logits,
    whatever the key's implementation (when all steps' noise was drawn with one ``vmap``,
    rbg keys gave other numbers than one at a time)."""
    w = random_weights(ROPE, seed=5)
    prompt = tokens_for(ROPE, (B, 3), seed=6)
    settings = dict(temperature=0.8, top_k=6, top_p=0.95)
    rng = jax.random.key(4, impl=impl)
    out = gpt_module.generate(w, ROPE, prompt, 5, rng=rng, **settings)
    seq = np.zeros((B, 8), np.int32)
    seq[:, :3] = prompt
    for i, step_key in enumerate(jax.random.split(rng, 5)):
        logits = gpt_jit(w, jnp.asarray(seq), ROPE)[:, 2 + i]
        seq[:, 3 + i] = decoding.sample_logits(step_key, logits, **settings)
    np.testing.assert_array_equal(out, seq)


@pytest.mark.parametrize("eos_id", [None, 3])
def test_sampled_generate_memory_does_not_grow_with_the_new_tokens(eos_id):
    """Each step draws its own [B, V] noise: drawn up front, [n, B, V] of noise took about
    4x its size in scratch memory (6 GiB for 1,000 tokens at B = 8, V = 50,257)."""
    b, vocab = 4, 4096
    # Next-token logits by token, an argument: as a closure's 64 MiB constant, drawing it
    # and compiling it into both programs took most of this test's time.
    table = jax.ShapeDtypeStruct((vocab, vocab), jnp.float32)

    def temp_bytes(n):
        def run(prompt, rng, table):
            decode_fn = lambda tokens, cache: (table[tokens], cache + tokens.shape[1])
            cache = jnp.zeros((), jnp.int32)
            return decoding.generate(decode_fn, cache, prompt, n, rng=rng, eos_id=eos_id)

        compiled = jax.jit(run).lower(jnp.zeros((b, 2), jnp.int32), key(1), table).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    noise_bytes = (512 - 16) * b * vocab * 4  # what up-front noise would add: 31 MiB
    assert temp_bytes(512) - temp_bytes(16) < noise_bytes / 16


@pytest.mark.parametrize("eos_id", [None, 3])
def test_sampled_generate_draws_a_small_loops_noise_up_front_with_the_same_tokens(
    monkeypatch, eos_id
):
    """Up to _UP_FRONT_NOISE numbers the loop's noise is drawn before it (one threefry call
    rather than one per token): the tokens a draw per step gives, and no draw in the loop."""
    vocab, n = 16, 10
    table = jax.random.normal(key(0), (vocab, vocab))  # next-token logits by token

    def decode_fn(tokens, cache):
        return table[tokens], cache + tokens.shape[1]

    def run(prompt, rng):
        cache = jnp.zeros((), jnp.int32)
        return decoding.generate(decode_fn, cache, prompt, n, rng=rng, eos_id=eos_id)

    prompt = jnp.array([[1, 2], [3, 4]], jnp.int32)
    trace = lambda rng: jax.make_jaxpr(lambda *a: run(*a))(prompt, rng).jaxpr  # (not cached)

    def primitives(jaxpr):  # every primitive in a jaxpr and the jaxprs it calls
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple) else (param,):
                    sub = getattr(sub, "jaxpr", sub)  # (a ClosedJaxpr's)
                    if hasattr(sub, "eqns"):
                        yield from primitives(sub)

    def loop_draws(jaxpr):  # random draws inside the decoding loop's body
        loop = next(e for e in jaxpr.eqns if e.primitive.name in ("scan", "while"))
        body = loop.params["jaxpr" if loop.primitive.name == "scan" else "body_jaxpr"]
        return bool({"random_bits", "threefry2x32"} & set(primitives(body.jaxpr)))

    rng = jax.random.key(1)  # threefry (vmapped, rbg keys draw other numbers: per step)
    assert not loop_draws(trace(rng))
    assert loop_draws(trace(key(1)))
    up_front = run(prompt, rng)
    monkeypatch.setattr(decoding, "_UP_FRONT_NOISE", 0)
    assert loop_draws(trace(rng))
    np.testing.assert_array_equal(up_front, run(prompt, rng))


def _reference_cropped(w, prompt, n, config, pick):
    """nanoGPT's generate: token t from a full pass over the last block_size tokens.

    ``pick(i, logits [B, V]) -> [B]`` chooses new token i. Each window is right-padded to
    block_size (one compiled shape); causality hides the padding from position len - 1.
    """
    t0, block = prompt.shape[1], config.block_size
    seq = np.zeros((prompt.shape[0], t0 + n), np.int32)
    seq[:, :t0] = prompt
    for t in range(t0, t0 + n):
        window = seq[:, max(0, t - block) : t]
        padded = np.zeros((seq.shape[0], block), np.int32)
        padded[:, : window.shape[1]] = window
        logits = gpt_jit(w, jnp.asarray(padded), config)[:, window.shape[1] - 1]
        seq[:, t] = pick(t - t0, logits)
    return seq


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
@pytest.mark.parametrize("config", [BASE, ROPE], ids=["base", "rope"])
@pytest.mark.parametrize("t0", [3, 11, 14], ids=["short_prompt", "full_prompt", "long_prompt"])
def test_greedy_generate_past_the_context_crops_as_nanogpt(config, unroll, t0):
    """Past block_size = 11 each token sees the last 11 tokens; so does a longer prompt."""
    w = random_weights(config, seed=2)
    prompt = tokens_for(config, (B, t0), seed=3)
    out = gpt_module.generate(
        w, config, prompt, 12, rng=key(0), temperature=0.0, unroll_layers=unroll
    )
    assert out.shape == (B, t0 + 12) and out.dtype == jnp.int32
    greedy = lambda i, logits: np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(out, _reference_cropped(w, prompt, 12, config, greedy))


def test_greedy_generate_past_the_context_needs_no_key():
    """Greedy ignores rng in the cached part; the cropped part must not split it either."""
    w = random_weights(BASE, seed=2)
    prompt = tokens_for(BASE, (B, 3), seed=3)
    out = gpt_module.generate(w, BASE, prompt, 12, rng=None, temperature=0.0)
    np.testing.assert_array_equal(
        out, gpt_module.generate(w, BASE, prompt, 12, rng=key(0), temperature=0.0)
    )


@pytest.mark.parametrize("partitionable", [True, False])
def test_sampled_generate_past_the_context_draws_token_i_with_key_i(partitionable):
    """Both parts, cached and cropped, draw new token i with key i of split(rng, n). Also
    without jax_threefry_partitionable, where split(rng, m) is not split(rng, n)[:m]: the
    cached part split its own keys, and drew others than documented."""
    w = random_weights(BASE, seed=5)
    prompt = tokens_for(BASE, (B, 4), seed=6)
    settings = dict(temperature=0.8, top_k=6, top_p=0.95)
    rng = jax.random.key(4)  # threefry: see test_sampled_generate_equals_sample_logits...
    with jax.threefry_partitionable(partitionable):
        out = gpt_module.generate(w, BASE, prompt, 16, rng=rng, **settings)
        keys = jax.random.split(rng, 16)
        sampled = lambda i, logits: decoding.sample_logits(keys[i], logits, **settings)
        want = _reference_cropped(w, prompt, 16, BASE, sampled)
    np.testing.assert_array_equal(out, want)


def test_generate_takes_rng_or_keys():
    """keys= replaces rng (token i drawn with keys[i], raw uint32 keys too); not both."""
    w = random_weights(BASE, seed=5)
    prompt = tokens_for(BASE, (B, 4), seed=6)
    rng = jax.random.key(4)

    def run(**key_args):
        cache = gpt_module.init_cache(BASE, B, BASE.block_size)
        decode = lambda t, c: gpt_module.gpt_decode(w, t, c, BASE)
        return decoding.generate(decode, cache, prompt, 5, temperature=0.9, **key_args)

    want = run(rng=rng)
    np.testing.assert_array_equal(run(keys=jax.random.split(rng, 5)), want)
    raw = jax.random.key_data(jax.random.split(rng, 5))  # [5, 2] uint32
    np.testing.assert_array_equal(run(keys=raw), want)
    with pytest.raises(ValueError, match="pass rng or keys, not both"):
        run(rng=rng, keys=jax.random.split(rng, 5))
    with pytest.raises(ValueError, match=r"generate: sampling needs keys of shape \(5,\)"):
        run(keys=jax.random.split(rng, 4))


# Prompts of different lengths in one batch: right-padded, with prompt_lengths.


@pytest.mark.parametrize(
    ("config", "unroll", "lengths"),
    [
        # One cached token, then cropped past block_size = 11 while the short rows are still
        # padded (the first for 9 tokens).
        (BASE, False, [1, 11, 6]),
        # Prompts up to 14 > block_size tokens: cropped from the first new token.
        (ROPE, True, [3, 14, 12]),
        # A window of 4 keys: by cache slot in the cached part, then in the cropped windows.
        (WINDOW, False, [2, 9, 5]),
    ],
    ids=["learned_scan", "rope_unrolled_long", "window"],
)
def test_greedy_generate_of_padded_prompts_continues_each_prompt_alone(config, unroll, lengths):
    w = random_weights(config, seed=2)
    prompt = np.asarray(tokens_for(config, (len(lengths), max(lengths)), seed=3))
    out = gpt_module.generate(
        w, config, prompt, 12, rng=None, temperature=0.0, unroll_layers=unroll,
        prompt_lengths=jnp.asarray(lengths),
    )  # fmt: skip
    assert out.shape == (len(lengths), max(lengths) + 12)
    greedy = lambda i, logits: np.argmax(np.asarray(logits), -1)
    for b, length in enumerate(lengths):
        alone = _reference_cropped(w, prompt[b : b + 1, :length], 12, config, greedy)[0]
        np.testing.assert_array_equal(out[b, : length + 12], alone)
        np.testing.assert_array_equal(out[b, length + 12 :], prompt[b, length:])  # padding


def test_sampled_generate_of_padded_prompts_draws_as_unpadded_rows():
    """Row b draws new token i with row b of the noise of key i, in both parts."""
    w = random_weights(ROPE, seed=5)
    prompt = np.asarray(tokens_for(ROPE, (B, 4), seed=6))
    lengths = [4, 1]  # row 1 is still padded when the cropped part begins (9 of 11 tokens)
    settings = dict(temperature=0.8, top_k=6, top_p=0.95)
    rng = jax.random.key(4)  # threefry: see test_sampled_generate_equals_sample_logits...
    out = gpt_module.generate(
        w, ROPE, prompt, 10, rng=rng, prompt_lengths=jnp.asarray(lengths), **settings
    )
    keys = jax.random.split(rng, 10)
    sampled = lambda i, logits: decoding.sample_logits(keys[i], logits, **settings)
    for b, length in enumerate(lengths):
        copies = np.repeat(prompt[b : b + 1, :length], B, axis=0)  # row b's noise is row b's
        reference = _reference_cropped(w, copies, 10, ROPE, sampled)[b]
        np.testing.assert_array_equal(out[b, : length + 10], reference)


@pytest.mark.parametrize("config", [GQA, ROPE], ids=["gqa_learned", "rope"])
def test_cached_decoding_of_left_padded_rows_equals_each_row_alone(config):
    """With ``start``, row b's padding slots are invisible and its positions start at 0."""
    w = random_weights(config)
    tokens = tokens_for(config, (B, 9), seed=7)
    starts = [0, 3]
    cache = init_cache(config, B, config.block_size)
    decode = functools.partial(decode_jit, w, config=config, start=jnp.asarray(starts))
    logits, cache = decode(tokens[:, :5], cache)
    pieces = [logits]
    for t in range(5, 9):
        logits, cache = decode(tokens[:, t : t + 1], cache)
        pieces.append(logits)
    decoded = jnp.concatenate(pieces, axis=1)  # [B, 9, V]
    for b, start in enumerate(starts):
        alone = gpt_jit(w, tokens[b : b + 1, start:], config)[0]
        np.testing.assert_allclose(decoded[b, start:], alone, atol=1e-5, rtol=1e-5)


def test_padded_prompt_lengths_may_be_a_list():
    """As the prompt may: a list or tuple is not an array to ``jnp.result_type``."""
    w = random_weights(BASE)
    prompt = tokens_for(BASE, (B, 4))
    run = functools.partial(gpt_module.generate, w, BASE, prompt, 2, rng=None, temperature=0.0)
    want = run(prompt_lengths=jnp.array([4, 2]))
    for lengths in ([4, 2], (4, 2)):
        np.testing.assert_array_equal(run(prompt_lengths=lengths), want)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, T=4\], got \[0, 2\]"):
        run(prompt_lengths=[0, 2])


def test_padded_prompts_with_bad_lengths_are_refused():
    w = random_weights(BASE)
    prompt = tokens_for(BASE, (B, 4))
    for lengths, match in [
        ([1, 5], r"prompt_lengths: lengths must lie in \[1, T=4\], got \[1, 5\]"),
        ([0, 2], r"prompt_lengths: lengths must lie in \[1, T=4\], got \[0, 2\]"),
        ([-1, 2], r"prompt_lengths: lengths must lie in \[1, T=4\], got \[-1, 2\]"),
        ([1.0, 2.0], r"prompt_lengths: lengths must be integers of shape \[B\] = \(2,\)"),
        ([1, 2, 3], r"shape \[B\] = \(2,\), got int32 \(3,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            gpt_module.generate(w, BASE, prompt, 2, rng=key(0), prompt_lengths=jnp.array(lengths))
    cache = init_cache(BASE, B, 6)
    with pytest.raises(ValueError, match=r"start must lie in \[0, S-1=5\], got \[0, 6\]"):
        gpt_decode(w, prompt, cache, BASE, start=jnp.array([0, 6]))
    with pytest.raises(ValueError, match=r"start must be integers of shape \[B\] = \(2,\)"):
        gpt_decode(w, prompt, cache, BASE, start=jnp.array([0]))
    with pytest.raises(ValueError, match=r"start must lie in \[0, S-1=5\], got \[-1, 0\]"):
        gpt_decode(w, prompt, cache, BASE, start=[-1, 0])  # a list, as the tokens may be


# eos_id: rows end at their first new eos_id.


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_generate_with_eos_ends_each_row_at_its_first_eos(unroll):
    """Greedy and sampled, in the cached part and past block_size = 11, padded or not."""
    w = random_weights(BASE, seed=2)
    prompt = tokens_for(BASE, (3, 4), seed=3)
    run = functools.partial(gpt_module.generate, w, BASE, prompt, 14, unroll_layers=unroll)
    for settings, lengths in [
        (dict(rng=None, temperature=0.0), None),
        (dict(rng=jax.random.key(1), top_k=6), jnp.array([4, 1, 3])),
    ]:
        plain = np.asarray(run(prompt_lengths=lengths, **settings))
        new_from = [4] * 3 if lengths is None else np.asarray(lengths)
        for eos_id in {int(plain[0, new_from[0] + 1]), int(plain[1, new_from[1] + 9])}:
            want = ended_at_eos(plain, new_from, 14, eos_id)
            got = run(prompt_lengths=lengths, eos_id=eos_id, **settings)
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"eos_id=13 is not in the vocabulary \[0, 13\)"):
        run(rng=None, eos_id=13)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="eos_id must be an integer >= 0 or None"):
            run(rng=None, eos_id=bad)


def test_generate_loops_skip_the_model_once_every_row_has_ended():
    """A counting model (next token = token + 1 mod 7) that counts the calls it runs."""
    vocab, calls = 7, []

    def counted(logits):
        jax.debug.callback(lambda: calls.append(1))  # runs only where the model runs
        return logits

    def decode_fn(tokens, cache):  # [B, t] -> one-hot logits of (token + 1) % V
        return counted(5.0 * jax.nn.one_hot((tokens + 1) % vocab, vocab)), cache

    def next_logits(window, offset):  # [B, context] -> [B, V]
        return counted(5.0 * jax.nn.one_hot((window[:, -1] + 1) % vocab, vocab))

    prompt = jnp.array([[3, 4], [6, 0]])
    greedy = dict(temperature=0.0, eos_id=1)
    # Row 0 draws 5, 6, 0, 1: ended after 4 tokens; row 1 draws 1 first. Then no more calls.
    out = jax.jit(lambda p: decoding.generate(decode_fn, 0, p, 6, rng=None, **greedy))(prompt)
    np.testing.assert_array_equal(out, [[3, 4, 5, 6, 0, 1, 1, 1], [6, 0, 1, 1, 1, 1, 1, 1]])
    assert len(calls) == 4  # the prefill and the steps drawing tokens 2, 3 and 4
    calls.clear()
    out = jax.jit(
        lambda p: decoding.generate_cropped(next_logits, p, 6, context=2, keys=None, **greedy)
    )(prompt)
    np.testing.assert_array_equal(out, [[3, 4, 5, 6, 0, 1, 1, 1], [6, 0, 1, 1, 1, 1, 1, 1]])
    assert len(calls) == 4
    calls.clear()
    ended = jnp.array([False, True])  # row 1 ended before: it repeats eos_id from the start
    out = decoding.generate_cropped(
        next_logits, prompt, 3, context=2, keys=None, ended=ended, **greedy
    )
    np.testing.assert_array_equal(out, [[3, 4, 5, 6, 0], [6, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"ended must be \[B\] = \(2,\) bool, got int32 \(2,\)"):
        decoding.generate_cropped(next_logits, prompt, 3, context=2, keys=None,
                                  ended=jnp.array([0, 1]), **greedy)  # fmt: skip
    with pytest.raises(ValueError, match="ended= needs an eos_id"):
        decoding.generate_cropped(next_logits, prompt, 3, context=2, keys=None, ended=ended,
                                  temperature=0.0)  # fmt: skip


def test_generate_with_eos_updates_the_cache_in_place():
    """eos_id must not cost a copy of the KV cache per token: a lax.cond around the model
    made XLA copy the cache twice per step (unrolled layers), ~1/3 more temporary memory."""
    config = dataclasses.replace(BASE, block_size=128)
    w, prompt = random_weights(config), tokens_for(config, (4, 8))

    def temp_bytes(eos_id):
        args = (w, prompt, None, config, 100, True, jnp.float32(0), None, None, True, None, eos_id)
        compiled = gpt_module._generate_jit.lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(3) <= 1.05 * temp_bytes(None)


@pytest.mark.parametrize("per_layer, bound", [(False, 2.0), (True, 0.75)])
def test_a_decoding_loop_updates_the_kv_cache_in_place(per_layer, bound):
    """A token loop over gpt_decode holds no copy of the cache, stacked or per layer: the
    layer scan over the stacked cache (generate's default) zero-filled a new [L, B, S, K, H]
    stack each token and copied it three times (4.1 k-stacks of temporary memory here, now
    1.3, most of it the attention's per-layer copies of K and V into its own layout; 3.1x
    the time per token at S = 1024, batch 8). Per layer, the caches are kept in that layout
    (head rows), and the copies are gone: 0.45 k-stacks, 1.32 when the caches were
    [B, S, K, H]."""
    config = dataclasses.replace(BASE, block_size=256)
    w, cache = random_weights(config), init_cache(config, 2, 256)

    def loop(w, cache):
        w, cache = gpt_module.unstack_layers(w, cache) if per_layer else (w, cache)
        step = lambda i, c: gpt_decode(w, jnp.full((2, 1), i % 13), c, config)[1]
        return jax.lax.fori_loop(0, 8, step, cache)

    compiled = jax.jit(loop).lower(w, cache).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < bound * cache.k.nbytes


def test_generate_cropped_rejects_bad_requests():
    fn = lambda window, offset: jnp.zeros((window.shape[0], 5))
    tokens = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"T0 >= context=6 >= 1, got \(2, 4\)"):
        decoding.generate_cropped(fn, tokens, 3, context=6, keys=None, temperature=0.0)
    with pytest.raises(ValueError, match=r"keys of shape \(3,\), got None"):
        decoding.generate_cropped(fn, tokens, 3, context=4, keys=None)
    with pytest.raises(ValueError, match=r"keys of shape \(3,\), got \(2,\)"):
        decoding.generate_cropped(fn, tokens, 3, context=4, keys=jax.random.split(key(0), 2))
    with pytest.raises(
        ValueError, match=r"generate_cropped: context must be an int >= 1, got 2\.0"
    ):
        decoding.generate_cropped(fn, tokens, 3, context=2.0, keys=None, temperature=0.0)
    greedy = decoding.generate_cropped(fn, tokens, 3, context=4, keys=None, temperature=0.0)
    np.testing.assert_array_equal(greedy, jnp.zeros((2, 7), jnp.int32))  # argmax of zeros
    # A truthy non-bool switched to greedy decoding silently, as generate refuses it.
    with pytest.raises(ValueError, match=r"generate_cropped: greedy must be a bool, got 'no'"):
        decoding.generate_cropped(fn, tokens, 3, context=4, keys=None, greedy="no")


def test_decoding_refuses_an_eos_id_past_the_vocabulary():
    """An eos_id the model cannot emit was accepted and never matched: every row silently
    ran to max_new_tokens (beam_search refuses such an eos_id)."""
    step = lambda tok, cache: (jnp.zeros((*tok.shape, 5)), cache)
    window = lambda window, offset: jnp.zeros((window.shape[0], 5))
    prompt = jnp.zeros((2, 2), jnp.int32)
    with pytest.raises(ValueError, match=r"generate: eos_id=5 is not in the vocabulary \[0, 5\)"):
        decoding.generate(step, None, prompt, 3, temperature=0.0, eos_id=5)
    with pytest.raises(ValueError, match=r"generate_cropped: eos_id=7 is not in the vocab"):
        decoding.generate_cropped(window, prompt, 3, context=2, keys=None, greedy=True, eos_id=7)
    # The last id is a fine eos_id (argmax of zeros draws 0, no row ends).
    out = decoding.generate(step, None, prompt, 3, temperature=0.0, eos_id=4)
    np.testing.assert_array_equal(out, jnp.zeros((2, 5), jnp.int32))


def test_decoding_refuses_prompts_that_are_not_integer_ids():
    # Cast to int32 inside: 1.7 was read as token 1 and True as token 1, silently.
    step = lambda tok, cache: (jnp.zeros((tok.shape[0], 5)), cache)
    window = lambda window, offset: jnp.zeros((window.shape[0], 5))
    for prompt in (jnp.array([[1.7, 2.9]]), jnp.array([[True, False]])):
        dtype = prompt.dtype
        with pytest.raises(ValueError, match=f"generate: prompt must be integer.*{dtype}"):
            decoding.generate(step, None, prompt, 2, rng=key(0), temperature=0.0)
        with pytest.raises(ValueError, match=f"generate_cropped: tokens must be integer.*{dtype}"):
            decoding.generate_cropped(window, prompt, 2, context=2, keys=None, temperature=0.0)


def test_sampled_generate():
    w = random_weights(BASE)
    prompt = tokens_for(BASE, (B, 2), seed=4)
    outs = [
        np.asarray(gpt_module.generate(w, BASE, prompt, 8, rng=key(s), top_k=5, top_p=0.9))
        for s in range(3)
    ]
    for out in outs:
        assert out.shape == (B, 10)
        np.testing.assert_array_equal(out[:, :2], prompt)
        assert out.min() >= 0 and out.max() < BASE.vocab_size
    assert not all(np.array_equal(outs[0], o) for o in outs[1:])  # the key matters
    np.testing.assert_array_equal(gpt_module.generate(w, BASE, prompt, 0, rng=key(0)), prompt)


def test_generate_rejects_bad_requests():
    w = random_weights(BASE)
    prompt = tokens_for(BASE, (1, 4))
    with pytest.raises(ValueError, match="per-layer blocks"):
        gpt_module.generate(gpt_module.unstack_layers(w, init_cache(BASE, 1, 4))[0], BASE,
                            prompt, 2, rng=key(0))  # fmt: skip
    with pytest.raises(ValueError, match="max_new_tokens"):
        gpt_module.generate(w, BASE, prompt, -1, rng=key(0))
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 0, got 2\.0"):
        gpt_module.generate(w, BASE, prompt, 2.0, rng=key(0))
    with pytest.raises(ValueError, match="top_p"):
        gpt_module.generate(w, BASE, prompt, 2, rng=key(0), top_p=2.0)
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        gpt_module.generate(w, BASE, jnp.array([[1, 13]]), 2, rng=key(0))


def test_sampling_without_one_key_names_rng():
    """None (fine for greedy decoding) or an int seed failed inside JAX as "unexpected PRNG
    key type", and a batch of keys (split(key, 2), typed or raw) as "split accepts a single
    key", naming neither rng nor the function."""
    w = random_weights(BASE)
    prompt = tokens_for(BASE, (2, 4))
    no_key = r"sampling \(temperature=1.0\) needs an rng key .*got "
    batch = r"rng must be one PRNG key, got keys of shape \(2,\)"
    cases = [
        (None, no_key + "None"),
        (1, no_key + "1"),
        (jnp.zeros(3), no_key + r"float32 \(3,\)"),
        (jax.random.split(jax.random.key(0), 2), batch),
        (jax.random.split(jax.random.PRNGKey(0)), batch),
    ]  # fmt: skip
    for rng, message in cases:
        with pytest.raises(ValueError, match=rf"generate: {message}"):
            gpt_module.generate(w, BASE, prompt, 2, rng=rng)
        with pytest.raises(ValueError, match=rf"generate: {message}"):
            decoding.generate(lambda t, c: (jnp.zeros((2, t.shape[1], 5)), c), None, prompt, 2,
                              rng=rng)  # fmt: skip
        with pytest.raises(ValueError, match=rf"sample_logits: {message}"):
            decoding.sample_logits(rng, jnp.zeros((2, 5)))
    # Greedy decoding needs none (rng defaults to None); a raw uint32[2] key still samples,
    # and under vmap each row's key is one key.
    gpt_module.generate(w, BASE, prompt, 2, rng=None, temperature=0.0)
    gpt_module.generate(w, BASE, prompt, 2, temperature=0.0)
    decoding.generate(lambda t, c: (jnp.zeros((2, t.shape[1], 5)), c), None, prompt, 2,
                      greedy=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"generate: sampling .* needs an rng key .*got None"):
        gpt_module.generate(w, BASE, prompt, 2)
    decoding.sample_logits(None, jnp.zeros((1, 5)), greedy=True)
    decoding.sample_logits(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    keys = jax.random.split(jax.random.key(0), 2)
    assert jax.vmap(decoding.sample_logits)(keys, jnp.zeros((2, 1, 5))).shape == (2, 1)


# Tokens gpt.generate drew before temperature and top_p were traced (static, compiled in):
# ROPE weights random_weights(seed=5), prompt tokens_for((B, 3), seed=6), 12 new tokens (past
# block_size = 11: both the cached and the cropped loop), rng=jax.random.key(4).
PRE_TRACED_TOKENS = [
    (dict(temperature=0.8, top_k=6, top_p=0.95),
     [[5, 6, 6, 11, 11, 11, 2, 11, 11, 11, 11, 11, 12, 7, 11],
      [4, 12, 4, 11, 11, 11, 11, 11, 11, 11, 11, 9, 11, 11, 11]]),
    (dict(temperature=1.3),
     [[5, 6, 6, 11, 11, 11, 2, 1, 11, 10, 11, 11, 12, 7, 11],
      [4, 12, 4, 11, 4, 5, 4, 11, 0, 11, 11, 10, 11, 11, 11]]),
    (dict(temperature=0.5, top_p=0.9),
     [[5, 6, 6, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11],
      [4, 12, 4, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11]]),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "expected"), PRE_TRACED_TOKENS)
def test_generate_draws_the_tokens_it_drew_with_static_settings(settings, expected):
    """The same tokens as when temperature and top_p were compiled in (XLA then turned
    ``x / T`` into ``x * (1 / T)``, which ``_tempered`` now computes), as Python numbers
    and traced under an outer jit."""
    w = random_weights(ROPE, seed=5)
    prompt = tokens_for(ROPE, (B, 3), seed=6)
    rng = jax.random.key(4)
    out = gpt_module.generate(w, ROPE, prompt, 12, rng=rng, **settings)
    np.testing.assert_array_equal(out, expected)
    traced = {k: v for k, v in settings.items() if k != "top_k"}

    @jax.jit
    def run(w, traced):
        return gpt_module.generate(
            w, ROPE, prompt, 12, rng=rng, top_k=settings.get("top_k"), **traced
        )

    np.testing.assert_array_equal(run(w, traced), expected)


def test_new_temperature_or_top_p_reuses_the_compiled_generate():
    """Only greedy or not and top-p on or off choose the program; the values are traced."""
    config = dataclasses.replace(BASE, vocab_size=19)  # no other test's cache entries
    w = random_weights(config)
    prompt = tokens_for(config, (B, 3))
    run = functools.partial(gpt_module.generate, w, config, prompt, 4, rng=key(0), top_k=5)
    cache_size = gpt_module._generate_jit._cache_size  # compiled programs, all tests'
    before = cache_size()
    size = lambda: cache_size() - before

    run(temperature=0.8)
    assert size() == 1
    outs = [np.asarray(run(temperature=t)) for t in (0.5, 1.0, 1.7, 1e38)]
    assert size() == 1  # four new temperatures, no compile
    assert len({o.tobytes() for o in outs}) > 1  # ... and they do draw differently
    run(temperature=0.8, top_p=1.0)  # keeps every token: the program without the filter
    assert size() == 1
    run(temperature=0.8, top_p=0.9)
    run(temperature=1.2, top_p=0.5)
    assert size() == 2  # the nucleus filter: one more program, for every top_p
    greedy = run(temperature=0.0)
    assert size() == 3  # greedy: the argmax program
    # Greedy is still the argmax: sampling from the single most likely token agrees.
    np.testing.assert_array_equal(greedy, run(temperature=0.7, top_k=1))
    # Concrete JAX scalars are read as their values: 0 still picks the greedy program.
    np.testing.assert_array_equal(run(temperature=jnp.float32(0.0)), greedy)
    np.testing.assert_array_equal(run(temperature=jnp.float32(1.0)), outs[1])
    assert size() == 4  # (top_k=1 above: top_k is static, lax.top_k needs it)


def test_gpt_generate_compiles_once(monkeypatch):
    # A config no other test uses, so the compilation cache starts cold.
    config = dataclasses.replace(BASE, vocab_size=17)
    w = random_weights(config)
    traces = []
    real = gpt_module.gpt_decode

    def counting(*args, **kwargs):
        traces.append(args[1].shape)  # runs only while tracing
        return real(*args, **kwargs)

    monkeypatch.setattr(gpt_module, "gpt_decode", counting)
    gpt_module.generate(w, config, tokens_for(config, (B, 3)), 4, rng=key(0))
    assert traces == [(B, 3), (B, 1)]  # one prefill call, one scan-body call
    gpt_module.generate(w, config, tokens_for(config, (B, 3), seed=1), 4, rng=key(1))
    assert len(traces) == 2  # new values, same shapes: no retrace


def test_generate_loop_with_a_toy_model():
    """decoding.generate on a counting model: prefill once, then one token per step."""
    vocab = 7
    calls = []

    def decode_fn(tokens, cache):  # next token = (token + 1) % V, as one-hot logits
        calls.append(tokens.shape)
        logits = 5.0 * jax.nn.one_hot((tokens + 1) % vocab, vocab)  # [B, t, V]
        return logits, cache + tokens.shape[1]

    @functools.partial(jax.jit, static_argnames="n")
    def run(prompt, rng, n):
        return decoding.generate(
            decode_fn, jnp.zeros((), jnp.int32), prompt, n, rng=rng, temperature=0.0
        )

    prompt = jnp.array([[3, 4], [6, 0]])
    out = run(prompt, key(0), 5)
    np.testing.assert_array_equal(out, [[3, 4, 5, 6, 0, 1, 2], [6, 0, 1, 2, 3, 4, 5]])
    assert calls == [(2, 2), (2, 1)]
    run(prompt + 1, key(1), 5)
    assert len(calls) == 2  # jitted once per shape
    with pytest.raises(ValueError, match="prompt"):
        decoding.generate(decode_fn, 0, jnp.zeros((2,), jnp.int32), 3, rng=key(0))


def test_sampled_generate_past_the_context_takes_a_raw_prng_key():
    """A legacy uint32 jax.random.PRNGKey draws as the typed threefry key of its data."""
    w = random_weights(BASE, seed=5)
    prompt = tokens_for(BASE, (B, 4), seed=6)
    raw = gpt_module.generate(w, BASE, prompt, 10, rng=jax.random.PRNGKey(4), top_k=6)
    typed = gpt_module.generate(w, BASE, prompt, 10, rng=jax.random.key(4), top_k=6)
    np.testing.assert_array_equal(raw, typed)


def test_gpt_decode_computes_in_the_config_dtype(monkeypatch):
    """gpt_decode casts init_gpt's float32 weights to bfloat16, as gpt does (uncast, the
    decode step ran in float32 while the caches and the config said bfloat16)."""
    bf16 = dataclasses.replace(BASE, dtype="bfloat16")
    real, seen = gpt_module.feed_forward, []

    def spy(weights, x, **kw):
        seen.append(x.dtype)
        return real(weights, x, **kw)

    monkeypatch.setattr(gpt_module, "feed_forward", spy)
    w, tokens = random_weights(BASE), tokens_for(BASE, (B, 3))
    logits, _ = jax.eval_shape(lambda: gpt_decode(w, tokens, init_cache(bf16, B, 4), bf16))
    assert logits.dtype == jnp.float32
    assert seen and set(seen) == {jnp.dtype(jnp.bfloat16)}


def test_init_cache_refuses_sizes_that_are_not_ints():
    # 2.5 failed inside jnp.zeros naming no argument; True made a cache of length 1.
    for bad in (2.5, 4.0, True):
        with pytest.raises(ValueError, match=r"init_cache: batch_size must be an int >= 1"):
            init_cache(BASE, bad, 4)
        with pytest.raises(ValueError, match=r"init_cache: max_len must be an int >= 1"):
            init_cache(BASE, 1, bad)
    assert init_cache(BASE, np.int64(2), np.int64(4)).k.shape == (2, 2, 4, 3, 4)
    for dtype in ("int32", "bool"):  # the cached keys and values would be truncated
        with pytest.raises(ValueError, match=f"init_cache: dtype must be floating, got {dtype}"):
            init_cache(BASE, 1, 4, dtype=dtype)


def test_gpt_decode_may_fill_the_cache_to_its_last_slot():
    # Only writes past the end overflow (eagerly checked; under jit the index is traced).
    w = random_weights(BASE)
    cache = init_cache(BASE, 1, 4)._replace(index=jnp.array(2, jnp.int32))  # 2 slots left
    logits, cache = gpt_decode(w, tokens_for(BASE, (1, 2)), cache, BASE)
    assert logits.shape == (1, 2, BASE.vocab_size) and int(cache.index) == 4


@pytest.mark.parametrize("top_p", [None, 0.9])
def test_a_traced_zero_temperature_draws_tied_maxima_equally(top_p):
    """_tempered keeps the maxima at 0 under a traced T = 0: 0 * inf would make them NaN,
    and argmax would then always pick the first of the tied tokens (a mutation test found
    the suite's traced-T = 0 check used logits with one clear maximum only)."""
    n = 20_000
    logits = jnp.broadcast_to(jnp.array([10.0, 10.0, 0.0]), (n, 3))
    top_p = None if top_p is None else jnp.float32(top_p)
    draws = jax.jit(decoding.sample_logits)(
        jax.random.key(1), logits, temperature=jnp.float32(0.0), top_p=top_p
    )
    frequencies = np.bincount(np.asarray(draws), minlength=3) / n
    np.testing.assert_allclose(frequencies, [0.5, 0.5, 0.0], atol=0.02)  # ~6 sigma
