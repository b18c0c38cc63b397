"""Orbax checkpoints under MODEL_DIR: the train state and the input pipeline's position, saved together.

Layout: `MODEL_DIR/checkpoints/<step>/{state,dataset}`. `state` is the train state pytree (step, params,
optimizer state) restored straight into its shardings; `dataset` is a small JSON record of how many batches the
input pipeline has produced, so a resumed run continues with the batch an uninterrupted run would have seen.
Saving is asynchronous (training continues while the files are written); the last `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint in MODEL_DIR was written for another model (shapes or parameter names differ)."""


class Checkpointer:
    """Periodic async saves, keep-last-N, and restore-latest for one MODEL_DIR.

    Args:
      model_dir: the run's directory; checkpoints go to `model_dir/checkpoints`.
      period: save every this many steps (and always at the end of training, via `save(force=True)`).
      keep: how many recent checkpoints to keep (None keeps all).
      use_async: write in a background thread.
    """

    def __init__(self, model_dir: str, period: int, keep: int | None = 3, use_async: bool = True):
        self.directory = os.path.join(os.path.abspath(model_dir), "checkpoints")
        self.period = period
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=use_async, create=True)
        # Handlers are given up front so a fresh manager can read metadata before the first save / restore.
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "dataset": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return self.period > 0 and step % self.period == 0

    def save(self, step: int, state: Any, dataset_position: dict) -> bool:
        """Starts writing a checkpoint for `step` (returns at once when async). Skips steps already saved."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), dataset=ocp.args.JsonSave(dataset_position)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStruct leaves).

        Raises CheckpointMismatchError naming the parameters whose names or shapes differ.
        """
        self._check_compatible(step, abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), dataset=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["dataset"] or {})

    def _check_compatible(self, step: int, abstract_state: Any) -> None:
        check_compatible(self._manager.item_metadata(step)["state"], abstract_state,
                         f"checkpoint {self.directory}/{step}")

    def wait(self) -> None:
        """Blocks until pending async writes are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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
    into the shapes, dtypes and shardings of `abstract_params` (ShapeDtypeStruct leaves)."""
    if os.path.isdir(os.path.join(path, "checkpoint")):
        path = os.path.join(path, "checkpoint")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"initial checkpoint {path} does not exist; pass the output folder of "
                                "`python -m itjax.convert` (it holds checkpoint/ and model.gin).")
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        check_compatible(getattr(metadata, "item_metadata", metadata), abstract_params, f"initial checkpoint {path}")
        return checkpointer.restore(path, abstract_params)


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


