r"""Time to the first step of a resumed run, at a small and a large resume step: resume must cost O(1) in the step.

    python scripts/bench_resume.py [--steps 10,5000] [--batch_size 256] [--out_dir /tmp/bench_resume]

For each step N it prepares MODEL_DIR/N with a checkpoint at step N of the quickstart model on the `quickstart`
mixture (14 built-in tasks, quickstart.gin's settings, batch 256): 10 real training steps, then the train state is re-saved as step N
with an input iterator advanced by N batches (data only, untimed; at N=5000 that is 1.28M examples, minutes).
Then it times `python -m itjax.train ... --gin.TRAIN_STEPS=N+1` from process start until metrics.jsonl holds the
line of step N+1 (`--rounds` times per N, alternating), and prints the best time per N and the difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

FLAGS = ["--gin_file=quickstart.gin", "--gin.train.eval_period=0", "--gin.train.log_period=1",
         "--gin.train.checkpoint_period=100000", "--gin.train.eval_num_examples=8",
         "--gin.train.eval_batch_size=8", "--gin.train.async_checkpointing=False", "--no_progress"]


def _prepare(model_dir: str, step: int, batch_size: int) -> None:
    """A checkpoint at `step` whose state comes from 10 real steps and whose iterator has consumed `step` batches."""
    import gin
    import jax
    import orbax.checkpoint as ocp
    import seqio

    from itjax import config as config_lib
    from itjax import training
    from itjax.checkpoints import Checkpointer
    from itjax.data import pipeline

    warm = os.path.join(model_dir, "warm")
    if not os.path.isdir(os.path.join(warm, "checkpoints", "10")):
        config_lib.parse_gin(["quickstart.gin"], [f"MODEL_DIR='{warm}'", "TRAIN_STEPS=10", f"BATCH_SIZE={batch_size}",
                                                  "train.eval_period=0", "train.eval_num_examples=8",
                                                  "train.eval_batch_size=8", "train.checkpoint_period=10"])
        training.train(progress=False)
        gin.clear_config()
    lengths = {"inputs": 112, "targets": 8}  # gin/quickstart.gin's TASK_FEATURE_LENGTHS
    with ocp.StandardCheckpointer() as reader:
        state = reader.restore(os.path.join(warm, "checkpoints", "10", "state"))
    state["step"] = jax.numpy.int32(step)
    # EncoderDecoderModel's feature converter, quickstart.gin's train.pack = False and train.random_seed = 0: the
    # stream the run would read (a mismatch would be refused at resume, naming the setting).
    batches = pipeline.TrainBatches(pipeline.train_dataset("quickstart", lengths, batch_size,
                                                           seqio.EncDecFeatureConverter(pack=False), seed=0))
    start = time.time()
    for _ in range(step):
        next(batches)
    print(f"  advanced the input iterator by {step} batches in {time.time() - start:.0f} s (untimed setup)",
          flush=True)
    target = Checkpointer(os.path.join(model_dir, "run"), period=0, use_async=False)
    position = {"batches_consumed": step, "process_count": 1, "mixture_or_task_name": "quickstart",
                "task_feature_lengths": dict(lengths), "pack": False, "batch_size": batch_size}
    target.save(step, state, position, batches)
    target.close()


def _time_to_first_step(model_dir: str, step: int, batch_size: int) -> float:
    run = os.path.join(model_dir, "timed")  # a fresh copy of the prepared run each time (a resume writes to it)
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(os.path.join(model_dir, "run"), run)
    metrics = os.path.join(run, "metrics.jsonl")
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "itjax.train", f"--gin.MODEL_DIR={run}",
                                f"--gin.TRAIN_STEPS={step + 1}", f"--gin.BATCH_SIZE={batch_size}", *FLAGS],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while True:
        if os.path.exists(metrics):
            with open(metrics) as f:
                if any(json.loads(line).get("step") == step + 1 for line in f if line.strip()):
                    elapsed = time.time() - start
                    break
        if process.poll() is not None:
            raise RuntimeError(f"resumed run exited with {process.returncode}:\n{process.stdout.read()[-3000:]}")
        time.sleep(0.02)
    out = process.communicate()[0]
    assert f"Restored checkpoint at step {step}" in out, out[-3000:]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="10,5000", help="comma-separated resume steps")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--out_dir", default="/tmp/bench_resume")
    parser.add_argument("--rounds", type=int, default=2, help="timed resumes per step, alternating steps")
    parser.add_argument("--prepare_only", action="store_true", help="only write the checkpoints")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    dirs = {step: os.path.join(args.out_dir, f"b{args.batch_size}", str(step)) for step in steps}
    for step, model_dir in dirs.items():
        if not os.path.isdir(os.path.join(model_dir, "run", "checkpoints", str(step))):
            print(f"preparing a checkpoint at step {step} in {model_dir}", flush=True)
            subprocess.run([sys.executable, __file__, "--_prepare", model_dir, str(step), str(args.batch_size)],
                           check=True)
    if args.prepare_only:
        return
    times = {step: [] for step in steps}
    for _ in range(args.rounds):  # alternating, so both see the same machine load
        for step in steps:
            times[step].append(_time_to_first_step(dirs[step], step, args.batch_size))
    for step in steps:
        print(f"resume at step {step:>6}: {min(times[step]):.1f} s from process start to the first finished step "
              f"(best of {args.rounds}; all: {', '.join(f'{t:.1f}' for t in times[step])})", flush=True)
    if len(steps) > 1:
        print(f"difference (step {steps[-1]} - step {steps[0]}): {min(times[steps[-1]]) - min(times[steps[0]]):+.1f} s")

if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--_prepare":
        _prepare(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
