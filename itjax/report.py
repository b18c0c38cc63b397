"""Super-NaturalInstructions result tables from a predictions file: per task, per category and overall; or the
tables and plots of a whole study.

    python -m itjax.report --predictions preds.jsonl [--out_dir DIR] [--superni_dir natural-instructions/]
    python -m itjax.report --predictions MODEL_DIR/predictions [--step 2000]
    python -m itjax.report STUDY [--out_dir DIR] [--baseline axis=value[,...]] [--references refs.json]

(`python -m itjax.eval --predictions ...` is the same command, kept as an alias.) The STUDY form (a folder written
by `python -m itjax.sweep`) is itjax.study_report: see its docstring for the tables, itjax.plots for the figures.

Input: a JSONL file, one object per example with `task` (or `task_name`, or Tk-Instruct's `Task`), `prediction`
(or `Prediction`), `references` (or Tk-Instruct's `Instance.output`) and optionally `category`; or a directory of
itjax `<task>-<step>.jsonl` files (written by itjax.evaluation.write_predictions; the task comes from the file
name, the latest step unless --step). Missing categories are read from `<superni_dir>/tasks/<task>.json`
("Categories"[0]) when --superni_dir is given.

Output: tables.md (also printed) and tasks.csv, categories.csv, overall.csv in --out_dir. Numbers are 0-100:

* exact match and ROUGE-L as itjax.metrics computes them (the official normalisation, Porter-stemmed ROUGE-L F,
  max over references). Per task, per category and overall "micro" values average over instances and are
  rounded to 4 decimals, exactly as the official `compute_metrics` / `compute_grouped_metrics` report them
  (natural-instructions eval/automatic/evaluation.py; Tk-Instruct src/compute_metrics.py).
* "macro" values average the unrounded per-task values over tasks (not an official number), rounded to 4.
* "metric" / "score": the official category -> metric choice (CATEGORY_METRICS); categories outside that list
  (e.g. training categories) are reported with ROUGE-L, the paper's aggregate metric.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from itjax import cli, metrics

# Verbatim from Tk-Instruct src/compute_metrics.py (yizhongw/Tk-Instruct, commit d8184faa), `category_metrics`:
# the metric the paper reports for each category of the English test split.
CATEGORY_METRICS: dict[str, str] = {
    "Textual Entailment": "exact_match",
    "Cause Effect Classification": "exact_match",
    "Coreference Resolution": "exact_match",
    "Dialogue Act Recognition": "exact_match",
    "Answerability Classification": "exact_match",
    "Word Analogy": "exact_match",
    "Overlap Extraction": "rougeL",
    "Keyword Tagging": "rougeL",
    "Question Rewriting": "rougeL",
    "Title Generation": "rougeL",
    "Data to Text": "rougeL",
    "Grammar Error Correction": "rougeL",
}
DEFAULT_METRIC = "rougeL"
NO_CATEGORY = "(no category)"
_ITJAX_PREDICTION_FILE = re.compile(r"^(?P<task>.+)-(?P<step>\d+)\.jsonl$")
_SUPERNI_NAME = re.compile(r"task\d+_\w+$")


def category_key(category: str) -> str:
    """The official grouping key: 'Textual Entailment' -> 'textual_entailment'."""
    return "_".join(category.lower().split())


_METRIC_BY_KEY = {category_key(c): m for c, m in CATEGORY_METRICS.items()}


def category_metric(category: str) -> str:
    """'exact_match' or 'rougeL': the official choice for `category`, ROUGE-L outside the official list."""
    return _METRIC_BY_KEY.get(category_key(category), DEFAULT_METRIC)


@dataclass
class Example:
    """One scored prediction."""

    task: str
    category: str
    prediction: str
    references: list[str]


# ----------------------------------------------------------------------------------------------------------
# Reading predictions.

def _field(obj: Mapping[str, Any], keys: Sequence[str], where: str) -> Any:
    for key in keys:
        if key in obj:
            return obj[key]
    raise ValueError(f"{where}: no {' / '.join(repr(k) for k in keys)} field; each line needs a task, a prediction "
                     "and its references (see python -m itjax.report --help).")


def _parse_line(obj: Any, where: str, task: Optional[str]) -> Example:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    if task is None:
        task = str(_field(obj, ("task", "task_name", "Task"), where))
    prediction = _field(obj, ("prediction", "Prediction"), where)
    if "references" in obj:
        references = obj["references"]
    elif isinstance(obj.get("Instance"), dict) and "output" in obj["Instance"]:
        references = obj["Instance"]["output"]
    else:
        raise ValueError(f"{where}: no 'references' (or Tk-Instruct 'Instance'.'output') field.")
    if isinstance(references, str):
        references = [references]
    if not isinstance(references, list) or not references:
        raise ValueError(f"{where}: 'references' must be a non-empty list of acceptable outputs.")
    return Example(task, str(obj.get("category") or obj.get("task_category") or ""), str(prediction or ""),
                   [str(r) for r in references])


def read_jsonl(path: str, task: Optional[str] = None) -> list[Example]:
    """Examples of one predictions JSONL file (`task` overrides the per-line task field)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg}).") from e
            examples.append(_parse_line(obj, where, task))
    return examples


def read_prediction_dir(directory: str, step: Optional[int] = None) -> list[Example]:
    """Examples of itjax `<task>-<step>.jsonl` files: each task at `step`, or at its latest step."""
    latest: dict[str, tuple[int, str]] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.jsonl"))):
        match = _ITJAX_PREDICTION_FILE.match(os.path.basename(path))
        if not match:
            continue
        task, file_step = match["task"], int(match["step"])
        if (step is None and file_step > latest.get(task, (-1, ""))[0]) or file_step == step:
            latest[task] = (file_step, path)
    if not latest:
        at = f" at step {step}" if step is not None else ""
        raise ValueError(f"{directory}: no <task>-<step>.jsonl prediction files{at}; pass the predictions/ folder "
                         "of a run (MODEL_DIR/predictions) or a JSONL file.")
    return [ex for task, (_, path) in sorted(latest.items()) for ex in read_jsonl(path, task=task)]


def read_predictions(path: str, step: Optional[int] = None) -> list[Example]:
    """A JSONL file or an itjax predictions directory."""
    if os.path.isdir(path):
        return read_prediction_dir(path, step)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--predictions {path}: no such file or directory.")
    return read_jsonl(path)


def fill_categories(examples: Iterable[Example], superni_dir: str) -> None:
    """Sets missing categories from `<superni_dir>/tasks/<superni task>.json` ("Categories"[0])."""
    cache: dict[str, str] = {}
    for ex in examples:
        if ex.category:
            continue
        if ex.task not in cache:
            match = _SUPERNI_NAME.search(ex.task)  # 'superni_task033_x' -> 'task033_x'
            path = os.path.join(superni_dir, "tasks", f"{match.group(0) if match else ex.task}.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    cache[ex.task] = str((json.load(f).get("Categories") or [""])[0])
            else:
                cache[ex.task] = ""
        ex.category = cache[ex.task]


# ----------------------------------------------------------------------------------------------------------
# Scoring and tables.

def _mean_x100(values: Sequence[float]) -> float:
    """The official aggregation: 100 * sum / n (sum in instance order), rounded to 4 decimals."""
    return round(100.0 * sum(values) / len(values), 4)


def _scores(examples: Sequence[Example]) -> list[tuple[float, float]]:
    return [(metrics.max_over_references(metrics.exact_match, ex.prediction, ex.references),
             metrics.max_over_references(metrics.rouge_l, ex.prediction, ex.references)) for ex in examples]


def _group_row(scores: Sequence[tuple[float, float]]) -> dict[str, Any]:
    return {"num_examples": len(scores), "exact_match": _mean_x100([s[0] for s in scores]),
            "rougeL": _mean_x100([s[1] for s in scores])}


def _macro(task_scores: Sequence[Sequence[tuple[float, float]]]) -> dict[str, float]:
    em = [100.0 * sum(s[0] for s in t) / len(t) for t in task_scores]
    rl = [100.0 * sum(s[1] for s in t) / len(t) for t in task_scores]
    return {"exact_match_macro": round(sum(em) / len(em), 4), "rougeL_macro": round(sum(rl) / len(rl), 4)}


def build_tables(examples: Sequence[Example]) -> dict[str, list[dict[str, Any]]]:
    """{'tasks': rows, 'categories': rows, 'overall': [row]}; see the module docstring for the columns."""
    if not examples:
        raise ValueError("No predictions to score.")
    scores = _scores(examples)
    by_task: dict[str, list] = defaultdict(list)
    task_category: dict[str, str] = {}
    for ex, score in zip(examples, scores):
        by_task[ex.task].append(score)
        task_category.setdefault(ex.task, ex.category or NO_CATEGORY)

    task_rows = []
    for task in sorted(by_task):
        category = task_category[task]
        row = {"task": task, "category": category, **_group_row(by_task[task]), "metric": category_metric(category)}
        row["score"] = row[row["metric"]]
        task_rows.append(row)

    by_category: dict[str, list] = defaultdict(list)  # instances in input order, as the official grouping
    for ex, score in zip(examples, scores):
        by_category[task_category[ex.task]].append(score)
    category_rows = []
    for category in sorted(by_category):
        tasks = [t for t in sorted(by_task) if task_category[t] == category]
        row = {"category": category, "num_tasks": len(tasks), **_group_row(by_category[category]),
               **_macro([by_task[t] for t in tasks]), "metric": category_metric(category)}
        row["score"] = row[row["metric"]]
        category_rows.append(row)

    overall = {"num_tasks": len(by_task), **_group_row(scores), **_macro(list(by_task.values()))}
    return {"tasks": task_rows, "categories": category_rows, "overall": [overall]}


# ----------------------------------------------------------------------------------------------------------
# Output.

def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table (numbers right-aligned, 4 decimals)."""
    columns = list(rows[0])
    align = ["---:" if isinstance(rows[0][c], (int, float)) else "---" for c in columns]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def render_markdown(tables: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    titles = {"overall": "Overall", "categories": "Per category", "tasks": "Per task"}
    return "\n\n".join(f"## {titles[name]}\n\n{to_markdown(tables[name])}" for name in titles) + "\n"


def write_tables(tables: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str) -> list[str]:
    """Writes tables.md and <table>.csv files into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "tables.md")]
    with open(paths[0], "w", encoding="utf-8") as f:
        f.write(render_markdown(tables))
    for name, rows in tables.items():
        paths.append(os.path.join(out_dir, f"{name}.csv"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.write(to_csv(rows))
    return paths


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m itjax.report") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", help="a study folder written by python -m itjax.sweep (instead of "
                        "--predictions): its tables and plots, from every run's predictions")
    parser.add_argument("--predictions",
                        help="predictions JSONL file, or an itjax predictions/ directory of <task>-<step>.jsonl")
    parser.add_argument("--out_dir", help="write tables.md, tasks.csv, categories.csv, overall.csv here (STUDY: "
                        "report.md, its CSV tables and PNG plots; default STUDY/report)")
    parser.add_argument("--superni_dir", help="natural-instructions checkout to read missing categories from "
                        "(STUDY: default study.report['superni_dir'])")
    parser.add_argument("--step", type=int, help="with a predictions directory: the step to read (default latest)")
    parser.add_argument("--baseline", help="STUDY: axis=value[,axis=value]: add deltas against the cell with "
                        "these values (e.g. encoding=input_only)")
    parser.add_argument("--references", help="STUDY: a JSON list of {'name', 'value', 'metric', 'where'} reference "
                        "numbers, added to study.report['references']")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    if (args.study is None) == (args.predictions is None):
        parser.error("give either a STUDY folder or --predictions (not both)")
    if args.study is None and (args.baseline or args.references):
        parser.error("--baseline and --references go with a STUDY folder")
    cli.start(args.verbose, uses_tensorflow=False)
    if args.study is not None:
        return _study_main(args)
    try:
        examples = read_predictions(args.predictions, args.step)
        if args.superni_dir:
            fill_categories(examples, args.superni_dir)
        tables = build_tables(examples)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render_markdown(tables), end="")
    if args.out_dir:
        for path in write_tables(tables, args.out_dir):
            print(f"wrote {path}")
    return 0


def _study_main(args: argparse.Namespace) -> int:
    from itjax import study_report

    try:
        _, paths, markdown = study_report.run(args.study, args.out_dir, args.baseline, args.references,
                                              args.superni_dir, args.step)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown, end="")
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
