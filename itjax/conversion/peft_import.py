"""A HF peft LoRA adapter -> itjax: `python -m itjax.convert --peft_adapter DIR --hf_dir BASE --out_dir OUT`.

OUT is the base model converted exactly as `--hf_dir BASE --out_dir OUT` writes it (checkpoint, model.gin,
tokenizer files; `itjax.conversion.folders`) plus the adapter:

    OUT/adapter/                    orbax save of the LoRA adapter pure dict, per layer: .../<layer>/lora_a
                                    [*in_dims, r] = lora_A.weight.T, .../<layer>/lora_b [r, *out_dims] = lora_B.weight.T
                                    (HF module names as in `itjax.peft.export`)
    OUT/adapter.gin                 train.peft = @LoRA() with the adapter's rank, alpha and target_modules
    OUT/peft_adapter_config.json    the adapter's own adapter_config.json, kept as it was

peft scales the update by lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`); itjax by LoRA.alpha / LoRA.rank,
so adapter.gin sets LoRA.alpha = r * (peft's scaling): the same update, and the same effective learning dynamics
when training continues. Layers a target name matches but the adapter leaves out (peft's `layers_to_transform`)
get B = 0 (an exact no-op) and A drawn as itjax's LoRA initialises it.

Uses of OUT:
  evaluate / infer    `itjax.runs.load(OUT)` (so `python -m itjax.infer OUT`, `itjax.eval`) builds the LoRA model
                      on the converted base with this adapter
  continue training   `--gin_file=OUT/model.gin --gin_file=OUT/adapter.gin --gin.train.initial_checkpoint_path=
                      'OUT'`: the base is OUT's and the adapter starts from OUT/adapter (`restore_initial_adapter`)

Refused, with nothing written: adapters that are not LoRA, LoRA variants itjax does not compute (DoRA, biases,
per-module ranks / alphas, modules_to_save, fan_in_fan_out), adapted modules itjax has no LoRA layer for (named),
and an adapter made for another base (the first tensor whose shape does not fit is named).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

from itjax.conversion import ConversionError, folders
from itjax.conversion.safetensors_io import SafetensorsReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_DIR = "adapter"
ADAPTER_GIN = "adapter.gin"
KEPT_CONFIG = "peft_adapter_config.json"
_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
# adapter_config.json fields whose non-default values change what the adapter computes and that itjax's LoRA lacks.
_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "lora_bias": (False, None),
                "fan_in_fan_out": (False, None), "modules_to_save": (None, []), "rank_pattern": ({}, None),
                "alpha_pattern": ({}, None), "layer_replication": (None,), "use_qalora": (False, None),
                "target_parameters": (None, []), "trainable_token_indices": (None,), "alora_invocation_tokens": (None,)}


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json of a peft LoRA folder, checked for the options itjax's LoRA computes."""
    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found; --peft_adapter must be a peft adapter folder (adapter_config.json "
                              f"+ {ADAPTER_WEIGHTS}, as `PeftModel.save_pretrained` writes).")
    with open(path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type={config.get('peft_type')!r}; only LoRA adapters import into itjax.")
    bad = {k: config[k] for k, allowed in _UNSUPPORTED.items() if k in config and config[k] not in allowed}
    if bad:
        raise ConversionError(f"{path}: {bad} — itjax's LoRA has one rank and alpha for every layer, no DoRA, no "
                              "biases and no extra trained modules, so it cannot compute this adapter.")
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_WEIGHTS)):
        raise ConversionError(f"{os.path.join(adapter_dir, ADAPTER_WEIGHTS)} not found (a .bin adapter must be "
                              "saved as safetensors first: PeftModel.save_pretrained(..., safe_serialization=True)).")
    return config


def scaling(config: dict) -> float:
    """peft's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _make_module(config):
    """A factory of the per-layer itjax model (T5 or Llama) of `config`."""
    import dataclasses

    from flax import nnx

    from itjax.models.llama import Llama, LlamaConfig
    from itjax.models.t5 import T5

    config = dataclasses.replace(config, scan_layers=False)
    cls = Llama if isinstance(config, LlamaConfig) else T5
    return lambda: cls(config, rngs=nnx.Rngs(params=0))


def _hf_layers(make_module) -> dict[str, tuple]:
    """{HF module name: itjax Dense path} of every layer of the model that LoRA can adapt."""
    from flax import nnx

    from itjax.peft import core
    from itjax.peft.export import hf_module_name

    names = {}
    for path in core.dense_layers(nnx.eval_shape(make_module)):
        try:
            names[hf_module_name(path)] = path
        except core.PeftConfigError:
            pass
    return names


def _module_of(name: str) -> str:
    """The HF module a peft tensor name belongs to ('base_model.model.model.embed_tokens.lora_embedding_A' ->
    'model.embed_tokens')."""
    name = name.removeprefix("base_model.model.")
    match = re.match(r"(.+?)\.(lora_\w+|base_layer|modules_to_save|original_module)(\.|$)", name)
    return match[1] if match else name.rpartition(".")[0] or name


def read_lora_tensors(adapter_dir: str, layers: dict[str, tuple]) -> tuple[dict, SafetensorsReader]:
    """{itjax layer path: {"A": tensor name, "B": tensor name}} of the adapter, and its reader. Refuses names of
    modules itjax has no LoRA layer for (all listed) and layers with only one of A / B."""
    reader = SafetensorsReader.of_file(os.path.join(adapter_dir, ADAPTER_WEIGHTS))
    found, unsupported = {}, []
    for name in sorted(reader.shapes()):
        match = _NAME.match(name)
        if match is None or match["module"] not in layers:
            unsupported.append(name)
            continue
        found.setdefault(layers[match["module"]], {})[match["which"]] = name
    if unsupported:
        modules = sorted({_module_of(n) for n in unsupported})
        raise ConversionError(
            f"{os.path.join(adapter_dir, ADAPTER_WEIGHTS)}: the adapter trains modules itjax has no LoRA layer for: "
            f"{modules[:20]}{' ...' if len(modules) > 20 else ''}. itjax adapts the attention / MLP projections and "
            "lm_head (T5: q, k, v, o, wi / wi_0, wi_1, wo; Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, "
            "up_proj, down_proj); retrain the adapter with target_modules among those.")
    half = sorted(".".join(map(str, p)) for p, ab in found.items() if len(ab) != 2)
    if half:
        raise ConversionError(f"{adapter_dir}: layers {half} have only one of lora_A / lora_B; the adapter is "
                              "incomplete.")
    if not found:
        raise ConversionError(f"{adapter_dir}: the adapter holds no lora_A / lora_B weights.")
    return found, reader


def adapter_params(adapter_dir: str, hf_config: dict, family, seed: int = 0):
    """(LoRA settings, itjax adapter pure dict of float32 numpy) for the peft adapter in `adapter_dir` on the base
    model of HF config.json `hf_config` (family: itjax.conversion.t5 or .llama). Reads only the adapter."""
    from flax import nnx

    from itjax.peft import AdapterParam, LoRA, core

    peft_config = read_adapter_config(adapter_dir)
    from itjax.conversion import t5

    config = t5.t5_config_from_hf(hf_config) if family is t5 else family.llama_config_from_hf(hf_config)
    make_module = _make_module(config)
    found, reader = read_lora_tensors(adapter_dir, _hf_layers(make_module))
    rank = int(peft_config["r"])
    lora = LoRA(rank=rank, alpha=rank * scaling(peft_config), dropout=float(peft_config.get("lora_dropout") or 0.0),
                target_modules=sorted({str(path[-1]) for path in found}))

    def adapted():
        module = make_module()
        lora.apply(module, nnx.Rngs(params=seed))
        return module
    try:
        module = nnx.eval_shape(adapted)
    except core.PeftConfigError as e:  # e.g. r larger than a layer allows
        raise ConversionError(f"{adapter_dir}: {e}") from None
    abstract = nnx.to_pure_dict(nnx.state(module, AdapterParam))
    shapes = reader.shapes()
    rng = np.random.default_rng(seed)
    for path, layer in sorted(core.dense_layers(module).items(), key=lambda kv: core.path_name(kv[0])):
        if not hasattr(layer, "lora_a"):
            continue
        node = core.submodule_dict(abstract, path)
        a_shape, b_shape = node["lora_a"].shape, node["lora_b"].shape
        fan_in, fan_out = math.prod(a_shape[:-1]), math.prod(b_shape[1:])
        if path not in found:  # peft's layers_to_transform left it out: a no-op update, trainable as itjax starts it
            bound = 1.0 / math.sqrt(fan_in)
            node["lora_a"] = rng.uniform(-bound, bound, a_shape).astype(np.float32)
            node["lora_b"] = np.zeros(b_shape, np.float32)
            continue
        names = found[path]
        for which, want in (("A", (rank, fan_in)), ("B", (fan_out, rank))):
            if tuple(shapes[names[which]]) != want:
                raise ConversionError(
                    f"{adapter_dir}: {names[which]} has shape {tuple(shapes[names[which]])}, but the base model's "
                    f"layer {core.path_name(path)} needs {want} (r={rank}, {fan_in} inputs, {fan_out} outputs): the "
                    "adapter was made for another base model (or another r); pass the --hf_dir it was trained on.")
        node["lora_a"] = np.asarray(reader.get(names["A"]), np.float32).T.reshape(a_shape)
        node["lora_b"] = np.asarray(reader.get(names["B"]), np.float32).T.reshape(b_shape)
    return lora, abstract


def adapter_gin_text(lora, comment: str) -> str:
    """The gin file that builds the imported adapter's LoRA (add it after OUT/model.gin)."""
    targets = ", ".join(repr(t) for t in lora.target_modules)
    return (f"# {comment}\n# Train on: --gin_file=OUT/model.gin --gin_file=OUT/{ADAPTER_GIN} "
            "--gin.train.initial_checkpoint_path='OUT'\n"
            "import itjax.peft\n\n"
            "train.peft = @LoRA()\n"
            f"LoRA.rank = {lora.rank}\n"
            f"LoRA.alpha = {lora.alpha!r}\n"
            f"LoRA.dropout = {lora.dropout_rate!r}\n"
            f"LoRA.target_modules = [{targets}]\n")


def import_peft_lora(adapter_dir: str, hf_dir: str, out_dir: str, family) -> Any:
    """Writes the HF base `hf_dir` and the peft LoRA adapter `adapter_dir` to the itjax folder `out_dir` (see the
    module docstring). Everything is checked before anything is written. Returns the LoRA settings."""
    import orbax.checkpoint as ocp

    folders.require_empty_dir(out_dir, "--out_dir")
    with open(os.path.join(hf_dir, folders.HF_CONFIG)) as f:
        hf_config = json.load(f)
    lora, adapter = adapter_params(adapter_dir, hf_config, family)
    family.hf_to_itjax(hf_dir, out_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(os.path.abspath(out_dir), ADAPTER_DIR), adapter)
        checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, ADAPTER_GIN), "w") as f:
        f.write(adapter_gin_text(lora, f"peft LoRA adapter {os.path.abspath(adapter_dir)} imported by itjax.convert "
                                       f"--peft_adapter (peft scaling {lora.scaling:g} = LoRA.alpha / LoRA.rank)."))
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as src, open(os.path.join(out_dir, KEPT_CONFIG), "w") as dst:
        dst.write(src.read())
    return lora


def has_adapter(path: str) -> bool:
    """Whether the itjax folder `path` holds an imported adapter (OUT/adapter + OUT/adapter.gin)."""
    from etils import epath

    return (epath.Path(path) / ADAPTER_DIR).is_dir() and (epath.Path(path) / ADAPTER_GIN).exists()


def restore_initial_adapter(path: str, abstract_params: Any) -> Any:
    """The adapter of the itjax folder `path` restored into `abstract_params` (a LoRA trainer's adapter
    ShapeDtypeStructs, per layer or stacked). CheckpointMismatchError (naming the tensors) when the run's LoRA
    settings differ from OUT/adapter.gin's."""
    from etils import epath

    from itjax.checkpoints import CheckpointMismatchError, restore_initial_params

    try:
        return restore_initial_params(str(epath.Path(path) / ADAPTER_DIR), abstract_params)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{e}\nThe adapter in {path} was imported with the LoRA settings of "
                                      f"{epath.Path(path) / ADAPTER_GIN}; add --gin_file={epath.Path(path) / ADAPTER_GIN} "
                                      "(same rank and target_modules) to continue it.") from None
