"""T5 encoder-decoder in Flax NNX: T5 v1.1 / Flan-T5 / mT5 by default, T5 1.0 through config options.

Architecture (as T5X and HF `T5ForConditionalGeneration`): pre-norm residual blocks with RMS layer norm (no bias),
relative position bias (bucketed; bidirectional in the encoder, causal in the decoder) computed once per stack
and shared by its layers, no attention logit scaling (1/sqrt(d_kv) is folded into the query initialisation),
gated-GELU MLP (gated-SiLU for UL2, ReLU for T5 1.0), a final norm per stack, no biases anywhere, and an untied
`lm_head` (or logits through the embedding rescaled by d_model**-0.5 with `tie_word_embeddings=True`).

Parameter tree (paths of `nnx.state(model)`; kernels `[in, out]`, attention in T5X einsum layout):

    shared.embedding                                    [vocab, embed]          ('vocab', 'embed')
    encoder.relative_bias.embedding                     [buckets, heads]        ('relpos_buckets', 'heads')
    encoder.layers[i].pre_attention_norm.scale          [embed]                 ('embed',)
    encoder.layers[i].attention.{q,k,v}.kernel          [embed, heads, kv]      ('embed', 'heads', 'kv')
    encoder.layers[i].attention.o.kernel                [heads, kv, embed]      ('heads', 'kv', 'embed')
    encoder.layers[i].pre_mlp_norm.scale                [embed]
    encoder.layers[i].mlp.{wi_0,wi_1}.kernel            [embed, mlp]            ('embed', 'mlp')  ('relu': mlp.wi)
    encoder.layers[i].mlp.wo.kernel                     [mlp, embed]            ('mlp', 'embed')
    encoder.final_norm.scale                            [embed]
    decoder.relative_bias.embedding                     [buckets, heads]
    decoder.layers[i].pre_self_attention_norm.scale, .self_attention.{q,k,v,o}.kernel,
    decoder.layers[i].pre_cross_attention_norm.scale, .cross_attention.{q,k,v,o}.kernel,
    decoder.layers[i].pre_mlp_norm.scale, .mlp.{wi_0,wi_1,wo}.kernel
    decoder.final_norm.scale                            [embed]
    lm_head.kernel                                      [embed, vocab]          ('embed', 'vocab')  (absent if tied)

With `scan_layers=True` each stack's layers are one stacked module: `encoder.layers.<path>` [num_layers, ...] with
logical axes ('layers', ...) (`itjax.models.scan`).

HF mapping: a torch Linear weight `W` [out, in] is `kernel = W.T` (reshaped to [embed, heads, kv] for q/k/v and
[heads, kv, embed] for o); HF's relative_attention_bias (owned by block 0) is `relative_bias.embedding` as is.

Masks are additive (-1e10) on float32 attention logits. Encoder self-attention and cross-attention mask padded
encoder keys (token 0); with packing (segment ids 1, 2, ..., 0 = padding) attention stays within a segment. The
decoder is causal. Relative positions use `arange` per row: inside a packed segment the differences equal those of
the segment's own positions and cross-segment pairs are masked, so `*_positions` inputs are not needed.

Randomness: `dropout_rng=None` is deterministic; otherwise dropout keys are derived from the given key with
`jax.random.split`, so the forward pass is a pure function of (params, inputs, dropout_rng).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from itjax.models import attention, scan
from itjax.models.layers import (HEAD_AXES, heads_first, HIDDEN_AXES, MASK_BIAS, MLP, Dense, Embed, RMSNorm,
                                 check_remat_policy, dropout, project_together, remat, split_rng)
from itjax.partitioning import with_logical_constraint

FEED_FORWARD_TYPES = ("gated-gelu", "gated-silu", "relu")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 hyperparameters (HF `T5Config` names).

    `dtype` is the activation / computation dtype ('float32' or 'bfloat16'); parameters stay float32 and
    softmax, norms and the final logits are computed in float32. `remat_policy`: what the backward pass keeps of
    each layer (`layers.REMAT_POLICIES`). `scan_layers`: store each stack's layers stacked
    (`encoder.layers.<path>` [num_encoder_layers, ...]) and run them with `jax.lax.scan` (`itjax.models.scan`).
    `attention_impl`: 'xla' (einsum, everywhere) or 'cudnn' (NVIDIA GPU, bfloat16; `itjax.models.attention`).
    """

    vocab_size: int
    d_model: int
    num_heads: int
    d_kv: int
    d_ff: int
    num_encoder_layers: int
    num_decoder_layers: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    feed_forward: str = "gated-gelu"
    tie_word_embeddings: bool = False
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"
    decoder_start_token_id: int = 0
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "xla"

    def __post_init__(self):
        check_remat_policy("T5Config", self.remat_policy)
        attention.check_implementation("T5Config", self.attention_impl, family="t5")
        if self.feed_forward not in FEED_FORWARD_TYPES:
            raise ValueError(f"T5Config.feed_forward={self.feed_forward!r}; expected one of {FEED_FORWARD_TYPES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"T5Config.dtype={self.dtype!r}; expected one of {DTYPES}")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


class DecodeCache(NamedTuple):
    """Functional state of incremental decoding (a pytree: thread it through `jax.lax` loops).

    self_keys, self_values: one per decoder layer, [batch, heads, max_decode_length, kv]; entry t holds the
        self-attention key / value of decoder position t once position t has been decoded (zeros before).
    cross_keys, cross_values: one per decoder layer, [batch, heads, input_length, kv], computed once from the
        encoder output.
    Heads come before positions (unlike the [batch, length, heads, kv] of `Attention.project_kv`): the attention
    products of a decoding step read this layout in place, where XLA:CPU would otherwise transpose every cached key
    and value tensor at every step.
    encoder_mask: [batch, input_length] bool, True at non-padding encoder tokens.
    With `scan_layers` the four per-layer fields are single arrays [num_decoder_layers, batch, ...].
    """

    self_keys: tuple[jax.Array, ...] | jax.Array
    self_values: tuple[jax.Array, ...] | jax.Array
    cross_keys: tuple[jax.Array, ...] | jax.Array
    cross_values: tuple[jax.Array, ...] | jax.Array
    encoder_mask: jax.Array

    def batch_axes(self) -> "DecodeCache":
        """The batch axis of every leaf (same structure), for beam search's per-beam copies and reordering."""
        per_layer = (0,) * len(self.self_keys) if isinstance(self.self_keys, tuple) else 1  # stacked: [L, batch]
        return DecodeCache(per_layer, per_layer, per_layer, per_layer, encoder_mask=0)


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> jax.Array:
    """Maps relative positions (key position - query position) to bucket ids in [0, num_buckets), as T5.

    Bidirectional: half of the buckets for keys after the query. Causal: keys after the query share bucket 0.
    Of the remaining buckets, half are exact distances 0 .. max_exact-1 and the rest grow logarithmically up to
    `max_distance`; larger distances share the last bucket.
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        offset = jnp.where(relative_position > 0, num_buckets, 0)
        distance = jnp.abs(relative_position)
    else:
        offset = 0
        distance = jnp.maximum(-relative_position, 0)
    max_exact = num_buckets // 2
    # The maximum only avoids log(0) in the branch that `where` discards for small distances.
    log_ratio = jnp.log(jnp.maximum(distance, max_exact).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return offset + jnp.where(distance < max_exact, distance, large)


def mask_to_bias(mask: jax.Array) -> jax.Array:
    """Boolean mask (True = attend) -> additive float32 bias (0 or MASK_BIAS), same shape."""
    return jnp.where(mask, 0.0, MASK_BIAS).astype(jnp.float32)


def _same_segment(query_segment_ids: jax.Array, key_segment_ids: jax.Array) -> jax.Array:
    """[batch, q], [batch, k] -> [batch, 1, q, k] bool."""
    return query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]


def encoder_attention_mask(encoder_input_tokens: jax.Array, encoder_segment_ids: jax.Array | None) -> jax.Array:
    """Encoder self-attention mask: non-padding keys of the same segment. [batch, 1, 1 or length, length] bool."""
    mask = (encoder_input_tokens > 0)[:, None, None, :]
    if encoder_segment_ids is not None:
        mask = mask & _same_segment(encoder_segment_ids, encoder_segment_ids)
    return mask


def decoder_attention_mask(length: int, decoder_segment_ids: jax.Array | None) -> jax.Array:
    """Decoder self-attention mask: causal, within the same segment. [1 or batch, 1, length, length] bool."""
    mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    if decoder_segment_ids is not None:
        mask = mask & _same_segment(decoder_segment_ids, decoder_segment_ids)
    return mask


def cross_attention_mask(
    encoder_input_tokens: jax.Array,
    encoder_segment_ids: jax.Array | None,
    decoder_segment_ids: jax.Array | None,
) -> jax.Array:
    """Cross-attention mask: non-padding encoder keys of the query's segment. [batch, 1, 1 or l_out, l_in] bool."""
    mask = (encoder_input_tokens > 0)[:, None, None, :]
    if encoder_segment_ids is not None:
        mask = mask & _same_segment(decoder_segment_ids, encoder_segment_ids)
    return mask


class RelativePositionBias(nnx.Module):
    """Bucketed relative position bias; `embedding` [num_buckets, heads] ('relpos_buckets', 'heads')."""

    def __init__(self, config: T5Config, *, bidirectional: bool, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        table = init(rngs.params(), (config.relative_attention_num_buckets, config.num_heads), jnp.float32)
        self.embedding = nnx.Param(table, out_sharding=("relpos_buckets", "heads"),
                                   eager_sharding=False)
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """query_positions [q], key_positions [k] (int) -> bias [1, heads, q, k] float32."""
        buckets = relative_position_bucket(
            key_positions[None, :] - query_positions[:, None],
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        values = jnp.take(self.embedding[...], buckets, axis=0)  # [q, k, heads]
        return jnp.transpose(values, (2, 0, 1))[None]


class Attention(nnx.Module):
    """T5 multi-head attention: no logit scaling, additive bias (position bias + mask), no biases.

    q/k/v kernels [embed, heads, kv]; o kernel [heads, kv, embed]. Initialisation as T5X: q normal with stddev
    (d_model * d_kv)**-0.5 (the folded 1/sqrt(d_kv)), k and v d_model**-0.5, o (heads * d_kv)**-0.5.
    """

    # Prefix-tuning hook (itjax.peft.prefix_tuning.Prefix): None, or a module whose `prepend(keys, values, bias)`
    # adds P trainable keys / values (with zero bias) that every query attends to.
    extra_kv = None

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, h, kv = config.d_model, config.num_heads, config.d_kv
        dtype = config.activation_dtype

        def dense(n_in, n_out, axes, stddev):
            init = jax.nn.initializers.normal(stddev=stddev)
            return Dense(n_in, n_out, kernel_axes=axes, kernel_init=init, rngs=rngs, dtype=dtype)

        self.q = dense(d, (h, kv), ("embed", "heads", "kv"), (d * kv) ** -0.5)
        self.k = dense(d, (h, kv), ("embed", "heads", "kv"), d**-0.5)
        self.v = dense(d, (h, kv), ("embed", "heads", "kv"), d**-0.5)
        self.o = dense((h, kv), d, ("heads", "kv", "embed"), (h * kv) ** -0.5)
        self.dropout_rate = config.dropout_rate
        self.dtype = dtype
        self.implementation = config.attention_impl

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """[batch, length, embed] -> keys, values, each [batch, length, heads, kv]."""
        keys, values = project_together((self.k, self.v), x)
        return with_logical_constraint(keys, HEAD_AXES), with_logical_constraint(values, HEAD_AXES)

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention projections in one product: [batch, length, embed] -> queries, keys, values, each
        [batch, length, heads, kv]."""
        return tuple(with_logical_constraint(y, HEAD_AXES) for y in project_together((self.q, self.k, self.v), x))

    def attend(
        self,
        x: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        bias: jax.Array,
        *,
        dropout_rng: jax.Array | None = None,
        implementation: str | None = None,
        queries: jax.Array | None = None,
    ) -> jax.Array:
        """Queries from x [batch, q, embed] attend to keys / values [batch, k, heads, kv].

        bias: float32, broadcastable to [batch, heads, q, k]. implementation: overrides the config's
        `attention_impl` ('xla' for cached decoding steps). queries: [batch, q, heads, kv] when already projected
        (`project_qkv`), else `q(x)`. Returns [batch, q, embed].
        """
        if self.extra_kv is not None:
            keys, values, bias = self.extra_kv.prepend(keys, values, bias)
        queries = with_logical_constraint(self.q(x) if queries is None else queries, HEAD_AXES)
        out = attention.attend(queries, keys, values, implementation=implementation or self.implementation,
                               bias=bias, dtype=self.dtype, dropout_rate=self.dropout_rate, dropout_rng=dropout_rng)
        return self.o(with_logical_constraint(out, HEAD_AXES))

    def __call__(
        self, x: jax.Array, kv_input: jax.Array, bias: jax.Array, *, dropout_rng: jax.Array | None = None
    ) -> jax.Array:
        """x [batch, q, embed] attends to kv_input [batch, k, embed]; returns [batch, q, embed]."""
        if kv_input is x:
            queries, keys, values = self.project_qkv(x)
            return self.attend(x, keys, values, bias, dropout_rng=dropout_rng, queries=queries)
        return self.attend(x, *self.project_kv(kv_input), bias, dropout_rng=dropout_rng)


def _norm(config: T5Config) -> RMSNorm:
    return RMSNorm(config.d_model, epsilon=config.layer_norm_epsilon, dtype=config.activation_dtype)


def _mlp(config: T5Config, rngs: nnx.Rngs) -> MLP:
    return MLP(
        config.d_model,
        config.d_ff,
        activation=config.feed_forward,
        dropout_rate=config.dropout_rate,
        dtype=config.activation_dtype,
        rngs=rngs,
    )


class EncoderLayer(nnx.Module):
    """Pre-norm self-attention block and MLP block, each `x + dropout(sublayer(norm(x)))`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.pre_attention_norm = _norm(config)
        self.attention = Attention(config, rngs=rngs)
        self.pre_mlp_norm = _norm(config)
        self.mlp = _mlp(config, rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(self, x: jax.Array, bias: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """x [batch, length, embed], bias [batch or 1, heads, length, length] -> [batch, length, embed]."""
        attention_rng, attention_out_rng, mlp_rng, mlp_out_rng = split_rng(dropout_rng, 4)
        h = self.pre_attention_norm(x)
        h = self.attention(h, h, bias, dropout_rng=attention_rng)
        x = with_logical_constraint(x + dropout(h, self.dropout_rate, attention_out_rng), HIDDEN_AXES)
        h = self.mlp(self.pre_mlp_norm(x), dropout_rng=mlp_rng)
        return with_logical_constraint(x + dropout(h, self.dropout_rate, mlp_out_rng), HIDDEN_AXES)


class DecoderLayer(nnx.Module):
    """Pre-norm causal self-attention, cross-attention and MLP blocks, each `x + dropout(sublayer(norm(x)))`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.pre_self_attention_norm = _norm(config)
        self.self_attention = Attention(config, rngs=rngs)
        self.pre_cross_attention_norm = _norm(config)
        self.cross_attention = Attention(config, rngs=rngs)
        self.pre_mlp_norm = _norm(config)
        self.mlp = _mlp(config, rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self,
        x: jax.Array,
        self_bias: jax.Array,
        cross_keys: jax.Array,
        cross_values: jax.Array,
        cross_bias: jax.Array,
        *,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One decoder layer.

        x: [batch, q, embed]; self_bias: float32 broadcastable to [batch, heads, q, k_self];
        cross_keys / cross_values: [batch, l_in, heads, kv]; cross_bias: broadcastable to [batch, heads, q, l_in].
        cache: optional (keys, values) [batch, heads, max_len, kv] (the `DecodeCache` layout); the new keys /
        values of x are written at `cache_index` (scalar int) and attention runs over the whole cache (self_bias
        masks future entries). Returns (y [batch, q, embed], (keys, values) attended to by self-attention: the
        updated cache in the cache layout when cached, else [batch, q, heads, kv]).
        """
        rngs = split_rng(dropout_rng, 6)
        h = self.pre_self_attention_norm(x)
        queries, keys, values = self.self_attention.project_qkv(h)
        if cache is not None:
            cache = (jax.lax.dynamic_update_slice_in_dim(cache[0], heads_first(keys), cache_index, axis=2),
                     jax.lax.dynamic_update_slice_in_dim(cache[1], heads_first(values), cache_index, axis=2))
            keys, values = heads_first(cache[0]), heads_first(cache[1])  # views XLA folds into the products
        implementation = None if cache is None else "xla"  # a cached step (one query): no kernel applies
        h = self.self_attention.attend(h, keys, values, self_bias, dropout_rng=rngs[0], implementation=implementation,
                                       queries=queries)
        x = with_logical_constraint(x + dropout(h, self.dropout_rate, rngs[1]), HIDDEN_AXES)
        h = self.pre_cross_attention_norm(x)
        h = self.cross_attention.attend(h, cross_keys, cross_values, cross_bias, dropout_rng=rngs[2],
                                        implementation=implementation)
        x = with_logical_constraint(x + dropout(h, self.dropout_rate, rngs[3]), HIDDEN_AXES)
        h = self.mlp(self.pre_mlp_norm(x), dropout_rng=rngs[4])
        x = with_logical_constraint(x + dropout(h, self.dropout_rate, rngs[5]), HIDDEN_AXES)
        return x, ((keys, values) if cache is None else cache)


def _layer_stack(layers: list[nnx.Module], config: T5Config) -> nnx.Module:
    """The layers of one stack: stacked for `scan_layers`, else an nnx.List."""
    return scan.stack_modules(layers) if config.scan_layers else nnx.List(layers)


def _stack_rngs(rng: jax.Array | None, num_layers: int):
    """Dropout keys of a stack: (embedding dropout, [num_layers] per-layer keys, final dropout); Nones if rng is
    None. A scanned and a per-layer stack get the same keys."""
    if rng is None:
        return None, None, None
    keys = jax.random.split(rng, num_layers + 2)
    return keys[0], keys[1:-1], keys[-1]


def _per_layer(keys: jax.Array | None, num_layers: int) -> list:
    return [None] * num_layers if keys is None else list(keys)


class Encoder(nnx.Module):
    """Encoder stack: dropout(embeddings) -> layers (shared bidirectional position bias) -> final norm -> dropout."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.relative_bias = RelativePositionBias(config, bidirectional=True, rngs=rngs)
        self.layers = _layer_stack([EncoderLayer(config, rngs=rngs) for _ in range(config.num_encoder_layers)],
                                   config)
        self.final_norm = _norm(config)
        self.dropout_rate = config.dropout_rate
        self.remat_policy = config.remat_policy
        self.scan_layers = config.scan_layers
        self.num_layers = config.num_encoder_layers

    def __call__(self, x: jax.Array, mask: jax.Array, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Embedded inputs x [batch, length, embed], mask bool [batch, 1, 1 or length, length].

        Returns the normed encoder output [batch, length, embed].
        """
        positions = jnp.arange(x.shape[1])
        bias = self.relative_bias(positions, positions) + mask_to_bias(mask)
        first_rng, layer_rngs, last_rng = _stack_rngs(dropout_rng, self.num_layers)
        x = dropout(x, self.dropout_rate, first_rng)
        if self.scan_layers:
            x, _ = scan.scan(self.layers, lambda layer, x, rng: (layer(x, bias, dropout_rng=rng), None), x,
                             layer_rngs, remat_policy=self.remat_policy)
        else:
            run = remat(lambda layer, x, bias, rng: layer(x, bias, dropout_rng=rng), self.remat_policy)
            for layer, rng in zip(self.layers, _per_layer(layer_rngs, self.num_layers)):
                x = run(layer, x, bias, rng)
        return dropout(self.final_norm(x), self.dropout_rate, last_rng)


class Decoder(nnx.Module):
    """Decoder stack: dropout(embeddings) -> layers (shared causal position bias) -> final norm -> dropout."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.relative_bias = RelativePositionBias(config, bidirectional=False, rngs=rngs)
        self.layers = _layer_stack([DecoderLayer(config, rngs=rngs) for _ in range(config.num_decoder_layers)],
                                   config)
        self.final_norm = _norm(config)
        self.dropout_rate = config.dropout_rate
        self.remat_policy = config.remat_policy
        self.scan_layers = config.scan_layers
        self.num_layers = config.num_decoder_layers

    def __call__(
        self,
        y: jax.Array,
        encoded: jax.Array,
        self_mask: jax.Array,
        cross_mask: jax.Array,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced pass over all positions.

        y: embedded decoder inputs [batch, l_out, embed]; encoded: [batch, l_in, embed];
        self_mask: bool [batch or 1, 1, l_out, l_out]; cross_mask: bool [batch, 1, 1 or l_out, l_in].
        Returns normed hidden states [batch, l_out, embed].
        """
        positions = jnp.arange(y.shape[1])
        self_bias = self.relative_bias(positions, positions) + mask_to_bias(self_mask)
        cross_bias = mask_to_bias(cross_mask)
        first_rng, layer_rngs, last_rng = _stack_rngs(dropout_rng, self.num_layers)
        y = dropout(y, self.dropout_rate, first_rng)

        def run_layer(layer, y, encoded, self_bias, cross_bias, rng):
            cross_keys, cross_values = layer.cross_attention.project_kv(encoded)
            return layer(y, self_bias, cross_keys, cross_values, cross_bias, dropout_rng=rng)[0]

        if self.scan_layers:
            y, _ = scan.scan(self.layers,
                             lambda layer, y, rng: (run_layer(layer, y, encoded, self_bias, cross_bias, rng), None),
                             y, layer_rngs, remat_policy=self.remat_policy)
        else:
            run = remat(run_layer, self.remat_policy)
            for layer, rng in zip(self.layers, _per_layer(layer_rngs, self.num_layers)):
                y = run(layer, y, encoded, self_bias, cross_bias, rng)
        return dropout(self.final_norm(y), self.dropout_rate, last_rng)

    def init_cache(self, encoded: jax.Array, encoder_mask: jax.Array, max_decode_length: int) -> DecodeCache:
        """encoded [batch, l_in, embed], encoder_mask bool [batch, l_in] -> empty self cache + cross keys / values."""
        if self.scan_layers:
            _, cross = scan.scan(
                self.layers, lambda layer, carry, _: (carry, tuple(map(heads_first, layer.cross_attention.project_kv(
                    encoded)))), None)
            cross_keys, cross_values = jax.lax.optimization_barrier(cross)  # see below
            empty = jnp.zeros(cross_keys.shape[:3] + (max_decode_length,) + cross_keys.shape[4:], cross_keys.dtype)
            return DecodeCache(empty, empty, cross_keys, cross_values, encoder_mask=encoder_mask)
        # The barrier keeps XLA from cancelling this transpose against the one in each step (it would then carry
        # [batch, length, heads, kv] and transpose inside the loop, at every step).
        cross = jax.lax.optimization_barrier(
            [tuple(map(heads_first, layer.cross_attention.project_kv(encoded))) for layer in self.layers])
        batch, heads, _, kv = cross[0][0].shape
        empty = jnp.zeros((batch, heads, max_decode_length, kv), cross[0][0].dtype)
        return DecodeCache(
            self_keys=(empty,) * self.num_layers,
            self_values=(empty,) * self.num_layers,
            cross_keys=tuple(k for k, _ in cross),
            cross_values=tuple(v for _, v in cross),
            encoder_mask=encoder_mask,
        )

    def step(self, y: jax.Array, position: jax.Array, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
        """One decoding step (no dropout): y [batch, 1, embed] is the embedded token at `position` (scalar int).

        Returns normed hidden states [batch, 1, embed] and the cache with this position's keys / values written.
        """
        key_positions = jnp.arange(cache.self_keys[0].shape[2])
        causal = mask_to_bias(key_positions <= position)[None, None, None, :]
        self_bias = self.relative_bias(jnp.reshape(position, (1,)), key_positions) + causal
        cross_bias = mask_to_bias(cache.encoder_mask[:, None, None, :])
        if self.scan_layers:
            def body(layer, y, layer_cache):
                self_keys, self_values, cross_keys, cross_values = layer_cache
                return layer(y, self_bias, heads_first(cross_keys), heads_first(cross_values), cross_bias,
                             cache=(self_keys, self_values), cache_index=position)
            y, (keys, values) = scan.scan(self.layers, body, y, (cache.self_keys, cache.self_values,
                                                                 cache.cross_keys, cache.cross_values))
            return self.final_norm(y), cache._replace(self_keys=keys, self_values=values)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            y, (keys, values) = layer(
                y,
                self_bias,
                heads_first(cache.cross_keys[i]),
                heads_first(cache.cross_values[i]),
                cross_bias,
                cache=(cache.self_keys[i], cache.self_values[i]),
                cache_index=position,
            )
            new_keys.append(keys)
            new_values.append(values)
        cache = cache._replace(self_keys=tuple(new_keys), self_values=tuple(new_values))
        return self.final_norm(y), cache


def _mark_prompt_slots(prompt, tokens: jax.Array, slots: jax.Array | None) -> jax.Array:
    """Tokens as masks see them: the packed prompt slots (token 0) become real."""
    if slots is None:
        return tokens
    if prompt is None:
        raise ValueError("T5: encoder_prompt_slots given but the model has no input_prompt (PromptTuning).")
    return prompt.mark_slots(tokens, slots)


class T5(nnx.Module):
    """T5 encoder-decoder. See the module docstring for the parameter tree and masking conventions."""

    # Prompt-tuning hook (itjax.peft.prompt_tuning.Prompt): None, or a module that inserts P trainable vectors into
    # the embedded encoder input (`insert`) and the matching never-masked entries into its tokens / segment ids
    # (`insert_ids`), so the encoder, cross-attention and decoding all see P + l_in positions.
    input_prompt = None

    # Packed rows instead carry P prompt slots per segment (`encoder_prompt_slots`, itjax.data.prompt_slots): the
    # prompt is written into them (`fill`, `mark_slots`) and the lengths stay.
    def _prompted_ids(self, encoder_input_tokens, encoder_segment_ids=None, prompt_slots=None):
        if self.input_prompt is None or prompt_slots is not None:
            return _mark_prompt_slots(self.input_prompt, encoder_input_tokens, prompt_slots), encoder_segment_ids
        if encoder_segment_ids is not None:  # one prompt in front of the row would serve its first example only
            raise ValueError("T5: packed rows (encoder_segment_ids) with an input_prompt need encoder_prompt_slots: "
                             "build them with feature_converter(pack=True, "
                             "**PromptTuning.feature_converter_kwargs(True)).")
        return self.input_prompt.insert_ids(encoder_input_tokens, encoder_segment_ids)

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.shared = Embed(config.vocab_size, config.d_model, rngs=rngs, dtype=config.activation_dtype)
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(
                config.d_model,
                config.vocab_size,
                kernel_axes=("embed", "vocab"),
                kernel_init=jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                rngs=rngs,
                dtype=jnp.float32,
            )

    def encode(
        self,
        encoder_input_tokens: jax.Array,
        encoder_segment_ids: jax.Array | None = None,
        *,
        prompt_slots: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """int32 tokens [batch, l_in] (0 = padding), optional segment ids [batch, l_in] -> [batch, l_in, embed]
        ([batch, P + l_in, embed] with an `input_prompt` of P vectors, unless `prompt_slots` [batch, l_in] give
        the prompt's places in packed rows)."""
        x = self.shared(encoder_input_tokens)
        if self.input_prompt is not None:
            x = self.input_prompt.insert(x) if prompt_slots is None else self.input_prompt.fill(x, prompt_slots)
        encoder_input_tokens, encoder_segment_ids = self._prompted_ids(encoder_input_tokens, encoder_segment_ids,
                                                                       prompt_slots)
        mask = encoder_attention_mask(encoder_input_tokens, encoder_segment_ids)
        x = with_logical_constraint(x, HIDDEN_AXES)
        return self.encoder(x, mask, dropout_rng=dropout_rng)

    def decode(
        self,
        encoded: jax.Array,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        *,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        encoder_prompt_slots: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced decoder: logits [batch, l_out, vocab] float32.

        encoded [batch, l_in, embed]; encoder_input_tokens [batch, l_in] (only for the padding mask);
        decoder_input_tokens [batch, l_out]; segment ids (both or neither) [batch, l_in] / [batch, l_out].
        """
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("T5.decode: pass both encoder_segment_ids and decoder_segment_ids (packed) or neither")
        self_mask = decoder_attention_mask(decoder_input_tokens.shape[1], decoder_segment_ids)
        encoder_input_tokens, encoder_segment_ids = self._prompted_ids(encoder_input_tokens, encoder_segment_ids,
                                                                       encoder_prompt_slots)
        cross_mask = cross_attention_mask(encoder_input_tokens, encoder_segment_ids, decoder_segment_ids)
        y = with_logical_constraint(self.shared(decoder_input_tokens), HIDDEN_AXES)
        y = self.decoder(y, encoded, self_mask, cross_mask, dropout_rng=dropout_rng)
        return self._logits(y)

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        *,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        encoder_positions: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        encoder_prompt_slots: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Full forward pass: logits [batch, l_out, vocab] float32.

        `encoder_positions` / `decoder_positions` (seqio packing features) are accepted so a packed batch can be
        passed as is, and ignored: relative positions from `arange` are equivalent within each segment.
        `encoder_prompt_slots` [batch, l_in]: where packed rows hold the `input_prompt` (itjax.data.prompt_slots).
        """
        del encoder_positions, decoder_positions
        encoder_rng, decoder_rng = split_rng(dropout_rng, 2)
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, prompt_slots=encoder_prompt_slots,
                              dropout_rng=encoder_rng)
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            encoder_prompt_slots=encoder_prompt_slots,
            dropout_rng=decoder_rng,
        )

    def init_decode_cache(
        self, encoded: jax.Array, encoder_input_tokens: jax.Array, max_decode_length: int
    ) -> DecodeCache:
        """Cache for `decode_step`: encoded [batch, l_in, embed], encoder_input_tokens [batch, l_in] (unpacked)."""
        return self.decoder.init_cache(encoded, self._prompted_ids(encoder_input_tokens)[0] > 0, max_decode_length)

    def decode_step(
        self, decoder_input_tokens: jax.Array, position: jax.Array, cache: DecodeCache
    ) -> tuple[jax.Array, DecodeCache]:
        """One incremental decoding step (deterministic).

        decoder_input_tokens: int32 [batch], the tokens at decoder position `position` (scalar int32, the same
        for every row; position 0 takes the start token). Returns logits [batch, vocab] float32 for the next
        token and the cache updated at `position`.
        """
        y = self.shared(decoder_input_tokens[:, None])
        y, cache = self.decoder.step(y, position, cache)
        return self._logits(y)[:, 0], cache

    def _logits(self, y: jax.Array) -> jax.Array:
        """Decoder hidden states [batch, length, embed] -> logits [batch, length, vocab] float32."""
        if self.config.tie_word_embeddings:
            logits = self.shared.attend(y.astype(jnp.float32) * self.config.d_model**-0.5)
        else:
            logits = self.lm_head(y)
        return with_logical_constraint(logits, ("batch", "length", "vocab"))
