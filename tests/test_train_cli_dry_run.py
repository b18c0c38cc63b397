"""`python -m itjax.train --dry_run` needs only a model and the shapes (BATCH_SIZE, TASK_FEATURE_LENGTHS): no
MODEL_DIR, task, TRAIN_STEPS or initial checkpoint; a model file alone gets the loop of runs/train.gin."""

import math
import os

import gin
import jax
import pytest
from flax import nnx

from itjax import config as config_lib
from itjax import train as train_lib

SHAPES = ["--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]


def _quickstart_parameter_count() -> int:
    from itjax.models.encoder_decoder import EncoderDecoderModel

    gin.clear_config()
    config_lib.parse_gin_file(os.path.join(config_lib.builtin_gin_dir(), "models", "t5_1_1_quickstart.gin"))
    model = EncoderDecoderModel()
    gin.clear_config()
    params = nnx.split(model.abstract_module(), nnx.Param)[1]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def test_a_model_file_and_shapes_are_enough(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    expected = _quickstart_parameter_count()
    code = train_lib.main(["--gin_file=models/t5_1_1_quickstart.gin", "--gin_file=partitioning/fsdp.gin", "--dry_run",
                           *SHAPES])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"parameters: {expected:,}" in captured.out
    assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in captured.out  # the FSDP file wins over the run's default
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_recipe_without_run_dir_task_steps_or_weights_dry_runs(tmp_path, monkeypatch, capsys):
    """Like flan_t5_xl.gin: the recipe uses %INITIAL_CHECKPOINT_PATH and %TRAIN_STEPS and sets neither, nor
    MODEL_DIR nor the task. The dry run passes; a real run names what it lacks."""
    recipe = tmp_path / "recipe.gin"
    recipe.write_text("include 'models/t5_1_1_quickstart.gin'\ninclude 'runs/train.gin'\n"
                      "train.initial_checkpoint_path = %INITIAL_CHECKPOINT_PATH\n"
                      "LEARNING_RATE = @cosine_decay_schedule()\n"
                      "cosine_decay_schedule.decay_steps = %TRAIN_STEPS\n")
    monkeypatch.chdir(tmp_path)
    assert train_lib.main([f"--gin_file={recipe}", "--dry_run", *SHAPES]) == 0
    assert "parameters:" in capsys.readouterr().out
    gin.clear_config()
    assert train_lib.main([f"--gin_file={recipe}", *SHAPES]) == 2
    err = capsys.readouterr().err
    assert "required gin binding MODEL_DIR is not set" in err and "instead of" not in err
    assert sorted(os.listdir(tmp_path)) == ["recipe.gin"]


def test_a_model_file_without_the_loop_is_told_to_add_it(capsys):
    assert train_lib.main(["--gin_file=models/t5_1_1_quickstart.gin", *SHAPES]) == 2
    err = capsys.readouterr().err
    assert "MODEL_DIR is not set" in err and "--gin_file=runs/train.gin" in err and "instead of MODEL" not in err


def test_the_python_api_names_what_a_real_run_lacks():
    from itjax import training

    gin.clear_config()
    config_lib.parse_gin(["quickstart.gin"], ["MODEL_DIR = None"])
    with pytest.raises(config_lib.ConfigError, match=r"train.model_dir \(gin macro MODEL_DIR\) not set"):
        training.train(progress=False)
