"""Model FLOPs (itjax.flops): PaLM's accounting, checked against counts written out by hand from the configs."""

import types

import pytest
from flax import nnx

from itjax import flops
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.encoder_decoder import EncoderDecoderModel
from itjax.models.llama import LlamaConfig
from itjax.models.t5 import T5Config


def _params(model):
    return nnx.state(model.abstract_module(), nnx.Param)


def test_decoder_only_is_palms_6n_plus_attention():
    c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2)
    model = DecoderOnlyModel(c, bos_id=2)
    batch, length = 8, 128
    d, hd = c.hidden_size, c.head_dim
    per_layer = d * c.num_heads * hd * 2 + d * c.num_kv_heads * hd * 2 + 3 * d * c.intermediate_size
    n = c.num_layers * per_layer + d * c.vocab_size  # non-embedding matrices (lm_head untied)
    tokens = batch * length
    palm = 6 * n * tokens + 12 * c.num_layers * c.num_heads * hd * length * tokens
    got = flops.train_step_flops(model.attention_shape(), _params(model), None,
                                 {"decoder_target_tokens": (batch, length)})
    assert got == palm


def test_encoder_decoder_counts_each_stack_on_its_tokens():
    c = T5Config(vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=2,
                 num_decoder_layers=3, tie_word_embeddings=True)
    model = EncoderDecoderModel(c)
    batch, enc, dec = 4, 64, 16
    d, w = c.d_model, c.num_heads * c.d_kv
    mlp = 3 * d * c.d_ff  # gated-gelu: wi_0, wi_1, wo
    encoder_weights = c.num_encoder_layers * (4 * d * w + mlp)
    # decoder: self-attention q k v o, cross q o, MLP, the tied output embedding on decoder tokens; cross k v
    # project the encoder's outputs.
    decoder_weights = c.num_decoder_layers * (4 * d * w + 2 * d * w + mlp) + d * c.vocab_size
    cross_kv = c.num_decoder_layers * 2 * d * w
    weights = 6 * ((encoder_weights + cross_kv) * batch * enc + decoder_weights * batch * dec)
    pairs = c.num_encoder_layers * enc * enc + c.num_decoder_layers * (dec * dec + dec * enc)
    expected = weights + 12 * w * batch * pairs
    got = flops.train_step_flops(model.attention_shape(), _params(model), None,
                                 {"encoder_input_tokens": (batch, enc), "decoder_target_tokens": (batch, dec)})
    assert got == expected


def test_a_frozen_base_costs_four_flops_per_weight_and_token():
    c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4, num_kv_heads=4)
    model = DecoderOnlyModel(c, bos_id=2)
    shape = model.attention_shape()
    batch = {"decoder_target_tokens": (2, 16)}
    params = _params(model)
    attention = flops.train_step_flops(shape, {}, None, batch)
    full = flops.train_step_flops(shape, params, None, batch) - attention
    frozen = flops.train_step_flops(shape, {}, params, batch) - attention
    assert frozen * 6 == full * 4
    lora = {"q_proj": {"lora_a": types.SimpleNamespace(shape=(32, 8)), "lora_b": types.SimpleNamespace(shape=(8, 32))}}
    assert flops.train_step_flops(shape, lora, params, batch) - attention == frozen + 6 * (2 * 32 * 8) * 32


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("TPU v5 lite", 197e12), ("TPU v4", 275e12), ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_peak_table_by_device_kind(kind, peak):
    device = types.SimpleNamespace(device_kind=kind, platform="gpu")
    assert flops.peak_flops_per_device(device)[0] == peak


def test_cpu_peak_is_the_gin_value_or_a_measured_gemm():
    import jax
    assert flops.peak_flops_per_device(cpu_peak=5e10) == (5e10, "train.peak_flops_per_device")
    measured, source = flops.peak_flops_per_device(jax.devices()[0])
    assert 1e8 < measured < 1e14 and "GEMM" in source
