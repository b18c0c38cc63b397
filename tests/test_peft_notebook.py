"""Executes colab/lora_llama.ipynb on CPU (shrunk with ITJAX_NOTEBOOK_STEPS), as tests/test_notebooks.py does."""

import os
import re

import nbformat
from nbclient import NotebookClient

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")


def test_lora_llama_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("ITJAX_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as on a laptop
    notebook = nbformat.read(os.path.join(COLAB, "lora_llama.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []))
    assert "LoRA exact match on quickstart_reverse_words:" in text
    # The adapter checkpoint: the train state and the base pointer (plus the input-pipeline items).
    assert re.search(r"checkpoint items: \[.*'base'.*'state'.*\]", text), text[-3000:]
    assert "model.gin} from the run" in text  # the base run exported with itjax.convert --from_run
    assert "  base: " in text and "  LoRA: " in text
    assert "adapter_model.safetensors" in text and "'peft_type': 'LORA'" in text
