"""jaxattn.interop sits beside models: it imports only ops/models, and torch lazily."""

import pathlib
import subprocess
import sys

import jaxattn.interop

INTEROP_DIR = pathlib.Path(jaxattn.interop.__file__).parent


def test_imports_only_ops_and_models():
    for path in INTEROP_DIR.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.strip().startswith(("import jaxattn", "from jaxattn")):
                allowed = ("from jaxattn.ops", "from jaxattn.models", "from jaxattn.interop")
                assert line.strip().startswith(allowed), f"{path.name}: {line}"


def test_importing_interop_needs_no_torch():
    code = (
        "import sys, jaxattn, jaxattn.interop; "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
