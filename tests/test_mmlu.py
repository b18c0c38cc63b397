"""MMLU from hand-made files in the official CSV layout: the official 5-shot prompt, shots dropped until the prompt
fits, rank-classification rows, categories, the summary's micro averages, registration (Python and gin), errors
naming the file, and a tiny random T5 scoring a few questions through itjax.evaluation."""

import csv
import json
import os

import gin
import jax
import numpy as np
import pytest
import seqio

from itjax.tasks import mmlu, quickstart
from itjax.tasks.prompt_length import PromptTooLongError

VOCAB = quickstart.get_vocabulary()
SUBJECTS = {"abstract_algebra": "STEM", "philosophy": "humanities", "sociology": "social sciences",
            "marketing": "other"}


def _write(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


def _dev(subject):
    return [[f"{subject} dev {i}?", f"one {i}", f"two {i}", "three", "four", "ABCD"[i % 4]] for i in range(5)]


def _make_data(root, subjects=SUBJECTS, test_rows=None):
    for subject in subjects:
        _write(os.path.join(root, "dev", f"{subject}_dev.csv"), _dev(subject))
        _write(os.path.join(root, "test", f"{subject}_test.csv"), test_rows or [
            ["What is two plus two?", "three", "four", "five", "six", "B"],
            ['A question with "quotes", a comma\nand a new line', "alpha", "beta", "gamma", "delta", "D"],
            ["Pick the last one.", "x", "y", "z", "w", "D"],
        ])
    return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _make_data(tmp_path_factory.mktemp("mmlu") / "data")


@pytest.fixture(scope="module")
def registered(data_dir):
    return mmlu.register_mmlu(data_dir, vocabulary=VOCAB)


def _rows(name, lengths=None):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="test", shuffle=False)
    return list(ds.as_numpy_iterator())


# Hand-written from hendrycks/test evaluate.py (gen_prompt + format_example): note the two spaces after "about".
HEADER = "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
SHOTS = [f"abstract_algebra dev {i}?\nA. one {i}\nB. two {i}\nC. three\nD. four\nAnswer: {'ABCD'[i % 4]}\n\n"
         for i in range(5)]
QUESTION = ('A question with "quotes", a comma\nand a new line\nA. alpha\nB. beta\nC. gamma\nD. delta\nAnswer:')


def test_five_shot_prompt_is_the_official_format(registered):
    rows = _rows("mmlu_abstract_algebra")
    assert len(rows) == 12  # 3 questions x 4 letters
    question_1 = [r for r in rows if r["idx"][0] == 1]
    assert [r["inputs_pretokenized"].decode() for r in question_1] == [HEADER + "".join(SHOTS) + QUESTION] * 4
    assert HEADER + SHOTS[0] == ("The following are multiple choice questions (with answers) about  abstract "
                                 "algebra.\n\nabstract_algebra dev 0?\nA. one 0\nB. two 0\nC. three\nD. four\n"
                                 "Answer: A\n\n")
    # targets: the letter alone, no EOS; exactly one correct row per question (D for question 1)
    assert [r["targets_pretokenized"].decode() for r in question_1] == ["A", "B", "C", "D"]
    assert [r["targets"].tolist() for r in question_1] == [VOCAB.encode(letter) for letter in "ABCD"]
    assert [bool(r["is_correct"]) for r in question_1] == [False, False, False, True]
    assert mmlu.header("high_school_us_history") == ("The following are multiple choice questions (with answers) "
                                                     "about  high school us history.\n\n")


def test_shots_are_dropped_from_the_end_until_the_prompt_fits(registered):
    lengths = [len(VOCAB.encode(HEADER + "".join(SHOTS[:k]) + QUESTION)) + 1 for k in range(6)]  # + EOS
    assert lengths == sorted(lengths)
    for k in (4, 2, 0):
        rows = _rows("mmlu_abstract_algebra", {"inputs": lengths[k], "targets": 4})
        prompt = next(r["inputs_pretokenized"].decode() for r in rows if r["idx"][0] == 1)
        assert prompt == HEADER + "".join(SHOTS[:k]) + QUESTION
    with pytest.raises(PromptTooLongError, match=rf"'mmlu_abstract_algebra'.*at least {lengths[0]}\."):
        _rows("mmlu_abstract_algebra", {"inputs": lengths[0] - 1, "targets": 4})


def test_categories_mixtures_and_summary(registered):
    assert registered.tasks == [f"mmlu_{s}" for s in sorted(SUBJECTS)]
    assert registered.category_mixtures == {"STEM": "mmlu_stem", "humanities": "mmlu_humanities",
                                            "social sciences": "mmlu_social_sciences", "other": "mmlu_other"}
    for subject, cat in SUBJECTS.items():
        assert mmlu.category(subject) == cat
        assert [t.name for t in seqio.get_mixture_or_task(registered.category_mixtures[cat]).tasks] == \
            [f"mmlu_{subject}"]
    assert len(mmlu.SUBCATEGORIES) == 57 and mmlu.category("professional_accounting") == "other"
    assert mmlu.category("high_school_geography") == "social sciences" and mmlu.category("nope") is None
    results = {"mmlu_abstract_algebra": {"rank_accuracy": 50.0, "num_questions": 100.0},
               "mmlu_philosophy": {"rank_accuracy": 100.0, "num_questions": 10.0},
               "mmlu_marketing": {"rank_accuracy": 0.0, "num_questions": 30.0},
               "mmlu_sociology": {"rank_accuracy": 20.0, "num_questions": 60.0},
               "all": {"rank_accuracy": 1.0, "num_questions": 1.0}}
    summary = mmlu.mmlu_summary(results)
    assert summary["categories"] == {"STEM": 50.0, "humanities": 100.0, "social sciences": 20.0, "other": 0.0}
    assert summary["subjects"]["philosophy"] == 100.0 and summary["num_questions"] == 200
    assert summary["average"] == pytest.approx(100 * (50 + 10 + 0 + 12) / 200)  # micro: 72 of 200 questions


def test_metric_counts_questions():
    targets = [((q, c), c == q % 4, 1.0, 1) for q in range(3) for c in range(4)]
    scores = [0.0 if c == 0 else -1.0 for q in range(3) for c in range(4)]  # always picks A: right for q = 0
    assert mmlu.rank_metric(targets, scores) == {"rank_accuracy": pytest.approx(100 / 3), "num_questions": 3.0}


def test_registration_from_gin_and_unknown_subjects(tmp_path, caplog):
    root = _make_data(tmp_path / "mmlu" / "data", subjects=["marketing", "my_own_subject"])
    gin.parse_config(["import itjax.tasks.mmlu", f"register_mmlu.data_dir = '{tmp_path / 'mmlu'}'",
                      "register_mmlu.prefix = 'mmlugin'", "EVAL_MIXTURE = @mmlu_mixture()"])
    with caplog.at_level("WARNING"):
        assert gin.query_parameter("%EVAL_MIXTURE").scoped_configurable_fn() == "mmlugin"  # folder above data/
    assert "'my_own_subject' is not in the official category list" in caplog.text
    assert [t.name for t in seqio.get_mixture_or_task("mmlugin").tasks] == ["mmlugin_marketing",
                                                                           "mmlugin_my_own_subject"]
    assert [t.name for t in seqio.get_mixture_or_task("mmlugin_other").tasks] == ["mmlugin_marketing"]
    assert mmlu.register_mmlu(root, subjects=["marketing"], vocabulary=VOCAB, prefix="mmlu1").tasks == \
        ["mmlu1_marketing"]


def test_missing_files_and_bad_rows_name_the_file(tmp_path):
    root = _make_data(tmp_path / "data", subjects=["anatomy"])
    os.remove(os.path.join(root, "dev", "anatomy_dev.csv"))
    with pytest.raises(mmlu.MMLUDataError, match=r"dev/anatomy_dev\.csv does not exist"):
        mmlu.register_mmlu(root, vocabulary=VOCAB)
    _write(os.path.join(root, "dev", "anatomy_dev.csv"), _dev("anatomy"))
    _write(os.path.join(root, "test", "anatomy_test.csv"), [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "B"]])
    with pytest.raises(mmlu.MMLUDataError, match=r"anatomy_test\.csv:2: 5 columns; MMLU rows have 6"):
        mmlu.register_mmlu(root, vocabulary=VOCAB)
    _write(os.path.join(root, "test", "anatomy_test.csv"), [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(mmlu.MMLUDataError, match=r"anatomy_test\.csv:1: answer column is 'E'"):
        mmlu.register_mmlu(root, vocabulary=VOCAB)
    with pytest.raises(mmlu.MMLUDataError, match=r"test does not exist; data_dir must hold"):
        mmlu.register_mmlu(str(tmp_path / "nowhere"), vocabulary=VOCAB)


@pytest.mark.slow  # compiles the tiny T5's score and eval steps (about 10 s on an idle 2-core CPU)
def test_a_tiny_t5_scores_questions_through_itjax_evaluation(tmp_path):
    """A random tiny T5 scores the four letters through Evaluation (score_fn on trainer.score): answers set to
    the letter with the highest directly computed score give 100, answers set to another letter give 0."""
    from itjax import config as config_lib
    from itjax.data import pipeline
    from itjax.evaluation import Evaluation, MetricsWriter
    from itjax.partitioning import Partitioner
    from itjax.trainer import Trainer
    import itjax.training  # noqa: F401  (gin configurables)

    config_lib.parse_gin(["quickstart.gin"], [])
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
    partitioner = Partitioner(devices=jax.devices()[:1])
    trainer = Trainer(model, optimizer, partitioner)
    params = trainer.init_state()["params"]
    lengths = {"inputs": 112, "targets": 4}  # the 5-shot prompt does not fit: shots are dropped
    questions = [["What is two plus two?", "three", "four", "five", "six"], ["Pick one.", "x", "y", "z", "w"],
                 ["Is water wet?", "yes", "no", "maybe", "never"]]

    def register(letters):
        root = _make_data(tmp_path / "data", subjects=["virology"],
                          test_rows=[q + [letter] for q, letter in zip(questions, letters)])
        return mmlu.register_mmlu(root, vocabulary=VOCAB, prefix="mmlutiny")

    register("AAA")
    name = "mmlutiny_virology"
    rows = list(model.feature_converter_cls(pack=False)(
        seqio.get_mixture_or_task(name).get_dataset(lengths, split="test", shuffle=False), lengths
    ).as_numpy_iterator())
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    direct = np.asarray(trainer.score(params, pipeline.to_global(batch, partitioner.batch_sharding,
                                                                 host_local=False))).reshape(3, 4)
    best = ["ABCD"[i] for i in direct.argmax(-1)]
    other = ["ABCD"[(i + 1) % 4] for i in direct.argmax(-1)]

    def evaluate(letters):
        register(letters)
        evaluation = Evaluation(name, model.feature_converter_cls, lengths, 12, "test", str(tmp_path),
                                MetricsWriter(str(tmp_path), tensorboard=False),
                                batch_divisor=partitioner.batch_divisor)
        return evaluation.run(trainer, params, step=0)

    results = evaluate(best)
    assert results[name]["rank_accuracy"] == pytest.approx(100.0) and results[name]["num_questions"] == 3
    assert mmlu.mmlu_summary(results, prefix="mmlutiny") == {
        "subjects": {"virology": pytest.approx(100.0)}, "categories": {"other": pytest.approx(100.0)},
        "average": pytest.approx(100.0), "num_questions": 3}
    assert evaluate(other)[name]["rank_accuracy"] == pytest.approx(0.0)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {line["task"] for line in lines} == {name, "all"} and lines[0]["num_examples"] == 12
    # the summary also works on results read back from metrics.jsonl (a report in another process)
    assert mmlu.mmlu_summary({line["task"]: line for line in lines[2:]}, prefix="mmlutiny")["average"] == 0.0


def test_expand_choices_with_choices_of_different_token_lengths():
    import tensorflow as tf
    features = {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB, add_eos=False)}
    ds = tf.data.Dataset.from_tensor_slices({"inputs": [[5, 6, 7], [8, 9, 10]], "inputs_pretokenized": ["p", "q"],
                                             "targets": [[1], [2]], "targets_pretokenized": ["A", "a b"]})
    choices = ["A", "a b"]
    assert len(VOCAB.encode("A")) != len(VOCAB.encode("a b"))
    rows = list(mmlu.expand_choices(ds, features, choices=choices).as_numpy_iterator())
    assert [r["idx"].tolist() for r in rows] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert [r["targets"].tolist() for r in rows] == [VOCAB.encode(c) for c in choices] * 2
    assert [r["inputs"].tolist() for r in rows] == [[5, 6, 7]] * 2 + [[8, 9, 10]] * 2
    assert [bool(r["is_correct"]) for r in rows] == [True, False, False, True]
