"""HF <-> itjax checkpoint conversion: T5 / mT5 (encoder-decoder) and Llama / Mistral / Qwen2 (decoder-only);
T5X -> itjax for T5-family checkpoints.

Usage:

    python -m itjax.convert --hf_dir DIR --out_dir OUT             # HF folder -> itjax folder
    python -m itjax.convert --to_hf --hf_dir OUT_HF --out_dir OUT  # itjax folder OUT -> HF folder OUT_HF
    python -m itjax.convert --t5x_checkpoint CKPT --out_dir OUT [--t5x_gin CONFIG.gin] [--vocabulary spiece.model]
        [--mlp_activation gated-gelu|gated-silu|relu]   # T5X checkpoint (legacy or orbax format) -> itjax folder
    python -m itjax.convert --peft_adapter ADAPTER --hf_dir BASE --out_dir OUT
        # a HF peft LoRA adapter on its HF base -> itjax folder OUT (the base + OUT/adapter, OUT/adapter.gin)
    python -m itjax.convert --from_run MODEL_DIR --out_dir OUT [--to_hf --hf_dir OUT_HF] [--peft_out ADAPTER]
        # a training run (full fine-tuning, or LoRA merged into its base) -> itjax folder OUT [-> HF folder];
        # --merge_lora MODEL_DIR is the same for a run that must be a LoRA run

HF -> itjax dispatches on config.json's `model_type`; itjax -> HF on the config that OUT/model.gin binds.
The itjax folder (OUT/checkpoint, OUT/model.gin, tokenizer files) is described in `itjax.conversion.folders`;
`itjax.training.train(initial_checkpoint_path=OUT)` starts a run from it with `--gin_file=OUT/model.gin`.
T5X checkpoints: see `itjax.conversion.t5x` (architecture from --t5x_gin or the shapes; a gated MLP needs
--t5x_gin or --mlp_activation). Reading streams one safetensors / T5X tensor at a time (no torch); export writes
shards of `--max_shard_size_mb`.
Neither direction writes into a folder that already holds files.
"""

from __future__ import annotations

import argparse
import json
import os
from types import ModuleType

from itjax import cli
from itjax.checkpoints import CheckpointMismatchError
from itjax.config import ConfigError
from itjax.conversion import ConversionError, llama, peft_import, runs, t5, t5x
# Re-exported: the names callers used before the conversion code moved to itjax.conversion.
from itjax.conversion.folders import HF_CONFIG, MODEL_GIN, save_params
from itjax.conversion.t5 import t5_config_from_gin, t5_config_from_hf
from itjax.peft.core import PeftConfigError

__all__ = ["main", "family_of_hf_dir", "family_of_itjax_dir", "supported_model_types", "ConversionError",
           "HF_CONFIG", "MODEL_GIN", "save_params", "t5_config_from_gin", "t5_config_from_hf"]

FAMILIES: tuple[ModuleType, ...] = (t5, llama)
# The config class a model.gin binds -> the family that exports it.
GIN_CONFIGS = {"itjax.models.T5Config.": t5, "itjax.models.LlamaConfig.": llama}


def supported_model_types() -> tuple[str, ...]:
    return tuple(m for family in FAMILIES for m in family.MODEL_TYPES)


def family_of_hf_dir(hf_dir: str) -> ModuleType:
    """The conversion module for the HF folder's config.json `model_type`."""
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found; --hf_dir must be a HF model folder (config.json + safetensors).")
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    raise ConversionError(f"{path}: model_type={model_type!r} is not supported; itjax.convert converts "
                          f"model_type {supported_model_types()}.")


def family_of_itjax_dir(out_dir: str) -> ModuleType:
    """The conversion module for the config class bound in OUT/model.gin."""
    path = os.path.join(out_dir, MODEL_GIN)
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found; --out_dir must be a folder written by itjax.convert.")
    with open(path) as f:
        text = f.read()
    found = {family for prefix, family in GIN_CONFIGS.items() if prefix in text}
    if len(found) != 1:
        raise ConversionError(f"{path} must bind exactly one of {sorted(p.rstrip('.') for p in GIN_CONFIGS)}.")
    return found.pop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m itjax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_dir", help="the HF folder (read, or written with --to_hf)")
    parser.add_argument("--out_dir", required=True, help="the itjax folder (written, or read with --to_hf)")
    parser.add_argument("--to_hf", action="store_true", help="convert the itjax folder --out_dir to --hf_dir")
    parser.add_argument("--from_run", metavar="MODEL_DIR",
                        help="write the model of this itjax.train run (LoRA merged into its base) to --out_dir")
    parser.add_argument("--merge_lora", metavar="MODEL_DIR",
                        help="--from_run for a LoRA run, required to be one: its adapter merged into its base")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="--from_run: the step (default: latest)")
    parser.add_argument("--peft_out", metavar="DIR",
                        help="--from_run of a PEFT run: also write the adapter as a HF peft folder (LoRA, prompt "
                             "tuning, (IA)3, Llama prefix tuning; for the last three --out_dir gets the frozen base)")
    parser.add_argument("--peft_adapter", metavar="DIR",
                        help="with --hf_dir BASE: import this HF peft LoRA adapter (adapter_config.json + "
                             "adapter_model.safetensors) onto the converted base in --out_dir")
    parser.add_argument("--t5x_checkpoint", metavar="CKPT",
                        help="convert this T5X checkpoint (a checkpoint_<step> folder, legacy or orbax format) to "
                             "--out_dir")
    parser.add_argument("--t5x_gin", metavar="CONFIG.gin",
                        help="--t5x_checkpoint: the run's operative config.gin (network.T5Config bindings)")
    parser.add_argument("--vocabulary", metavar="SPIECE.model",
                        help="--t5x_checkpoint: the SentencePiece model, copied to --out_dir/spiece.model")
    parser.add_argument("--mlp_activation", choices=t5x.MLP_FLAG_CHOICES,
                        help="--t5x_checkpoint without --t5x_gin: the MLP (gated-gelu: T5 v1.1 / Flan-T5 / mT5; "
                             "gated-silu: UL2; relu: T5 1.0, the default for an ungated MLP)")
    parser.add_argument("--max_shard_size_mb", type=float, default=2048, help="--to_hf: safetensors shard size")
    parser.add_argument("--hf_dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="--to_hf: tensor dtype; auto = the source checkpoint's for Llama-family folders "
                             "(bfloat16 stays bfloat16), else float32")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    # A training run's loader reads its task (seqio, hence TensorFlow); HF <-> itjax conversion does not.
    cli.start(args.verbose, uses_tensorflow=bool(args.from_run or args.merge_lora))
    if args.merge_lora:
        if args.from_run:
            parser.error("--merge_lora MODEL_DIR already names the run; drop --from_run")
        args.from_run = args.merge_lora
    if args.t5x_checkpoint and args.from_run:
        parser.error("--t5x_checkpoint and --from_run / --merge_lora are two different sources; pass one")
    if (args.t5x_gin or args.vocabulary or args.mlp_activation) and not args.t5x_checkpoint:
        parser.error("--t5x_gin, --vocabulary and --mlp_activation go with --t5x_checkpoint")
    if args.hf_dir is None and (args.to_hf or not (args.from_run or args.t5x_checkpoint)):
        parser.error("--hf_dir is required (except for --from_run or --t5x_checkpoint without --to_hf)")
    if args.peft_adapter and (args.to_hf or args.from_run or args.t5x_checkpoint):
        parser.error("--peft_adapter imports onto the HF base --hf_dir; it does not go with --to_hf, --from_run / "
                     "--merge_lora or --t5x_checkpoint")
    if args.peft_out and not args.from_run:
        parser.error("--peft_out needs --from_run MODEL_DIR (a PEFT training run)")
    try:
        if args.t5x_checkpoint:
            config, source_format = t5x.t5x_to_itjax(args.t5x_checkpoint, args.out_dir, gin_file=args.t5x_gin,
                                                     vocabulary=args.vocabulary, mlp_activation=args.mlp_activation)
            print(f"wrote {args.out_dir}/{{checkpoint,{MODEL_GIN}}}" + (" and spiece.model" if args.vocabulary else "")
                  + f" from the T5X checkpoint {args.t5x_checkpoint} ({source_format} format, {config.feed_forward})")
        if args.from_run:
            runs.export_run(args.from_run, args.out_dir, step=args.checkpoint_step, peft_out=args.peft_out,
                            require_lora=bool(args.merge_lora))
            print(f"wrote {args.out_dir}/{{checkpoint,{MODEL_GIN}}} from the run {args.from_run}"
                  + (f"; the peft adapter to {args.peft_out}" if args.peft_out else ""))
        if args.to_hf:
            family = family_of_itjax_dir(args.out_dir)
            family.itjax_to_hf(args.out_dir, args.hf_dir, int(args.max_shard_size_mb * 1024**2), args.hf_dtype)
            print(f"wrote {args.hf_dir} (config.json, safetensors, tokenizer files if present)")
        elif args.peft_adapter:
            lora = peft_import.import_peft_lora(args.peft_adapter, args.hf_dir, args.out_dir,
                                                family_of_hf_dir(args.hf_dir))
            print(f"wrote {args.out_dir}/{{checkpoint,{MODEL_GIN}}} and the adapter "
                  f"{args.out_dir}/{{{peft_import.ADAPTER_DIR},{peft_import.ADAPTER_GIN}}} ({lora!r})")
        elif not (args.from_run or args.t5x_checkpoint):
            family = family_of_hf_dir(args.hf_dir)
            family.hf_to_itjax(args.hf_dir, args.out_dir)
            print(f"wrote {args.out_dir}/{{checkpoint,{MODEL_GIN}}} (and tokenizer files if present)")
    except (ConversionError, ConfigError, PeftConfigError, CheckpointMismatchError, FileNotFoundError) as e:
        raise SystemExit(f"itjax.convert: {e}") from None


if __name__ == "__main__":
    main()
