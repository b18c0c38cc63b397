"""Prefix tuning (Li & Liang 2021): P trainable keys and values in front of every self-attention layer's own.

Every query attends to the prefix (never masked; T5 gives it zero position bias, Llama's prefix keys are learned
already rotated). Targets: T5 encoder self-attention and decoder self-attention (not cross-attention), every
Llama self-attention. Per attention layer (`extra_kv` hook of `t5.Attention` / `llama.LlamaAttention`):

    prefix_keys, prefix_values   [P, heads, head_dim]   logical axes (None, 'heads', 'kv')   init N(0, init_scale^2)

(in a `scan_layers` stack: one Prefix for the stack, [num_layers, P, heads, head_dim], axes ('layers', ...)).

With `reparameterize=True` (the paper's stabilising MLP) the prefixes of all layers are instead computed from one
shared `PrefixMLP`: embedding [P, embed] -> tanh(x W1 + b1) [P, hidden] -> W2 + b2 -> [P, layers, 2, heads, kv].
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from itjax import param_paths
from itjax.models.llama import LlamaAttention
from itjax.models.t5 import Attention
from itjax.peft import core
from itjax.peft.core import AdapterParam, PeftConfigError


class PrefixMLP(nnx.Module):
    """The reparameterisation shared by every layer's prefix: [P, embed] -> [P, layers, 2, heads, kv]."""

    def __init__(self, length: int, embed: int, hidden: int, shape: tuple[int, int, int], rngs: nnx.Rngs):
        layers, heads, kv = shape
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.embedding = AdapterParam(jax.random.normal(rngs.params(), (length, embed)), out_sharding=(None, "embed"),
                                      eager_sharding=False)
        self.w1 = AdapterParam(init(rngs.params(), (embed, hidden)), out_sharding=("embed", "mlp"),
                               eager_sharding=False)
        self.b1 = AdapterParam(jnp.zeros((hidden,)), out_sharding=("mlp",), eager_sharding=False)
        w2 = init(rngs.params(), (hidden, layers * 2 * heads * kv)).reshape(hidden, layers, 2, heads, kv)
        self.w2 = AdapterParam(w2, out_sharding=("mlp", None, None, "heads", "kv"), eager_sharding=False)
        self.b2 = AdapterParam(jnp.zeros((layers, 2, heads, kv)), out_sharding=(None, None, "heads", "kv"),
                                eager_sharding=False)

    def __call__(self) -> jax.Array:
        h = jnp.tanh(self.embedding[...] @ self.w1[...] + self.b1[...])
        return jnp.einsum("ph,hlskd->plskd", h, self.w2[...]) + self.b2[...]


class Prefix(nnx.Module):
    """One attention layer's prefix: its own keys / values, or slice `layer` of a shared PrefixMLP."""

    def __init__(self, *, length: int, heads: int, head_dim: int, init_scale: float, rngs: nnx.Rngs,
                 mlp: PrefixMLP | None = None, layer: int = 0, stack: tuple[int, ...] = ()):
        self.length = length
        if mlp is None:
            shape = stack + (length, heads, head_dim)  # stack: (num_layers,) for a `scan_layers` stack
            axes = (param_paths.LAYER_AXIS,) * len(stack) + (None, "heads", "kv")
            self.prefix_keys = AdapterParam(init_scale * jax.random.normal(rngs.params(), shape), out_sharding=axes,
                                            eager_sharding=False)
            self.prefix_values = AdapterParam(init_scale * jax.random.normal(rngs.params(), shape),
                                              out_sharding=axes, eager_sharding=False)
        self.mlp = mlp
        self.layer = layer

    def keys_values(self) -> tuple[jax.Array, jax.Array]:
        """[P, heads, head_dim] each."""
        if self.mlp is None:
            return self.prefix_keys[...], self.prefix_values[...]
        kv = self.mlp()[:, self.layer]
        return kv[:, 0], kv[:, 1]

    def prepend(self, keys: jax.Array, values: jax.Array, bias_or_mask: jax.Array):
        """keys / values [batch, k, heads, D] -> [batch, P + k, heads, D]; the additive bias (float, zeros added)
        or boolean mask (True added) gets P leading key columns."""
        prefix_keys, prefix_values = self.keys_values()
        batch = keys.shape[0]

        def expand(p, like):
            return jnp.broadcast_to(p.astype(like.dtype), (batch,) + p.shape)
        keys = jnp.concatenate([expand(prefix_keys, keys), keys], axis=1)
        values = jnp.concatenate([expand(prefix_values, values), values], axis=1)
        fill = jnp.ones if bias_or_mask.dtype == jnp.bool_ else jnp.zeros
        columns = fill(bias_or_mask.shape[:-1] + (self.length,), bias_or_mask.dtype)
        return keys, values, jnp.concatenate([columns, bias_or_mask], axis=-1)


def self_attention_layers(module: nnx.Module) -> dict[tuple, nnx.Module]:
    """T5 encoder / decoder self-attention and Llama self-attention modules, by path."""
    return {tuple(path): node for path, node in nnx.iter_graph(module)
            if (isinstance(node, Attention) and path and path[-1] in ("attention", "self_attention"))
            or isinstance(node, LlamaAttention)}


def _key_projection(attention):
    return attention.k if isinstance(attention, Attention) else attention.k_proj


def _heads(attention) -> tuple[int, int]:
    return core.out_shape(_key_projection(attention))


@gin.configurable(module="itjax.peft")
class PrefixTuning(core.PeftMethod):
    """Prefix tuning.

    Args:
      length: P, prefix keys / values per self-attention layer.
      reparameterize: compute the prefixes with the shared MLP (Li & Liang), trained end to end.
      hidden_size: the MLP's hidden width.
      init_scale: stddev of the direct prefixes' normal initialisation.
    """

    name = "prefix_tuning"

    def __init__(self, length: int = 20, reparameterize: bool = False, hidden_size: int = 512,
                 init_scale: float = 1.0):
        if length < 1:
            raise PeftConfigError(f"PrefixTuning.length={length}; it must be a positive integer.")
        self.length = int(length)
        self.reparameterize = bool(reparameterize)
        self.hidden_size = int(hidden_size)
        self.init_scale = float(init_scale)

    def __repr__(self) -> str:
        return f"PrefixTuning(length={self.length}, reparameterize={self.reparameterize})"

    def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        layers = sorted(self_attention_layers(module).items(), key=lambda kv: core.path_name(kv[0]))
        if not layers:
            raise PeftConfigError(f"PrefixTuning: {type(module).__name__} has no self-attention layers.")
        shapes = {_heads(attention) for _, attention in layers}
        mlp = None
        stacked = [core.path_name(path) for path, attention in layers if core.stack_shape(_key_projection(attention))]
        if self.reparameterize and stacked:
            raise PeftConfigError(f"PrefixTuning.reparameterize=True needs per-layer attention, but {stacked} are "
                                  "scanned layer stacks; set scan_layers=False in the model config (T5Config / "
                                  "LlamaConfig) or PrefixTuning.reparameterize=False.")
        if self.reparameterize:
            if len(shapes) != 1:
                raise PeftConfigError(f"PrefixTuning.reparameterize: attention layers differ in shape {shapes}.")
            (heads, head_dim), = shapes
            embed = layers[0][1].o.kernel.shape[-1] if isinstance(layers[0][1], Attention) \
                else layers[0][1].o_proj.kernel.shape[-1]
            mlp = PrefixMLP(self.length, embed, self.hidden_size, (len(layers), heads, head_dim), rngs)
        for index, (_, attention) in enumerate(layers):
            heads, head_dim = _heads(attention)
            attention.extra_kv = Prefix(length=self.length, heads=heads, head_dim=head_dim,
                                        init_scale=self.init_scale, rngs=rngs, mlp=mlp, layer=index,
                                        stack=core.stack_shape(_key_projection(attention)))
        return module
