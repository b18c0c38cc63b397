r"""Run a study: `python -m itjax.sweep --gin_file=studies/smoke.gin --out_dir=STUDY [--dry_run] [--shard i/n]
[--slurm SCRIPT]`.

A study is a gin file binding the `study` configurable (the grid; see itjax/study.py for the gin surface and how
cells expand). Each cell is an ordinary `python -m itjax.train` run with MODEL_DIR = STUDY/<run id> (config.gin,
metrics.jsonl, predictions/ as usual), started as a subprocess, so a crash is contained and recorded (or, with
--runner inprocess, called in the sweep's own process); its output goes to STUDY/<run id>/train.log. The runs share
a persistent JAX compilation cache, STUDY/jax_cache (unless JAX_COMPILATION_CACHE_DIR is set). A stage-1 (pre_stage) run is exported with `python -m itjax.convert --from_run`
to STUDY/<run id>/export once it finishes, and the runs built on it start from that export.

State: one JSON file per run, STUDY/runs/<run id>.json ({run_id, stage, cell, model_dir, depends_on, state:
planned / running / done / failed, error: the tail of the failed command's output, host, times}), written
atomically (temp file + rename), so several machines can share STUDY with no common registry. STUDY/study.json
holds the expanded plan. Rerunning the same command skips done runs and resumes the others (itjax.train resumes
from its MODEL_DIR); failed runs are retried unless --skip_failed. A failed run does not stop the sweep; a run whose
stage-1 run failed is recorded as failed, naming it. Exit status: 0 when every run of the shard is done, 1 if one
failed, 2 for a bad study.

Before any run starts, every run's gin is checked (also by --dry_run, which then prints the plan and stops): it must
parse with itjax.config as a full training config, name a registered task or mixture (SuperNI tasks through
`@superni_mixture()` of itjax.tasks.superni_gin) and an existing initial checkpoint; an error names the run and the binding, task or path.

Flags:
  --gin_file FILE          the study gin (repeatable); --gin.study.X=Y overrides a study binding.
  --out_dir STUDY          the study folder (created); share it between machines for --shard.
  --dry_run                check every run, print runs, steps and tokens per run and totals; train nothing.
  --shard i/n              run only the i-th of n disjoint slices (a stage-1 run and the runs built on it stay
                           together).
  --slurm SCRIPT           write a SLURM array script (one array index per shard; --num_shards, or n of --shard)
                           instead of running; --slurm_directive '#SBATCH ...' lines (repeatable) are added to it.
  --skip_failed            leave failed runs failed instead of retrying them.
  --runner inprocess       run every run (and export) in the sweep's own process instead of one `python -m`
                           process each: imports, SuperNI registrations and compiled programs are reused, so many
                           small runs go much faster; a run that kills the interpreter stops the sweep (rerun it
                           to resume). Default: subprocess.
  --gin_search_paths DIRS  comma-separated folders for gin files (study and runs).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Callable, Optional, Sequence

from itjax import cli
from itjax import config as config_lib
from itjax import study as study_lib
from itjax.config import ConfigError
from itjax.study import Run

STATES = ("planned", "running", "done", "failed")
ERROR_TAIL_LINES = 40


# ----------------------------------------------------------------------------------------------------------
# State files.

def state_path(study_dir: str, run_id: str) -> str:
    return os.path.join(study_dir, "runs", f"{run_id}.json")


def write_json_atomic(path: str, record: dict) -> None:
    """Writes `record` to `path` through a temp file in the same folder and a rename (never a torn file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_state(study_dir: str, run_id: str) -> Optional[dict]:
    """The run's state record, or None before the sweep has written one."""
    path = state_path(study_dir, run_id)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record(study_dir: str, run: Run, state: str, **extra) -> dict:
    """Writes the run's state file with `state` (keeping fields written earlier) and returns it."""
    assert state in STATES, state
    old = read_state(study_dir, run.run_id) or {}
    rec = {**old, "run_id": run.run_id, "stage": run.stage, "cell": run.cell, "depends_on": run.depends_on,
           "model_dir": os.path.join(os.path.abspath(study_dir), run.run_id), "state": state,
           "host": socket.gethostname(), "updated": _now(), **extra}
    if state != "failed":
        rec.pop("error", None)
    write_json_atomic(state_path(study_dir, run.run_id), rec)
    return rec


# ----------------------------------------------------------------------------------------------------------
# Checking runs before anything starts.

def _query(name: str, default=None):
    import gin

    try:
        value = gin.query_parameter(name)
    except ValueError:  # not bound
        return default
    return config_lib.evaluate(value)


@contextlib.contextmanager
def _cached_superni_registrations():
    """While checking many runs, `register_superni` with the same gin-bound arguments registers once."""
    import gin

    from itjax.tasks import superni_gin

    original, cache = superni_gin.register_superni, {}

    def cached(*args, **kwargs):
        bound = sorted((repr(k), repr(v)) for k, v in gin.config._CONFIG.items() if "register_superni" in k[1])
        key = repr((bound, args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(*args, **kwargs)
        return cache[key]

    superni_gin.register_superni = cached
    try:
        yield
    finally:
        superni_gin.register_superni = original


def check_run(run: Run, study_dir: str, search_paths: Sequence[str] = ()) -> dict:
    """Parses the run's gin as `itjax.train` would and checks its task and initial checkpoint; returns
    {task, steps, batch_size, tokens} (tokens: steps x batch x the summed feature lengths, padding included).
    Raises ConfigError naming the run and what is wrong."""
    import gin

    import itjax.training  # noqa: F401  (registers the gin configurables a run binds)
    from itjax.data import pipeline
    from itjax.data.superni import SuperNITaskError
    from itjax.tasks.superni import SuperNISplitError

    gin.clear_config()
    try:
        config_lib.parse_gin(list(run.gin_files), study_lib.resolve_bindings(run, study_dir), search_paths,
                             config_lib.REQUIRED_TRAIN_MACROS)
        task = _query("train.mixture_or_task_name")
        if not isinstance(task, str):
            raise ConfigError(f"train.mixture_or_task_name (MIXTURE_OR_TASK_NAME) is {task!r}, not a task name.")
        pipeline.get_mixture_or_task(task)
        checkpoint = _query("train.initial_checkpoint_path")
        if checkpoint and not (run.depends_on and checkpoint.endswith(os.path.join(run.depends_on, "export"))):
            from etils import epath

            if not epath.Path(checkpoint).exists():
                raise ConfigError(f"initial checkpoint {checkpoint!r} (train.initial_checkpoint_path) does not "
                                  "exist; fix the study's start axis or study.variables.")
        steps, batch = int(_query("train.train_steps")), int(_query("train.batch_size"))
        lengths = dict(_query("train.task_feature_lengths"))
    except Exception as e:  # noqa: BLE001  (any failure is this run's: name it, e.g. a required argument unbound)
        message = "\n".join(line for line in str(e).splitlines() if "In call to configurable" not in line)
        message = message.replace("(from --gin.* or --gin_bindings)", "(from the study's bindings)")
        if not isinstance(e, (ConfigError, SuperNISplitError, SuperNITaskError)):
            message = f"{type(e).__name__}: {message}"
        raise ConfigError(f"run {run.run_id}: {message}") from e
    finally:
        gin.clear_config()
    return {"task": task, "steps": steps, "batch_size": batch, "tokens": steps * batch * sum(lengths.values())}


def check_runs(runs: Sequence[Run], study_dir: str, search_paths: Sequence[str] = ()) -> dict[str, dict]:
    """check_run for every run; raises one ConfigError listing the first errors (at most 10)."""
    figures, errors = {}, []
    with _cached_superni_registrations():
        for run in runs:
            try:
                figures[run.run_id] = check_run(run, study_dir, search_paths)
            except ConfigError as e:
                errors.append(str(e))
    if errors:
        shown = "\n".join(f"  - {e}" for e in errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise ConfigError(f"{len(errors)} of {len(runs)} runs are invalid; nothing was started:\n{shown}{more}")
    return figures


def format_plan(runs: Sequence[Run], figures: dict[str, dict], study_dir: str) -> str:
    """The --dry_run summary: runs per stage, steps and tokens per run, totals, and the states already recorded."""
    lines = [f"{len(runs)} runs ({sum(r.stage == study_lib.STAGE1 for r in runs)} stage-1) in {study_dir}:"]
    for run in runs:
        f = figures[run.run_id]
        state = (read_state(study_dir, run.run_id) or {}).get("state", "planned")
        lines.append(f"  {state:8s} {run.run_id}  task {f['task']}  {f['steps']:,} steps  {f['tokens']:,} tokens")
    total_steps = sum(f["steps"] for f in figures.values())
    total_tokens = sum(f["tokens"] for f in figures.values())
    lines.append(f"total: {total_steps:,} steps, {total_tokens:,} tokens (batch x feature lengths, padding "
                 "included)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running.

Runner = Callable[[list, str], int]


def subprocess_runner(command: list, log_path: str) -> int:
    """Runs `command`, appending its stdout and stderr to `log_path`; returns its exit status."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n# {_now()} {shlex.join(command)}\n")
        log.flush()
        return subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def inprocess_runner(command: list, log_path: str) -> int:
    """Runs `python -m itjax.train|itjax.convert ARGS` as a call of that module's `main(ARGS)` in this process,
    with stdout / stderr (Python-level) appended to `log_path`; returns its exit status (1 for an exception, whose
    traceback goes to the log). Runs of one study share shapes, so later runs reuse the process's imports, the
    SuperNI registrations' parsed files and JAX's compilation caches instead of paying for them again; the price is
    isolation: a run that crashes the interpreter (or leaks memory) takes the sweep with it."""
    import importlib
    import traceback

    import gin

    if "-m" not in command or command[command.index("-m") + 1] not in INPROCESS_MODULES:
        raise ValueError(f"inprocess_runner runs only `python -m {' / '.join(INPROCESS_MODULES)}`, not {command}")
    module = command[command.index("-m") + 1]
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        log.write(f"\n# {_now()} (in-process) {shlex.join(command)}\n")
        log.flush()
        gin.clear_config()
        try:
            status = importlib.import_module(module).main(command[command.index("-m") + 2:])
        except SystemExit as e:  # argparse errors; itjax.convert's SystemExit(message)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=log)
            status = e.code if isinstance(e.code, int) or e.code is None else 1
        except Exception:  # noqa: BLE001  (the run's failure, recorded from its log like a subprocess's)
            traceback.print_exc(file=log)
            status = 1
        finally:
            gin.clear_config()
            log.flush()
    return int(status or 0)


INPROCESS_MODULES = ("itjax.train", "itjax.convert")
RUNNERS = {"subprocess": subprocess_runner, "inprocess": inprocess_runner}


def _tail(path: str, lines: int = ERROR_TAIL_LINES) -> str:
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def train_command(run: Run, study_dir: str, search_paths: Sequence[str]) -> list:
    command = [sys.executable, "-m", "itjax.train", "--no_progress"]
    command += [f"--gin_file={f}" for f in run.gin_files]
    command += [f"--gin_bindings={b}" for b in study_lib.resolve_bindings(run, study_dir)]
    if search_paths:
        command.append(f"--gin_search_paths={','.join(search_paths)}")
    return command


def export_command(run: Run, study_dir: str) -> list:
    """Exports a stage-1 run into STUDY/<run id>/export.partial (renamed to export when complete)."""
    model_dir = os.path.join(os.path.abspath(study_dir), run.run_id)
    return [sys.executable, "-m", "itjax.convert", "--from_run", model_dir, "--out_dir",
            os.path.join(model_dir, "export.partial")]


def execute(run: Run, study_dir: str, search_paths: Sequence[str] = (), runner: Runner = subprocess_runner,
            skip_failed: bool = False) -> str:
    """Brings one run to done (or failed) and returns its final state; never raises for a failing run."""
    old = read_state(study_dir, run.run_id)
    if old and (old["state"] == "done" or (skip_failed and old["state"] == "failed")):
        return old["state"]
    if run.depends_on:
        dep = read_state(study_dir, run.depends_on)
        if not dep or dep["state"] != "done":
            dep_state = dep["state"] if dep else "planned"
            record(study_dir, run, "failed", error=f"its stage-1 run {run.depends_on} is {dep_state}, not done"
                   + (f": {dep.get('error', '').strip().splitlines()[-1:]}" if dep and dep.get("error") else ""))
            return "failed"
    log_path = os.path.join(os.path.abspath(study_dir), run.run_id, "train.log")
    record(study_dir, run, "running", started=_now(), log=log_path)
    commands = [train_command(run, study_dir, search_paths)]
    export = os.path.join(os.path.abspath(study_dir), run.run_id, "export")
    if run.stage == study_lib.STAGE1 and not os.path.isdir(export):
        commands.append(export_command(run, study_dir))
        if os.path.isdir(export + ".partial"):  # an export of ours that stopped half-way
            shutil.rmtree(export + ".partial")
    for command in commands:
        try:
            status = runner(command, log_path)
        except Exception as e:  # noqa: BLE001  (a run that cannot start is recorded, the sweep goes on)
            status, message = -1, f"{type(e).__name__}: {e}"
        else:
            message = f"`{' '.join(command[1:4])} ...` exited with status {status}"
        if status != 0:
            record(study_dir, run, "failed", finished=_now(),
                   error=f"{message}; last lines of {log_path}:\n{_tail(log_path)}")
            return "failed"
    if len(commands) > 1:
        if not os.path.isdir(export + ".partial"):
            record(study_dir, run, "failed", finished=_now(), error=f"the export wrote nothing to {export}.partial")
            return "failed"
        os.replace(export + ".partial", export)
    record(study_dir, run, "done", finished=_now())
    return "done"


def share_compilation_cache(study_dir: str) -> None:
    """Runs of a study share shapes: one persistent JAX compilation cache, STUDY/jax_cache (unless
    JAX_COMPILATION_CACHE_DIR is set), lets later runs load a program instead of compiling it, every program (the
    small decode and init programs too: no minimum compile time unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS
    is set). Set in the environment for subprocess runs and in jax.config for in-process ones."""
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(study_dir), "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if "jax" in sys.modules:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def mark_planned(study_dir: str, runs: Sequence[Run]) -> int:
    """Writes a 'planned' state file for every run that has none yet; returns how many were written."""
    new = [run for run in runs if read_state(study_dir, run.run_id) is None]
    for run in new:
        record(study_dir, run, "planned")
    return len(new)


def write_plan(study_dir: str, st: study_lib.Study, runs: Sequence[Run]) -> str:
    """STUDY/study.json: the study's name, its axes in grid order (the pre_stage axis last), its report options
    (study.report, filled in) and every run (id, stage, cell, depends_on); a different earlier plan is kept as
    study.<n>.json."""
    axes = list(st.axes) + ([st.pre_stage["axis"]] if st.pre_stage else [])
    plan = {"name": st.name, "axes": axes, "report": study_lib.report_options(st), "runs": [{"run_id": r.run_id, "stage": r.stage, "cell": r.cell,
                                       "depends_on": r.depends_on} for r in runs]}
    path = os.path.join(study_dir, "study.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) == plan:
                return path
        index = 1
        while os.path.exists(os.path.join(study_dir, f"study.{index}.json")):
            index += 1
        os.replace(path, os.path.join(study_dir, f"study.{index}.json"))
    write_json_atomic(path, plan)
    return path


def slurm_script(args: argparse.Namespace, num_shards: int, study_name: str, num_runs: int,
                 directives: Sequence[str] = ()) -> str:
    """A SLURM array script: array index i runs `itjax.sweep ... --shard i/num_shards` on the shared study folder."""
    out_dir = os.path.abspath(args.out_dir)
    command = [sys.executable, "-m", "itjax.sweep", *(f"--gin_file={os.path.abspath(f) if os.path.isfile(f) else f}"
                                                        for f in args.gin_file),
               f"--out_dir={out_dir}", *(f"--gin_bindings={b}" for b in args.study_bindings)]
    if args.gin_search_paths:
        command.append(f"--gin_search_paths={','.join(os.path.abspath(p) for p in args.gin_search_paths.split(','))}")
    if args.skip_failed:
        command.append("--skip_failed")
    lines = ["#!/bin/bash",
             f"# itjax study {study_name!r}: {num_runs} runs in {num_shards} shards (written by python -m itjax.sweep).",
             "# Submit with: sbatch THIS_SCRIPT. Resubmitting resumes: finished runs are skipped.",
             f"#SBATCH --job-name=itjax-{study_name}",
             f"#SBATCH --array=0-{num_shards - 1}",
             f"#SBATCH --output={os.path.join(out_dir, 'slurm', '%A_%a.log')}",
             *directives,
             "set -euo pipefail",
             f"mkdir -p {shlex.quote(os.path.join(out_dir, 'slurm'))}",
             f"cd {shlex.quote(os.getcwd())}",
             f"srun {shlex.join(command)} --shard \"${{SLURM_ARRAY_TASK_ID}}/{num_shards}\"", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line.

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    bindings, rest = config_lib.split_gin_overrides(argv)
    parser = argparse.ArgumentParser(prog="python -m itjax.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="the study gin file (repeatable)")
    parser.add_argument("--gin_bindings", action="append", default=[], help="a study binding (repeatable)")
    parser.add_argument("--gin_search_paths", default="", help="comma-separated folders for gin files")
    parser.add_argument("--out_dir", required=True, help="the study folder")
    parser.add_argument("--dry_run", action="store_true", help="check every run and print the plan; train nothing")
    parser.add_argument("--shard", default="0/1", help="i/n: run the i-th of n disjoint slices")
    parser.add_argument("--slurm", metavar="SCRIPT", help="write a SLURM array script instead of running")
    parser.add_argument("--num_shards", type=int, default=None, help="--slurm: array size (default: n of --shard)")
    parser.add_argument("--slurm_directive", action="append", default=[], help="--slurm: an extra '#SBATCH ...' "
                        "line (repeatable), e.g. '#SBATCH --gres=gpu:1'")
    parser.add_argument("--skip_failed", action="store_true", help="do not retry runs recorded as failed")
    parser.add_argument("--runner", choices=sorted(RUNNERS), default="subprocess",
                        help="subprocess: each run (and export) in its own `python -m` process (isolated); "
                        "inprocess: all in this process, reusing imports, registrations and compiled programs "
                        "(faster for many small runs, e.g. the smoke study)")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(rest)
    if not args.gin_file:
        parser.error("give the study with --gin_file (e.g. --gin_file=studies/smoke.gin)")
    args.study_bindings = list(args.gin_bindings) + bindings
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cli.start(args.verbose)
    search_paths = [os.path.abspath(p) for p in args.gin_search_paths.split(",") if p]
    try:
        st = study_lib.load_study(args.gin_file, args.study_bindings, search_paths)
        runs = study_lib.expand(st)
        index, count = study_lib.parse_shard(args.shard)
        if args.slurm:
            num_shards = args.num_shards or count
            if num_shards < 1:
                raise ConfigError("--num_shards must be >= 1.")
            bad = [d for d in args.slurm_directive if not d.startswith("#SBATCH ")]
            if bad:
                raise ConfigError(f"--slurm_directive {bad[0]!r}: each must start with '#SBATCH '.")
            check_runs(runs, args.out_dir, search_paths)
            if os.path.exists(args.slurm):
                raise ConfigError(f"--slurm {args.slurm}: the file exists; it is not overwritten. Remove it or pick "
                                  "another name.")
            os.makedirs(os.path.join(args.out_dir, "slurm"), exist_ok=True)  # SLURM opens --output before the script
            with open(args.slurm, "w", encoding="utf-8") as f:
                f.write(slurm_script(args, num_shards, st.name, len(runs), args.slurm_directive))
            os.chmod(args.slurm, 0o755)
            print(f"Wrote {args.slurm}: {len(runs)} runs in {num_shards} shards; submit with `sbatch {args.slurm}`.")
            return 0
        mine = study_lib.shard(runs, index, count)
        figures = check_runs(mine, args.out_dir, search_paths)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(format_plan(mine, figures, args.out_dir))
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    share_compilation_cache(args.out_dir)
    write_plan(args.out_dir, st, runs)
    mark_planned(args.out_dir, mine)
    states = {}
    for i, run in enumerate(mine):
        print(f"[{i + 1}/{len(mine)}] {run.run_id} ...", flush=True)
        states[run.run_id] = execute(run, args.out_dir, search_paths, runner=RUNNERS[args.runner],
                                     skip_failed=args.skip_failed)
        print(f"[{i + 1}/{len(mine)}] {run.run_id}: {states[run.run_id]}", flush=True)
    failed = [r for r, s in states.items() if s == "failed"]
    print(f"{len(states) - len(failed)} of {len(states)} runs done"
          + (f"; failed (see {os.path.join(args.out_dir, 'runs')}): {', '.join(failed)}" if failed else "."))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
