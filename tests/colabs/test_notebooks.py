"""The Colab notebooks in ``colabs/``: stored clean, and executed top to bottom.

Every ``colabs/*.ipynb`` is picked up (a new notebook needs no change here). The slow test
runs each one in a fresh ``python3`` kernel (this interpreter: jupyter_client launches the
kernelspec's ``python`` as ``sys.executable``) with ``JAXATTN_SMALL=1`` (the notebooks'
small settings), ``MPLBACKEND=Agg``, this checkout first on ``PYTHONPATH`` (set for the
whole suite in tests/conftest.py) and a temporary working directory, and fails on the first
cell that raises.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbclient  # the notebooks extra, part of the test extra
import nbformat
import pytest

REPO = Path(__file__).resolve().parents[2]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


def _ids(path: Path) -> str:
    return path.name


def test_colabs_has_notebooks():
    assert NOTEBOOKS, f"no notebooks found in {COLABS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_clean_and_framed(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name
    cells = nb.cells
    assert len(cells) >= 3, f"{path.name}: only {len(cells)} cells"
    assert cells[0].cell_type == "markdown", f"{path.name}: must open with a markdown cell"
    assert cells[-1].cell_type == "markdown", f"{path.name}: must end with a markdown cell"
    assert "where to go next" in cells[-1].source.lower(), (
        f"{path.name}: the last cell should say where to go next"
    )
    code = [cell.source for cell in cells if cell.cell_type == "code"]
    install = [src for src in code if "%pip install" in src and "jaxattn" in src]
    assert install and ("find_spec" in install[0] or "ImportError" in install[0]), (
        f"{path.name}: needs a cell that installs jaxattn only when it is not importable"
    )
    assert any("JAXATTN_SMALL" in src for src in code), (
        f"{path.name}: must read JAXATTN_SMALL to select its small settings"
    )
    for i, cell in enumerate(cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has stored outputs"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"


def _assigned_names(tree: ast.AST) -> set[str]:
    return {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_fit_cells_can_be_rerun(path: Path):
    """fit donates its state to the first train step: a cell that passes fit a state made in
    an earlier cell fails when run again ("Array has been deleted"). Build it in the cell."""
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "fit(" not in cell.source:
            continue
        # IPython magics (%pip, !cmd) are not Python: blank them before parsing.
        magic = ("%", "!")
        lines = ["" if ln.lstrip().startswith(magic) else ln for ln in cell.source.splitlines()]
        tree = ast.parse("\n".join(lines))
        assigned = _assigned_names(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "fit"
                and node.args
                and isinstance(node.args[0], ast.Name)
            ):
                name = node.args[0].id
                assert name in assigned, (
                    f"{path.name}: cell {i} passes fit the state {name!r} made in another "
                    "cell; fit donates it, so running the cell again fails"
                )


def _kernel_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this environment: small settings, no display, this checkout's
    # jaxattn, nothing written in the repo, and the notebooks' tempfile.mkdtemp() work
    # folders (checkpoints) under pytest's tmp_path, which pytest prunes, not in /tmp.
    monkeypatch.setenv("JAXATTN_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def test_kernel_imports_this_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _kernel_setup(tmp_path, monkeypatch)
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("import jaxattn\nprint(jaxattn.__file__)"),
            nbformat.v4.new_code_cell("import tempfile\nprint(tempfile.mkdtemp())"),
        ]
    )
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    imported = Path(nb.cells[0].outputs[0].text.strip()).resolve()
    assert imported == REPO / "jaxattn" / "__init__.py", (
        f"the notebooks' kernel imports {imported}, not this checkout's jaxattn"
    )
    work = Path(nb.cells[1].outputs[0].text.strip())
    assert work.parent == tmp_path, f"the notebooks' work folders go to {work.parent}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _kernel_setup(tmp_path, monkeypatch)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,  # per cell
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
