"""Dry run: lay out and compile a training configuration without allocating it (`python -m itjax.train --dry_run`).

Builds the model abstractly, derives every parameter's and optimizer-state leaf's sharding on the configured mesh,
compiles the train step for abstract batches, and reports parameter count, per-device parameter and optimizer
bytes, the time to trace and compile the step (what `scan_layers` shrinks), and XLA's memory estimate for the
compiled step. This is how a 3B or 8B configuration is checked on a laptop
(with fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=N).
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from itjax.peft.core import feature_converter_kwargs
from itjax.trainer import Trainer


def abstract_batch(feature_converter, task_feature_lengths: Mapping[str, int], batch_size: int,
                   sharding_for_ndim) -> dict[str, jax.ShapeDtypeStruct]:
    """The model features the seqio `feature_converter` would produce, as int32 ShapeDtypeStructs [batch, length]."""
    lengths = feature_converter.get_model_feature_lengths(task_feature_lengths)
    return {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32, sharding=sharding_for_ndim(2))
            for k, n in lengths.items()}


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds for a tree of ShapeDtypeStructs with shardings (the largest shard per leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def saved_residuals(f, params, *args) -> list:
    """The values (abstract: shape and dtype) the backward pass of `f(params, *args)` (w.r.t. params) keeps from
    the forward pass, not counting those that are the arguments themselves; traced abstractly (args may be
    ShapeDtypeStructs).

    The residuals are the leaves of the function `jax.vjp` returns; each distinct value counts once (what
    `jax.ad_checkpoint.print_saved_residuals` lists, less its "from the argument" lines).
    """
    leaves, tree = jax.tree.flatten((params, args))

    def pullback(*flat):
        p, rest = jax.tree.unflatten(tree, flat)
        return jax.vjp(lambda q: f(q, *rest), p)[1]

    jaxpr = jax.make_jaxpr(pullback)(*leaves).jaxpr
    num_residuals = len(jax.tree.leaves(jax.eval_shape(pullback, *leaves)))
    outputs = jaxpr.outvars[len(jaxpr.outvars) - num_residuals:]
    # A reduce_precision feeding an output is looked through (its input is the value kept), as jax does.
    through = {e.outvars[0]: e.invars[0] for e in jaxpr.eqns if e.primitive.name == "reduce_precision"}
    literals = [v for v in outputs if isinstance(v, jax.extend.core.Literal)]
    kept = {through.get(v, v) for v in outputs if not isinstance(v, jax.extend.core.Literal)} - set(jaxpr.invars)
    return [v.aval for v in [*kept, *literals]]


def residual_bytes(f, params, *args) -> int:
    """Bytes of `saved_residuals(f, params, *args)`."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in saved_residuals(f, params, *args))


def train_residuals(trainer: Trainer, batch: Mapping[str, jax.ShapeDtypeStruct]) -> list:
    """The activations (abstract values) the train step's backward pass keeps from its forward pass (whole global
    batch): residuals of `Trainer.train_loss`, the loss the step differentiates (dropout and adapter dropout
    included when on; with PEFT the frozen base is a constant of it, so a value computed from it, such as a
    dequantized QLoRA kernel, is a residual when the backward pass keeps it).

    This is what `remat_policy` changes; the residuals are traced abstractly (no weights allocated).
    """
    base = trainer.abstract_base_params  # PEFT: the frozen weights; None otherwise

    def loss(params, batch, base):
        return trainer.train_loss(params, batch, jnp.zeros((), jnp.int32), base)[0]

    with trainer.partitioner.axis_rules():
        return saved_residuals(loss, trainer.abstract_state["params"], dict(batch), base)


def saved_activation_bytes(trainer: Trainer, batch: Mapping[str, jax.ShapeDtypeStruct]) -> int:
    """Bytes of `train_residuals(trainer, batch)` (all devices together)."""
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in train_residuals(trainer, batch))


def report(trainer: Trainer, task_feature_lengths: Mapping[str, int], batch_size: int, pack: bool) -> dict:
    """Compiles the train step abstractly; returns the figures (bytes are per device)."""
    converter = trainer.model.feature_converter(pack=pack, **feature_converter_kwargs(trainer.peft, pack))
    batch = abstract_batch(converter, task_feature_lengths, batch_size, trainer.partitioner.batch_sharding)
    start = time.perf_counter()
    compiled = trainer.compile_train_step(batch)
    compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    figures = {
        "mesh": dict(trainer.partitioner.mesh.shape),
        "parameters": trainer.num_params,
        "compile_seconds": round(compile_seconds, 1),
        "model_flops_per_step": trainer.train_step_flops({k: tuple(v.shape) for k, v in batch.items()}),
        "param_bytes_per_device": per_device_bytes(trainer.abstract_state["params"]),
        "optimizer_bytes_per_device": per_device_bytes(trainer.abstract_state["opt_state"]),
        "saved_activation_bytes_global": saved_activation_bytes(trainer, batch),
    }
    if trainer.abstract_base_params is not None:  # PEFT: the frozen weights as stored (QLoRA: quantized)
        figures["frozen_base_bytes_per_device"] = per_device_bytes(trainer.abstract_base_params)
    if memory is not None:
        figures.update({
            "compiled_argument_bytes": int(memory.argument_size_in_bytes),
            "compiled_output_bytes": int(memory.output_size_in_bytes),
            "compiled_temp_bytes": int(memory.temp_size_in_bytes),
        })
    return figures


def format_report(figures: Mapping[str, Any]) -> str:
    lines = [f"mesh: {figures['mesh']}", f"parameters: {figures['parameters']:,}",
             f"train step trace + compile: {figures['compile_seconds']} s",
             f"model FLOPs per train step: {figures['model_flops_per_step'] / 1e12:,.3f} TFLOP (itjax.flops)"]
    for key, value in figures.items():
        if "_bytes" in key:
            lines.append(f"{key}: {value / 2**30:.3f} GiB")
    return "\n".join(lines)
