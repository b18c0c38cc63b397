"""colab/study.ipynb end to end: the smoke study (gin/studies/smoke.gin: 16 runs, `--runner inprocess`) and its
report, executed as a notebook; then the study folder it wrote: every run done, the report's cells, and each
cell's ROUGE-L against the per-task values the runs logged in metrics.jsonl (scored during training, not by the
report)."""

import csv
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERNI_DIR = os.path.abspath(os.path.join(ROOT, "..", "shared", "data", "superni"))
TASKS = ["task1155_bard_analogical_reasoning_trash_or_treasure", "task391_causal_relationship",
         "task879_schema_guided_dstc8_classification"]


def _logged_rouge(model_dir):
    """{task: rougeL} of the run's last test evaluation in its metrics.jsonl."""
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["task"]: r["rougeL"] for r in records if r.get("split") == "test" and r["task"] != "all"}


@pytest.mark.skipif(not os.path.isdir(SUPERNI_DIR), reason="needs ../shared/data/superni")
def test_study_notebook_runs_the_smoke_study(tmp_path, monkeypatch):
    study = tmp_path / "study"
    monkeypatch.setenv("ITJAX_STUDY_DIR", str(study))
    monkeypatch.setenv("ITJAX_SUPERNI_DIR", SUPERNI_DIR)
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as on a laptop
    notebook = nbformat.read(os.path.join(ROOT, "colab", "study.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    text = "\n".join(out.get("text", "") for out in outputs)
    assert "16 runs (0 stage-1)" in text and "16 of 16 runs done." in text, text[-3000:]
    assert text.count("[exit status 0]") == 3, text[-3000:]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(markdown) == 1 and "## Overall" in markdown[0] and "## Unfinished runs (not scored)\n\n(none)" in \
        markdown[0]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3

    states = [json.loads((study / "runs" / name).read_text()) for name in os.listdir(study / "runs")]
    assert len(states) == 16 and {s["state"] for s in states} == {"done"}
    with open(study / "report" / "overall.csv") as f:
        overall = list(csv.DictReader(f))
    cells = {(r["setting"], r["size"], r["encoding"]): r for r in overall}
    assert sorted(cells) == sorted((s, z, e) for s in ("mtl", "stl") for z in ("10", "all")
                                   for e in ("def_pos_2", "input_only"))
    for (setting, size, encoding), row in cells.items():
        assert row["runs"] == ("1/1" if setting == "mtl" else "3/3") and row["tasks"] == "3", row
        runs = [s for s in states if s["cell"]["setting"] == setting and s["cell"]["size"] == size
                and s["cell"]["encoding"] == encoding]
        logged = {}
        for s in runs:
            logged.update(_logged_rouge(s["model_dir"]))
        assert sorted(logged) == sorted(f"superni_{t}" for t in TASKS)
        assert float(row["rougeL"]) == pytest.approx(sum(logged.values()) / 3, abs=1e-3), (row, logged)
        assert float(row["delta_rougeL"]) == pytest.approx(
            float(row["rougeL"]) - float(cells[(setting, size, "input_only")]["rougeL"]), abs=1e-3)
    with open(study / "report" / "categories.csv") as f:
        assert len({r["category"] for r in csv.DictReader(f)}) == 3  # the 3 tasks' categories, from the task files
    with open(study / "report" / "reaching.csv") as f:
        reaching = list(csv.DictReader(f))
    assert {r["reference"] for r in reaching} == {"Tk-Instruct-3B few-shot, no fine-tuning",
                                                  "supervised SOTA (T5-3B, STL, all data)"}
    assert (study / "report" / "unfinished.csv").read_text() == ""
