r"""Evaluate a checkpoint on a mixture: `python -m itjax.eval --checkpoint_path=DIR --gin.EVAL_MIXTURE=NAME ...`.

DIR is a training run's MODEL_DIR (its latest checkpoint, or --step) or a folder written by `python -m itjax.convert`.
The model comes from the folder (only the parameters are read, straight into their shardings: `itjax.runs.load`);
the evaluation is the one training runs (`itjax.evaluation.Evaluation`: generation + teacher-forced loss, the tasks'
own metrics), so a run's checkpoint evaluated on its own mixture gives the numbers training logged for that step.

    python -m itjax.eval --checkpoint_path=runs/quickstart --gin.EVAL_MIXTURE="'quickstart'"
    python -m itjax.eval --checkpoint_path=flan_t5_small --gin.EVAL_MIXTURE="'bbh_direct'" \
        --gin_bindings="import itjax.tasks.bbh" --gin.register_bbh.data_dir=/data/BIG-Bench-Hard \
        --gin.evaluate.task_feature_lengths="{'inputs': 2048, 'targets': 32}" --gin.evaluate.batch_size=8

Gin: the folder's gin file, then gin/runs/eval.gin, then --gin_file files, then --gin.X=Y / --gin_bindings.
EVAL_MIXTURE is required; `evaluate.split`, `.task_feature_lengths`, `.batch_size`, `.max_decode_length` and
`.num_examples` default to the run's evaluation settings (see itjax/checkpoint_eval.py). A BBH chain-of-thought
mixture needs `evaluate.max_decode_length` >= 256.

Output: metrics.jsonl (appended; lines name step, split, mixture and task), predictions/<mixture>/<task>-<step>.jsonl
and tensorboard/ in --out_dir (default DIR/eval), and the per-task table on stdout.

Flags:
  --checkpoint_path DIR     a run's MODEL_DIR or an itjax.convert folder.
  --step N                  the run's checkpoint step (default: the latest; --checkpoint_step is the same flag).
  --out_dir OUT             where metrics.jsonl and predictions/ go (default DIR/eval).
  --gin_file / --gin.NAME=VALUE / --gin_bindings / --gin_search_paths   as in itjax.train.
  --coordinator_address / --num_processes / --process_id / --multiprocess   multi-process (multi-host) runs.
  --verbose                 keep TensorFlow's / CUDA's start-up lines and INFO logs.

`python -m itjax.eval --predictions ...` is `python -m itjax.report --predictions ...` (the SuperNI tables of a
predictions file or folder), kept as an alias.
"""

from __future__ import annotations

import argparse
import sys

from itjax import cli
from itjax import config as config_lib


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits argv into known flags and gin bindings (from --gin.X=Y and --gin_bindings)."""
    bindings, rest = config_lib.split_gin_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m itjax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True,
                        help="a training run's MODEL_DIR or a folder written by python -m itjax.convert")
    parser.add_argument("--step", "--checkpoint_step", dest="step", type=int, default=None,
                        help="the run's checkpoint step (default: the latest)")
    parser.add_argument("--out_dir", default=None, help="where metrics.jsonl and predictions/ go (default "
                        "CHECKPOINT_PATH/eval)")
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="a gin binding (repeatable)")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files")
    cli.add_distributed_flags(parser)
    cli.add_verbose_flag(parser)
    args = parser.parse_args(rest)
    return args, list(args.gin_bindings) + bindings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--predictions" or a.startswith("--predictions=") for a in argv):
        from itjax import report
        return report.main(argv, prog="python -m itjax.eval")
    args, bindings = parse_args(argv)
    cli.start(args.verbose)
    # After cli.start: these import TensorFlow (through seqio).
    from itjax import checkpoint_eval, runs
    from itjax.checkpoints import CheckpointMismatchError

    cli.initialize_distributed(args)
    try:
        checkpoint_eval.run(args.checkpoint_path, args.step, args.out_dir, args.gin_file, bindings,
                            [p for p in args.gin_search_paths.split(",") if p])
    except (config_lib.ConfigError, runs.RunLoadError, CheckpointMismatchError, FileNotFoundError) as e:
        message = "\n".join(line for line in str(e).splitlines() if "In call to configurable" not in line)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
