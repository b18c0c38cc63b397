"""Start-up of the command-line entry points (`python -m itjax.train|eval|data|infer|convert`): a quiet start.

An entry point calls `start(verbose)` first in its `main()`, before anything imports TensorFlow (seqio does). Then:

* TensorFlow is imported with its C++ start-up lines filtered out (absl's "All log messages before
  absl::InitializeLog()", the oneDNN notice, "Could not find cuda drivers", "failed call to cuInit", cuDNN / cuFFT /
  cuBLAS factory registrations, CPU-instruction notices); any other line it prints is passed on. TensorFlow only
  feeds the input pipeline here, so it is also kept off the GPUs (as T5X does): it takes no accelerator memory from
  JAX. `TF_CPP_MIN_LOG_LEVEL` defaults to 1 (TensorFlow's later INFO lines hidden, its warnings and errors shown).
* Python logging: one stderr handler, WARNING and above (real warnings show, in one format); absl (seqio's per-task
  cache notices) only ERROR; jax's "An NVIDIA GPU may be present ... Falling back to cpu" is dropped.

`--verbose` (every entry point) or the environment variable ITJAX_VERBOSE=1 keeps all of it: nothing filtered, INFO
logs of itjax and the libraries shown (TensorFlow still stays off the GPUs). Importing this module changes nothing;
only `start` / `setup_logging` do.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import Callable, Iterator

from itjax import host_memory

VERBOSE_ENV = "ITJAX_VERBOSE"

# Start-up lines of TensorFlow's C++ runtime (and XLA's CUDA plugins) that say nothing about the run: matched on the
# message, or on the source file of an absl-format line (`I0000 00:00:1796588628.207573    6307 port.cc:153] ...`).
_NOISE_MESSAGES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|oneDNN custom operations are on"
    r"|Could not find cuda drivers on your machine"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags"
    r"|failed call to cuInit"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|Attempting to register factory for plugin cu(DNN|FFT|BLAS)"
    r"|computation placer already registered"
    r"|TF-TRT Warning: Could not find TensorRT"
    r"|An NVIDIA GPU may be present on this machine")
_ABSL_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ (?P<file>[\w.]+)\.cc:\d+\]")
_NOISE_SOURCES = {"port", "cudart_stub", "cpu_feature_guard", "cuda_platform", "cuda_executor", "cuda_diagnostics",
                  "cuda_dnn", "cuda_fft", "cuda_blas", "computation_placer"}


def is_noise(line: str) -> bool:
    """Whether a stderr line is one of the known start-up notices (see the module docstring)."""
    match = _ABSL_LINE.match(line)
    return bool(_NOISE_MESSAGES.search(line)) or (match is not None and match.group("file") in _NOISE_SOURCES)


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """Adds `--verbose` to an entry point's parser."""
    parser.add_argument("--verbose", action="store_true",
                        help=f"show library start-up lines and INFO logs (also: {VERBOSE_ENV}=1)")


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """Adds the multi-process flags (`--coordinator_address`, `--num_processes`, `--process_id`, `--multiprocess`,
    `--heartbeat_timeout_s`) that `initialize_distributed` reads."""
    parser.add_argument("--coordinator_address", default=None,
                        help="multi-process runs: host:port of process 0 (jax.distributed); on TPU pods and SLURM "
                             "clusters jax finds it itself, pass --multiprocess instead")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--multiprocess", action="store_true", help="call jax.distributed.initialize() with "
                        "the cluster's auto-detected settings")
    parser.add_argument("--heartbeat_timeout_s", type=int, default=100,
                        help="multi-process runs: a process whose heartbeats stop this long (dead, or stopped) "
                             "makes every process exit with an error (jax.distributed's coordination service)")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins a multi-process run (one process per host) when the flags of `add_distributed_flags` ask for one. CPU
    processes talk over gloo collectives."""
    if args.coordinator_address is None and not args.multiprocess:
        return
    import jax

    # Only used by the CPU backend; must be set before the backend starts (so before any jax.devices() call).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                               process_id=args.process_id, heartbeat_timeout_seconds=args.heartbeat_timeout_s)


def verbose_requested(flag: bool = False) -> bool:
    """`--verbose` was given, or ITJAX_VERBOSE is set to something other than '' / '0'."""
    return flag or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def start(verbose: bool = False, uses_tensorflow: bool = True) -> None:
    """What an entry point does before its real work: keep freed host memory for reuse (`itjax.host_memory`:
    XLA:CPU steps otherwise page-fault their temporaries back in every step), quiet TensorFlow start-up (unless
    verbose; skipped by entry points that never import TensorFlow, `uses_tensorflow=False`), then logging."""
    host_memory.retain_freed_memory()
    verbose = verbose_requested(verbose)
    if uses_tensorflow:
        if not verbose:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # read when TensorFlow loads: its later INFO lines
        import_tensorflow(quiet=not verbose)
    setup_logging(verbose)


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[str], bool] = is_noise) -> Iterator[None]:
    """Captures everything written to file descriptor 2 (C++ libraries included) inside the block, then writes
    back the lines `drop` does not match."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 (a detached process): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines() if not drop(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


def import_tensorflow(quiet: bool = True) -> None:
    """Imports TensorFlow (if installed and not yet imported), without its start-up lines when `quiet`, and hides
    the GPUs from it (it only runs the input pipeline). Initialising its devices here is also what prints CUDA's
    lines, inside the filter."""
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    with filtered_stderr() if quiet else contextlib.nullcontext():
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # devices already initialised by someone else: leave them
            pass


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE_MESSAGES.search(str(record.msg))


_DROP_MESSAGES = _DropMessages()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (tests and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        del value


def setup_logging(verbose: bool = False) -> None:
    """Python logging for a command-line run: one stderr handler in one format, WARNING and above unless verbose
    (INFO). Replaces the plain stderr handler absl puts on the root logger when something logs through it before
    flags are parsed (seqio does, at import); other handlers (a test runner's, a notebook's) stay."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler) or (type(handler) is logging.StreamHandler
                                                    and handler.stream in (sys.stderr, sys.__stderr__)):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    xla_bridge = logging.getLogger("jax._src.xla_bridge")
    if verbose:
        xla_bridge.removeFilter(_DROP_MESSAGES)
        for name in ("orbax", "jax", "tensorflow", "seqio", "absl"):
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    for noisy in ("orbax", "jax", "tensorflow", "seqio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # seqio warns through absl about every uncached in-memory task; only errors matter on the console.
    logging.getLogger("absl").setLevel(logging.ERROR)
    xla_bridge.addFilter(_DROP_MESSAGES)
