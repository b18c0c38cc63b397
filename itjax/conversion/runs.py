"""A training run's weights -> an itjax model folder (`python -m itjax.convert --from_run MODEL_DIR --out_dir OUT`).

`itjax.train` writes MODEL_DIR/config.gin (the operative config) and MODEL_DIR/checkpoints/<step>. Exporting a
fine-tuned model to HF goes through the same itjax folder `itjax.convert` writes for imported models
(OUT/checkpoint, OUT/model.gin, tokenizer files), so `--to_hf` works on it unchanged:

    full fine-tuning   the run's parameters at the chosen step
    LoRA               the adapter merged into the base weights the run trained on (W + alpha / r * A B);
                       `peft_out` also writes the unmerged adapter as a HF peft folder
    prompt tuning,     with `peft_out` only: the adapter as a HF peft folder (`itjax.peft.export_methods`; T5
    (IA)3, prefix      prefix tuning is refused) and the frozen base, unchanged, as the plain model (its `--to_hf`
    tuning             folder is the base the adapter loads onto); without it refused: prompt / prefix tuning add
                       inputs a plain HF model has no place for

Tokenizer files and the original HF config.json copy (hf_config.json, which keeps token ids and
max_position_embeddings) are carried over from the run's `train.initial_checkpoint_path` when it is an itjax
model folder.
"""

from __future__ import annotations

import os
import shutil

import jax

from itjax.conversion import ConversionError, folders

CARRIED_FILES = ("hf_config.json",)  # besides the tokenizer files


def load_run(model_dir: str, step: int | None = None, flag: str = "--from_run"):
    """The run's model at checkpoint `step` (default: the latest), parameters only, on one device
    (`itjax.runs.load`: a PEFT run's adapter, with its frozen base in `.base_params`). ConversionError when
    `model_dir` is not a training run or the step / base pointer is bad."""
    from itjax import runs
    from itjax.partitioning import Partitioner

    try:
        if runs.kind_of(model_dir) != runs.RUN:
            raise ConversionError(f"{flag} {model_dir} is an itjax.convert folder, not a training run; it already is "
                                  "an itjax model folder (use --to_hf --out_dir on it directly).")
        return runs.load(model_dir, step, partitioner=Partitioner(devices=jax.devices()[:1]))
    except runs.RunLoadError as e:
        raise ConversionError(f"{flag}: {e}") from None


def _model_gin(model, comment: str) -> str:
    from itjax.conversion import llama, t5
    from itjax.models.llama import LlamaConfig

    if isinstance(model.config, LlamaConfig):
        return llama.model_gin_text(model.config, model.bos_id, comment, prefix_lm=model.prefix_lm)
    return t5.model_gin_text(model.config, comment)


def export_run(model_dir: str, out_dir: str, *, step: int | None = None, peft_out: str | None = None,
               require_lora: bool = False) -> None:
    """Writes the run's model at checkpoint `step` (default: the latest; LoRA merged) to the itjax folder `out_dir`
    (per-layer layout, also for a `scan_layers` run).

    peft_out: for a PEFT run, also write the (unmerged) adapter as a HF peft folder (adapter_config.json +
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads onto the HF base model; for prompt
    tuning, (IA)3 and prefix tuning runs it is required, and `out_dir` receives the frozen base.
    require_lora: refuse anything but a LoRA run (`--merge_lora`).
    """
    from itjax.models import scan
    from itjax.peft import LoRA, merge_lora, quantization
    from itjax.peft.export import save_peft_adapter
    from itjax.peft.export_methods import save_method_adapter

    folders.require_empty_dir(out_dir, "--out_dir")
    if peft_out:
        folders.require_empty_dir(peft_out, "--peft_out")
    loaded = load_run(model_dir, step, "--merge_lora" if require_lora else "--from_run")
    peft = loaded.peft
    if peft_out and getattr(loaded.model, "prefix_lm", False):
        raise ConversionError(f"--peft_out: {model_dir} trained a prefix-LM (DecoderOnlyModel.prefix_lm = True); a "
                              "peft adapter runs on HF's causal-only Llama, where its outputs would change.")
    if require_lora and not isinstance(peft, LoRA):
        raise ConversionError(f"--merge_lora: {model_dir} is not a LoRA run (train.peft = {peft!r}); use --from_run "
                              "to export a full fine-tuning run.")
    if peft is None:
        if peft_out:
            raise ConversionError(f"--peft_out: {model_dir} is a full fine-tuning run, it has no adapter to write.")
        params = scan.unstack_layers(loaded.params)
        what = "full fine-tuning"
    elif isinstance(peft, LoRA):
        if peft_out:
            save_peft_adapter(peft_out, loaded.params, peft, base_model_name_or_path=loaded.initial_checkpoint_path)
        base = quantization.plain_base_params(loaded.trainer, loaded.params)  # QLoRA: the dequantized base
        params = scan.unstack_layers(merge_lora(base, loaded.params, alpha=peft.alpha))
        what = f"LoRA merged ({peft!r})"
    elif peft_out:
        save_method_adapter(peft_out, loaded.params, peft, loaded.model.config,
                            base_model_name_or_path=loaded.initial_checkpoint_path)
        params = scan.unstack_layers(jax.device_get(loaded.base_params))
        what = f"the frozen base of a {peft!r} run; its adapter was written to {os.path.abspath(peft_out)}"
    else:
        raise ConversionError(f"{model_dir} trained {peft!r}: only full fine-tuning and LoRA runs export to a plain "
                              "model (prompt / prefix tuning need inputs a HF model has no place for, (IA)3 is not "
                              "merged); pass --peft_out DIR to write the adapter as a peft folder (and the frozen "
                              "base to --out_dir).")
    os.makedirs(out_dir, exist_ok=True)
    folders.save_params(params, out_dir)
    with open(os.path.join(out_dir, folders.MODEL_GIN), "w") as f:
        f.write(_model_gin(loaded.model, f"Exported from the run {os.path.abspath(model_dir)} "
                                         f"({what}) by itjax.convert --from_run."))
    source = loaded.initial_checkpoint_path
    if source and os.path.isdir(source):
        folders.copy_tokenizer_files(source, out_dir)
        for name in CARRIED_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
