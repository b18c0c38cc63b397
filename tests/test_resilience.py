"""Runs that survive what a cluster does to them: unreadable checkpoints fall back to the newest good one (moved
aside, never deleted), failed checkpoint writes are reported and never resumed from, NaN / inf steps can be
skipped, a SIGTERM saves and exits cleanly, kill -9 at random moments loses nothing - and every resumed run ends
with the parameters of an uninterrupted one."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import orbax.checkpoint as ocp
import pytest
from saved_state import saved_state, train_lines
from two_tasks import TWO_TASKS

from itjax import train as train_lib
from itjax.data import pipeline

SMALL = [
    *TWO_TASKS,
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    "--gin.BATCH_SIZE=8",
    "--gin.cosine_decay_schedule.decay_steps=1000",  # the same rates whatever TRAIN_STEPS is
    "--gin.train.eval_num_examples=2",
    "--gin.train.eval_batch_size=8",
    "--gin.train.eval_period=0",
    "--gin.train.log_period=1",
    "--gin.train.checkpoint_period=2",
    "--gin.train.keep_checkpoints=3",
    "--gin.train.async_checkpointing=False",
    "--no_progress",
]


def _run(model_dir, steps, *extra):
    gin.clear_config()
    return train_lib.main(["--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
                           f"--gin.TRAIN_STEPS={steps}", *SMALL, *extra])


_state = saved_state


def _assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _steps(model_dir):
    return sorted(int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints")) if n.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 4-step run (checkpoints 2 and 4) to corrupt, and an uninterrupted 6-step run to compare with."""
    root = tmp_path_factory.mktemp("resilience")
    base, straight = str(root / "base"), str(root / "straight")
    assert _run(base, 4) == 0
    assert _run(straight, 6) == 0
    return root, base, _state(straight, 6)


def _truncate_arrays(step_dir):
    files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(step_dir, "state")) for f in names
             if os.sep + "d" + os.sep in os.path.join(d, f)]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


def _garbage_manifest(step_dir):
    with open(os.path.join(step_dir, "state", "manifest.ocdbt"), "wb") as f:
        f.write(b"not a manifest" * 10)


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _truncate_iterator(step_dir):
    folder = os.path.join(step_dir, "data_iterator")
    for name in os.listdir(folder):
        if ".data-" in name:
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(10)


@pytest.mark.parametrize("corrupt", [_truncate_arrays, _garbage_manifest, _delete_metadata, _truncate_iterator])
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(runs, corrupt, caplog, capsys):
    root, base, straight = runs
    run = str(root / corrupt.__name__)
    shutil.copytree(base, run)
    corrupt(os.path.join(run, "checkpoints", "4"))
    assert _run(run, 6) == 0
    assert "Restored checkpoint at step 2" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
    assert len(warnings) == 1 and "Checkpoint 4" in warnings[0]
    assert "does not match the configured model" not in caplog.text
    # Moved aside, not deleted; rotation kept the good ones.
    assert os.path.isdir(os.path.join(run, "checkpoints", "corrupt", "4", "state"))
    assert _steps(run) == [2, 4, 6]
    _assert_same_state(_state(run, 6), straight)


def test_no_restorable_checkpoint_is_an_error_and_nothing_moves(runs, capsys):
    root, base, _ = runs
    run = str(root / "all_bad")
    shutil.copytree(base, run)
    for step in (2, 4):
        _delete_metadata(os.path.join(run, "checkpoints", str(step)))
    assert _run(run, 6) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "step 4:" in err and "step 2:" in err and "Nothing was moved" in err
    assert _steps(run) == [2, 4] and not os.path.exists(os.path.join(run, "checkpoints", "corrupt"))


def _fail_writes_of_step(monkeypatch, step):
    original = ocp.StandardCheckpointHandler.async_save

    async def failing(self, directory, *args, **kwargs):
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, directory, *args, **kwargs)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)


def test_failed_checkpoint_write_stops_with_the_cause_and_is_never_resumed(runs, monkeypatch, capsys):
    root, _, straight = runs
    run = str(root / "write_fails")
    _fail_writes_of_step(monkeypatch, 4)
    assert _run(run, 6) == 2
    err = capsys.readouterr().err
    assert "checkpoint 4" in err and os.path.join(run, "checkpoints", "4") in err and "No space left" in err
    assert _steps(run) == [2]
    monkeypatch.undo()
    assert _run(run, 6) == 0
    assert "Restored checkpoint at step 2" in capsys.readouterr().out
    _assert_same_state(_state(run, 6), straight)


def test_failed_checkpoint_write_can_be_survived(runs, monkeypatch, caplog):
    root, _, straight = runs
    run = str(root / "write_fails_continue")
    _fail_writes_of_step(monkeypatch, 4)
    assert _run(run, 6, "--gin.train.on_checkpoint_error='continue'") == 0
    assert "No space left" in caplog.text
    assert _steps(run) == [2, 6]
    _assert_same_state(_state(run, 6), straight)


def _nan_weights_from(monkeypatch, first_bad_step):
    """Batches after `first_bad_step - 1` consumed ones carry NaN loss weights (so a NaN loss)."""
    original = pipeline.TrainBatches.__next__

    def poisoned(self):
        batch = original(self)
        if self.batches_consumed >= first_bad_step:
            batch = dict(batch, decoder_loss_weights=np.full(batch["decoder_loss_weights"].shape, np.nan,
                                                             np.float32))
        return batch
    monkeypatch.setattr(pipeline.TrainBatches, "__next__", poisoned)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    run = str(tmp_path / "skip")
    _nan_weights_from(monkeypatch, 3)
    assert _run(run, 3, "--gin.train.on_nonfinite_loss='skip'", "--gin.train.checkpoint_period=1",
                "--gin.train.keep_checkpoints=None") == 0
    lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    skipped = {r["step"]: r["skipped_steps"] for r in lines if r["split"] == "train"}
    assert skipped == {1: 0, 2: 0, 3: 1}
    after_2, after_3 = _state(run, 2), _state(run, 3)
    changed = [k for k in after_2 if "step" not in k and not np.array_equal(after_2[k], after_3[k])]
    assert changed == []  # parameters and optimizer state untouched by the skipped step
    assert int(after_3["['step']"]) == 3


def test_too_many_consecutive_skips_stop_the_run(tmp_path, monkeypatch, capsys):
    _nan_weights_from(monkeypatch, 2)
    assert _run(str(tmp_path / "skips"), 8, "--gin.train.on_nonfinite_loss='skip'",
                "--gin.train.max_consecutive_skips=3") == 2
    assert "3 consecutive steps up to step 4" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real signals, real kills
def _command(model_dir, steps, *extra):
    return [sys.executable, "-m", "itjax.train", "--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
            f"--gin.TRAIN_STEPS={steps}", *[a for a in SMALL if "async" not in a and "checkpoint_period" not in a],
            "--gin.train.checkpoint_period=10", *extra]


def _start_and_wait(model_dir, steps, until_step):
    process = subprocess.Popen(_command(model_dir, steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    deadline = time.time() + 300
    while train_lines(model_dir) < until_step and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_kill_9_and_sigterm_at_random_moments_end_like_an_uninterrupted_run(tmp_path):
    """kill -9 twice (just after a checkpoint, often while its async write is in flight) and SIGTERM once, then a
    final run to the end: the final parameters and optimizer state are bit-identical to an uninterrupted run's."""
    steps, rng = 120, random.Random(0)
    run, straight = str(tmp_path / "chaos"), str(tmp_path / "straight")
    for until in (10 + rng.randrange(3), 40 + rng.randrange(3)):
        process = _start_and_wait(run, steps, until)
        assert process.poll() is None, process.communicate()[0][-3000:]
        process.kill()
        process.wait()
    process = _start_and_wait(run, steps, 70)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    assert "Preempted (SIGTERM) at step" in out and "Rerun the same command to resume" in out
    preempted_at = int(out.split("Preempted (SIGTERM) at step ")[1].split(":")[0])
    assert preempted_at in _steps(run)
    final = subprocess.run(_command(run, steps), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert f"Restored checkpoint at step {preempted_at}" in final.stdout
    assert _run(straight, steps, "--gin.train.checkpoint_period=10") == 0
    _assert_same_state(_state(run, steps), _state(straight, steps))
