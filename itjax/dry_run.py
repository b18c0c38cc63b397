"""Dry run: lay out and compile a training configuration without allocating it (`python -m itjax.train --dry_run`).

Builds the model abstractly, derives every parameter's and optimizer-state leaf's sharding on the configured mesh,
compiles the train step for abstract batches, and reports parameter count, per-device parameter and optimizer
bytes, and XLA's memory estimate for the compiled step. This is how a 3B or 8B configuration is checked on a laptop
(with fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from itjax.trainer import Trainer


def abstract_batch(task_feature_lengths: Mapping[str, int], batch_size: int, pack: bool,
                   sharding_for_ndim) -> dict[str, jax.ShapeDtypeStruct]:
    """The encoder-decoder model features (seqio EncDecFeatureConverter) as ShapeDtypeStructs [batch, length]."""
    inputs, targets = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    shapes = {"encoder_input_tokens": inputs, "decoder_input_tokens": targets, "decoder_target_tokens": targets,
              "decoder_loss_weights": targets}
    if pack:
        shapes.update({"encoder_segment_ids": inputs, "encoder_positions": inputs,
                       "decoder_segment_ids": targets, "decoder_positions": targets})
    return {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32, sharding=sharding_for_ndim(2))
            for k, n in shapes.items()}


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs with shardings (the largest shard per leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def report(trainer: Trainer, task_feature_lengths: Mapping[str, int], batch_size: int, pack: bool) -> dict:
    """Compiles the train step abstractly; returns the figures (bytes are per device)."""
    batch = abstract_batch(task_feature_lengths, batch_size, pack, trainer.partitioner.batch_sharding)
    compiled = trainer.compile_train_step(batch)
    memory = compiled.memory_analysis()
    figures = {
        "mesh": dict(trainer.partitioner.mesh.shape),
        "parameters": trainer.num_params,
        "param_bytes_per_device": per_device_bytes(trainer.abstract_state["params"]),
        "optimizer_bytes_per_device": per_device_bytes(trainer.abstract_state["opt_state"]),
    }
    if memory is not None:
        figures.update({
            "compiled_argument_bytes": int(memory.argument_size_in_bytes),
            "compiled_output_bytes": int(memory.output_size_in_bytes),
            "compiled_temp_bytes": int(memory.temp_size_in_bytes),
        })
    return figures


def format_report(figures: Mapping[str, Any]) -> str:
    lines = [f"mesh: {figures['mesh']}", f"parameters: {figures['parameters']:,}"]
    for key, value in figures.items():
        if key.endswith("_bytes") or key.endswith("_per_device"):
            lines.append(f"{key}: {value / 2**30:.3f} GiB")
    return "\n".join(lines)
