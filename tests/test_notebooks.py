"""The example notebooks: each executes at its small size, and each is stored without outputs.

The notebooks read the ``CI`` environment variable (``NOTEBOOK_SIZE`` overrides it) to pick their
size; here the kernel inherits ``CI=true`` from the test's environment, so every notebook runs its
small configuration. ``MPLBACKEND=Agg`` keeps matplotlib off any display.
"""

from __future__ import annotations

from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )


def test_there_are_three_notebooks():
    """The three stories of the README are there."""
    assert len(NOTEBOOKS) >= 3, f"expected at least 3 notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path: Path):
    """A notebook is valid, uses the python3 kernel and holds no outputs or counts."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cell"
    for index, cell in enumerate(code_cells):
        assert cell.outputs == [], f"{path.name}: code cell {index} is stored with outputs"
        assert cell.execution_count is None, (
            f"{path.name}: code cell {index} is stored with an execution count"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_at_small_size(path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every cell runs under ``CI=true`` and the notebook says it ran at small size."""
    # the kernel is a subprocess started below: it inherits this environment
    monkeypatch.setenv("CI", "true")
    monkeypatch.delenv("NOTEBOOK_SIZE", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    assert "small size" in _stream_text(nb), f"{path.name} did not report running at small size"
