r"""Generate or score with a trained model: `python -m itjax.infer --gin_file=... --input_file=... --output_file=...`.

The gin files are the run's (e.g. the training command's, or MODEL_DIR/config.gin); the weights come from the latest
checkpoint in MODEL_DIR (or --checkpoint_step) and the vocabulary from the MIXTURE_OR_TASK_NAME task.

Input: JSON lines with text (`inputs`, and `targets` for scoring) or token ids (`input_ids`, `target_ids`).
Output: the same objects plus `prediction` / `prediction_ids` (--mode=generate) or `log_likelihood` (nats,
summed over target tokens incl. EOS; --mode=score, the building block of rank classification).

    python -m itjax.infer --gin_file=quickstart.gin --input_file=in.jsonl --output_file=out.jsonl \
        --mode=generate --decode=beam --num_beams=4 --alpha=0.6
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Iterator, Sequence

import gin
import jax
import numpy as np

from itjax import config as config_lib
from itjax import inference
from itjax.checkpoints import CheckpointMismatchError
from itjax.data import pipeline
from itjax.models import decoding
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


def _ids(example: dict, text_key: str, ids_key: str, vocabulary, length: int) -> list[int]:
    """Token ids of one field, EOS appended (for text), truncated to `length`."""
    if ids_key in example:
        return list(example[ids_key])[:length]
    return (list(vocabulary.encode(example[text_key])) + [vocabulary.eos_id])[:length]


def _batches(examples: Sequence[dict], batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    for start in range(0, len(examples), batch_size):
        yield start, list(examples[start:start + batch_size])


def _pad(rows: list[list[int]], batch_size: int, length: int) -> np.ndarray:
    out = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def generate(trainer: Trainer, params, examples: Sequence[dict], vocabulary, *, input_length: int,
             max_decode_length: int, batch_size: int, decode: str, temperature: float, top_k: int, top_p: float,
             num_beams: int, alpha: float, seed: int) -> list[dict]:
    """Adds `prediction` and `prediction_ids` to each example."""
    eos = vocabulary.eos_id

    def decode_fn(module, tokens, rng):
        if decode == "beam":
            return decoding.beam_search(module, tokens, max_decode_length=max_decode_length, num_beams=num_beams,
                                        alpha=alpha, eos_id=eos)[0]
        return decoding.sample_decode(module, tokens, max_decode_length=max_decode_length, eos_id=eos,
                                      temperature=temperature if decode == "sample" else 0.0, top_k=top_k,
                                      top_p=top_p, rng=rng)

    compiled = jax.jit(lambda p, tokens, rng: decode_fn(trainer.module(p), tokens, rng))
    results = []
    for start, chunk in _batches(examples, batch_size):
        tokens = _pad([_ids(ex, "inputs", "input_ids", vocabulary, input_length) for ex in chunk], batch_size,
                      input_length)
        with trainer.partitioner.axis_rules():
            out = np.asarray(compiled(params, tokens, jax.random.fold_in(jax.random.key(seed), start)))
        for example, row in zip(chunk, out):
            ids = row.tolist()
            ids = ids[:ids.index(eos)] if eos in ids else ids
            results.append({**example, "prediction": vocabulary.decode(ids), "prediction_ids": ids})
    return results


def score(trainer: Trainer, params, examples: Sequence[dict], vocabulary, *, input_length: int,
          target_length: int, batch_size: int) -> list[dict]:
    """Adds `log_likelihood` (nats) of the targets to each example."""
    results = []
    for _, chunk in _batches(examples, batch_size):
        if any("targets" not in ex and "target_ids" not in ex for ex in chunk):
            raise config_lib.ConfigError("--mode=score needs 'targets' (text) or 'target_ids' in every line.")
        targets = [_ids(ex, "targets", "target_ids", vocabulary, target_length) for ex in chunk]
        target_tokens = _pad(targets, batch_size, target_length)
        batch = {
            "encoder_input_tokens": _pad([_ids(ex, "inputs", "input_ids", vocabulary, input_length)
                                          for ex in chunk], batch_size, input_length),
            "decoder_target_tokens": target_tokens,
            "decoder_input_tokens": np.pad(target_tokens[:, :-1], ((0, 0), (1, 0))),
            "decoder_loss_weights": (target_tokens > 0).astype(np.int32),
        }
        batch = pipeline.to_global(batch, trainer.partitioner.batch_sharding, host_local=False)
        scores = np.asarray(trainer.score(params, batch))
        results.extend({**ex, "log_likelihood": float(s)} for ex, s in zip(chunk, scores))
    return results


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
        task = pipeline.get_mixture_or_task(gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value"))
        vocabulary = task.output_features["targets"].vocabulary
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
        partitioner = Partitioner()
        trainer = Trainer(model, optimizer, partitioner)
        params = inference.restore_params(trainer, model_dir, args.checkpoint_step)
        examples = read_examples(args.input_file)
        batch_size = -(-args.batch_size // partitioner.batch_divisor) * partitioner.batch_divisor
        if args.mode == "generate":
            run = functools.partial(
                generate, max_decode_length=args.max_decode_length or lengths["targets"], decode=args.decode,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
                alpha=args.alpha, seed=args.seed)
        else:
            run = functools.partial(score, target_length=lengths["targets"])
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
