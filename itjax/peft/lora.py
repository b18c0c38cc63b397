"""LoRA (Hu et al. 2021): a frozen projection plus a trainable low-rank update, `y = W x + (alpha / r) B A x`.

Surgery replaces each targeted `Dense` by a `LoRADense` that adopts the layer's kernel (same path) and adds

    lora_a  [*in_dims, rank]    logical axes (*kernel input axes, None)    init U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    lora_b  [rank, *out_dims]   logical axes (None, *kernel output axes)   init 0, so step 0 equals the base

(with a leading [num_layers] 'layers' dim, independent draws per layer, in a `scan_layers` stack)
(peft's / torch Linear's kaiming_uniform(a=sqrt(5)) for A, zeros for B). Dropout (`LoRA.dropout`) is applied to
the adapter's input only, as in peft. Target names are the layers' attribute names: q, k, v, o, wi / wi_0, wi_1,
wo, lm_head for T5; q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head for Llama.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itjax import param_paths
from itjax.models.layers import Dense, dropout
from itjax.peft import core
from itjax.peft.core import AdapterParam, PeftConfigError
from itjax.peft.core import model_family  # noqa: F401  (its former home; now in core, for every method)

# peft's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): the query and value projections.
DEFAULT_TARGETS = {"t5": ("q", "v"), "llama": ("q_proj", "v_proj")}


class LoRADense(Dense):
    """A Dense / Projection with a low-rank trainable update. Base variables are the replaced layer's own."""

    def __init__(self, base: Dense, *, rank: int, alpha: float, dropout_rate: float, layer_id: int,
                 rngs: nnx.Rngs, where: str):
        core.adopt_dense(self, base)
        in_shape, out_shape, stack = core.in_shape(base), core.out_shape(base), core.stack_shape(base)
        fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
        if rank > min(fan_in, fan_out):
            raise PeftConfigError(f"LoRA.rank={rank} is larger than layer {where} allows ({fan_in} inputs -> "
                                  f"{fan_out} outputs); use LoRA.rank <= {min(fan_in, fan_out)}.")
        init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        a = core.stacked_init(init, rngs.params(), stack, (fan_in, rank)).reshape(stack + in_shape + (rank,))
        lead = core.stack_axes(base)
        self.lora_a = AdapterParam(a, out_sharding=lead + core.in_axes(base) + (None,),
                                   eager_sharding=False)
        self.lora_b = AdapterParam(jnp.zeros(stack + (rank,) + out_shape, jnp.float32),
                                   out_sharding=lead + (None,) + core.out_axes(base), eager_sharding=False)
        self.scaling = alpha / rank
        self.dropout_rate = dropout_rate
        self.layer_id = layer_id

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., *in_dims] -> [..., *out_dims] in `dtype`."""
        y = core.dense_forward(self, x)
        h = dropout(x.astype(self.dtype), self.dropout_rate, core.dropout_key(self.layer_id))
        n = self.num_in_dims
        a = self.lora_a[...].astype(self.dtype)
        low = jax.lax.dot_general(h, a, ((tuple(range(h.ndim - n, h.ndim)), tuple(range(n))), ((), ())))
        delta = jnp.tensordot(low, self.lora_b[...].astype(self.dtype), axes=1)
        return y + (delta * self.scaling).astype(y.dtype)


@gin.configurable(module="itjax.peft")
class LoRA(core.PeftMethod):
    """LoRA on the named layers.

    Args:
      rank: r, the inner dimension of the update (at most min(fan_in, fan_out) of every targeted layer).
      alpha: the update is scaled by alpha / rank (peft's `lora_alpha`).
      dropout: dropout rate on the adapter's input during training (peft's `lora_dropout`).
      target_modules: layer names (see the module docstring); None = the query and value projections.
    """

    name = "lora"

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: Sequence[str] | None = None):
        if rank < 1:
            raise PeftConfigError(f"LoRA.rank={rank}; it must be a positive integer.")
        if not 0.0 <= dropout < 1.0:
            raise PeftConfigError(f"LoRA.dropout={dropout}; it must be in [0, 1).")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout_rate = float(dropout)
        self.target_modules = None if target_modules is None else tuple(target_modules)

    def __repr__(self) -> str:
        return (f"LoRA(rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_rate}, "
                f"target_modules={self.target_modules})")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def targets_for(self, module: nnx.Module) -> tuple[str, ...]:
        return self.target_modules or DEFAULT_TARGETS[core.model_family(module)]

    def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        targets = core.find_targets(module, self.targets_for(module), "LoRA.target_modules")
        for layer_id, (path, layer) in enumerate(sorted(targets.items(), key=lambda kv: core.path_name(kv[0]))):
            core.replace(module, path, LoRADense(layer, rank=self.rank, alpha=self.alpha,
                                                 dropout_rate=self.dropout_rate, layer_id=layer_id, rngs=rngs,
                                                 where=core.path_name(path)))
        return module


def lora_layers(adapter: Any) -> dict[tuple, tuple[Any, Any]]:
    """{path of the adapted layer: (lora_a, lora_b)} from an adapter pure dict."""
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            if "lora_a" in node and "lora_b" in node:
                found[path] = (node["lora_a"], node["lora_b"])
            for key, child in node.items():
                if key not in ("lora_a", "lora_b"):
                    walk(child, path + (key,))
    walk(adapter, ())
    return found


def lora_delta(a: Any, b: Any, scaling: float) -> np.ndarray:
    """The dense update `scaling * A B` shaped like the kernel [*in_dims, *out_dims] (float32 numpy)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    rank = a.shape[-1]
    delta = a.reshape(-1, rank) @ b.reshape(rank, -1)
    return (delta * np.float32(scaling)).reshape(a.shape[:-1] + b.shape[1:])


def merge_lora(base: Any, adapter: Any, *, alpha: float) -> Any:
    """Base params with every LoRA update folded into its kernel (`W + alpha / r * A B`): a plain model's params.

    base: the frozen parameter pure dict; adapter: the LoRA adapter pure dict (the train state's `params`).
    alpha: `LoRA.alpha` of the run (r is read from the adapter's shapes). Returns a new dict of numpy arrays, in the
    base's layer layout (per layer, or stacked for `scan_layers` models).
    """
    stacked = param_paths.is_stacked(base)
    merged = param_paths.unstack_layers(jax.tree.map(np.asarray, jax.device_get(base)))
    for path, (a, b) in lora_layers(param_paths.unstack_layers(jax.device_get(adapter))).items():
        node = core.submodule_dict(merged, path)
        kernel = node["kernel"]
        delta = lora_delta(a, b, alpha / np.shape(a)[-1])
        if delta.shape != kernel.shape:
            raise PeftConfigError(f"merge_lora: adapter for {core.path_name(path)} has shape {delta.shape}, the "
                                  f"base kernel {kernel.shape}: the adapter belongs to another model.")
        node["kernel"] = (kernel.astype(np.float32) + delta).astype(kernel.dtype)
    return param_paths.stack_layers(merged, stack=np.stack) if stacked else merged
