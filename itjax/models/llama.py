"""Llama-family decoder-only transformer in Flax NNX: Llama 2 / 3.x, Mistral and Qwen2.

Architecture (as HF `LlamaForCausalLM`): token embedding, pre-norm residual blocks
`x + attn(norm(x))`, `x + mlp(norm(x))` with RMSNorm (weight, no bias), grouped-query causal self-attention with
rotary position embeddings (HF's `rotate_half` convention: the first and second halves of each head form the
rotated pairs; optional Llama 3 frequency scaling), a SwiGLU MLP `down(silu(gate(x)) * up(x))`, a final RMSNorm
and an output layer `lm_head` (or the transposed token embedding when `tie_word_embeddings`). Qwen2 adds biases to
the q / k / v projections (`attention_bias=True`); no other layer has a bias.

Parameter tree (paths of `nnx.state(model)`; kernels `[in, out]`, attention in T5X einsum layout) and the HF
tensor each one comes from (`W` a torch Linear weight [out, in], `D` = head_dim, `H` = heads, `K` = kv heads):

    embed_tokens.embedding                          [vocab, embed]       ('vocab', 'embed')   model.embed_tokens.weight
    layers[i].input_layernorm.scale                 [embed]              ('embed',)           ...input_layernorm.weight
    layers[i].self_attn.q_proj.kernel               [embed, H, D]        ('embed', 'heads', 'kv')   W.T.reshape
    layers[i].self_attn.{k_proj,v_proj}.kernel      [embed, K, D]        ('embed', 'heads', 'kv')   W.T.reshape
    layers[i].self_attn.{q,k,v}_proj.bias           [H or K, D]          ('heads', 'kv')      bias.reshape (Qwen2)
    layers[i].self_attn.o_proj.kernel               [H, D, embed]        ('heads', 'kv', 'embed')   W.T.reshape
    layers[i].post_attention_layernorm.scale        [embed]              ('embed',)
    layers[i].mlp.{gate_proj,up_proj}.kernel        [embed, mlp]         ('embed', 'mlp')     W.T
    layers[i].mlp.down_proj.kernel                  [mlp, embed]         ('mlp', 'embed')     W.T
    norm.scale                                      [embed]              ('embed',)           model.norm.weight
    lm_head.kernel                                  [embed, vocab]       ('embed', 'vocab')   lm_head.weight.T

(HF names are prefixed `model.layers.{i}.` except `lm_head.weight`; `lm_head` is absent when tied;
conversion: `itjax.conversion.llama`.) With `scan_layers=True` the layers are one stacked module: `layers.<path>`
[num_layers, ...] with logical axes ('layers', ...) (`itjax.models.scan`). The kv-head dimension of k / v uses the
logical name 'heads' as the query heads do, so tensor-parallel rules shard both the same way.

Masks: attention is causal (and, with `sliding_window` W, limited to the last W positions); with packing
(`segment_ids` 1, 2, ..., 0 = padding) it stays within a segment and `positions` restart per segment. Masked
pairs get a finite additive bias (`layers.MASK_BIAS`) on float32 logits.

Incremental decoding uses a functional `DecodeCache` (keys / values [batch, max_length, kv_heads, head_dim] per
layer, a per-slot validity mask and a per-row write index), so prompts may be left- or right-padded: `prefill`
writes a whole prompt, `decode_step` one token per row; both are pure and run inside `jax.lax.while_loop`.

Randomness: `dropout_rng=None` is deterministic; otherwise dropout (rate `dropout_rate`, on each residual branch)
keys are derived with `jax.random.split`. HF Llama has no residual dropout, so use 0.0 for parity.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itjax.models import attention, scan
from itjax.models.layers import (HEAD_AXES, heads_first, HIDDEN_AXES, Dense, Embed, RMSNorm, check_remat_policy,
                                 dropout, project_together, remat, split_rng)
from itjax.partitioning import with_logical_constraint

DTYPES = ("float32", "bfloat16")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama-family hyperparameters (HF names where they exist; `num_layers` = HF `num_hidden_layers`).

    head_dim: per-head width; None means hidden_size // num_heads.
    rope_scaling: None, or HF's llama3 dict {'rope_type': 'llama3', 'factor', 'low_freq_factor',
        'high_freq_factor', 'original_max_position_embeddings'}.
    attention_bias: q / k / v projection biases (Qwen2); the output projection never has one.
    dtype: activation dtype ('float32' or 'bfloat16'); parameters stay float32, norms, RoPE, softmax and the
        final logits are computed in float32.
    sliding_window: None (full causal attention) or W: each query attends to itself and the W - 1 tokens before
        it (Mistral v0.1; HF `kv_idx > q_idx - sliding_window`), in training and in cached decoding.
    remat_policy: what the backward pass keeps of each layer (`layers.REMAT_POLICIES`).
    scan_layers: store the layers stacked (`layers.<path>` [num_layers, ...]) and run them with `jax.lax.scan`
        (see `itjax.models.scan`); the same function as the per-layer model.
    attention_impl: 'xla' (einsum, everywhere), 'cudnn' (NVIDIA GPU, bfloat16) or 'splash' (TPU); see
        `itjax.models.attention`. Cached decoding runs 'xla' with each.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dropout_rate: float = 0.0
    dtype: str = "float32"
    sliding_window: int | None = None
    remat_policy: str = "none"
    scan_layers: bool = False
    attention_impl: str = "xla"

    def __post_init__(self):
        check_remat_policy("LlamaConfig", self.remat_policy)
        attention.check_implementation("LlamaConfig", self.attention_impl, family="llama")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"LlamaConfig.sliding_window={self.sliding_window}; expected None or a positive int")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.dtype not in DTYPES:
            raise ValueError(f"LlamaConfig.dtype={self.dtype!r}; expected one of {DTYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            if self.rope_scaling.get("rope_type") != "llama3" or any(k not in self.rope_scaling
                                                                     for k in LLAMA3_ROPE_KEYS):
                raise ValueError(f"LlamaConfig.rope_scaling={dict(self.rope_scaling)!r}: only None or a 'llama3' dict "
                                 f"with keys {LLAMA3_ROPE_KEYS} is supported")
            # A hashable, immutable copy keeps the frozen dataclass usable as a jit static argument.
            object.__setattr__(self, "rope_scaling", _FrozenDict(self.rope_scaling))

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


gin.external_configurable(LlamaConfig, module="itjax.models")


class _FrozenDict(dict):
    """A read-only, hashable dict for `LlamaConfig.rope_scaling`."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def _readonly(self, *args, **kwargs):
        raise TypeError("LlamaConfig.rope_scaling is read-only")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------------------------------------------


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim // 2] float32 (HF `rope_init_fn`, incl. llama3 scaling)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if config.rope_scaling is None:
        return inv_freq.astype(np.float32)
    s = config.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] by positions [batch, length] (HF rotate_half layout)."""
    angles = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq)  # [batch, length, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------


def _kernel_init() -> jax.nn.initializers.Initializer:
    """HF's Llama initialisation: normal(0, initializer_range=0.02)."""
    return jax.nn.initializers.normal(stddev=0.02)


class Projection(Dense):
    """`Dense` with an optional bias over the output dims (`bias` [*out_dims], axes = the kernel's output axes)."""

    def __init__(
        self,
        in_features: int | tuple[int, ...],
        out_features: int | tuple[int, ...],
        *,
        kernel_axes: tuple[str, ...],
        use_bias: bool,
        rngs: nnx.Rngs,
        dtype: jnp.dtype,
    ):
        super().__init__(in_features, out_features, kernel_axes=kernel_axes, kernel_init=_kernel_init(),
                         rngs=rngs, dtype=dtype)
        if use_bias:
            out_shape = self.kernel.shape[self.num_in_dims:]
            self.bias = nnx.Param(jnp.zeros(out_shape, jnp.float32),
                                  out_sharding=tuple(kernel_axes[self.num_in_dims:]),
                                  eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., *in_dims] -> [..., *out_dims] in `dtype`."""
        y = super().__call__(x)
        return y + self.bias[...].astype(self.dtype) if hasattr(self, "bias") else y


class DecodeCache(NamedTuple):
    """Functional state of incremental decoding (a pytree: thread it through `jax.lax` loops).

    keys, values: one per layer, [batch, kv_heads, max_length, head_dim] (rotary already applied to keys); with
        `scan_layers` one array [num_layers, batch, kv_heads, max_length, head_dim] each. Heads come before slots
        so that the attention products of a decoding step read the cache in place (XLA:CPU would otherwise
        transpose every layer's cache at every step).
    valid: [batch, max_length] bool, True at slots holding a real (non-padding) token.
    index: [batch] int32, the slot the next token of each row is written to.
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    valid: jax.Array
    index: jax.Array

    def batch_axes(self) -> "DecodeCache":
        """The batch axis of every leaf (same structure), for beam search's per-beam copies and reordering."""
        per_layer = (0,) * len(self.keys) if isinstance(self.keys, tuple) else 1  # stacked: [layers, batch, ...]
        return DecodeCache(keys=per_layer, values=per_layer, valid=0, index=0)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings; logits scaled by head_dim ** -0.5."""

    # Prefix-tuning hook (itjax.peft.prefix_tuning.Prefix): None, or a module whose `prepend(keys, values, mask)`
    # adds P trainable (already rotated) keys / values that every query attends to.
    extra_kv = None

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, h, k, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        dtype = config.activation_dtype

        def proj(n_in, n_out, axes, use_bias):
            return Projection(n_in, n_out, kernel_axes=axes, use_bias=use_bias, rngs=rngs, dtype=dtype)

        self.q_proj = proj(e, (h, d), ("embed", "heads", "kv"), config.attention_bias)
        self.k_proj = proj(e, (k, d), ("embed", "heads", "kv"), config.attention_bias)
        self.v_proj = proj(e, (k, d), ("embed", "heads", "kv"), config.attention_bias)
        self.o_proj = proj((h, d), e, ("heads", "kv", "embed"), False)
        self.config = config
        self.dtype = dtype

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [batch, l, embed], positions [batch, l] -> rotated queries [batch, l, heads, head_dim] and rotated
        keys / values [batch, l, kv_heads, head_dim]."""
        inv_freq = rope_inverse_frequencies(self.config)
        if self.config.num_heads == self.config.num_kv_heads:  # queries, keys and values share a shape
            queries, keys, values = project_together((self.q_proj, self.k_proj, self.v_proj), x, plain=Projection)
        else:  # grouped-query attention: keys and values share a shape
            queries = self.q_proj(x)
            keys, values = project_together((self.k_proj, self.v_proj), x, plain=Projection)
        queries = apply_rope(with_logical_constraint(queries, HEAD_AXES), positions, inv_freq)
        keys = apply_rope(with_logical_constraint(keys, HEAD_AXES), positions, inv_freq)
        values = with_logical_constraint(values, HEAD_AXES)
        return queries, keys, values

    def attend(self, queries: jax.Array, keys: jax.Array, values: jax.Array,
               mask: jax.Array | attention.CausalMask) -> jax.Array:
        """queries [batch, q, heads, D], keys / values [batch, k, kv_heads, D], mask: an `attention.CausalMask`
        (training: runs the config's `attention_impl`) or a bool array broadcastable to [batch, 1, q, k] (cached
        decoding: runs 'xla') -> [batch, q, embed]."""
        implementation = self.config.attention_impl if isinstance(mask, attention.CausalMask) else "xla"
        if self.extra_kv is not None:
            dense = mask.dense if isinstance(mask, attention.CausalMask) else mask
            keys, values, mask = self.extra_kv.prepend(keys, values, dense)
        out = attention.attend(queries, keys, values, implementation=implementation, mask=mask,
                               scale=queries.shape[-1] ** -0.5, dtype=self.dtype)
        return self.o_proj(with_logical_constraint(out, HEAD_AXES))


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: `down_proj(silu(gate_proj(x)) * up_proj(x))`, no biases."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        e, m, dtype = config.hidden_size, config.intermediate_size, config.activation_dtype
        self.gate_proj = Projection(e, m, kernel_axes=("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
        self.up_proj = Projection(e, m, kernel_axes=("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype)
        self.down_proj = Projection(m, e, kernel_axes=("mlp", "embed"), use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, length, embed] -> [batch, length, embed]."""
        gate, up = project_together((self.gate_proj, self.up_proj), x, plain=Projection)
        h = jax.nn.silu(gate) * up
        return self.down_proj(with_logical_constraint(h, ("batch", "length", "mlp")))


def _norm(config: LlamaConfig) -> RMSNorm:
    return RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, dtype=config.activation_dtype)


class LlamaLayer(nnx.Module):
    """Pre-norm block: `x + dropout(attn(input_layernorm(x)))`, then `x + dropout(mlp(post_attention_layernorm(x)))`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = _norm(config)
        self.self_attn = LlamaAttention(config, rngs=rngs)
        self.post_attention_layernorm = _norm(config)
        self.mlp = LlamaMLP(config, rngs=rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        *,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """x [batch, l, embed], positions [batch, l], mask: an `attention.CausalMask` or bool broadcastable to
        [batch, 1, l, k].

        Without a cache, attention runs over x's own keys (k = l). With `cache` (keys, values) [batch, kv_heads,
        max_len, D] (the `DecodeCache` layout), x's keys / values are written at slots `cache_index + arange(l)`
        per row (cache_index [batch]) and attention runs over the whole cache (k = max_len). Returns (y [batch, l,
        embed], the keys / values attended to: the updated cache when cached).
        """
        attention_rng, mlp_rng = split_rng(dropout_rng, 2)
        queries, keys, values = self.self_attn.project(self.input_layernorm(x), positions)
        if cache is not None:
            cache = (_write_rows(cache[0], heads_first(keys), cache_index, axis=1),
                     _write_rows(cache[1], heads_first(values), cache_index, axis=1))
            keys, values = heads_first(cache[0]), heads_first(cache[1])  # views XLA folds into the products
        h = self.self_attn.attend(queries, keys, values, mask)
        x = with_logical_constraint(x + dropout(h, self.dropout_rate, attention_rng), HIDDEN_AXES)
        h = self.mlp(self.post_attention_layernorm(x))
        x = with_logical_constraint(x + dropout(h, self.dropout_rate, mlp_rng), HIDDEN_AXES)
        return x, ((keys, values) if cache is None else cache)


def _write_rows(buffer: jax.Array, update: jax.Array, start: jax.Array, axis: int = 0) -> jax.Array:
    """Writes update into buffer at per-row slots start[b] + arange(l) along the row's `axis`: buffer [batch,
    max_len, ...] and update [batch, l, ...] for axis 0; [batch, heads, max_len, D] / [batch, heads, l, D] for 1."""
    return jax.vmap(lambda buf, upd, s: jax.lax.dynamic_update_slice_in_dim(buf, upd, s, axis=axis))(
        buffer, update.astype(buffer.dtype), start)


def causal_segment_mask(segment_ids: jax.Array | None, length: int, sliding_window: int | None = None,
                        prefix: jax.Array | None = None) -> jax.Array:
    """Causal mask, restricted to equal segment ids when given and to the last `sliding_window` positions
    (the query's own included). prefix: None, or bool [batch, length] True on prompt tokens (prefix-LM: prompt
    tokens of one segment also attend to each other, T5X's `decoder_causal_attention`).
    [batch or 1, 1, length, length] bool."""
    idx = jnp.arange(length)
    mask = (idx[:, None] >= idx[None, :])[None]
    if sliding_window is not None:
        mask = mask & (idx[:, None] - idx[None, :] < sliding_window)[None]
    if prefix is not None:
        prefix = prefix.astype(jnp.bool_)
        mask = mask | (prefix[:, :, None] & prefix[:, None, :])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask[:, None]


_PREFIX_LM_PROMPT_TUNING = ("prefix-LM attention (DecoderOnlyModel.prefix_lm = True) with prompt tuning is not "
                            "supported: set prefix_lm = False or use another PEFT method.")


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


class Llama(nnx.Module):
    """Llama-family causal language model. See the module docstring for the parameter tree and conventions."""

    # Prompt-tuning hook (itjax.peft.prompt_tuning.Prompt): None, or a module inserting P trainable vectors into the
    # embedded sequence (`insert_sequence`, `insert`, `insert_mask`) whose outputs `remove` drops again.
    input_prompt = None

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, rngs=rngs, embedding_init=_kernel_init(),
                                  dtype=config.activation_dtype)
        layers = [LlamaLayer(config, rngs=rngs) for _ in range(config.num_layers)]
        self.layers = scan.stack_modules(layers) if config.scan_layers else nnx.List(layers)
        self.norm = _norm(config)
        if not config.tie_word_embeddings:
            self.lm_head = Dense(config.hidden_size, config.vocab_size, kernel_axes=("embed", "vocab"),
                                 kernel_init=_kernel_init(), rngs=rngs, dtype=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prompt_slots: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
        prefix_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced causal pass: int tokens [batch, length] -> logits [batch, length, vocab] float32.

        positions: [batch, length] rotary positions; default arange (packed rows restart them per segment).
        segment_ids: [batch, length] packing ids (attention only within a segment; 0 = padding); None = one
            sequence per row (right padding then needs no mask: real positions never attend to later pads).
        prompt_slots: [batch, length] where packed rows hold the `input_prompt` (itjax.data.prompt_slots); the
            rows' positions already count it.
        prefix_mask: None (causal LM) or [batch, length], nonzero on prompt tokens: prefix-LM attention (the
            prompt tokens of a segment attend to each other bidirectionally, the rest causally).
        """
        batch, length = tokens.shape
        if prefix_mask is not None and self.input_prompt is not None:
            raise ValueError(_PREFIX_LM_PROMPT_TUNING)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        x = self.embed_tokens(tokens)
        inserted = self.input_prompt is not None and prompt_slots is None
        if prompt_slots is not None:
            if self.input_prompt is None:
                raise ValueError("Llama: prompt_slots given but the model has no input_prompt (PromptTuning).")
            x = self.input_prompt.fill(x, prompt_slots)
        if inserted:
            x, positions, segment_ids = self.input_prompt.insert_sequence(x, positions, segment_ids)
        mask = attention.CausalMask(causal_segment_mask(segment_ids, x.shape[1], self.config.sliding_window,
                                                        prefix_mask),
                                    segment_ids, self.config.sliding_window, prefix_mask)
        x = with_logical_constraint(x, HIDDEN_AXES)
        c = self.config
        if c.scan_layers:
            def body(layer, x, rng):
                return layer(x, positions, mask, dropout_rng=rng)[0], None
            x, _ = scan.scan(self.layers, body, x, scan.split_keys(dropout_rng, c.num_layers),
                             remat_policy=c.remat_policy)
        else:
            run = remat(lambda layer, x, positions, mask, rng: layer(x, positions, mask, dropout_rng=rng)[0],
                        c.remat_policy)
            for layer, rng in zip(self.layers, split_rng(dropout_rng, c.num_layers)):
                x = run(layer, x, positions, mask, rng)
        if inserted:
            x = self.input_prompt.remove(x)
        return self._logits(self.norm(x))

    def init_decode_cache(self, batch: int, max_length: int) -> DecodeCache:
        """An empty cache for `batch` rows of up to `max_length` tokens (prompt + generated)."""
        c = self.config
        max_length += 0 if self.input_prompt is None else self.input_prompt.length  # the prompt takes slots too
        if c.scan_layers:
            empty = jnp.zeros((c.num_layers, batch, c.num_kv_heads, max_length, c.head_dim), c.activation_dtype)
            keys = values = empty
        else:
            empty = jnp.zeros((batch, c.num_kv_heads, max_length, c.head_dim), c.activation_dtype)
            keys = values = (empty,) * c.num_layers
        return DecodeCache(
            keys=keys,
            values=values,
            valid=jnp.zeros((batch, max_length), jnp.bool_),
            index=jnp.zeros((batch,), jnp.int32),
        )

    def prefill(
        self, tokens: jax.Array, token_mask: jax.Array, cache: DecodeCache, *, bidirectional: bool = False
    ) -> tuple[jax.Array, jax.Array, DecodeCache]:
        """Runs a padded prompt batch through the model and writes it into an empty cache.

        tokens: int [batch, l]; token_mask: bool [batch, l], True at real prompt tokens (left, right or no
        padding; each row's real tokens contiguous). Real tokens get positions 0, 1, ... in order.
        bidirectional: prefix-LM prefill, the prompt's tokens attend to each other (later decode steps stay causal).
        Returns (logits [batch, vocab] float32 after each row's last real token, the next position [batch] int32
        (= prompt length), the cache with its write index just after each row's last real token).
        """
        if bidirectional and self.input_prompt is not None:
            raise ValueError(_PREFIX_LM_PROMPT_TUNING)
        x = self.embed_tokens(tokens)
        if self.input_prompt is not None:  # rows must start at slot 0 (right padding) for position='after_bos'
            x, token_mask = self.input_prompt.insert(x), self.input_prompt.insert_mask(token_mask)
        batch, length = token_mask.shape
        positions = jnp.maximum(jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)
        slots = jnp.arange(length, dtype=jnp.int32)
        end = jnp.max(jnp.where(token_mask, slots + 1, 0), axis=1)  # one past the last real token, from start
        valid = _write_rows(cache.valid, token_mask, cache.index)
        prefix_slots = _write_rows(jnp.zeros_like(cache.valid), token_mask, cache.index) if bidirectional else None
        hidden, cache = self._run_cached(x, positions, cache._replace(valid=valid), start=cache.index,
                                         query_slots=cache.index[:, None] + slots, prefix_slots=prefix_slots)
        last = jnp.take_along_axis(hidden, jnp.maximum(end - 1, 0)[:, None, None], axis=1)[:, 0]
        logits = self._logits(self.norm(last[:, None]))[:, 0]
        return logits, jnp.sum(token_mask, axis=1, dtype=jnp.int32), cache._replace(index=cache.index + end)

    def decode_step(
        self, tokens: jax.Array, positions: jax.Array, cache: DecodeCache
    ) -> tuple[jax.Array, DecodeCache]:
        """One deterministic step: tokens [batch] at rotary positions [batch] are written at `cache.index`.

        Returns logits [batch, vocab] float32 for the next token and the cache advanced by one slot.
        """
        valid = _write_rows(cache.valid, jnp.ones((tokens.shape[0], 1), jnp.bool_), cache.index)
        hidden, cache = self._run_cached(self.embed_tokens(tokens[:, None]), positions[:, None],
                                         cache._replace(valid=valid), start=cache.index,
                                         query_slots=cache.index[:, None])
        return self._logits(self.norm(hidden))[:, 0], cache._replace(index=cache.index + 1)

    def _run_cached(
        self, x: jax.Array, positions: jax.Array, cache: DecodeCache, *, start: jax.Array,
        query_slots: jax.Array, prefix_slots: jax.Array | None = None,
    ) -> tuple[jax.Array, DecodeCache]:
        """Layers over embedded tokens x [batch, l, embed] written at slots start + arange(l); queries at
        query_slots [batch, l] attend to valid cache slots at or before their own, and (prefix-LM prefill) to
        every slot of prefix_slots [batch, max_len] bool. Returns un-normed hidden [batch, l, embed]."""
        key_slots = jnp.arange(cache.valid.shape[1])
        mask = key_slots[None, None, :] <= query_slots[:, :, None]
        if self.config.sliding_window is not None:  # a row's real tokens are contiguous: slot gap = token gap
            mask = mask & (key_slots[None, None, :] > query_slots[:, :, None] - self.config.sliding_window)
        if prefix_slots is not None:
            mask = mask | prefix_slots[:, None, :]
        mask = mask & cache.valid[:, None, :]
        mask = mask[:, None]  # [batch, 1, l, max_len]
        if self.config.scan_layers:
            def body(layer, x, layer_cache):
                return layer(x, positions, mask, cache=layer_cache, cache_index=start)
            x, (keys, values) = scan.scan(self.layers, body, x, (cache.keys, cache.values))
            return x, cache._replace(keys=keys, values=values)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            x, (keys, values) = layer(x, positions, mask, cache=(cache.keys[i], cache.values[i]), cache_index=start)
            new_keys.append(keys)
            new_values.append(values)
        return x, cache._replace(keys=tuple(new_keys), values=tuple(new_values))

    def _logits(self, x: jax.Array) -> jax.Array:
        """Normed hidden states [batch, length, embed] -> logits [batch, length, vocab] float32."""
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(x)
        else:
            logits = self.lm_head(x)
        return with_logical_constraint(logits, ("batch", "length", "vocab"))
