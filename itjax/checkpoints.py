"""Orbax checkpoints under MODEL_DIR: the train state and the input pipeline's position, saved together.

Layout: `MODEL_DIR/checkpoints/<step>/{state,dataset,data_iterator[,base]}`:
- `state`: the train state pytree (step, params, optimizer state), restored straight into its shardings;
- `dataset`: a small JSON record of the input position: `{"batches_consumed", "process_count", "batch_size"}`;
- `data_iterator`: each process's tf.data iterator state, `process_<i>-of-<n>.{index,data-*}`
  (`itjax.data.pipeline.TrainBatches`), so a resumed run continues with the next batch without re-reading data;
- `base` (parameter-efficient runs only): a JSON pointer to the frozen weights (see `restore_peft_base`).
Saving is asynchronous for `state` (training continues while the arrays are written; the small items are written
before `save` returns, so the iterator state is exactly that of the step). Orbax writes each checkpoint into a
temporary folder and renames it when complete, so a crash or a failed write never leaves a folder that looks like
a checkpoint; the last `keep` checkpoints are kept.

A checkpoint that turns out unreadable at restore (truncated or missing array files, missing metadata, an
unreadable item) is reported, and the run resumes from the newest one that restores; the bad ones are then moved
to `MODEL_DIR/checkpoints/corrupt/<step>` (never deleted). Paths may be local or URLs (`gs://...`): orbax and
tf.io handle both.

Parameter-efficient runs (`train.peft`) save only the adapter state plus `base`, a JSON pointer to the frozen
weights: `{"path": the initial checkpoint (None = fresh from "seed"), "seed", "fingerprint": {param path: {"shape",
"abs_sum"}}}`. `restore_peft_base` reloads the base from it and refuses a base whose shapes (or values) differ.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from itjax import param_paths

log = logging.getLogger("itjax")

STATE_ITEM, POSITION_ITEM, ITERATOR_ITEM, BASE_ITEM = "state", "dataset", "data_iterator", "base"
CORRUPT_DIR = "corrupt"


class CheckpointMismatchError(ValueError):
    """The checkpoint in MODEL_DIR was written for another model (shapes or parameter names differ)."""


class CheckpointCorruptError(RuntimeError):
    """No checkpoint in MODEL_DIR could be restored (each one's reason is in the message); nothing was moved."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permission lost, ...); earlier checkpoints are intact."""


class DataPositionError(ValueError):
    """The checkpoint's input position cannot be restored in this run's topology (process count, batch size)."""


def absolute(path: str) -> str:
    """An absolute form of a local path; URLs (`gs://bucket/run`) are returned as they are."""
    return path if "://" in str(path) else os.path.abspath(path)


# ------------------------------------------------------------------------------------- input-iterator item
class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves / restores each process's tf.data iterator (`pipeline.TrainBatches`) as `process_<i>-of-<n>.*`."""

    @staticmethod
    def _prefix(directory: epath.Path) -> str:
        return str(directory / f"process_{jax.process_index()}-of-{jax.process_count()}")

    def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
        args.batches.save(self._prefix(directory))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
        prefix = self._prefix(directory)
        if not epath.Path(prefix + ".index").exists():
            saved = sorted({p.name.split(".")[0] for p in epath.Path(directory).iterdir()
                            if p.name.startswith("process_")})
            raise DataPositionError(
                f"{directory} holds the input position of {', '.join(saved) or 'no process'}, not of "
                f"process_{jax.process_index()}-of-{jax.process_count()}: the run was saved with another number of "
                "processes. Resume with that topology, or set train.reset_data_position=True to restart the data "
                "stream (from a new shuffle) at this step.")
        args.batches.restore(prefix, args.batches_consumed)
        return args.batches

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    batches: Any  # pipeline.TrainBatches


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    batches: Any  # pipeline.TrainBatches, freshly built, to be positioned
    batches_consumed: int = 0


# ------------------------------------------------------------------------------------------ Checkpointer
class Checkpointer:
    """Periodic async saves, keep-last-N, and restore of the newest good checkpoint for one MODEL_DIR.

    Args:
      model_dir: the run's directory (local or `gs://...`); checkpoints go to `model_dir/checkpoints`.
      period: save every this many steps (the training loop also saves at the end and on preemption).
      keep: how many recent checkpoints to keep (None keeps all).
      use_async: write the train state in a background thread.
    """

    def __init__(self, model_dir: str, period: int, keep: int | None = 3, use_async: bool = True):
        self.directory = os.path.join(absolute(model_dir), "checkpoints")
        self.period = period
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=use_async, create=True)
        # Handlers are given up front so a fresh manager can read metadata before the first save / restore.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(), POSITION_ITEM: ocp.JsonCheckpointHandler(),
            ITERATOR_ITEM: DataIteratorHandler(), BASE_ITEM: ocp.JsonCheckpointHandler()})
        # peft runs: the base-weights pointer written with every checkpoint (see restore_peft_base).
        self.base_pointer: dict | None = None
        self._in_flight: int | None = None  # the step whose async write may still be running

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """The checkpointed steps, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.period > 0 and step % self.period == 0

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state: Any, position: dict, batches=None) -> bool:
        """Starts writing a checkpoint of `step` (returns once the train state is copied off the devices, when
        async). `position` is the JSON input-position record; `batches` (a `pipeline.TrainBatches`) has its
        iterator state saved too. Skips steps already saved. Raises CheckpointWriteError (path and cause) when
        this write, or the previous async one, fails."""
        self._raise_if_failed()
        if step in self._manager.all_steps():
            return False
        items = {STATE_ITEM: ocp.args.StandardSave(state), POSITION_ITEM: ocp.args.JsonSave(position)}
        if batches is not None:
            items[ITERATOR_ITEM] = DataIteratorSave(batches)
        if self.base_pointer is not None:
            items[BASE_ITEM] = ocp.args.JsonSave(self.base_pointer)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001  (any failure of the write is reported the same way)
            self._forget_failed_write()
            raise CheckpointWriteError(f"saving checkpoint {step} to {self.path(step)} failed: "
                                       f"{type(e).__name__}: {e}") from e
        self._in_flight = step
        return saved

    def wait(self) -> None:
        """Blocks until the async write in flight is on disk; raises CheckpointWriteError if it failed."""
        self._raise_if_failed(wait=True)

    def _raise_if_failed(self, wait: bool = False) -> None:
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        try:
            if wait:
                self._manager.wait_until_finished()
            else:
                self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._forget_failed_write()
            raise CheckpointWriteError(f"writing checkpoint {step} to {self.path(step)} failed: "
                                       f"{type(e).__name__}: {e}") from e

    def _forget_failed_write(self) -> None:
        """After a failed write, the step list is re-read from disk: the failed step (left, if at all, as orbax's
        temporary folder) is not a checkpoint, so neither this run nor a later one will restore it."""
        try:
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001  (already reported)
            pass
        self._manager.reload()

    def saved_base_pointer(self, step: int) -> dict | None:
        """The base-weights pointer of a peft checkpoint; None for a full-model checkpoint."""
        if not epath.Path(self.path(step), BASE_ITEM).exists():
            return None
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            **{BASE_ITEM: ocp.args.JsonRestore()}))[BASE_ITEM])

    def saved_position(self, step: int) -> dict:
        """The JSON input-position record of `step` ({} when absent)."""
        if not epath.Path(self.path(step), POSITION_ITEM).exists():
            return {}
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            **{POSITION_ITEM: ocp.args.JsonRestore()}))[POSITION_ITEM] or {})

    def has_iterator_state(self, step: int) -> bool:
        return epath.Path(self.path(step), ITERATOR_ITEM).exists()

    def restore(self, step: int, abstract_state: Any, batches=None) -> tuple[Any, dict]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStruct leaves), and,
        given `batches` (a freshly built `pipeline.TrainBatches`), positions it where the checkpoint's was.

        Raises CheckpointMismatchError naming the parameters whose names or shapes differ, CheckpointCorruptError
        when the state's metadata is missing or unreadable, and whatever orbax / tf raise on unreadable data.
        """
        self._check_compatible(step, abstract_state)
        position = self.saved_position(step)
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        if batches is not None:
            items[ITERATOR_ITEM] = DataIteratorRestore(batches, int(position.get("batches_consumed", step)))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE_ITEM], position

    def _check_compatible(self, step: int, abstract_state: Any) -> None:
        try:
            metadata = self._manager.item_metadata(step)[STATE_ITEM]
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(f"unreadable metadata ({type(e).__name__}: {e})") from e
        if metadata is None or not jax.tree.leaves(metadata, is_leaf=lambda x: hasattr(x, "shape")):
            raise CheckpointCorruptError("the train state's metadata (_METADATA) is missing or empty")
        check_compatible(metadata, abstract_state, f"checkpoint {self.path(step)}")

    def restore_latest_good(self, attempt: Callable[[int], Any]) -> tuple[int, Any] | None:
        """Restores the newest checkpoint that `attempt(step)` restores without error; None without checkpoints.

        `attempt` restores one step (and may raise). A failure is a bad checkpoint, except CheckpointMismatchError
        / DataPositionError (the configuration is at fault: raised at once) and MemoryError. Bad checkpoints newer
        than the good one are each named in one warning and moved to `checkpoints/corrupt/` once a good one is
        found; if none restores, CheckpointCorruptError lists every step's reason and nothing is moved. All
        processes agree (a step is good only if it restored on every process).
        """
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                result, error = attempt(step), None
            except (CheckpointMismatchError, DataPositionError, MemoryError):
                raise
            except Exception as e:  # noqa: BLE001  (any unreadable item makes the checkpoint bad)
                result, error = None, f"{type(e).__name__}: {_first_line(e)}"
            if not _all_processes_ok(error is None):
                error = error or "could not be restored on another process"
                log.warning("Checkpoint %d at %s cannot be restored (%s); trying an older one.", step,
                            self.path(step), error)
                failures.append((step, error))
                continue
            for bad, reason in failures:
                self._move_aside(bad, reason)
            return step, result
        if failures:
            lines = [f"no checkpoint in {self.directory} could be restored:"]
            lines += [f"  step {bad}: {reason}" for bad, reason in failures]
            lines.append("Nothing was moved or deleted. If these checkpoints are beyond repair, move them out of "
                         "the way (or use a new MODEL_DIR) to start from scratch.")
            raise CheckpointCorruptError("\n".join(lines))
        return None

    def _move_aside(self, step: int, reason: str) -> None:
        """Moves a bad checkpoint to checkpoints/corrupt/<step>[.N] (process 0; all processes wait)."""
        if jax.process_index() == 0:
            corrupt = epath.Path(self.directory) / CORRUPT_DIR
            corrupt.mkdir(parents=True, exist_ok=True)
            target, n = corrupt / str(step), 1
            while target.exists():
                target, n = corrupt / f"{step}.{n}", n + 1
            epath.Path(self.path(step)).rename(target)
            (target.parent / f"{target.name}.reason.txt").write_text(
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n")
            log.warning("Moved unreadable checkpoint %d to %s.", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"itjax_move_aside_{step}")
        self._manager.reload()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _all_processes_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def check_compatible(saved_metadata: Any, abstract: Any, where: str) -> None:
    """Raises CheckpointMismatchError listing parameters whose names or shapes differ between a checkpoint's
    metadata tree and the configured (abstract) tree."""
    saved = {_path_str(p): tuple(getattr(m, "shape", ())) for p, m in _flatten(saved_metadata)}
    wanted = {_path_str(p): tuple(np.shape(x)) for p, x in _flatten(abstract)}
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    if not (missing or unexpected or reshaped):
        return
    lines = [f"{where} does not match the configured model:"]
    lines += [f"  {k}: checkpoint shape {saved[k]} != model shape {wanted[k]}" for k in reshaped[:20]]
    lines += [f"  {k}: in the model, not in the checkpoint" for k in missing[:20]]
    lines += [f"  {k}: in the checkpoint, not in the model" for k in unexpected[:20]]
    lines.append("Use a new MODEL_DIR for a different model, or the gin model file the checkpoint was made "
                 "with (saved as MODEL_DIR/config.gin, or OUT/model.gin for a converted checkpoint).")
    raise CheckpointMismatchError("\n".join(lines))


def restore_initial_params(path: str, abstract_params: Any) -> Any:
    """Restores a params-only checkpoint (the `itjax.convert` output folder, or its `checkpoint/` subfolder)
    into the shapes, dtypes and shardings of `abstract_params` (ShapeDtypeStruct leaves).

    The checkpoint's layer layout may differ from the model's (per layer, `layers/0/...`, as `itjax.convert`
    writes; or stacked, `layers/...` [L, ...], as a `scan_layers` run saves): it is then restored in its own
    layout and stacked / unstacked on device into `abstract_params`' shardings (transiently two copies of the
    stacked parameters).
    """
    if epath.Path(path, "checkpoint").is_dir():
        path = os.path.join(path, "checkpoint")
    if not epath.Path(path).is_dir():
        raise FileNotFoundError(f"initial checkpoint {path} does not exist; pass the output folder of "
                                "`python -m itjax.convert` (it holds checkpoint/ and model.gin).")
    path = absolute(path)
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        saved = getattr(metadata, "item_metadata", metadata)
        saved_stacked, wanted_stacked = _stacked_layout(saved), _stacked_layout(abstract_params)
        relayout = None not in (saved_stacked, wanted_stacked) and saved_stacked != wanted_stacked
        target = abstract_params
        if relayout:
            target = (param_paths.unstack_layers(abstract_params) if wanted_stacked
                      else param_paths.stack_layers(abstract_params, stack=param_paths.stack_abstract))
        check_compatible(saved, target, f"initial checkpoint {path}")
        restored = checkpointer.restore(path, target)
    if not relayout:
        return restored
    convert = param_paths.stack_layers if wanted_stacked else param_paths.unstack_layers
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), abstract_params)
    if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda x: x is None)):
        return jax.jit(convert)(restored)
    return jax.jit(convert, out_shardings=shardings)(restored)


def _stacked_layout(tree: Any) -> bool | None:
    """Whether a parameter tree (arrays or checkpoint metadata) keeps its layer stacks stacked: True for paths
    `.../layers/<name>/...`, False for `.../layers/<i>/...`, None when it has no `layers`."""
    for path, _ in _flatten(tree):
        stack = param_paths.layer_stack(_path_str(path).split("/"))
        if stack is not None:
            return stack[1]
    return None


def _flatten(tree):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]


def _path_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return "/".join(parts)




# ------------------------------------------------------------------------------------------------ peft base
def base_fingerprint(params: Any) -> dict:
    """{param path: {"shape": [...], "abs_sum": float}} of a parameter tree (computed on device, one scalar per
    leaf): enough to tell another base apart without storing or re-reading it."""
    sums = jax.device_get(jax.jit(lambda p: jax.tree.map(lambda x: jnp.sum(jnp.abs(x.astype(jnp.float32))), p))(
        params))
    return {_path_str(p): {"shape": list(np.shape(x)), "abs_sum": float(s)}
            for (p, x), (_, s) in zip(_flatten(params), _flatten(sums))}


def check_base_fingerprint(saved: dict, current: dict, where: str, *, rtol: float = 1e-4) -> None:
    """Raises CheckpointMismatchError naming the base parameters whose shapes (or values) differ from those the
    adapter was trained on. Values are compared through their absolute sums (tolerance for other layouts'
    reduction order)."""
    missing = sorted(set(saved) - set(current))
    unexpected = sorted(set(current) - set(saved))
    reshaped = sorted(k for k in set(saved) & set(current) if list(saved[k]["shape"]) != list(current[k]["shape"]))
    changed = sorted(k for k in set(saved) & set(current) if k not in reshaped
                     and not np.isclose(saved[k]["abs_sum"], current[k]["abs_sum"], rtol=rtol, atol=1e-6))
    if not (missing or unexpected or reshaped or changed):
        return
    lines = [f"{where}: the adapter was trained on another base model:"]
    lines += [f"  {k}: adapter's base shape {tuple(saved[k]['shape'])} != this base {tuple(current[k]['shape'])}"
              for k in reshaped[:20]]
    lines += [f"  {k}: in the adapter's base, not in this base" for k in missing[:20]]
    lines += [f"  {k}: in this base, not in the adapter's base" for k in unexpected[:20]]
    if changed and not (missing or unexpected or reshaped):
        lines += [f"  {k}: same shape, different values" for k in changed[:20]]
    lines.append("Load the base the adapter was trained on (train.initial_checkpoint_path, and the model gin file "
                 "it was made with), or start a new MODEL_DIR.")
    raise CheckpointMismatchError("\n".join(lines))


def restore_peft_base(trainer, initial_checkpoint_path: str | None, saved_pointer: dict | None = None) -> dict:
    """Loads a peft trainer's frozen base into `trainer.base_params`; returns the pointer to save with checkpoints.

    The base comes from `initial_checkpoint_path`, else from the path a resumed checkpoint recorded, else it is
    initialised from the trainer's seed (tests, from-scratch toy runs). With `saved_pointer` (resuming), the loaded
    base must match the fingerprint the adapter was trained on.
    """
    path = initial_checkpoint_path or (saved_pointer or {}).get("path")
    if path:
        base = restore_initial_params(path, trainer.abstract_plain_base_params)
        path = absolute(path)
    else:
        base = trainer.init_plain_base_params()
    pointer = {"path": path, "seed": None if path else trainer.seed, "fingerprint": base_fingerprint(base)}
    if saved_pointer is not None:
        check_base_fingerprint(saved_pointer["fingerprint"], pointer["fingerprint"],
                               f"base {path or f'initialised from seed {trainer.seed}'}")
    trainer.base_params = trainer.prepare_base(base)  # QLoRA: quantized here (the pointer names the float32 base)
    return pointer
