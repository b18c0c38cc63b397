"""Prompt tuning, (IA)3 and prefix tuning adapters out of itjax as HF `peft` adapter folders.

`save_method_adapter(out_dir, adapter, method, config)` writes what `peft.PeftModel.from_pretrained(hf_model,
out_dir)` loads onto the HF model converted from the same base (adapter_config.json + adapter_model.safetensors):

    PromptTuning (T5, Llama)   peft_type PROMPT_TUNING, one virtual-token block (num_transformer_submodules=1: T5's
                               prompt is the encoder input prefix, as itjax's)
                               prompt_embeddings [P, embed]             = itjax input_prompt.embedding
    IA3 (T5, Llama)            peft_type IA3, target_modules / feedforward_modules as the run's
                               base_model.model.<HF module>.ia3_l       [out, 1] (scaled output: itjax [*out] flat)
                                                                        [1, in]  (feed-forward: itjax [*in] flat)
    PrefixTuning (Llama only)  peft_type PREFIX_TUNING, prefix_projection=False (peft then stores the final
                               past key / value tensor; a reparameterised itjax prefix is evaluated through its MLP)
                               prompt_embeddings [P, layers * 2 * kv_heads * head_dim], per virtual token the
                               layers' (key, value) pairs in order, each [kv_heads, head_dim]

Refused: prompt tuning with `position='after_bos'` (peft puts the prompt before every token) and prefix tuning on
T5 (peft's T5 prefix goes into the decoder's self- and cross-attention, where T5 adds a relative position bias to
it; itjax's goes into the encoder and decoder self-attention with no bias: no peft adapter computes the same).

Positions: itjax's prefix keys are stored already rotated and its tokens sit at positions 0..l-1; peft feeds the
prefix as a key / value cache of length P, so HF's tokens sit at positions P..P+l-1 and every query is rotated P
further. Since RoPE scores depend on (R_q q).k only through rotations, the exported keys are the itjax keys rotated
by P (k' = R_P k), which gives (R_{p+P} q).(R_P k) = (R_p q).k: the same attention weights.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from itjax import param_paths
from itjax.peft.core import PeftConfigError, path_name
from itjax.peft.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, hf_module_name
from itjax.peft.ia3 import IA3
from itjax.peft.prefix_tuning import PrefixTuning
from itjax.peft.prompt_tuning import PromptTuning


def _is_llama(config) -> bool:
    from itjax.models.llama import LlamaConfig
    return isinstance(config, LlamaConfig)


def _shape_info(config) -> dict:
    """num_layers / num_attention_heads / token_dim as peft's prompt-learning configs record them."""
    if _is_llama(config):
        return {"num_layers": config.num_layers, "num_attention_heads": config.num_heads,
                "token_dim": config.hidden_size}
    return {"num_layers": config.num_encoder_layers, "num_attention_heads": config.num_heads,
            "token_dim": config.d_model}


def _walk(node: Any, leaf: str, path: tuple = ()) -> dict[tuple, Any]:
    """{path of the module holding `leaf`: value} in a pure dict."""
    found = {}
    if isinstance(node, dict):
        for key, child in node.items():
            if key == leaf and not isinstance(child, dict):
                found[path] = child
            else:
                found.update(_walk(child, leaf, path + (key,)))
    return found


def prompt_tuning_tensors(adapter: Any, method: PromptTuning, config) -> tuple[dict, dict]:
    """(config fields, {name: float32 array}) of a PromptTuning adapter pure dict."""
    if method.position != "start":
        raise PeftConfigError(f"--peft_out: PromptTuning.position={method.position!r} puts the prompt after the "
                              "first token; peft always puts it in front of the whole input, so the adapter would "
                              "compute something else. Only position='start' prompts export to peft.")
    embedding = np.asarray(adapter["input_prompt"]["embedding"], np.float32)
    fields = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": int(embedding.shape[0]),
              "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
              "tokenizer_name_or_path": None, "tokenizer_kwargs": None, **_shape_info(config)}
    return fields, {"prompt_embeddings": np.ascontiguousarray(embedding)}


def ia3_tensors(adapter: Any, feedforward_names: set[str]) -> tuple[dict, dict]:
    """(config fields, {name: float32 array}) of an IA3 adapter pure dict (per-layer layout); layers named in
    `feedforward_names` scale their input (the run's IA3.feedforward_modules), the others their output."""
    tensors, targets, feedforward = {}, set(), set()
    for path, scale in sorted(_walk(adapter, "ia3_scale").items(), key=lambda kv: path_name(kv[0])):
        scale = np.asarray(scale, np.float32).reshape(-1)
        is_ff = str(path[-1]) in feedforward_names  # peft tells the two sides apart by the tensor's shape
        tensors[f"base_model.model.{hf_module_name(path)}.ia3_l"] = (scale[None, :] if is_ff else scale[:, None])
        targets.add(str(path[-1]))
        if is_ff:
            feedforward.add(str(path[-1]))
    if not tensors:
        raise PeftConfigError("--peft_out: the adapter holds no (IA)3 vectors (ia3_scale).")
    fields = {"peft_type": "IA3", "target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
              "fan_in_fan_out": False, "init_ia3_weights": True, "exclude_modules": None}
    return fields, {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def prefix_tuning_tensors(adapter: Any, config) -> tuple[dict, dict]:
    """(config fields, {name: float32 array}) of a Llama PrefixTuning adapter pure dict (per-layer layout)."""
    if not _is_llama(config):
        raise PeftConfigError(
            "--peft_out: prefix tuning on T5 does not export to peft. itjax puts the prefix into the encoder's and "
            "the decoder's self-attention with no position bias; peft's T5 prefix goes into the decoder's self- "
            "and cross-attention (not the encoder) and T5 adds its relative position bias to it, so no peft "
            "adapter computes what this run learned. Export Llama-family prefix tuning, or use LoRA / (IA)3 / "
            "prompt tuning for T5 models that must load in peft.")
    from itjax.models.llama import apply_rope, rope_inverse_frequencies

    n = config.num_layers
    names = sorted(f"layers.{i}.self_attn" for i in range(n))  # PrefixMLP's layer order (PrefixTuning.apply)
    mlp = _walk(adapter, "w1")
    per_layer = []
    for i in range(n):
        if mlp:  # one PrefixMLP (stored under the first layer) computes every layer's prefix
            keys, values = _mlp_prefix(next(iter(mlp.keys())), adapter, names.index(f"layers.{i}.self_attn"))
        else:
            node = adapter["layers"][i]["self_attn"]["extra_kv"]
            keys, values = node["prefix_keys"], node["prefix_values"]
        per_layer.append((np.asarray(keys, np.float32), np.asarray(values, np.float32)))
    length, heads, head_dim = per_layer[0][0].shape
    inv_freq = rope_inverse_frequencies(config)
    rows = []
    for keys, values in per_layer:  # keys [P, kv_heads, head_dim]
        moved = np.asarray(apply_rope(keys[None], np.full((1, length), length, np.int32), inv_freq))[0]
        rows += [moved, values]
    stacked = np.stack(rows, axis=1)  # [P, layers * 2, kv_heads, head_dim]
    fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": int(length), "num_layers": n,
              "num_attention_heads": int(heads), "token_dim": int(heads * head_dim),
              "encoder_hidden_size": int(heads * head_dim), "prefix_projection": False,
              "num_transformer_submodules": 1}
    return fields, {"prompt_embeddings": np.ascontiguousarray(stacked.reshape(length, -1), np.float32)}


def _mlp_prefix(path: tuple, adapter: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys, values [P, kv_heads, head_dim] of slice `index` of the shared PrefixMLP at `path` (float32 numpy)."""
    node = adapter
    for key in path:
        node = node[key]
    p = {k: np.asarray(v, np.float64) for k, v in node.items()}
    hidden = np.tanh(p["embedding"] @ p["w1"] + p["b1"])
    kv = np.einsum("ph,hlskd->plskd", hidden, p["w2"]) + p["b2"]  # [P, layers, 2, heads, kv]
    return kv[:, index, 0], kv[:, index, 1]


def save_method_adapter(out_dir: str, adapter: Any, method: Any, config, *,
                        base_model_name_or_path: str | None = None) -> str:
    """Writes a PromptTuning / IA3 / PrefixTuning adapter (its pure dict, the run's params; stacked or per layer)
    as a HF peft folder for the base model of `config` (T5Config or LlamaConfig). Returns `out_dir`.
    Raises PeftConfigError for an adapter peft cannot represent (see the module docstring)."""
    from safetensors.numpy import save_file

    adapter = param_paths.unstack_layers(jax.device_get(adapter))
    if isinstance(method, PromptTuning):
        fields, tensors = prompt_tuning_tensors(adapter, method, config)
    elif isinstance(method, IA3):
        fields, tensors = ia3_tensors(adapter, _ia3_feedforward(method, config))
    elif isinstance(method, PrefixTuning):
        fields, tensors = prefix_tuning_tensors(adapter, config)
    else:
        raise PeftConfigError(f"--peft_out: no peft format for {method!r}; LoRA, PromptTuning, IA3 and Llama-family "
                              "PrefixTuning export.")
    task = "CAUSAL_LM" if _is_llama(config) else "SEQ_2_SEQ_LM"
    full = {**fields, "task_type": task, "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True, "modules_to_save": None, "revision": None, "auto_mapping": None}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(full, f, indent=2)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def _ia3_feedforward(method: IA3, config) -> set[str]:
    from itjax.peft.ia3 import DEFAULTS

    default = DEFAULTS["llama" if _is_llama(config) else "t5"][1]
    return set(method.feedforward_modules if method.feedforward_modules is not None else default)
