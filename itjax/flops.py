"""Model FLOPs of a train step (the PaLM paper's accounting) and the peak FLOP/s that MFU divides by.

Model FLOPs count what the model needs, not what the compiled program does: matrix multiplies and attention, no
rematerialisation, no elementwise work, no embedding lookups (PaLM, Chowdhery et al. 2022, appendix B: 6N per token
for the weights plus 12 L H Q T for attention, forward + backward). Generalised here to what itjax trains:

- Weights: every matrix parameter (a `kernel`, LoRA's `lora_a` / `lora_b`, the embedding when it also produces the
  logits) multiplies each token that passes it: 2 FLOPs per weight and token forward, 2 backward for the
  activation gradient, and 2 more for the weight gradient only where the weight is trained (a frozen PEFT base
  costs 4, not 6). Encoder weights and cross-attention key / value projections see the encoder's token slots, all
  others the decoder's. For a decoder-only model this is exactly PaLM's 6N per token (N: non-embedding weights).
- Attention: QK^T and AV cost 2 * width FLOPs each per (query, key) pair, width = heads x head size, in every layer
  (encoder self-attention over encoder x encoder positions, decoder self-attention over decoder x decoder, cross
  attention over decoder x encoder); x3 for training. Causal masks and sliding windows are not discounted (as PaLM).

Token slots include padding (the hardware computes on it): `packing_efficiency` in the training log says how much
of that is real text.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What a family tells the FLOP count (`BaseModel.attention_shape`): layer counts, the attention width (heads x
    head size of the queries), whether decoder layers cross-attend to an encoder, and, when the output layer is the
    input embedding, that table's parameter path (its matmul with the decoder's outputs is counted)."""
    encoder_layers: int
    decoder_layers: int
    width: int
    cross_attention: bool
    tied_output_embedding: tuple[str, ...] | None = None


_MATRIX_NAMES = ("kernel", "lora_a", "lora_b")


def _matrix_sizes(params: Any, *, tied_output_embedding: tuple[str, ...] | None) -> tuple[int, int]:
    """(encoder, decoder) weights that multiply activations, counted from a parameter tree (arrays or shapes)."""
    encoder = decoder = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        names = names[:-1] if names[-1] == "value" else names
        is_output_embedding = tuple(names) == tied_output_embedding
        if names[-1] not in _MATRIX_NAMES and not is_output_embedding:
            continue
        size = int(np.prod(leaf.shape))
        # Cross-attention keys and values project the encoder's outputs.
        cross_kv = "cross_attention" in names and names[names.index("cross_attention") + 1] in ("k", "v")
        if names[0] == "encoder" or cross_kv:
            encoder += size
        else:
            decoder += size
    return encoder, decoder


def train_step_flops(shape: AttentionShape, trainable_params: Any, frozen_params: Any,
                     batch_shapes: Mapping[str, tuple[int, ...]]) -> float:
    """Model FLOPs of one train step on a global batch.

    trainable_params / frozen_params: parameter trees (arrays or ShapeDtypeStructs; frozen: a PEFT base, else None).
    batch_shapes: feature -> shape; `encoder_input_tokens` [batch, encoder length] when there is an encoder,
    `decoder_target_tokens` [batch, decoder length].
    """
    batch, decoder_length = batch_shapes["decoder_target_tokens"][:2]
    encoder_length = batch_shapes["encoder_input_tokens"][1] if "encoder_input_tokens" in batch_shapes else 0
    enc_tokens, dec_tokens = batch * encoder_length, batch * decoder_length
    tied = shape.tied_output_embedding
    trained_enc, trained_dec = _matrix_sizes(trainable_params, tied_output_embedding=tied)
    frozen_enc, frozen_dec = (_matrix_sizes(frozen_params, tied_output_embedding=tied)
                              if frozen_params is not None else (0, 0))
    weights = (6 * (trained_enc * enc_tokens + trained_dec * dec_tokens)
               + 4 * (frozen_enc * enc_tokens + frozen_dec * dec_tokens))
    pairs = (shape.encoder_layers * encoder_length * encoder_length
             + shape.decoder_layers * decoder_length * decoder_length
             + (shape.decoder_layers * decoder_length * encoder_length if shape.cross_attention else 0))
    attention = 3 * 4 * shape.width * batch * pairs
    return float(weights + attention)


# Dense bf16 peak FLOP/s per chip (vendor figures, no sparsity), keyed by a prefix of `jax.Device.device_kind`.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100": 989e12,  # SXM (device_kind e.g. "NVIDIA H100 80GB HBM3")
    "NVIDIA H200": 989e12,
}


def peak_flops_per_device(device: jax.Device | None = None, *, cpu_peak: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from). Accelerators: the table above (longest matching
    prefix of device_kind). CPU: `cpu_peak` if given (gin: train.peak_flops_per_device), else a measured float32
    GEMM rate (1024^3, best of 3: well under a second; measured once per process)."""
    device = device or jax.devices()[0]
    kind = device.device_kind
    if cpu_peak:
        return float(cpu_peak), "train.peak_flops_per_device"
    matches = [k for k in PEAK_BF16_FLOPS if kind.startswith(k)]
    if matches:
        return PEAK_BF16_FLOPS[max(matches, key=len)], f"{kind} dense bf16 peak"
    if device.platform != "cpu":
        log.warning("No peak FLOP/s known for device kind %r; MFU is measured against a float32 GEMM. Set "
                    "train.peak_flops_per_device to the chip's dense bf16 peak.", kind)
    return measured_gemm_flops(device), f"measured float32 GEMM on {kind}"


@functools.lru_cache(maxsize=None)
def measured_gemm_flops(device: jax.Device, n: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of an n x n float32 matrix product on `device` (best of `repeats`, after one warm-up)."""
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
