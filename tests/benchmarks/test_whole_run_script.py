"""benchmarks/whole_run.py: its table, with the jobs' processes replaced by fakes."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import whole_run  # noqa: E402


def test_the_header_names_the_machine_and_versions(monkeypatch, capsys):
    """Every table names the machine and the versions it ran with; this one named the
    machine and torch's version (in its row) but not jax's or flax's."""
    import flax
    import jax

    out = "Done: step 5, val loss 2.5000\nval loss 2.5000, train steps 3.00 s\n"
    monkeypatch.setattr(whole_run, "run", lambda cmd: (10.0, out))
    monkeypatch.setattr(whole_run, "step_seconds", lambda path: 3.0)
    monkeypatch.setattr(sys, "argv", ["whole_run.py", "--steps", "5"])
    whole_run.main()
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("# Whole Shakespeare run — "), header
    assert f"jax {jax.__version__}, flax {flax.__version__}" in header, header
