import os

import gin
import pytest

from itjax import config as config_lib


@gin.configurable
def _run(model_dir=gin.REQUIRED, train_steps=gin.REQUIRED):
    return model_dir, train_steps


def test_gin_overrides_are_split_from_argv_and_paths_quoted():
    bindings, rest = config_lib.split_gin_overrides(
        ["--gin_file=a.gin", "--gin.TRAIN_STEPS=10", "--gin.MODEL_DIR=/tmp/x", "--gin.NAME='s'"])
    assert rest == ["--gin_file=a.gin"]
    assert bindings == ["TRAIN_STEPS = 10", "MODEL_DIR = '/tmp/x'", "NAME = 's'"]


def test_gin_files_resolve_against_search_paths_and_builtin_folder(tmp_path):
    (tmp_path / "mine.gin").write_text("X = 1\n")
    assert config_lib.resolve_gin_file("mine.gin", [str(tmp_path)]) == str(tmp_path / "mine.gin")
    assert config_lib.resolve_gin_file("quickstart.gin", []).endswith(os.path.join("gin", "quickstart.gin"))
    with pytest.raises(config_lib.ConfigError, match="gin file 'nope.gin' not found"):
        config_lib.resolve_gin_file("nope.gin", [str(tmp_path)])


def _parse(lines):
    gin.parse_config(lines + ["_run.model_dir = %MODEL_DIR", "_run.train_steps = %TRAIN_STEPS"])


def test_required_macro_missing_is_named():
    _parse(["MODEL_DIR = '/tmp/x'"])
    with pytest.raises(config_lib.ConfigError, match="TRAIN_STEPS"):
        config_lib.check_macros(required=("MODEL_DIR", "TRAIN_STEPS"))


def test_misspelled_macro_is_reported_with_a_suggestion():
    _parse(["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 3", "TRAIN_STPES = 5"])
    with pytest.raises(config_lib.ConfigError, match="TRAIN_STPES is set but nothing uses it; did you mean TRAIN_STEPS"):
        config_lib.check_macros(required=("MODEL_DIR", "TRAIN_STEPS"))


def test_complete_config_passes():
    _parse(["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 3"])
    config_lib.check_macros(required=("MODEL_DIR", "TRAIN_STEPS"))
    assert _run() == ("/tmp/x", 3)


def test_bad_gin_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("_run.model_dir = [unclosed\n")
    with pytest.raises(config_lib.ConfigError, match="bad.gin"):
        config_lib.parse_gin([str(bad)], [])


def test_operative_config_never_overwrites_a_different_one(tmp_path):
    (tmp_path / "config.gin").write_text("# an earlier run\n")
    config_lib.save_operative_config(str(tmp_path))
    assert (tmp_path / "config.1.gin").read_text() == "# an earlier run\n"
    assert (tmp_path / "config.gin").exists()


def test_folders_named_like_gin_subfolders_in_the_working_directory_do_not_break_includes(tmp_path, monkeypatch):
    # `runs/` is where the quickstart writes by default; gin would take it for a Python package.
    for folder in ("runs", "models", "partitioning"):
        (tmp_path / folder / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config_lib.parse_gin(["quickstart.gin"], [], required_macros=config_lib.REQUIRED_TRAIN_MACROS)
    assert gin.query_parameter("TRAIN_STEPS/macro.value") > 0


def test_a_missing_macro_is_not_blamed_on_a_known_one():
    # A model file alone: MODEL is set (and is no misspelled MODEL_DIR); the loop is what is missing.
    import itjax.models.encoder_decoder  # noqa: F401

    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.parse_gin(["models/t5_1_1_quickstart.gin"], [], required_macros=config_lib.REQUIRED_TRAIN_MACROS)
    message = str(error.value)
    assert "required gin binding MODEL_DIR is not set" in message and "instead of" not in message
    assert "--gin_file=runs/train.gin" in message


def test_macro_defaults_fill_only_macros_that_are_used_and_unset():
    gin.parse_config(["_run.model_dir = %MODEL_DIR", "_run.train_steps = %TRAIN_STEPS", "TRAIN_STEPS = 7"])
    config_lib.parse_gin([], [], macro_defaults={"MODEL_DIR": None, "TRAIN_STEPS": 1, "UNUSED": 3})
    assert _run() == (None, 7)
    assert "UNUSED" not in gin.config_str()


def test_a_default_run_file_goes_under_the_files_given():
    import itjax.training  # noqa: F401
    from itjax import partitioning

    config_lib.parse_gin(["models/t5_1_1_quickstart.gin", "partitioning/fsdp.gin"],
                         ["BATCH_SIZE = 8", "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 8}"],
                         required_macros=config_lib.REQUIRED_DRY_RUN_MACROS, default_run_file="runs/train.gin",
                         macro_defaults=config_lib.DRY_RUN_MACRO_DEFAULTS)
    assert config_lib.binds_training_loop()
    # runs/train.gin includes the data-parallel layout; the FSDP file given on the command line still wins.
    assert partitioning.Partitioner().rules == partitioning.FSDP_RULES
    assert gin.query_parameter("BATCH_SIZE/macro.value") == 8


def test_gin_files_include_their_family_through_the_builtin_folder():
    import itjax.models.encoder_decoder  # noqa: F401
    from itjax.models.encoder_decoder import EncoderDecoderModel

    config_lib.parse_gin_file(os.path.join(config_lib.builtin_gin_dir(), "models", "mt5_small.gin"))
    config = EncoderDecoderModel().config
    assert (config.vocab_size, config.d_model, config.feed_forward) == (250112, 512, "gated-gelu")


def test_macro_value_calls_a_configurable_in_the_macro_scope_as_a_saved_run_config_binds_it():
    """A run's config.gin (gin's operative config) binds the parameters of `MIXTURE_OR_TASK_NAME = @mixture()` under
    the macro's scope; reading the macro back (itjax.runs.load: `convert --from_run`, peft export) must call it there."""
    import seqio

    import itjax.data.mixing  # noqa: F401  (the `mixture` configurable)

    gin.parse_config([
        "MIXTURE_OR_TASK_NAME = @mixture()",
        "MIXTURE_OR_TASK_NAME/mixture.name = 'macro_value_two'",
        "MIXTURE_OR_TASK_NAME/mixture.tasks = ['quickstart_copy_words', ('quickstart_reverse_words', 2.0)]",
        "TASK_FEATURE_LENGTHS = {'inputs': 8, 'targets': 4}",
    ])
    with pytest.raises(RuntimeError, match="Required bindings for `mixture`"):  # the bare reference misses them
        gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value").scoped_configurable_fn()
    assert config_lib.macro_value("MIXTURE_OR_TASK_NAME") == "macro_value_two"
    mixture = seqio.get_mixture_or_task("macro_value_two")
    assert sorted(t.name for t in mixture.tasks) == ["quickstart_copy_words", "quickstart_reverse_words"]
    assert config_lib.macro_value("TASK_FEATURE_LENGTHS") == {"inputs": 8, "targets": 4}
    assert config_lib.macro_value("NOT_BOUND") is None
