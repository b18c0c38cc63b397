"""End-to-end runs of `python -m itjax.train` (in-process) on the quickstart config, shrunk to a few steps."""

import json
import os

import gin
import jax
import numpy as np
import pytest

from itjax import train as train_lib
from itjax import training

SMALL = [
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}",
    "--gin.BATCH_SIZE=8",
    # A schedule that does not depend on TRAIN_STEPS, so a resumed run and a straight one see the same rates.
    "--gin.cosine_decay_schedule.decay_steps=1000",
    "--gin.train.eval_num_examples=3",
    "--gin.train.eval_batch_size=8",  # not quickstart.gin's 100: 3 examples need no 100-row batches
    "--gin.train.eval_period=0",
    "--gin.train.log_period=1",
    "--gin.train.checkpoint_period=2",
    "--gin.train.keep_checkpoints=2",
    "--gin.train.async_checkpointing=False",
    "--no_progress",
]


def _run(model_dir, steps, *extra):
    gin.clear_config()
    return train_lib.main(["--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}",
                           f"--gin.TRAIN_STEPS={steps}", *SMALL, *extra])


def _lines(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_losses(model_dir):
    return {r["step"]: r["loss"] for r in _lines(model_dir) if r["split"] == "train"}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Trains 3 steps, then reruns the same command with TRAIN_STEPS=5 (resume); also an uninterrupted 5-step run."""
    root = tmp_path_factory.mktemp("e2e")
    resumed, straight = str(root / "resumed"), str(root / "straight")
    assert _run(resumed, 3) == 0
    assert _run(resumed, 5) == 0
    assert _run(straight, 5) == 0
    return resumed, straight


def test_run_writes_metrics_predictions_config_and_checkpoints(resumed_run):
    model_dir, _ = resumed_run
    lines = _lines(model_dir)
    train_lines = [r for r in lines if r["split"] == "train"]
    eval_lines = [r for r in lines if r["split"] == "validation"]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and r["task"] == "all" for r in train_lines)
    for r in train_lines:  # throughput in every run (itjax.flops)
        assert r["tokens_per_second"] > 0 and 0 < r["packing_efficiency"] <= 1
        assert r["model_tflops_per_second_per_device"] > 0 and 0 < r["mfu"] < 1.5
    tasks = {r["task"] for r in eval_lines}
    assert "all" in tasks and len(tasks) >= 13  # >= 12 tasks + "all"
    for r in eval_lines:
        assert {"step", "split", "task", "rougeL", "exact_match", "loss", "accuracy"} <= set(r)
        assert 0.0 <= r["exact_match"] <= 100.0
    assert {r["step"] for r in eval_lines} == {3, 5}  # eval at the end of each invocation
    prediction_file = os.path.join(model_dir, "predictions", "quickstart_copy_words-5.jsonl")
    with open(prediction_file) as f:
        first = json.loads(f.readline())
    assert first["input"].startswith("Definition:") and isinstance(first["references"], list)
    assert "prediction" in first
    with open(os.path.join(model_dir, "config.gin")) as f:
        config = f.read()
    assert "TRAIN_STEPS = 5" in config and "MIXTURE_OR_TASK_NAME = 'quickstart'" in config
    # Checkpoints every 2 steps and at the end, keeping the last 2.
    assert sorted(os.listdir(os.path.join(model_dir, "checkpoints"))) == ["4", "5"]
    assert os.path.isdir(os.path.join(model_dir, "tensorboard"))


def test_resume_continues_where_an_uninterrupted_run_would(resumed_run, capsys):
    resumed, straight = resumed_run
    a, b = _train_losses(resumed), _train_losses(straight)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-6), step


def test_rerun_logs_the_restored_step(resumed_run, capsys):
    resumed, _ = resumed_run
    metrics = os.path.join(resumed, "metrics.jsonl")
    with open(metrics) as f:
        before = f.read()
    assert _run(resumed, 5) == 0
    out = capsys.readouterr().out
    assert "Restored checkpoint at step 5" in out and "Already trained to step 5" in out
    # The finished run's evaluation is read back, not recomputed and appended again.
    assert "Evaluation of step 5 from" in out and "Evaluation at step 5 (validation)" in out
    assert "quickstart_copy_words" in out.split("Evaluation at step 5")[1]
    with open(metrics) as f:
        assert f.read() == before


def test_checkpoint_of_another_model_shape_is_refused(resumed_run, capsys):
    resumed, _ = resumed_run
    assert _run(resumed, 6, "--gin.itjax.models.T5Config.d_ff=64") == 2
    err = capsys.readouterr().err
    assert "does not match the configured model" in err and "mlp/wi_0/kernel" in err


@pytest.mark.parametrize("override, message", [
    ("--gin.MIXTURE_OR_TASK_NAME='quickstart_copy_word'", "quickstart_copy_words"),
    ("--gin.TASK_FEATURE_LENGTHS={'inputs': 64}", "no length for feature(s) ['targets']"),
    ("--gin.BATCH_SIZE=6", "BATCH_SIZE=6 must be a multiple"),
    ("--gin.TRAIN_STPES=10", "TRAIN_STPES is set but nothing uses it; did you mean TRAIN_STEPS"),
    ("--gin.itjax.models.T5Config.vocab_size=100", "T5Config.vocab_size"),
])
def test_bad_configuration_fails_at_start_with_a_clear_message(tmp_path, capsys, override, message):
    assert _run(str(tmp_path / "run"), 2, override) == 2
    assert message in capsys.readouterr().err


def test_unwritable_model_dir_is_reported(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert _run(str(blocker / "run"), 2) == 2
    assert "is not writable" in capsys.readouterr().err


def test_missing_required_binding_is_named(capsys):
    gin.clear_config()
    code = train_lib.main(["--gin_file=runs/train.gin", "--gin_file=models/t5_1_1_quickstart.gin", "--no_progress"])
    assert code == 2
    assert "required gin binding MODEL_DIR is not set" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step():
    window = [{"loss": 1.0, "z_loss": 0.0, "accuracy": 0.0, "grad_norm": 1.0, "learning_rate": 1.0,
               "target_tokens": 1.0}] * 3
    window[1] = dict(window[1], loss=float("nan"))
    with pytest.raises(training.TrainingDiverged, match="loss became nan at step 12"):
        training._summarise(window, 1.0, step=13)


def _infer(model_dir, tmp_path, lines, *flags):
    from itjax import infer
    gin.clear_config()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = infer.main(["--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}", *SMALL[:2],
                       f"--input_file={inp}", f"--output_file={out}", "--batch_size=4", *flags])
    assert code == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_infer_generates_and_scores(resumed_run, tmp_path):
    model_dir, _ = resumed_run
    with open(os.path.join(model_dir, "predictions", "quickstart_copy_words-5.jsonl")) as f:
        evaluated = [json.loads(line) for line in f]
    lines = [{"inputs": ex["input"], "targets": ex["references"][0]} for ex in evaluated]
    greedy = _infer(model_dir, tmp_path, lines)
    # The CLI's greedy decoding reproduces what evaluation predicted for the same inputs and checkpoint.
    assert [r["prediction"] for r in greedy] == [ex["prediction"] for ex in evaluated]
    beam = _infer(model_dir, tmp_path, lines, "--decode=beam", "--num_beams=2")
    assert len(beam) == len(lines) and all("prediction_ids" in r for r in beam)
    sampled = _infer(model_dir, tmp_path, lines, "--decode=sample", "--temperature=1.0", "--top_k=5")
    assert len(sampled) == len(lines)
    scored = _infer(model_dir, tmp_path, lines + [{"input_ids": [5, 6, 1], "target_ids": [7, 1]}], "--mode=score")
    assert all(r["log_likelihood"] < 0 for r in scored)
    # The greedy first token is the most likely first token: its score beats any other single-token target.
    first = greedy[0]["prediction_ids"][0]
    other = 3 if first != 3 else 4
    own = _infer(model_dir, tmp_path, [{"inputs": lines[0]["inputs"], "target_ids": [first]},
                                       {"inputs": lines[0]["inputs"], "target_ids": [other]}], "--mode=score")
    assert own[0]["log_likelihood"] > own[1]["log_likelihood"]


def test_initial_checkpoint_path_starts_from_given_weights(resumed_run, tmp_path, capsys):
    """Weights saved params-only (as itjax.convert writes them) seed a new run; a bad path is reported."""
    from itjax import inference
    from itjax.convert import save_params

    model_dir, _ = resumed_run
    gin.clear_config()
    from itjax import config as config_lib
    config_lib.parse_gin(["quickstart.gin"], [])
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
    trainer = train_lib.training.Trainer(model, optimizer, train_lib.training.Partitioner())
    source = jax.device_get(inference.restore_params(trainer, model_dir))
    save_params(source, str(tmp_path / "converted"))

    new_dir = tmp_path / "finetune"
    # TRAIN_STEPS=0: nothing is trained, the final checkpoint holds the initial weights as loaded.
    assert _run(str(new_dir), 0, f"--gin.train.initial_checkpoint_path='{tmp_path / 'converted'}'") == 0
    gin.clear_config()
    config_lib.parse_gin(["quickstart.gin"], [])
    loaded = jax.device_get(inference.restore_params(trainer, str(new_dir)))
    for a, b in zip(jax.tree.leaves(source), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)

    assert _run(str(tmp_path / "other"), 1, "--gin.train.initial_checkpoint_path='/no/such/dir'") == 2
    assert "initial checkpoint /no/such/dir does not exist" in capsys.readouterr().err
