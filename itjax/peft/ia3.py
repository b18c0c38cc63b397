"""(IA)3 (Liu et al. 2022): learned rescaling of attention keys and values and of the MLP's intermediate
activation; everything else frozen.

Surgery swaps the targeted Dense layers for `IA3Dense`, which adopts the layer's kernel (same path) and holds

    ia3_scale  [*out_dims]  (key / value projections: scales the output)   axes = the kernel's output axes
    ia3_scale  [*in_dims]   (MLP down projection: scales the input, i.e. the intermediate activation)

initialised to ones, so step 0 equals the base (with a leading [num_layers] dim in a `scan_layers` stack). Defaults follow peft: T5 k, v and wo (feed-forward: wo); Llama
k_proj, v_proj and down_proj (feed-forward: down_proj).
"""

from __future__ import annotations

from typing import Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from itjax.models.layers import Dense
from itjax.peft import core
from itjax.peft.core import AdapterParam, PeftConfigError

DEFAULTS = {"t5": (("k", "v", "wo"), ("wo",)), "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",))}


class IA3Dense(Dense):
    """A Dense / Projection whose output (or, for feed-forward layers, input) is multiplied by a learned vector."""

    def __init__(self, base: Dense, *, scale_input: bool):
        core.adopt_dense(self, base)
        dims = core.in_shape(base) if scale_input else core.out_shape(base)
        axes = core.in_axes(base) if scale_input else core.out_axes(base)
        self.ia3_scale = AdapterParam(jnp.ones(core.stack_shape(base) + dims, jnp.float32),
                                      out_sharding=core.stack_axes(base) + axes, eager_sharding=False)
        self.scale_input = scale_input

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., *in_dims] -> [..., *out_dims] in `dtype`."""
        scale = self.ia3_scale[...].astype(self.dtype)
        if self.scale_input:
            return core.dense_forward(self, x.astype(self.dtype) * scale)
        return core.dense_forward(self, x) * scale


@gin.configurable(module="itjax.peft")
class IA3(core.PeftMethod):
    """(IA)3 rescaling vectors.

    Args:
      target_modules: layers to rescale; None = keys, values and the MLP down projection (see the module docstring).
      feedforward_modules: the subset of target_modules whose input is scaled (MLP down projections); None = the
        family default (wo / down_proj).
    """

    name = "ia3"

    def __init__(self, target_modules: Sequence[str] | None = None, feedforward_modules: Sequence[str] | None = None):
        self.target_modules = None if target_modules is None else tuple(target_modules)
        self.feedforward_modules = None if feedforward_modules is None else tuple(feedforward_modules)

    def __repr__(self) -> str:
        return f"IA3(target_modules={self.target_modules}, feedforward_modules={self.feedforward_modules})"

    def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        del rngs  # ones: nothing random
        targets_default, feedforward_default = DEFAULTS[core.model_family(module)]
        targets = self.target_modules or targets_default
        feedforward = self.feedforward_modules if self.feedforward_modules is not None else feedforward_default
        unknown = [name for name in feedforward if name not in targets]
        if unknown:
            raise PeftConfigError(f"IA3.feedforward_modules={list(feedforward)}: {unknown} are not in "
                                  f"IA3.target_modules={list(targets)}.")
        for path, layer in core.find_targets(module, targets, "IA3.target_modules").items():
            core.replace(module, path, IA3Dense(layer, scale_input=str(path[-1]) in feedforward))
        return module
