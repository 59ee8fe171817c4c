"""benchmarks/gpu.py runs end to end (``--smoke``, on whatever backend the tests run on).

The script is made for a GPU, where it is run by hand; this keeps its CPU code paths (the
correctness table, the timing rows, the blockwise settings, the long-sequence step and the
LSTM rows) from rotting between those runs.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[2]
# With torch installed the script must time it: a PyTorch row left out (a broken import, a
# renamed row) would otherwise pass as "torch absent".
HAVE_TORCH = importlib.util.find_spec("torch") is not None


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())

    # Correctness: every case ran every kernel available here, within tolerance.
    checks = results["checks"]
    assert set(checks) == {
        "causal T=S=1024", "causal T=S=1000, padding", "causal GQA N=8 K=2, padding",
        "causal T=256 < S=1024", "bias, not causal, 512", "causal H=128, 2048",
    }  # fmt: skip
    for case, rows in checks.items():
        want = {"bfloat16 auto", "bfloat16 blockwise", "bfloat16 xla", "float32 blockwise"}
        assert want | {"bfloat16 blockwise dropout"} <= set(rows), case
        for row, result in rows.items():
            assert result.get("ok") is True, (case, row, result)
            assert len(result["errors"]) == 4  # out, dq, dk, dv

    # Timing rows: positive times for each length, no row failed.
    attention = results["attention"]
    assert set(attention) == {"128", "256"}
    for t, rows in attention.items():
        want = {"jaxattn auto", "jaxattn blockwise", "jaxattn xla", "jax.nn xla"}
        assert want | ({"torch SDPA"} if HAVE_TORCH else set()) <= set(rows), t
        for name, row in rows.items():
            assert "note" not in row, (t, name, row)
            assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0, (t, name)
        assert rows["jaxattn auto"]["picked"] == "xla"  # CPU, T < _CPU_BLOCKWISE_MIN_LEN
        if HAVE_TORCH and jax.default_backend() == "cpu":
            assert rows["torch SDPA"]["mib"] is None  # unknown on the CPU, not 0
    # The table: no TFLOP/s rounded to 0 (a CPU's are fractions), no made-up 0 MiB.
    table = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| 128 |")]
    assert table and all(float(cells[6]) > 0 for cells in table), table
    if HAVE_TORCH and jax.default_backend() == "cpu":
        assert [cells[8].strip() for cells in table if "torch" in cells[3]] == ["-"]

    # The blockwise kernel's settings and the two kernels that take dropout, each timed.
    blocks = results["blocks"]
    assert set(blocks) == {
        "batch_heads, 64 x 64", "batch_heads, 128 x 128", "one pair at a time, 256 x 256",
        "blockwise, dropout 0.1", "xla, dropout 0.1",
    }  # fmt: skip
    for name, row in blocks.items():
        assert "note" not in row, (name, row)
        assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0, name
    assert blocks["xla, dropout 0.1"]["shape"] == [4, 64, 4, 32]  # --smoke's dropout shape

    assert results["long"]["blockwise"]["finite"] is True
    lstm = results["lstm"]["8x20x32x64"]  # --smoke's one shape
    assert "jaxattn scan" in lstm and "flax nn.RNN" in lstm
    assert ("torch nn.LSTM (cpu)" in lstm) == HAVE_TORCH, set(lstm)
    assert all(row["fwd_bwd_s"] > 0 for row in lstm.values())


def test_no_torch_rows_on_a_gpu_with_a_cpu_only_torch(monkeypatch):
    """On a GPU the PyTorch rows must run on CUDA too: a CPU-only torch would time float32
    on the CPU against bfloat16 on the GPU (and take hours at T = 16384)."""
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "ON_GPU", True)
    assert gpu._torch() == (None, None)
    monkeypatch.setattr(gpu, "ON_GPU", False)
    assert gpu._torch() == (torch, "cpu")


def test_lstm_shapes_are_parsed_and_checked(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import gpu

    assert gpu._lstm_shape("8x1000x256x512") == (8, 1000, 256, 512)
    for bad in ("8x1000x256", "8x1000x256x0", "8x1000xIx512", "8 1000 256 512"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected B x T x I x h"):
            gpu._lstm_shape(bad)


@pytest.mark.slow  # the Pallas kernel's backward, interpreted, takes a few seconds a case
def test_tpu_rows_check_the_pallas_kernel_in_interpret_mode(monkeypatch, capsys):
    """On a TPU the checks hold the Pallas kernel to the float32 reference where its limits
    allow (not at T = 1000), ``implementation=None`` picks it there, the long sequence runs
    it, and no PyTorch rows are made. Here the TPU is Pallas' interpreter on CPU."""
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    if not hasattr(pltpu, "force_tpu_interpret_mode"):
        pytest.skip("this jax has no Pallas TPU interpret mode")
    import jax

    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import gpu

    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(gpu, "ON_TPU", True)
    names = ("causal GQA N=8 K=2, padding", "causal T=S=1000, padding")
    monkeypatch.setattr(gpu, "CASES", {name: gpu.CASES[name] for name in names})
    assert gpu._torch() == (None, None)
    with pltpu.force_tpu_interpret_mode():
        checks = gpu.run_checks(shrink=8)  # T = S = 128 and 124
        long = gpu.run_long(128)
    table = capsys.readouterr().out
    fits, odd = (checks[name] for name in names)
    assert "bfloat16 pallas" in fits and "bfloat16 pallas" not in odd
    for rows in (fits, odd):
        assert all(row.get("ok") is True for row in rows.values()), rows
    assert f"| {names[0]} | bfloat16 | auto (pallas) |" in table
    assert f"| {names[1]} | bfloat16 | auto (pallas) |" not in table
    assert long["pallas"]["finite"] is True and long["pallas"]["dtype"] == "bfloat16"


def test_a_failed_section_or_check_exits_non_zero(monkeypatch, tmp_path, capsys):
    """A section that raised, or a check over its tolerance, left the exit status 0, so
    gpu_check.sh's summary line read "exit 0" for it; the other sections must still run."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import gpu

    def run_long(t):
        raise MemoryError("RESOURCE_EXHAUSTED: out of memory")

    failing = {"errors": [0.5] * 4, "ok": False}
    checks = {"causal T=S=1024": {"bfloat16 xla": failing, "bfloat16 blockwise": {"ok": True}}}
    monkeypatch.setattr(gpu, "run_long", run_long)
    monkeypatch.setattr(gpu, "run_checks", lambda shrink: checks)
    monkeypatch.setattr(gpu, "run_blocks", lambda *a: {"batch_heads, 64 x 64": {"fwd_s": 1.0}})
    out = tmp_path / "gpu.json"
    argv = ["gpu.py", "--sections", "checks", "long", "blocks", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        gpu.main()
    message = str(exit_.value.code)
    assert "section long raised" in message, message
    assert "1 check(s) failed (causal T=S=1024: bfloat16 xla)" in message, message
    results = json.loads(out.read_text())
    assert "MemoryError" in results["long"]["error"]
    assert results["blocks"] == {"batch_heads, 64 x 64": {"fwd_s": 1.0}}  # ran after it
    # All passing: no exit.
    checks["causal T=S=1024"]["bfloat16 xla"] = {"ok": True}
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--sections", "checks", "blocks"])
    gpu.main()


def test_smoke_shrinks_every_check_case_to_even_lengths(monkeypatch):
    """cuDNN's backward refuses odd T or S with a bias (jax raises NotImplementedError), and
    every masked case reaches cuDNN as one: at T = S = 1000 / 8 = 125 the explicit
    ``cudnn`` row failed ``--smoke`` on a GPU (``implementation=None`` avoided cuDNN)."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks import gpu

    for name, case in gpu.CASES.items():
        t, s = gpu._shrink(case, 8)[1:3]
        assert t % 2 == 0 and s % 2 == 0 and t >= 2, (name, t, s)
    assert gpu._shrink(gpu.CASES["causal T=S=1000, padding"], 8)[1:3] == (124, 124)
    assert gpu._shrink(gpu.CASES["causal T=S=1024"], 1) == gpu.CASES["causal T=S=1024"]
