"""Benchmark: training throughput of one jitted train step, in target+input tokens per second.

Default shapes are the ones DESIGN.md quotes for the PyTorch / T5X references on this machine: T5 v1.1-small,
batch 8 x (512 inputs + 128 targets), fp32 (HF transformers + AdamW about 760 tokens/s; T5X about 510 fp32,
630 with bf16 activations). Random tokens, no input pipeline: this measures the step.

    python scripts/bench_train_step.py                       # t5_1_1_small, AdamW, fp32
    python scripts/bench_train_step.py --dtype bfloat16 --optimizer adafactor
    python scripts/bench_train_step.py --model_gin models/t5_1_1_quickstart.gin --batch 32 --inputs 128 --targets 16
"""

from __future__ import annotations

import argparse
import time

import gin
import jax
import numpy as np

from itjax import host_memory
from itjax import config as config_lib
from itjax import optimizers
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (registers gin configurables)


def random_t5_batch(vocab: int, batch: int, inputs: int, targets: int) -> dict[str, jax.Array]:
    """A fixed random encoder-decoder batch (seed 0) of `batch` rows x (inputs + targets) tokens, on device."""
    rng = np.random.default_rng(0)
    target_tokens = rng.integers(2, vocab, (batch, targets), dtype=np.int32)
    features = {
        "encoder_input_tokens": rng.integers(2, vocab, (batch, inputs), dtype=np.int32),
        "decoder_target_tokens": target_tokens,
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), target_tokens[:, :-1]], axis=1),
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
    }
    return {k: jax.device_put(v) for k, v in features.items()}


def main() -> None:
    host_memory.retain_freed_memory()  # as the CLIs do: no per-step page faults (itjax/host_memory.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_gin", default="models/t5_1_1_small.gin")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--targets", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    config_lib.parse_gin([args.model_gin], [f"itjax.models.T5Config.dtype = '{args.dtype}'"])
    model = gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()
    tx = optimizers.adamw(1e-3) if args.optimizer == "adamw" else optimizers.adafactor(1e-3)
    trainer = Trainer(model, tx, Partitioner(devices=jax.devices()[:1]))
    batch = random_t5_batch(model.config.vocab_size, args.batch, args.inputs, args.targets)
    state = trainer.init_state()
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step = float(np.median(times))
    tokens = args.batch * (args.inputs + args.targets)
    print(f"model {args.model_gin}: {trainer.num_params:,} parameters, {args.dtype}, {args.optimizer}")
    print(f"batch {args.batch} x ({args.inputs} inputs + {args.targets} targets), {jax.device_count()} device(s)")
    print(f"first step (compile + run): {compile_seconds:.1f} s")
    print(f"step time: median {step * 1000:.0f} ms (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}) "
          f"over {args.steps} steps")
    print(f"throughput: {tokens / step:,.0f} tokens/s")


if __name__ == "__main__":
    main()
