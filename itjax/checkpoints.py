"""Orbax checkpoints under MODEL_DIR: the train state and the input pipeline's position, saved together.

Layout: `MODEL_DIR/checkpoints/<step>/{state,dataset}`. `state` is the train state pytree (step, params,
optimizer state) restored straight into its shardings; `dataset` is a small JSON record of how many batches the
input pipeline has produced, so a resumed run continues with the batch an uninterrupted run would have seen.
Saving is asynchronous (training continues while the files are written); the last `keep` checkpoints are kept.

Parameter-efficient runs (`train.peft`) save only the adapter state plus `base`, a JSON pointer to the frozen
weights: `{"path": the initial checkpoint (None = fresh from "seed"), "seed", "fingerprint": {param path: {"shape",
"abs_sum"}}}`. `restore_peft_base` reloads the base from it and refuses a base whose shapes (or values) differ.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from itjax.models import scan

BASE_ITEM = "base"


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
            "state": ocp.StandardCheckpointHandler(), "dataset": ocp.JsonCheckpointHandler(),
            BASE_ITEM: ocp.JsonCheckpointHandler()})
        # peft runs: the base-weights pointer written with every checkpoint (see restore_peft_base).
        self.base_pointer: dict | None = None

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
        items = {"state": ocp.args.StandardSave(state), "dataset": ocp.args.JsonSave(dataset_position)}
        if self.base_pointer is not None:
            items[BASE_ITEM] = ocp.args.JsonSave(self.base_pointer)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def saved_base_pointer(self, step: int) -> dict | None:
        """The base-weights pointer of a peft checkpoint; None for a full-model checkpoint."""
        if not os.path.isdir(os.path.join(self.directory, str(step), BASE_ITEM)):
            return None
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            **{BASE_ITEM: ocp.args.JsonRestore()}))[BASE_ITEM])

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
    into the shapes, dtypes and shardings of `abstract_params` (ShapeDtypeStruct leaves).

    The checkpoint's layer layout may differ from the model's (per layer, `layers/0/...`, as `itjax.convert`
    writes; or stacked, `layers/...` [L, ...], as a `scan_layers` run saves): it is then restored in its own
    layout and stacked / unstacked on device into `abstract_params`' shardings (transiently two copies of the
    stacked parameters).
    """
    if os.path.isdir(os.path.join(path, "checkpoint")):
        path = os.path.join(path, "checkpoint")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"initial checkpoint {path} does not exist; pass the output folder of "
                                "`python -m itjax.convert` (it holds checkpoint/ and model.gin).")
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        saved = getattr(metadata, "item_metadata", metadata)
        saved_stacked, wanted_stacked = _stacked_layout(saved), _stacked_layout(abstract_params)
        relayout = None not in (saved_stacked, wanted_stacked) and saved_stacked != wanted_stacked
        target = abstract_params
        if relayout:
            target = (scan.unstack_layers(abstract_params) if wanted_stacked
                      else scan.stack_layers(abstract_params, stack=scan.stack_abstract))
        check_compatible(saved, target, f"initial checkpoint {path}")
        restored = checkpointer.restore(path, target)
    if not relayout:
        return restored
    convert = scan.stack_layers if wanted_stacked else scan.unstack_layers
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), abstract_params)
    if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda x: x is None)):
        return jax.jit(convert)(restored)
    return jax.jit(convert, out_shardings=shardings)(restored)


def _stacked_layout(tree: Any) -> bool | None:
    """Whether a parameter tree (arrays or checkpoint metadata) keeps its layer stacks stacked: True for paths
    `.../layers/<name>/...`, False for `.../layers/<i>/...`, None when it has no `layers`."""
    for path, _ in _flatten(tree):
        stack = scan.layer_stack(_path_str(path).split("/"))
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
        base = restore_initial_params(path, trainer.abstract_base_params)
        path = os.path.abspath(path)
    else:
        base = trainer.init_base_params()
    pointer = {"path": path, "seed": None if path else trainer.seed, "fingerprint": base_fingerprint(base)}
    if saved_pointer is not None:
        check_base_fingerprint(saved_pointer["fingerprint"], pointer["fingerprint"],
                               f"base {path or f'initialised from seed {trainer.seed}'}")
    trainer.base_params = base
    return pointer
