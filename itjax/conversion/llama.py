"""HF <-> itjax conversion for the Llama family: Llama 2 / 3.x (`llama`), Mistral (`mistral`), Qwen2 (`qwen2`).

Tensor mapping (HF name -> itjax path of `itjax.models.llama.Llama`; kinds as in `mapping`; `E` = hidden,
`H` / `K` = query / kv heads, `D` = head_dim):

    model.embed_tokens.weight                        -> embed_tokens.embedding                copy   [vocab, E]
    model.layers.i.input_layernorm.weight            -> layers[i].input_layernorm.scale       copy   [E]
    model.layers.i.self_attn.q_proj.weight           -> layers[i].self_attn.q_proj.kernel     qkv -> [E, H, D]
    model.layers.i.self_attn.{k,v}_proj.weight       -> layers[i].self_attn.{k,v}_proj.kernel qkv -> [E, K, D]
    model.layers.i.self_attn.{q,k,v}_proj.bias       -> layers[i].self_attn.*.bias            bias -> [H or K, D]
    model.layers.i.self_attn.o_proj.weight           -> layers[i].self_attn.o_proj.kernel     out -> [H, D, E]
    model.layers.i.post_attention_layernorm.weight   -> layers[i].post_attention_layernorm.scale
    model.layers.i.mlp.{gate,up,down}_proj.weight    -> layers[i].mlp.*.kernel                linear
    model.norm.weight                                -> norm.scale                            copy
    lm_head.weight (untied)                          -> lm_head.kernel                        linear [E, vocab]

Biases exist only for Qwen2 (q / k / v). A tied model may still carry `lm_head.weight`; it must equal the
embedding and is dropped. Old checkpoints' `...rotary_emb.inv_freq` buffers are dropped (RoPE is recomputed).

The itjax folder also keeps the source `config.json` as `hf_config.json`: `--to_hf` takes the architecture from
model.gin (authoritative) and everything else (model_type, token ids, max_position_embeddings, ...) from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from itjax.conversion import ConversionError, folders
from itjax.conversion.mapping import (Params, TensorMap, check_tensors, export_tensors, fill_params, get_path,
                                      hf_shape)
from itjax.conversion.safetensors_io import DEFAULT_MAX_SHARD_SIZE, SafetensorsReader, write_safetensors
from itjax.data import hf_tokenizer

MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
HF_CONFIG_COPY = "hf_config.json"
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# config.json keys that hf_config_from_llama derives from the LlamaConfig (dropped from the kept source config).
_DERIVED_HF_KEYS = ("architectures", "model_type", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
                    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "torch_dtype",
                    "dtype", "transformers_version", "attention_bias", "mlp_bias", "hidden_act")


# ------------------------------------------------------------------------------------------------- configs
def llama_config_from_hf(hf_config: Mapping[str, Any], *, dtype: str = "float32"):
    """`itjax.models.LlamaConfig` from a HF config dict (`config.json` / `PretrainedConfig.to_dict()`,
    transformers 4.x or 5.x); dropout 0.

    RoPE comes from `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (4.x). Qwen2 always has
    q / k / v biases. The sliding window: Mistral's `sliding_window` (null = none); Qwen2's only when
    `use_sliding_window` is true and then on every layer (per-layer windows, `max_window_layers` < layers, are
    refused). Raises ConversionError (a ValueError) naming the setting itjax does not implement.
    """
    from itjax.models.llama import LlamaConfig

    model_type = hf_config.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ConversionError(f"config.json: model_type {model_type!r} is not a Llama-family model; the Llama "
                              f"converter supports model_type {MODEL_TYPES}.")
    missing = [k for k in REQUIRED_HF_KEYS if k not in hf_config]
    if missing:
        raise ConversionError(f"config.json (model_type={model_type!r}) lacks {missing}: it is not a {model_type} "
                              "config; check that the folder holds the model's own config.json.")
    foreign = [a for a in hf_config.get("architectures") or [] if not a.endswith("ForCausalLM")]
    if foreign:
        raise ConversionError(f"config.json: architectures {foreign} are not causal LMs; itjax converts "
                              f"{ARCHITECTURES[model_type]} checkpoints.")
    if hf_config.get("hidden_act", "silu") != "silu" or hf_config.get("mlp_bias", False):
        raise ConversionError("config.json: only a bias-free SiLU-gated MLP is supported (hidden_act='silu', "
                              f"mlp_bias=false); got hidden_act={hf_config.get('hidden_act')!r}, "
                              f"mlp_bias={hf_config.get('mlp_bias')!r}.")
    if model_type != "qwen2" and hf_config.get("attention_bias", False):
        raise ConversionError(f"config.json: attention_bias=true on a {model_type} model puts a bias on o_proj too, "
                              "which itjax's Llama does not implement (only Qwen2's q / k / v biases).")
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ConversionError(f"config.json: rope_type {rope_type!r} is not supported (only 'default' and "
                              "'llama3').")
    heads = hf_config["num_attention_heads"]
    return LlamaConfig(
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        intermediate_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads") or heads,
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling={"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS}} if rope_type == "llama3"
        else None,
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2",
        dropout_rate=0.0,
        dtype=dtype,
        sliding_window=_sliding_window(hf_config, model_type),
    )


def _sliding_window(hf_config: Mapping[str, Any], model_type: str) -> int | None:
    if model_type == "mistral":
        return hf_config.get("sliding_window")
    if model_type != "qwen2" or not hf_config.get("use_sliding_window", False):
        return None
    layers = hf_config["num_hidden_layers"]
    layer_types = hf_config.get("layer_types") or [
        "sliding_attention" if i >= hf_config.get("max_window_layers", 28) else "full_attention"
        for i in range(layers)]
    if all(t == "full_attention" for t in layer_types):
        return None
    if all(t == "sliding_attention" for t in layer_types):
        return hf_config["sliding_window"]
    raise ConversionError(f"config.json: Qwen2 with sliding windows on some layers only (layer_types={layer_types}); "
                          "itjax applies one window to every layer. Set max_window_layers to 0 (all sliding) or "
                          f"{layers} (none) if that is what the model was trained with.")


def hf_config_from_llama(config, model_type: str | None = None, base: Mapping[str, Any] | None = None) -> dict:
    """`LlamaConfig` -> HF `config.json` dict (read alike by transformers 4.x and 5.x).

    model_type: the HF family; default: the source's (`base`), else qwen2 for q/k/v biases, mistral for a
    sliding window, llama otherwise. base: a source config.json whose other fields (token ids,
    max_position_embeddings, initializer_range, ...) are kept.
    """
    base = dict(base or {})
    model_type = model_type or base.get("model_type") or (
        "qwen2" if config.attention_bias else "mistral" if config.sliding_window is not None else "llama")
    problems = []
    if model_type not in MODEL_TYPES:
        problems.append(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    if config.attention_bias != (model_type == "qwen2"):
        problems.append(f"attention_bias={config.attention_bias} (q/k/v biases exist exactly for qwen2)")
    if config.sliding_window is not None and model_type == "llama":
        problems.append(f"sliding_window={config.sliding_window} (llama has none)")
    if model_type == "qwen2" and config.head_dim != config.hidden_size // config.num_heads:
        problems.append(f"head_dim={config.head_dim} != hidden_size // num_heads (qwen2 derives it)")
    if problems:
        raise ConversionError(f"the LlamaConfig cannot be written as a HF {model_type!r} model: {'; '.join(problems)}.")
    out = {k: v for k, v in base.items() if k not in _DERIVED_HF_KEYS}
    rope_scaling = dict(config.rope_scaling) if config.rope_scaling is not None else None
    out.update(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling.
        rope_parameters={"rope_theta": config.rope_theta, **(rope_scaling or {"rope_type": "default"})},
        rope_theta=config.rope_theta,
        rope_scaling=rope_scaling,
        dtype="float32",
    )
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        out.update(sliding_window=config.sliding_window)
    else:
        sliding = config.sliding_window is not None
        out.update(use_sliding_window=sliding, sliding_window=config.sliding_window,
                   max_window_layers=0 if sliding else config.num_layers,
                   layer_types=["sliding_attention" if sliding else "full_attention"] * config.num_layers)
    return out


def model_gin_text(config, bos_id: int | None,
                   comment: str = "Converted from a HF checkpoint by itjax.convert.", prefix_lm: bool = False) -> str:
    """The gin model file (style of gin/models/llama3_8b.gin) binding MODEL = DecoderOnlyModel(config, bos_id)
    (and `prefix_lm = True` for a prefix-LM run's export)."""
    import dataclasses

    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [
        "import itjax.models.decoder_only",
        "",
        "MODEL = @itjax.models.DecoderOnlyModel()",
        "itjax.models.DecoderOnlyModel.config = @itjax.models.LlamaConfig()",
        "itjax.models.DecoderOnlyModel.z_loss = 1e-4",
        "itjax.models.DecoderOnlyModel.loss_normalizing_factor = 'NUM_REAL_TARGET_TOKENS'",
        f"itjax.models.DecoderOnlyModel.bos_id = {bos_id!r}",
    ] + (["itjax.models.DecoderOnlyModel.prefix_lm = True"] if prefix_lm else []) + [
        "",
    ]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        value = dict(value) if isinstance(value, Mapping) else value  # the frozen rope_scaling dict
        lines.append(f"itjax.models.LlamaConfig.{field.name} = {value!r}")
    return "\n".join(lines) + "\n"


def llama_config_from_gin(gin_file: str):
    """Reads the `LlamaConfig` a gin model file binds. Clears gin's global config before and after.

    Only the LlamaConfig bindings matter here, so the training-model configurable is skipped when it is not
    importable (reading a model file then needs neither seqio nor TensorFlow).
    """
    import gin

    from itjax import config as config_lib
    from itjax.models.llama import LlamaConfig

    gin.clear_config()
    try:
        config_lib.parse_gin_file(gin_file, skip_unknown=["itjax.models.DecoderOnlyModel", "DecoderOnlyModel"])
        return gin.get_configurable(LlamaConfig)()
    finally:
        gin.clear_config()


# ------------------------------------------------------------------------------------------------- tensors
def llama_tensor_maps(config) -> list[TensorMap]:
    """Every HF tensor of a model with `config` (an itjax LlamaConfig) and where it goes."""
    maps = [TensorMap(EMBED, ("embed_tokens", "embedding"), "copy")]
    for i in range(config.num_layers):
        hf, it = f"model.layers.{i}", ("layers", i)
        maps.append(TensorMap(f"{hf}.input_layernorm.weight", it + ("input_layernorm", "scale"), "copy"))
        for name in ("q_proj", "k_proj", "v_proj"):
            maps.append(TensorMap(f"{hf}.self_attn.{name}.weight", it + ("self_attn", name, "kernel"), "qkv"))
            if config.attention_bias:
                maps.append(TensorMap(f"{hf}.self_attn.{name}.bias", it + ("self_attn", name, "bias"), "bias"))
        maps.append(TensorMap(f"{hf}.self_attn.o_proj.weight", it + ("self_attn", "o_proj", "kernel"), "out"))
        maps.append(TensorMap(f"{hf}.post_attention_layernorm.weight", it + ("post_attention_layernorm", "scale"),
                              "copy"))
        for name in ("gate_proj", "up_proj", "down_proj"):
            maps.append(TensorMap(f"{hf}.mlp.{name}.weight", it + ("mlp", name, "kernel"), "linear"))
    maps.append(TensorMap("model.norm.weight", ("norm", "scale"), "copy"))
    if not config.tie_word_embeddings:
        maps.append(TensorMap(LM_HEAD, ("lm_head", "kernel"), "linear"))
    return maps


def abstract_params(config) -> Params:
    """The parameter pure dict of `Llama(config)` with ShapeDtypeStruct leaves (nothing allocated)."""
    from flax import nnx

    from itjax.models.llama import Llama

    # itjax folders hold the per-layer layout (`layers/<i>/...`) whatever `scan_layers` the model file sets;
    # `restore_initial_params` stacks them for a scanned model.
    config = dataclasses.replace(config, scan_layers=False)
    return folders.abstract_params(lambda: Llama(config, rngs=nnx.Rngs(params=0)))


def hf_llama_to_params(get: Callable[[str], np.ndarray], shapes: Mapping[str, tuple[int, ...]], config) -> Params:
    """HF tensors -> itjax parameter pure dict (numpy float32 leaves), one tensor at a time.

    get: HF name -> array (called once per needed tensor); shapes: HF name -> shape of every tensor present.
    Raises ConversionError listing every missing, unexpected or mis-shaped tensor, or a tied model's
    `lm_head.weight` that differs from the embedding.
    """
    params = abstract_params(config)  # filled in place: each ShapeDtypeStruct leaf is replaced by its array
    maps = llama_tensor_maps(config)
    expected = {m.hf_name: hf_shape(m.kind, get_path(params, m.path).shape) for m in maps}
    tolerated = {n: None for n in shapes if n.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        tolerated[LM_HEAD] = expected[EMBED]
    check_tensors(expected, shapes, tolerated=tolerated, what="a Llama-family model of its config.json",
                  hint="Check that config.json belongs to these weights (sizes, tie_word_embeddings, model_type).")
    fill_params(params, maps, get)
    if config.tie_word_embeddings and LM_HEAD in shapes and not np.array_equal(
            np.asarray(get(LM_HEAD), np.float32), params["embed_tokens"]["embedding"]):
        raise ConversionError(f"{LM_HEAD} differs from {EMBED}, but config.json says tie_word_embeddings=true; "
                              "set it to false if the model has a separate output layer.")
    return params


def params_from_hf_state_dict(state_dict: Mapping[str, np.ndarray], config) -> Params:
    """A HF Llama / Mistral / Qwen2 state dict (name -> numpy array) -> itjax parameter pure dict, matching
    `nnx.to_pure_dict(nnx.state(Llama(config), nnx.Param))`; apply it with `nnx.update(model, params)`.
    Raises ConversionError (a ValueError) naming missing, unexpected or mis-shaped tensors."""
    shapes = {name: tuple(np.shape(t)) for name, t in state_dict.items()}
    return hf_llama_to_params(lambda name: np.asarray(state_dict[name]), shapes, config)


# ------------------------------------------------------------------------------------------------- folders
def _bos_id(hf_dir: str, hf_config: Mapping[str, Any]) -> int | None:
    """The token the tokenizer puts first: tokenizer.json's bos_token (None if it declares none or
    add_bos_token=false); without tokenizer.json, config.json's bos_token_id, except for Qwen2, whose tokenizers
    never prepend one (its config.json still names <|endoftext|>)."""
    if not os.path.isfile(os.path.join(hf_dir, hf_tokenizer.TOKENIZER_JSON)):
        return None if hf_config.get("model_type") == "qwen2" else hf_config.get("bos_token_id")
    tokenizer_config = os.path.join(hf_dir, hf_tokenizer.TOKENIZER_CONFIG)
    if os.path.isfile(tokenizer_config):
        with open(tokenizer_config) as f:
            if json.load(f).get("add_bos_token") is False:
                return None
    return hf_tokenizer.special_token_ids(hf_dir)["bos_token"]


def hf_to_itjax(hf_dir: str, out_dir: str) -> Any:
    """HF folder -> itjax folder (checkpoint, model.gin, hf_config.json, tokenizer files). Returns the LlamaConfig."""
    folders.require_empty_dir(out_dir, "--out_dir")
    with open(os.path.join(hf_dir, folders.HF_CONFIG)) as f:
        hf_config = json.load(f)
    config = llama_config_from_hf(hf_config)
    reader = SafetensorsReader(hf_dir)
    params = hf_llama_to_params(reader.get, reader.shapes(), config)
    os.makedirs(out_dir, exist_ok=True)
    folders.save_params(params, out_dir)
    with open(os.path.join(out_dir, folders.MODEL_GIN), "w") as f:
        f.write(model_gin_text(config, _bos_id(hf_dir, hf_config),
                               f"Converted from {os.path.abspath(hf_dir)} by itjax.convert."))
    with open(os.path.join(out_dir, HF_CONFIG_COPY), "w") as f:
        json.dump(hf_config, f, indent=2)
    folders.copy_tokenizer_files(hf_dir, out_dir)
    return config


def itjax_to_hf(out_dir: str, hf_dir: str, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                dtype: str = "auto") -> Any:
    """itjax folder -> HF folder (config.json, safetensors, tokenizer files) for
    `transformers.AutoModelForCausalLM.from_pretrained`. dtype: of the written tensors; 'auto' = the source
    checkpoint's (hf_config.json `dtype` / `torch_dtype`: a bfloat16 source is written back in bfloat16), else
    float32. Returns the LlamaConfig."""
    folders.require_empty_dir(hf_dir, "--hf_dir")
    with open(os.path.join(out_dir, folders.MODEL_GIN)) as f:
        if re.search(r"^[\w.]*DecoderOnlyModel\.prefix_lm\s*=\s*True", f.read(), re.M):
            raise ConversionError(f"{out_dir}/{folders.MODEL_GIN} is a prefix-LM model (DecoderOnlyModel.prefix_lm = "
                                  "True), but HF's LlamaForCausalLM attends causally only: its outputs would change. "
                                  "Use the itjax folder (itjax.infer), or train with prefix_lm = False to export.")
    config = llama_config_from_gin(os.path.join(out_dir, folders.MODEL_GIN))
    base = None
    if os.path.isfile(os.path.join(out_dir, HF_CONFIG_COPY)):
        with open(os.path.join(out_dir, HF_CONFIG_COPY)) as f:
            base = json.load(f)
    hf_config = hf_config_from_llama(config, base=base)
    if dtype == "auto":
        source = (base or {}).get("dtype") or (base or {}).get("torch_dtype")
        dtype = source if source in ("bfloat16", "float16") else "float32"
    hf_config["dtype"] = dtype
    if base is None and os.path.isfile(os.path.join(out_dir, hf_tokenizer.TOKENIZER_JSON)):
        ids = hf_tokenizer.special_token_ids(out_dir)
        hf_config.update(bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"])
    params = folders.restore_params(out_dir, abstract_params(config))
    os.makedirs(hf_dir, exist_ok=True)
    write_safetensors(export_tensors(params, llama_tensor_maps(config), dtype), hf_dir, max_shard_size)
    with open(os.path.join(hf_dir, folders.HF_CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2)
    folders.copy_tokenizer_files(out_dir, hf_dir)
    return config
