"""NNX modules hold the same trees as the pure functions and compute the same numbers."""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn import nn
from jaxattn.models import gpt, seq2seq, transformer
from jaxattn.ops import attention as attention_ops
from jaxattn.ops import lstm as lstm_ops
from tests.generation import ended_at_eos


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leaves_close(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_lstm_module_equals_pure_function(rng):
    module = nn.LSTM(5, 7, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    xs = jax.random.normal(rng, (3, 11, 5))
    lengths = jnp.array([11, 4, 1])
    ys, (h, c) = module(xs, lengths=lengths)
    ys_ref, (h_ref, c_ref) = lstm_ops.lstm_stack(module.pure_weights(), xs, lengths=lengths)
    assert ys.shape == (3, 11, 14) and h.shape == (4, 3, 7)
    np.testing.assert_array_equal(ys, ys_ref)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(c, c_ref)


def test_lstm_module_passes_its_implementation(rng):
    """``implementation="autodiff"`` reaches ``lstm_stack``: forward mode then works, with
    the default kernel's outputs."""
    xs = jax.random.normal(rng, (2, 4, 3))
    module = nn.LSTM(3, 5, implementation="autodiff", rngs=nnx.Rngs(0))
    ys, tangent = jax.jvp(lambda x: module(x)[0], (xs,), (xs,))
    assert tangent.shape == ys.shape == (2, 4, 5)
    default = nn.LSTM.from_weights(module.pure_weights())
    np.testing.assert_allclose(ys, default(xs)[0], rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="implementation='autodiff'"):
        jax.jvp(lambda x: default(x)[0], (xs,), (xs,))
    with pytest.raises(ValueError, match=r"LSTM: implementation must be None or one of"):
        nn.LSTM(3, 5, implementation="fast", rngs=nnx.Rngs(0))


def test_lstm_round_trip_pure_to_module_and_back(rng):
    weights = lstm_ops.init_lstm_stack(rng, 3, 5, num_layers=2)
    module = nn.LSTM.from_weights(weights)
    _leaves_equal(module.pure_weights(), weights)
    # nnx.state exposes exactly these arrays as Params, so optimisers see the same tree.
    params = jax.tree.leaves(nnx.state(module, nnx.Param))
    assert len(params) == len(jax.tree.leaves(weights))
    assert isinstance(module, nn.LSTM)
    xs = jax.random.normal(jax.random.key(1), (2, 7, 3))
    np.testing.assert_array_equal(module(xs)[0], lstm_ops.lstm_stack(weights, xs)[0])


def test_multi_head_attention_from_weights_keeps_gqa_and_bias_layout(rng):
    weights = attention_ops.init_multi_head_attention(
        rng, 12, 6, num_kv_heads=3, kv_dim=5, out_dim=7, use_bias=False
    )
    module = nn.MultiHeadAttention.from_weights(weights)
    _leaves_equal(module.pure_weights(), weights)
    x_q = jax.random.normal(jax.random.key(1), (2, 3, 12))
    x_kv = jax.random.normal(jax.random.key(2), (2, 9, 5))
    assert module(x_q, x_kv).shape == (2, 3, 7)
    # Arguments reach the op: a sliding window over the 9 keys (queries last, T < S).
    window = dict(is_causal=True, local_window_size=(2, 0))
    np.testing.assert_array_equal(
        module(x_q, x_kv, **window),
        attention_ops.multi_head_attention(weights, x_q, x_kv, **window),
    )
    assert not np.array_equal(module(x_q, x_kv, **window), module(x_q, x_kv, is_causal=True))


@pytest.mark.parametrize("cls", ["general", "additive"])
def test_seq2seq_attention_modules_equal_ops(cls, rng):
    kq, kk = jax.random.split(rng)
    query = jax.random.normal(kq, (2, 3, 5))
    keys = jax.random.normal(kk, (2, 7, 11))
    mask = jnp.arange(7)[None, None, :] < jnp.array([7, 4])[:, None, None]
    if cls == "general":
        module = nn.GeneralAttention(5, 11, rngs=nnx.Rngs(1))
        scores = attention_ops.general_scores(module.pure_weights(), query, keys)
    else:
        module = nn.AdditiveAttention(5, 11, 13, rngs=nnx.Rngs(1))
        scores = attention_ops.additive_scores(module.pure_weights(), query, keys)
    context, weights = module(query, keys, mask=mask)
    context_ref, weights_ref = attention_ops.attend(scores, keys, mask)
    np.testing.assert_array_equal(context, context_ref)
    np.testing.assert_array_equal(weights, weights_ref)
    assert context.shape == (2, 3, 11) and weights.shape == (2, 3, 7)
    # Rebuilt from its pure weights (e.g. a converted checkpoint): the same module.
    rebuilt = type(module).from_weights(module.pure_weights())
    np.testing.assert_array_equal(rebuilt(query, keys, mask=mask)[0], context)
    # Values other than the keys (here narrower) are what the weights average.
    values = jax.random.normal(jax.random.key(3), (2, 7, 4))
    context, weights = module(query, keys, values, mask=mask)
    context_ref, weights_ref = attention_ops.attend(scores, values, mask)
    assert context.shape == (2, 3, 4)
    np.testing.assert_array_equal(context, context_ref)
    np.testing.assert_array_equal(weights, weights_ref)


def test_multi_head_attention_module_equals_ops_and_trains(rng):
    module = nn.MultiHeadAttention(12, 6, num_kv_heads=2, kv_dim=7, rngs=nnx.Rngs(2))
    kq, kk = jax.random.split(rng)
    x_q = jax.random.normal(kq, (3, 5, 12))
    x_kv = jax.random.normal(kk, (3, 9, 7))
    out = module(x_q, x_kv)
    ref = attention_ops.multi_head_attention(module.pure_weights(), x_q, x_kv)
    np.testing.assert_array_equal(out, ref)

    # nnx.grad through the module equals jax.grad through the pure function.
    grads = nnx.grad(lambda m: jnp.sum(m(x_q, x_kv) ** 2))(module)
    pure_grads = jax.grad(lambda w: jnp.sum(attention_ops.multi_head_attention(w, x_q, x_kv) ** 2))(
        module.pure_weights()
    )
    # Put the gradient State back into the module's structure to compare leaf by leaf.
    grads_as_module = nnx.merge(nnx.graphdef(module), grads)
    _leaves_close(grads_as_module.pure_weights(), pure_grads)


def test_module_under_nnx_jit(rng):
    module = nn.MultiHeadAttention(8, 2, rngs=nnx.Rngs(3))
    x = jax.random.normal(rng, (2, 5, 8))
    jitted = nnx.jit(lambda m, x: m(x, is_causal=True))
    np.testing.assert_allclose(jitted(module, x), module(x, is_causal=True), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", ["lstm", "mha"])
def test_train_eval_and_view_switch_dropout(cls, rng):
    """NNX's train()/eval()/nnx.view(deterministic=...) reach the modules' dropout."""
    if cls == "lstm":
        module = nn.LSTM(5, 7, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))
        x = jax.random.normal(rng, (3, 11, 5))
        out = lambda m, **kw: m(x, **kw)[0]
    else:
        module = nn.MultiHeadAttention(12, 3, dropout_rate=0.5, rngs=nnx.Rngs(0))
        x = jax.random.normal(rng, (3, 11, 12))
        out = lambda m, **kw: m(x, **kw)
    key = jax.random.key(1)
    evaluated = out(module)  # deterministic by default
    train_view = nnx.view(module, deterministic=False)
    assert not np.array_equal(out(train_view, rng=key), evaluated)
    module.train()
    with pytest.raises(ValueError, match="rng"):  # training without a key is loud, not a no-op
        out(module)
    np.testing.assert_array_equal(out(module, rng=key), out(train_view, rng=key))
    np.testing.assert_array_equal(out(module, rng=key, deterministic=True), evaluated)
    module.eval()
    np.testing.assert_array_equal(out(module), evaluated)


def test_from_weights_owns_a_copy_of_numpy_weights(rng):
    weights = jax.tree.map(np.array, attention_ops.init_multi_head_attention(rng, 12, 3))
    module = nn.MultiHeadAttention.from_weights(weights)
    before = np.array(weights.w_q)
    weights.w_q[:] = 0.0  # the caller reuses its buffer: the module must not change
    np.testing.assert_array_equal(module.pure_weights().w_q, before)
    assert isinstance(module.pure_weights().w_q, jax.Array)


def test_from_weights_names_a_wrong_tree(rng):
    mha = nn.MultiHeadAttention(12, 3, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"MultiHeadAttention\.from_weights.*pure_weights.*got "):
        nn.MultiHeadAttention.from_weights(mha)  # the module, not its tree
    with pytest.raises(TypeError, match=r"LSTM\.from_weights.*got MultiHeadAttentionWeights"):
        nn.LSTM.from_weights(mha.pure_weights())
    with pytest.raises(TypeError, match=r"GeneralAttention\.from_weights.*got AdditiveWeights"):
        nn.GeneralAttention.from_weights(attention_ops.init_additive(rng, 5, 11, 13))
    # module.weights (nnx.Params), not module.pure_weights(): each Param was wrapped again.
    with pytest.raises(TypeError, match=r"MultiHeadAttention\.from_weights.*of nnx\.Params"):
        nn.MultiHeadAttention.from_weights(mha.weights)


def test_from_weights_refuses_integer_weights_by_path(rng):
    """As the models' from_weights do: the attention modules took an integer tree silently,
    and MultiHeadAttention blamed a param_dtype= the caller never passed."""
    as_int = lambda tree: jax.tree.map(lambda a: (a * 10).astype(jnp.int32), tree)
    cases = [
        (
            nn.MultiHeadAttention,
            attention_ops.init_multi_head_attention(rng, 12, 3),
            r"\.w_q int32",
        ),
        (nn.AdditiveAttention, attention_ops.init_additive(rng, 5, 11, 13), r"\.w_query int32"),
        (nn.GeneralAttention, attention_ops.init_general(rng, 5, 11), r"got int32"),
        (nn.LSTM, lstm_ops.init_lstm_stack(rng, 3, 4), r"\[0\]\.w_ih int32"),
    ]
    for cls, weights, where in cases:
        with pytest.raises(ValueError, match=rf"{cls.__name__}\.from_weights: weights must be "):
            cls.from_weights(as_int(weights))
        with pytest.raises(ValueError, match=where):
            cls.from_weights(as_int(weights))
        half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), weights)  # any float dtype
        _leaves_equal(cls.from_weights(half).pure_weights(), half)


def test_from_weights_names_a_flat_state_tree(rng):
    """nnx.to_pure_dict(nnx.state(m)) or an orbax restore without a target: nested dicts, not
    the weights NamedTuples (LSTM's raised a bare KeyError: 0)."""
    lstm = nn.LSTM(3, 4, rngs=nnx.Rngs(0))
    pure_state = nnx.to_pure_dict(nnx.state(lstm, nnx.Param))  # (as_pure: flax >= 0.12.6)
    with pytest.raises(TypeError, match=r"LSTM\.from_weights: expected the pure weights tree"):
        nn.LSTM.from_weights(pure_state)


def test_from_weights_of_float64_numpy_weights_warns_nothing(rng):
    """A float64 checkpoint (NumPy, torch) is converted once, as the module's arrays are;
    the abstract build asked for float64 eight times ("not available") first."""
    weights = jax.tree.map(
        lambda a: np.asarray(a, np.float64), attention_ops.init_multi_head_attention(rng, 8, 2)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = nn.MultiHeadAttention.from_weights(weights)
    assert module.pure_weights().w_q.dtype == jnp.float32


def test_a_warning_from_from_weights_names_the_callers_line(rng):
    layers = lstm_ops.init_lstm_stack(rng, 3, 4)
    with pytest.warns(UserWarning, match="it drops nothing") as caught:
        nn.LSTM.from_weights(layers, dropout_rate=0.5)
    assert caught[0].filename == __file__  # was jax's partial_eval.py (nnx.eval_shape)


def test_deterministic_must_be_a_bool():
    """None meant training (dropout on); a string passed; a JAX array broke nnx.jit."""
    for bad in (None, "no", jnp.array(True)):
        with pytest.raises(TypeError, match="MultiHeadAttention: deterministic must be a bool"):
            nn.MultiHeadAttention(8, 2, dropout_rate=0.1, deterministic=bad, rngs=nnx.Rngs(0))
    module = nn.GPT(_tiny_gpt(), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="GPT: deterministic must be a bool"):
        module.deterministic = None
    module.train()
    assert module.deterministic is False
    nnx.view(module, deterministic=True)  # NNX's own switches still set it


def test_a_calls_deterministic_must_be_a_bool():
    """deterministic="no" at the call (a string from a config) was taken as true by the LSTM
    and the models: dropout silently off. Now refused, naming the module, as the attribute.
    The calls are traced (jax.eval_shape), not run: the check is made in Python as the call
    traces, and compiling the GPT and its loss here took most of the time."""
    key, x = jax.random.key(0), jnp.ones((1, 3, 8))
    tokens = jnp.zeros((1, 4), jnp.int32)
    lstm = nn.LSTM(8, 4, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    mha = nn.MultiHeadAttention(8, 2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    model = nn.GPT(_tiny_gpt(dropout=0.1), rngs=nnx.Rngs(0))
    calls = [
        ("LSTM", lambda d: lstm(x, rng=key, deterministic=d)),
        ("MultiHeadAttention", lambda d: mha(x, rng=key, deterministic=d)),
        ("GPT", lambda d: model(tokens, rng=key, deterministic=d)),
        ("GPT", lambda d: model.loss(tokens, tokens, rng=key, deterministic=d)),
    ]
    for name, call in calls:
        for bad in ("no", 0):
            with pytest.raises(
                ValueError, match=f"{name}: deterministic must be a bool, got {bad!r}"
            ):
                jax.eval_shape(functools.partial(call, bad))
        jax.eval_shape(functools.partial(call, np.bool_(False)))
    batch = _translation_batch()
    for cls, (make_config, *_) in TRANSLATORS.items():  # refused before any compute
        translator = cls(make_config(), rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=f"{cls.__name__}: deterministic must be a bool"):
            translator.loss(batch, rng=key, deterministic="no")


def test_dropout_without_a_key_names_the_module_and_the_way_out(rng):
    x = jnp.ones((1, 3, 8))
    mha = nn.MultiHeadAttention(8, 2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    mha.train()
    with pytest.raises(ValueError, match=r"MultiHeadAttention applies dropout 0\.5 .*\.eval\(\)"):
        mha(x)  # was "multi_head_attention: ... deterministic=False needs an rng key"
    with pytest.raises(TypeError, match=r"rng is a key, not an nnx\.Rngs: pass rng=rngs\.dropout"):
        mha(x, rng=nnx.Rngs(0))  # was "unexpected PRNG key type"
    with pytest.raises(TypeError, match=r"not an nnx\.RngStream: pass rng=rngs\.dropout\(\)"):
        mha(x, rng=nnx.Rngs(0).dropout)  # the stream, as nnx.Dropout takes it: "unexpected PRNG"
    mha(x, rng=nnx.Rngs(0).dropout())
    lstm = nn.LSTM(8, 4, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    lstm.train()
    with pytest.raises(ValueError, match=r"LSTM applies dropout 0\.5"):
        lstm(x)
    model = nn.GPT(_tiny_gpt(dropout=0.1), rngs=nnx.Rngs(0))
    model.train()
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"GPT applies dropout 0\.1"):
        model.loss(tokens, tokens)
    model.eval()
    with pytest.raises(ValueError, match=r"GPT applies dropout 0\.1 .*deterministic=False"):
        model(tokens, deterministic=False)
    model(tokens)  # eval mode: no key needed


def test_a_dropout_key_that_is_not_one_key_names_the_module():
    """An int seed (as nnx.Rngs takes) failed in JAX as "invalid PRNG key data", a batch of
    keys as "split accepts a single key", naming neither the module nor ``rng``."""
    x = jnp.ones((2, 3, 8))
    modules = [
        nn.MultiHeadAttention(8, 2, dropout_rate=0.5, rngs=nnx.Rngs(0)),
        nn.LSTM(8, 4, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0)),
    ]
    for module in modules:
        name = type(module).__name__
        keys = jax.random.split(jax.random.key(0), 2)
        for bad, shown in ((0, "0"), (keys, r"key<\w+> \(2,\)")):
            with pytest.raises(
                TypeError, match=rf"{name}: rng must be one PRNG key .* got {shown}"
            ):
                module(x, rng=bad, deterministic=False)
        module(x, rng=jax.random.PRNGKey(0), deterministic=False)  # raw keys still work
        module(x, rng=0)  # evaluation: the key is unused, as before
    model = nn.GPT(_tiny_gpt(dropout=0.1), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(TypeError, match=r"GPT: rng must be one PRNG key .* got 0"):
        model.loss(tokens, tokens, rng=0, deterministic=False)


def test_from_weights_refuses_an_option_the_weights_set(rng):
    """Such an option failed as "got multiple values for keyword argument 'param_dtype'", and
    the old name dtype= as "got dtype= and param_dtype=", which the caller never passed."""
    mha = attention_ops.init_multi_head_attention(rng, 8, 2)
    for option in (dict(param_dtype=jnp.bfloat16), dict(dtype=jnp.bfloat16), dict(num_heads=2)):
        (name,) = option
        with pytest.raises(
            TypeError, match=rf"MultiHeadAttention\.from_weights: {name} cannot be passed"
        ):
            nn.MultiHeadAttention.from_weights(mha, **option)
    with pytest.raises(TypeError, match=r"LSTM\.from_weights: takes no rngs"):
        nn.LSTM.from_weights(lstm_ops.init_lstm_stack(rng, 3, 4), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "build",
    [
        lambda rngs: nn.LSTM(3, 4, rngs=rngs),
        lambda rngs: nn.GeneralAttention(3, 4, rngs=rngs),
        lambda rngs: nn.AdditiveAttention(3, 4, 5, rngs=rngs),
        lambda rngs: nn.MultiHeadAttention(8, 2, rngs=rngs),
        lambda rngs: nn.GPT(_tiny_gpt(), rngs=rngs),
    ],
    ids=["LSTM", "GeneralAttention", "AdditiveAttention", "MultiHeadAttention", "GPT"],
)
def test_a_constructors_rngs_must_be_an_nnx_rngs(build):
    """A key (what the pure inits take), a seed or a stream failed as "'PRNGKeyArray' object
    has no attribute 'params'", naming neither the module nor the argument."""
    name = type(build(nnx.Rngs(0))).__name__
    for rngs, got in [
        (jax.random.key(0), "key<fry> ()"),
        (0, "0"),
        (nnx.Rngs(0).params, "RngStream"),
    ]:
        with pytest.raises(
            TypeError, match=rf"^{name}: rngs must be an nnx\.Rngs .*got {re.escape(got)}$"
        ):
            build(rngs)


def test_multi_head_attention_names_a_bad_param_dtype():
    # The op's check named its own argument: "init_multi_head_attention: dtype must be ...".
    with pytest.raises(ValueError, match="MultiHeadAttention: param_dtype must be a floating"):
        nn.MultiHeadAttention(8, 2, param_dtype=jnp.int32, rngs=nnx.Rngs(0))


def test_from_weights_refuses_a_tree_that_does_not_fit_together(rng):
    # The sizes come from a few leaves; the rest failed only at the first call, blaming x.
    layers = lstm_ops.init_lstm_stack(rng, 3, 4, num_layers=2)
    bad = (layers[0], layers[1]._replace(w_ih=jnp.zeros((7, 16))))
    with pytest.raises(
        ValueError, match=r"LSTM\.from_weights: weight \[1\]\.w_ih has shape \(7, 16\)"
    ):
        nn.LSTM.from_weights(bad)
    assert nn.LSTM.from_weights(list(layers)).pure_weights()[1].w_ih.shape == (4, 16)  # a list
    mha = attention_ops.init_multi_head_attention(rng, 8, 2)
    with pytest.raises(ValueError, match=r"weight \.w_o has shape \(3, 4, 8\).*give \(2, 4, 8\)"):
        nn.MultiHeadAttention.from_weights(mha._replace(w_o=jnp.zeros((3, 4, 8))))
    additive = attention_ops.init_additive(rng, 5, 6, 7)
    with pytest.raises(ValueError, match=r"weight \.v has shape \(3,\)"):
        nn.AdditiveAttention.from_weights(additive._replace(v=jnp.zeros((3,))))


def test_a_bad_dropout_rate_fails_at_construction():
    message = r"MultiHeadAttention: dropout_rate must be in \[0, 1\), got 1.5"
    with pytest.raises(ValueError, match=message):
        nn.MultiHeadAttention(12, 3, dropout_rate=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"LSTM: dropout_rate must be in \[0, 1\), got -0.1"):
        nn.LSTM(5, 7, num_layers=2, dropout_rate=-0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="bidirectional must be a bool, got 'yes'"):
        nn.LSTM(5, 7, bidirectional="yes", rngs=nnx.Rngs(0))


def test_an_array_dropout_rate_fails_at_construction():
    """A 0-d array rate passed the check, became module state that nnx.jit traces, and the
    first jitted training call failed "must be a concrete number, got a traced value"."""
    for rate in (np.array(0.1), jnp.array(0.1)):
        with pytest.raises(
            ValueError,
            match=r"MultiHeadAttention: dropout_rate must be a number in \[0, 1\) \(a scalar",
        ):
            nn.MultiHeadAttention(8, 2, dropout_rate=rate, rngs=nnx.Rngs(0))
        with pytest.raises(
            ValueError, match=r"LSTM: dropout_rate must be a number in \[0, 1\) \(a scalar, not an"
        ):
            nn.LSTM(3, 4, num_layers=2, dropout_rate=rate, rngs=nnx.Rngs(0))
    # NumPy scalars are numbers: static attributes, as a float is.
    module = nn.MultiHeadAttention(8, 2, dropout_rate=np.float32(0.1), rngs=nnx.Rngs(0))
    x, key = jnp.ones((2, 3, 8)), jax.random.key(0)
    step = nnx.jit(lambda m, key: m(x, rng=key, deterministic=False))
    np.testing.assert_array_equal(step(module, key), module(x, rng=key, deterministic=False))
    assert list(nnx.state(module)) == ["weights"]  # no rate among the state


def test_dropout_on_a_one_layer_lstm_warns_that_it_drops_nothing():
    with pytest.warns(UserWarning, match="1-layer LSTM has none: it drops nothing") as caught:
        nn.LSTM(3, 4, dropout_rate=0.5, rngs=nnx.Rngs(0))
    assert caught[0].filename == __file__  # the caller's line, not flax's constructor


def test_a_one_layer_lstm_in_train_mode_needs_no_key_and_drops_nothing(rng):
    """Its dropout acts between layers only: training without ``rng`` runs the plain LSTM
    (a float64 NumPy one here), not a "pass rng=key" error."""
    with pytest.warns(UserWarning, match="drops nothing"):
        module = nn.LSTM(3, 4, dropout_rate=0.5, deterministic=False, rngs=nnx.Rngs(0))
    xs = jax.random.normal(rng, (2, 5, 3))
    ys, (h_n, c_n) = module(xs)
    (w,) = module.pure_weights()
    w_ih, w_hh, b = (np.asarray(a, np.float64) for a in (w.w_ih, w.w_hh, w.b))
    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))
    h, c, want = np.zeros((2, 4)), np.zeros((2, 4)), []
    for x in np.asarray(xs, np.float64).transpose(1, 0, 2):
        i, f, g, o = np.split(x @ w_ih + h @ w_hh + b, 4, axis=-1)  # torch's gate order
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        want.append(h)
    np.testing.assert_allclose(ys, np.stack(want, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_n[0], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_n[0], c, rtol=1e-5, atol=1e-6)


def test_multi_head_attention_takes_the_old_dtype_name_with_a_warning():
    with pytest.warns(DeprecationWarning, match="now named param_dtype") as caught:
        module = nn.MultiHeadAttention(8, 2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert caught[0].filename == __file__
    assert module.pure_weights().w_q.dtype == jnp.bfloat16


def test_multi_head_attention_refuses_the_old_dtype_name_beside_param_dtype():
    # flax.nnx's idiom (dtype = compute, param_dtype = weights): the old name silently won,
    # giving bfloat16 weights where float32 ones were asked for.
    with pytest.raises(TypeError, match="dtype= and param_dtype="):
        nn.MultiHeadAttention(8, 2, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert nn.MultiHeadAttention(8, 2, rngs=nnx.Rngs(0)).pure_weights().w_q.dtype == jnp.float32


def test_an_input_of_the_wrong_width_names_the_module_and_the_input():
    """The pure ops named themselves ("project: x has shape ...", the same text for x_q and
    x_kv) or blamed the weights ("w must be [dq, dk] = (6, 6), got (8, 6)")."""
    x8, x6 = jnp.zeros((2, 5, 8)), jnp.zeros((2, 5, 6))
    mha = nn.MultiHeadAttention(8, 2, kv_dim=6, rngs=nnx.Rngs(0))
    mha(x8, x6)
    cases = [
        (lambda: mha(x6, x6), r"MultiHeadAttention: x_q has shape \(2, 5, 6\), but the module "
         r"was built for q_dim=8 \(its last axis\)"),
        (lambda: mha(x8, x8), r"MultiHeadAttention: x_kv has shape \(2, 5, 8\).* kv_dim=6"),
        (lambda: mha(x8), r"MultiHeadAttention: x_q has shape \(2, 5, 8\).* kv_dim=6"),
        (lambda: nn.LSTM(8, 4, rngs=nnx.Rngs(0))(x6), r"LSTM: xs has shape .* input_size=8"),
        (lambda: nn.GeneralAttention(8, 6, rngs=nnx.Rngs(0))(x6, x6),
         r"GeneralAttention: query has shape .* query_dim=8"),
        (lambda: nn.AdditiveAttention(8, 6, 4, rngs=nnx.Rngs(0))(x8, x8),
         r"AdditiveAttention: keys has shape .* key_dim=6"),
        (lambda: nn.AdditiveAttention(8, 6, 4, rngs=nnx.Rngs(0))(jnp.zeros(()), x6),
         r"AdditiveAttention: query has shape \(\)"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_view_reports_deterministic_as_unused_where_there_is_no_dropout(rng):
    scored = nn.GeneralAttention(5, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="deterministic"):
        nnx.view(scored, deterministic=False)  # as for nnx.Linear: nothing to switch


def test_constructors_build_the_same_trees_as_the_ops_inits():
    """Every constructor option reaches the init: shapes, None biases, dtype and values."""
    options = dict(head_dim=3, kv_dim=5, num_kv_heads=2, out_dim=7, use_bias=False)
    # param_dtype, as flax.nnx names the weights' dtype (the op's init calls it dtype)
    mha = nn.MultiHeadAttention(12, 6, **options, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(4))
    want = attention_ops.init_multi_head_attention(
        nnx.Rngs(4).params(), 12, 6, **options, dtype=jnp.bfloat16
    )
    _leaves_equal(mha.pure_weights(), want)
    assert {leaf.dtype for leaf in jax.tree.leaves(mha.pure_weights())} == {jnp.dtype("bfloat16")}
    lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True, rngs=nnx.Rngs(4))
    want = lstm_ops.init_lstm_stack(nnx.Rngs(4).params(), 5, 7, num_layers=2, bidirectional=True)
    _leaves_equal(lstm.pure_weights(), want)


def test_multi_head_attention_module_forwards_each_call_option(rng):
    module = nn.MultiHeadAttention(12, 3, rngs=nnx.Rngs(5))
    weights = module.pure_weights()
    x = jax.random.normal(rng, (2, 5, 12))
    keep = jnp.arange(5)[None, None, None, :] < jnp.array([5, 2])[:, None, None, None]
    bias = 3.0 * jax.random.normal(jax.random.key(1), (1, 3, 5, 5))
    plain = module(x)
    for options in ({"mask": keep}, {"bias": bias}, {"is_causal": True}):
        got = module(x, **options)
        np.testing.assert_array_equal(
            got, attention_ops.multi_head_attention(weights, x, **options)
        )
        assert not np.allclose(got, plain), options  # the option changes the output
    out, probs = module(x, is_causal=True, return_weights=True)
    ref_out, ref_probs = attention_ops.multi_head_attention(
        weights, x, is_causal=True, return_weights=True
    )
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(probs, ref_probs)
    assert probs.shape == (2, 3, 5, 5)


def test_lstm_module_forwards_the_initial_carry(rng):
    module = nn.LSTM(5, 7, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    kx, kh, kc = jax.random.split(rng, 3)
    xs = jax.random.normal(kx, (3, 4, 5))
    carry = (jax.random.normal(kh, (4, 3, 7)), jax.random.normal(kc, (4, 3, 7)))
    ys, (h, c) = module(xs, carry)
    ys_ref, (h_ref, c_ref) = lstm_ops.lstm_stack(module.pure_weights(), xs, carry)
    np.testing.assert_array_equal(ys, ys_ref)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(c, c_ref)
    assert not np.allclose(ys, module(xs)[0])  # a zero carry would give other outputs


def test_from_weights_passes_the_options_to_the_module(rng):
    weights = lstm_ops.init_lstm_stack(rng, 5, 7, num_layers=2)
    module = nn.LSTM.from_weights(weights, dropout_rate=0.25, deterministic=False)
    assert module.dropout_rate == 0.25 and module.deterministic is False
    mha = nn.MultiHeadAttention.from_weights(
        attention_ops.init_multi_head_attention(rng, 12, 3), dropout_rate=0.5
    )
    assert mha.dropout_rate == 0.5 and mha.deterministic is True


def test_an_abstract_module_gives_its_pure_shapes(rng, tmp_path):
    """nnx.eval_shape of a module (no init), or from_weights of a jax.eval_shape tree, holds
    ShapeDtypeStructs: pure_weights() returns them, so the module can be a load template."""
    pytest.importorskip("safetensors")
    from jaxattn.interop.safetensors import load_safetensors, save_safetensors

    module = nn.LSTM(3, 5, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    abstract = nnx.eval_shape(
        lambda: nn.LSTM(3, 5, num_layers=2, bidirectional=True, rngs=nnx.Rngs(1))
    )
    shapes = jax.eval_shape(lambda: module.pure_weights())
    assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract.pure_weights()) == jax.tree.map(
        lambda s: (s.shape, s.dtype), shapes
    )
    from_shapes = nn.LSTM.from_weights(shapes)
    assert jax.tree.structure(from_shapes.pure_weights()) == jax.tree.structure(shapes)
    path = tmp_path / "lstm.safetensors"
    save_safetensors(module, path)
    _leaves_equal(load_safetensors(path, like=abstract), module.pure_weights())


@pytest.mark.parametrize(
    "build, inputs",
    [
        (lambda: nn.LSTM(3, 5, rngs=nnx.Rngs(0)), lambda: (jnp.ones((2, 4, 3)),)),
        (lambda: nn.MultiHeadAttention(8, 2, rngs=nnx.Rngs(0)), lambda: (jnp.ones((2, 4, 8)),)),
        (
            lambda: nn.AdditiveAttention(3, 5, 7, rngs=nnx.Rngs(0)),
            lambda: (jnp.ones((2, 4, 3)), jnp.ones((2, 6, 5))),
        ),
        (lambda: nn.GPT(_tiny_gpt(), rngs=nnx.Rngs(0)), lambda: (jnp.zeros((2, 8), jnp.int32),)),
    ],
    ids=["LSTM", "MultiHeadAttention", "AdditiveAttention", "GPT"],
)
def test_calling_an_abstract_module_names_the_module_and_the_way_out(build, inputs):
    """An abstract module (a load template) called before it was given arrays failed inside
    JAX: "'ShapeDtypeStruct' object has no attribute 'astype'" or "... is not a valid JAX
    type", naming neither the module nor the cause."""
    abstract = nnx.eval_shape(build)
    name = type(abstract).__name__
    message = rf"{name} holds abstract weights \(jax\.ShapeDtypeStruct.*nnx\.update"
    with pytest.raises(TypeError, match=message):
        abstract(*inputs())
    if isinstance(abstract, nn.GPT):  # every computing method: the loss and decoding too
        tokens = inputs()[0]
        with pytest.raises(TypeError, match=message):
            abstract.loss(tokens, tokens)
        with pytest.raises(TypeError, match=message):
            abstract.generate(tokens[:, :2], 2, temperature=0.0)
    # Tracing it is still fine (nnx.eval_shape of a call), and a loaded one computes.
    assert nnx.eval_shape(lambda m: m(*inputs()), abstract) is not None
    nnx.update(abstract, nnx.state(build()))
    _leaves_equal(abstract(*inputs()), build()(*inputs()))


def test_multi_head_attention_module_forwards_the_implementation(rng):
    module = nn.MultiHeadAttention(8, 2, rngs=nnx.Rngs(6))
    x = jax.random.normal(rng, (1, 4, 8))
    with pytest.raises(ValueError, match="unknown implementation 'foo'"):
        module(x, implementation="foo")


def _tiny_gpt(**changes) -> gpt.GPTConfig:
    sizes = dict(vocab_size=11, block_size=8, num_layers=2, num_heads=2, embed_dim=8)
    return gpt.GPTConfig(**(sizes | changes))


def _tokens_and_targets(seed: int = 0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, 11, (3, 8)), jnp.int32)
    return tokens, jnp.roll(tokens, -1, axis=1)


def test_gpt_module_computes_the_pure_functions():
    config = _tiny_gpt(dropout=0.2, num_kv_heads=1)
    model = nn.GPT(config, rngs=nnx.Rngs(0))
    weights = model.pure_weights()
    _leaves_equal(weights, gpt.init_gpt(nnx.Rngs(0).params(), config))
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == len(jax.tree.leaves(weights))
    tokens, targets = _tokens_and_targets()
    np.testing.assert_array_equal(model(tokens), gpt.gpt(weights, tokens, config))
    assert model.loss(tokens, targets) == gpt.gpt_loss(weights, tokens, targets, config)
    key = jax.random.key(1)
    prompt = tokens[:, :3]
    sampling = dict(top_k=3, prompt_lengths=jnp.array([3, 1, 2]))
    np.testing.assert_array_equal(
        model.generate(prompt, 4, rng=key, **sampling),
        gpt.generate(weights, config, prompt, 4, rng=key, **sampling),
    )
    # Greedy decoding needs no key.
    np.testing.assert_array_equal(
        model.generate(prompt, 4, temperature=0.0),
        gpt.generate(weights, config, prompt, 4, temperature=0.0),
    )
    # Dropout (config.dropout) follows train()/eval(), with an explicit key.
    model.train()
    dropped = gpt.gpt(weights, tokens, config, rng=key, deterministic=False)
    np.testing.assert_array_equal(model(tokens, rng=key), dropped)
    assert not np.allclose(dropped, model(tokens, deterministic=True))
    with pytest.raises(ValueError, match="dropout"):
        model(tokens)  # training, but no key
    mask = jnp.ones_like(targets).at[:, :4].set(0)
    want = gpt.gpt_loss(weights, tokens, targets, config, rng=key, deterministic=False, mask=mask)
    assert model.loss(tokens, targets, rng=key, mask=mask) == want
    model.eval()
    np.testing.assert_array_equal(model(tokens), gpt.gpt(weights, tokens, config))


def test_gpt_module_generate_passes_every_sampling_option_on():
    """Each option reaches ``gpt.generate``: checked by what it must do, not by comparing
    with the pure function (an option dropped by both would pass that)."""
    model = nn.GPT(_tiny_gpt(), rngs=nnx.Rngs(0))
    prompt = _tokens_and_targets()[0][:, :3]
    greedy = np.asarray(model.generate(prompt, 6, temperature=0.0))
    # A nucleus this small keeps only the most likely token, whatever the key: greedy.
    key = jax.random.key(1)
    sampled = np.asarray(model.generate(prompt, 6, rng=key))
    assert not np.array_equal(sampled, greedy)  # (so the key alone would not give greedy)
    np.testing.assert_array_equal(model.generate(prompt, 6, rng=key, top_p=1e-6), greedy)
    np.testing.assert_array_equal(model.generate(prompt, 6, rng=key, top_k=1), greedy)
    # eos_id: each row repeats its first new eos to the end; the tokens before it are kept.
    eos = int(greedy[0, 3])
    want = ended_at_eos(greedy, [3] * len(greedy), 6, eos)
    assert not np.array_equal(want, greedy)  # (the eos must change something)
    np.testing.assert_array_equal(model.generate(prompt, 6, temperature=0.0, eos_id=eos), want)


def test_gpt_module_trains_with_an_nnx_optimizer_as_optax_on_the_pure_tree():
    config = _tiny_gpt()
    model = nn.GPT(config, rngs=nnx.Rngs(0))
    weights, tx = model.pure_weights(), optax.adamw(1e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    tokens, targets = _tokens_and_targets()

    @nnx.jit
    def module_step(model, optimizer, tokens, targets):
        loss, grads = nnx.value_and_grad(lambda m: m.loss(tokens, targets))(model)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def pure_step(weights, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(gpt.gpt_loss)(weights, tokens, targets, config)
        updates, opt_state = tx.update(grads, opt_state, weights)
        return optax.apply_updates(weights, updates), opt_state, loss

    opt_state = tx.init(weights)
    losses = []
    for _ in range(3):
        with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
            loss = module_step(model, optimizer, tokens, targets)
            weights, opt_state, want = pure_step(weights, opt_state, tokens, targets)
        np.testing.assert_allclose(loss, want, rtol=1e-6)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    _leaves_close(model.pure_weights(), weights)


def test_weight_decay_mask_reads_an_nnx_state_as_the_pure_tree():
    """nnx.Optimizer's ``tx.init`` gets ``nnx.state(model, nnx.Param)``, whose paths end in
    each Variable's ``.value``: the name rule (gpt's and transformer's) read "value" and
    decayed nothing there, and a masked Adam's state then did not fit the update's pure
    gradients (a TypeError)."""
    module, model_fns = nn.GPT(_tiny_gpt(), rngs=nnx.Rngs(0)), gpt
    want = jax.tree.leaves(model_fns.weight_decay_mask(module.pure_weights()))
    assert any(want) and not all(want)
    # (The state orders the fields by name: compared in the module's structure.)
    state_mask = model_fns.weight_decay_mask(nnx.state(module, nnx.Param))
    assert jax.tree.leaves(nnx.merge(nnx.graphdef(module), state_mask).pure_weights()) == want
    # A masked Adam as optax on the pure tree: its state is built from the mask of the
    # nnx.state, its update from that of the pure gradients.
    tx = optax.masked(optax.adam(1e-2), model_fns.weight_decay_mask)
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)
    weights, grads = module.pure_weights(), jax.tree.map(jnp.ones_like, nnx.state(module))
    pure_grads = jax.tree.map(jnp.ones_like, weights)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: float ** int32 count
        nnx.jit(lambda m, opt, g: opt.update(m, g))(module, optimizer, grads)
        updates, _ = jax.jit(tx.update)(pure_grads, tx.init(weights), weights)
    _leaves_close(module.pure_weights(), optax.apply_updates(weights, updates))


def test_gpt_from_weights_round_trips_and_checks_the_config():
    config = _tiny_gpt(tie_embeddings=False)
    weights = gpt.init_gpt(jax.random.key(0), config)
    model = nn.GPT.from_weights(weights, config, deterministic=False)
    assert model.config == config and model.deterministic is False
    _leaves_equal(model.pure_weights(), weights)
    with pytest.raises(ValueError, match=r"GPT\.from_weights: weights do not fit the config"):
        nn.GPT.from_weights(weights, _tiny_gpt(tie_embeddings=False, num_layers=3))
    with pytest.raises(ValueError, match=r"GPT\.from_weights"):
        nn.GPT.from_weights(weights, _tiny_gpt())  # tied config, untied weights
    with pytest.raises(TypeError, match="expected the pure GPTWeights tree"):
        nn.GPT.from_weights(model, config)
    with pytest.raises(TypeError, match=r"got GPTWeights of nnx\.Params"):
        nn.GPT.from_weights(model.weights, config)  # not model.pure_weights()
    with pytest.raises(TypeError, match="config must be a GPTConfig"):
        nn.GPT({"vocab_size": 11}, rngs=nnx.Rngs(0))


def _seq2seq_config(**changes) -> seq2seq.Seq2SeqConfig:
    sizes = dict(src_vocab_size=9, tgt_vocab_size=10, embed_dim=6, hidden_size=8)
    return seq2seq.Seq2SeqConfig(**(sizes | dict(attention="general", dropout=0.3) | changes))


def _transformer_config(**changes) -> transformer.TransformerConfig:
    sizes = dict(src_vocab_size=9, tgt_vocab_size=10, embed_dim=8, num_heads=2, max_len=16)
    layers = dict(num_encoder_layers=1, num_decoder_layers=2, dropout=0.1)
    return transformer.TransformerConfig(**(sizes | layers | changes))


TRANSLATORS = {  # module: (config, model's logits, loss, translate)
    nn.Seq2Seq: (_seq2seq_config, seq2seq.seq2seq_logits, seq2seq.seq2seq_loss, seq2seq.translate),
    nn.Transformer: (
        _transformer_config,
        transformer.transformer_logits,
        transformer.transformer_loss,
        transformer.translate,
    ),
}


def _translation_batch() -> dict:
    rng = np.random.default_rng(0)
    src_lengths = np.array([5, 3])
    src = np.where(np.arange(5) < src_lengths[:, None], rng.integers(3, 9, (2, 5)), 0)
    tgt = rng.integers(3, 10, (2, 4))
    tgt_in = np.concatenate([np.ones((2, 1), int), tgt[:, :-1]], axis=1)  # BOS first
    tgt_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    batch = dict(src=src, src_lengths=src_lengths, tgt_in=tgt_in, tgt_out=tgt, tgt_mask=tgt_mask)
    return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


@pytest.mark.slow  # compiles a model's loss and gradient twice: ~15-35 s
@pytest.mark.parametrize("cls", list(TRANSLATORS), ids=lambda c: c.__name__)
def test_translation_modules_compute_the_pure_functions(cls):
    """Logits, loss (label smoothing; dropout after train()), its gradient and
    translations of the module equal the model's functions on its pure weights."""
    make_config, logits_fn, loss_fn, translate_fn = TRANSLATORS[cls]
    config = make_config()
    model = cls(config, rngs=nnx.Rngs(0))
    weights, batch, key = model.pure_weights(), _translation_batch(), jax.random.key(3)
    inputs = batch["src"], batch["src_lengths"], batch["tgt_in"]

    @nnx.jit  # one compile per side: eager, the small ops dominate the test's time
    def module_side(model, batch, key):
        plain = model(*inputs), model.loss(batch, label_smoothing=0.1)
        model.train()  # the config's dropout, with an explicit key
        loss, grads = nnx.value_and_grad(lambda m: m.loss(batch, rng=key))(model)
        dropped = model(*inputs, rng=key), loss
        model.eval()
        return plain, dropped, nnx.merge(nnx.graphdef(model), grads).pure_weights()

    @jax.jit
    def pure_side(weights, batch, key):
        plain = (
            logits_fn(weights, *inputs, config),
            loss_fn(weights, batch, config, label_smoothing=0.1),
        )
        dropped_loss = lambda w: loss_fn(w, batch, config, rng=key, deterministic=False)
        loss, grads = jax.value_and_grad(dropped_loss)(weights)
        dropped = logits_fn(weights, *inputs, config, rng=key, deterministic=False), loss
        return plain, dropped, grads

    got, want = module_side(model, batch, key), pure_side(weights, batch, key)
    _leaves_close(got, want)
    plain_logits, dropped_logits = (jax.tree.leaves(side[0])[0] for side in got[:2])
    assert not np.allclose(plain_logits, dropped_logits)  # dropout was on
    np.testing.assert_array_equal(
        model.translate(batch["src"], batch["src_lengths"], beam_size=2, max_len=5),
        translate_fn(weights, config, batch["src"], batch["src_lengths"], beam_size=2, max_len=5),
    )


@pytest.mark.parametrize("cls", list(TRANSLATORS), ids=lambda c: c.__name__)
def test_translation_modules_from_weights_check_the_config(cls):
    make_config = TRANSLATORS[cls][0]
    config = make_config()
    weights = cls(config, rngs=nnx.Rngs(1)).pure_weights()
    model = cls.from_weights(weights, config, deterministic=False)
    assert model.config == config and model.deterministic is False
    _leaves_equal(model.pure_weights(), weights)
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.from_weights: the weights"):
        cls.from_weights(weights, make_config(embed_dim=12))
    with pytest.raises(TypeError, match="expected the pure"):
        cls.from_weights(model, config)
    with pytest.raises(TypeError, match=r"of nnx\.Params"):
        cls.from_weights(model.weights, config)  # not model.pure_weights()
    with pytest.raises(TypeError, match="config must be a"):
        cls.from_weights(weights, _tiny_gpt())


@pytest.mark.slow  # compiles each model's logits and loss twice: ~10-30 s
@pytest.mark.parametrize("cls", [nn.GPT, *TRANSLATORS], ids=lambda c: c.__name__)
def test_model_modules_deterministic_argument_overrides_train_and_eval(cls):
    """A call's ``deterministic=`` wins over ``train()``/``eval()`` in ``__call__`` and
    ``loss``: GPT's documented step, ``m.loss(..., deterministic=False)`` on a module in
    eval mode, must train with dropout."""
    key = jax.random.key(5)
    if cls is nn.GPT:
        config = _tiny_gpt(dropout=0.2)
        tokens, targets = _tokens_and_targets()
        args, loss_args = (tokens,), (tokens, targets)
        logits = lambda w, **kw: gpt.gpt(w, tokens, config, **kw)
        loss = lambda w, **kw: gpt.gpt_loss(w, tokens, targets, config, **kw)
    else:
        make_config, logits_fn, loss_fn, _ = TRANSLATORS[cls]
        config, batch = make_config(), _translation_batch()
        args, loss_args = (batch["src"], batch["src_lengths"], batch["tgt_in"]), (batch,)
        logits = lambda w, **kw: logits_fn(w, *args, config, **kw)
        loss = lambda w, **kw: loss_fn(w, batch, config, **kw)
    model = cls(config, rngs=nnx.Rngs(0))

    @nnx.jit
    def module_side(model):
        on = dict(rng=key, deterministic=False)  # while the module is in eval mode
        dropped = model(*args, **on), model.loss(*loss_args, **on)
        model.train()
        plain = model(*args, deterministic=True), model.loss(*loss_args, deterministic=True)
        model.eval()
        return dropped, plain

    @jax.jit
    def pure_side(weights):
        dropped = logits(weights, rng=key, deterministic=False)
        return (dropped, loss(weights, rng=key, deterministic=False)), (
            logits(weights),
            loss(weights),
        )

    got, want = module_side(model), pure_side(model.pure_weights())
    _leaves_close(got, want)
    assert not np.allclose(want[0][1], want[1][1])  # the config's dropout changes the loss


@pytest.mark.parametrize(
    "cls", [nn.GPT, *TRANSLATORS, nn.MultiHeadAttention], ids=lambda c: c.__name__
)
def test_an_orbax_checkpoint_of_a_module_restores_into_an_abstract_one(cls, tmp_path):
    """The NNX way to checkpoint: save ``nnx.state``, restore into ``nnx.eval_shape``'s."""
    import orbax.checkpoint as ocp

    if cls is nn.GPT:
        build = lambda seed: nn.GPT(_tiny_gpt(positions="rope"), rngs=nnx.Rngs(seed))
    elif cls is nn.MultiHeadAttention:
        build = lambda seed: nn.MultiHeadAttention(8, 2, use_bias=False, rngs=nnx.Rngs(seed))
    else:
        make_config = TRANSLATORS[cls][0]
        build = lambda seed: cls(make_config(), rngs=nnx.Rngs(seed))
    module = build(1)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.state(module))
    checkpointer.wait_until_finished()
    graph, abstract_state = nnx.split(nnx.eval_shape(lambda: build(0)))
    restored = nnx.merge(graph, checkpointer.restore(tmp_path / "state", abstract_state))
    want, got = module.pure_weights(), restored.pure_weights()
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_a_pure_tree_assigned_to_weights_is_named_with_the_way_to_do_it(rng):
    # As in Flax, an attribute set to arrays holds no nnx.Param; the call failed as
    # "'ArrayImpl' object has no attribute 'get_value'", naming neither module nor cause.
    module = nn.MultiHeadAttention(12, 3, rngs=nnx.Rngs(0))
    new = attention_ops.init_multi_head_attention(rng, 12, 3)
    x = jax.random.normal(jax.random.key(1), (2, 5, 12))
    nnx.update(module, nnx.state(nn.MultiHeadAttention.from_weights(new)))  # the way named
    np.testing.assert_array_equal(module(x), attention_ops.multi_head_attention(new, x))
    module.weights = new
    message = r"MultiHeadAttention.weights holds .* not an nnx.Param .*\.from_weights\(tree\)"
    with pytest.raises(TypeError, match=message):
        module(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda rngs: nn.MultiHeadAttention(12, 3, rngs=rngs),  # fails in _sizes
        lambda rngs: nn.LSTM(12, 7, rngs=rngs),  # sizes read wrong, fails in the fit check
    ],
)
def test_from_weights_of_an_ensembles_stacked_tree_says_so(make):
    # The ensemble axis was read as a size: "too many values to unpack" or an LSTM "of
    # hidden size 4", with nothing about the stack; inside nnx.vmap it builds exactly.
    @nnx.split_rngs(splits=4)
    @nnx.vmap
    def ensemble(rngs):
        return make(rngs)

    stacked = ensemble(nnx.Rngs(0)).pure_weights()
    cls = type(make(nnx.Rngs(0)))
    with pytest.raises((TypeError, ValueError), match=r"every weight has the leading size 4: "):
        cls.from_weights(stacked)
    rebuilt = nnx.vmap(cls.from_weights)(stacked)
    _leaves_equal(rebuilt.pure_weights(), stacked)


def test_modules_take_nested_list_inputs_without_a_warning():
    """The ops take nested-list activations; the modules' width check warned from jnp.shape
    first (JAX's DeprecationWarning, "shape requires ndarray or scalar arguments")."""
    q = np.linspace(-1.0, 1.0, 2 * 3 * 4).reshape(2, 3, 4)
    k = np.linspace(1.0, -1.0, 2 * 5 * 6).reshape(2, 5, 6)
    modules = [
        (nn.MultiHeadAttention(4, 2, rngs=nnx.Rngs(0)), (q,)),
        (nn.GeneralAttention(4, 6, rngs=nnx.Rngs(0)), (q, k)),
        (nn.AdditiveAttention(4, 6, 7, rngs=nnx.Rngs(0)), (q, k)),
        (nn.LSTM(4, 3, rngs=nnx.Rngs(0)), (q,)),
    ]
    for module, args in modules:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = module(*(a.tolist() for a in args))
        want = module(*(jnp.asarray(a, jnp.float32) for a in args))
        jax.tree.map(np.testing.assert_array_equal, got, want)
