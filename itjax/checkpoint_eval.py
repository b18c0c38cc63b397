"""Evaluate a checkpoint on a mixture: `evaluate`, the gin configurable that `python -m itjax.eval` calls (T5X's
eval.py idea, on `itjax.runs.load`).

The gin config is the checkpoint folder's (a run's MODEL_DIR/config.gin or an itjax.convert folder's model.gin),
then `gin/runs/eval.gin` (`evaluate.mixture_or_task_name = %EVAL_MIXTURE`), then the user's files and bindings.
Settings left unbound come from the run's own evaluation settings, so evaluating a run's checkpoint on its own
mixture reproduces the numbers training logged for that step:

    evaluate.split                 train.eval_split if the mixture has it, else 'validation', else 'test'
    evaluate.task_feature_lengths  the run's TASK_FEATURE_LENGTHS (a converted folder has none: set it)
    evaluate.batch_size            train.eval_batch_size, else BATCH_SIZE, else 32
    evaluate.max_decode_length     train.max_decode_length, else the targets length
    evaluate.num_examples          train.eval_num_examples, else all

Output (process 0), like a training run's evaluation: lines appended to OUT/metrics.jsonl (`"step"`, `"split"`,
`"mixture"`, `"task"`: each task and "all"; a converted folder's step is 0), predictions in
OUT/predictions/<mixture>/<task>-<step>.jsonl (an earlier file of the same name is kept as <task>-<step>.<n>.jsonl),
TensorBoard scalars in OUT/tensorboard. OUT defaults to `<checkpoint folder>/eval`.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import gin
import jax
from etils import epath

from itjax import config as config_lib
from itjax import eval_specs, runs
from itjax.evaluation import Evaluation, MetricsWriter, format_table
from itjax.training import _check_vocabulary  # registers the run's configurables too

log = logging.getLogger("itjax")

EVAL_GIN = "runs/eval.gin"
DEFAULT_BATCH_SIZE = 32


def _bound(name: str):
    """The value gin binds to `name` ('train.eval_split', 'TASK_FEATURE_LENGTHS/macro.value'), None if unbound."""
    try:
        value = gin.query_parameter(name)
    except ValueError:
        return None
    return config_lib.evaluate(value)  # a %MACRO or @configurable() evaluated


@gin.configurable(denylist=["checkpoint_path", "step", "out_dir", "gin_files", "bindings", "search_paths"])
def evaluate(checkpoint_path: str, *, step: int | None = None, out_dir: str | None = None,
             gin_files: Sequence[str] = (), bindings: Sequence[str] = (), search_paths: Sequence[str] = (),
             mixture_or_task_name: str = gin.REQUIRED, split: str | None = None,
             task_feature_lengths: Mapping[str, int] | None = None, batch_size: int | None = None,
             max_decode_length: int | None = None, num_examples: int | None = None) -> dict:
    """Evaluates the weights at `checkpoint_path` (step `step` of a run, default its latest; or a converted
    folder) on a mixture; returns {task: metrics} (plus "all"), on every process. Called with the folder's gin config parsed (see `run`); `gin_files` / `bindings` /
    `search_paths` are passed on to `itjax.runs.load`, which parses the folder's config again for the model.

    Args (gin, `evaluate.*`; unbound ones: the run's settings, see the module docstring):
      mixture_or_task_name: the registered seqio mixture or task (gin/runs/eval.gin binds %EVAL_MIXTURE).
      split / task_feature_lengths (tokens) / batch_size (global, examples) / max_decode_length (tokens) /
      num_examples (the first N of each task).
    """
    spec = eval_specs.EvalSpec(
        mixture_or_task_name=mixture_or_task_name,
        split=split or _split(mixture_or_task_name, _bound("train.eval_split")),
        task_feature_lengths=dict(task_feature_lengths or _bound("TASK_FEATURE_LENGTHS/macro.value") or {}),
        batch_size=batch_size or _bound("train.eval_batch_size") or _bound("train.batch_size") or DEFAULT_BATCH_SIZE,
        max_decode_length=max_decode_length or _bound("train.max_decode_length"),
        num_examples=num_examples if num_examples is not None else _bound("train.eval_num_examples"))
    if not spec.task_feature_lengths:
        raise config_lib.ConfigError(
            f"{checkpoint_path} binds no TASK_FEATURE_LENGTHS (an itjax.convert folder has none): pass "
            "--gin.evaluate.task_feature_lengths=\"{'inputs': 512, 'targets': 128}\" (tokens).")
    eval_specs.check(spec, f"--gin.EVAL_MIXTURE={mixture_or_task_name!r}")

    loaded = runs.load(checkpoint_path, step, gin_files=[EVAL_GIN, *gin_files], bindings=bindings,
                       search_paths=search_paths)
    from itjax.data import pipeline
    _check_vocabulary(pipeline.get_mixture_or_task(spec.mixture_or_task_name), loaded.trainer.model)
    step = loaded.step if loaded.step is not None else 0
    out_dir = out_dir or str(epath.Path(checkpoint_path) / "eval")
    _check_writable(out_dir)
    writer = MetricsWriter(out_dir)
    evaluation = Evaluation(spec.mixture_or_task_name, loaded.trainer.model.feature_converter_cls,
                            spec.task_feature_lengths, spec.batch_size, spec.split, out_dir, writer,
                            max_decode_length=spec.max_decode_length, num_examples=spec.num_examples,
                            batch_divisor=loaded.trainer.partitioner.batch_divisor,
                            output_name=spec.mixture_or_task_name)
    if jax.process_index() == 0:
        for task_name in evaluation.task_names:
            _keep_earlier(epath.Path(evaluation.predictions_dir) / f"{task_name}-{step}.jsonl")
    results = evaluation.run(loaded.trainer, loaded.params, step)
    writer.close()
    if jax.process_index() == 0:
        where = f"step {loaded.step}" if loaded.step is not None else "a converted folder"
        print(f"\nEvaluation of {checkpoint_path} ({where}) on {spec.mixture_or_task_name} ({spec.split}):\n"
              f"{format_table(results)}\nwrote {writer.path} and {evaluation.predictions_dir}/", flush=True)
    return results


def _split(mixture_or_task_name: str, preferred: str | None) -> str:
    try:
        return eval_specs.default_split(mixture_or_task_name, preferred)
    except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"--gin.EVAL_MIXTURE={mixture_or_task_name!r}: {e}") from None


def _check_writable(out_dir: str) -> None:
    try:
        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = epath.Path(out_dir) / f".write_test.{os.getpid()}.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise config_lib.ConfigError(f"--out_dir {out_dir} is not writable ({e.strerror or e}); pass another "
                                     "--out_dir.") from None


def _keep_earlier(path: epath.Path) -> None:
    """Renames an existing predictions file <task>-<step>.jsonl to <task>-<step>.<n>.jsonl (the first free n)."""
    if not path.exists():
        return
    index = 1
    while (kept := path.with_name(f"{path.stem}.{index}.jsonl")).exists():
        index += 1
    path.rename(kept)
    print(f"kept the earlier {path.name} as {kept.name}", flush=True)


def run(checkpoint_path: str, step: int | None = None, out_dir: str | None = None, gin_files: Sequence[str] = (),
        bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> dict:
    """Parses the folder's gin file, gin/runs/eval.gin, `gin_files` and `bindings` (EVAL_MIXTURE required; a
    misspelled macro is an error) and calls `evaluate`. Clears gin's config before and after.

    Raises config_lib.ConfigError, runs.RunLoadError, CheckpointMismatchError with messages naming what to fix."""
    kind = runs.kind_of(checkpoint_path)
    if kind == runs.CONVERTED and step is not None:
        raise runs.RunLoadError(f"{checkpoint_path} is an itjax.convert folder: it holds one set of weights, not "
                                f"checkpoint steps; leave --step={step} out.")
    if kind == runs.RUN:
        runs.resolve_step(checkpoint_path, step)  # a missing step: one message listing the steps there are
    folder_gin = str(epath.Path(checkpoint_path) / (runs.RUN_CONFIG if kind == runs.RUN else runs.MODEL_GIN))
    gin.clear_config()
    try:
        # Required macros are also exempt from the "set but nothing uses it" (misspelling) check: a converted
        # folder's model.gin sets MODEL, which only `itjax.runs.load` reads.
        required = ("EVAL_MIXTURE",) + (("MODEL",) if kind == runs.CONVERTED else ())
        config_lib.parse_gin([folder_gin, EVAL_GIN, *gin_files], list(bindings), search_paths,
                             required_macros=required)
        return evaluate(checkpoint_path, step=step, out_dir=out_dir, gin_files=gin_files, bindings=bindings,
                        search_paths=search_paths)
    finally:
        gin.clear_config()
