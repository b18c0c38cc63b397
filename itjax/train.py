r"""Train a model: `python -m itjax.train --gin_file=quickstart.gin [--gin.NAME=VALUE ...]`.

The run is the gin files plus overrides. Required macros: MODEL_DIR, MIXTURE_OR_TASK_NAME,
TASK_FEATURE_LENGTHS, TRAIN_STEPS, BATCH_SIZE. Rerunning with the same MODEL_DIR resumes from its latest
checkpoint; a larger TRAIN_STEPS continues training. The loop itself is `itjax.training.train`; this module is
only the command line (it registers no gin configurables, so running it as __main__ cannot register them twice).

Flags:
  --gin_file FILE           repeatable; names resolve against cwd, --gin_search_paths and the project's gin/.
  --gin.NAME=VALUE          overrides one binding, e.g. --gin.TRAIN_STEPS=2000 --gin.MODEL_DIR="'/tmp/run'".
  --gin_bindings 'A = B'    repeatable, same as --gin.A=B (T5X spelling).
  --gin_search_paths DIRS   comma-separated folders to look up gin files (and their includes) in.
  --coordinator_address / --num_processes / --process_id / --multiprocess   multi-process (multi-host) runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

import jax

from itjax import config as config_lib
from itjax import training
from itjax.checkpoints import CheckpointMismatchError


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
    parser.add_argument("--coordinator_address", default=None,
                        help="multi-process runs: host:port of process 0 (jax.distributed); on TPU pods and SLURM "
                             "clusters jax finds it itself, pass --multiprocess instead")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--multiprocess", action="store_true", help="call jax.distributed.initialize() with "
                        "the cluster's auto-detected settings")
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("give at least one --gin_file (e.g. --gin_file=quickstart.gin)")
    return args, list(args.gin_bindings) + bindings


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process run (one process per host). CPU processes talk over gloo collectives."""
    if args.coordinator_address is None and not args.multiprocess:
        return
    # Only used by the CPU backend; must be set before the backend starts (so before any jax.devices() call).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("orbax", "jax", "tensorflow", "seqio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # seqio warns through absl about every uncached in-memory task; only errors matter on the console.
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args, bindings = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    initialize_distributed(args)
    try:
        search_paths = [p for p in args.gin_search_paths.split(",") if p]
        config_lib.parse_gin(args.gin_file, bindings, search_paths, config_lib.REQUIRED_TRAIN_MACROS)
        training.train(progress=not args.no_progress, dry_run=args.dry_run)
    except (config_lib.ConfigError, CheckpointMismatchError, FileNotFoundError, training.TrainingDiverged) as e:
        # gin appends "In call to configurable ..." lines; the message itself already names what to fix.
        message = "\n".join(line for line in str(e).splitlines() if "In call to configurable" not in line)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
