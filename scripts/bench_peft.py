"""Benchmark: full fine-tuning vs each PEFT method on one model size: trainable parameters, optimizer-state bytes,
frozen-weight bytes per parameter, peak host memory and step time.

`nf4` / `int8` are LoRA (q, v) on a quantized frozen base (QLoRA, `LoRA.base_quantization`): "base B/param" is the
bytes of the frozen weights' device buffers per frozen parameter (embeddings and lm_head stay float32), "quantized
B/param" the same over the quantized Dense kernels only (NF4 double-quantized ~0.52, int8 ~1, float32 4).

Each configuration runs in a fresh subprocess (peak RSS, `resource.getrusage(...).ru_maxrss`, is per process and
includes the JAX runtime and compilation). Random tokens, no input pipeline; fp32, one CPU device, AdamW (the usual
LoRA optimizer: two moments per trainable weight). Prints a markdown table.

    python scripts/bench_peft.py                                 # T5 v1.1-small, batch 8 x (128 + 32)
    python scripts/bench_peft.py --batch 8 --inputs 512 --targets 128 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = {
    "full": None,
    "lora": "LoRA(rank=8, alpha=16.0)",
    "lora_all": "LoRA(rank=8, alpha=16.0, target_modules=('q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wo'))",
    "prompt_tuning": "PromptTuning(length=20, init='vocab')",
    "prefix_tuning": "PrefixTuning(length=20)",
    "ia3": "IA3()",
    "nf4": "LoRA(rank=8, alpha=16.0, base_quantization='nf4')",
    "int8": "LoRA(rank=8, alpha=16.0, base_quantization='int8')",
}


def run_one(args) -> dict:
    """Builds and times one configuration in this process; returns its figures."""
    import gin
    import jax
    import numpy as np

    from itjax import config as config_lib
    from itjax import optimizers
    from itjax import peft
    from itjax.partitioning import Partitioner
    from itjax.peft import quantization
    from itjax.trainer import Trainer
    import itjax.training  # noqa: F401  (registers gin configurables)
    from bench_train_step import random_t5_batch  # this script's folder is on sys.path

    config_lib.parse_gin([args.model_gin], [])
    model = gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()
    method = None if METHODS[args.method] is None else eval(METHODS[args.method], vars(peft))  # noqa: S307
    trainer = Trainer(model, optimizers.adamw(1e-3), Partitioner(devices=jax.devices()[:1]), peft=method)
    batch = random_t5_batch(model.config.vocab_size, args.batch, args.inputs, args.targets)
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, batch)  # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    if method is None:
        base_bytes, base_count = quantization.device_bytes(state["params"]), trainer.num_params
        kernel_bytes, kernel_count = 0, 0
    else:
        base_bytes = quantization.device_bytes(trainer.base_params)
        base_count = trainer.num_params - trainer.num_trainable_params
        kernel_bytes, kernel_count = quantization.quantized_kernel_bytes(trainer.base_params,
                                                                         trainer.abstract_plain_base_params)
    return {
        "method": args.method,
        "base_bytes_per_param": base_bytes / base_count,
        "quantized_bytes_per_param": kernel_bytes / kernel_count if kernel_count else None,
        "total_params": trainer.num_params,
        "trainable_params": trainer.num_trainable_params,
        "optimizer_state_bytes": trainer.optimizer_state_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_seconds": float(np.median(times)),
        "loss": float(metrics["loss"]),
    }


def table(rows: list[dict], tokens_per_step: int) -> str:
    full = next((r for r in rows if r["method"] == "full"), rows[0])
    lines = ["| method | trainable params | % of model | optimizer state | base B/param | quantized B/param | "
             "peak host memory | step time | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        quantized = "-" if r["quantized_bytes_per_param"] is None else f"{r['quantized_bytes_per_param']:.3f}"
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.3f} | "
            f"{r['optimizer_state_bytes'] / 2**20:,.1f} MiB | {r['base_bytes_per_param']:.3f} | {quantized} | "
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB "
            f"({r['peak_rss_bytes'] / full['peak_rss_bytes']:.2f}x) | {r['step_seconds'] * 1000:.0f} ms | "
            f"{tokens_per_step / r['step_seconds']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_gin", default="models/t5_1_1_small.gin")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)  # child process: one configuration
    args = parser.parse_args()
    if args.method is not None:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    rows = []
    for method in args.methods.split(","):
        command = [sys.executable, os.path.abspath(__file__), f"--method={method}", f"--model_gin={args.model_gin}",
                   f"--batch={args.batch}", f"--inputs={args.inputs}", f"--targets={args.targets}",
                   f"--steps={args.steps}"]
        env = dict(os.environ, XLA_FLAGS="")  # one CPU device
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        results = [line[len("RESULT "):] for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not results:
            raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(results[0]))
        print(f"{method}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"{args.model_gin}, batch {args.batch} x ({args.inputs} inputs + {args.targets} targets), fp32, AdamW, "
          f"1 CPU device, median of {args.steps} steps:\n")
    print(table(rows, args.batch * (args.inputs + args.targets)))


if __name__ == "__main__":
    main()
