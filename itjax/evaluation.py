"""Evaluation during training: teacher-forced loss / token accuracy, and generation scored by seqio metrics.

Each host reads, tokenizes and runs only its shard of the eval data (`Evaluation`), the tasks' seqio
postprocessors and metric functions see all of it (gathered), as `seqio.Evaluator` would give them on one host.
Results go to `MODEL_DIR/metrics.jsonl` (one line per task plus `"task": "all"`, each naming its `"split"` and
`"mixture"`) and `MODEL_DIR/predictions/<task>-<step>.jsonl` (input, prediction, references); an evaluation given an
`output_name` (a training run's extra eval mixtures, `python -m itjax.eval`) writes `predictions/<output_name>/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pickle
from typing import Any, Mapping, Sequence

import jax
import jax.experimental.multihost_utils
import numpy as np
import seqio
from etils import epath

from itjax.data import sharding
from itjax.data.pipeline import to_global

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends JSON lines to MODEL_DIR/metrics.jsonl (process 0 only) and mirrors scalars to TensorBoard."""

    def __init__(self, model_dir: str, tensorboard: bool = True):
        self.path = os.path.join(model_dir, "metrics.jsonl")
        self._is_writer = jax.process_index() == 0
        self._tb = {}
        self._tb_dir = os.path.join(model_dir, "tensorboard") if tensorboard else None

    def write(self, record: Mapping[str, Any], tensorboard_name: str | None = None) -> None:
        """Appends `record` (with `step`, `split`, `task`) as one line; its numbers go to the TensorBoard run
        `tensorboard_name` (default `<split>/<task>`) as scalar summaries."""
        if not self._is_writer:
            return
        with epath.Path(self.path).open("a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        if self._tb_dir:
            import tensorflow as tf  # loaded already (seqio)
            writer = self._tensorboard(tensorboard_name or f"{record['split']}/{record['task']}")
            with writer.as_default():
                for key, value in record.items():
                    if key not in ("step", "split", "task") and isinstance(value, (int, float)) and \
                            np.isfinite(value):
                        tf.summary.write(key, tf.constant(float(value), tf.float32), step=record["step"],
                                         metadata=_scalar_metadata())

    def _tensorboard(self, name: str):
        """TF's own event-file writer (TensorFlow is loaded for seqio anyway; tensorboardX would import torch
        when it is installed, ~2.5 s per process)."""
        if name not in self._tb:
            import tensorflow as tf
            self._tb[name] = tf.summary.create_file_writer(os.path.join(self._tb_dir, name))
        return self._tb[name]

    def flush(self) -> None:
        for writer in self._tb.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._tb.values():
            writer.close()


@functools.cache
def _scalar_metadata():
    """Summary metadata that makes TensorBoard's scalars dashboard show a rank-0 tensor summary (what the
    `tensorboard` package's `tf.summary.scalar` attaches; that package is not a TensorFlow dependency). Built once."""
    from tensorflow.core.framework import summary_pb2
    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def _decode_text(value) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [_decode_text(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_decode_text(v) for v in value]
    return value


@dataclasses.dataclass
class _HostTask:
    """One task's evaluation data on this host (its shard; see itjax.data.sharding).

    examples: task features of each local example (with `*_pretokenized` text);
    rows: the model features of each (numpy, one row each); padding: a zero row (feeds the batches of a host
    whose shard ran out); targets: postprocessed references;
    num_batches: batches every host runs for this task (the most any host needs; short hosts feed padding);
    prompt_width: decoder-only prompt columns for generation (agreed by all hosts), None for encoder-decoder.
    """
    task: seqio.Task
    examples: list[dict[str, Any]]
    rows: list[dict[str, np.ndarray]]
    padding: dict[str, np.ndarray]
    targets: list[Any]
    num_batches: int
    prompt_width: int | None


class Evaluation:
    """Generation + teacher-forced evaluation of every task of a mixture on one split, sharded over hosts.

    Each host reads, tokenizes and runs only its shard of every task (`itjax.data.sharding.host_shard`): the
    global eval batch holds `batch_size / process_count` rows of each host, a host whose shard is shorter feeds
    padding rows (zero weights; their outputs are dropped). Targets, predictions and scores are then gathered
    (host-interleaved, i.e. one host's example order) and every host applies the tasks' seqio postprocessors and
    metric functions to all of them, so the metrics equal a one-host evaluation.

    Args:
      mixture_or_task_name: registered seqio task or mixture; tasks without the split or without metric
        functions are skipped (seqio's rule).
      feature_converter_cls: the model's `feature_converter` (`BaseModel.feature_converter`; called with
        pack=False).
      task_feature_lengths: fixed lengths, so eval batches have one shape and compile once.
      batch_size: global eval batch size (rounded up to a multiple of `batch_divisor`, the number of devices the
        batch is split over, and of the number of processes).
      split: the eval split name.
      model_dir: where metrics.jsonl and predictions/ go.
      max_decode_length: decoding budget in tokens (defaults to the targets length).
      num_examples: evaluate only the first N examples of each task (None: all).
      output_name: None for a run's main evaluation; else (an extra eval mixture, `itjax.eval`: the mixture's
        name) predictions go to `model_dir/predictions/<output_name>/` and TensorBoard runs are named
        `<split>/<output_name>/<task>`, apart from the main evaluation's.
    """

    def __init__(self, mixture_or_task_name: str, feature_converter_cls, task_feature_lengths: Mapping[str, int],
                 batch_size: int, split: str, model_dir: str, writer: MetricsWriter,
                 max_decode_length: int | None = None, num_examples: int | None = None, batch_divisor: int = 1,
                 output_name: str | None = None):
        tasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
        self.tasks = list(seqio.evaluation.get_valid_eval_tasks(tasks, split))
        if not self.tasks:
            raise ValueError(f"Evaluation of {mixture_or_task_name!r}: none of its tasks has a {split!r} split and "
                             "metric functions; choose another eval split or mixture (gin: EVAL_SPLIT / "
                             "train.eval_split).")
        for task in self.tasks:
            legacy = (seqio.metrics.LegacyMetric, seqio.metrics.PassthroughLegacyMetric)  # made from metric_fns
            unsupported = [m for m in task.metric_objs if not isinstance(m, legacy)]
            if unsupported or task.predict_with_aux_metric_fns:
                raise ValueError(f"Evaluation: task {task.name!r} uses seqio metric objects or predict_with_aux "
                                 "metric functions, which itjax does not compute; give it metric_fns taking "
                                 "(targets, predictions) or (targets, scores).")
        self.split = split
        self.mixture_name, self.output_name = mixture_or_task_name, output_name
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        multiple = math.lcm(batch_divisor, self.process_count)
        self.batch_size = -(-batch_size // multiple) * multiple
        self.local_batch_size = self.batch_size // self.process_count
        self.max_decode_length = max_decode_length or task_feature_lengths["targets"]
        self.writer = writer
        self.predictions_dir = os.path.join(model_dir, "predictions", *([output_name] if output_name else []))
        eos_ids = {t.output_features["targets"].vocabulary.eos_id for t in self.tasks}
        if len(eos_ids) > 1:
            raise ValueError(f"Evaluation of {mixture_or_task_name!r}: its tasks' target vocabularies disagree on "
                             f"the EOS id ({sorted(eos_ids)}); evaluate them separately.")
        self.eos_id = eos_ids.pop()  # where generation stops (T5: 1; Llama 3: 128001 ...)
        converter = feature_converter_cls(pack=False)
        self._host_tasks = [self._load(task, converter, task_feature_lengths, num_examples) for task in self.tasks]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def _load(self, task: seqio.Task, converter, lengths: Mapping[str, int], num_examples: int | None) -> _HostTask:
        """Reads, tokenizes and converts this host's shard of `task` (once; reused by every evaluation)."""
        ds = sharding.host_shard(task, self.split, lengths, self.process_index, self.process_count,
                                 num_examples).cache()
        examples = list(ds.as_numpy_iterator())
        model_ds = converter(ds, lengths)
        rows = list(model_ds.as_numpy_iterator())
        padding = {k: np.zeros(spec.shape, spec.dtype.as_numpy_dtype) for k, spec in model_ds.element_spec.items()}
        targets = [_postprocessed_target(task, ex) for ex in examples]
        counts = _allgather_ints([len(rows), _prompt_columns(rows)])
        # Decoder-only rows: generation needs only the prompt columns (the same on every host: one program).
        width = None
        if "decoder_causal_attention" in padding:
            width = _width(int(counts[:, 1].max()), padding["decoder_causal_attention"].shape[-1])
        log.info("Evaluation: task %s, %d of %d examples on this host (process %d of %d).", task.name, len(rows),
                 int(counts[:, 0].sum()), self.process_index, self.process_count)
        return _HostTask(task, examples, rows, padding, targets,
                         num_batches=-(-int(counts[:, 0].max()) // self.local_batch_size), prompt_width=width)

    def _local_batches(self, host_task: _HostTask):
        """Yields (number of real rows, numpy batch [local_batch_size, ...]) num_batches times (padding at the end)."""
        for b in range(host_task.num_batches):
            chunk = host_task.rows[b * self.local_batch_size:(b + 1) * self.local_batch_size]
            padded = chunk + [host_task.padding] * (self.local_batch_size - len(chunk))
            yield len(chunk), {k: np.stack([row[k] for row in padded]) for k in host_task.padding}

    def run(self, trainer, params, step: int) -> dict[str, dict[str, float]]:
        """Evaluates every task; writes metrics.jsonl, predictions and TensorBoard. Returns {task: metrics}."""
        sharding_for_ndim = trainer.partitioner.batch_sharding
        results = {}
        for host_task in self._host_tasks:
            task = host_task.task
            totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
            tokens, scores = [], []
            for n, batch in self._local_batches(host_task):
                global_batch = to_global(batch, sharding_for_ndim, host_local=True)
                terms = trainer.eval_step(params, global_batch)
                for key in totals:
                    totals[key] += float(terms[key])
                if task.predict_metric_fns:
                    if host_task.prompt_width is not None:
                        global_batch = to_global({k: v[:, :host_task.prompt_width] for k, v in batch.items()},
                                                 sharding_for_ndim, host_local=True)
                    out = trainer.generate(params, global_batch, max_decode_length=self.max_decode_length,
                                           eos_id=self.eos_id)
                    tokens.extend(self._host_rows(out, sharding_for_ndim)[:n])
                if task.score_metric_fns:
                    scores.extend(self._host_rows(trainer.score(params, global_batch), sharding_for_ndim)[:n])

            vocabulary = task.output_features["targets"].vocabulary
            generations = [vocabulary.decode([int(t) for t in row]) for row in tokens]
            local = {
                "input": [_decode_text(ex.get("inputs_pretokenized", b"")) for ex in host_task.examples],
                "target": host_task.targets,
                "prediction": [task.postprocess_fn(text, example=ex, is_target=False)
                               for text, ex in zip(generations, host_task.examples)]
                if task.predict_metric_fns else None,
                # The decoded text before the postprocessor (e.g. a BBH chain of thought), kept in predictions/.
                "generation": generations if task.predict_metric_fns and task.postprocessor else None,
                "score": [float(s) for s in scores] if task.score_metric_fns else None,
            }
            everything = _interleave(_gather_objects(local), ("input", "target", "prediction", "generation", "score"))
            record = {}
            for metric_fn in task.predict_metric_fns:
                record.update(metric_fn(everything["target"], everything["prediction"]))
            for metric_fn in task.score_metric_fns:
                record.update(metric_fn(everything["target"], everything["score"]))
            record = {k: float(getattr(v, "value", v)) for k, v in record.items()}
            record["loss"] = totals["loss_sum"] / max(totals["tokens"], 1.0)
            record["accuracy"] = totals["correct"] / max(totals["tokens"], 1.0)
            record["num_examples"] = len(everything["target"])
            results[task.name] = record
            if self.process_index == 0:
                write_predictions(self.predictions_dir, task.name, step, everything)
        results["all"] = _micro_average(results)
        for task_name, record in results.items():
            name = f"{self.split}/{self.output_name}/{task_name}" if self.output_name else None
            self.writer.write({"step": step, "split": self.split, "mixture": self.mixture_name, "task": task_name,
                               **record}, tensorboard_name=name)
        self.writer.flush()
        return results

    def _host_rows(self, out: jax.Array, sharding_for_ndim) -> list[np.ndarray]:
        """This host's rows of a global output [batch, ...], in the order this host fed them."""
        full = np.asarray(jax.experimental.multihost_utils.process_allgather(out, tiled=True))
        index_map = sharding_for_ndim(full.ndim).addressable_devices_indices_map(full.shape)
        spans = sorted({(s[0].start or 0, full.shape[0] if s[0].stop is None else s[0].stop)
                        for s in index_map.values()})
        rows = np.concatenate([full[a:b] for a, b in spans])
        assert len(rows) == self.local_batch_size, (spans, self.local_batch_size)
        return list(rows)


def _postprocessed_target(task: seqio.Task, example: Mapping[str, Any]) -> Any:
    """A reference as seqio's metrics see it: `targets_pretokenized` (else the decoded `targets`), postprocessed."""
    if "targets_pretokenized" in example:
        target = example["targets_pretokenized"]
    else:
        target = task.output_features["targets"].vocabulary.decode([int(t) for t in example["targets"]])
    if isinstance(target, bytes):
        target = target.decode("utf-8")
    return task.postprocess_fn(target, example=example, is_target=True)


def _prompt_columns(rows: Sequence[Mapping[str, np.ndarray]]) -> int:
    """Longest prompt of decoder-only rows (`decoder_causal_attention`), 0 for encoder-decoder rows."""
    if not rows or "decoder_causal_attention" not in rows[0]:
        return 0
    return max(int(np.max(np.nonzero(r["decoder_causal_attention"])[0], initial=0)) + 1 for r in rows)


def _width(longest_prompt: int, row_width: int, multiple: int = 16) -> int | None:
    return None if longest_prompt == 0 else min(row_width, -(-longest_prompt // multiple) * multiple)


def prompt_width(examples: Sequence[Mapping[str, np.ndarray]], multiple: int = 16) -> int | None:
    """Columns a decoder-only eval batch needs for generation: the longest prompt (`decoder_causal_attention`)
    rounded up to `multiple` (one compiled shape per task), at most the row width. None for encoder-decoder
    features. Trimming the target columns shrinks the prefill and the KV cache (row width + decode length before).
    """
    if not examples or "decoder_causal_attention" not in examples[0]:
        return None
    return _width(_prompt_columns(examples), examples[0]["decoder_causal_attention"].shape[-1], multiple)


def _allgather_ints(values: Sequence[int]) -> np.ndarray:
    """[process_count, len(values)]: every process's values (one host: just its own)."""
    local = np.asarray(values, np.int64)[None]
    if jax.process_count() == 1:
        return local
    return np.asarray(jax.experimental.multihost_utils.process_allgather(local[0]))


def _gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable `obj`, in process order (one host: [obj])."""
    if jax.process_count() == 1:
        return [obj]
    payload = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = _allgather_ints([payload.size])[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(jax.experimental.multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[i, :size].tobytes()) for i, size in enumerate(sizes)]


def _interleave(per_host: Sequence[Mapping[str, list | None]], keys: Sequence[str]) -> dict[str, list | None]:
    """Host h's local item j is item j * num_hosts + h of one host's order (round-robin shards): merge back."""
    out = {}
    for key in keys:
        if per_host[0][key] is None:
            out[key] = None
            continue
        merged = []
        for j in range(max(len(h[key]) for h in per_host)):
            merged.extend(h[key][j] for h in per_host if j < len(h[key]))
        out[key] = merged
    return out


def _micro_average(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Instance-weighted averages over tasks (the official SuperNI overall numbers average over instances)."""
    total = sum(r["num_examples"] for r in results.values())
    keys = set.intersection(*(set(r) for r in results.values())) - {"num_examples"}
    out = {k: sum(r[k] * r["num_examples"] for r in results.values()) / max(total, 1) for k in sorted(keys)}
    out["num_examples"] = total
    return out


def write_predictions(output_dir: str, task_name: str, step: int, outputs: Mapping[str, list | None]) -> None:
    """Writes <output_dir>/<task>-<step>.jsonl: one line per example with input, prediction (postprocessed) or
    score, generation (the decoded text before the task's postprocessor, for tasks that have one) and references
    (the postprocessed target), in one host's example order."""
    directory = epath.Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{task_name}-{step}.jsonl").open("w") as f:
        for i, (text, target) in enumerate(zip(outputs["input"], outputs["target"])):
            line = {"input": text}
            if outputs.get("prediction") is not None:
                line["prediction"] = _decode_text(outputs["prediction"][i])
            if outputs.get("generation") is not None:
                line["generation"] = outputs["generation"][i]
            if outputs.get("score") is not None:
                line["score"] = outputs["score"][i]
            line["references"] = _decode_text(target)
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
