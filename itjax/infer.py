r"""Generate or score with a trained model: `python -m itjax.infer --checkpoint_path=DIR --input_file=IN ...`.

DIR is a training run's MODEL_DIR (its latest checkpoint, or --checkpoint_step) or a folder written by
`python -m itjax.convert` (a converted HF / T5X model, or `--from_run` export). The model, the vocabulary and the
task's feature lengths come from the folder (MODEL_DIR/config.gin, or OUT/model.gin and OUT's tokenizer files);
`--gin_file` / `--gin.X=Y` override them, and no training macro is needed. Only the parameters are read (not the
optimizer state), see `itjax.runs.load`. The older form, the run's gin files plus `--gin.MODEL_DIR=DIR` instead of
--checkpoint_path, still works.

Works for encoder-decoder (T5) and decoder-only (Llama-family) models alike.

Input: JSON lines with text (`inputs`, and `targets` for scoring) or token ids (`input_ids`, `target_ids`). Text
is tokenized with the folder's vocabulary (the task's when MIXTURE_OR_TASK_NAME is bound), EOS appended where the
task's features append it (seqio's default, yes, without a task; --[no-]inputs_add_eos / --[no-]targets_add_eos
decide instead); ids are used as given. A decoder-only model's prompt is [bos_id] + input ids, continued from there.
Lengths (tokens): --input_length / --target_length, else TASK_FEATURE_LENGTHS, else the longest input (and, for
--mode=score, target) in the file; --max_decode_length defaults to the targets length (128 without one).
Output: the same objects plus `prediction` / `prediction_ids` (--mode=generate) or `log_likelihood` (nats,
summed over target tokens incl. EOS; --mode=score, the building block of rank classification).

    python -m itjax.infer --checkpoint_path=runs/quickstart --input_file=in.jsonl --output_file=out.jsonl \
        --mode=generate --decode=beam --num_beams=4 --alpha=0.6
    python -m itjax.infer --checkpoint_path=flan_t5_small --input_file=in.jsonl --output_file=scores.jsonl \
        --mode=score
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import gin
import jax

from itjax import cli
from itjax import config as config_lib
from itjax.checkpoints import CheckpointMismatchError

DEFAULT_DECODE_LENGTH = 128  # --max_decode_length without --target_length or TASK_FEATURE_LENGTHS


def read_examples(path: str) -> list[dict]:
    """Reads JSON lines; each needs `inputs` (text) or `input_ids` (token ids)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise config_lib.ConfigError(f"{path}:{number}: not valid JSON ({e.msg}).") from None
            if "inputs" not in example and "input_ids" not in example:
                raise config_lib.ConfigError(f"{path}:{number}: needs an 'inputs' (text) or 'input_ids' field.")
            examples.append(example)
    return examples


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    bindings, rest = config_lib.split_gin_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m itjax.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", default=None,
                        help="a run's MODEL_DIR or an itjax.convert folder (default: the MODEL_DIR gin binding)")
    parser.add_argument("--gin_file", action="append", default=[], help="gin file overriding the folder's")
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--gin_search_paths", default="")
    parser.add_argument("--input_file", required=True)
    parser.add_argument("--output_file", required=True)
    parser.add_argument("--mode", choices=["generate", "score"], default="generate")
    parser.add_argument("--decode", choices=["greedy", "sample", "beam"], default="greedy")
    parser.add_argument("--temperature", type=float, default=1.0, help="--decode=sample")
    parser.add_argument("--top_k", type=int, default=0, help="--decode=sample (0: off)")
    parser.add_argument("--top_p", type=float, default=1.0, help="--decode=sample (1.0: off)")
    parser.add_argument("--num_beams", type=int, default=4, help="--decode=beam")
    parser.add_argument("--alpha", type=float, default=0.6, help="--decode=beam length penalty")
    parser.add_argument("--max_decode_length", type=int, default=None, help="default: the targets length")
    parser.add_argument("--input_length", type=int, default=None,
                        help="prompt tokens (default: TASK_FEATURE_LENGTHS['inputs'], else the longest input)")
    parser.add_argument("--target_length", type=int, default=None,
                        help="target tokens (default: TASK_FEATURE_LENGTHS['targets'], else the longest target "
                             "for --mode=score, --max_decode_length for generation)")
    parser.add_argument("--inputs_add_eos", action=argparse.BooleanOptionalAction, default=None,
                        help="append EOS to text inputs (default: the task's feature, else yes)")
    parser.add_argument("--targets_add_eos", action=argparse.BooleanOptionalAction, default=None,
                        help="append EOS to text targets (default: the task's feature, else yes)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--checkpoint_step", type=int, default=None, help="default: the latest")
    parser.add_argument("--seed", type=int, default=0)
    cli.add_verbose_flag(parser)
    args = parser.parse_args(rest)
    return args, list(args.gin_bindings) + bindings


def _model_dir_from_gin(gin_files: list[str], bindings: list[str], search_paths: list[str]) -> str:
    """The MODEL_DIR the gin files / bindings set (the form before --checkpoint_path)."""
    hint = ("pass --checkpoint_path=DIR (a training run's MODEL_DIR or a folder written by "
            "`python -m itjax.convert`)")
    if not gin_files and not bindings:
        raise config_lib.ConfigError(f"no model given: {hint}.")
    gin.clear_config()
    try:
        config_lib.parse_gin(gin_files, bindings, search_paths)
        return gin.query_parameter("MODEL_DIR/macro.value")
    except ValueError:
        raise config_lib.ConfigError(f"no model given: {hint}, or set MODEL_DIR.") from None
    finally:
        gin.clear_config()


def _lengths(args: argparse.Namespace, loaded, examples: list[dict], add_eos: dict[str, bool]) -> tuple[int, int]:
    """(input_length, target_length) in tokens: flags, else TASK_FEATURE_LENGTHS (of `loaded`, an
    `itjax.runs.LoadedRun`), else the file's longest."""
    from itjax import inference

    bound = loaded.feature_lengths or {}
    if args.input_length is None and bound and "inputs" not in bound:
        raise config_lib.ConfigError(
            f"TASK_FEATURE_LENGTHS={bound} has no 'inputs' length for the prompts; add one, e.g. "
            "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 256, 'targets': 128}\", or pass --input_length.")

    def longest(text_key, ids_key):
        return max((len(inference.token_ids(ex, text_key, ids_key, loaded.vocabulary, 1 << 30, add_eos[text_key]))
                    for ex in examples if text_key in ex or ids_key in ex), default=1)

    input_length = args.input_length or bound.get("inputs") or longest("inputs", "input_ids")
    target_length = args.target_length or bound.get("targets") or (
        longest("targets", "target_ids") if args.mode == "score" else args.max_decode_length or DEFAULT_DECODE_LENGTH)
    return input_length, target_length


def main(argv: list[str] | None = None) -> int:
    args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    cli.start(args.verbose)
    # After cli.start: these import TensorFlow (through seqio); itjax.training registers the run's configurables.
    from itjax import inference, runs
    import itjax.training  # noqa: F401
    search_paths = [p for p in args.gin_search_paths.split(",") if p]
    try:
        examples = read_examples(args.input_file)
        path = args.checkpoint_path or _model_dir_from_gin(args.gin_file, bindings, search_paths)
        loaded = runs.load(path, args.checkpoint_step, gin_files=args.gin_file, bindings=bindings,
                           search_paths=search_paths)
        if loaded.vocabulary is None:
            raise config_lib.ConfigError(
                f"{path} has no vocabulary: no MIXTURE_OR_TASK_NAME is bound and it holds no tokenizer files "
                "(spiece.model, tokenizer.json ...); pass --gin.MIXTURE_OR_TASK_NAME=\"'a_task'\" or copy the "
                "model's tokenizer files into it.")
        add_eos = {"inputs": loaded.add_eos("inputs") if args.inputs_add_eos is None else args.inputs_add_eos,
                   "targets": loaded.add_eos("targets") if args.targets_add_eos is None else args.targets_add_eos}
        input_length, target_length = _lengths(args, loaded, examples, add_eos)
        divisor = loaded.trainer.partitioner.batch_divisor
        batch_size = -(-args.batch_size // divisor) * divisor
        if args.mode == "generate":
            run = functools.partial(
                inference.generate_examples, max_decode_length=args.max_decode_length or target_length,
                target_length=target_length, decode=args.decode, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, alpha=args.alpha, seed=args.seed,
                inputs_add_eos=add_eos["inputs"])
        else:
            run = functools.partial(inference.score_examples, target_length=target_length,
                                    inputs_add_eos=add_eos["inputs"], targets_add_eos=add_eos["targets"])
        results = run(loaded.trainer, loaded.params, examples, loaded.vocabulary, input_length=input_length,
                      batch_size=batch_size)
    except (config_lib.ConfigError, runs.RunLoadError, CheckpointMismatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        with open(args.output_file, "w", encoding="utf-8") as f:
            for result in results:
                f.write(json.dumps(result, ensure_ascii=False) + "\n")
    print(f"wrote {len(results)} lines to {args.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
