"""The training run: `train()`, the gin configurable that the command line (`itjax.train`) calls.

It checks the configuration, builds the trainer, restores or initialises the state, and runs the loop with
periodic logging, checkpoints and evaluation, ending with an evaluation table.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Mapping

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils

from itjax import config as config_lib
from itjax import dry_run as dry_run_lib
from itjax import optimizers  # noqa: F401  (registers gin configurables)
from itjax import peft as peft_lib  # noqa: F401  (registers the peft gin configurables)
from itjax.checkpoints import Checkpointer, restore_initial_params, restore_peft_base
from itjax.data import pipeline
from itjax.evaluation import Evaluation, MetricsWriter, format_table
from itjax.models import encoder_decoder  # noqa: F401  (registers gin configurables)
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer

log = logging.getLogger("itjax")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _check_model_dir(model_dir: str) -> None:
    try:
        os.makedirs(model_dir, exist_ok=True)
        # One probe file per process: hosts of a multi-process run share MODEL_DIR.
        probe = os.path.join(model_dir, f".write_test.{os.getpid()}.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise config_lib.ConfigError(f"MODEL_DIR={model_dir!r} is not writable ({e.strerror}); pass "
                                     f"--gin.MODEL_DIR=\"'/a/writable/dir'\".") from None


def _check_vocabulary(task, model) -> None:
    """The model's embedding table must cover every id the task's vocabularies can produce."""
    for name, feature in task.output_features.items():
        size = feature.vocabulary.vocab_size
        if size > model.config.vocab_size:
            raise config_lib.ConfigError(
                f"feature {name!r} of {task.name!r} uses a vocabulary of {size} ids but the model's "
                f"{type(model.config).__name__}.vocab_size is {model.config.vocab_size}; set it >= {size} in the "
                "model gin file (T5 and Llama round it up to a multiple of 128).")


@gin.configurable(denylist=["progress", "dry_run"])
def train(*, model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED, model=gin.REQUIRED, optimizer=gin.REQUIRED,
          learning_rate_fn: Callable | float | None = None, partitioner: Partitioner | None = None,
          num_microbatches: int = 1, pack: bool = True, random_seed: int = 0, checkpoint_period: int = 1000,
          keep_checkpoints: int | None = 3, async_checkpointing: bool = True, eval_period: int = 1000,
          eval_split: str = "validation", eval_batch_size: int | None = None, eval_num_examples: int | None = None,
          max_decode_length: int | None = None, log_period: int = 20, initial_checkpoint_path: str | None = None,
          peft=None, progress: bool = True, dry_run: bool = False) -> dict:
    """Trains, checkpoints and evaluates; returns the last evaluation's {task: metrics}.

    Args:
      model_dir: run directory (checkpoints/, metrics.jsonl, predictions/, tensorboard/, config.gin).
      mixture_or_task_name: registered seqio task or mixture to train on.
      task_feature_lengths: e.g. {'inputs': 256, 'targets': 32} (tokens).
      train_steps: total optimizer steps (a resumed run continues up to this).
      batch_size: global batch size in examples (packed rows when pack=True).
      model: an EncoderDecoderModel.
      optimizer: an optax GradientTransformation (gin: @adafactor() / @adamw()).
      learning_rate_fn: the schedule, for logging the learning rate.
      partitioner: mesh + logical axis rules (default: data parallel over all devices).
      num_microbatches: gradient accumulation steps per optimizer step.
      pack: pack several examples per row (seqio feature converter pack=True).
      random_seed: parameter init, dropout and data shuffling seed.
      checkpoint_period / keep_checkpoints / async_checkpointing: checkpoint cadence and retention.
      eval_period: evaluate every this many steps (and always at the end); 0 = only at the end.
      eval_split / eval_batch_size / eval_num_examples / max_decode_length: evaluation settings.
      log_period: steps between train-metric lines (also how often the loss is checked for NaN).
      initial_checkpoint_path: start from these weights (an `itjax.convert` output folder) instead of a random
        initialisation; ignored when MODEL_DIR already has a checkpoint (the run resumes from that).
      peft: a parameter-efficient method (gin/peft/*.gin: @LoRA(), @PromptTuning(), @PrefixTuning(), @IA3()):
        only its adapter is trained and checkpointed; the frozen base is `initial_checkpoint_path` (or, without
        one, initialised from `random_seed`).
    """
    partitioner = partitioner or Partitioner()
    task = pipeline.get_mixture_or_task(mixture_or_task_name)
    pipeline.check_feature_lengths(task, task_feature_lengths)
    divisor = partitioner.batch_divisor * num_microbatches
    if batch_size % divisor:
        raise config_lib.ConfigError(
            f"BATCH_SIZE={batch_size} must be a multiple of (batch-sharded devices {partitioner.batch_divisor}) x "
            f"(num_microbatches {num_microbatches}) = {divisor}.")
    _check_vocabulary(task, model)
    log.info("Mesh %s, %d devices, %d process(es).", dict(partitioner.mesh.shape), jax.device_count(),
             jax.process_count())
    if peft is not None:
        peft.check(task_feature_lengths, pack, task)
    trainer = Trainer(model, optimizer, partitioner, learning_rate_fn=learning_rate_fn, peft=peft,
                      num_microbatches=num_microbatches, seed=random_seed)
    log.info(trainer.summary())
    if dry_run:
        figures = dry_run_lib.report(trainer, task_feature_lengths, batch_size, pack)
        print(dry_run_lib.format_report(figures), flush=True)
        return figures
    _check_model_dir(model_dir)
    checkpointer = Checkpointer(model_dir, checkpoint_period, keep_checkpoints, async_checkpointing)
    latest = checkpointer.latest_step()
    if latest is None:
        start_step = 0
        if peft is not None:
            checkpointer.base_pointer = restore_peft_base(trainer, initial_checkpoint_path)
        state = trainer.init_state()  # with peft: the adapter, on the base just loaded
        if initial_checkpoint_path and peft is None:
            state["params"] = restore_initial_params(initial_checkpoint_path, trainer.abstract_state["params"])
            log.info("Initial weights from %s.", initial_checkpoint_path)
    else:
        if peft is not None:
            checkpointer.base_pointer = restore_peft_base(trainer, initial_checkpoint_path,
                                                          checkpointer.saved_base_pointer(latest))
        state, position = checkpointer.restore(latest, trainer.abstract_state)
        start_step = int(state["step"])
        log.info("Restored checkpoint at step %d from %s.", start_step, checkpointer.directory)
        print(f"Restored checkpoint at step {start_step} from {checkpointer.directory}", flush=True)
        if position.get("batches_consumed", start_step) != start_step:
            log.warning("Checkpoint's input position %s differs from its step %d.", position, start_step)

    writer = MetricsWriter(model_dir)

    def make_evaluation() -> Evaluation:
        return Evaluation(mixture_or_task_name, model.feature_converter_cls, task_feature_lengths,
                          eval_batch_size or batch_size, eval_split, model_dir, writer,
                          max_decode_length=max_decode_length, num_examples=eval_num_examples,
                          batch_divisor=partitioner.batch_divisor)
    if jax.process_index() == 0:
        config_lib.save_operative_config(model_dir)

    results = None
    if start_step < train_steps:
        ds = pipeline.train_dataset(mixture_or_task_name, task_feature_lengths, batch_size,
                                    model.feature_converter_cls(pack=pack), seed=random_seed, skip_batches=start_step)
        state, results = _train_loop(trainer, state, pipeline.numpy_batches(ds), start_step, train_steps,
                                     checkpointer, make_evaluation(), writer, eval_period, log_period, progress)
    else:
        print(f"Already trained to step {start_step} >= TRAIN_STEPS={train_steps}.", flush=True)
        results = _logged_results(model_dir, start_step, eval_split)
    if results is None:
        results = make_evaluation().run(trainer, state["params"], int(state["step"]))
    checkpointer.save(int(state["step"]), state, {"batches_consumed": int(state["step"])})
    checkpointer.close()
    writer.close()
    if results:  # (empty on processes > 0 of a rerun: the logged evaluation is read by process 0)
        print(f"\nEvaluation at step {int(state['step'])} ({eval_split}):\n{format_table(results)}", flush=True)
    return results


def _logged_results(model_dir: str, step: int, split: str) -> dict | None:
    """The evaluation of `step` on `split` that MODEL_DIR/metrics.jsonl already holds ({task: metrics}), so a rerun
    of a finished run neither evaluates again nor appends duplicate rows; None if absent. Process 0's answer is
    used by every process (evaluation runs collectives: all evaluate or none)."""
    results = {}
    path = os.path.join(model_dir, "metrics.jsonl")
    if jax.process_index() == 0 and os.path.isfile(path):
        with open(path) as f:
            for line in f:
                record = json.loads(line)
                if record.get("step") == step and record.get("split") == split and "task" in record:
                    results[record.pop("task")] = {k: v for k, v in record.items() if k not in ("step", "split")}
    found = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(results))))
    if not found:
        return None
    if jax.process_index() != 0:
        return {}  # only process 0 prints the table
    print(f"Evaluation of step {step} from {path}.", flush=True)
    return results


def _train_loop(trainer: Trainer, state, batches, start_step: int, train_steps: int, checkpointer: Checkpointer,
                evaluation: Evaluation, writer: MetricsWriter, eval_period: int, log_period: int, progress: bool):
    """Runs steps start_step+1 .. train_steps. Returns (state, results of an eval at the final step or None)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=train_steps, initial=start_step, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=0.5)
    pending, results, window_start = [], None, time.time()
    sharding = trainer.partitioner.batch_sharding
    step = start_step
    while step < train_steps:
        batch = pipeline.to_global(next(batches), sharding, host_local=True)
        state, metrics = trainer.train_step(state, batch)
        step += 1
        pending.append(metrics)
        bar.update(1)
        if step % log_period == 0 or step == train_steps:
            summary = _summarise(jax.device_get(pending), time.time() - window_start, step)
            pending, window_start = [], time.time()
            bar.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}")
            writer.write({"step": step, "split": "train", "task": "all", **summary})
        if checkpointer.should_save(step) or step == train_steps:
            checkpointer.save(step, state, {"batches_consumed": step})
        if (eval_period and step % eval_period == 0) or step == train_steps:
            results = evaluation.run(trainer, state["params"], step)
            all_ = results["all"]
            bar.write(f"step {step}: eval exact_match {all_.get('exact_match', float('nan')):.2f} "
                      f"rougeL {all_.get('rougeL', float('nan')):.2f} loss {all_['loss']:.4f}")
    bar.close()
    return state, results


def _summarise(metrics: list[dict], seconds: float, step: int) -> dict:
    """Averages a window of per-step metrics; raises TrainingDiverged on a NaN / inf loss."""
    losses = np.array([m["loss"] for m in metrics], np.float64)
    if not np.all(np.isfinite(losses)):
        bad = step - len(losses) + 1 + int(np.argmin(np.isfinite(losses)))
        raise TrainingDiverged(
            f"loss became {losses[~np.isfinite(losses)][0]} at step {bad}. Lower the learning rate, add warmup or "
            "gradient clipping (adamw.global_norm_clip / adafactor.global_norm_clip), or use float32 activations "
            "(T5Config.dtype='float32'). Checkpoints before the divergence are kept in MODEL_DIR.")
    tokens = float(np.sum([m["target_tokens"] for m in metrics]))
    return {
        "loss": float(np.mean(losses)),
        "z_loss": float(np.mean([m["z_loss"] for m in metrics])),
        "accuracy": float(np.mean([m["accuracy"] for m in metrics])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in metrics])),
        "learning_rate": float(metrics[-1]["learning_rate"]),
        "steps_per_sec": len(metrics) / max(seconds, 1e-9),
        "target_tokens_per_sec": tokens / max(seconds, 1e-9),
    }


