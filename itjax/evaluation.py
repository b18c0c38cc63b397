"""Evaluation during training: teacher-forced loss / token accuracy, and generation scored by seqio metrics.

`seqio.Evaluator` owns the eval datasets (cached, enumerated, converted with the unpacked feature converter) and
calls the tasks' postprocessors and metric functions; this module supplies the batched predict function and
writes the results: `MODEL_DIR/metrics.jsonl` (one line per task plus `"task": "all"`) and
`MODEL_DIR/predictions/<task>-<step>.jsonl` (input, prediction, references).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.experimental.multihost_utils
import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from itjax.data.pipeline import to_global


class MetricsWriter:
    """Appends JSON lines to MODEL_DIR/metrics.jsonl (process 0 only) and mirrors scalars to TensorBoard."""

    def __init__(self, model_dir: str, tensorboard: bool = True):
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self._is_writer = jax.process_index() == 0
        self._tb = {}
        self._tb_dir = os.path.join(model_dir, "tensorboard") if tensorboard else None

    def write(self, record: Mapping[str, Any]) -> None:
        if not self._is_writer:
            return
        with epath.Path(self.path).open("a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        if self._tb_dir:
            writer = self._tensorboard(f"{record['split']}/{record['task']}")
            for key, value in record.items():
                if key not in ("step", "split", "task") and isinstance(value, (int, float)) and np.isfinite(value):
                    writer.add_scalar(key, value, record["step"])

    def _tensorboard(self, name: str):
        if name not in self._tb:
            from tensorboardX import SummaryWriter  # local: only process 0 ever needs it
            self._tb[name] = SummaryWriter(os.path.join(self._tb_dir, name))
        return self._tb[name]

    def flush(self) -> None:
        for writer in self._tb.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._tb.values():
            writer.close()


def _decode_text(value) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_decode_text(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_decode_text(v) for v in value]
    return value


class Evaluation:
    """Generation + teacher-forced evaluation of every task of a mixture on one split.

    Args:
      mixture_or_task_name: registered seqio task or mixture; tasks without the split are skipped (seqio rule).
      feature_converter_cls: the model's `feature_converter` (`BaseModel.feature_converter`; called with
        pack=False).
      task_feature_lengths: fixed lengths, so eval batches have one shape and compile once.
      batch_size: global eval batch size (rounded up to a multiple of `batch_divisor`, the number of devices the
        batch is split over; the last batch of a task is padded).
      split: the eval split name.
      model_dir: where metrics.jsonl and predictions/ go.
      max_decode_length: decoding budget in tokens (defaults to the targets length).
      num_examples: evaluate only the first N examples of each task (None: all).
    """

    def __init__(self, mixture_or_task_name: str, feature_converter_cls, task_feature_lengths: Mapping[str, int],
                 batch_size: int, split: str, model_dir: str, writer: MetricsWriter,
                 max_decode_length: int | None = None, num_examples: int | None = None, batch_divisor: int = 1):
        self.evaluator = seqio.Evaluator(
            mixture_or_task_name, feature_converter=feature_converter_cls(pack=False), eval_split=split,
            sequence_length=dict(task_feature_lengths), num_examples=num_examples, async_compute_metrics=False,
            use_memory_cache=True, logger_cls=[PredictionsLogger], log_dir=os.path.join(model_dir, "predictions"))
        self.split = split
        self.batch_size = -(-batch_size // batch_divisor) * batch_divisor
        self.max_decode_length = max_decode_length or task_feature_lengths["targets"]
        self.writer = writer
        eos_ids = {t.output_features["targets"].vocabulary.eos_id for t in self.evaluator.eval_tasks}
        if len(eos_ids) > 1:
            raise ValueError(f"Evaluation of {mixture_or_task_name!r}: its tasks' target vocabularies disagree on "
                             f"the EOS id ({sorted(eos_ids)}); evaluate them separately.")
        self.eos_id = eos_ids.pop() if eos_ids else 1  # where generation stops (T5: 1; Llama 3: 128001 ...)
        self._numpy_tasks = {name: [ex for _, ex in ds.as_numpy_iterator()]
                             for name, ds in self.evaluator.cached_model_datasets.items()}

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.evaluator.eval_tasks]

    def _batches(self, examples: Sequence[Mapping[str, np.ndarray]]):
        """Yields (number of real rows, padded numpy batch) over a list of feature dicts."""
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start:start + self.batch_size]
            batch = {k: np.stack([ex[k] for ex in chunk]) for k in chunk[0]}
            pad = self.batch_size - len(chunk)
            if pad:
                batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            yield len(chunk), batch

    def run(self, trainer, params, step: int) -> dict[str, dict[str, float]]:
        """Evaluates every task; writes metrics.jsonl, predictions and TensorBoard. Returns {task: metrics}."""
        sharding = trainer.partitioner.batch_sharding
        teacher_forced = {}

        def predict_fn(ds: tf.data.Dataset):
            indexed = list(ds.as_numpy_iterator())
            indices = [int(i) for i, _ in indexed]
            examples = [ex for _, ex in indexed]
            tokens = []
            width = prompt_width(examples)
            for n, batch in self._batches(examples):
                if width is not None:  # decoder-only rows: generation needs only the prompt columns
                    batch = {k: v[:, :width] for k, v in batch.items()}
                out = trainer.generate(params, to_global(batch, sharding, host_local=False),
                                       max_decode_length=self.max_decode_length, eos_id=self.eos_id)
                tokens.extend(np.asarray(jax.experimental.multihost_utils.process_allgather(out, tiled=True))[:n])
            return list(zip(indices, [t.tolist() for t in tokens]))

        def score_fn(ds: tf.data.Dataset):
            # Target log-likelihoods (nats) for tasks with score metrics, e.g. rank classification.
            indexed = list(ds.as_numpy_iterator())
            scores = []
            for n, batch in self._batches([ex for _, ex in indexed]):
                out = trainer.score(params, to_global(batch, sharding, host_local=False))
                scores.extend(np.asarray(jax.experimental.multihost_utils.process_allgather(out, tiled=True))[:n])
            return [(int(i), float(s)) for (i, _), s in zip(indexed, scores)]

        for name, examples in self._numpy_tasks.items():
            totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
            for _, batch in self._batches(examples):
                terms = trainer.eval_step(params, to_global(batch, sharding, host_local=False))
                for key in totals:
                    totals[key] += float(terms[key])
            teacher_forced[name] = totals

        metrics, _ = self.evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict_fn,
                                             score_fn=score_fn)
        per_task = metrics.result()

        results = {}
        for name in self.task_names:
            tf_totals = teacher_forced[name]
            record = {k: float(v) for k, v in per_task[name].items()}
            record["loss"] = tf_totals["loss_sum"] / max(tf_totals["tokens"], 1.0)
            record["accuracy"] = tf_totals["correct"] / max(tf_totals["tokens"], 1.0)
            record["num_examples"] = len(self._numpy_tasks[name])
            results[name] = record
        results["all"] = _micro_average(results)
        for task, record in results.items():
            self.writer.write({"step": step, "split": self.split, "task": task, **record})
        self.writer.flush()
        return results


def _micro_average(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Instance-weighted averages over tasks (the official SuperNI overall numbers average over instances)."""
    total = sum(r["num_examples"] for r in results.values())
    keys = set.intersection(*(set(r) for r in results.values())) - {"num_examples"}
    out = {k: sum(r[k] * r["num_examples"] for r in results.values()) / max(total, 1) for k in sorted(keys)}
    out["num_examples"] = total
    return out


def prompt_width(examples: Sequence[Mapping[str, np.ndarray]], multiple: int = 16) -> int | None:
    """Columns a decoder-only eval batch needs for generation: the longest prompt (`decoder_causal_attention`)
    rounded up to `multiple` (one compiled shape per task), at most the row width. None for encoder-decoder
    features. Trimming the target columns shrinks the prefill and the KV cache (row width + decode length before).
    """
    if not examples or "decoder_causal_attention" not in examples[0]:
        return None
    row_width = examples[0]["decoder_causal_attention"].shape[-1]
    longest = max(int(np.max(np.nonzero(ex["decoder_causal_attention"])[0], initial=0)) + 1 for ex in examples)
    return min(row_width, -(-longest // multiple) * multiple)


class PredictionsLogger(seqio.Logger):
    """seqio logger writing <output_dir>/<task>-<step>.jsonl with input, prediction and references (process 0)."""

    def __call__(self, task_name, step, metrics, dataset, inferences, targets) -> None:
        if jax.process_index() != 0 or dataset is None:
            return
        epath.Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        predictions = (inferences or {}).get("prediction", [])
        path = epath.Path(self.output_dir) / f"{task_name}-{step}.jsonl"
        with path.open("w") as f:
            for example, prediction, target in zip(dataset.as_numpy_iterator(), predictions, targets or []):
                line = {"input": _decode_text(example.get("inputs_pretokenized", b"")),
                        "prediction": _decode_text(prediction), "references": _decode_text(target)}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")


def format_table(results: Mapping[str, Mapping[str, float]], columns: Sequence[str] = ("exact_match", "rougeL",
                                                                                         "loss", "accuracy")) -> str:
    """A plain-text table of per-task results (tasks as rows), for the end of a run."""
    columns = [c for c in columns if any(c in r for r in results.values())]
    width = max(len(t) for t in results) + 2
    lines = ["task".ljust(width) + "".join(c.rjust(13) for c in columns)]
    lines.append("-" * len(lines[0]))
    for task, record in results.items():
        if task == "all":
            lines.append("-" * len(lines[0]))
        lines.append(task.ljust(width) + "".join(
            (f"{record[c]:13.2f}" if c in ("exact_match", "rougeL") else f"{record[c]:13.4f}") if c in record
            else " " * 13 for c in columns))
    return "\n".join(lines)
