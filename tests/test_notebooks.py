"""Executes notebooks in colab/ on CPU (shrunk with ITJAX_NOTEBOOK_STEPS=6) and checks they ran through: each
notebook's output must contain its expected markers. Every notebook in colab/ is stored without outputs."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")

# Text each notebook's outputs must contain, when run with ITJAX_NOTEBOOK_STEPS=6.
EXPECTED = {
    "quickstart.ipynb": [
        "overall exact match:",
        "step     6  exact_match",
        "loaded step 6 of ",  # itjax.runs.load of the run's last checkpoint
        "| references:",
    ],
    "register_task.ipynb": [
        "sort_digits.train.jsonl: 300 records",
        "my_task splits: ('train', 'validation') | train records: 300",
        "=== my_task [train] example 1 ===",  # python -m itjax.data show
        "my_task [train]: 1 task(s); feature lengths {'inputs': 112, 'targets': 8}",  # ... stats
        "step    6  my_task exact_match",  # metrics.jsonl of the T5 run
        "| reference: ",  # its predictions
        "error: MIXTURE_OR_TASK_NAME='my_tsak' is not a registered seqio task or mixture. Did you mean: my_task",
        "sort_digits.train.jsonl:42. That is more than max_malformed_fraction=0.0",
    ],
}
# Whether each of the notebook's shell commands fails, in order (register_task: show, stats, T5 run, decoder-only
# run, misspelled task name, malformed record).
FAILS = {"register_task.ipynb": [False, False, False, False, True, True]}


def _outputs(notebook) -> str:
    return "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))


def test_notebooks_are_stored_without_outputs():
    names = sorted(n for n in os.listdir(COLAB) if n.endswith(".ipynb"))
    assert set(EXPECTED) <= set(names)
    for name in names:  # all of colab/, also notebooks executed by other test files
        notebook = nbformat.read(os.path.join(COLAB, name), as_version=4)
        nbformat.validate(notebook)
        stored = [i for i, cell in enumerate(notebook.cells)
                  if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
        assert not stored, f"{name}: cells {stored} have outputs; clear them before committing"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ITJAX_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as on a laptop
    notebook = nbformat.read(os.path.join(COLAB, name), as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _outputs(notebook)
    for marker in EXPECTED[name]:
        assert marker in text, f"{name}: {marker!r} not in the output:\n{text[-3000:]}"
    if name in FAILS:
        statuses = [int(line.split()[-1].rstrip("]")) for line in text.splitlines() if line.startswith("[exit status ")]
        assert [status != 0 for status in statuses] == FAILS[name], text[-3000:]
    if name == "register_task.ipynb":  # both runs evaluated at their last step: T5 and the decoder-only model
        assert text.count("Evaluation at step 6 (validation):") == 2, text[-3000:]
