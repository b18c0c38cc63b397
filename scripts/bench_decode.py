"""Benchmark: greedy generation with the KV cache, itjax alone, in new tokens per second.

Times `Trainer.generate` (the compiled decode path `itjax.infer` and evaluation use) on random prompts with random
weights; EOS is disabled (eos_id -1), so every call generates --new_tokens tokens per row. Works for both model
families: a T5 model file encodes --inputs tokens, a Llama one continues a --inputs-token prompt.

    python scripts/bench_decode.py                                   # T5 v1.1-small, batch 8, 512 -> 128
    python scripts/bench_decode.py --batch 32
    python scripts/bench_decode.py --model_gin models/llama_quickstart.gin --inputs 256 --new_tokens 128
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


def main() -> None:
    host_memory.retain_freed_memory()  # as the CLIs do: no per-step page faults (itjax/host_memory.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_gin", default="models/t5_1_1_small.gin")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=512, help="encoder input / prompt tokens per row")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config_lib.parse_gin([args.model_gin], [])
    model = gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()
    trainer = Trainer(model, optimizers.adamw(1e-3), Partitioner(devices=jax.devices()[:1]))
    params = trainer.init_state()["params"]
    rng = np.random.default_rng(0)
    prompts = rng.integers(2, model.config.vocab_size, (args.batch, args.inputs)).tolist()
    rows = model.inference_batch(prompts, None, {"inputs": args.inputs, "targets": args.new_tokens}, args.batch)
    batch = {k: jax.device_put(v) for k, v in rows.items()}

    def run():
        return jax.block_until_ready(trainer.generate(params, batch, max_decode_length=args.new_tokens, eos_id=-1))

    start = time.perf_counter()
    tokens = run()
    compile_seconds = time.perf_counter() - start
    if tokens.shape != (args.batch, args.new_tokens):
        raise RuntimeError(f"generated {tokens.shape}, expected {(args.batch, args.new_tokens)}")
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = float(np.median(times))
    new = args.batch * args.new_tokens
    print(f"model {args.model_gin}: {trainer.num_params:,} parameters, {model.config.dtype}")
    print(f"batch {args.batch}, {args.inputs} input tokens -> {args.new_tokens} new (greedy, KV cache, EOS off)")
    print(f"first call (compile + run): {compile_seconds:.1f} s")
    print(f"call time: median {seconds * 1000:.0f} ms (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}) "
          f"over {args.repeats} calls; {seconds / args.new_tokens * 1000:.1f} ms per decoding step")
    # CPU seconds of this process (all its threads): less sensitive than wall time to other load on the machine.
    print(f"process CPU time per call: median {np.median(cpu_times):.2f} s")
    print(f"throughput: {new / seconds:,.1f} new tokens/s")


if __name__ == "__main__":
    main()
