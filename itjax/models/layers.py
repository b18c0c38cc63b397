"""Layers shared by the model families: RMS norm, einsum projections, embeddings, MLPs and dropout.

Conventions:
- Parameters are float32 and carry logical axis names (`out_sharding`, e.g. `('embed', 'mlp')`) as metadata only:
  every itjax variable is created with `eager_sharding=False` (whatever `nnx.use_eager_sharding` says), so modules
  build outside a mesh and `itjax.partitioning` maps the names to mesh shardings. Computation runs in the module's
  `dtype` (float32 or bfloat16) except where noted (norm statistics, final logits).
- Dense kernels are `[*in_dims, *out_dims]` (T5X `DenseGeneral` layout): `[embed, mlp]` for an MLP input,
  `[embed, heads, kv]` for attention q/k/v and `[heads, kv, embed]` for the attention output.
- Randomness is functional: dropout takes an explicit PRNG key (`None` = deterministic), modules keep no RNG state,
  so a forward pass is a pure function of (params, inputs, key).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from itjax.partitioning import with_logical_constraint

Initializer = Callable[..., jax.Array]

# Activation names on the hidden states of a transformer stack.
HIDDEN_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")  # per-head activations [batch, length, heads, head_dim]


def heads_first(x: jax.Array) -> jax.Array:
    """[..., length, heads, D] <-> [..., heads, length, D]: per-head activations to / from the `DecodeCache` layout
    of both families (leading axes: batch, or layers and batch for a scanned stack)."""
    return jnp.swapaxes(x, -3, -2)

# Additive attention bias for masked pairs (both families); finite so fully masked rows give a uniform softmax,
# not NaN.
MASK_BIAS = -1e10


def split_rng(rng: jax.Array | None, num: int) -> list[jax.Array | None]:
    """Splits a PRNG key into `num` independent keys; `None` (deterministic) gives `num` Nones."""
    if rng is None:
        return [None] * num
    return list(jax.random.split(rng, num))


# Rematerialisation (gradient checkpointing) of each transformer layer: what the backward pass may keep from the
# forward pass. 'none' keeps everything (fastest, most memory); 'full' keeps only each layer's input and recomputes
# the layer; 'dots' keeps matmul outputs; 'dots_with_no_batch_dims' keeps only weight-by-activation matmuls (the
# T5X / MaxText "minimal" policy: attention scores are recomputed).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def check_remat_policy(owner: str, policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"{owner}.remat_policy={policy!r}; expected one of {sorted(REMAT_POLICIES)}")


def remat(fn: Callable, policy: str) -> Callable:
    """`fn(module, *arrays)` wrapped by nnx.remat with a REMAT_POLICIES entry ('none' returns `fn` unchanged)."""
    if policy == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[policy])


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout: zeroes each element with probability `rate`, scales the rest by 1 / (1 - rate).

    Identity when `rng` is None or `rate` is 0.
    """
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nnx.Module):
    """T5 layer norm: `x * rsqrt(mean(x^2) + eps) * scale`, no mean subtraction and no bias.

    Statistics and the scale multiply are computed in float32; the result is cast to `dtype`.
    Parameter: `scale` [features] ('embed',), initialised to ones.
    """

    def __init__(self, features: int, *, epsilon: float = 1e-6, dtype: jnp.dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32), out_sharding=("embed",), eager_sharding=False)
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., features] -> [..., features] in `dtype`."""
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(variance + self.epsilon) * self.scale[...]
        return y.astype(self.dtype)


class Dense(nnx.Module):
    """Bias-free projection contracting the trailing input dims with a `[*in_dims, *out_dims]` kernel.

    The kernel is initialised as a 2D `[prod(in_dims), prod(out_dims)]` matrix and reshaped, so fan-in / fan-out
    based initialisers see the same fans as T5X `DenseGeneral`.
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        kernel_axes: Sequence[str],
        kernel_init: Initializer,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
    ):
        in_shape = _as_shape(in_features)
        out_shape = _as_shape(out_features)
        if len(kernel_axes) != len(in_shape) + len(out_shape):
            raise ValueError(f"Dense: kernel_axes {tuple(kernel_axes)} do not match the kernel shape "
                             f"{in_shape + out_shape}")
        flat = kernel_init(rngs.params(), (math.prod(in_shape), math.prod(out_shape)), jnp.float32)
        self.kernel = nnx.Param(flat.reshape(in_shape + out_shape), out_sharding=tuple(kernel_axes),
                               eager_sharding=False)
        self.num_in_dims = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., *in_dims] -> [..., *out_dims] in `dtype`."""
        n = self.num_in_dims
        contracting = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        kernel = self.kernel[...].astype(self.dtype)
        return jax.lax.dot_general(x.astype(self.dtype), kernel, (contracting, ((), ())))


def project_together(layers: Sequence[Dense], x: jax.Array, *, plain: type = Dense) -> list[jax.Array]:
    """`[layer(x) for layer in layers]`, computed as one matrix product when that is the same function.

    Projections of one input with kernels of one shape (T5's q / k / v and wi_0 / wi_1, Llama's gate / up) run as
    a single dot_general against the kernels stacked on a new axis: [..., *in_dims] x [*in_dims, G, *out_dims] ->
    [..., G, *out_dims], then split. Parameters stay separate (checkpoints, conversion and PEFT see the same tree),
    and the result is the same up to float summation order. One product of width G * out instead of G products
    reads the input once and runs the backward pass as one larger product too, which XLA:CPU runs faster (README,
    "Performance": 571 -> 631 tokens/s on the T5-small train step). Only layers of exactly the type `plain` without
    a bias are fused: others (LoRA, (IA)3, quantized bases, biased projections) are applied one by one, unchanged.
    """
    first = layers[0]
    fusable = len(layers) > 1 and all(
        type(layer) is plain and getattr(layer, "bias", None) is None and layer.kernel.shape == first.kernel.shape
        and layer.num_in_dims == first.num_in_dims and layer.dtype == first.dtype for layer in layers)
    if not fusable:
        return [layer(x) for layer in layers]
    n = first.num_in_dims
    kernel = jnp.stack([layer.kernel[...] for layer in layers], axis=n).astype(first.dtype)
    contracting = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    y = jax.lax.dot_general(x.astype(first.dtype), kernel, (contracting, ((), ())))
    group_axis = x.ndim - n
    # jnp.split (lax.split), not one slice per layer: its transpose concatenates the cotangents, where slices' would
    # pad each to the full [..., G, *out] and add them (three extra passes per projection in the backward pass).
    return [part.squeeze(group_axis) for part in jnp.split(y, len(layers), axis=group_axis)]


class Embed(nnx.Module):
    """Token embedding table `embedding` [vocab, embed] ('vocab', 'embed')."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        embedding_init: Initializer = jax.nn.initializers.normal(stddev=1.0),
        dtype: jnp.dtype = jnp.float32,
    ):
        table = embedding_init(rngs.params(), (num_embeddings, features), jnp.float32)
        self.embedding = nnx.Param(table, out_sharding=("vocab", "embed"), eager_sharding=False)
        self.dtype = dtype

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int tokens [batch, length] -> embeddings [batch, length, embed] in `dtype`."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits against the table (tied output layer): [..., embed] -> [..., vocab] in float32."""
        return jnp.einsum("...e,ve->...v", x.astype(jnp.float32), self.embedding[...])


# Gated MLP activations: name -> the function applied to `x @ wi_0` (gelu with the tanh approximation, as T5X's
# flax `nn.gelu` and HF's `gelu_new`).
GATED_ACTIVATIONS = {
    "gated-gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gated-silu": jax.nn.silu,
}


class MLP(nnx.Module):
    """Transformer feed-forward block, T5 style (no biases).

    - 'gated-gelu' (T5 v1.1): `(gelu_tanh(x @ wi_0) * (x @ wi_1)) @ wo`; parameters `wi_0`, `wi_1`, `wo`.
    - 'gated-silu' (UL2; T5X `mlp_activations = ('silu', 'linear')`): `(silu(x @ wi_0) * (x @ wi_1)) @ wo`.
    - 'relu' (T5 1.0): `relu(x @ wi) @ wo`; parameters `wi`, `wo`.
    Kernels: wi* [embed, mlp] ('embed', 'mlp'), wo [mlp, embed] ('mlp', 'embed'); all initialised
    variance_scaling(1.0, 'fan_in', 'truncated_normal') as T5X. Dropout is applied to the hidden activation.
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        activation: str,
        rngs: nnx.Rngs,
        dropout_rate: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
    ):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

        def dense(n_in: int, n_out: int, axes: tuple[str, str]) -> Dense:
            return Dense(n_in, n_out, kernel_axes=axes, kernel_init=init, rngs=rngs, dtype=dtype)

        if activation in GATED_ACTIVATIONS:
            self.wi_0 = dense(features, hidden_features, ("embed", "mlp"))
            self.wi_1 = dense(features, hidden_features, ("embed", "mlp"))
        elif activation == "relu":
            self.wi = dense(features, hidden_features, ("embed", "mlp"))
        else:
            raise ValueError(f"MLP: unknown activation {activation!r}; expected one of "
                             f"{sorted(GATED_ACTIVATIONS) + ['relu']}")
        self.wo = dense(hidden_features, features, ("mlp", "embed"))
        self.activation = activation
        self.dropout_rate = dropout_rate

    def __call__(self, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """[batch, length, embed] -> [batch, length, embed]."""
        if self.activation in GATED_ACTIVATIONS:
            gate, up = project_together((self.wi_0, self.wi_1), x)
            h = GATED_ACTIVATIONS[self.activation](gate) * up
        else:
            h = jax.nn.relu(self.wi(x))
        h = with_logical_constraint(h, ("batch", "length", "mlp"))
        h = dropout(h, self.dropout_rate, dropout_rng)
        return self.wo(h)


def _as_shape(features: int | Sequence[int]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)
