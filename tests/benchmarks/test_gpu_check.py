"""benchmarks/gpu_check.sh: the GPU checks in one command, kept runnable between leases.

The script is run by hand on a lent GPU; here its GPT checks run at toy sizes
(``GPU_CHECK_SMOKE=1``) on the CPU, its argument handling is checked, and its pytest
selection must still find the cuDNN tests. Its ``benchmarks/gpu.py`` sections are
test_gpu_script.py's.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
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


@pytest.mark.parametrize(
    "names, bad",
    [(("gpt_bf16", "gpt_fp8"), "gpt_fp8"), (("gpt_bf16 blocks",), "gpt_bf16 blocks")],
)
def test_an_unknown_check_is_refused_before_anything_runs(tmp_path, names, bad):
    # One argument with two names in it (a quoted "$CHECKS") is no check either: it would
    # pass a substring test and then run nothing.
    proc = run_check(tmp_path / "out", *names)
    assert proc.returncode == 2
    assert f"unknown check '{bad}'" in proc.stderr and "gpt_bf16" in proc.stderr
    assert not (tmp_path / "out").exists()  # Nothing ran, gpt_bf16 included.


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_running_check_too(tmp_path, sig):
    """Ctrl-C (SIGINT to the script's process group) or a TERM stops the script and the
    check it is running: ``timeout`` puts the check in a process group of its own, which
    neither signal reaches, so without the script's trap the check ran on to its limit
    (Ctrl-C: and then the next one started)."""
    pid_file = tmp_path / "check.pid"
    fake = tmp_path / "python"  # the env line returns; a check records its pid and sleeps
    fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exit 0\necho $$ > "{pid_file}"\nexec sleep 300\n')
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake))
    # A terminal's shell starts the script with SIGINT at its default; a test runner may run
    # with it ignored (a background job), and bash cannot trap a signal ignored on entry.
    # So a Python restores the default and execs the script (the same pid; no preexec_fn,
    # whose fork in a process running JAX's threads risks a deadlock).
    sigint_default = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    command = [sys.executable, "-c", sigint_default, BASH, str(SCRIPT), "blocks", "lstm"]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    pid = None
    try:
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text().strip():
                pid = int(pid_file.read_text())
                break
            time.sleep(0.05)
        assert pid is not None, "the check did not start"
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does (the TERM too, to the group)
        proc.wait(timeout=30)
        assert proc.returncode == 128 + sig
        assert "lstm" not in proc.stdout.read()  # the next check did not start
        for _ in range(100):  # ... and the running one is gone
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the check's process outlived the script")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
        assert '"step_time_ms"' in log, log[-3000:]  # the loop's metrics.jsonl, appended
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


def test_a_failed_check_makes_the_script_fail_after_the_rest_ran(tmp_path):
    """Every check exiting 3 left the script's own status 0: only the per-check lines
    showed the failures."""
    fake = tmp_path / "python"  # the env line succeeds; every check fails
    fake.write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\nexit 3\n')
    fake.chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=str(fake))
    proc = subprocess.run([BASH, str(SCRIPT), "blocks", "lstm"], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"blocks\s+exit\s+3", proc.stdout) and re.search(
        r"lstm\s+exit\s+3", proc.stdout
    )
    assert "gpu_check.sh: failed: blocks lstm" in proc.stderr
