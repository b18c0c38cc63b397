"""LoRA (Hu et al. 2021): a frozen projection plus a trainable low-rank update, `y = W x + (alpha / r) B A x`.

Surgery replaces each targeted `Dense` by a `LoRADense` that adopts the layer's kernel (same path) and adds

    lora_a  [*in_dims, rank]    logical axes (*kernel input axes, None)    init U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    lora_b  [rank, *out_dims]   logical axes (None, *kernel output axes)   init 0, so step 0 equals the base

(with a leading [num_layers] 'layers' dim, independent draws per layer, in a `scan_layers` stack)
(peft's / torch Linear's kaiming_uniform(a=sqrt(5)) for A, zeros for B). Dropout (`LoRA.dropout`) is applied to
the adapter's input only, as in peft. Target names are the layers' attribute names: q, k, v, o, wi / wi_0, wi_1,
wo, lm_head for T5; q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head for Llama.

QLoRA (`LoRA.base_quantization = 'nf4' | 'int8'`, gin/peft/qlora.gin): every frozen Dense kernel except `lm_head`
is stored quantized (`itjax.peft.quantization`): a targeted layer's base is `.../q/qkernel/{codes, scales...}`
instead of `.../q/kernel`, an untargeted layer becomes a `QuantizedDense`. The base is quantized from the plain
model's float32 parameters when the trainer loads them (`Trainer.prepare_base`), so checkpoints keep pointing to the
float32 base.
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
from itjax.peft import core, quantization
from itjax.peft.core import AdapterParam, PeftConfigError
from itjax.peft.core import model_family  # noqa: F401  (its former home; now in core, for every method)

# peft's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): the query and value projections.
DEFAULT_TARGETS = {"t5": ("q", "v"), "llama": ("q_proj", "v_proj")}


class LoRADense(Dense):
    """A Dense / Projection with a low-rank trainable update. Base variables are the replaced layer's own."""

    def __init__(self, base: Dense, *, rank: int, alpha: float, dropout_rate: float, layer_id: int,
                 rngs: nnx.Rngs, where: str, quantization_spec: dict | None = None):
        if quantization_spec is None:
            core.adopt_dense(self, base)
        else:
            quantization.quantize_layer(self, base, quantization_spec, where)
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
        y = quantization.base_forward(self, x)
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
      base_quantization: None (float32 base), 'nf4' (QLoRA: 4-bit NormalFloat blocks) or 'int8' (per output
        channel absmax): how every frozen Dense kernel but `lm_head` is stored.
      quantization_block_size: NF4 block length along the contraction dims (QLoRA: 64); must divide every
        quantized layer's number of inputs.
      double_quantization: NF4 only: quantize the block scales again (int8 per group of up to 256, QLoRA's
        double quantization; ~0.516 instead of 0.5625 bytes per parameter). None = True for 'nf4'.
    """

    name = "lora"

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: Sequence[str] | None = None, base_quantization: str | None = None,
                 quantization_block_size: int = 64, double_quantization: bool | None = None):
        if rank < 1:
            raise PeftConfigError(f"LoRA.rank={rank}; it must be a positive integer.")
        if not 0.0 <= dropout < 1.0:
            raise PeftConfigError(f"LoRA.dropout={dropout}; it must be in [0, 1).")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout_rate = float(dropout)
        self.target_modules = None if target_modules is None else tuple(target_modules)
        if base_quantization not in (None,) + quantization.FORMATS:
            raise PeftConfigError(f"LoRA.base_quantization={base_quantization!r}; expected None, 'nf4' or 'int8'.")
        if base_quantization == "nf4" and (quantization_block_size < 2 or quantization_block_size % 2):
            raise PeftConfigError(f"LoRA.quantization_block_size={quantization_block_size}; it must be an even "
                                  "number >= 2 (QLoRA uses 64).")
        if double_quantization and base_quantization != "nf4":
            raise PeftConfigError(f"LoRA.double_quantization=True applies to LoRA.base_quantization='nf4' only "
                                  f"(it is {base_quantization!r}); leave it unset.")
        self.base_quantization = base_quantization
        self.quantization_block_size = int(quantization_block_size)
        self.double_quantization = base_quantization == "nf4" and double_quantization is not False

    def __repr__(self) -> str:
        quantized = "" if self.base_quantization is None else (
            f", base_quantization={self.base_quantization!r}" + (
                f", quantization_block_size={self.quantization_block_size}, "
                f"double_quantization={self.double_quantization}" if self.base_quantization == "nf4" else ""))
        return (f"LoRA(rank={self.rank}, alpha={self.alpha}, dropout={self.dropout_rate}, "
                f"target_modules={self.target_modules}{quantized})")

    @property
    def quantization_spec(self) -> dict | None:
        """{"fmt", "block_size", "double"} of the frozen base, or None for a float32 base."""
        if self.base_quantization is None:
            return None
        return {"fmt": self.base_quantization, "block_size": self.quantization_block_size,
                "double": self.double_quantization}

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check_layout(self, abstract_base) -> None:
        if self.base_quantization is not None:
            quantization.check_block_sharding(abstract_base, self.base_quantization)

    def targets_for(self, module: nnx.Module) -> tuple[str, ...]:
        return self.target_modules or DEFAULT_TARGETS[core.model_family(module)]

    def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        targets = core.find_targets(module, self.targets_for(module), "LoRA.target_modules")
        spec = self.quantization_spec
        for layer_id, (path, layer) in enumerate(sorted(targets.items(), key=lambda kv: core.path_name(kv[0]))):
            core.replace(module, path, LoRADense(layer, rank=self.rank, alpha=self.alpha,
                                                 dropout_rate=self.dropout_rate, layer_id=layer_id, rngs=rngs,
                                                 where=core.path_name(path),
                                                 quantization_spec=None if path == ("lm_head",) else spec))
        if spec is not None:
            quantization.quantize_frozen_layers(module, spec)
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
