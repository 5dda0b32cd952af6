"""notebooks/quickstart.ipynb runs top to bottom without errors, as a new user would run it."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="nbformat is in the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="nbclient is in the test extra: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="ipykernel is in the test extra: pip install -e '.[test]'")
pytest.importorskip("torch")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.extend(str(v) for v in output.get("data", {}).values())
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the plot as a PNG
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,  # per cell: a deadline for a hung cell, not a speed check
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # dask-scratch-space lands in tmp_path
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error

    outputs = "\n".join(_text(cell) for cell in notebook.cells if cell.cell_type == "code")
    assert "Traceback" not in outputs
    assert "3000/3000" in outputs  # the progress bar finished
    assert "matches the model run directly: True" in outputs
    assert " delivered: 3001" in outputs  # the first single request plus the 3000 mapped
    assert "/dynbatch" in outputs  # the dashboard link
    assert any("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))
