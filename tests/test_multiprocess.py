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


def _eval_only_run(model_dir, num_processes: int, devices_per_process: int) -> list[dict]:
    """Evaluates the quickstart model at initialisation (TRAIN_STEPS=0) on the first 5 validation examples of one
    task: uneven host shards (3 + 2) and, with 2 rows per host and batch, a host feeding a padding-only batch."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "itjax.train", "--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
               "--gin.TRAIN_STEPS=0", "--gin.MIXTURE_OR_TASK_NAME='quickstart_copy_words'",
               "--gin.BATCH_SIZE=8", "--gin.train.eval_num_examples=5", "--gin.train.eval_batch_size=4",
               "--no_progress"]
    if num_processes > 1:
        command += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}"]
    processes = [subprocess.Popen(command + ([f"--process_id={i}"] if num_processes > 1 else []), env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(num_processes)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:]
    with open(model_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_two_hosts_evaluate_their_shards_with_one_hosts_metrics(tmp_path):
    one = _eval_only_run(tmp_path / "one", 1, 4)
    two = _eval_only_run(tmp_path / "two", 2, 2)
    assert len(one) == len(two) == 2  # the task + "all"
    for a, b in zip(one, two):
        assert a["task"] == b["task"] and a["num_examples"] == b["num_examples"]
        assert set(a) == set(b)
        for key in a:
            if isinstance(a[key], float):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["task"], key, a[key], b[key])
    assert one[-1]["num_examples"] == 5
    # The same examples, in the same order, with the same generations.
    names = sorted(os.listdir(tmp_path / "one" / "predictions"))
    assert names == sorted(os.listdir(tmp_path / "two" / "predictions")) == ["quickstart_copy_words-0.jsonl"]
    lines = (tmp_path / "one" / "predictions" / names[0]).read_text()
    assert lines == (tmp_path / "two" / "predictions" / names[0]).read_text()
    assert [json.loads(line)["input"] for line in lines.splitlines()] == \
        [ex["inputs_pretokenized"].decode() for ex in _first_validation_examples("quickstart_copy_words", 5)]


def _first_validation_examples(task_name: str, n: int) -> list[dict]:
    import seqio

    from itjax.tasks import quickstart  # noqa: F401 (registers the tasks)
    ds = seqio.get_mixture_or_task(task_name).get_dataset({"inputs": 112, "targets": 8}, split="validation",
                                                          shuffle=False)
    return list(ds.take(n).as_numpy_iterator())
