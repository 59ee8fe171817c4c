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
