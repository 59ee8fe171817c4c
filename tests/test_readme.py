"""The README's Python examples run as written (in order, sharing one namespace)."""

import re
from pathlib import Path

import jax
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3, "the README's API tour lost its examples"
    namespace: dict = {}
    # The tour uses numpy-style promotion (e.g. int ids with float math), like a user would.
    with jax.numpy_dtype_promotion("standard"):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)


def test_ci_runs_the_readmes_test_command():
    """`.ci/run` must run the README's second quick-start command as written, so that what
    CI checks (lint, format, the suite and its flags) is what a user is told to run."""
    quick_start = re.search(r"## Quick start\n.*?```bash\n(.*?)```", README.read_text(), re.S)
    assert quick_start, "the README lost its quick start"
    commands = [line for line in quick_start.group(1).splitlines() if line.startswith("python3")]
    assert len(commands) == 2, f"the quick start should have two commands, has {commands}"
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert commands[1].startswith(venv), commands[1]
    ci_lines = (README.parent / ".ci" / "run").read_text().splitlines()
    assert commands[1].removeprefix(venv) in ci_lines
