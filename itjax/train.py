r"""Train a model: `python -m itjax.train --gin_file=quickstart.gin [--gin.NAME=VALUE ...]`.

The run is the gin files plus overrides. Required macros: MODEL_DIR, MIXTURE_OR_TASK_NAME,
TASK_FEATURE_LENGTHS, TRAIN_STEPS, BATCH_SIZE. Rerunning with the same MODEL_DIR resumes from its latest
checkpoint; a larger TRAIN_STEPS continues training. The loop itself is `itjax.training.train`; this module is
only the command line (it registers no gin configurables, so running it as __main__ cannot register them twice,
and imports the run, hence TensorFlow, only after `itjax.cli.start`).

A dry run needs only a model and the shapes: BATCH_SIZE and TASK_FEATURE_LENGTHS. MODEL_DIR,
MIXTURE_OR_TASK_NAME, TRAIN_STEPS and INITIAL_CHECKPOINT_PATH may stay unset (without a task, the task's
feature lengths and vocabulary are not checked), and a model file alone gets the loop of runs/train.gin:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m itjax.train --gin_file=flan_t5_xl.gin --dry_run \
      --gin.BATCH_SIZE=8
  python -m itjax.train --gin_file=models/t5_1_1_base.gin --dry_run --gin.BATCH_SIZE=8 \
      --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 128}"

Flags:
  --gin_file FILE           repeatable; names resolve against cwd, --gin_search_paths and the project's gin/.
  --gin.NAME=VALUE          overrides one binding, e.g. --gin.TRAIN_STEPS=2000 --gin.MODEL_DIR="'/tmp/run'".
  --gin_bindings 'A = B'    repeatable, same as --gin.A=B (T5X spelling).
  --gin_search_paths DIRS   comma-separated folders to look up gin files (and their includes) in.
  --coordinator_address / --num_processes / --process_id / --multiprocess   multi-process (multi-host) runs.
  --dry_run                 lay out and compile the train step without allocating or writing anything.
  --verbose                 keep TensorFlow's / CUDA's start-up lines and INFO logs (or ITJAX_VERBOSE=1).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from itjax import cli
from itjax import config as config_lib


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits argv into known flags and gin bindings (from --gin.X=Y and --gin_bindings)."""
    bindings, rest = config_lib.split_gin_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m itjax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="a gin binding (repeatable)")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (e.g. in log files)")
    parser.add_argument("--dry_run", action="store_true", help="build the model abstractly, lay out its shardings, "
                        "compile the train step and print parameter / memory figures; allocates and writes nothing")
    cli.add_distributed_flags(parser)
    cli.add_verbose_flag(parser)
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. --gin_file=quickstart.gin)")
    return args, list(args.gin_bindings) + bindings


initialize_distributed = cli.initialize_distributed  # moved to itjax.cli (itjax.eval uses it too)


setup_logging = cli.setup_logging  # moved to itjax.cli; the old name keeps working


def __getattr__(name: str):
    """`itjax.train.training`: the run module, imported on first use (main imports it after `cli.start`)."""
    if name == "training":
        return importlib.import_module("itjax.training")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    cli.start(args.verbose)
    from itjax import training  # after cli.start: imports TensorFlow (through seqio)
    from itjax.checkpoints import (CheckpointCorruptError, CheckpointMismatchError, CheckpointWriteError,
                                   DataPositionError)

    initialize_distributed(args)
    try:
        search_paths = [p for p in args.gin_search_paths.split(",") if p]
        if args.dry_run:  # a model and shapes suffice
            config_lib.parse_gin(args.gin_file, bindings, search_paths, config_lib.REQUIRED_DRY_RUN_MACROS,
                                 macro_defaults=config_lib.DRY_RUN_MACRO_DEFAULTS, default_run_file="runs/train.gin")
        else:
            config_lib.parse_gin(args.gin_file, bindings, search_paths, config_lib.REQUIRED_TRAIN_MACROS)
        training.train(progress=not args.no_progress, dry_run=args.dry_run)
    except (config_lib.ConfigError, CheckpointMismatchError, CheckpointCorruptError, CheckpointWriteError,
            DataPositionError, FileNotFoundError, training.TrainingDiverged) as e:
        # gin appends "In call to configurable ..." lines; the message itself already names what to fix.
        message = "\n".join(line for line in str(e).splitlines() if "In call to configurable" not in line)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
