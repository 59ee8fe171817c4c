"""benchmarks/gpt.py: the generation section's floor row runs on any GPT's weights."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import gpt as gpt_bench  # noqa: E402
from jaxattn.models import gpt  # noqa: E402


@pytest.mark.parametrize("tie, kv_heads", [(True, None), (False, 2)])
def test_weight_products_runs_on_tied_untied_and_grouped_query_models(tie, kv_heads):
    config = gpt.GPTConfig(
        vocab_size=13, block_size=8, num_layers=2, num_heads=4, embed_dim=16,
        num_kv_heads=kv_heads, tie_embeddings=tie,
    )  # fmt: skip
    weights = gpt.init_gpt(jax.random.key(0), config)
    out = gpt_bench.weight_products(weights, config, 3)()
    assert out.shape == (1, 16) and np.isfinite(np.asarray(out)).all()


def test_unknown_section_is_an_error_naming_it(monkeypatch, capsys):
    """A misspelt --sections name ran nothing, exited 0 and wrote an empty --json (a name
    that runs nothing either way, so that a regression times no benchmark)."""
    monkeypatch.setattr(sys, "argv", ["gpt.py", "--sections", "generat"])
    with pytest.raises(SystemExit) as exit_info:
        gpt_bench.main()
    assert exit_info.value.code == 2
    assert "unknown --sections generat" in capsys.readouterr().err


def test_train_table_without_pytorch_has_no_ratio_to_it(monkeypatch, capsys):
    """Without PyTorch the train section has jaxattn's row alone; its "vs PyTorch" cell
    said 1.00x (jaxattn over itself)."""
    monkeypatch.setattr(gpt_bench, "bench_train_step", lambda run, repeats: [("jaxattn", 0.05)])
    monkeypatch.setattr(sys, "argv", ["gpt.py", "--sections", "train"])
    gpt_bench.main()
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("| jaxattn"))
    assert row.endswith("| - |"), row


def test_train_table_ratio_is_to_pytorch(monkeypatch, capsys):
    rows = [("jaxattn", 0.06), ("PyTorch", 0.05)]
    monkeypatch.setattr(gpt_bench, "bench_train_step", lambda run, repeats: rows)
    monkeypatch.setattr(sys, "argv", ["gpt.py", "--sections", "train"])
    gpt_bench.main()
    out = capsys.readouterr().out.splitlines()
    assert next(line for line in out if line.startswith("| jaxattn")).endswith("| 1.20x |")
    assert next(line for line in out if line.startswith("| PyTorch")).endswith("| 1.00x |")
