"""The tables of a study folder written by `python -m itjax.sweep`, scored from the runs' predictions files.

    python -m itjax.report STUDY [--out_dir DIR] [--baseline encoding=input_only] [--references refs.json]
                                 [--superni_dir natural-instructions/] [--step N]

Input: STUDY/study.json (the plan: the axes, every run's id, stage and cell, and the study's `study.report` options),
STUDY/runs/<run id>.json (each run's state) and STUDY/<run id>/predictions/<task>-<step>.jsonl (each task at the
latest step, or --step). Only the main (not pre-finetuning) runs are scored; every run that is not done, or is done
without predictions, is listed in the "Unfinished runs" table (and counted in each cell's `runs` column), never
silently dropped.

Cells and scores (numbers 0-100, as itjax.report scores them: official normalisation, ROUGE-L F / exact match,
max over references):

* A cell is a run's cell without its `task` (STL runs of one cell: one per task) and without its seed axis
  (`seed`, or study.report['seed_axis']). Per task: the mean over its test instances (rounded to 4 decimals, as
  itjax.report's per-task table). Per cell and seed: the mean of the per-task values over the cell's tasks (STL:
  the task of each of its per-task runs; MTL: every task of the one run) -- SuperNI's per-task ROUGE-L averaged
  over tasks, equal to the official instance mean when every task has the same number of test instances. Per
  category: the same over the category's tasks. Across seeds: mean and sample standard deviation (`_sd`, 0 for
  one seed).
* --baseline axis=value[,axis=value]: `delta_<metric>` = the row's value minus that of the row with those axis
  values and the row's own values on the other axes (blank when that row has no score).
* References: {'name', 'value', 'metric' (default 'rougeL'), 'where': {axis: value}} from study.report['references']
  (and --references FILE, a JSON list of the same). A reference is compared with every cell whose axes match its
  `where` (no `where`: every cell): "Against reference numbers" gives the cell's value and the delta; "Train size
  reaching each reference" gives, per cell without its size axis, the smallest train size (size axis order of the
  study) whose value is >= the reference, or "not reached".

Output in --out_dir (default STUDY/report): report.md (also printed), overall.csv, categories.csv, references.csv,
reaching.csv, unfinished.csv and the PNG plots of itjax.plots.
"""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from itjax import report as report_lib

METRICS = ("rougeL", "exact_match")


class StudyReportError(ValueError):
    """A study folder or report option that cannot be reported on; the message names the file or flag."""


@dataclass
class StudyData:
    """What the report reads from a study folder.

    axes: cell axes in grid order (without 'task' and the seed axis).
    runs: the plan's main runs ({run_id, cell, ...}); states: run_id -> state record (None: no state file).
    scores: (cell key, seed) -> {task: {'rougeL', 'exact_match', 'category'}} of the runs with predictions.
    expected: cell key -> run ids planned for it; scored: cell key -> run ids with predictions.
    unfinished: rows of runs without a score (any stage).
    """

    name: str
    options: dict
    axes: list
    seed_axis: str
    size_axis: Optional[str]
    runs: list
    scores: dict = field(default_factory=dict)
    expected: dict = field(default_factory=lambda: defaultdict(list))
    scored: dict = field(default_factory=lambda: defaultdict(list))
    unfinished: list = field(default_factory=list)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise StudyReportError(f"{path}: no {what}; is this a study folder written by `python -m itjax.sweep`?")
    except json.JSONDecodeError as e:
        raise StudyReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from e


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def load(study_dir: str, superni_dir: Optional[str] = None, step: Optional[int] = None) -> StudyData:
    """Reads the plan, the state files and the done runs' predictions (scored per task)."""
    plan = _read_json(os.path.join(study_dir, "study.json"), "study.json (the sweep's plan)")
    options = dict(plan.get("report") or {})
    seed_axis = options.get("seed_axis", "seed")
    main_runs = [r for r in plan.get("runs", []) if r.get("stage") != "pre"]
    if not main_runs:
        raise StudyReportError(f"{os.path.join(study_dir, 'study.json')}: the plan has no runs.")
    axes: list = [a for a in plan.get("axes", []) if a != seed_axis]  # grid order (cells are stored key-sorted)
    for run in main_runs:
        axes += [a for a in run["cell"] if a not in axes and a not in ("task", seed_axis)]
    size_axis = options.get("size_axis", "size")
    data = StudyData(plan.get("name", os.path.basename(os.path.abspath(study_dir))), options, axes, seed_axis,
                     size_axis if size_axis in axes else None, main_runs)
    superni_dir = superni_dir or options.get("superni_dir")
    for run in plan.get("runs", []):
        path = os.path.join(study_dir, "runs", f"{run['run_id']}.json")
        state = _read_json(path, "state file") if os.path.isfile(path) else None
        key = cell_key(run["cell"], axes) if run.get("stage") != "pre" else None
        if key is not None:
            data.expected[key].append(run["run_id"])
        problem = None
        if state is None:
            problem = ("planned", "no state file yet (not started)")
        elif state.get("state") != "done":
            problem = (state.get("state", "?"), _last_line(state.get("error", "")))
        elif key is not None:
            predictions = os.path.join(study_dir, run["run_id"], "predictions")
            try:
                examples = report_lib.read_prediction_dir(predictions, step)
                if superni_dir:
                    report_lib.fill_categories(examples, superni_dir)
                task_rows = report_lib.build_tables(examples)["tasks"]
            except (ValueError, OSError) as e:
                problem = ("done", f"no predictions: {e}")
            else:
                tasks = data.scores.setdefault((key, str(run["cell"].get(seed_axis, ""))), {})
                for row in task_rows:
                    tasks[row["task"]] = {"rougeL": row["rougeL"], "exact_match": row["exact_match"],
                                          "category": row["category"]}
                data.scored[key].append(run["run_id"])
        if problem:
            data.unfinished.append({"run_id": run["run_id"], "stage": run.get("stage", ""), "state": problem[0],
                                    "error": problem[1]})
    return data


def cell_key(cell: Mapping[str, Any], axes: Sequence[str]) -> tuple:
    """The cell's values on `axes` (missing axes: '')."""
    return tuple(str(cell.get(a, "")) for a in axes)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _sd(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _aggregate(per_seed: Sequence[dict]) -> dict:
    """[{task: scores}] per seed -> mean / sd over seeds of the mean over tasks, for each metric."""
    out: dict[str, Any] = {"seeds": len(per_seed), "tasks": max(len(t) for t in per_seed)}
    for metric in METRICS:
        values = [_mean([s[metric] for s in tasks.values()]) for tasks in per_seed]
        out[metric], out[f"{metric}_sd"] = round(_mean(values), 4), round(_sd(values), 4)
    return out


def _ordered_keys(data: StudyData) -> list[tuple]:
    """Cell keys in the plan's grid order."""
    return list(dict.fromkeys(cell_key(r["cell"], data.axes) for r in data.runs))


def overall_rows(data: StudyData) -> list[dict]:
    """One row per cell: its axes, seeds, tasks, runs scored / planned, metrics and their sd over seeds."""
    rows = []
    for key in _ordered_keys(data):
        per_seed = [tasks for (k, _), tasks in sorted(data.scores.items()) if k == key and tasks]
        row = dict(zip(data.axes, key))
        row["runs"] = f"{len(data.scored[key])}/{len(data.expected[key])}"
        if per_seed:
            row.update(_aggregate(per_seed))
        else:
            row.update({"seeds": 0, "tasks": 0, **{m: None for m in METRICS}, **{f"{m}_sd": None for m in METRICS}})
        rows.append(row)
    return rows


def category_rows(data: StudyData) -> list[dict]:
    """One row per cell and task category (categories in sorted order)."""
    rows = []
    for key in _ordered_keys(data):
        per_seed = [tasks for (k, _), tasks in sorted(data.scores.items()) if k == key and tasks]
        categories = sorted({s["category"] for tasks in per_seed for s in tasks.values()})
        for category in categories:
            subset = [{t: s for t, s in tasks.items() if s["category"] == category} for tasks in per_seed]
            subset = [tasks for tasks in subset if tasks]
            rows.append({**dict(zip(data.axes, key)), "category": category, **_aggregate(subset)})
    return rows


def parse_baseline(text: str, data: StudyData) -> dict[str, str]:
    """'axis=value[,axis=value]' -> {axis: value}; ValueError naming --baseline and the axes / values it may use."""
    baseline = {}
    for part in text.split(","):
        axis, sep, value = part.partition("=")
        axis, value = axis.strip(), value.strip()
        if not sep or not axis:
            raise StudyReportError(f"--baseline {text!r}: write axis=value[,axis=value] (e.g. encoding=input_only).")
        if axis not in data.axes:
            raise StudyReportError(f"--baseline {text!r}: {axis!r} is not an axis of the study "
                                   f"(axes: {', '.join(data.axes)}).")
        values = sorted({str(r["cell"].get(axis, "")) for r in data.runs})
        if value not in values:
            raise StudyReportError(f"--baseline {text!r}: axis {axis!r} has no value {value!r} "
                                   f"(values: {', '.join(values)}).")
        baseline[axis] = value
    return baseline


def add_deltas(rows: list[dict], axes: Sequence[str], baseline: Mapping[str, str],
               extra_keys: Sequence[str] = ()) -> None:
    """Adds delta_<metric> to each row: its value minus the value of its baseline row (None without one)."""
    keys = list(axes) + list(extra_keys)
    index = {tuple(row[k] for k in keys): row for row in rows}
    for row in rows:
        base = index.get(tuple(baseline.get(k, row[k]) for k in keys))
        for metric in METRICS:
            ok = base is not None and base[metric] is not None and row[metric] is not None
            row[f"delta_{metric}"] = round(row[metric] - base[metric], 4) if ok else None


def references(data: StudyData, extra: Sequence[Mapping[str, Any]] = (), where_file: str = "study.report") \
        -> list[dict]:
    """The study's references (+ `extra`), checked: name, value, metric in METRICS, where on known axes."""
    out = []
    for i, ref in enumerate(list(data.options.get("references") or []) + list(extra)):
        where = f"{where_file if i >= len(data.options.get('references') or []) else 'study.report'} " \
                f"references[{i}]"
        if not isinstance(ref, Mapping) or "name" not in ref or "value" not in ref:
            raise StudyReportError(f"{where}: each reference is {{'name': ..., 'value': number, 'metric': 'rougeL', "
                                   f"'where': {{axis: value}}}}; got {ref!r}.")
        metric = ref.get("metric", "rougeL")
        if metric not in METRICS:
            raise StudyReportError(f"{where} ({ref['name']}): metric {metric!r} is not one of {', '.join(METRICS)}.")
        conditions = {str(k): str(v) for k, v in dict(ref.get("where") or {}).items()}
        unknown = [a for a in conditions if a not in data.axes]
        if unknown:
            raise StudyReportError(f"{where} ({ref['name']}): 'where' names {unknown}, not axes of the study "
                                   f"(axes: {', '.join(data.axes)}).")
        out.append({"name": str(ref["name"]), "metric": metric, "value": float(ref["value"]), "where": conditions})
    return out


def _matches(row: Mapping[str, Any], conditions: Mapping[str, str], skip: Optional[str] = None) -> bool:
    return all(row.get(a) == v for a, v in conditions.items() if a != skip)


def reference_rows(rows: Sequence[dict], refs: Sequence[dict], axes: Sequence[str]) -> list[dict]:
    """(cell, reference) pairs for every scored cell matching the reference's `where`."""
    out = []
    for ref in refs:
        for row in rows:
            if row[ref["metric"]] is None or not _matches(row, ref["where"]):
                continue
            out.append({**{a: row[a] for a in axes}, "reference": ref["name"], "metric": ref["metric"],
                        "reference_value": ref["value"], "value": row[ref["metric"]],
                        "delta": round(row[ref["metric"]] - ref["value"], 4)})
    return out


def size_order(data: StudyData) -> list[str]:
    """The size axis' values in the study's grid order ([] without a size axis)."""
    if data.size_axis is None:
        return []
    return list(dict.fromkeys(str(r["cell"][data.size_axis]) for r in data.runs if data.size_axis in r["cell"]))


def reaching_rows(data: StudyData, rows: Sequence[dict], refs: Sequence[dict]) -> list[dict]:
    """Per cell without its size axis and reference: the smallest train size whose value reaches the reference."""
    if data.size_axis is None:
        return []
    sizes = size_order(data)
    group_axes = [a for a in data.axes if a != data.size_axis]
    groups: dict[tuple, dict] = {}
    for row in rows:
        groups.setdefault(tuple(row[a] for a in group_axes), {})[row[data.size_axis]] = row
    out = []
    for ref in refs:
        for group, by_size in groups.items():
            labels = dict(zip(group_axes, group))
            if not _matches(labels, ref["where"], skip=data.size_axis):
                continue
            scored = [(s, by_size[s][ref["metric"]]) for s in sizes if s in by_size
                      and by_size[s][ref["metric"]] is not None]
            if not scored:
                continue
            reached = next((s for s, v in scored if v >= ref["value"]), None)
            best_size, best = max(scored, key=lambda sv: sv[1])
            out.append({**labels, "reference": ref["name"], "metric": ref["metric"],
                        "reference_value": ref["value"], "smallest_size": reached or "not reached",
                        "best": best, "best_size": best_size})
    return out


def build(data: StudyData, baseline: Optional[Mapping[str, str]] = None,
          extra_references: Sequence[Mapping[str, Any]] = ()) -> dict[str, list[dict]]:
    """All tables: {'overall', 'categories', 'references', 'reaching', 'unfinished'}."""
    overall = overall_rows(data)
    categories = category_rows(data)
    if baseline:
        add_deltas(overall, data.axes, baseline)
        add_deltas(categories, data.axes, baseline, extra_keys=("category",))
    refs = references(data, extra_references, where_file="--references")
    return {"overall": overall, "categories": categories, "references": reference_rows(overall, refs, data.axes),
            "reaching": reaching_rows(data, overall, refs), "unfinished": list(data.unfinished)}


# ----------------------------------------------------------------------------------------------------------
# Output.

TITLES = {"overall": "Overall (mean over tasks; seeds averaged, `_sd` their spread)",
          "categories": "Per category", "references": "Against reference numbers",
          "reaching": "Train size reaching each reference", "unfinished": "Unfinished runs (not scored)"}


def _blank(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    return [{k: "" if v is None else v for k, v in row.items()} for row in rows]


def _markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    rows = _blank(rows)
    columns = list(rows[0])
    numeric = {c: any(isinstance(r[c], (int, float)) for r in rows) for c in columns}
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---:" if numeric[c] else "---" for c in columns)
             + " |"]
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]).replace("|", "\\|") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(name: str, tables: Mapping[str, Sequence[Mapping[str, Any]]],
                    plots: Sequence[str] = ()) -> str:
    """The report as markdown (numbers to 2 decimals; the CSV files keep 4); plots linked by relative path."""
    parts = [f"# Study {name}"]
    for key, title in TITLES.items():
        rows = tables.get(key) or []
        if not rows:
            body = "(none)" if key == "unfinished" else "(no rows)"
        else:
            body = _markdown(rows)
        parts.append(f"## {title}\n\n{body}")
    if plots:
        parts.append("## Plots\n\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots))
    return "\n\n".join(parts) + "\n"


def write(tables: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str, name: str,
          plots: Sequence[str] = ()) -> list[str]:
    """report.md and <table>.csv files into out_dir (an empty table: a header-less empty file); returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "report.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(render_markdown(name, tables, plots))
    for key in TITLES:
        paths.append(os.path.join(out_dir, f"{key}.csv"))
        rows = tables.get(key) or []
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.write(report_lib.to_csv(_blank(rows)) if rows else "")
    return paths


def run(study_dir: str, out_dir: Optional[str] = None, baseline: Optional[str] = None,
        references_file: Optional[str] = None, superni_dir: Optional[str] = None, step: Optional[int] = None,
        plots: bool = True) -> tuple[dict, list[str], str]:
    """Reads STUDY, writes the tables (and plots) into out_dir (default STUDY/report).

    Returns (tables, written paths, markdown)."""
    from itjax import plots as plots_lib

    if not os.path.isdir(study_dir):
        raise StudyReportError(f"{study_dir}: no such study folder.")
    data = load(study_dir, superni_dir, step)
    extra = []
    if references_file:
        extra = _read_json(references_file, "references file")
        if not isinstance(extra, list):
            raise StudyReportError(f"--references {references_file}: expected a JSON list of "
                                   "{'name', 'value', 'metric', 'where'} objects.")
    tables = build(data, parse_baseline(baseline, data) if baseline else None, extra)
    out_dir = out_dir or os.path.join(study_dir, "report")
    images = plots_lib.study_plots(data, tables, out_dir) if plots else []
    paths = write(tables, out_dir, data.name, images)
    return tables, paths + images, render_markdown(data.name, tables, images)
