"""benchmarks/gpu_check.sh: the GPU checks in one command, kept runnable between leases.

The script is run by hand on a lent GPU; here its GPT checks run at toy sizes
(``GPU_CHECK_SMOKE=1``) on the CPU, its argument handling is checked, and its pytest
selection must still find the cuDNN tests. Its ``benchmarks/gpu.py`` sections are
test_gpu_script.py's.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def run_check(out: Path, *names: str) -> subprocess.CompletedProcess:
    """``gpu_check.sh NAMES`` at toy sizes, on the CPU, with its logs in ``out``."""
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env["GPU_CHECK_SMOKE"] = "1"
    return subprocess.run(
        [BASH, str(SCRIPT), *names], env=env, capture_output=True, text=True, timeout=600
    )


def test_an_unknown_check_is_refused_before_anything_runs(tmp_path):
    proc = run_check(tmp_path / "out", "gpt_bf16", "gpt_fp8")
    assert proc.returncode == 2
    assert "unknown check 'gpt_fp8'" in proc.stderr and "gpt_bf16" in proc.stderr
    assert not (tmp_path / "out").exists()  # Nothing ran, gpt_bf16 included.


@pytest.mark.slow
def test_smoke_runs_both_gpt_checks(tmp_path):
    out = tmp_path / "out"
    proc = run_check(out, "gpt_bf16", "gpt_f32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("jax ") and "devices:" in lines[0]
    for name, steps in [("gpt_bf16", 8), ("gpt_f32", 4)]:
        assert any(re.match(rf"{name}\s+exit\s+0\s", line) for line in lines), proc.stdout
        log = (out / f"{name}.log").read_text()
        assert f"Done: step {steps}" in log, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["env.log", "gpt_bf16.log", "gpt_f32.log"]


def test_the_cudnn_selection_still_finds_the_cudnn_tests():
    """The script picks the GPU tests with ``-k cudnn``: a rename must not empty it."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/ops/test_attention.py", "tests/ops/test_lstm.py", "-k", "cudnn"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 10, proc.stdout
    # The two that only run on a GPU (they skip on CPU) are among them.
    for name in ("test_attention.py::test_cudnn_matches_xla", "test_cudnn_matches_scan_on_gpu"):
        assert any(name in line for line in collected), (name, collected)
