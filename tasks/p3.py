"""P3 (promptsource) seqio Tasks, as T0 registered them: one Task per template, plus rank-classification evals.

    from itjax.tasks import p3
    reg = p3.register_p3("super_glue", "rte", {"train": "rte/train.jsonl", "validation": "rte/val.jsonl"},
                         templates_dir="promptsource/templates", vocabulary="/path/spiece.model")
    reg.tasks        # ['super_glue_rte_GPT_3_style', 'super_glue_rte_MNLI_crowdsource', ...]
    reg.score_tasks  # ['super_glue_rte_GPT_3_style_score_eval', ...]  (templates with answer_choices)

`source` maps split names to the dataset's raw records: a JSON-lines / JSON-array file path, or any iterable of
dicts (a list, a Hugging Face `datasets.Dataset`, ...). Nothing is downloaded. Records are rendered in Python with
`itjax.data.promptsource` (promptsource's `Template.apply`), once per template and split; records whose rendering
has no target (unlabeled test records) are dropped, as in T0. Nothing is registered on import.

Task `<name>` (T0 naming, `t0_task_name`), features before tokenization:
    inputs          tf.string []      the rendered prompt (tokenized, no EOS by default: T0's setting)
    targets         tf.string []      the rendered target (tokenized, EOS appended)
    answer_choices  tf.string [None]  the rendered choices (empty for open-ended templates)
  Metrics: exact match / ROUGE-L of the whitespace-stripped prediction (itjax.metrics.superni_metrics).

Task `<name>_score_eval` (templates with answer_choices): T0's rank classification. Each record becomes one
example per answer choice, `inputs` = the prompt, `targets` = the choice, plus
    idx         int32 [2]   (record index, choice index)
    is_correct  bool  []    choice == the stripped rendered target
    weight      float32 []  1.0
The evaluator scores every example's target log-likelihood (`score_fn`, itjax.evaluation); the metric picks
the highest-scoring choice per record: `rank_accuracy` (0-100, weighted by `weight`). The name is not `accuracy`
because itjax's evaluation reports the teacher-forced token accuracy under that key.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from itjax.data import promptsource, sharding
from itjax.metrics import superni_metrics

logger = logging.getLogger(__name__)

Records = Union[str, Iterable[Mapping[str, Any]]]
SCORE_EVAL_SUFFIX = "_score_eval"


# ----------------------------------------------------------------------------------------------------------
# Rank classification (t5.data.preprocessors / postprocessors / evaluation.metrics.rank_classification semantics).

def rank_classification(ds: tf.data.Dataset) -> tf.data.Dataset:
    """One example per answer choice: {idx [2], inputs, targets (the choice), is_correct, weight}.

    Input features: inputs [], targets [] (the rendered gold target), answer_choices [None] (tf.string).
    A record with no choices contributes nothing; one whose target is not among its choices has no correct row
    (it counts as wrong, as in T5's metric).
    """
    def expand(index, ex):
        choices = ex["answer_choices"]
        n = tf.size(choices)
        return tf.data.Dataset.from_tensor_slices({
            "idx": tf.stack([tf.fill([n], tf.cast(index, tf.int32)), tf.range(n, dtype=tf.int32)], axis=1),
            "inputs": tf.fill([n], ex["inputs"]),
            "targets": choices,
            "is_correct": tf.equal(choices, tf.strings.strip(ex["targets"])),
            "weight": tf.ones([n], tf.float32),
        })

    return sharding.enumerate_records(ds).flat_map(expand)  # record ids of the whole split, on any host shard


def rank_classification_postprocess(output: Any, example: Optional[Mapping[str, Any]] = None,
                                    is_target: bool = False) -> Any:
    """Targets -> (idx tuple, is_correct, weight, number of target tokens); scores pass through."""
    if is_target:
        return (tuple(int(i) for i in example["idx"]), bool(example["is_correct"]),
                float(example.get("weight", 1.0)), len(example["targets"]))
    return output


def rank_classification_metric(targets: Sequence[tuple], scores: Sequence[float],
                               normalize_by_target_length: bool = False) -> dict[str, float]:
    """Accuracy of picking, per record (idx[0]), the choice with the highest log-likelihood.

    targets: from rank_classification_postprocess; scores: one log-likelihood per row (nats). Ties go to the
    lowest choice index (np.argmax). Returns {"rank_accuracy": 0-100}, weighted by each picked row's weight.
    """
    if len(targets) != len(scores):
        raise ValueError(f"rank classification: {len(targets)} targets but {len(scores)} scores.")
    if not targets:
        return {"rank_accuracy": float("nan")}
    rows = sorted(zip(targets, scores), key=lambda row: tuple(row[0][0]))
    correct = total = 0.0
    for _, group in itertools.groupby(rows, key=lambda row: row[0][0][0]):
        group = list(group)
        values = [s / max(t[3], 1) if normalize_by_target_length else s for t, s in group]
        picked = group[int(np.argmax(values))][0]
        correct += float(picked[1]) * picked[2]
        total += picked[2]
    return {"rank_accuracy": 100.0 * correct / total}


# ----------------------------------------------------------------------------------------------------------
# Data.

def read_records(path: str) -> list[dict]:
    """Records of a JSON-lines file (one object per line) or a JSON file holding a list of objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"P3 source file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8.") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}).") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: record {bad} is not a JSON object.")
    return records


class _P3Data:
    """The raw records of every split (read once) and each template's rendered columns (rendered once)."""

    def __init__(self, source: Mapping[str, Records], seed: int, label: str):
        self.source, self.seed, self.label = dict(source), seed, label
        self._records: dict[str, list] = {}
        self._columns: dict[tuple[str, str], dict[str, list]] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.source)

    def records(self, split: str) -> list:
        if split not in self._records:
            value = self.source[split]
            self._records[split] = read_records(value) if isinstance(value, str) else list(value)
        return self._records[split]

    def columns(self, template: promptsource.Template, split: str) -> dict[str, list]:
        key = (template.id, split)
        if key not in self._columns:
            where = self.source[split] if isinstance(self.source[split], str) else f"{self.label} {split!r}"
            rendered, dropped = promptsource.render_records(template, self.records(split), seed=self.seed,
                                                            source=f"{where} record")
            if dropped:
                logger.info("%s / %s / %s: %d of %d records have no target after rendering (dropped, as in T0).",
                            self.label, template.name, split, dropped, dropped + len(rendered))
            self._columns[key] = {
                "inputs": [r.inputs for r in rendered],
                "targets": [r.targets for r in rendered],
                "answer_choices": [r.answer_choices or [] for r in rendered],
            }
        return self._columns[key]

    def dataset_fn(self, split: str, shuffle_files: bool = False, seed: Optional[int] = None, *,
                   template: promptsource.Template) -> tf.data.Dataset:
        """seqio FunctionDataSource signature; in-memory data, so shuffle_files / seed do nothing."""
        del shuffle_files, seed
        if split not in self.source:
            raise ValueError(f"{self.label}: no split {split!r} in the source (splits: {self.splits}).")
        cols = self.columns(template, split)
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.constant(cols["inputs"], tf.string, shape=[len(cols["inputs"])]),
            "targets": tf.constant(cols["targets"], tf.string, shape=[len(cols["targets"])]),
            "answer_choices": tf.RaggedTensor.from_row_lengths(
                tf.constant([c for row in cols["answer_choices"] for c in row], tf.string),
                tf.constant([len(row) for row in cols["answer_choices"]], tf.int64)),
        })


def strip_postprocess(output: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False) -> Any:
    """T0's postprocessor: promptsource targets and predictions are compared whitespace-stripped."""
    del example, is_target
    return output.strip() if isinstance(output, str) else output


# ----------------------------------------------------------------------------------------------------------
# Registration.

@dataclasses.dataclass
class P3Registration:
    """What register_p3 registered: the generation Tasks, the rank-classification Tasks, the templates."""

    tasks: list[str]
    score_tasks: list[str]
    templates: dict[str, promptsource.Template] = dataclasses.field(repr=False)
    templates_path: str = ""


def _vocabulary(vocabulary: Union[seqio.Vocabulary, str]) -> seqio.Vocabulary:
    if isinstance(vocabulary, str):
        if not os.path.isfile(vocabulary):
            raise ValueError(f"vocabulary={vocabulary!r}: no SentencePiece model file at that path.")
        return seqio.SentencePieceVocabulary(vocabulary)
    return vocabulary


def _add_task(name: str, **kwargs) -> None:
    if name in seqio.TaskRegistry.names():  # re-registration replaces (seqio raises on duplicates)
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, **kwargs)


def register_p3(dataset_name: str, subset: Optional[str], source: Mapping[str, Records], *, templates_dir: str,
                vocabulary: Union[seqio.Vocabulary, str], template_names: Optional[Sequence[str]] = None,
                score_eval: bool = True, inputs_add_eos: bool = False, seed: int = 0) -> P3Registration:
    """Registers one Task per template of `<templates_dir>/<dataset_name>/<subset>/templates.yaml` (and a
    `_score_eval` Task per template with answer_choices). Registering again replaces the earlier Tasks.

    Args:
      dataset_name, subset: the promptsource dataset ("super_glue", "rte"; subset None for datasets without one).
      source: {split: JSON-lines / JSON path, or an iterable of record dicts} with the dataset's raw fields.
      templates_dir: promptsource's templates folder.
      vocabulary: seqio vocabulary or SentencePiece model path for inputs and targets.
      template_names: register only these templates (default: all).
      score_eval: also register the rank-classification `_score_eval` Tasks.
      inputs_add_eos: append EOS to inputs (T0 did not).
      seed: seeds the `choice` filter per (template, record).
    """
    path = promptsource.templates_path(templates_dir, dataset_name, subset)
    templates = promptsource.load_templates(path)
    selected = promptsource.select_templates(templates, template_names, path)
    if not isinstance(source, Mapping) or not source:
        raise ValueError(f"register_p3({dataset_name!r}, {subset!r}): source must map split names to a record "
                         "file path or a list of records, e.g. {'validation': 'rte_val.jsonl'}.")
    vocabulary = _vocabulary(vocabulary)
    features = {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=inputs_add_eos, required=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
    }
    data = _P3Data(source, seed, label=f"P3 {dataset_name}/{subset}" if subset else f"P3 {dataset_name}")
    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    names = {t.name: promptsource.t0_task_name(dataset_name, subset, t.name) for t in selected}
    clashes = [n for n in set(names.values()) if list(names.values()).count(n) > 1]
    if clashes:
        raise promptsource.PromptTemplateError(f"{path}: templates {sorted(k for k, v in names.items() if v in clashes)}"
                                               f" map to the same task name(s) {clashes}; pass template_names.")
    tasks, score_tasks = [], []
    for template in selected:
        name = names[template.name]
        source_fn = seqio.FunctionDataSource(functools.partial(data.dataset_fn, template=template),
                                             splits=data.splits)
        _add_task(name, source=source_fn, preprocessors=tokenize, output_features=features,
                  postprocess_fn=strip_postprocess, metric_fns=[superni_metrics])
        tasks.append(name)
        if score_eval and template.answer_choices is not None:
            _add_task(name + SCORE_EVAL_SUFFIX, source=source_fn, preprocessors=[rank_classification] + tokenize,
                      output_features=features, postprocess_fn=rank_classification_postprocess,
                      metric_fns=[rank_classification_metric])
            score_tasks.append(name + SCORE_EVAL_SUFFIX)
    logger.info("Registered %d P3 tasks (%d rank-classification evals) from %s.", len(tasks), len(score_tasks), path)
    return P3Registration(tasks, score_tasks, {t.name: t for t in selected}, path)
