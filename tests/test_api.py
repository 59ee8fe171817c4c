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
