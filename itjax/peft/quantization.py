"""Quantized frozen base kernels for QLoRA (Dettmers et al. 2023): NF4 blocks and int8 channels.

`LoRA.base_quantization = 'nf4' | 'int8'` replaces every `Dense` kernel of the base model (the output layer
`lm_head` excepted, as bitsandbytes / peft keep it) by a `QuantizedKernel`. For a kernel
`[*lead, *in_dims, *out_dims]` (lead: the `[L]` 'layers' dim of a `scan_layers` stack, else none) with
I = prod(in_dims) contraction inputs:

  nf4  codes         uint8 [*lead, I // 2, *out_dims]   two 4-bit NF4 codes per byte (the even input in the low
                                                        nibble), in-dims merged row-major
       scales        f32   [*lead, I // B, *out_dims]   absmax of each block of B (=64) consecutive inputs
     or, double-quantized (`LoRA.double_quantization`, the QLoRA default):
       scale_codes   int8  [*lead, I // B, *out_dims]   (scales - offset) / group absmax * 127, rounded
       scale_scales  f32   [*lead, I // B, *out_dims[:-1], out_dims[-1] // G]   per group of G = gcd(256, out[-1])
       scale_offset  f32   [*lead]                      midrange of the block scales (per layer)
  int8 codes         int8  [*lead, *in_dims, *out_dims] round(w / absmax * 127) per output channel
       scales        f32   [*lead, *out_dims]           absmax / 127

Logical axes: the kernel's own (the merged in-dims take the outermost in-dim's name, e.g. 'embed' or 'heads'), so
the quantized base shards like the kernel and every shard holds whole blocks when the sharded dim's share is a
multiple of B; second-level scales are replicated along their last dim (they are tiny).
Bytes per parameter: NF4 0.5 + 4 / B (fp32 scales: 0.5625) or 0.5 + 1 / B + 4 / (B G) (double: ~0.516);
int8 1 + 4 / I.

The NF4 code table is computed from the normal quantiles as the QLoRA paper describes (8 positive and 7 negative
quantiles of N(0, 1) with offset 0.9677, an exact zero, scaled to [-1, 1]). The second-level quantization uses int8
absmax codes where the paper uses an 8-bit float; both are 8 bits per block scale.

The layer dequantizes inside its matmul under `jax.checkpoint`, so the backward pass recomputes the dequantized
kernel from the codes instead of keeping a full-precision copy of it.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itjax import param_paths
from itjax.models.layers import Dense
from itjax.peft import core
from itjax.peft.core import PeftConfigError

FORMATS = ("nf4", "int8")
SECOND_LEVEL_GROUP = 256  # block scales per second-level scale (QLoRA's double quantization)
# The QLoRA offset: the mean of 1 - 1 / (2 * 15) and 1 - 1 / (2 * 16), so that the extreme quantiles are finite.
NF4_OFFSET = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))


def nf4_code() -> np.ndarray:
    """The 16 NF4 values, float32, ascending in [-1, 1] with an exact 0 (index 7)."""
    ppf = statistics.NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(NF4_OFFSET, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative, np.float64))
    return (values / values.max()).astype(np.float32)


_NF4 = nf4_code()
_NF4_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2  # round to nearest: a value's code is how many midpoints it exceeds


def _safe(scale: jax.Array) -> jax.Array:
    return jnp.where(scale > 0, scale, 1.0)


# ------------------------------------------------------------------------------------------------ arrays
def quantize(kernel: jax.Array, num_in_dims: int, num_out_dims: int, fmt: str, block_size: int = 64,
             double: bool = True) -> dict[str, jax.Array]:
    """A kernel [*lead, *in_dims, *out_dims] -> its quantized arrays (the module docstring's table)."""
    lead_n = kernel.ndim - num_in_dims - num_out_dims
    lead, ins = kernel.shape[:lead_n], kernel.shape[lead_n:lead_n + num_in_dims]
    outs = kernel.shape[lead_n + num_in_dims:]
    w = kernel.astype(jnp.float32)
    if fmt == "int8":
        in_axes = tuple(range(lead_n, lead_n + num_in_dims))
        scale = jnp.max(jnp.abs(w), axis=in_axes) / 127.0
        codes = jnp.round(w / jnp.expand_dims(_safe(scale), in_axes)).astype(jnp.int8)
        return {"codes": codes, "scales": scale}
    blocks = w.reshape(lead + (math.prod(ins) // block_size, block_size) + outs)
    absmax = jnp.max(jnp.abs(blocks), axis=lead_n + 1)
    normalized = blocks / jnp.expand_dims(_safe(absmax), lead_n + 1)
    codes = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normalized).astype(jnp.uint8)
    pairs = codes.reshape(lead + (math.prod(ins) // 2, 2) + outs)
    packed = jnp.take(pairs, 0, axis=lead_n + 1) | (jnp.take(pairs, 1, axis=lead_n + 1) << 4)
    if not double:
        return {"codes": packed, "scales": absmax}
    return {"codes": packed, **_quantize_scales(absmax, lead_n)}


def _quantize_scales(scales: jax.Array, lead_n: int) -> dict[str, jax.Array]:
    """QLoRA's double quantization of block scales [*lead, ...]: centred, int8 absmax per group of G.

    The centre is the midrange of the layer's scales where the paper uses their mean: max and min do not depend
    on the reduction order, so every mesh layout (and the per-layer vs stacked model) quantizes bit-identically."""
    axes = tuple(range(lead_n, scales.ndim))
    offset = (jnp.max(scales, axis=axes) + jnp.min(scales, axis=axes)) / 2
    centred = scales - offset.reshape(offset.shape + (1,) * (scales.ndim - lead_n))
    group = math.gcd(SECOND_LEVEL_GROUP, scales.shape[-1])
    grouped = centred.reshape(scales.shape[:-1] + (scales.shape[-1] // group, group))
    second = jnp.max(jnp.abs(grouped), axis=-1)
    codes = jnp.round(grouped / _safe(second)[..., None] * 127.0).astype(jnp.int8).reshape(scales.shape)
    return {"scale_codes": codes, "scale_scales": second, "scale_offset": offset}


def _dequantize_scales(arrays: dict[str, jax.Array]) -> jax.Array:
    codes, second, offset = arrays["scale_codes"], arrays["scale_scales"], arrays["scale_offset"]
    grouped = codes.reshape(second.shape + (-1,)).astype(jnp.float32) / 127.0 * second[..., None]
    return grouped.reshape(codes.shape) + offset.reshape(offset.shape + (1,) * (codes.ndim - offset.ndim))


def dequantize(arrays: dict[str, jax.Array], in_shape: tuple[int, ...], out_shape: tuple[int, ...],
               fmt: str) -> jax.Array:
    """Quantized arrays (from `quantize`) -> the kernel [*lead, *in_shape, *out_shape], float32."""
    codes = arrays["codes"]
    if fmt == "int8":
        lead_n = codes.ndim - len(in_shape) - len(out_shape)
        scales = jnp.expand_dims(arrays["scales"], tuple(range(lead_n, lead_n + len(in_shape))))
        return codes.astype(jnp.float32) * scales
    lead_n = codes.ndim - 1 - len(out_shape)
    lead = codes.shape[:lead_n]
    scales = arrays["scales"] if "scales" in arrays else _dequantize_scales(arrays)
    low, high = codes & 0xF, codes >> 4
    unpacked = jnp.stack([low, high], axis=lead_n + 1).reshape(lead + (math.prod(in_shape),) + out_shape)
    values = jnp.take(jnp.asarray(_NF4), unpacked.astype(jnp.int32), axis=0)
    blocks = values.reshape(lead + (scales.shape[lead_n], -1) + out_shape)
    return (blocks * jnp.expand_dims(scales, lead_n + 1)).reshape(lead + in_shape + out_shape)


def array_axes(kernel_axes: tuple, lead_n: int, num_in_dims: int, fmt: str, double: bool) -> dict[str, tuple]:
    """Logical axis names of each quantized array, from the kernel's (see the module docstring)."""
    lead, ins, outs = (kernel_axes[:lead_n], kernel_axes[lead_n:lead_n + num_in_dims],
                       kernel_axes[lead_n + num_in_dims:])
    if fmt == "int8":
        return {"codes": tuple(kernel_axes), "scales": lead + outs}
    merged = lead + ins[:1] + outs
    if not double:
        return {"codes": merged, "scales": merged}
    return {"codes": merged, "scale_codes": merged, "scale_scales": merged[:-1] + (None,), "scale_offset": lead}


# ------------------------------------------------------------------------------------------------ layers
class QuantizedKernel(nnx.Module):
    """A frozen Dense kernel stored quantized (its arrays are plain `nnx.Param`s: part of the frozen base).

    Static attributes: in_shape, out_shape (one layer's kernel dims), fmt, names (the arrays held).
    """

    def __init__(self, kernel: nnx.Param, num_in_dims: int, *, fmt: str, block_size: int, double: bool,
                 where: str):
        meta = kernel.get_metadata()
        axes = meta.get("out_sharding") or meta.get("sharding_names") or (None,) * kernel.ndim
        lead_n = 0
        while lead_n < len(axes) and axes[lead_n] == param_paths.LAYER_AXIS:
            lead_n += 1
        in_shape = tuple(kernel.shape[lead_n:lead_n + num_in_dims])
        self.in_shape, self.out_shape = in_shape, tuple(kernel.shape[lead_n + num_in_dims:])
        self.fmt = fmt
        if fmt == "nf4" and math.prod(in_shape) % block_size:
            fits = [b for b in (64, 32, 16, 8, 4, 2) if math.prod(in_shape) % b == 0]
            raise PeftConfigError(
                f"LoRA.base_quantization='nf4': layer {where} contracts over {math.prod(in_shape)} inputs "
                f"(dims {in_shape}), not a multiple of LoRA.quantization_block_size={block_size}, so its blocks "
                f"would straddle rows. Set LoRA.quantization_block_size to a divisor of {math.prod(in_shape)}"
                f"{f' (e.g. {fits[0]})' if fits else ''}, or use LoRA.base_quantization='int8' or None.")
        arrays = quantize(kernel[...], num_in_dims, len(self.out_shape), fmt, block_size, double)
        names = array_axes(tuple(axes), lead_n, num_in_dims, fmt, double)
        self.names = tuple(arrays)
        for name, value in arrays.items():
            setattr(self, name, nnx.Param(value, out_sharding=names[name], eager_sharding=False))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}

    def dequantize(self) -> jax.Array:
        """The kernel [*lead, *in_shape, *out_shape] (float32)."""
        return dequantize(self.arrays(), self.in_shape, self.out_shape, self.fmt)

    def matmul(self, x: jax.Array, dtype) -> jax.Array:
        """x [..., *in_shape] @ kernel -> [..., *out_shape] in `dtype`, dequantizing inside a `jax.checkpoint`: the
        backward pass recomputes the kernel from the codes (no full-precision copy is kept for it)."""
        n = len(self.in_shape)
        in_shape, out_shape, fmt = self.in_shape, self.out_shape, self.fmt

        def dequantized_matmul(x, arrays):
            kernel = dequantize(arrays, in_shape, out_shape, fmt).astype(dtype)
            contracting = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
            return jax.lax.dot_general(x.astype(dtype), kernel, (contracting, ((), ())))
        return jax.checkpoint(dequantized_matmul)(x, self.arrays())


def quantize_layer(new: Dense, old: Dense, spec: dict, where: str) -> None:
    """Gives `new` (built without Dense.__init__) `old`'s settings and bias, and `old`'s kernel quantized as
    `new.qkernel`. spec: {"fmt", "block_size", "double"}."""
    new.num_in_dims = old.num_in_dims
    new.dtype = old.dtype
    if hasattr(old, "bias"):
        new.bias = old.bias
    new.qkernel = QuantizedKernel(old.kernel, old.num_in_dims, where=where, **spec)


def base_forward(layer: Dense, x: jax.Array) -> jax.Array:
    """The frozen projection of a Dense or of a quantized one (plus Llama's optional bias)."""
    if not hasattr(layer, "qkernel"):
        return core.dense_forward(layer, x)
    y = layer.qkernel.matmul(x, layer.dtype)
    if hasattr(layer, "bias"):
        y = y + layer.bias[...].astype(layer.dtype)
    return y


class QuantizedDense(Dense):
    """A frozen Dense / Projection whose kernel is stored quantized (`qkernel`); no adapter."""

    def __init__(self, base: Dense, spec: dict, where: str):
        quantize_layer(self, base, spec, where)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., *in_dims] -> [..., *out_dims] in `dtype`."""
        return base_forward(self, x)


def quantize_frozen_layers(module: nnx.Module, spec: dict, skip: tuple[str, ...] = ("lm_head",)) -> None:
    """Replaces every Dense of `module` that is neither LoRA-adapted nor quantized nor named in `skip` by a
    QuantizedDense."""
    for path, layer in core.dense_layers(module).items():
        if not (hasattr(layer, "qkernel") or hasattr(layer, "lora_a") or str(path[-1]) in skip):
            core.replace(module, path, QuantizedDense(layer, spec, core.path_name(path)))


# ------------------------------------------------------------------------------------------------ trees
def is_quantized(base: Any) -> bool:
    """Whether a base parameter pure dict holds quantized kernels."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "qkernel" in node:
                found.append(True)
            for child in node.values():
                walk(child)
    walk(base)
    return bool(found)


def dequantized_base(module: nnx.Module) -> dict:
    """The plain model's parameter pure dict of a PEFT module: its frozen base with every `qkernel` replaced by the
    dequantized `kernel` (float32). What `--merge_lora` merges into."""
    graph = [(tuple(path), node) for path, node in nnx.iter_graph(module) if isinstance(node, QuantizedKernel)]
    base = nnx.to_pure_dict(nnx.split(module, core.AdapterParam, nnx.Param)[2])
    for path, quantized in graph:
        node = core.submodule_dict(base, path[:-1])
        del node[path[-1]]
        node["kernel"] = np.asarray(quantized.dequantize())
    return base


def plain_base_params(trainer, params) -> Any:
    """A PEFT trainer's frozen base as the plain model's parameters: `trainer.base_params`, or for a quantized base
    (QLoRA) its dequantized kernels (float32 numpy). params: the adapter (the module needs it to be built)."""
    if not trainer.base_is_transformed:
        return trainer.base_params
    return dequantized_base(trainer.module(params))


def check_block_sharding(abstract_base: Any, fmt: str) -> None:
    """Raises PeftConfigError when the mesh would split a quantized array's dim unevenly (a shard holding part of
    a quantization block or of a packed byte pair). abstract_base: ShapeDtypeStructs with NamedShardings."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_base)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        sharding = getattr(leaf, "sharding", None)
        if "qkernel" not in keys or sharding is None or not hasattr(sharding, "spec"):
            continue
        for dim, (size, axes) in enumerate(zip(leaf.shape, tuple(sharding.spec) + (None,) * leaf.ndim)):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % ways:
                where = ".".join(str(k) for k in keys)
                raise PeftConfigError(
                    f"LoRA.base_quantization={fmt!r}: {where} {tuple(leaf.shape)} has {size} entries along dim {dim}, "
                    f"which the mesh splits {ways} ways (mesh axes {axes}), so its shards would not hold whole "
                    "quantization blocks. Use a smaller LoRA.quantization_block_size (more blocks per row) or a "
                    "layout (Partitioner rules / mesh sizes) that splits this dim fewer ways.")


def device_bytes(tree: Any) -> int:
    """Bytes the device buffers of a tree of arrays hold (every addressable shard, replicas included)."""
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards)


def quantized_kernel_bytes(base: Any, plain: Any) -> tuple[int, int]:
    """(device-buffer bytes of every `qkernel` array of a base pure dict, number of parameters of the kernels they
    stand for in `plain`, the plain model's (abstract) parameters). Their ratio is the quantized bytes per
    parameter (NF4 ~0.516 double-quantized, int8 ~1)."""
    num_bytes, kernels = 0, set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        if "qkernel" in keys:
            num_bytes += device_bytes(leaf)
            kernels.add(keys[:keys.index("qkernel")])
    count = sum(math.prod(core.submodule_dict(plain, prefix)["kernel"].shape) for prefix in kernels)
    return num_bytes, count


# ------------------------------------------------------------------------------------------------ config
QUANTIZATION_SETTINGS = ("base_quantization", "quantization_block_size", "double_quantization")


def check_quantization_bindings(peft: Any) -> None:
    """Refuses LoRA's quantization settings bound in gin while `train.peft` is not LoRA (e.g. gin/peft/qlora.gin
    combined with prompt tuning): the base would silently stay float32. Raises PeftConfigError naming the binding."""
    import gin

    from itjax.peft.lora import LoRA

    if isinstance(peft, LoRA):
        return
    for setting in QUANTIZATION_SETTINGS:
        try:
            value = gin.query_parameter(f"itjax.peft.LoRA.{setting}")
        except ValueError:
            continue
        if setting != "base_quantization" or value is not None:
            raise PeftConfigError(
                f"LoRA.{setting} = {value!r} is bound but train.peft = {peft!r}: a quantized frozen base (QLoRA) is "
                "an option of LoRA only (the other methods and full fine-tuning keep the float32 weights). Use "
                "train.peft = @LoRA() (gin/peft/qlora.gin), or remove the binding.")
