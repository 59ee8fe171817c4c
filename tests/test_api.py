"""The public names later issues, notebooks and users build on import exactly as documented."""

import importlib

import pytest

# Each name the foundation issue promises from ``jaxattn.ops``.
OPS_NAMES = """
LSTMWeights init_lstm lstm_cell lstm_scan init_lstm_stack lstm_stack bidirectional_lstm
dot_scores general_scores AdditiveWeights additive_scores attend dot_product_attention
init_multi_head_attention multi_head_attention causal_mask padding_mask masked_softmax
sinusoidal_positions init_learned_positions learned_positions apply_rope
dense init_dense embed init_embedding layer_norm init_layer_norm rms_norm init_rms_norm
feed_forward init_feed_forward swiglu init_swiglu dropout cross_entropy flash_attention
""".split()


@pytest.mark.parametrize("name", OPS_NAMES)
def test_ops_exports(name):
    ops = importlib.import_module("jaxattn.ops")
    assert callable(getattr(ops, name))
    assert name in ops.__all__


def test_nn_star_import_gives_the_modules_only():
    """``from jaxattn.nn import *`` also gave jax, np, nnx and the model modules."""
    nn = importlib.import_module("jaxattn.nn")
    names = {}
    exec("from jaxattn.nn import *", names)
    names.pop("__builtins__")
    assert sorted(names) == sorted(nn.__all__)
    for name in nn.__all__:
        assert issubclass(getattr(nn, name), nn.WeightsModule), name


def test_ops_imports_nothing_else_from_jaxattn():
    """Arrows point down only: ops is the bottom layer."""
    import pathlib

    ops_dir = pathlib.Path(importlib.import_module("jaxattn.ops").__file__).parent
    for path in ops_dir.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith(("import jaxattn", "from jaxattn")):
                assert line.startswith("from jaxattn.ops"), f"{path.name}: {line}"


def test_training_imports_no_model():
    import pathlib

    training_dir = pathlib.Path(importlib.import_module("jaxattn.training").__file__).parent
    for path in training_dir.glob("*.py"):
        text = path.read_text()
        assert "jaxattn.models" not in text and "jaxattn.nn" not in text, path.name


def test_importing_jaxattn_leaves_the_backend_uninitialised():
    """jax.distributed.initialize must run before any backend use, so imports must not
    touch a device (e.g. a module-level jax.default_backend())."""
    import subprocess
    import sys

    code = (
        "import jax._src.xla_bridge as xb\n"
        "import jaxattn.ops, jaxattn.models.gpt, jaxattn.models.seq2seq\n"
        "import jaxattn.models.transformer, jaxattn.nn, jaxattn.training.loop\n"
        "import jaxattn.training.sharding, jaxattn.interop\n"
        "assert not xb.backends_are_initialized(), 'an import initialised the backend'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _switch_calls():
    """One call per public switch (a bool argument that picks code), as ``(name, call)``
    with ``call(value)`` passing ``value`` as that switch."""
    import jax
    import jax.numpy as jnp

    from jaxattn import ops
    from jaxattn.models import decoding, gpt, seq2seq, transformer

    key = jax.random.key(0)
    x = jnp.ones((1, 4, 2, 8))
    mha = ops.init_multi_head_attention(key, 8, 2)
    seq = jnp.ones((1, 4, 8))  # [B, T, D]
    lstm = ops.init_lstm(key, 3, 5)
    logits = jnp.zeros((1, 7))
    config = gpt.GPTConfig(vocab_size=7, block_size=8, num_layers=1, num_heads=2, embed_dim=8)
    weights = gpt.init_gpt(key, config)
    tokens = jnp.zeros((1, 3), jnp.int32)
    lengths = jnp.array([3])
    s2s_config = seq2seq.Seq2SeqConfig(
        src_vocab_size=7, tgt_vocab_size=7, embed_dim=4, hidden_size=5, dropout=0.1
    )
    s2s = seq2seq.init_seq2seq(key, s2s_config)
    tf_config = transformer.TransformerConfig(
        src_vocab_size=7,
        tgt_vocab_size=7,
        embed_dim=8,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dropout=0.1,
    )
    tf = transformer.init_transformer(key, tf_config)
    return [
        ("is_causal", lambda v: ops.dot_product_attention(x, x, x, is_causal=v)),
        ("is_causal", lambda v: ops.flash_attention(x, x, x, is_causal=v)),
        ("batch_heads", lambda v: ops.flash_attention(x, x, x, batch_heads=v)),
        ("is_causal", lambda v: ops.attention_weights(x, x, is_causal=v)),
        ("is_causal", lambda v: ops.multi_head_attention(mha, seq, is_causal=v)),
        ("return_weights", lambda v: ops.multi_head_attention(mha, seq, return_weights=v)),
        ("deterministic", lambda v: ops.multi_head_attention(mha, seq, deterministic=v)),
        ("use_bias", lambda v: ops.init_multi_head_attention(key, 16, 2, use_bias=v)),
        ("use_bias", lambda v: ops.init_dense(key, 3, 4, use_bias=v)),
        ("use_bias", lambda v: ops.init_layer_norm(4, use_bias=v)),
        ("approximate", lambda v: ops.gelu(x, approximate=v)),
        ("deterministic", lambda v: ops.dropout(key, x, 0.5, deterministic=v)),
        ("reverse", lambda v: ops.lstm_scan(lstm, jnp.ones((2, 3, 3)), reverse=v)),
        ("bidirectional", lambda v: ops.init_lstm_stack(key, 3, 5, bidirectional=v)),
        ("greedy", lambda v: decoding.sample_logits(key, logits, greedy=v)),
        (
            "deterministic",
            lambda v: ops.lstm_stack(
                (lstm, lstm._replace(w_ih=jnp.ones((5, 20)))),
                jnp.ones((2, 3, 3)),
                rng=key,
                dropout_rate=0.5,
                deterministic=v,
            ),
        ),
        ("deterministic", lambda v: gpt.gpt(weights, tokens, config, rng=key, deterministic=v)),
        (
            "deterministic",
            lambda v: gpt.gpt_loss(weights, tokens, tokens, config, rng=key, deterministic=v),
        ),
        (
            "deterministic",
            lambda v: seq2seq.seq2seq_logits(
                s2s, tokens, lengths, tokens, s2s_config, rng=key, deterministic=v
            ),
        ),
        (
            "deterministic",
            lambda v: transformer.transformer_logits(
                tf, tokens, lengths, tokens, tf_config, rng=key, deterministic=v
            ),
        ),
        (
            "unroll_layers",
            lambda v: gpt.generate(
                weights, config, jnp.zeros((1, 2), jnp.int32), 2, temperature=0, unroll_layers=v
            ),
        ),
    ]


def test_switches_refuse_what_is_not_a_bool():
    """A switch given "no" (a string from a config or command line) or 1 was taken as on,
    silently; each public switch now names itself. Bools and np.bool_ pass.

    The calls are traced (jax.eval_shape; the switch stays a Python value), not run: the check
    is made in Python as the call traces, and compiling the models here took most of the time."""
    import functools

    import jax
    import numpy as np

    for name, call in _switch_calls():
        for bad in ("no", 1):  # (None picks the default where a switch has one)
            with pytest.raises(ValueError, match=f"{name} must be a bool, got {bad!r}"):
                jax.eval_shape(functools.partial(call, bad))
        jax.eval_shape(functools.partial(call, False))
        jax.eval_shape(functools.partial(call, np.bool_(True)))
