"""Benchmark: does the input pipeline keep up with the train step? (issue 12, item 4)

For each mixture it measures
  (a) the pipeline alone, as the trainer consumes it: `itjax.data.pipeline.train_dataset` (same feature converter,
      packing, per-host sharding and shuffle), `TrainBatches`, and `pipeline.to_global` as the training loop
      calls them, in batches/s and tokens/s (non-padding input + target tokens, as the `tokens_per_second` of
      metrics.jsonl, and token slots);
  (b) the train step fed by that pipeline vs the same compiled step fed one in-memory batch again and again, the
      two sides alternating (`--repeats` rounds of `--steps` steps each), metrics fetched every `--log_period`
      steps as the training loop does. Reported: median step time of each side, their ratio, and the time per
      step the fed loop spent waiting for its batch (next(TrainBatches) + to_global; JAX dispatches the step
      asynchronously, so the next batch is fetched while the previous step runs).
Targets (issue 12): (b) within 5% (ratio <= 1.05), (a) at least 3x the batches/s the step consumes.
Each round starts after `--settle_s` seconds idle, so the pipeline's buffers are full (as in training when the
pipeline keeps up) and its refilling after a fed round does not land in the next in-memory round: a fed round then
produces exactly its own batches. Also reported: process CPU time per step of each side and of the pipeline alone
per batch (all threads), figures the machine's load disturbs less than wall time (on a CPU-bound machine the fed
step can cost at most about its extra CPU time).

Mixtures, both at the quickstart lengths (gin/quickstart.gin: batch 32, inputs 112, targets 8, unpacked) on the
quickstart T5 (gin/models/t5_1_1_quickstart.gin) with the quickstart vocabulary:
  superni  the shared SuperNI sample (`--superni_dir`, default ../shared/data/superni), `register_superni` with the
           Tk-Instruct "def_pos_2" encoding cut to the input budget (the collator's max_source_length rule);
  flan     FLAN-style templates (`itjax.tasks.flan.register_flan_templates`: zero-shot and two-shot variants with
           FewshotDataSource exemplars) over the same SuperNI instances as records.

    python scripts/bench_input_pipeline.py                          # both mixtures, quickstart shapes
    python scripts/bench_input_pipeline.py --mixtures flan --pack   # packed rows
    python scripts/bench_input_pipeline.py --steps 5 --repeats 1 --pipeline_batches 10   # a quick look

Run it on an otherwise idle machine for figures (no XLA_FLAGS fake devices): one process, all local devices.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

import gin
import jax
import numpy as np
import tensorflow as tf

from itjax import config as config_lib
from itjax import optimizers
from itjax.data import pipeline
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (registers gin configurables)

DEFAULT_SUPERNI_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                   "superni")
FLAN_TEMPLATES = [
    ("{input}", "{output}"),
    ("Question: {input}\n\nAnswer:", "{output}"),
    ("Read this and respond.\n\n{input}", "{output}"),
]


def register_superni_mixture(data_dir: str, inputs: int) -> str:
    """The train mixture of the SuperNI sample (Tk-Instruct def_pos_2, prompts fitted to `inputs` tokens)."""
    from itjax.tasks import superni
    if not os.path.isdir(os.path.join(data_dir, "tasks")):
        raise SystemExit(f"--superni_dir={data_dir!r} has no tasks/ folder; point it at a natural-instructions "
                         "checkout or the shared sample (../shared/data/superni).")
    reg = superni.register_superni(data_dir, missing_tasks="skip", prefix="bench_superni", encoding="def_pos_2",
                                   max_source_length=inputs)
    return reg.train_mixture


def register_flan_mixture(data_dir: str) -> str:
    """FLAN-template variants (zero-shot, two-shot) over the SuperNI sample's instances as records."""
    from itjax.tasks import flan, quickstart
    records = []
    for path in sorted(glob.glob(os.path.join(data_dir, "tasks", "*.json"))):
        with open(path, encoding="utf-8") as f:
            task = json.load(f)
        records += [{"input": inst["input"], "output": inst["output"][0]} for inst in task["Instances"]]
    if not records:
        raise SystemExit(f"--superni_dir={data_dir!r}: no task files under tasks/.")
    source = flan.records_source({"train": records, "validation": records[:100]}, name="bench_flan")
    reg = flan.register_flan_templates("bench_flan", source, FLAN_TEMPLATES, vocabulary=quickstart.get_vocabulary(),
                                       variants=("zero_shot", "two_shot"))
    return reg.mixture


def text_tokens(batch) -> int:
    """Non-padding input + target tokens of a host batch (the training log's `tokens_per_second` numerator)."""
    return int(sum(np.count_nonzero(batch[k]) for k in ("encoder_input_tokens", "decoder_target_tokens")
                   if k in batch))


def token_slots(batch) -> int:
    return int(sum(batch[k].size for k in ("encoder_input_tokens", "decoder_target_tokens") if k in batch))


def make_batches(args, mixture: str, model) -> pipeline.TrainBatches:
    """This host's training stream exactly as `itjax.training.train` builds it (seed 0, from the start)."""
    ds = pipeline.train_dataset(mixture, {"inputs": args.inputs, "targets": args.targets}, args.batch,
                                model.feature_converter_cls(pack=args.pack), seed=0)
    return pipeline.TrainBatches(ds)


def time_pipeline(args, mixture: str, model, sharding) -> dict:
    """(a): batches/s and tokens/s of the pipeline and device feed alone (first batch, which builds the pipeline,
    excluded)."""
    batches = make_batches(args, mixture, model)
    start = time.perf_counter()
    jax.block_until_ready(pipeline.to_global(next(batches), sharding))
    first = time.perf_counter() - start
    tokens = slots = 0
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.pipeline_batches):
        host = next(batches)
        batch = pipeline.to_global(host, sharding)
        tokens, slots = tokens + text_tokens(host), slots + token_slots(host)
    jax.block_until_ready(batch)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"first_batch_s": first, "batches_per_s": args.pipeline_batches / seconds,
            "cpu_s_per_batch": cpu / args.pipeline_batches,
            "tokens_per_s": tokens / seconds, "slots_per_s": slots / seconds}


def run_steps(trainer, state, next_batch, steps: int, log_period: int):
    """`steps` train steps as the training loop runs them (metrics fetched every `log_period` steps).
    Returns (state, seconds per step, seconds per step the loop spent getting its batch, process CPU seconds
    per step (all threads))."""
    pending, feed = [], 0.0
    start, cpu = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        fetch = time.perf_counter()
        batch = next_batch()
        feed += time.perf_counter() - fetch
        state, metrics = trainer.train_step(state, batch)
        pending.append(metrics)
        if step % log_period == 0 or step == steps:
            jax.device_get(pending)
            pending = []
    return state, (time.perf_counter() - start) / steps, feed / steps, (time.process_time() - cpu) / steps


def time_steps(args, mixture: str, model, sharding) -> dict:
    """(b): median step time fed by the pipeline vs by one in-memory batch, alternating."""
    trainer = Trainer(model, optimizers.adafactor(1e-3), Partitioner())
    state = trainer.init_state()
    batches = make_batches(args, mixture, model)
    feed = (pipeline.to_global(host, sharding) for host in batches)
    fixed = next(feed)
    state, *_ = run_steps(trainer, state, lambda: fixed, 2, args.log_period)  # compile + warm up
    state, *_ = run_steps(trainer, state, lambda: next(feed), 2, args.log_period)
    fed, memory, feed_wait, fed_cpu, memory_cpu = [], [], [], [], []
    for _ in range(args.repeats):
        time.sleep(args.settle_s)
        state, t, wait, cpu = run_steps(trainer, state, lambda: next(feed), args.steps, args.log_period)
        fed.append(t)
        feed_wait.append(wait)
        fed_cpu.append(cpu)
        time.sleep(args.settle_s)
        state, t, _, cpu = run_steps(trainer, state, lambda: fixed, args.steps, args.log_period)
        memory.append(t)
        memory_cpu.append(cpu)
    median = statistics.median
    return {"fed_step_s": median(fed), "memory_step_s": median(memory), "feed_s": median(feed_wait),
            "fed_cpu_s": median(fed_cpu), "memory_cpu_s": median(memory_cpu), "fed_all": fed, "memory_all": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixtures", default="superni,flan", help="comma-separated: superni, flan")
    parser.add_argument("--superni_dir", default=DEFAULT_SUPERNI_DIR)
    parser.add_argument("--model_gin", default="models/t5_1_1_quickstart.gin")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=112)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--pack", action="store_true", help="pack rows (the quickstart trains unpacked)")
    parser.add_argument("--steps", type=int, default=20, help="train steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds of each side")
    parser.add_argument("--log_period", type=int, default=20, help="steps between metric fetches (train.log_period)")
    parser.add_argument("--pipeline_batches", type=int, default=100, help="batches timed for (a)")
    parser.add_argument("--settle_s", type=float, default=2.0, help="idle seconds before each timed round")
    args = parser.parse_args()
    names = [m.strip() for m in args.mixtures.split(",") if m.strip()]
    unknown = sorted(set(names) - {"superni", "flan"})
    if unknown or not names:
        raise SystemExit(f"--mixtures={args.mixtures!r}: choose from superni, flan (comma-separated).")

    tf.config.set_visible_devices([], "GPU")  # TensorFlow runs the input pipeline only: no GPU memory for it
    config_lib.parse_gin([args.model_gin], [])
    model = gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()
    sharding = Partitioner().batch_sharding
    superni_dir = os.path.normpath(args.superni_dir)
    rows = []
    for name in names:
        mixture = (register_superni_mixture(superni_dir, args.inputs) if name == "superni"
                   else register_flan_mixture(superni_dir))
        alone = time_pipeline(args, mixture, model, sharding)
        steps = time_steps(args, mixture, model, sharding)
        consumed = 1.0 / steps["fed_step_s"]
        rows.append((name, alone, steps, consumed))
        print(f"{name}: fed rounds {[f'{t * 1e3:.1f}' for t in steps['fed_all']]} ms/step, in-memory rounds "
              f"{[f'{t * 1e3:.1f}' for t in steps['memory_all']]} ms/step; first batch {alone['first_batch_s']:.1f} s",
              flush=True)

    print(f"\nbatch {args.batch} x ({args.inputs} inputs + {args.targets} targets), pack={args.pack}, "
          f"{args.model_gin}, {jax.device_count()} {jax.devices()[0].platform} device(s); medians of "
          f"{args.repeats} alternating rounds of {args.steps} steps; pipeline alone over {args.pipeline_batches} "
          "batches")
    header = ("mixture", "pipeline batches/s", "pipeline tokens/s", "slots/s", "step fed ms", "step in-memory ms",
              "fed / in-memory", "pipeline / step rate", "batch wait ms/step", "pipeline CPU ms/batch",
              "step CPU ms (in-memory)", "step CPU ms (fed)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, alone, steps, consumed in rows:
        print(f"| {name} | {alone['batches_per_s']:.2f} | {alone['tokens_per_s']:,.0f} | {alone['slots_per_s']:,.0f} "
              f"| {steps['fed_step_s'] * 1e3:.1f} | {steps['memory_step_s'] * 1e3:.1f} "
              f"| {steps['fed_step_s'] / steps['memory_step_s']:.3f} | {alone['batches_per_s'] / consumed:.1f}x "
              f"| {steps['feed_s'] * 1e3:.2f} | {alone['cpu_s_per_batch'] * 1e3:.1f} "
              f"| {steps['memory_cpu_s'] * 1e3:.1f} | {steps['fed_cpu_s'] * 1e3:.1f} |")


if __name__ == "__main__":
    main()
