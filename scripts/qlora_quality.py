"""QLoRA quality check: LoRA on an NF4 base vs LoRA on the float32 base it was quantized from.

1. trains the quickstart T5 (`quickstart.gin`) for --base_steps and exports it (`itjax.convert --from_run`);
2. trains LoRA (gin/peft/lora.gin) and QLoRA (gin/peft/qlora.gin: the same LoRA on the NF4 base) from it for
   --lora_steps each, same seed, data and schedule;
3. prints the validation exact match / ROUGE-L of the base and of both adapters (`metrics.jsonl`, task "all").

    python scripts/qlora_quality.py --out_dir /tmp/qlora_quality            # 1000 + 2 x 500 steps on CPU
    python scripts/qlora_quality.py --out_dir /tmp/qlora_quality --reuse_base --lora_learning_rate 5e-3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def final_eval(model_dir: str) -> dict:
    """The last validation record of the run's metrics.jsonl over all tasks."""
    records = []
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "validation" and record.get("task") == "all":
                records.append(record)
    if not records:
        raise RuntimeError(f"{model_dir}/metrics.jsonl has no validation record for task 'all'.")
    return records[-1]


def run(*args: str) -> None:
    print("+ python -m " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="a new folder for the three runs and the exported base")
    parser.add_argument("--base_steps", type=int, default=1000)
    parser.add_argument("--lora_steps", type=int, default=500)
    parser.add_argument("--lora_learning_rate", type=float, default=2e-3,
                        help="peak of the adapters' cosine schedule (quickstart's 2e-2 is for training from scratch)")
    parser.add_argument("--reuse_base", action="store_true", help="--out_dir already holds base_run/ and base/")
    args = parser.parse_args()
    base_run, base = os.path.join(args.out_dir, "base_run"), os.path.join(args.out_dir, "base")
    common = ["--gin_file=quickstart.gin", "--no_progress"]
    if not args.reuse_base:
        if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
            raise SystemExit(f"--out_dir {args.out_dir} is not empty; pass a new folder.")
        run("itjax.train", *common, f"--gin.MODEL_DIR='{base_run}'", f"--gin.TRAIN_STEPS={args.base_steps}",
            f"--gin.train.eval_period={args.base_steps}")
        run("itjax.convert", "--from_run", base_run, "--out_dir", base)
    rows = {"base (float32)": final_eval(base_run)}
    for name, gin_file in (("LoRA on float32", "peft/lora.gin"), ("LoRA on NF4 (QLoRA)", "peft/qlora.gin")):
        model_dir = os.path.join(args.out_dir, f"{gin_file.split('/')[1].split('.')[0]}_lr{args.lora_learning_rate:g}")
        if os.path.exists(model_dir):
            raise SystemExit(f"{model_dir} exists; pass a new --out_dir or another --lora_learning_rate.")
        run("itjax.train", *common, f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.train.initial_checkpoint_path='{base}'", f"--gin.TRAIN_STEPS={args.lora_steps}",
            f"--gin.train.eval_period={args.lora_steps}",
            f"--gin.cosine_decay_schedule.learning_rate={args.lora_learning_rate}")
        rows[name] = final_eval(model_dir)
    print(f"quickstart: base {args.base_steps} steps, adapters {args.lora_steps} steps (rank 8, q and v, peak "
          f"learning rate {args.lora_learning_rate:g})\n")
    print("| model | exact match | ROUGE-L |\n| --- | ---: | ---: |")
    for name, record in rows.items():
        print(f"| {name} | {record['exact_match']:.1f} | {record['rougeL']:.1f} |")
    gap = rows["LoRA on float32"]["exact_match"] - rows["LoRA on NF4 (QLoRA)"]["exact_match"]
    print(f"\nexact-match gap (float32 - NF4): {gap:+.1f} points")


if __name__ == "__main__":
    main()
