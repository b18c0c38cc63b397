"""A 2-process run (2 fake CPU devices each, gloo collectives), as on a 2-host pod slice: per-host data shards
assembled into global batches, orbax checkpoints written jointly, metrics and predictions written once."""

import json
import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_run(tmp_path):
    model_dir = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "itjax.train", "--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
               "--gin.TRAIN_STEPS=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}",
               "--gin.BATCH_SIZE=8", "--gin.train.eval_num_examples=3", "--gin.train.eval_batch_size=8",
               "--gin.train.eval_period=0",
               "--gin.train.log_period=1", "--gin.train.checkpoint_period=2", "--no_progress",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    processes = [subprocess.Popen(command + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    with open(model_dir / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3, 4]  # written by process 0 only
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["2", "4"]
    # Both processes computed the same global evaluation.
    tables = [out[out.index("Evaluation at step 4"):] for out in outputs]
    assert tables[0] == tables[1]
