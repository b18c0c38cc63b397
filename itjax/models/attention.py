"""The attention core both model families call, switched by `attention_impl` (T5Config / LlamaConfig).

`attend(queries, keys, values, ...)` computes `softmax(scale * q.k + bias, masked) . v` per head, with grouped-query
attention when keys / values have fewer heads than the queries (each kv head serves `heads // kv_heads` consecutive
query heads, as HF and `jax.nn.dot_product_attention` group them). Implementations:

- 'xla' (default, every backend): two matrix products around a materialised [batch, heads, q, k] float32 score
  tensor. The reference: masks are an additive `layers.MASK_BIAS` on float32 logits, softmax in float32, weights
  cast to the activation dtype before the value product (T5 and Llama as before this module existed). Causal
  self-attention (a `CausalMask` without prefix-LM rows: Llama training and prompt scoring) runs in query blocks
  that skip the fully masked upper triangle of [q, k] (`_causal_xla_attention`): the same result, about half the
  work and memory of the score tensors.
- 'cudnn' (NVIDIA GPU, bfloat16 / float16): cuDNN flash attention through
  `jax.nn.dot_product_attention(..., implementation='cudnn')`. A causal self-attention mask (`CausalMask`) goes in as
  `is_causal` plus `local_window_size` (Mistral's sliding window), so the kernel skips masked blocks; packed rows
  (segment ids) add the dense boolean mask; prefix-LM rows (bidirectional prompts: not causal) pass the dense mask
  alone; T5's relative-position bias (with its padding / segment mask folded in) goes in as `bias`, broadcast to [batch or 1, heads or 1, q, k]. Memory: unpacked Llama rows need no [q, k] tensor
  at all; packed rows a [batch, 1, q, k] mask (cuDNN turns it into a bias); T5 a [batch, heads, q, k] bias and its
  gradient (padding and segments are folded into the position bias), about what 'xla' keeps, so T5 gains speed,
  not memory.
- 'splash' (TPU, Llama family): the Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu
  .splash_attention`): causal or local-window block-sparse masks, segment ids for packed rows, grouped-query
  attention through the multi-query kernel vmapped over kv heads and rows; under partitioning rules it runs in a
  shard_map over the mesh axes of 'batch' and 'heads'. Sequence lengths must be multiples of 128. No bias input, so
  T5 cannot use it; its masks are fixed when the kernel is built, so prefix-LM rows (per-row prompts) are refused.

Calls that no kernel serves run 'xla' (the call site passes implementation='xla'): incremental decoding and prefill
with a key-value cache (one or a few queries against a cache with a per-row validity mask), and Llama with prefix
tuning under 'splash' is refused (its prefix keys break the causal structure).

`emulated_kernels()` runs 'cudnn' and 'splash' on any backend (tests, CPU debugging): 'cudnn' becomes
`jax.nn.dot_product_attention(..., implementation='xla')` with exactly the arguments cuDNN would get, and 'splash'
the same Pallas kernel run by the Pallas interpreter (`interpret=True`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from itjax import partitioning
from itjax.models.layers import MASK_BIAS, dropout

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# The backend each kernel needs (`jax.default_backend()`), and what to use elsewhere.
_BACKENDS = {"cudnn": ("gpu", "an NVIDIA GPU"), "splash": ("tpu", "a TPU")}
_FUSED_DTYPES = {"cudnn": ("bfloat16", "float16")}
# Splash block sizes: a sequence length must be a multiple of the smallest (the TPU's 128 lanes).
SPLASH_BLOCKS = (512, 256, 128)
# The causal 'xla' path (`_causal_xla_attention`): query block size, and the most blocks one row is cut into.
CAUSAL_BLOCK = 128
CAUSAL_MAX_BLOCKS = 16

_EMULATED = contextvars.ContextVar("itjax_attention_emulated", default=False)


@contextlib.contextmanager
def emulated_kernels():
    """Within this context (at trace time) 'cudnn' and 'splash' run on any backend: 'cudnn' as
    `jax.nn.dot_product_attention(implementation='xla')` with the cuDNN call's arguments, 'splash' as the Pallas
    kernel in interpret mode. For tests and CPU debugging; jitted functions traced inside keep the emulation."""
    token = _EMULATED.set(True)
    try:
        yield
    finally:
        _EMULATED.reset(token)


def check_implementation(owner: str, implementation: str, *, family: str) -> None:
    """Config-time check of `<owner>.attention_impl` for a model `family` ('t5' or 'llama')."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{owner}.attention_impl={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if family == "t5" and implementation == "splash":
        raise ValueError(f"{owner}.attention_impl='splash': the TPU splash kernel has no bias input for T5's "
                         "relative-position bias. On TPU use 'xla' (the default); on an NVIDIA GPU 'cudnn'.")


def _check_available(implementation: str, dtype: jnp.dtype) -> None:
    """Trace-time check that `implementation` runs on this process's backend (skipped under emulation)."""
    if implementation == "xla" or _EMULATED.get():
        return
    backend, device = _BACKENDS[implementation]
    if jax.default_backend() != backend:
        raise RuntimeError(
            f"attention_impl={implementation!r} needs {device}, but JAX runs on {jax.default_backend()!r}. Set "
            "T5Config.attention_impl / LlamaConfig.attention_impl = 'xla' (e.g. --gin.LlamaConfig.attention_impl="
            "\"'xla'\"), which runs everywhere.")
    allowed = _FUSED_DTYPES.get(implementation)
    if allowed and jnp.dtype(dtype).name not in allowed:
        raise RuntimeError(f"attention_impl={implementation!r} runs in {' / '.join(allowed)} only, but the model "
                           f"computes in {jnp.dtype(dtype).name}: set T5Config.dtype / LlamaConfig.dtype = "
                           "'bfloat16', or attention_impl = 'xla'.")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["dense", "segment_ids", "prefix"],
                   meta_fields=["sliding_window"])
@dataclasses.dataclass(frozen=True)
class CausalMask:
    """Causal self-attention over one sequence (q = k positions), described twice: `dense`, the boolean mask
    [batch or 1, 1, length, length] (True = attend) that 'xla' uses, and its structure for the kernels:
    `segment_ids` [batch, length] (packed rows: attention within a segment; None = one sequence per row),
    `sliding_window` (None, or W: a query sees itself and the W - 1 positions before it) and `prefix` (None, or
    bool [batch, length]: prefix-LM, where the marked prompt tokens of a segment also see each other)."""

    dense: jax.Array
    segment_ids: jax.Array | None = None
    sliding_window: int | None = None
    prefix: jax.Array | None = None


def attend(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    *,
    implementation: str = "xla",
    bias: jax.Array | None = None,
    mask: jax.Array | CausalMask | None = None,
    scale: float = 1.0,
    dtype: jnp.dtype = jnp.float32,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Multi-head / grouped-query attention core; returns [batch, q, heads, head_dim] in `dtype`.

    queries [batch, q, heads, D]; keys / values [batch, k, kv_heads, D] (heads a multiple of kv_heads).
    bias: additive float32, broadcastable to [batch, heads, q, k] (T5: position bias + mask) or None.
    mask: boolean, broadcastable to [batch, 1, q, k] (True = attend), a `CausalMask`, or None.
    scale: multiplies q.k before bias and mask (T5 1.0: folded into its query init; Llama D ** -0.5).
    dropout_rate / dropout_rng: dropout on the attention weights ('xla' only; T5 training with dropout).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={implementation!r}; expected one of {IMPLEMENTATIONS}")
    _check_available(implementation, dtype)
    if implementation != "xla" and dropout_rng is not None and dropout_rate > 0.0:
        raise ValueError(f"attention_impl={implementation!r} has no dropout on attention weights, but this model "
                         f"trains with dropout_rate={dropout_rate}: set the config's dropout_rate = 0.0 or "
                         "attention_impl = 'xla'.")
    if implementation == "xla":
        if (isinstance(mask, CausalMask) and mask.prefix is None and bias is None
                and (dropout_rng is None or dropout_rate == 0.0) and queries.shape[1] == keys.shape[1]):
            return _causal_xla_attention(queries, keys, values, mask, scale, dtype)
        dense = mask.dense if isinstance(mask, CausalMask) else mask
        return _xla_attention(queries, keys, values, bias, dense, scale, dtype, dropout_rate, dropout_rng)
    if implementation == "cudnn":
        return _cudnn_attention(queries, keys, values, bias, mask, scale, dtype)
    return _splash_attention(queries, keys, values, bias, mask, scale, dtype)


def _grouped(x: jax.Array | None, kv_heads: int, groups: int) -> jax.Array | None:
    """[b, heads or 1, q, k] -> [b, kv_heads or 1, groups or 1, q, k]."""
    if x is None:
        return None
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], kv_heads, groups, *x.shape[2:])


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(logits: jax.Array, axis: int = -1) -> jax.Array:
    """`jax.nn.softmax` (max-shifted) whose derivative reads only its output y: d(y) = y * (dx - sum(y * dx)).

    JAX's default `jax.nn.softmax` (while `jax_softmax_custom_jvp` is off, as in JAX 0.10) is differentiated through
    exp / sum / divide, so the backward pass keeps the unnormalised exponentials and the sums as well as y, and
    reads [.., q, k] float32 tensors several more times. The value product keeps y anyway. One T5-small encoder
    attention core (8 x 512, 6 heads) forward + backward: 166 -> 151 ms on the 2-core CPU."""
    unnormalized = jnp.exp(logits - jnp.max(logits, axis, keepdims=True))
    return unnormalized / jnp.sum(unnormalized, axis, keepdims=True)


@softmax.defjvp
def _softmax_jvp(axis, primals, tangents):
    (logits,), (logits_dot,) = primals, tangents
    y = softmax(logits, axis)
    return y, y * (logits_dot - jnp.sum(y * logits_dot, axis, keepdims=True))


def _xla_attention(queries, keys, values, bias, mask, scale, dtype, dropout_rate, dropout_rng):
    """The reference: float32 logits [batch, kv_heads, groups, q, k] with additive bias and mask.

    The two products are written as dot_generals on heads-major operands ([b, kv_heads, groups, q, D] x
    [b, kv_heads, k, D]), so each produces its [.., q, k] / [.., q, D] result in place: `jnp.einsum` ordered the
    score product's operands so that XLA computed the scores transposed and then copied the whole [b, h, q, k]
    tensor (10-13% of a T5-small encoder attention layer's forward + backward on the CPU). Only the small [.., D]
    operands are transposed."""
    kv_heads = keys.shape[2]
    out = _heads_major_attention(_heads_major_queries(queries, kv_heads), _heads_major(keys), _heads_major(values),
                                 bias, mask, scale, dtype, dropout_rate, dropout_rng)
    return _from_heads_major(out)


def _heads_major_queries(queries: jax.Array, kv_heads: int) -> jax.Array:
    """[b, q, heads, D] -> [b, kv_heads, groups, q, D]."""
    b, q, h, d = queries.shape
    return queries.reshape(b, q, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _heads_major(x: jax.Array) -> jax.Array:
    """keys / values [b, k, kv_heads, D] -> [b, kv_heads, k, D]."""
    return x.transpose(0, 2, 1, 3)


def _from_heads_major(out: jax.Array) -> jax.Array:
    """[b, kv_heads, groups, q, D] -> [b, q, heads, D]."""
    b, kv_heads, groups, q, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, q, kv_heads * groups, d)


def _heads_major_attention(grouped, keys, values, bias, mask, scale, dtype, dropout_rate, dropout_rng):
    """grouped queries [b, kv_heads, groups, q, D], keys / values [b, kv_heads, k, D] -> [b, kv_heads, groups, q, D]
    in `dtype`; bias / mask as for `attend` ([b or 1, heads or 1, q, k])."""
    b, kv_heads, groups, q, _ = grouped.shape
    batch_dims = ((0, 1), (0, 1))
    logits = jax.lax.dot_general(grouped, keys, (((4,), (3,)), batch_dims), preferred_element_type=jnp.float32)
    if scale != 1.0:
        logits = logits * scale
    if bias is not None:
        logits = logits + _grouped(bias, kv_heads, groups)
    if mask is not None:
        logits = logits + jnp.where(_grouped(mask, kv_heads, groups), 0.0, MASK_BIAS)
    weights = softmax(logits, -1)
    if dropout_rng is not None and dropout_rate > 0.0:  # drawn over [batch, heads, q, k], as before grouping
        weights = dropout(weights.reshape(b, kv_heads * groups, q, -1), dropout_rate,
                          dropout_rng).reshape(weights.shape)
    return jax.lax.dot_general(weights.astype(dtype), values, (((4,), (2,)), batch_dims))


def causal_block_size(length: int) -> int:
    """Query block of the causal 'xla' path for `length` tokens: CAUSAL_BLOCK, or larger for long rows, so that a
    row has at most CAUSAL_MAX_BLOCKS blocks (each block is its own pair of products in the compiled program)."""
    per_block = -(-length // CAUSAL_MAX_BLOCKS)
    return max(CAUSAL_BLOCK, -(-per_block // CAUSAL_BLOCK) * CAUSAL_BLOCK)


def _causal_xla_attention(queries, keys, values, mask: CausalMask, scale, dtype):
    """'xla' causal self-attention that skips the masked upper triangle: query block i attends only to key blocks
    up to i (and from the first one its first query still sees under a sliding window). The keys left out are
    masked for every query of the block, so each block's softmax is the dense one's (the dropped terms are exactly
    zero) and the result equals `_xla_attention` over the full mask up to summation order. Work and saved residuals
    fall to (n + 1) / 2n of the dense computation for n blocks (56% at 1024 tokens in 128-token blocks).

    Queries, keys and values are cut with `jnp.split` and each block's keys re-joined with `jnp.concatenate`:
    their transposes are a concatenation and slices, where slicing each block's range out of the full arrays
    transposes to a zero-padded full-length gradient per block, summed. On the 2-core CPU, one Llama-100M attention
    core (4 x 1024 packed tokens, 12 / 4 heads) fwd + bwd: dense 365 ms, blocked 221 ms; the whole train step:
    dense 19.8 s, sliced blocks 19.3 s, split blocks 18.3-18.9 s."""
    length = queries.shape[1]
    block = causal_block_size(length)
    window = mask.sliding_window
    bounds = list(range(block, length, block))
    query_blocks = jnp.split(_heads_major_queries(queries, keys.shape[2]), bounds, axis=3)
    key_blocks = jnp.split(_heads_major(keys), bounds, axis=2)
    value_blocks = jnp.split(_heads_major(values), bounds, axis=2)
    outs = []
    for i, grouped in enumerate(query_blocks):
        start, stop = i * block, min((i + 1) * block, length)
        first = 0 if window is None else max(0, start - window + 1) // block
        keys_seen = _joined(key_blocks[first:i + 1])
        values_seen = _joined(value_blocks[first:i + 1])
        outs.append(_heads_major_attention(grouped, keys_seen, values_seen, None,
                                           mask.dense[..., start:stop, first * block:stop], scale, dtype, 0.0, None))
    return _from_heads_major(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3))


def _joined(blocks: list[jax.Array]) -> jax.Array:
    """Consecutive [b, kv_heads, k_i, D] key or value blocks as one [b, kv_heads, sum k_i, D]."""
    return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=2)


def _cudnn_attention(queries, keys, values, bias, mask, scale, dtype):
    """`jax.nn.dot_product_attention` with cuDNN's arguments ('xla' implementation under emulation)."""
    _, q, _, _ = queries.shape
    k = keys.shape[1]
    kwargs = {}
    if isinstance(mask, CausalMask) and mask.prefix is not None:  # prefix-LM is not causal: the dense mask
        mask = mask.dense
    if isinstance(mask, CausalMask):
        kwargs["is_causal"] = True
        if mask.sliding_window is not None:  # left window W - 1: the query and the W - 1 positions before it
            kwargs["local_window_size"] = (mask.sliding_window - 1, 0)
        mask = mask.dense if mask.segment_ids is not None else None  # packed rows: the dense mask
    if mask is not None:
        mask = jnp.broadcast_to(mask, mask.shape[:2] + (q, k))
    if bias is not None:  # cuDNN takes a bias of the full [q, k] extent, in the activation dtype
        bias = jnp.broadcast_to(bias, bias.shape[:2] + (q, k)).astype(queries.dtype)
    out = jax.nn.dot_product_attention(
        queries, keys.astype(queries.dtype), values.astype(queries.dtype), bias=bias, mask=mask, scale=scale,
        implementation="xla" if _EMULATED.get() else "cudnn", **kwargs)
    return out.astype(dtype)


def _splash_block(length: int) -> int:
    for block in SPLASH_BLOCKS:
        if length % block == 0:
            return block
    raise ValueError(f"attention_impl='splash' needs sequence lengths that are multiples of {SPLASH_BLOCKS[-1]} "
                     f"(the TPU lane width), got {length}: pad the task feature lengths to a multiple of "
                     f"{SPLASH_BLOCKS[-1]} or use attention_impl='xla'.")


@functools.lru_cache(maxsize=32)
def splash_kernel(length: int, groups: int, sliding_window: int | None, interpret: bool):
    """The splash multi-query kernel for causal (or local-window) self-attention of `length` tokens and `groups`
    query heads per kv head: called as kernel(q [groups, length, D], k / v [length, D], segment_ids)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    if sliding_window is None:
        head_mask = mask_lib.CausalMask((length, length))
    else:
        head_mask = mask_lib.LocalMask((length, length), window_size=(sliding_window - 1, 0), offset=0)
    block = _splash_block(length)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask tables even when first built inside a trace (cached)
        return kernel_lib.make_splash_mqa_single_device(mask_lib.MultiHeadMask([head_mask] * groups),
                                                        block_sizes=sizes, interpret=interpret)


def _splash_attention(queries, keys, values, bias, mask, scale, dtype):
    """Splash attention, vmapped over rows and kv heads (each kv head: a multi-query kernel over its groups)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    if bias is not None or not isinstance(mask, CausalMask):
        raise ValueError("attention_impl='splash' runs causal self-attention without a bias (Llama training); this "
                         "call has a bias or a general mask (T5, or prefix tuning's extra keys): use "
                         "attention_impl='xla' or 'cudnn'.")
    if mask.prefix is not None:
        raise ValueError("attention_impl='splash' cannot run prefix-LM attention (DecoderOnlyModel.prefix_lm = True): "
                         "the kernel's masks are fixed when it is built, but each row's prompt length differs. Use "
                         "attention_impl='xla' or 'cudnn', or prefix_lm = False.")
    b, length, h, d = queries.shape
    kv_heads = keys.shape[2]
    groups = h // kv_heads
    kernel = splash_kernel(length, groups, mask.sliding_window, _EMULATED.get())
    q = (queries * jnp.asarray(scale, queries.dtype)).reshape(b, length, kv_heads, groups, d)
    q = jnp.transpose(q, (0, 2, 3, 1, 4))  # [b, kv_heads, groups, length, D]
    k = jnp.transpose(keys.astype(queries.dtype), (0, 2, 1, 3))  # [b, kv_heads, length, D]
    v = jnp.transpose(values.astype(queries.dtype), (0, 2, 1, 3))
    segments = jnp.ones((b, length), jnp.int32) if mask.segment_ids is None else mask.segment_ids.astype(jnp.int32)

    def rows(q, k, v, segments):  # [b, kv_heads, groups, length, D] (a shard of b and kv_heads under a mesh)
        def row(q, k, v, segment_ids):
            ids = kernel_lib.SegmentIds(q=segment_ids, kv=segment_ids)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)
        return jax.vmap(row)(q, k, v, segments)

    sharding = partitioning.active_sharding(("batch", "length", "heads", "kv"))
    if sharding is None:
        out = rows(q, k, v, segments)
    else:  # XLA cannot partition the kernel: run it per shard of rows and kv heads
        batch_axes, length_axes, head_axes, kv_axes = sharding.spec
        if length_axes is not None or kv_axes is not None:
            raise ValueError(f"attention_impl='splash' shards rows and heads only, but the partitioning rules map "
                             f"'length' / 'kv' to mesh axes {length_axes} / {kv_axes}: change the rules or use "
                             "attention_impl='xla'.")
        shards = 1 if head_axes is None else math.prod(
            sharding.mesh.shape[a] for a in ((head_axes,) if isinstance(head_axes, str) else head_axes))
        if kv_heads % shards:
            raise ValueError(f"attention_impl='splash': {kv_heads} kv heads cannot be split over the {shards} "
                             f"devices of mesh axes {head_axes} that shard 'heads': use attention_impl='xla'.")
        P = jax.sharding.PartitionSpec
        head_spec = P(batch_axes, head_axes)
        out = jax.shard_map(rows, mesh=sharding.mesh, in_specs=(head_spec, head_spec, head_spec, P(batch_axes)),
                            out_specs=head_spec, check_vma=False)(q, k, v, segments)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, length, h, d).astype(dtype)
