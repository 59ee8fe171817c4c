"""benchmarks/scaling.py: every mesh fits the device count it is run on."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import scaling  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_each_mesh_uses_exactly_n_devices(n):
    """An odd count used to get a (n // 2, 1, 2) tensor mesh of n - 1 devices, which
    make_mesh refuses (so ``--devices 3`` failed after timing the other meshes)."""
    shapes = scaling.meshes(n)
    assert shapes[0] == (n, 1, 1)
    assert all(math.prod(shape) == n for shape in shapes), shapes
    assert ((n // 2, 1, 2) in shapes) == (n % 2 == 0)


@pytest.mark.slow
def test_real_devices_time_a_mesh_smaller_than_the_host():
    """``--real`` runs on the host's devices as they are: a 1-device mesh on a 2-device
    host must take one of them (it raised 'the product must equal the device count')."""
    env = dict(os.environ)
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    script = str(REPO / "benchmarks" / "scaling.py")
    proc = subprocess.run(  # the worker that main() starts for the mesh (1, 1, 1)
        [sys.executable, script, "--steps", "1", "--worker", "1", "1", "1"],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 1 and result["rows"] == 12
    # What the table's header names: the CPU model and the versions of this run.
    import flax
    import jax

    assert result["machine"].endswith(", cpu") and "cores" in result["machine"]
    assert result["versions"] == f"jax {jax.__version__}, flax {flax.__version__}"


def _fake_worker(monkeypatch, step_s: dict) -> None:
    """main()'s workers, replaced by results with the given step seconds per mesh."""

    def run(cmd, **kwargs):
        mesh = tuple(int(x) for x in cmd[-3:])
        n = math.prod(mesh)
        rows = 12 * mesh[0] * mesh[1]
        result = {"machine": "Test CPU, 2 cores, cpu", "versions": "jax 0.1, flax 0.2",
                  "devices": n, "platform": "cpu", "device_kind": "cpu", "mesh": list(mesh),
                  "rows": rows, "step_s": step_s[mesh], "compile_s": 1.0,
                  "tokens": rows * 64, "flops_per_token": 1e6}  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, json.dumps(result) + "\n", "")

    monkeypatch.setattr(scaling.subprocess, "run", run)


def _table(capsys) -> dict[str, list[str]]:
    out = capsys.readouterr().out
    lines = out[out.index("| devices |") :].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {"header": header} | {row[1]: row for row in rows}


def test_tokens_per_second_ratio_is_to_the_one_device_run_or_names_its_base(monkeypatch, capsys):
    """The ratio column said "vs 1 device" whatever ran first: with --devices 2 the 2-device
    data-parallel mesh was "1.00 vs 1 device", and with --devices 2 1 every ratio was to it."""
    step_s = {(1, 1, 1): 0.05, (2, 1, 1): 0.08, (1, 2, 1): 0.16, (1, 1, 2): 0.10}
    _fake_worker(monkeypatch, step_s)
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--devices", "2", "1"])
    scaling.main()
    table = _table(capsys)
    assert table["header"][5] == "tokens/s vs 1 device"
    # 1 device: 768 tokens in 50 ms; (2, 1, 1): 1,536 tokens in 80 ms, 1.25x that.
    assert table["(1, 1, 1)"][5] == "1.00" and table["(2, 1, 1)"][5] == "1.25"
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--devices", "2"])
    scaling.main()
    table = _table(capsys)
    assert table["header"][5] == "tokens/s vs mesh (2, 1, 1)"
    assert table["(2, 1, 1)"][5] == "1.00" and table["(1, 2, 1)"][5] == "0.50"


def test_the_header_names_the_machine_and_versions(monkeypatch, capsys):
    """Every table names the machine and the versions it ran with; this one named only the
    platform ("cpu (cpu)") and the core count, not the CPU model or jax's version."""
    _fake_worker(monkeypatch, {(1, 1, 1): 0.05})
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--devices", "1"])
    scaling.main()
    header = next(line for line in capsys.readouterr().out.splitlines() if "weak scaling" in line)
    assert "Test CPU, 2 cores, cpu (cpu); jax 0.1, flax 0.2;" in header, header
