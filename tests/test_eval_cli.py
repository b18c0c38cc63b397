"""`python -m itjax.eval --checkpoint_path`: a run's checkpoint (and the same weights as an itjax.convert folder)
evaluated on a mixture gives the metrics and predictions training logged for that step; bad input is one message
and exit 2; `train.extra_evals` evaluates other mixtures at their own cadence. `itjax.eval --predictions` is
`itjax.report`.

One tiny quickstart run (3 steps, checkpoints at 2 and 3) is trained in-process and shared: on a 2-task mixture
(3 examples per task) with a third task as the extra eval mixture (period 2, 4 examples).
"""

import json
import os
import shutil

import pytest
import seqio

from itjax import config as config_lib
from itjax import convert, eval_specs, report
from itjax import eval as eval_cli
from itjax import train as train_lib

SPM = os.path.join(os.path.dirname(__file__), "..", "tasks", "data", "quickstart", "spm.model")
BBH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "bbh")
MAIN, MAIN_TASKS = "evalcli_two", ["quickstart_copy_words", "quickstart_reverse_words"]
EXTRA = "quickstart_uppercase_words"  # a task, as an extra eval "mixture"
if MAIN not in seqio.MixtureRegistry.names():
    import itjax.tasks  # noqa: F401  (registers the quickstart tasks)
    seqio.MixtureRegistry.add(MAIN, MAIN_TASKS, default_rate=1.0)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _train(model_dir):
    return train_lib.main([
        "--gin_file=quickstart.gin", f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=3",
        f"--gin.MIXTURE_OR_TASK_NAME='{MAIN}'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 16}", "--gin.BATCH_SIZE=8",
        "--gin.train.eval_num_examples=3", "--gin.train.eval_batch_size=8", "--gin.train.eval_period=0",
        "--gin.train.checkpoint_period=2", "--gin.train.async_checkpointing=False", "--no_progress",
        f"--gin.train.extra_evals={{'{EXTRA}': {{'period': 2, 'num_examples': 4}}}}"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("evalcli") / "run")
    assert _train(model_dir) == 0
    return model_dir


def _eval_lines(path, step, mixture):
    return {r["task"]: r for r in _lines(path) if r.get("mixture") == mixture and r["step"] == step}


def _assert_same(evaluated, logged):
    """The same tasks with the same metrics (numbers to 1e-6 relative), steps aside (a converted folder is 0)."""
    assert evaluated.keys() == logged.keys() and evaluated
    for task, record in logged.items():
        assert evaluated[task].keys() == record.keys(), task
        for key, value in record.items():
            if key != "step":
                assert evaluated[task][key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float)
                                                else value), (task, key)


def test_extra_eval_mixture_runs_at_its_cadence_and_at_the_end(run_dir):
    lines = _lines(os.path.join(run_dir, "metrics.jsonl"))
    extra = [(r["step"], r["task"]) for r in lines if r.get("mixture") == EXTRA]
    assert extra == [(2, EXTRA), (2, "all"), (3, EXTRA), (3, "all")]  # period 2, and the last step
    assert all(r["num_examples"] == 4 for r in lines if r.get("mixture") == EXTRA)
    main = [(r["step"], r["task"], r["num_examples"]) for r in lines if r.get("mixture") == MAIN]
    assert main == [(3, MAIN_TASKS[0], 3), (3, MAIN_TASKS[1], 3), (3, "all", 6)]  # only at the end
    assert sorted(os.listdir(os.path.join(run_dir, "predictions"))) == sorted([
        EXTRA, f"{MAIN_TASKS[0]}-3.jsonl", f"{MAIN_TASKS[1]}-3.jsonl"])
    assert sorted(os.listdir(os.path.join(run_dir, "predictions", EXTRA))) == [f"{EXTRA}-2.jsonl", f"{EXTRA}-3.jsonl"]


def test_rerun_of_the_finished_run_reads_back_only_the_main_evaluation(run_dir, capsys):
    capsys.readouterr()
    before = _lines(os.path.join(run_dir, "metrics.jsonl"))
    assert _train(run_dir) == 0
    out = capsys.readouterr().out
    assert "Already trained to step 3" in out and MAIN_TASKS[0] in out and EXTRA not in out
    assert _lines(os.path.join(run_dir, "metrics.jsonl")) == before


def test_eval_of_a_checkpoint_equals_what_training_logged(run_dir, capsys):
    assert eval_cli.main(["--checkpoint_path", run_dir, f"--gin.EVAL_MIXTURE='{MAIN}'"]) == 0
    _assert_same(_eval_lines(os.path.join(run_dir, "eval", "metrics.jsonl"), 3, MAIN),
                 _eval_lines(os.path.join(run_dir, "metrics.jsonl"), 3, MAIN))
    for task in MAIN_TASKS:
        with open(os.path.join(run_dir, "predictions", f"{task}-3.jsonl")) as a, \
                open(os.path.join(run_dir, "eval", "predictions", MAIN, f"{task}-3.jsonl")) as b:
            assert a.read() == b.read()
    out = capsys.readouterr().out
    assert f"(step 3) on {MAIN} (validation)" in out and "exact_match" in out and MAIN_TASKS[1] in out

    # An earlier step, on another mixture: the extra evaluation training logged at step 2 (its 4 examples).
    assert eval_cli.main(["--checkpoint_path", run_dir, "--step=2", f"--gin.EVAL_MIXTURE='{EXTRA}'",
                          "--gin.evaluate.num_examples=4"]) == 0
    _assert_same(_eval_lines(os.path.join(run_dir, "eval", "metrics.jsonl"), 2, EXTRA),
                 _eval_lines(os.path.join(run_dir, "metrics.jsonl"), 2, EXTRA))

    # Again at step 2 with 2 examples: lines appended, the earlier predictions kept.
    assert eval_cli.main(["--checkpoint_path", run_dir, "--step=2", f"--gin.EVAL_MIXTURE='{EXTRA}'",
                          "--gin.evaluate.num_examples=2"]) == 0
    again = [r for r in _lines(os.path.join(run_dir, "eval", "metrics.jsonl")) if r["mixture"] == EXTRA]
    assert [r["num_examples"] for r in again] == [4, 4, 2, 2]
    predictions = os.path.join(run_dir, "eval", "predictions", EXTRA)
    assert len(_lines(os.path.join(predictions, f"{EXTRA}-2.1.jsonl"))) == 4
    assert len(_lines(os.path.join(predictions, f"{EXTRA}-2.jsonl"))) == 2


def test_eval_of_a_converted_folder(run_dir, tmp_path):
    out = tmp_path / "converted"
    convert.main(["--from_run", run_dir, "--out_dir", str(out)])
    shutil.copyfile(SPM, out / "spiece.model")
    lengths = "--gin.evaluate.task_feature_lengths={'inputs': 128, 'targets': 16}"
    assert eval_cli.main(["--checkpoint_path", str(out), f"--gin.EVAL_MIXTURE='{EXTRA}'", lengths,
                          "--gin.evaluate.num_examples=4", "--out_dir", str(tmp_path / "eval")]) == 0
    evaluated = _eval_lines(tmp_path / "eval" / "metrics.jsonl", 0, EXTRA)  # a converted folder is step 0
    _assert_same(evaluated, _eval_lines(os.path.join(run_dir, "metrics.jsonl"), 3, EXTRA))
    assert not os.path.exists(out / "eval")


def _error(capsys, *argv):
    assert eval_cli.main(list(argv)) == 2
    return capsys.readouterr().err


def test_bad_input_is_one_message_and_exit_2(run_dir, tmp_path, capsys):
    mixture = f"--gin.EVAL_MIXTURE='{MAIN}'"
    err = _error(capsys, "--checkpoint_path", str(tmp_path / "nope"), mixture)
    assert f"{tmp_path / 'nope'} does not exist" in err
    err = _error(capsys, "--checkpoint_path", run_dir, "--step=1", mixture)
    assert "no checkpoint at step 1" in err and "2, 3" in err
    err = _error(capsys, "--checkpoint_path", run_dir, "--gin.EVAL_MIXTURE='quickstart_copy_word'")
    assert "EVAL_MIXTURE='quickstart_copy_word'" in err and "not a registered" in err and MAIN_TASKS[0] in err
    err = _error(capsys, "--checkpoint_path", run_dir)
    assert "required gin binding EVAL_MIXTURE is not set" in err
    err = _error(capsys, "--checkpoint_path", run_dir, mixture, "--gin.evaluate.splt='test'")
    assert "evaluate.splt" in err
    err = _error(capsys, "--checkpoint_path", run_dir, mixture, "--gin.evaluate.split='test'")
    assert "'test' split" in err and "validation" in err
    converted = tmp_path / "converted_without_lengths"
    convert.main(["--from_run", run_dir, "--out_dir", str(converted)])
    err = _error(capsys, "--checkpoint_path", str(converted), mixture)
    assert "evaluate.task_feature_lengths" in err
    assert "checkpoint steps" in _error(capsys, "--checkpoint_path", str(converted), "--step=3", mixture)


def test_bbh_chain_of_thought_needs_256_decode_tokens(run_dir, capsys):
    from itjax.tasks import bbh

    bbh.register_bbh(BBH_DIR, tasks=["boolean_expressions"], vocabulary=SPM, prefix="evalclibbh")
    lengths = "--gin.evaluate.task_feature_lengths={'inputs': 4096, 'targets': 16}"
    err = _error(capsys, "--checkpoint_path", run_dir, "--gin.EVAL_MIXTURE='evalclibbh_cot'", lengths)
    assert "chain-of-thought" in err and "256" in err and "16 tokens" in err
    # the same rule for an extra eval mixture of a training run, before anything is built
    main = eval_specs.EvalSpec(MAIN, "validation", {"inputs": 128, "targets": 16}, 8)
    with pytest.raises(config_lib.ConfigError, match=r"train.extra_evals\['evalclibbh_cot'\].*256"):
        eval_specs.parse_extra_evals({"evalclibbh_cot": {"task_feature_lengths": {"inputs": 4096, "targets": 16}}},
                                     main=main, eval_period=10)
    specs = eval_specs.parse_extra_evals(
        [{"mixture": "evalclibbh_cot", "max_decode_length": 256, "task_feature_lengths": {"inputs": 4096,
                                                                                          "targets": 16}}],
        main=main, eval_period=10)
    assert (specs[0].split, specs[0].period, specs[0].batch_size) == ("test", 10, 8)  # BBH has only `test`


def test_extra_evals_settings_are_checked():
    main = eval_specs.EvalSpec(MAIN, "validation", {"inputs": 128, "targets": 16}, 8)
    for bad, message in [({EXTRA: {"periode": 5}}, r"unknown setting\(s\) \['periode'\]"),
                         ({EXTRA: "often"}, "give a period"),
                         ({EXTRA: -1}, "period must be"),
                         ({"nope_mixture": 5}, r"\['nope_mixture'\].*not a registered"),
                         ({MAIN: 5}, "main evaluation"),
                         ([{"period": 5}], "needs a 'mixture' key")]:
        with pytest.raises(config_lib.ConfigError, match=message):
            eval_specs.parse_extra_evals(bad, main=main, eval_period=10)
    (spec,) = eval_specs.parse_extra_evals({EXTRA: 7}, main=main, eval_period=10)
    assert spec == eval_specs.EvalSpec(EXTRA, "validation", {"inputs": 128, "targets": 16}, 8, period=7)


def test_predictions_alias_is_the_report(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps({"task": "t", "prediction": "a b", "references": ["a b"]}) + "\n")
    assert eval_cli.main(["--predictions", str(path)]) == 0
    via_eval = capsys.readouterr().out
    assert report.main(["--predictions", str(path)]) == 0
    assert capsys.readouterr().out == via_eval and "100.0000" in via_eval
