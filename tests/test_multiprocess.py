"""Runs of 2 processes x 2 fake CPU devices (gloo collectives), as on a 2-host pod slice (one module, so that a
parallel test run keeps them on one worker).

- Training: per-host data shards assembled into global batches, orbax checkpoints written jointly, metrics and
  predictions written once; evaluation sharded over the hosts gives one host's metrics.
- Resilience: a SIGTERM to one process makes both save at the step JAX's preemption sync point agrees on and exit
  cleanly; the resumed run (each process restoring its own input-iterator state) ends bit-identical to an
  uninterrupted one; resuming with another process count is refused with both topologies named, unless the data
  position is deliberately reset; a hung or dead peer makes the other process exit.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from saved_state import saved_state, train_lines
from two_tasks import TWO_TASKS




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_run(tmp_path):
    model_dir = tmp_path / "run"
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "itjax.train", "--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
               *TWO_TASKS, "--gin.TRAIN_STEPS=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}",
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


# ---------------------------------------------------------------------------------------------------- resilience
STEPS = 30
FLAGS = ["--gin_file=quickstart.gin", f"--gin.TRAIN_STEPS={STEPS}", *TWO_TASKS,
         "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}", "--gin.BATCH_SIZE=8",
         "--gin.cosine_decay_schedule.decay_steps=1000", "--gin.train.eval_num_examples=2",
         "--gin.train.eval_batch_size=8", "--gin.train.eval_period=0", "--gin.train.log_period=1",
         "--gin.train.checkpoint_period=10", "--no_progress"]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", TF_CPP_MIN_LOG_LEVEL="2")


def _start(model_dir, *extra):
    port = _free_port()
    command = [sys.executable, "-m", "itjax.train", f"--gin.MODEL_DIR={model_dir}", *FLAGS, *extra,
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [subprocess.Popen(command + [f"--process_id={i}"], env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(processes, timeout=600):
    outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    return [p.returncode for p in processes], outputs


_state = saved_state


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_then_resume_equals_an_uninterrupted_run(tmp_path):
    run, straight = str(tmp_path / "preempted"), str(tmp_path / "straight")
    processes = _start(run)
    deadline = time.time() + 300
    while train_lines(run) < 5 and time.time() < deadline and all(p.poll() is None for p in processes):
        time.sleep(0.05)
    assert all(p.poll() is None for p in processes), "\n".join(out[-3000:] for out in _finish(processes)[1])
    processes[1].send_signal(signal.SIGTERM)  # one host gets the notice; both must save at the same step
    codes, outputs = _finish(processes)
    assert codes == [0, 0], [out[-3000:] for out in outputs]
    steps = {int(out.split("Preempted (preemption notice) at step ")[1].split(":")[0]) for out in outputs}
    assert len(steps) == 1, outputs
    preempted_at = steps.pop()
    assert 5 <= preempted_at < STEPS
    saved = os.listdir(os.path.join(run, "checkpoints", str(preempted_at), "data_iterator"))
    assert {n.split(".")[0] for n in saved if n.startswith("process_")} == {"process_0-of-2", "process_1-of-2"}

    codes, outputs = _finish(_start(run))
    assert codes == [0, 0], [out[-3000:] for out in outputs]
    assert all(f"Restored checkpoint at step {preempted_at}" in out for out in outputs)
    codes, outputs = _finish(_start(straight))
    assert codes == [0, 0], [out[-3000:] for out in outputs]
    a, b = _state(run, STEPS), _state(straight, STEPS)
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    # One process instead of two: the input position cannot be restored; both topologies and the option are named.
    single = [sys.executable, "-m", "itjax.train", f"--gin.MODEL_DIR={run}",
              *[f for f in FLAGS if "TRAIN_STEPS" not in f], f"--gin.TRAIN_STEPS={STEPS + 2}"]
    result = subprocess.run(single, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "process_count: saved 2, now 1" in result.stderr and "train.reset_data_position=True" in result.stderr
    result = subprocess.run(single + ["--gin.train.reset_data_position=True"], env=ENV, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"Restored checkpoint at step {STEPS}" in result.stdout
    assert train_lines(run) >= STEPS + 2


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGSTOP", "SIGKILL"])
def test_a_hung_or_dead_peer_makes_the_other_process_exit(tmp_path, fault):
    """SIGSTOP (a hang: its collectives never come) or kill -9 of process 1: process 0 must not wait forever.
    The step watchdog (20 s) must fire before JAX's heartbeat (60 s) would abort the process: the hang is then
    reported as such (exit 3); 20 s also leaves a loaded machine room for slow steps before the fault."""
    run = str(tmp_path / fault)
    processes = _start(run, "--gin.TRAIN_STEPS=100000", "--gin.train.step_timeout_s=20", "--heartbeat_timeout_s=60")
    deadline = time.time() + 300
    while train_lines(run) < 3 and time.time() < deadline and all(p.poll() is None for p in processes):
        time.sleep(0.05)
    assert all(p.poll() is None for p in processes), "\n".join(out[-3000:] for out in _finish(processes)[1])
    stopped_at = time.time()
    processes[1].send_signal(getattr(signal, fault))
    try:
        out = processes[0].communicate(timeout=120)[0]
        waited = time.time() - stopped_at
    finally:
        processes[1].kill()
        processes[1].communicate()
    assert processes[0].returncode != 0 and waited < 100, out[-3000:]
    if fault == "SIGSTOP":
        assert processes[0].returncode == 3
        assert "no training step finished for" in out and "another process probably hangs or died" in out
