"""train/configs: the Shakespeare runs keep nanoGPT's settings (issue 3)."""

import ast
import sys

import pytest
from script_runs import REPO  # tests/train/script_runs.py

from jaxattn.training import data
from jaxattn.training.optim import optimizer_from_config

sys.path.insert(0, str(REPO / "train"))
from configs import shakespeare_char, shakespeare_char_cpu  # as the scripts import them

# Both runs: nanoGPT's AdamW (betas 0.9/0.99, decay 0.1, clip 1.0), 100 warmup steps, a
# cosine to learning_rate / 10, 90/10 split, no biases, exact GELU, tied embeddings.
_SHARED = dict(
    data_path="", train_fraction=0.9, grad_accum_steps=1, learning_rate=1e-3, min_lr=1e-4,
    warmup_steps=100, b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0,
)  # fmt: skip
_SHARED_MODEL = dict(
    mlp_ratio=4, use_bias=False, gelu_approximate=False, positions="learned", tie_embeddings=True
)


@pytest.mark.parametrize(
    ("module", "settings", "model"),
    [
        (
            shakespeare_char_cpu,
            dict(batch_size=12, num_steps=2000, lr_decay_steps=2000),
            dict(num_layers=4, num_heads=4, embed_dim=128, block_size=64, dropout=0.0),
        ),
        (
            shakespeare_char,
            dict(batch_size=64, num_steps=5000, lr_decay_steps=5000),
            dict(num_layers=6, num_heads=6, embed_dim=384, block_size=256, dropout=0.2),
        ),
    ],
)
def test_shakespeare_configs_hold_nanogpts_settings(module, settings, model):
    config = module.get_config()
    assert config.to_dict().items() >= (_SHARED | settings).items()
    assert config.model.to_dict().items() >= (_SHARED_MODEL | model).items()
    # Warmup to the peak at step 100, cosine down to min_lr at lr_decay_steps, then flat.
    _, schedule = optimizer_from_config(config)
    end = settings["lr_decay_steps"]
    assert float(schedule(0)) == pytest.approx(1e-3 / 101)  # get_lr: lr * (it + 1) / 101
    assert float(schedule(100)) == pytest.approx(1e-3)
    assert float(schedule((100 + end) // 2)) == pytest.approx(5.5e-4, rel=1e-3)
    assert float(schedule(end)) == pytest.approx(1e-4) == float(schedule(end + 500))


def test_bundled_text_has_nanogpts_65_characters():
    text = data.load_text("")
    assert data.CharTokenizer.from_text(text).vocab_size == 65


# The files (and functions) that define the config fields; the others override them.
_DEFINITIONS = {
    "shakespeare_char.py": "get_config", "shakespeare_char_cpu.py": "get_config",
    "tiny.py": "get_config", "translate_base.py": "base_config", "mesh.py": "mesh_config",
}  # fmt: skip


@pytest.mark.parametrize(("name", "function"), _DEFINITIONS.items())
def test_every_config_field_has_a_comment(name, function):
    """Each field's assignment carries a comment, on its line or the line above."""
    source = (REPO / "train" / "configs" / name).read_text()
    lines = source.splitlines()
    (body,) = [
        node for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == function
    ]  # fmt: skip
    fields = [
        node for node in ast.walk(body)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
    ]  # fmt: skip
    assert fields
    bare = [
        lines[node.lineno - 1].strip() for node in fields
        if "#" not in lines[node.lineno - 1] and not lines[node.lineno - 2].strip().startswith("#")
    ]  # fmt: skip
    assert not bare, f"{name}: fields without a comment: {bare}"
