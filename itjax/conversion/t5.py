"""HF <-> itjax conversion for the T5 family (T5 1.0, T5 v1.1 / LM-adapted, Flan-T5, mT5, UL2-style).

Tensor mapping (HF name -> itjax path; see `itjax.models.t5` for the itjax tree and `mapping` for the kinds):

    shared.weight                                   -> shared.embedding                        copy  [vocab, E]
    lm_head.weight (untied models)                  -> lm_head.kernel                          linear
    {enc,dec}oder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                    -> {enc,dec}oder.relative_bias.embedding  copy  [buckets, H]
    encoder.block.i.layer.0.SelfAttention.{q,k,v}   -> encoder.layers[i].attention.{q,k,v}    qkv -> [E, H, K]
    encoder.block.i.layer.0.SelfAttention.o         -> encoder.layers[i].attention.o          out -> [H, K, E]
    encoder.block.i.layer.0.layer_norm              -> encoder.layers[i].pre_attention_norm.scale
    encoder.block.i.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo} -> encoder.layers[i].mlp.*.kernel  linear
    encoder.block.i.layer.1.layer_norm              -> encoder.layers[i].pre_mlp_norm.scale
    decoder.block.i.layer.{0: SelfAttention, 1: EncDecAttention, 2: DenseReluDense} and their layer_norms
                                                    -> decoder.layers[i].{self_attention, cross_attention, mlp}
                                                       and pre_{self_attention,cross_attention,mlp}_norm
    {enc,dec}oder.final_layer_norm.weight           -> {enc,dec}oder.final_norm.scale

Tied embeddings. T5 1.0 computes logits through the shared embedding with the decoder output scaled by
d_model**-0.5 (itjax `tie_word_embeddings=True`); v1.1-style models have a separate `lm_head` and no scaling.
transformers 4.x says which through `tie_word_embeddings`; transformers 5.x always ties the module and records the
scaling as `scale_decoder_outputs` (and writes `lm_head.weight` only when it differs from `shared.weight`), so the
scaling flag decides: scaled -> tied itjax model; unscaled -> untied, `lm_head.kernel` from `lm_head.weight` or,
when the file has none, from `shared.weight`. Duplicates that must equal `shared.weight` are accepted and dropped:
`{enc,dec}oder.embed_tokens.weight` always, `lm_head.weight` for scaled models. HF's unused
`decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` (which transformers ignores on load) is
dropped too. Anything else that does not map, or has the wrong shape, fails with one error listing the tensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np

from itjax.conversion import ConversionError
from itjax.conversion import folders
from itjax.conversion.mapping import (Params, Path, TensorMap, check_tensors, export_tensors, get_path, hf_shape,
                                      set_path, to_itjax)
from itjax.conversion.safetensors_io import DEFAULT_MAX_SHARD_SIZE, SafetensorsReader, write_safetensors

MODEL_TYPES = ("t5", "mt5")
ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
SHARED = "shared.weight"
LM_HEAD = "lm_head.weight"
# HF tensors that carry no information of their own (see the module docstring).
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
UNUSED_HF_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


# ------------------------------------------------------------------------------------------------- configs
def t5_config_from_hf(hf_config: Mapping[str, Any]):
    """HF T5 / mT5 `config.json` dict -> `itjax.models.T5Config` (float32, no dropout: set those in gin).

    Raises ConversionError for non-T5 architectures or feed-forward types itjax does not implement.
    """
    from itjax.models.t5 import FEED_FORWARD_TYPES, T5Config

    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if model_type not in MODEL_TYPES or unknown:
        raise ConversionError(
            f"config.json: model_type={model_type!r}, architectures={architectures} is not a T5-family "
            f"encoder-decoder; the T5 converter supports model_type {MODEL_TYPES} with architectures "
            f"{ARCHITECTURES}.")
    feed_forward = hf_config.get("feed_forward_proj", "relu")
    if feed_forward not in FEED_FORWARD_TYPES:
        raise ConversionError(f"config.json: feed_forward_proj={feed_forward!r} is not supported; itjax's T5 "
                              f"implements {FEED_FORWARD_TYPES}.")
    num_layers = hf_config.get("num_layers", 6)
    num_decoder_layers = hf_config.get("num_decoder_layers")
    return T5Config(
        vocab_size=hf_config.get("vocab_size", 32128),
        d_model=hf_config.get("d_model", 512),
        num_heads=hf_config.get("num_heads", 8),
        d_kv=hf_config.get("d_kv", 64),
        d_ff=hf_config.get("d_ff", 2048),
        num_encoder_layers=num_layers,
        num_decoder_layers=num_layers if num_decoder_layers is None else num_decoder_layers,
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        feed_forward=feed_forward,
        tie_word_embeddings=_scales_decoder_outputs(hf_config),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
        decoder_start_token_id=hf_config.get("decoder_start_token_id", 0) or 0,
    )


def _scales_decoder_outputs(hf_config: Mapping[str, Any]) -> bool:
    """True for T5 1.0-style logits (shared embedding, decoder output * d_model**-0.5); see the module docstring."""
    if "scale_decoder_outputs" in hf_config:  # written by transformers >= 5
        return bool(hf_config["scale_decoder_outputs"])
    return bool(hf_config.get("tie_word_embeddings", True))


def hf_config_from_t5(config) -> dict:
    """`itjax.models.T5Config` -> HF `config.json` dict that transformers 4.x and 5.x read the same way."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": config.feed_forward,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.tie_word_embeddings,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout_rate": config.dropout_rate,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": config.decoder_start_token_id,
        "dtype": "float32",
    }


def model_gin_text(config, comment: str = "Converted from a HF checkpoint by itjax.convert.") -> str:
    """The gin model file (style of gin/models/t5_1_1_small.gin) that builds `EncoderDecoderModel(config)`."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [
        "import itjax.models.encoder_decoder",
        "",
        "MODEL = @itjax.models.EncoderDecoderModel()",
        "itjax.models.EncoderDecoderModel.config = @itjax.models.T5Config()",
        "itjax.models.EncoderDecoderModel.z_loss = 1e-4",
        "itjax.models.EncoderDecoderModel.loss_normalizing_factor = 'NUM_REAL_TARGET_TOKENS'",
        "",
    ]
    for field in dataclasses.fields(config):
        lines.append(f"itjax.models.T5Config.{field.name} = {getattr(config, field.name)!r}")
    return "\n".join(lines) + "\n"


def t5_config_from_gin(gin_file: str):
    """Reads the `T5Config` a gin model file builds (its includes resolve against the project's gin/ folder).
    Clears gin's global config before and after."""
    import gin

    from itjax import config as config_lib
    from itjax.models.encoder_decoder import EncoderDecoderModel

    gin.clear_config()
    try:
        config_lib.parse_gin_file(gin_file)
        config = EncoderDecoderModel().config
    finally:
        gin.clear_config()
    return config


# ------------------------------------------------------------------------------------------------- mapping
def _attention_maps(hf_prefix: str, path: Path) -> list[TensorMap]:
    kinds = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "out"}
    return [TensorMap(f"{hf_prefix}.{n}.weight", path + (n, "kernel"), kind) for n, kind in kinds.items()]


def _mlp_maps(hf_prefix: str, path: Path, feed_forward: str) -> list[TensorMap]:
    names = ("wi_0", "wi_1", "wo") if feed_forward.startswith("gated-") else ("wi", "wo")
    return [TensorMap(f"{hf_prefix}.DenseReluDense.{n}.weight", path + ("mlp", n, "kernel"), "linear")
            for n in names]


def t5_tensor_maps(config) -> list[TensorMap]:
    """Every HF tensor of a T5 model with `config` (an itjax T5Config) and where it goes. `lm_head` if untied."""
    maps = [TensorMap(SHARED, ("shared", "embedding"), "copy")]
    for stack in ("encoder", "decoder"):
        maps.append(TensorMap(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                              (stack, "relative_bias", "embedding"), "copy"))
        maps.append(TensorMap(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), "copy"))
    for i in range(config.num_encoder_layers):
        hf, it = f"encoder.block.{i}.layer", ("encoder", "layers", i)
        maps += _attention_maps(f"{hf}.0.SelfAttention", it + ("attention",))
        maps.append(TensorMap(f"{hf}.0.layer_norm.weight", it + ("pre_attention_norm", "scale"), "copy"))
        maps += _mlp_maps(f"{hf}.1", it, config.feed_forward)
        maps.append(TensorMap(f"{hf}.1.layer_norm.weight", it + ("pre_mlp_norm", "scale"), "copy"))
    for i in range(config.num_decoder_layers):
        hf, it = f"decoder.block.{i}.layer", ("decoder", "layers", i)
        maps += _attention_maps(f"{hf}.0.SelfAttention", it + ("self_attention",))
        maps.append(TensorMap(f"{hf}.0.layer_norm.weight", it + ("pre_self_attention_norm", "scale"), "copy"))
        maps += _attention_maps(f"{hf}.1.EncDecAttention", it + ("cross_attention",))
        maps.append(TensorMap(f"{hf}.1.layer_norm.weight", it + ("pre_cross_attention_norm", "scale"), "copy"))
        maps += _mlp_maps(f"{hf}.2", it, config.feed_forward)
        maps.append(TensorMap(f"{hf}.2.layer_norm.weight", it + ("pre_mlp_norm", "scale"), "copy"))
    if not config.tie_word_embeddings:
        maps.append(TensorMap(LM_HEAD, ("lm_head", "kernel"), "linear"))
    return maps


def abstract_params(config) -> Params:
    """The parameter pure dict of `config` with ShapeDtypeStruct leaves (nothing allocated).

    Same tree as `EncoderDecoderModel(config).abstract_module()`, built from `T5` directly so that importing
    needs neither seqio nor TensorFlow.
    """
    from flax import nnx

    from itjax.models.t5 import T5

    # itjax folders hold the per-layer layout (`layers/<i>/...`) whatever `scan_layers` the model file sets;
    # `restore_initial_params` stacks them for a scanned model.
    config = dataclasses.replace(config, scan_layers=False)
    return folders.abstract_params(lambda: T5(config, rngs=nnx.Rngs(params=0)))


# ------------------------------------------------------------------------------------------------- tensors
def hf_t5_to_params(reader: SafetensorsReader, config) -> Params:
    """Streams the HF tensors of `reader` into an itjax parameter pure dict (numpy float32 leaves) for `config`.

    Raises ConversionError (listing the tensors) when names or shapes do not match, or when a tensor that must
    duplicate `shared.weight` differs from it.
    """
    params = abstract_params(config)  # filled in place: each ShapeDtypeStruct leaf is replaced by its array
    maps = t5_tensor_maps(config)
    shapes = reader.shapes()
    expected = {m.hf_name: hf_shape(m.kind, get_path(params, m.path).shape) for m in maps}
    if not config.tie_word_embeddings and LM_HEAD not in shapes:
        expected.pop(LM_HEAD)  # transformers >= 5 omits an lm_head equal to shared.weight
    duplicates = {name: expected[SHARED] for name in EMBEDDING_COPIES}
    if config.tie_word_embeddings:
        duplicates[LM_HEAD] = expected[SHARED]
    check_tensors(expected, shapes, tolerated={**duplicates, **{name: None for name in UNUSED_HF_TENSORS}},
                  what="a T5 model of its config.json",
                  hint="Check that config.json belongs to these weights and that the model is a plain T5 / mT5 "
                       "(T5ForConditionalGeneration).")
    for m in maps:
        name = m.hf_name if m.hf_name in shapes else SHARED  # untied lm_head omitted by transformers >= 5
        kind = m.kind if name == m.hf_name else "linear"
        set_path(params, m.path, to_itjax(kind, reader.get(name), get_path(params, m.path).shape))
    _check_duplicates(reader, shapes, params["shared"]["embedding"], config)
    return params


def _check_duplicates(reader: SafetensorsReader, shapes, shared: np.ndarray, config) -> None:
    names = list(EMBEDDING_COPIES) + ([LM_HEAD] if config.tie_word_embeddings else [])
    differing = [n for n in names if n in shapes and not np.array_equal(reader.get(n), shared)]
    if differing:
        raise ConversionError(
            f"tensors {differing} differ from shared.weight, but this config ties them to it (T5 1.0-style "
            f"logits through the embedding). If the model has a separate output layer, set "
            f"tie_word_embeddings=false (transformers 5: scale_decoder_outputs=false) in config.json.")


def params_to_hf_t5(params: Params, config) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, float32 array) for every tensor of the HF model, one at a time."""
    return export_tensors(params, t5_tensor_maps(config))


def load_params(out_dir: str, config=None) -> Params:
    """Restores `out_dir/checkpoint` as a parameter pure dict (host arrays).

    `config` defaults to the T5Config of `out_dir/model.gin` (reading it clears gin's global config).
    """
    config = config or t5_config_from_gin(os.path.join(out_dir, folders.MODEL_GIN))
    return folders.restore_params(out_dir, abstract_params(config))


# ------------------------------------------------------------------------------------------------- folders
def hf_to_itjax(hf_dir: str, out_dir: str) -> Any:
    """HF T5 folder -> itjax folder (checkpoint, model.gin, tokenizer files). Returns the T5Config."""
    folders.require_empty_dir(out_dir, "--out_dir")
    with open(os.path.join(hf_dir, folders.HF_CONFIG)) as f:
        config = t5_config_from_hf(json.load(f))
    params = hf_t5_to_params(SafetensorsReader(hf_dir), config)
    os.makedirs(out_dir, exist_ok=True)
    folders.save_params(params, out_dir)
    with open(os.path.join(out_dir, folders.MODEL_GIN), "w") as f:
        f.write(model_gin_text(config, f"Converted from {os.path.abspath(hf_dir)} by itjax.convert."))
    folders.copy_tokenizer_files(hf_dir, out_dir)
    return config


def itjax_to_hf(out_dir: str, hf_dir: str, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                dtype: str = "auto") -> Any:
    """itjax folder (checkpoint + model.gin [+ tokenizer files]) -> HF folder for `from_pretrained`.
    dtype: of the written tensors ('auto' = float32). Returns the T5Config."""
    dtype = "float32" if dtype == "auto" else dtype
    folders.require_empty_dir(hf_dir, "--hf_dir")
    config = t5_config_from_gin(os.path.join(out_dir, folders.MODEL_GIN))
    params = load_params(out_dir, config)
    os.makedirs(hf_dir, exist_ok=True)
    write_safetensors(export_tensors(params, t5_tensor_maps(config), dtype), hf_dir, max_shard_size)
    with open(os.path.join(hf_dir, folders.HF_CONFIG), "w") as f:
        json.dump({**hf_config_from_t5(config), "dtype": dtype}, f, indent=2)
    folders.copy_tokenizer_files(out_dir, hf_dir)
    return config
