"""Every benchmark script times the jaxattn beside it, not an installed one.

``python benchmarks/X.py`` puts ``benchmarks/`` first on ``sys.path``, not the checkout, so
a script that does not add the checkout itself imports whichever jaxattn is installed (a
release, another checkout's editable install) and times that. Here a decoy jaxattn on
``PYTHONPATH`` stands for the installed one, and the test's own ``PYTHONPATH`` (this
checkout, from conftest.py) is left out, as a user's shell has none.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The script's module body (its imports and sys.path set-up, not main), then which jaxattn
# an import finds: scaling.py imports jaxattn in its worker, after the body has run.
PROBE = (
    "import os, runpy, sys; script = sys.argv[1]; sys.argv = [script]; "
    "sys.path[0] = os.path.dirname(script); runpy.run_path(script); "
    "import jaxattn; print(jaxattn.__file__)"
)


@pytest.mark.parametrize(
    "script", ["attention.py", "gpt.py", "gpu.py", "lstm.py", "scaling.py", "whole_run.py"]
)
def test_script_imports_this_checkouts_jaxattn(tmp_path, script):
    decoy = tmp_path / "installed" / "jaxattn"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the installed jaxattn')\n")
    env = dict(os.environ, PYTHONPATH=str(decoy.parent), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "benchmarks" / script)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == REPO / "jaxattn" / "__init__.py"
