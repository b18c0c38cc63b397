"""The training run: `train()`, the gin configurable that the command line (`itjax.train`) calls.

It checks the configuration, builds the trainer, restores or initialises the state, and runs the loop with
periodic logging, checkpoints and evaluation, ending with an evaluation table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Mapping

import gin
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from itjax import config as config_lib
from itjax import dry_run as dry_run_lib
from itjax import eval_specs
from itjax import flops
from itjax import optimizers  # noqa: F401  (registers gin configurables)
from itjax import peft as peft_lib  # noqa: F401  (registers the peft gin configurables)
from itjax.checkpoints import (Checkpointer, CheckpointCorruptError, CheckpointWriteError, DataPositionError,
                               restore_initial_params, restore_peft_base)
from itjax.data import mixing  # noqa: F401  (registers the gin configurable `mixture`)
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
        epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
        # One probe file per process: hosts of a multi-process run share MODEL_DIR.
        probe = epath.Path(model_dir) / f".write_test.{os.getpid()}.{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise config_lib.ConfigError(f"MODEL_DIR={model_dir!r} is not writable ({e.strerror or e}); pass "
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
def train(*, model_dir: str | None = None, mixture_or_task_name: str | None = None,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED, train_steps: int | None = None,
          batch_size: int = gin.REQUIRED, model=gin.REQUIRED, optimizer=gin.REQUIRED,
          learning_rate_fn: Callable | float | None = None, partitioner: Partitioner | None = None,
          num_microbatches: int = 1, pack: bool = True, random_seed: int = 0, checkpoint_period: int = 1000,
          keep_checkpoints: int | None = 3, async_checkpointing: bool = True, eval_period: int = 1000,
          eval_split: str = "validation", eval_batch_size: int | None = None, eval_num_examples: int | None = None,
          max_decode_length: int | None = None, log_period: int = 20, initial_checkpoint_path: str | None = None,
          peft=None, on_nonfinite_loss: str = "stop", max_consecutive_skips: int = 10,
          on_checkpoint_error: str = "stop", reset_data_position: bool = False,
          step_timeout_s: float | None = None, peak_flops_per_device: float | None = None,
          extra_evals: Mapping | None = None, progress: bool = True, dry_run: bool = False) -> dict:
    """Trains, checkpoints and evaluates; returns the last evaluation's {task: metrics}.

    Args:
      model_dir: run directory (checkpoints/, metrics.jsonl, predictions/, tensorboard/, config.gin). Required,
        as are mixture_or_task_name and train_steps, except in a dry run (which needs only the model and shapes:
        task_feature_lengths, batch_size; without a task it checks neither feature lengths nor vocabulary).
      mixture_or_task_name: registered seqio task or mixture to train on.
      task_feature_lengths: e.g. {'inputs': 256, 'targets': 32} (tokens).
      train_steps: total optimizer steps (a resumed run continues up to this).
      batch_size: global batch size in examples (packed rows when pack=True).
      model: the model (gin MODEL): an itjax.models.base.BaseModel such as EncoderDecoderModel or DecoderOnlyModel.
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
      on_nonfinite_loss: 'stop' (raise TrainingDiverged at the next log line) or 'skip' (a step with a NaN / inf
        loss or gradient leaves parameters and optimizer state unchanged; counted as `skipped_steps` in
        metrics.jsonl; checked every log_period steps).
      max_consecutive_skips: with 'skip', this many skipped steps in a row stop the run (TrainingDiverged).
      on_checkpoint_error: 'stop' (a failed checkpoint write ends the run with its path and cause) or 'continue'
        (log it and train on); earlier checkpoints stay intact either way.
      reset_data_position: resume with a new data shuffle instead of the checkpoint's input position (needed
        when the number of processes, the batch size or the data settings changed since the checkpoint).
      step_timeout_s: a watchdog: when no training step finishes for this long (evaluation and checkpoint writes
        excluded), the process reports it and exits with status 3 instead of waiting forever (a hung peer
        blocks every collective). None: no watchdog. Dead or stopped peers are also caught by jax.distributed's
        heartbeats (`python -m itjax.train --heartbeat_timeout_s`).
      peak_flops_per_device: the FLOP/s that `mfu` divides by. None: the chip's dense bf16 peak from
        `itjax.flops.PEAK_BF16_FLOPS` (TPU v4-v6e, A100, H100, H200), or on a CPU a float32 GEMM measured at start.
      extra_evals: more eval mixtures, each at its own cadence and at the end: {mixture: period} or
        {mixture: {'period', 'split', 'task_feature_lengths', 'batch_size', 'max_decode_length', 'num_examples'}}
        (left-out settings: the main evaluation's; split: eval_split if the mixture has it, else 'validation', else
        'test'), or a list of {'mixture': name, ...} (itjax.eval_specs.parse_extra_evals). Their metrics.jsonl
        lines name their `"mixture"` (as every eval line does); predictions go to predictions/<mixture>/.
    """
    if on_nonfinite_loss not in ("stop", "skip"):
        raise config_lib.ConfigError(f"train.on_nonfinite_loss={on_nonfinite_loss!r}: use 'stop' or 'skip'.")
    if on_checkpoint_error not in ("stop", "continue"):
        raise config_lib.ConfigError(f"train.on_checkpoint_error={on_checkpoint_error!r}: use 'stop' or "
                                     "'continue'.")
    missing = [f"train.{arg} (gin macro {macro})" for arg, macro, value in (
        ("model_dir", "MODEL_DIR", model_dir), ("mixture_or_task_name", "MIXTURE_OR_TASK_NAME", mixture_or_task_name),
        ("train_steps", "TRAIN_STEPS", train_steps)) if value is None]
    if missing and not dry_run:
        raise config_lib.ConfigError(f"{', '.join(missing)} not set: a training run needs them (only --dry_run "
                                     "does without).")
    partitioner = partitioner or Partitioner()
    task = pipeline.get_mixture_or_task(mixture_or_task_name) if mixture_or_task_name is not None else None
    if task is not None:
        pipeline.check_feature_lengths(task, task_feature_lengths)
    divisor = partitioner.batch_divisor * num_microbatches
    if batch_size % divisor:
        raise config_lib.ConfigError(
            f"BATCH_SIZE={batch_size} must be a multiple of (batch-sharded devices {partitioner.batch_divisor}) x "
            f"(num_microbatches {num_microbatches}) = {divisor}.")
    if task is not None:
        _check_vocabulary(task, model)
    extra_specs = []
    if extra_evals and task is not None:
        main_eval = eval_specs.EvalSpec(mixture_or_task_name, eval_split, dict(task_feature_lengths),
                                        eval_batch_size or batch_size, max_decode_length, eval_num_examples)
        extra_specs = eval_specs.parse_extra_evals(extra_evals, main=main_eval, eval_period=eval_period)
    log.info("Mesh %s, %d devices, %d process(es).", dict(partitioner.mesh.shape), jax.device_count(),
             jax.process_count())
    peft_lib.quantization.check_quantization_bindings(peft)
    if peft is not None:
        peft.check(task_feature_lengths, pack, task)
    trainer = Trainer(model, optimizer, partitioner, learning_rate_fn=learning_rate_fn, peft=peft,
                      num_microbatches=num_microbatches, seed=random_seed,
                      skip_nonfinite_updates=on_nonfinite_loss == "skip")
    log.info(trainer.summary())
    if dry_run:
        figures = dry_run_lib.report(trainer, task_feature_lengths, batch_size, pack)
        print(dry_run_lib.format_report(figures), flush=True)
        return figures
    _check_model_dir(model_dir)
    checkpointer = Checkpointer(model_dir, checkpoint_period, keep_checkpoints, async_checkpointing)
    data_spec = {"mixture_or_task_name": mixture_or_task_name, "task_feature_lengths": dict(task_feature_lengths),
                 "pack": bool(pack), "batch_size": int(batch_size)}

    def build_batches(step: int = 0, fresh_shuffle: bool = False, skip: int = 0) -> pipeline.TrainBatches:
        # fresh_shuffle (train.reset_data_position): a new shuffle seeded by the step, not the start of the stream.
        ds = pipeline.train_dataset(mixture_or_task_name, task_feature_lengths, batch_size,
                                    model.feature_converter_cls(
                                        pack=pack, **peft_lib.core.feature_converter_kwargs(peft, pack)),
                                    seed=random_seed + step if fresh_shuffle else random_seed, skip_batches=skip)
        batches = pipeline.TrainBatches(ds)
        batches.batches_consumed = step
        return batches

    def attempt(step: int):
        """Restores checkpoint `step`: (state, batches positioned after it (None when not training further),
        base pointer). Raises on an unreadable checkpoint (restore_latest_good then tries an older one)."""
        base_pointer = None
        if peft is not None:
            base_pointer = restore_peft_base(trainer, initial_checkpoint_path, checkpointer.saved_base_pointer(step))
        position = checkpointer.saved_position(step)
        batches, restore_batches = None, None
        if step < train_steps:
            batches, restore_batches = _resumed_batches(checkpointer, step, position, data_spec, reset_data_position,
                                                        build_batches)
        state, _ = checkpointer.restore(step, trainer.abstract_state, restore_batches)
        if int(state["step"]) != step:
            raise CheckpointCorruptError(f"its train state is at step {int(state['step'])}, not {step}")
        return state, batches, base_pointer

    restored = checkpointer.restore_latest_good(attempt)
    if restored is None:
        start_step = 0
        if peft is not None:
            checkpointer.base_pointer = restore_peft_base(trainer, initial_checkpoint_path)
        state = trainer.init_state()  # with peft: the adapter, on the base just loaded
        from itjax.conversion import peft_import  # a folder of itjax.convert --peft_adapter: its adapter too
        if initial_checkpoint_path and peft is not None and peft_import.has_adapter(initial_checkpoint_path):
            state["params"] = peft_import.restore_initial_adapter(initial_checkpoint_path,
                                                                  trainer.abstract_state["params"])
            log.info("Initial adapter from %s.", initial_checkpoint_path)
        if initial_checkpoint_path and peft is None:
            state["params"] = restore_initial_params(initial_checkpoint_path, trainer.abstract_state["params"])
            log.info("Initial weights from %s.", initial_checkpoint_path)
        batches = build_batches() if train_steps > 0 else None
    else:
        start_step, (state, batches, checkpointer.base_pointer) = restored
        log.info("Restored checkpoint at step %d from %s.", start_step, checkpointer.directory)
        print(f"Restored checkpoint at step {start_step} from {checkpointer.directory}", flush=True)

    writer = MetricsWriter(model_dir)

    def make_evaluation() -> Evaluation:
        return Evaluation(mixture_or_task_name, model.feature_converter_cls, task_feature_lengths,
                          eval_batch_size or batch_size, eval_split, model_dir, writer,
                          max_decode_length=max_decode_length, num_examples=eval_num_examples,
                          batch_divisor=partitioner.batch_divisor)

    def make_extra_evaluations() -> list[tuple[int, Evaluation]]:
        return [(spec.period, Evaluation(spec.mixture_or_task_name, model.feature_converter_cls,
                                         spec.task_feature_lengths, spec.batch_size, spec.split, model_dir, writer,
                                         max_decode_length=spec.max_decode_length, num_examples=spec.num_examples,
                                         batch_divisor=partitioner.batch_divisor,
                                         output_name=spec.mixture_or_task_name)) for spec in extra_specs]
    if jax.process_index() == 0:
        config_lib.save_operative_config(model_dir)

    def position(step: int) -> dict:
        return {"batches_consumed": step, "process_count": jax.process_count(), **data_spec}

    def save(step: int, state, batches) -> None:
        try:
            checkpointer.save(step, state, position(step), batches)
        except CheckpointWriteError as e:
            if on_checkpoint_error == "stop":
                raise
            log.warning("%s; training continues (train.on_checkpoint_error='continue').", e)

    results, preempted = None, None
    if start_step < train_steps:
        loop = _TrainLoop(trainer, checkpointer, make_evaluation(), writer, save, eval_period=eval_period,
                          log_period=log_period, progress=progress, on_nonfinite_loss=on_nonfinite_loss,
                          max_consecutive_skips=max_consecutive_skips, peak_flops_per_device=peak_flops_per_device,
                          extra_evaluations=make_extra_evaluations())
        with _PreemptionWatch() as preemption, _StepWatchdog(step_timeout_s) as watchdog:
            state, results, preempted = loop.run(state, batches, start_step, train_steps, preemption, watchdog)
    else:
        print(f"Already trained to step {start_step} >= TRAIN_STEPS={train_steps}.", flush=True)
        results = _logged_results(model_dir, start_step, eval_split, mixture_or_task_name)
    step = int(state["step"])
    if preempted:
        save(step, state, batches)
        checkpointer.close()
        writer.close()
        print(f"Preempted ({preempted}) at step {step}: checkpoint {step} saved in {checkpointer.directory}. "
              "Rerun the same command to resume.", flush=True)
        return {}
    if results is None:
        results = make_evaluation().run(trainer, state["params"], step)
    save(step, state, batches)
    checkpointer.close()
    writer.close()
    if results:  # (empty on processes > 0 of a rerun: the logged evaluation is read by process 0)
        print(f"\nEvaluation at step {step} ({eval_split}):\n{format_table(results)}", flush=True)
    return results


def _resumed_batches(checkpointer: Checkpointer, step: int, position: dict, data_spec: dict,
                     reset_data_position: bool, build_batches) -> tuple[pipeline.TrainBatches, object]:
    """The training batches of a run resumed at `step`: (batches, the same object if the checkpoint's iterator
    state is to be restored into it, else None).

    The saved position is used when the run's data and topology are those it was saved with; otherwise
    DataPositionError names both, unless `reset_data_position` (then a fresh shuffle starts at this step).
    Checkpoints written before iterator states were saved are positioned by replaying `step` batches (slow).
    """
    saved = {k: position.get(k) for k in ("process_count", *data_spec)}
    now = {"process_count": jax.process_count(), **data_spec}
    changed = {k: (saved[k], now[k]) for k in now if saved[k] is not None and saved[k] != now[k]}
    if reset_data_position:
        log.warning("train.reset_data_position=True: the data stream restarts with a new shuffle at step %d.", step)
        return build_batches(step, fresh_shuffle=True), None
    if changed:
        diff = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise DataPositionError(
            f"checkpoint {checkpointer.path(step)} holds the input position of another data / process setup "
            f"({diff}). Resume with the saved setup, or set --gin.train.reset_data_position=True to restart the "
            "data stream (a new shuffle) at this step.")
    if not checkpointer.has_iterator_state(step):
        log.warning("Checkpoint %d has no input-iterator state (written by an older itjax): replaying %d batches "
                    "to reach its data position.", step, step)
        return build_batches(step, skip=step), None
    batches = build_batches(step)
    return batches, batches


class _PreemptionWatch:
    """Notices a preemption: SIGTERM / SIGINT on a single process; with several processes, JAX's preemption sync
    point (jax.distributed installs its own SIGTERM notifier and all processes agree on the step to save at).
    Use as a context manager around the loop; `reached(step)` is called once per step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name

    def reached(self, step: int) -> str | None:
        if jax.process_count() > 1:
            return "preemption notice" if multihost_utils.reached_preemption_sync_point(step) else None
        return self.signal_name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _StepWatchdog:
    """Exits the process (status 3, one clear line on stderr) when no training step finishes for `timeout_s`
    seconds outside `paused()` sections. A background thread checks; the first step (compilation) is exempt."""

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self._last, self._step, self._paused = None, None, 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.timeout_s:
            self._thread = threading.Thread(target=self._watch, name="itjax-step-watchdog", daemon=True)
            self._thread.start()
        return self

    def step_finished(self, step: int) -> None:
        self._last, self._step = time.monotonic(), step

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            if self._last is not None:
                self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            if self._last is None or self._paused:
                continue
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(f"error: no training step finished for {idle:.0f} s after step {self._step} "
                      f"(train.step_timeout_s={self.timeout_s}) on process {jax.process_index()}: another process "
                      "probably hangs or died. Exiting; rerun to resume from the last checkpoint.",
                      file=sys.stderr, flush=True)
                os._exit(3)

    def __exit__(self, *exc) -> None:
        self._stop.set()


def _logged_results(model_dir: str, step: int, split: str, mixture: str | None = None) -> dict | None:
    """The evaluation of `step` on `split` that MODEL_DIR/metrics.jsonl already holds ({task: metrics}), so a rerun
    of a finished run neither evaluates again nor appends duplicate rows; None if absent. Lines naming another
    `mixture` (extra eval mixtures) are not the run's evaluation; lines naming none (older itjax) are. Process 0's
    answer is used by every process (evaluation runs collectives: all evaluate or none)."""
    results = {}
    path = os.path.join(model_dir, "metrics.jsonl")
    if jax.process_index() == 0 and epath.Path(path).is_file():
        for line in epath.Path(path).read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if (record.get("step") == step and record.get("split") == split and "task" in record
                    and (mixture is None or record.get("mixture", mixture) == mixture)):
                task = record.pop("task")
                results[task] = {k: v for k, v in record.items() if k not in ("step", "split", "mixture")}
    found = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(results))))
    if not found:
        return None
    if jax.process_index() != 0:
        return {}  # only process 0 prints the table
    print(f"Evaluation of step {step} from {path}.", flush=True)
    return results


class _TrainLoop:
    """Steps start_step+1 .. train_steps with logging, checkpoints, evaluation, the non-finite-loss policy and
    preemption. `run` returns (state, results of an eval at the final step or None, preemption reason or None)."""

    def __init__(self, trainer: Trainer, checkpointer: Checkpointer, evaluation: Evaluation, writer: MetricsWriter,
                 save: Callable, *, eval_period: int, log_period: int, progress: bool, on_nonfinite_loss: str,
                 max_consecutive_skips: int, peak_flops_per_device: float | None = None,
                 extra_evaluations: list[tuple[int, Evaluation]] = ()):
        self.trainer, self.checkpointer, self.evaluation, self.writer, self.save = (
            trainer, checkpointer, evaluation, writer, save)
        self.eval_period, self.log_period, self.progress = eval_period, log_period, progress
        self.on_nonfinite_loss, self.max_consecutive_skips = on_nonfinite_loss, max_consecutive_skips
        self.consecutive_skips = 0
        self.throughput = None  # a _Throughput, made from the first batch's shapes
        self.peak_flops_per_device = peak_flops_per_device
        self.extra_evaluations = list(extra_evaluations)  # (period, Evaluation): train.extra_evals

    def run(self, state, batches: pipeline.TrainBatches, start_step: int, train_steps: int,
            preemption: _PreemptionWatch, watchdog: "_StepWatchdog"):
        from tqdm.auto import tqdm

        bar = tqdm(total=train_steps, initial=start_step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True, mininterval=0.5)
        pending, results, window_start = [], None, time.time()
        sharding = self.trainer.partitioner.batch_sharding
        step, preempted = start_step, None
        while step < train_steps:
            batch = pipeline.to_global(next(batches), sharding, host_local=True)
            if self.throughput is None:
                self.throughput = _Throughput(self.trainer, batch, self.peak_flops_per_device)
            state, metrics = self.trainer.train_step(state, batch)
            step += 1
            pending.append(metrics)
            bar.update(1)
            watchdog.step_finished(step)
            preempted = preemption.reached(step)
            if step % self.log_period == 0 or step == train_steps or preempted:
                window = jax.device_get(pending)
                summary = self._summarise(window, time.time() - window_start, step)
                summary.update(self.throughput.summary(window, time.time() - window_start))
                pending, window_start = [], time.time()
                bar.set_postfix(loss=f"{summary['loss']:.4f}", acc=f"{summary['accuracy']:.3f}",
                                tok_s=f"{summary['tokens_per_second']:,.0f}", mfu=f"{summary['mfu']:.1%}")
                self.writer.write({"step": step, "split": "train", "task": "all", **summary})
            if preempted:
                break
            if self.checkpointer.should_save(step) or step == train_steps:
                with watchdog.paused():
                    self.save(step, state, batches)
            if (self.eval_period and step % self.eval_period == 0) or step == train_steps:
                with watchdog.paused():
                    results = self.evaluation.run(self.trainer, state["params"], step)
                all_ = results["all"]
                bar.write(f"step {step}: eval exact_match {all_.get('exact_match', float('nan')):.2f} "
                          f"rougeL {all_.get('rougeL', float('nan')):.2f} loss {all_['loss']:.4f}")
            for period, evaluation in self.extra_evaluations:
                if (period and step % period == 0) or step == train_steps:
                    with watchdog.paused():
                        extra = evaluation.run(self.trainer, state["params"], step)["all"]
                    bar.write(f"step {step}: eval {evaluation.mixture_name} ({evaluation.split}) "
                              + " ".join(f"{k} {v:.4f}" for k, v in extra.items() if k != "num_examples"))
            if not pending:  # just logged: checkpoint and evaluation time stays out of the next window's rates
                window_start = time.time()
        bar.close()
        return state, results, preempted

    def _summarise(self, metrics: list[dict], seconds: float, step: int) -> dict:
        """The window's summary; with 'skip', counts skipped steps in a row across windows and raises
        TrainingDiverged at `max_consecutive_skips`."""
        skip = self.on_nonfinite_loss == "skip"
        if skip:
            for m in metrics:
                self.consecutive_skips = self.consecutive_skips + 1 if m.get("skipped", 0) else 0
                if self.consecutive_skips >= self.max_consecutive_skips:
                    raise TrainingDiverged(
                        f"{self.consecutive_skips} consecutive steps up to step {step} had a NaN / inf loss or "
                        f"gradient and were skipped (train.max_consecutive_skips={self.max_consecutive_skips}). "
                        + _ADVICE)
        return _summarise(metrics, seconds, step, skip_nonfinite=skip)


class _Throughput:
    """Tokens and model FLOPs per second of a log window (`itjax.flops`): tokens_per_second (non-padding input +
    target tokens), packing_efficiency (their share of the token slots), model_tflops_per_second_per_device and
    mfu (against the device's peak)."""

    def __init__(self, trainer: Trainer, batch: Mapping[str, jax.Array], peak_flops_per_device: float | None):
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        self.flops_per_step = trainer.train_step_flops(shapes)
        self.token_slots = sum(math.prod(shapes[k]) for k in ("encoder_input_tokens", "decoder_target_tokens")
                               if k in shapes)
        self.num_devices = trainer.partitioner.mesh.size
        self.peak, source = flops.peak_flops_per_device(cpu_peak=peak_flops_per_device)
        log.info("Model FLOPs per train step: %.4g; peak %.4g FLOP/s per device (%s).", self.flops_per_step,
                 self.peak, source)

    def summary(self, window: list[dict], seconds: float) -> dict:
        seconds = max(seconds, 1e-9)
        text_tokens = float(np.sum([m["text_tokens"] for m in window]))
        tflops = self.flops_per_step * len(window) / seconds / self.num_devices / 1e12
        return {"tokens_per_second": text_tokens / seconds,
                "packing_efficiency": text_tokens / max(self.token_slots * len(window), 1),
                "model_tflops_per_second_per_device": tflops,
                "mfu": tflops * 1e12 / self.peak}


def _summarise(metrics: list[dict], seconds: float, step: int, *, skip_nonfinite: bool = False) -> dict:
    """Averages a window of per-step metrics. A NaN / inf loss raises TrainingDiverged, unless the trainer skipped
    those updates (skip_nonfinite: then the averages are over the finite steps, and `skipped_steps` counts the
    others)."""
    losses = np.array([m["loss"] for m in metrics], np.float64)
    finite = np.isfinite(losses)
    if not skip_nonfinite and not np.all(finite):
        bad = step - len(losses) + 1 + int(np.argmin(finite))
        raise TrainingDiverged(f"loss became {losses[~finite][0]} at step {bad}. " + _ADVICE)
    kept = [m for m, ok in zip(metrics, finite) if ok] or metrics
    tokens = float(np.sum([m["target_tokens"] for m in metrics]))
    summary = {
        "loss": float(np.mean([m["loss"] for m in kept])),
        "z_loss": float(np.mean([m["z_loss"] for m in kept])),
        "accuracy": float(np.mean([m["accuracy"] for m in kept])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in kept])),
        "learning_rate": float(metrics[-1]["learning_rate"]),
        "steps_per_sec": len(metrics) / max(seconds, 1e-9),
        "target_tokens_per_sec": tokens / max(seconds, 1e-9),
    }
    if skip_nonfinite:
        summary["skipped_steps"] = int(sum(int(m.get("skipped", 0)) for m in metrics))
    return summary


_ADVICE = ("Lower the learning rate, add warmup or gradient clipping (adamw.global_norm_clip / "
           "adafactor.global_norm_clip), or use float32 activations (T5Config.dtype='float32'). Checkpoints before "
           "the divergence are kept in MODEL_DIR.")
