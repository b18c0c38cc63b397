r"""Generate or score with a trained model: `python -m itjax.infer --gin_file=... --input_file=... --output_file=...`.

The gin files are the run's (e.g. the training command's, or MODEL_DIR/config.gin); the weights come from the latest
checkpoint in MODEL_DIR (or --checkpoint_step) and the vocabulary from the MIXTURE_OR_TASK_NAME task.

Works for encoder-decoder (T5) and decoder-only (Llama-family) models alike.

Input: JSON lines with text (`inputs`, and `targets` for scoring) or token ids (`input_ids`, `target_ids`). Text
is tokenized with the task's vocabulary and features (EOS appended where the task appends it); ids are used as
given. A decoder-only model's prompt is [bos_id] + input ids, continued from there.
Output: the same objects plus `prediction` / `prediction_ids` (--mode=generate) or `log_likelihood` (nats,
summed over target tokens incl. EOS; --mode=score, the building block of rank classification).

    python -m itjax.infer --gin_file=quickstart.gin --input_file=in.jsonl --output_file=out.jsonl \
        --mode=generate --decode=beam --num_beams=4 --alpha=0.6
    python -m itjax.infer --gin_file=quickstart_decoder.gin --input_file=in.jsonl --output_file=scores.jsonl \
        --mode=score
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import gin
import jax

from itjax import config as config_lib
from itjax import inference
from itjax.checkpoints import CheckpointMismatchError
from itjax.data import pipeline
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (registers the gin configurables)


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
    parser.add_argument("--gin_file", action="append", default=[], required=True)
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
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--checkpoint_step", type=int, default=None, help="default: the latest")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(rest)
    return args, list(args.gin_bindings) + bindings


def main(argv: list[str] | None = None) -> int:
    args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config_lib.parse_gin(args.gin_file, bindings, [p for p in args.gin_search_paths.split(",") if p],
                             config_lib.REQUIRED_TRAIN_MACROS)
        model_dir = gin.query_parameter("MODEL_DIR/macro.value")
        lengths = gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value")
        if "inputs" not in lengths:
            raise config_lib.ConfigError(
                f"TASK_FEATURE_LENGTHS={lengths} has no 'inputs' length for the prompts; add one, e.g. "
                "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 256, 'targets': 128}\".")
        task = pipeline.get_mixture_or_task(gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value"))
        vocabulary = task.output_features["targets"].vocabulary
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
        partitioner = Partitioner()
        peft = gin.get_bindings("train").get("peft")  # a PEFT run: adapter checkpoints on a frozen base
        trainer = Trainer(model, optimizer, partitioner, peft=peft)
        params = inference.restore_params(trainer, model_dir, args.checkpoint_step)
        examples = read_examples(args.input_file)
        batch_size = -(-args.batch_size // partitioner.batch_divisor) * partitioner.batch_divisor
        # Text is tokenized as the task's features do it (EOS after the inputs only if the task adds one).
        add_eos = {name: task.output_features[name].add_eos if name in task.output_features else False
                   for name in ("inputs", "targets")}
        if args.mode == "generate":
            run = functools.partial(
                inference.generate_examples, max_decode_length=args.max_decode_length or lengths["targets"],
                target_length=lengths["targets"], decode=args.decode, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams, alpha=args.alpha, seed=args.seed,
                inputs_add_eos=add_eos["inputs"])
        else:
            run = functools.partial(inference.score_examples, target_length=lengths["targets"],
                                    inputs_add_eos=add_eos["inputs"], targets_add_eos=add_eos["targets"])
        results = run(trainer, params, examples, vocabulary, input_length=lengths["inputs"], batch_size=batch_size)
    except (config_lib.ConfigError, CheckpointMismatchError, FileNotFoundError) as e:
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
