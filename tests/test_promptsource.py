"""P3 templates: promptsource rendering on the real templates, T0 task registration, rank classification
(metric, seqio evaluation with a fake score function, and a real tiny-T5 run through itjax.evaluation)."""

import json
import os
import random

import gin
import jax
import numpy as np
import pytest
import seqio

from itjax.data import promptsource as ps
from itjax.tasks import p3, quickstart

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES_DIR = os.path.join(REPO_ROOT, os.pardir, "shared", "data", "promptsource", "templates")
RTE_PATH = ps.templates_path(TEMPLATES_DIR, "super_glue", "rte")
COPA_PATH = ps.templates_path(TEMPLATES_DIR, "super_glue", "copa")
VOCAB = quickstart.get_vocabulary()

RTE = [  # (premise, hypothesis, label): 0 = entailment ("Yes" / "True"), 1 = not entailment
    {"premise": "The cat sat on the mat.", "hypothesis": "A cat is sitting.", "idx": 0, "label": 0},
    {"premise": "Dogs bark at night.", "hypothesis": "Dogs are silent.", "idx": 1, "label": 1},
    {"premise": "She bought three apples.", "hypothesis": "She bought fruit.", "idx": 2, "label": 0},
]
COPA = {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
        "choice2": "He got a hole in his sock.", "question": "cause", "idx": 0, "label": 0}


@pytest.fixture(scope="module")
def rte():
    return ps.load_templates(RTE_PATH)


@pytest.fixture(scope="module")
def copa():
    return ps.load_templates(COPA_PATH)


# ------------------------------------------------------------------------------------------ rendering

def test_rte_templates_render_as_read_from_the_yaml(rte):
    assert len(rte) == 10 and list(rte) == sorted(rte)
    gpt3 = rte["GPT-3 style"]
    assert gpt3.id == "8fb1c6aa-20e9-438c-bece-c6af1c746449"
    assert gpt3.fixed_answer_choices() == ["True", "False"]
    # jinja: '{{premise}}<blank line>Question: {{hypothesis}} True or False? ||| {% if label != -1 %}...'
    # (a single-quoted YAML scalar: the blank line is one newline).
    out = gpt3.apply(RTE[0])
    assert out == ps.Rendered("The cat sat on the mat.\nQuestion: A cat is sitting. True or False?", "True",
                              ["True", "False"])
    assert gpt3.apply(RTE[1]).targets == "False"
    # "{{premise}} \n\nQuestion: Does this imply that \"{{hypothesis}}\"? Yes or no? ||| ..." (double-quoted YAML).
    out = rte["does this imply"].apply(RTE[1])
    assert out.inputs == 'Dogs bark at night. \n\nQuestion: Does this imply that "Dogs are silent."? Yes or no?'
    assert (out.targets, out.answer_choices) == ("No", ["Yes", "No"])
    out = rte["MNLI crowdsource"].apply(RTE[2])
    assert out.inputs == ('She bought three apples. Using only the above description and what you know about the '
                          'world, is "She bought fruit." definitely correct? Yes or no?')
    assert out.targets == "Yes"
    # An unlabeled (test) record renders no target: T0 drops it.
    assert gpt3.apply(dict(RTE[0], label=-1)) is None
    assert gpt3.apply_parts(dict(RTE[0], label=-1))[0] == [gpt3.apply(RTE[0]).inputs, ""]


def test_copa_templates_use_record_dependent_choices(copa):
    exercise = copa["exercise"]
    assert exercise.fixed_answer_choices() is None  # '{{choice1}} ||| {{choice2}}'
    out = exercise.apply(COPA)
    # 'Exercise: choose the most plausible alternative.\n\n{{ premise }} {% if question == "cause" %} because...
    #  {% else %} so... {% endif %}\n- {{choice1}}\n- {{choice2}} ||| {{ answer_choices[label] }}'
    assert out.inputs == ("Exercise: choose the most plausible alternative.\n\nThe man broke his toe.  because... \n"
                          "- He dropped a hammer on his foot.\n- He got a hole in his sock.")
    assert out.targets == "He dropped a hammer on his foot."
    assert out.answer_choices == ["He dropped a hammer on his foot.", "He got a hole in his sock."]
    # "…What could happen next, C1 or C2?" renders only for question == "effect"; a "cause" record is dropped.
    next_template = copa["\u2026What could happen next, C1 or C2?"]
    assert next_template.apply(COPA) is None
    effect = dict(COPA, question="effect", label=1)
    out = next_template.apply(effect)
    assert out.inputs == ('The man broke his toe. What could happen next, "He dropped a hammer on his foot." or '
                          '"He got a hole in his sock."?')
    assert out.targets == "He got a hole in his sock."
    assert ps.t0_task_name("super_glue", "copa", next_template.name) == "super_glue_copa__What_could_happen_next_C1_or_C2_"
    assert ps.t0_task_name("super_glue", "rte", "GPT-3 style") == "super_glue_rte_GPT_3_style"
    assert ps.t0_task_name("trec", None, "what_category") == "trec_what_category"


def test_pipes_truncation_hyphens_and_helpers(rte):
    gpt3 = rte["GPT-3 style"]
    # A '|||' inside a field is protected: only the template's own separator splits.
    out = gpt3.apply(dict(RTE[0], premise="a ||| b"))
    assert out.inputs.startswith("a ||| b\nQuestion:") and out.targets == "True"
    # Each substituted value is cut to 2048 characters by Jinja's truncate (leeway 5, word boundary, "...").
    long_premise = "word " * 600
    out = gpt3.apply(dict(RTE[0], premise=long_premise))
    assert out.inputs.split("\nQuestion:")[0] == long_premise[:2045].rsplit(" ", 1)[0] + "..."
    assert gpt3.apply(dict(RTE[0], premise=long_premise), truncate=False).inputs.startswith(long_premise.strip())
    # Hyphenated field names become underscores (promptsource.utils.removeHyphen).
    template = ps.Template(id="t", name="hy", jinja="{{ some_field }} ||| x")
    assert template.apply({"some-field": "v"}).inputs == "v"
    # most_frequent keeps ties in first-seen order; choice draws from the per-record seeded generator.
    assert ps.most_frequent(["a", "b", "a", "c"]) == ["a"] and ps.most_frequent(["b", "a"]) == ["b", "a"]
    pick = ps.Template(id="p", name="pick", jinja="q ||| {{ answers | most_frequent | choice }}")
    record = {"answers": ["x", "y", "z", "y", "z", "x"]}
    picks = {pick.apply(record, rng=random.Random(i)).targets for i in range(40)}
    assert picks == {"x", "y", "z"}
    assert pick.apply(record, rng=random.Random(7)) == pick.apply(record, rng=random.Random(7))
    rendered, dropped = ps.render_records(pick, [record] * 3, seed=1)
    again, _ = ps.render_records(pick, [record] * 3, seed=1)
    assert rendered == again and dropped == 0


def test_template_errors_name_file_template_and_problem(rte, tmp_path):
    gpt3 = rte["GPT-3 style"]
    with pytest.raises(ps.PromptTemplateError) as e:
        gpt3.apply({"premise": "p", "label": 0}, where="validation record 4")
    msg = str(e.value)
    for part in (RTE_PATH, "'GPT-3 style'", gpt3.id, "'hypothesis' is undefined", "validation record 4",
                 "[label, premise]"):
        assert part in msg, msg
    path = tmp_path / "templates.yaml"
    path.write_text("dataset: d\ntemplates:\n  abc: !Template\n    answer_choices: Yes ||| No\n    id: abc\n"
                    "    jinja: '{{ premise ||| {{ label }}'\n    metadata: !TemplateMetadata\n      metrics:\n"
                    "      - Accuracy\n    name: broken one\n    reference: ''\n")
    with pytest.raises(ps.PromptTemplateError, match=r"templates.yaml: template 'broken one' \(id abc\): Jinja "
                                                     r"syntax error in jinja \(line 1\)"):
        ps.load_templates(str(path))
    path.write_text("templates: [unclosed")
    with pytest.raises(ps.PromptTemplateError, match="not valid YAML"):
        ps.load_templates(str(path))
    with pytest.raises(ps.PromptTemplateError, match="no such templates file"):
        ps.load_templates(str(tmp_path / "missing.yaml"))
    with pytest.raises(ps.PromptTemplateError, match="no template named 'nope'"):
        p3.register_p3("super_glue", "rte", {"validation": RTE}, templates_dir=TEMPLATES_DIR, vocabulary=VOCAB,
                       template_names=["nope"])


# ------------------------------------------------------------------------------------------ tasks

@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    path = tmp_path_factory.mktemp("rte") / "validation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RTE + [dict(RTE[0], label=-1)]))
    reg = p3.register_p3("super_glue", "rte", {"validation": str(path), "train": RTE}, templates_dir=TEMPLATES_DIR,
                         vocabulary=VOCAB, template_names=["GPT-3 style", "does this imply"])
    return reg


def test_register_p3_tasks(registered, rte):
    assert registered.tasks == ["super_glue_rte_GPT_3_style", "super_glue_rte_does_this_imply"]
    assert registered.score_tasks == [n + "_score_eval" for n in registered.tasks]
    task = seqio.get_mixture_or_task("super_glue_rte_GPT_3_style")
    examples = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    assert len(examples) == 3  # the unlabeled record is dropped
    for record, ex in zip(RTE, examples):
        expected = rte["GPT-3 style"].apply(record)
        assert ex["inputs_pretokenized"].decode() == expected.inputs
        assert ex["targets_pretokenized"].decode() == expected.targets
        assert ex["inputs"][-1] != 1 and ex["targets"][-1] == 1  # T0: EOS on targets only
        assert VOCAB.decode(ex["targets"].tolist()) == expected.targets
    # Generation eval (seqio.Evaluator): the stripped prediction is compared with the target.
    evaluator = seqio.Evaluator("super_glue_rte_GPT_3_style", feature_converter=seqio.EncDecFeatureConverter(
        pack=False), eval_split="validation", sequence_length={"inputs": 64, "targets": 8})
    metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=lambda ds: [
        (int(i), VOCAB.encode(" True ")) for i, _ in ds.as_numpy_iterator()])  # labels: True, False, True
    assert metrics.result()["super_glue_rte_GPT_3_style"]["exact_match"] == pytest.approx(200 / 3)


def test_score_eval_expands_each_record_into_its_choices(registered):
    task = seqio.get_mixture_or_task("super_glue_rte_does_this_imply_score_eval")
    rows = list(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    assert [tuple(r["idx"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["targets_pretokenized"].decode() for r in rows] == ["Yes", "No"] * 3
    assert [bool(r["is_correct"]) for r in rows] == [True, False, False, True, True, False]
    assert rows[0]["inputs_pretokenized"] == rows[1]["inputs_pretokenized"] != rows[2]["inputs_pretokenized"]


def test_rank_classification_metric():
    targets = [((0, 0), True, 1.0, 2), ((0, 1), False, 1.0, 2), ((0, 2), False, 1.0, 2),
               ((1, 0), False, 1.0, 2), ((1, 1), True, 1.0, 5),
               ((2, 0), True, 3.0, 2), ((2, 1), False, 3.0, 2)]
    scores = [-1.0, -2.0, -0.5, -4.0, -6.0, -1.0, -1.0]  # record 0 picks 2 (wrong), 1 picks 0 (wrong), 2 ties -> 0
    assert p3.rank_classification_metric(targets, scores) == {"rank_accuracy": pytest.approx(100 * 3 / 5)}
    # Divided by target length, record 1 picks choice 1 (-6 / 5 > -4 / 2).
    assert p3.rank_classification_metric(targets, scores, normalize_by_target_length=True)["rank_accuracy"] == \
        pytest.approx(100 * 4 / 5)
    shuffled = [3, 0, 6, 1, 5, 2, 4]  # the metric groups by idx, whatever the order
    assert p3.rank_classification_metric([targets[i] for i in shuffled], [scores[i] for i in shuffled]) == \
        p3.rank_classification_metric(targets, scores)


def test_score_eval_through_seqio_evaluator_with_chosen_scores(registered):
    """The evaluator hands each (record, choice) row to score_fn; the metric picks the best choice per record."""
    evaluator = seqio.Evaluator("super_glue_rte_GPT_3_style_score_eval",
                                feature_converter=seqio.EncDecFeatureConverter(pack=False), eval_split="validation",
                                sequence_length={"inputs": 64, "targets": 8}, use_memory_cache=True)
    # Rows are (record, choice) in order; labels True, False, True. Record 0 -> True (right), 1 -> True (wrong),
    # 2 -> True (right).
    chosen = {0: -1.0, 1: -3.0, 2: -0.2, 3: -0.9, 4: -2.0, 5: -7.0}

    def score_fn(ds):
        return [(int(i), chosen[int(i)]) for i, _ in ds.as_numpy_iterator()]

    metrics, _ = evaluator.evaluate(compute_metrics=True, score_fn=score_fn)
    assert metrics.result()["super_glue_rte_GPT_3_style_score_eval"]["rank_accuracy"] == pytest.approx(200 / 3)


# ------------------------------------------------------------------------------------------ a real model

def test_rank_classification_with_a_tiny_t5_through_itjax_evaluation(tmp_path):
    """A random tiny T5 scores RTE choices through Evaluation (score_fn on trainer.score); the choice the metric
    picks is the argmax of trainer.score computed directly: labels set to that argmax give 100, the other 0."""
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
    lengths = {"inputs": 48, "targets": 8}
    name = "super_glue_rte_can_we_infer_score_eval"

    def register(labels):
        p3.register_p3("super_glue", "rte", {"validation": [dict(r, label=l) for r, l in zip(RTE, labels)]},
                       templates_dir=TEMPLATES_DIR, vocabulary=VOCAB, template_names=["can we infer"])

    register([0, 0, 0])
    rows = list(model.feature_converter_cls(pack=False)(
        seqio.get_mixture_or_task(name).get_dataset(lengths, split="validation", shuffle=False), lengths
    ).as_numpy_iterator())
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    direct = np.asarray(trainer.score(params, pipeline.to_global(batch, partitioner.batch_sharding,
                                                                 host_local=False))).reshape(3, 2)
    best = direct.argmax(-1).tolist()

    def rank_accuracy(labels):
        register(labels)
        evaluation = Evaluation(name, model.feature_converter_cls, lengths, 6, "validation", str(tmp_path),
                                MetricsWriter(str(tmp_path), tensorboard=False),
                                batch_divisor=partitioner.batch_divisor)
        return evaluation.run(trainer, params, step=0)[name]["rank_accuracy"]

    assert rank_accuracy(best) == pytest.approx(100.0)
    assert rank_accuracy([1 - b for b in best]) == pytest.approx(0.0)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert {line["task"] for line in lines} == {name, "all"} and lines[0]["num_examples"] == 6
