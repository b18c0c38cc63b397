"""Executes the notebooks in colab/ on CPU (shrunk with ITJAX_NOTEBOOK_STEPS) and checks they ran through."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")


@pytest.mark.parametrize("name", ["quickstart.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ITJAX_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as on a laptop
    notebook = nbformat.read(os.path.join(COLAB, name), as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    assert "overall exact match:" in text
    assert "step     6  exact_match" in text
    assert "| references:" in text
