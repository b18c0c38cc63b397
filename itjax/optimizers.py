"""Optimizers and learning-rate schedules, as gin configurables over optax.

`adafactor` reproduces T5X's default Adafactor (`t5x.adafactor.Adafactor` as configured in T5X's gin files):
factored second moments for matrices whose two largest dims are >= 128, decay rate 0.8 (beta2_t = 1 - t^-0.8),
update clipping at RMS 1.0, updates scaled by the parameter's RMS (floored at 1e-3), no momentum, epsilon 1e-30.
optax.adafactor is the same algorithm; only the defaults are set here. In `scan_layers` models Adafactor runs per
layer of each stack (`per_layer_in_stacks`), as T5X's Adafactor treats the 'layers' axis as a batch dimension: its
factoring, update clipping and parameter scale are per-tensor statistics, which must not mix the layers.
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import optax

from itjax import param_paths

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


@gin.configurable
def constant_schedule(learning_rate: float = 1e-3, warmup_steps: int = 0) -> Schedule:
    """Constant learning rate (T5X finetune default 1e-3), with optional linear warmup from 0."""
    if warmup_steps <= 0:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        [warmup_steps])


@gin.configurable
def rsqrt_schedule(learning_rate: float = 1.0, warmup_steps: int = 10_000) -> Schedule:
    """T5's inverse square root schedule: learning_rate / sqrt(max(step, warmup_steps)).

    With learning_rate=1.0 and warmup_steps=10000 this is T5 pre-training's 0.01 constant then rsqrt decay.
    """
    def schedule(step):
        return learning_rate / jnp.sqrt(jnp.maximum(step.astype(jnp.float32), warmup_steps))
    return schedule


@gin.configurable
def linear_decay_schedule(learning_rate: float = 1e-3, warmup_steps: int = 0, decay_steps: int = gin.REQUIRED,
                          end_value: float = 0.0) -> Schedule:
    """Linear warmup from 0 to learning_rate over warmup_steps, then linear decay to end_value at decay_steps."""
    decay = optax.linear_schedule(learning_rate, end_value, max(decay_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])


@gin.configurable
def cosine_decay_schedule(learning_rate: float = 1e-3, warmup_steps: int = 0, decay_steps: int = gin.REQUIRED,
                          end_value: float = 0.0) -> Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to end_value at decay_steps (total steps).

    A run shorter than its warmup (decay_steps <= warmup_steps, e.g. a smoke test) warms up over its first half.
    """
    if decay_steps <= warmup_steps:
        warmup_steps = decay_steps // 2
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(decay_steps, 1), end_value)


@gin.configurable
def adafactor(learning_rate: Schedule | float = gin.REQUIRED, decay_rate: float = 0.8,
              clipping_threshold: float | None = 1.0, multiply_by_parameter_scale: bool = True,
              min_dim_size_to_factor: int = 128, momentum: float | None = None,
              weight_decay_rate: float | None = None, epsilon1: float = 1e-30,
              global_norm_clip: float | None = None) -> optax.GradientTransformation:
    """Adafactor with T5X's defaults. `learning_rate` is a schedule (gin: `@rsqrt_schedule()`) or a float."""
    tx = optax.adafactor(
        learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor, decay_rate=decay_rate,
        decay_offset=0, multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=clipping_threshold, momentum=momentum, weight_decay_rate=weight_decay_rate,
        eps=epsilon1, factored=True)
    tx = per_layer_in_stacks(tx)
    if global_norm_clip:
        tx = optax.chain(optax.clip_by_global_norm(global_norm_clip), tx)
    return tx


@gin.configurable
def adamw(learning_rate: Schedule | float = gin.REQUIRED, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, global_norm_clip: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay), with optional global-norm gradient clipping first."""
    tx = optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if global_norm_clip:
        tx = optax.chain(optax.clip_by_global_norm(global_norm_clip), tx)
    return tx


def per_layer_in_stacks(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` applied to each layer of every `scan_layers` stack on its own (vmapped over the leading [L] axis of the
    parameters under `.../layers/...`), and as is to every other parameter.

    For a per-tensor transformation (no statistic across parameters: not global-norm clipping) this makes a stacked
    model's update equal the per-layer model's. A model without stacks gets `tx` unchanged (same state).
    """
    def combined(params: Any) -> optax.GradientTransformation | None:
        labels = _stack_labels(params)
        stacks = sorted(set(jax.tree.leaves(labels)) - {_OTHER})
        if not stacks:
            return None
        return optax.multi_transform({**{stack: _vmapped(tx) for stack in stacks}, _OTHER: tx}, labels)

    def init(params):
        return (combined(params) or tx).init(params)

    def update(updates, state, params=None):
        return (combined(updates) or tx).update(updates, state, params)

    return optax.GradientTransformation(init, update)


_OTHER = "other"


def _stack_labels(params: Any) -> Any:
    """Each leaf's stack (its path up to `layers`, e.g. 'encoder/layers', for paths `.../layers/<name>/...`), or
    'other' outside stacks: one vmap per stack, since stacks may differ in depth."""
    def label(path, _):
        stack = param_paths.layer_stack([str(getattr(k, "key", getattr(k, "idx", ""))) for k in path])
        return "/".join(stack[0]) if stack is not None and stack[1] else _OTHER
    return jax.tree_util.tree_map_with_path(label, params)


def _vmapped(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` over leaves stacked [L, ...]: each layer's slice gets its own state (stacked [L, ...])."""
    def init(params):
        return jax.vmap(tx.init)(params)

    def update(updates, state, params=None):
        if params is None:
            return jax.vmap(lambda u, s: tx.update(u, s))(updates, state)
        return jax.vmap(tx.update)(updates, state, params)

    return optax.GradientTransformation(init, update)
