"""LoRA adapters out of itjax: merged into the base weights, or as a HF `peft` adapter folder (prompt tuning,
(IA)3 and prefix tuning: `itjax.peft.export_methods`; the way in: `itjax.conversion.peft_import`).

`save_peft_adapter` writes what `peft.PeftModel.from_pretrained(hf_model, folder)` loads:

    adapter_config.json            LoraConfig fields (peft_type LORA, r, lora_alpha, target_modules, task_type ...)
    adapter_model.safetensors      base_model.model.<HF module>.lora_A.weight [r, in]  (itjax lora_a [*in, r])
                                   base_model.model.<HF module>.lora_B.weight [out, r] (itjax lora_b [r, *out])

with HF module names (T5 / Llama):

    encoder.layers.{i}.attention.X          encoder.block.{i}.layer.0.SelfAttention.X
    encoder.layers.{i}.mlp.X                encoder.block.{i}.layer.1.DenseReluDense.X
    decoder.layers.{i}.self_attention.X     decoder.block.{i}.layer.0.SelfAttention.X
    decoder.layers.{i}.cross_attention.X    decoder.block.{i}.layer.1.EncDecAttention.X
    decoder.layers.{i}.mlp.X                decoder.block.{i}.layer.2.DenseReluDense.X
    layers.{i}.self_attn.X / layers.{i}.mlp.X   model.layers.{i}.self_attn.X / model.layers.{i}.mlp.X
    lm_head                                 lm_head

The in / out dims of a kernel flatten row-major, as itjax's HF conversion reshapes `W.T`, so `A B` here is
`(B_hf A_hf).T` there and peft's update `scaling * B_hf A_hf x` equals itjax's.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from itjax.models import scan
from itjax.peft import quantization
from itjax.peft.core import PeftConfigError, path_name
from itjax.peft.lora import LoRA, lora_layers

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_T5_BLOCKS = {("encoder", "attention"): "layer.0.SelfAttention", ("encoder", "mlp"): "layer.1.DenseReluDense",
              ("decoder", "self_attention"): "layer.0.SelfAttention",
              ("decoder", "cross_attention"): "layer.1.EncDecAttention", ("decoder", "mlp"): "layer.2.DenseReluDense"}


def hf_module_name(path: tuple) -> str:
    """HF module name of the itjax layer at `path` (e.g. ('encoder', 'layers', 0, 'attention', 'q'))."""
    if path == ("lm_head",):
        return "lm_head"
    if len(path) == 5 and path[1] == "layers" and (path[0], path[3]) in _T5_BLOCKS:
        return f"{path[0]}.block.{path[2]}.{_T5_BLOCKS[path[0], path[3]]}.{path[4]}"
    if len(path) == 4 and path[0] == "layers" and path[2] in ("self_attn", "mlp"):
        return f"model.layers.{path[1]}.{path[2]}.{path[3]}"
    raise PeftConfigError(f"save_peft_adapter: no HF name for the adapted layer {path_name(path)}.")


def peft_tensors(adapter: Any) -> dict[str, np.ndarray]:
    """{peft safetensors name: float32 array} for a LoRA adapter pure dict."""
    tensors = {}
    for path, (a, b) in lora_layers(jax.device_get(adapter)).items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rank = a.shape[-1]
        name = f"base_model.model.{hf_module_name(path)}"
        tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
        tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
    if not tensors:
        raise PeftConfigError("save_peft_adapter: the adapter holds no LoRA weights (lora_a / lora_b).")
    return tensors


def save_peft_adapter(out_dir: str, adapter: Any, lora: LoRA, *, base_model_name_or_path: str | None = None) -> str:
    """Writes `adapter` (a LoRA adapter pure dict: the train state's params) as a HF peft adapter folder.

    lora: the run's LoRA settings (rank, alpha, dropout). The task type (SEQ_2_SEQ_LM for T5, CAUSAL_LM for
    Llama) and the target module names come from the adapter's own layers. Returns `out_dir`.
    A `scan_layers` run's stacked adapter is written per layer, as peft names it.
    """
    from safetensors.numpy import save_file

    adapter = scan.unstack_layers(jax.device_get(adapter))
    tensors = peft_tensors(adapter)
    layers = list(lora_layers(jax.device_get(adapter)))
    ranks = {np.shape(a)[-1] for a, _ in lora_layers(jax.device_get(adapter)).values()}
    if ranks != {lora.rank}:
        raise PeftConfigError(f"save_peft_adapter: the adapter has rank(s) {sorted(ranks)} but LoRA.rank="
                              f"{lora.rank}; pass the LoRA settings the adapter was trained with.")
    causal = any(path[0] == "layers" for path in layers)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout_rate,
        "target_modules": sorted({str(path[-1]) for path in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def load_lora_run(model_dir: str, step: int | None = None):
    """(base params, adapter params, LoRA settings, model) of a LoRA training run in MODEL_DIR, as host arrays.

    Restores only the adapter of the checkpoint at `step` (default: the latest) and the base weights its pointer
    names (`itjax.runs.load`, which also checks the base against the adapter's fingerprint; a QLoRA base comes back
    dequantized, the weights the adapter was trained on). This is what
    `itjax.convert --merge_lora` / `--peft_out` start from.
    """
    from itjax import runs

    loaded = runs.load(model_dir, step)
    if loaded.kind != runs.RUN or not isinstance(loaded.peft, LoRA):
        raise PeftConfigError(f"{model_dir} is not a LoRA run (train.peft = {loaded.peft!r}); only LoRA adapters "
                              "merge into the base weights or export to peft.")
    base = quantization.plain_base_params(loaded.trainer, loaded.params)  # QLoRA: the dequantized base
    return jax.device_get(base), jax.device_get(loaded.params), loaded.peft, loaded.model
