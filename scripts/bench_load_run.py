r"""Host memory of loading a finished run: `itjax.runs.load` (parameters only) vs the full train-state restore.

    python scripts/bench_load_run.py [--dir /tmp/bench_load_run] [--layers 12] [--hidden 1024] [--repeats 2]

Writes (once; reused when present) a run of a Llama-style model of a few hundred million parameters with its
AdamW state (two moments: 2x the parameters), randomly initialised and saved as `itjax.train` saves it
(MODEL_DIR/config.gin + `itjax.checkpoints.Checkpointer`). Then, each in a fresh subprocess on one CPU device,
loads it (a) with `itjax.runs.load` and (b) as before `itjax.runs` (the whole train state: `Checkpointer.restore`
of `trainer.abstract_state`), and prints the rise of host memory: peak RSS while loading minus RSS just before
(Linux VmHWM, reset through /proc/self/clear_refs), in bytes and as a multiple of the parameters' bytes. Both
run with the glibc setting `runs.load` makes (`runs.return_freed_host_memory`); the libraries (JAX backend,
TensorFlow / seqio task registry) are loaded before the baseline. Goal for (a): <= ~1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

GIN = "quickstart_decoder.gin"


def _bindings(model_dir: str, layers: int, hidden: int) -> list[str]:
    return [f"MODEL_DIR = '{model_dir}'", "TRAIN_STEPS = 1", "BATCH_SIZE = 8",
            "LlamaConfig.vocab_size = 32000", f"LlamaConfig.hidden_size = {hidden}",
            f"LlamaConfig.intermediate_size = {4 * hidden}", f"LlamaConfig.num_layers = {layers}",
            "LlamaConfig.num_heads = 16", "LlamaConfig.num_kv_heads = 8", f"LlamaConfig.head_dim = {hidden // 16}",
            "LlamaConfig.tie_word_embeddings = False",
            "train.optimizer = @adamw()", "adamw.learning_rate = 1e-4"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def build(model_dir: str, layers: int, hidden: int) -> None:
    """Writes the run: config.gin and checkpoint 1 (parameters + AdamW state)."""
    import gin
    import jax

    from itjax import config as config_lib
    from itjax.checkpoints import Checkpointer
    from itjax.partitioning import Partitioner
    from itjax.trainer import Trainer
    import itjax.training  # noqa: F401

    config_lib.parse_gin([GIN], _bindings(model_dir, layers, hidden))
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
    trainer = Trainer(model, optimizer, Partitioner())
    os.makedirs(model_dir)
    with open(os.path.join(model_dir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    state = trainer.init_state()
    checkpointer = Checkpointer(model_dir, period=1, use_async=False)
    checkpointer.save(1, state, {"batches_consumed": 1})
    checkpointer.close()
    print(json.dumps({"params": trainer.num_params, "param_bytes": _bytes(state["params"]),
                      "opt_state_bytes": _bytes(state["opt_state"])}))
    del jax


def _bytes(tree) -> int:
    import jax
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(model_dir: str, mode: str) -> None:
    """Loads the run (mode "runs_load" or "full_state") and prints the RSS figures as JSON."""
    import gin
    import jax

    from itjax import config as config_lib, runs
    from itjax.checkpoints import Checkpointer
    from itjax.partitioning import Partitioner
    from itjax.trainer import Trainer
    import itjax.training  # noqa: F401

    # Libraries up before the baseline (a fixed cost, not the run's): the backend, and the task registry with
    # TensorFlow / seqio that the run's vocabulary comes from.
    # Both modes under the same allocator setting (the one `runs.load` makes: freed buffers go back to the OS).
    runs.return_freed_host_memory()
    jax.devices()
    from itjax.data import pipeline
    pipeline.get_mixture_or_task("quickstart").output_features["targets"].vocabulary.encode("warm up")
    start = time.time()
    if mode == "runs_load":
        before = _rss()
        _reset_peak()
        params = runs.load(model_dir).params
    else:
        # What infer / inference / conversion did before itjax.runs: the whole train state from the run's config.
        config_lib.parse_gin([os.path.join(model_dir, "config.gin")], [])
        model = gin.query_parameter("train.model").scoped_configurable_fn()
        optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
        before = _rss()
        _reset_peak()
        trainer = Trainer(model, optimizer, Partitioner())
        checkpointer = Checkpointer(model_dir, period=0, use_async=False)
        state, _ = checkpointer.restore(checkpointer.latest_step(), trainer.abstract_state)
        checkpointer.close()
        params = state["params"]
    jax.block_until_ready(params)
    peak = _peak_rss()
    print(json.dumps({"mode": mode, "rise_bytes": peak - before, "param_bytes": _bytes(params),
                      "seconds": time.time() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/bench_load_run", help="the run's MODEL_DIR (written if absent)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per loader")
    parser.add_argument("--_build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:
        return build(args.dir, args.layers, args.hidden)
    if args._measure:
        return measure(args.dir, args._measure)

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--layers", str(args.layers),
               "--hidden", str(args.hidden)]

    def child(*flags) -> dict:
        out = subprocess.run(command + list(flags), env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    if not os.path.isdir(args.dir):
        built = child("--_build")
        print(f"wrote {args.dir}: {built['params']:,} parameters ({built['param_bytes'] / 2**30:.2f} GiB), AdamW "
              f"state {built['opt_state_bytes'] / 2**30:.2f} GiB")
    for mode, what in (("runs_load", "(a) itjax.runs.load (parameters only)"),
                       ("full_state", "(b) full train-state restore (before)")):
        for _ in range(args.repeats):  # peak RSS is noisy on a shared machine: each repeat in a fresh process
            r = child("--_measure", mode)
            print(f"{what}: host memory +{r['rise_bytes'] / 2**30:.2f} GiB = "
                  f"{r['rise_bytes'] / r['param_bytes']:.2f}x the parameters' {r['param_bytes'] / 2**30:.2f} GiB "
                  f"({r['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
