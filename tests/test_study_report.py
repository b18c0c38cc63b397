"""`python -m itjax.report STUDY` (itjax.study_report, itjax.plots) against a fake study folder whose scores are
computed by hand below: every test instance is a hit (exact match 100, ROUGE-L 100), a miss (0, 0) or a half
('red car' for 'red bus': exact match 0, ROUGE-L 50)."""

import csv
import json
import os
import struct

import pytest

from itjax import report, study_report

A, B = "task001_alpha", "task002_beta"  # categories Textual Entailment / Title Generation
OUTCOMES = {"hit": ("red car", "red car"), "miss": ("dog", "red car"), "half": ("red car", "red bus")}

# (setting, size, seed) -> {task: outcomes of its 2 test instances}; STL cells: one run per task.
RUNS = {
    ("mtl", "10", "0"): {A: ["hit", "miss"], B: ["half", "half"]},   # A 50/50, B 0/50     -> EM 25, RL 50
    ("mtl", "10", "1"): {A: ["hit", "hit"], B: ["miss", "half"]},    # A 100/100, B 0/25   -> EM 50, RL 62.5
    ("mtl", "all", "0"): {A: ["hit", "hit"], B: ["hit", "half"]},    # A 100/100, B 50/75  -> EM 75, RL 87.5
    ("mtl", "all", "1"): {A: ["hit", "hit"], B: ["hit", "hit"]},     # 100/100             -> EM 100, RL 100
    ("stl", "10", "0"): {A: ["miss", "miss"], B: ["half", "hit"]},   # A 0/0, B 50/75      -> EM 25, RL 37.5
    ("stl", "10", "1"): {A: ["hit", "miss"], B: ["half", "miss"]},   # A 50/50, B 0/25     -> EM 25, RL 37.5
    ("stl", "all", "0"): {A: ["hit", "hit"], B: ["hit", "miss"]},    # A 100/100, B 50/50  -> EM 75, RL 75
    ("stl", "all", "1"): {A: ["hit", "half"], B: None},              # A 50/75, B failed   -> EM 50, RL 75
}
SD = 12.5 / 2 ** 0.5  # sample sd of two values 12.5 apart (e.g. RL 50 and 62.5): 8.8388
REFERENCES = [
    {"name": "R1", "value": 60.0, "where": {"setting": "mtl"}},
    {"name": "R2", "value": 80.0, "metric": "exact_match"},
    {"name": "R3", "value": 90.0, "where": {"setting": "mtl", "size": "all"}},
]


def _run_id(cell):
    return "__".join(f"{k}={v}" for k, v in cell.items())


def _write_run(study, cell, state, predictions=None, error="", run_id=None):
    run_id = run_id or _run_id(cell)
    os.makedirs(study / "runs", exist_ok=True)
    record = {"run_id": run_id, "stage": "main", "cell": cell, "state": state}
    if error:
        record["error"] = error
    (study / "runs" / f"{run_id}.json").write_text(json.dumps(record))
    for task, outcomes in (predictions or {}).items():
        folder = study / run_id / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        for step in (10, 20):  # the report reads the latest step; step 10 is all misses
            lines = [{"input": f"q{i}", "prediction": OUTCOMES[o][0] if step == 20 else "zzz",
                      "references": [OUTCOMES[o][1]]} for i, o in enumerate(outcomes)]
            (folder / f"superni_{task}-{step}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_id


@pytest.fixture
def study(tmp_path):
    """A finished fake study: 12 runs (MTL: 1 per cell, STL: 1 per task and cell), one failed, one stage-1 run."""
    superni = tmp_path / "superni"
    (superni / "tasks").mkdir(parents=True)
    for task, category in ((A, "Textual Entailment"), (B, "Title Generation")):
        (superni / "tasks" / f"{task}.json").write_text(json.dumps({"Categories": [category]}))
    path = tmp_path / "study"
    runs = [{"run_id": "pre__pft=x", "stage": "pre", "cell": {"pft": "x"}, "depends_on": None}]
    _write_run(path, {"pft": "x"}, "done", run_id="pre__pft=x")
    for (setting, size, seed), tasks in RUNS.items():
        if setting == "mtl":
            cell = {"setting": setting, "size": size, "seed": seed}
            runs.append({"run_id": _write_run(path, cell, "done", tasks), "stage": "main", "cell": cell})
            continue
        for task, outcomes in tasks.items():
            cell = {"setting": setting, "task": task, "size": size, "seed": seed}
            if outcomes is None:
                rid = _write_run(path, cell, "failed", error="Traceback ...\nRuntimeError: out of memory\n")
            else:
                rid = _write_run(path, cell, "done", {task: outcomes})
            runs.append({"run_id": rid, "stage": "main", "cell": cell})
    plan = {"name": "fake", "axes": ["setting", "size", "seed"], "runs": runs,
            "report": {"size_axis": "size", "size_values": {"10": 10}, "superni_dir": str(superni),
                       "references": REFERENCES}}
    (path / "study.json").write_text(json.dumps(plan, sort_keys=True))  # as the sweep writes it: axes keep order
    return path


def _row(rows, **cell):
    found = [r for r in rows if all(r[k] == v for k, v in cell.items())]
    assert len(found) == 1, (cell, rows)
    return found[0]


def test_overall_cells_average_tasks_then_seeds(study):
    tables = study_report.build(study_report.load(str(study)), baseline={"setting": "mtl"})
    overall = tables["overall"]
    assert [(r["setting"], r["size"]) for r in overall] == [("mtl", "10"), ("mtl", "all"), ("stl", "10"),
                                                              ("stl", "all")]
    expected = {  # (RL, RL sd, EM, EM sd, runs, delta RL, delta EM) against the MTL cell of the same size
        ("mtl", "10"): (56.25, SD, 37.5, 2 * SD, "2/2", 0.0, 0.0),
        ("mtl", "all"): (93.75, SD, 87.5, 2 * SD, "2/2", 0.0, 0.0),
        ("stl", "10"): (37.5, 0.0, 25.0, 0.0, "4/4", -18.75, -12.5),
        ("stl", "all"): (75.0, 0.0, 62.5, 2 * SD, "3/4", -18.75, -25.0),
    }
    for (setting, size), (rl, rl_sd, em, em_sd, runs, d_rl, d_em) in expected.items():
        row = _row(overall, setting=setting, size=size)
        assert row["rougeL"] == pytest.approx(rl) and row["rougeL_sd"] == pytest.approx(rl_sd, abs=1e-4)
        assert row["exact_match"] == pytest.approx(em) and row["exact_match_sd"] == pytest.approx(em_sd, abs=1e-4)
        assert row["runs"] == runs and row["seeds"] == 2 and row["tasks"] == 2
        assert row["delta_rougeL"] == pytest.approx(d_rl) and row["delta_exact_match"] == pytest.approx(d_em)


def test_categories_references_and_smallest_size(study):
    tables = study_report.build(study_report.load(str(study)))
    cats = tables["categories"]
    assert {r["category"] for r in cats} == {"Textual Entailment", "Title Generation"}
    te = _row(cats, setting="mtl", size="10", category="Textual Entailment")
    assert (te["rougeL"], te["exact_match"], te["tasks"]) == (75.0, 75.0, 1)  # A: 50 and 100 over the seeds
    tg = _row(cats, setting="stl", size="all", category="Title Generation")
    assert (tg["rougeL"], tg["seeds"]) == (50.0, 1)  # B's seed-1 run failed: only seed 0
    refs = tables["references"]
    assert {(r["reference"], r["setting"], r["size"]) for r in refs} == {
        ("R1", "mtl", "10"), ("R1", "mtl", "all"), ("R3", "mtl", "all"),
        *(("R2", s, z) for s in ("mtl", "stl") for z in ("10", "all"))}
    assert _row(refs, reference="R1", size="10")["delta"] == pytest.approx(56.25 - 60)
    assert _row(refs, reference="R3")["delta"] == pytest.approx(93.75 - 90)
    assert _row(refs, reference="R2", setting="stl", size="all")["delta"] == pytest.approx(62.5 - 80)
    reach = tables["reaching"]
    assert _row(reach, reference="R1")["smallest_size"] == "all"  # 56.25 at 10, 93.75 at all
    assert _row(reach, reference="R2", setting="mtl")["smallest_size"] == "all"  # EM 37.5, 87.5
    stl = _row(reach, reference="R2", setting="stl")
    assert (stl["smallest_size"], stl["best"], stl["best_size"]) == ("not reached", 62.5, "all")
    assert _row(reach, reference="R3")["smallest_size"] == "all"
    easy = study_report.reaching_rows(study_report.load(str(study)), tables["overall"],
                                      [{"name": "low", "metric": "rougeL", "value": 37.5, "where": {}}])
    assert [r["smallest_size"] for r in easy] == ["10", "10"]  # >= counts as reaching


def test_failed_and_unstarted_runs_are_listed(study):
    failed = "setting=stl__task=task002_beta__size=all__seed=1"
    unstarted = "setting=mtl__size=all__seed=1"
    os.remove(study / "runs" / f"{unstarted}.json")  # a run with predictions but no state: not scored
    empty = "setting=stl__task=task001_alpha__size=10__seed=0"
    for name in os.listdir(study / empty / "predictions"):  # done, but its predictions files are empty
        (study / empty / "predictions" / name).write_text("")
    tables = study_report.build(study_report.load(str(study)))
    assert {(r["run_id"], r["state"]) for r in tables["unfinished"]} == {
        (failed, "failed"), (unstarted, "planned"), (empty, "done")}
    assert _row(tables["unfinished"], state="failed")["error"] == "RuntimeError: out of memory"
    assert _row(tables["unfinished"], state="done")["error"] == "no predictions: No predictions to score."
    row = _row(tables["overall"], setting="mtl", size="all")
    assert (row["runs"], row["seeds"], row["rougeL"]) == ("1/2", 1, 87.5)
    row = _row(tables["overall"], setting="stl", size="10")  # seed 0: task B only (B 75), seed 1: 37.5
    assert (row["runs"], row["rougeL"]) == ("3/4", (75 + 37.5) / 2)


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_cli_writes_markdown_csv_and_plots(study, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(study), "--out_dir", str(out), "--baseline", "setting=mtl"]) == 0
    printed = capsys.readouterr().out
    assert "| mtl | 10 | 2/2 | 2 | 2 | 56.25 | 8.84 | 37.50 | 17.68 |" in printed
    assert "| stl | all | 3/4 | 2 | 2 | 75.00 | 0.00 | 62.50 | 17.68 | -18.75 | -25.00 |" in printed
    assert "setting=stl__task=task002_beta__size=all__seed=1 | main | failed | RuntimeError: out of memory" in printed
    with open(out / "overall.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["rougeL"]) for r in rows] == [56.25, 93.75, 37.5, 75.0]
    assert float(rows[0]["rougeL_sd"]) == pytest.approx(SD, abs=1e-4)
    with open(out / "reaching.csv") as f:
        assert {(r["reference"], r["setting"], r["smallest_size"]) for r in csv.DictReader(f)} == {
            ("R1", "mtl", "all"), ("R2", "mtl", "all"), ("R2", "stl", "not reached"), ("R3", "mtl", "all")}
    for name in ("score_vs_size_rougeL", "score_vs_size_exact_match", "categories_rougeL", "categories_exact_match"):
        path = out / f"{name}.png"
        assert _png_size(path) == (900, 500) and os.path.getsize(path) > 10_000, name
        assert f"![{name}.png]({name}.png)" in (out / "report.md").read_text()
    # the predictions form is unchanged; neither form, both, or a bad baseline is one clear error
    assert report.main(["--predictions", str(study / "setting=mtl__size=10__seed=0" / "predictions")]) == 0
    assert "| 2 | 4 | 25.0000 | 50.0000 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main([])
    assert report.main([str(study), "--baseline", "setting=xyz"]) == 2
    assert "--baseline 'setting=xyz': axis 'setting' has no value 'xyz' (values: mtl, stl)" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nope")]) == 2 and "no such study folder" in capsys.readouterr().err


def test_bad_references_name_the_reference(study):
    data = study_report.load(str(study))
    with pytest.raises(study_report.StudyReportError, match=r"--references references\[3\] \(X\): 'where' names "
                       r"\['start'\]"):
        study_report.build(data, extra_references=[{"name": "X", "value": 1, "where": {"start": "t5"}}])
    with pytest.raises(study_report.StudyReportError, match="metric 'bleu'"):
        study_report.build(data, extra_references=[{"name": "Y", "value": 1, "metric": "bleu"}])
