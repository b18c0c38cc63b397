"""itjax.report tables: hand-computed values, and equality with the official SuperNI evaluation logic."""

import csv
import glob
import json
import os
import random
import string

import pytest
from rouge_score import rouge_scorer

from itjax import report as eval_tables

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superni")


# ----------------------------------------------------------------------------------------------------------
# Hand-computed case.

HAND_EXAMPLES = [
    # task_a (Textual Entailment, exact match): EM 1, 0 -> 50; ROUGE-L 1, 0 -> 50
    {"task": "task_a", "category": "Textual Entailment", "prediction": "Yes.", "references": ["yes"]},
    {"task": "task_a", "category": "Textual Entailment", "prediction": "no", "references": ["yes"]},
    # task_b (Title Generation, ROUGE-L): "the cat sat" vs "the cat sat on the mat": LCS 3, P 1, R 1/2 -> F 2/3;
    # "cat" vs "the cat" (articles are kept): EM 0, LCS 1, P 1, R 1/2 -> F 2/3.
    {"task": "task_b", "category": "Title Generation", "prediction": "the cat sat",
     "references": ["a dog", "the cat sat on the mat"]},
    {"task": "task_b", "category": "Title Generation", "prediction": "cat", "references": ["the cat"]},
]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_hand_computed_tables(tmp_path):
    path = tmp_path / "preds.jsonl"
    _write_jsonl(path, HAND_EXAMPLES)
    tables = eval_tables.build_tables(eval_tables.read_predictions(str(path)))
    task_a, task_b = tables["tasks"]
    columns = ("exact_match", "rougeL", "metric", "score")
    assert [task_a[c] for c in columns] == [50.0, 50.0, "exact_match", 50.0]
    assert [task_b[c] for c in columns] == [0.0, 66.6667, "rougeL", 66.6667]
    overall = tables["overall"][0]
    assert overall["num_examples"] == 4 and overall["num_tasks"] == 2
    assert overall["exact_match"] == 25.0  # 1 of 4
    assert overall["rougeL"] == 58.3333  # (1 + 0 + 2/3 + 2/3) / 4
    assert overall["exact_match_macro"] == 25.0  # (50 + 0) / 2
    assert overall["rougeL_macro"] == 58.3333  # (50 + 66.667) / 2
    categories = {row["category"]: row for row in tables["categories"]}
    assert categories["Textual Entailment"]["score"] == 50.0
    assert categories["Title Generation"]["score"] == 66.6667


def test_cli_writes_markdown_and_csv(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    _write_jsonl(path, HAND_EXAMPLES)
    assert eval_tables.main(["--predictions", str(path), "--out_dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "## Overall" in printed
    assert "| task_b | Title Generation | 2 | 0.0000 | 66.6667 | rougeL | 66.6667 |" in printed
    with open(tmp_path / "out" / "overall.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["rougeL"]) == 58.3333
    assert sorted(os.listdir(tmp_path / "out")) == ["categories.csv", "overall.csv", "tables.md", "tasks.csv"]


def test_itjax_prediction_directory_and_categories_from_task_files(tmp_path):
    run = tmp_path / "predictions"
    run.mkdir()
    rows = [{"input": "x", "prediction": "1", "references": ["1"]},
            {"input": "y", "prediction": "0", "references": ["1"]}]
    _write_jsonl(run / "superni_task1344_glue_entailment_classification-100.jsonl", rows[1:])
    _write_jsonl(run / "superni_task1344_glue_entailment_classification-200.jsonl", rows)
    examples = eval_tables.read_predictions(str(run))
    assert len(examples) == 2 and examples[0].task == "superni_task1344_glue_entailment_classification"
    assert len(eval_tables.read_predictions(str(run), step=100)) == 1
    if os.path.isdir(DATA_DIR):
        eval_tables.fill_categories(examples, DATA_DIR)
        assert examples[0].category == "Textual Entailment"
        assert eval_tables.build_tables(examples)["tasks"][0]["score"] == 50.0


def test_bad_prediction_lines_name_the_line(tmp_path):
    path = tmp_path / "preds.jsonl"
    _write_jsonl(path, [HAND_EXAMPLES[0], {"task": "t", "references": ["a"]}])
    with pytest.raises(ValueError, match=r"preds.jsonl:2: no 'prediction'"):
        eval_tables.read_predictions(str(path))
    assert eval_tables.main(["--predictions", str(tmp_path / "nope.jsonl")]) == 2


# ----------------------------------------------------------------------------------------------------------
# REFERENCE: the official logic, transcribed (not imported: it needs `datasets` / a GPT-2 download).
# compute_metrics / compute_grouped_metrics / normalize_answer: allenai/natural-instructions
# eval/automatic/evaluation.py (commit 8540acd3), default track. Category grouping key and category -> metric
# list: yizhongw/Tk-Instruct src/compute_metrics.py (commit d8184faa). Both score ROUGE-L with rouge-score
# (vendored there as `rouge`), use_stemmer=True.

_ref_scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _ref_normalize_answer(s):
    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_punc(lower(s)))


def _ref_exact_match(prediction, ground_truth):
    return _ref_normalize_answer(prediction) == _ref_normalize_answer(ground_truth)


def _ref_rouge(prediction, ground_truth):
    return _ref_scorer.score(prediction=prediction, target=ground_truth)["rougeL"].fmeasure


def _ref_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def _ref_compute_metrics(predictions, references):
    em, rougeL = 0, 0
    for pred, gold in zip(predictions, references):
        assert isinstance(gold, list)
        em += _ref_metric_max_over_ground_truths(_ref_exact_match, pred, gold)
        rougeL += _ref_metric_max_over_ground_truths(_ref_rouge, pred, gold)
    em = 100.0 * em / len(references)
    rougeL = 100.0 * rougeL / len(references)
    return {k: round(v, 4) for k, v in {"exact_match": em, "rougeL": rougeL}.items()}


def _ref_compute_grouped_metrics(predictions, references, groups):
    examples_by_group = {}
    for pred, gold, group in zip(predictions, references, groups):
        examples_by_group.setdefault(group, []).append((pred, gold))
    results = {}
    for group, group_examples in examples_by_group.items():
        task_predictions, task_references = zip(*group_examples)
        for metric, value in _ref_compute_metrics(task_predictions, task_references).items():
            results[f"{metric}_for_{group}"] = value
    return results


_REF_CATEGORY_METRICS = [
    ("Textual Entailment", "exact_match"), ("Cause Effect Classification", "exact_match"),
    ("Coreference Resolution", "exact_match"), ("Dialogue Act Recognition", "exact_match"),
    ("Answerability Classification", "exact_match"), ("Word Analogy", "exact_match"),
    ("Overlap Extraction", "rougeL"), ("Keyword Tagging", "rougeL"), ("Question Rewriting", "rougeL"),
    ("Title Generation", "rougeL"), ("Data to Text", "rougeL"), ("Grammar Error Correction", "rougeL"),
]
# END OF REFERENCE.


def _synthetic_predictions(seed=0):
    """Predictions over 15-45 real instances of each test task (uneven, so macro != micro): exact,
    re-cased / re-punctuated, truncated, another instance's answer, a shuffled answer, empty."""
    rng = random.Random(seed)
    with open(os.path.join(DATA_DIR, "splits", "default", "test_tasks.txt")) as f:
        test_tasks = set(f.read().split())
    rows = []
    for path in sorted(glob.glob(os.path.join(DATA_DIR, "tasks", "*.json"))):
        name = os.path.basename(path)[: -len(".json")]
        if name not in test_tasks:
            continue
        with open(path) as f:
            task = json.load(f)
        instances = task["Instances"][: rng.randint(15, 45)]
        for inst in instances:
            gold = rng.choice(inst["output"])
            words = gold.split()
            kind = rng.randrange(6)
            prediction = [
                gold, gold.upper() + "!", " ".join(words[: max(1, len(words) // 2)]),
                rng.choice(instances)["output"][0], " ".join(rng.sample(words, len(words))), "",
            ][kind]
            rows.append({"task_name": name, "category": task["Categories"][0], "prediction": prediction,
                         "references": inst["output"]})
    return rows


@pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"SuperNI sample not found at {DATA_DIR}")
def test_tables_equal_the_official_evaluation(tmp_path):
    rows = _synthetic_predictions()
    assert len(rows) >= 300
    path = tmp_path / "preds.jsonl"
    _write_jsonl(path, rows)
    tables = eval_tables.build_tables(eval_tables.read_predictions(str(path)))

    predictions = [r["prediction"] for r in rows]
    references = [r["references"] for r in rows]
    tasks = [r["task_name"] for r in rows]
    categories = ["_".join(r["category"].lower().split()) for r in rows]
    official = _ref_compute_metrics(predictions, references)
    official.update(_ref_compute_grouped_metrics(predictions, references, categories))
    by_task = _ref_compute_grouped_metrics(predictions, references, tasks)
    category_metric = {"_".join(c.lower().split()): m for c, m in _REF_CATEGORY_METRICS}

    overall = tables["overall"][0]
    assert (overall["exact_match"], overall["rougeL"]) == (official["exact_match"], official["rougeL"])
    assert 0 < official["exact_match"] < 100 and 0 < official["rougeL"] < 100
    assert overall["rougeL_macro"] != overall["rougeL"]
    for row in tables["tasks"]:
        assert row["exact_match"] == by_task[f"exact_match_for_{row['task']}"]
        assert row["rougeL"] == by_task[f"rougeL_for_{row['task']}"]
        key = "_".join(row["category"].lower().split())
        assert row["metric"] == category_metric[key]
        assert row["score"] == by_task[f"{category_metric[key]}_for_{row['task']}"]
    assert len(tables["categories"]) == 12
    for row in tables["categories"]:
        key = "_".join(row["category"].lower().split())
        assert row["exact_match"] == official[f"exact_match_for_{key}"]
        assert row["rougeL"] == official[f"rougeL_for_{key}"]
        assert row["score"] == official[f"{category_metric[key]}_for_{key}"]
    # Macro averages are not official numbers: the mean of the official (rounded) per-task values, within 1e-4.
    for metric in ("exact_match", "rougeL"):
        values = [by_task[f"{metric}_for_{t}"] for t in sorted(set(tasks))]
        assert abs(overall[f"{metric}_macro"] - sum(values) / len(values)) <= 1e-4
        for row in tables["categories"]:
            in_category = [t["task"] for t in tables["tasks"] if t["category"] == row["category"]]
            values = [by_task[f"{metric}_for_{t}"] for t in in_category]
            assert abs(row[f"{metric}_macro"] - sum(values) / len(values)) <= 1e-4
