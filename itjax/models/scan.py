"""Scanning over layers: a stack of identical transformer layers stored as one layer with stacked parameters.

With `scan_layers=True` (T5Config / LlamaConfig) a stack of L layers is one layer module whose every variable has a
leading dimension L and the logical axis name 'layers' prepended to its axes, e.g.

    layers.self_attn.q_proj.kernel   [L, embed, heads, head_dim]   ('layers', 'embed', 'heads', 'kv')

instead of L sub-trees `layers.0 ... layers.{L-1}`. The forward pass runs `jax.lax.scan` over the stack, so XLA sees
one layer's computation once: compile time and program size stop growing with depth, and the backward pass keeps
one layer's residuals per step of the scan (the remat policy is applied to the scanned body, as in MaxText).
No rules table maps 'layers' to a mesh axis, so the stacked dimension is replicated and every other dimension is
sharded exactly as in the per-layer layout.

Layer i of a stacked model equals layer i of the per-layer model built from the same seed (`stack_modules` builds
the L layers one by one and stacks them), and `stack_layers` / `unstack_layers` (in `itjax.param_paths`, re-exported
here) convert parameter pure dicts between the two layouts, so checkpoints of either layout load into a model of
the other (`itjax.checkpoints.restore_initial_params`) and conversion to HF reads either.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from itjax.models.layers import REMAT_POLICIES
# The parameter-path conventions live in itjax.param_paths; these names stay importable from here.
from itjax.param_paths import (LAYER_AXIS, is_stacked, layer_stack, stack_abstract, stack_layers,  # noqa: F401
                               unstack_layers)

_LAYER_INDEX: contextvars.ContextVar = contextvars.ContextVar("itjax_scan_layer_index", default=None)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """L modules of one structure -> one module of that structure whose variables are stacked [L, ...], with
    LAYER_AXIS prepended to their logical axes (`out_sharding`)."""
    graphdef, *_ = nnx.split(modules[0])
    states = [nnx.split(module)[1] for module in modules]

    def stack(*variables: nnx.Variable) -> nnx.Variable:
        first = variables[0]
        axes = first.get_metadata().get("out_sharding")
        axes = (None,) * first.ndim if axes is None else tuple(axes)
        return first.replace(jnp.stack([v[...] for v in variables]), out_sharding=(LAYER_AXIS,) + axes)

    stacked = jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, stacked)


def num_stacked(module: nnx.Module) -> int:
    """L, the leading dimension of a stacked module's variables."""
    return jax.tree.leaves(nnx.state(module))[0].shape[0]


def current_layer_index() -> jax.Array | None:
    """Inside `scan` (while a layer's body is traced): the layer's index, a traced int32 scalar; else None.

    Lets code that derives per-layer randomness from a static id (adapter dropout) tell the scanned layers apart.
    """
    return _LAYER_INDEX.get()


@contextlib.contextmanager
def _layer_index(index: jax.Array) -> Iterator[None]:
    token = _LAYER_INDEX.set(index)
    try:
        yield
    finally:
        _LAYER_INDEX.reset(token)


def scan(
    layers: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat_policy: str = "none",
) -> tuple[Any, Any]:
    """Runs `body(layer, carry, x) -> (carry, y)` for each layer of a stacked module, in order.

    layers: a stacked module (`stack_modules`); `layer` is its layer i, with unstacked variables.
    xs: pytree of per-layer inputs, each leaf [L, ...] (e.g. dropout keys, a layer's decode cache), or None.
    remat_policy: a `layers.REMAT_POLICIES` name applied to each layer's body (what backward may keep).
    Returns the final carry and the ys stacked [L, ...].

    Modules are merged from their states inside the scanned function, so `body` must not mutate variables
    (itjax layers are pure functions of parameters, inputs and explicit PRNG keys).
    """
    graphdef, state = nnx.split(layers)
    indices = jnp.arange(num_stacked(layers), dtype=jnp.int32)

    def step(carry, inputs):
        layer_state, index, x = inputs
        with _layer_index(index):
            return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat_policy != "none":
        # prevent_cse=False: inside a scan, common-subexpression elimination across the remat boundary cannot
        # happen anyway, and the barrier would only cost speed (jax.checkpoint's documentation).
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, indices, xs))


def split_keys(rng: jax.Array | None, num: int) -> jax.Array | None:
    """`num` PRNG keys stacked [num, ...] for a scan (the same keys `layers.split_rng` gives a loop), or None."""
    return None if rng is None else jax.random.split(rng, num)
