"""FLAN-style template engine (itjax.data.templates) and its seqio registration (itjax.tasks.flan).

Expected strings are written by hand from the rules in itjax/data/templates.py (FLAN flan/v2)."""

import logging

import numpy as np
import pytest
import seqio
import tensorflow as tf

from itjax.data import templates as T
from itjax.tasks import flan, quickstart

VOCAB = quickstart.get_vocabulary()
LENGTHS = {"inputs": 512, "targets": 16}

NLI_TEMPLATES = [
    ("{premise}\n\nQuestion: {hypothesis}?\n\n{options_}", "{answer}"),
    T.Template("Premise {{p}}: {premise} | {options_}\nHypothesis: {hypothesis}", "It is {answer}",
               inputs_prefix="Q: ", targets_prefix="A: ", x_y_delimiter="\n", example_separator="\n\n"),
]
OPTIONS = ["yes", "no"]


def nli_records(split, n, start=0):
    return [{"premise": f"cat {i}", "hypothesis": f"dog {i}", "answer": OPTIONS[i % 2], "options": OPTIONS,
             "chain_of_thought": f"because {i}"} for i in range(start, start + n)]


def texts(task_name, split="validation", **kwargs):
    kwargs.setdefault("shuffle", False)
    ds = seqio.get_mixture_or_task(task_name).get_dataset(LENGTHS, split=split, **kwargs)
    return [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode(), ex)
            for ex in ds.as_numpy_iterator()]


@pytest.fixture(scope="module")
def nli():
    source = flan.records_source({"train": nli_records("train", 1, start=7), "validation": nli_records("val", 3)},
                                 name="nli")
    return flan.register_flan_templates(
        "tpl_nli", source, NLI_TEMPLATES, vocabulary=VOCAB,
        variants=("zero_shot", "no_opt_zero_shot", "two_shot", "no_opt_two_shot", "cot_zero_shot",
                  "input_inversion_zero_shot"))


# ----------------------------------------------------------------------------------------------------------
# Parsing and names.

@pytest.mark.parametrize("pattern", ["{}", "{a.b}", "{a[0]}", "{a!r}", "{a:>3}", "{a", "a}"])
def test_bad_placeholders_are_refused_with_task_and_template(pattern):
    with pytest.raises(T.TemplateError, match=r"Task 'demo', template 1: pattern"):
        T.as_templates([("{q}", "{a}"), (pattern, "{a}")], "demo")


def test_literal_braces_and_fields():
    assert T.Template("A {{x}} {q}", "{a}}}").fields() == {"q", "a"}
    pieces = T.parse_pattern("A {{x}} {q}!")
    assert "".join(lit for lit, _ in pieces) == "A {x} !" and [f for _, f in pieces if f] == ["q"]


def test_variant_names_follow_flan():
    names = [flan.Variant.parse(s).task_name("rte", 10) for s in
             ("zero_shot", "five_shot", "no_opt_zero_shot", "no_opt_ten_shot", "cot_zero_shot",
              "input_inversion_no_opt_one_shot")]
    assert names == ["rte_template_0to10_zero_shot", "rte_template_0to10_five_shot",
                     "rte_template_0to10_no_opt_zero_shot", "rte_template_0to10_no_opt_ten_shot",
                     "rte_cot_template_0to10_zero_shot", "rte_input_inversion_template_0to10_no_opt_one_shot"]
    with pytest.raises(flan.FlanTaskError, match="'5_shots' is not"):
        flan.Variant.parse("5_shots")


def test_no_options_rules_differ_between_zero_and_few_shot():
    t = T.Template("{q} | {options_}\n\n{options_}", "{a}")
    assert T.no_options_template(t).inputs == "{q} | "  # FLAN PATTERNS_NO_OPTIONS
    assert T.no_options_template(t, few_shot=True).inputs == "{q}"  # FLAN FEWSHOT_PATTERNS_NO_OPTIONS
    assert T.no_options_template(t).targets == "{a}"


# ----------------------------------------------------------------------------------------------------------
# Rendering, byte-exact, through the registered seqio tasks.

def test_zero_shot_cycles_templates_byte_exact(nli):
    got = texts(nli.tasks["zero_shot"])
    assert [(i, t) for i, t, _ in got] == [
        ("cat 0\n\nQuestion: dog 0?\n\nOPTIONS:\n- yes\n- no", "yes"),
        ("Premise {p}: cat 1 | OPTIONS:\n- yes\n- no\nHypothesis: dog 1", "It is no"),
        ("cat 2\n\nQuestion: dog 2?\n\nOPTIONS:\n- yes\n- no", "yes"),
    ]
    assert [ex["_template_idx"] for _, _, ex in got] == [0, 1, 0]
    assert {ex["_template_type"] for _, _, ex in got} == {b"zs_opt"}
    assert {ex["_task_name"] for _, _, ex in got} == {b"tpl_nli"}


def test_no_options_zero_shot_byte_exact(nli):
    got = texts(nli.tasks["no_opt_zero_shot"])
    assert [(i, t) for i, t, _ in got][:2] == [
        ("cat 0\n\nQuestion: dog 0?", "yes"),
        ("Premise {p}: cat 1 | \nHypothesis: dog 1", "It is no"),
    ]


def test_few_shot_byte_exact(nli):
    # The train split has one record (i = 7), so both exemplars are it; exemplars use the query's template.
    got = texts(nli.tasks["two_shot"])
    shot0 = "cat 7\n\nQuestion: dog 7?\n\nOPTIONS:\n- yes\n- no\n\nno\n\n\n"
    shot1 = "Q: Premise {p}: cat 7 | OPTIONS:\n- yes\n- no\nHypothesis: dog 7\nA: It is no\n\n"
    assert [(i, t) for i, t, _ in got] == [
        (shot0 * 2 + "cat 0\n\nQuestion: dog 0?\n\nOPTIONS:\n- yes\n- no\n\n", "yes"),
        (shot1 * 2 + "Q: Premise {p}: cat 1 | OPTIONS:\n- yes\n- no\nHypothesis: dog 1\nA:", "It is no"),
        (shot0 * 2 + "cat 2\n\nQuestion: dog 2?\n\nOPTIONS:\n- yes\n- no\n\n", "yes"),
    ]
    assert [ex["_num_exemplars"] for _, _, ex in got] == [2, 2, 2]
    assert {ex["_template_type"] for _, _, ex in got} == {b"fs_opt"}
    # no options, few-shot rule
    got = texts(nli.tasks["no_opt_two_shot"])
    assert got[1][0] == ("Q: Premise {p}: cat 7\nHypothesis: dog 7\nA: It is no\n\n" * 2
                         + "Q: Premise {p}: cat 1\nHypothesis: dog 1\nA:")  # " | {options_}" removed


def test_cot_and_input_inversion_byte_exact(nli):
    got = texts(nli.tasks["cot_zero_shot"])
    assert (got[0][0], got[0][1]) == ("cat 0\n\nQuestion: dog 0?\n\nOPTIONS:\n- yes\n- no",
                                      "because 0\nThe answer is yes")
    assert got[1][1] == "because 1\nThe answer is It is no"
    got = texts(nli.tasks["input_inversion_zero_shot"])
    assert (got[1][0], got[1][1]) == ("It is no", "Premise {p}: cat 1 | OPTIONS:\n- yes\n- no\nHypothesis: dog 1")


def test_hand_written_cot_and_inversion_templates_are_used():
    source = flan.records_source({"train": nli_records("train", 2)}, name="cot")
    reg = flan.register_flan_templates(
        "tpl_cotdemo", source, [("{premise}", "{answer}")], vocabulary=VOCAB,
        variants=("cot_zero_shot", "input_inversion_zero_shot"),
        cot_templates=[("{premise} Let's think.", "{chain_of_thought}. So: {answer}")],
        inversion_templates=[("Answer: {answer}. Premise?", "{premise}")])
    assert [(i, t) for i, t, _ in texts(reg.tasks["cot_zero_shot"], split="train")][0] == (
        "cat 0 Let's think.", "because 0. So: yes")
    assert [(i, t) for i, t, _ in texts(reg.tasks["input_inversion_zero_shot"], split="train")][1] == (
        "Answer: no. Premise?", "cat 1")


def test_non_string_fields_render_with_as_string():
    ds = tf.data.Dataset.from_tensor_slices({"q": ["cat", "dog"], "n": tf.constant([3, 14], tf.int64)})
    out = T.apply_templates(ds, [T.Template("{q} x{n}", "{n}")], task_name="ints")
    assert [(e["inputs"], e["targets"]) for e in out.as_numpy_iterator()] == [(b"cat x3", b"3"), (b"dog x14", b"14")]


# ----------------------------------------------------------------------------------------------------------
# Few-shot pruning and exemplar draws.

def _zipped(train_inputs, train_targets, query_inputs, template_idx):
    return tf.data.Dataset.from_tensors({
        "train": {T.EXEMPLAR_INPUTS_KEY: tf.constant(train_inputs), T.EXEMPLAR_TARGETS_KEY: tf.constant(train_targets)},
        "eval": {"inputs": tf.constant(query_inputs), "targets": tf.constant("x"),
                 T.TEMPLATE_IDX_KEY: tf.constant(template_idx, tf.int32)}})


def test_pruning_drops_exemplars_from_the_end_until_it_fits():
    # 3 exemplars x 2 templates; the query uses template 1.
    train_in = [["unused ", "Q: cat dog\nA: "], ["unused ", "Q: sun moon star\nA: "], ["unused ", "Q: tree\nA: "]]
    train_tg = [["u", "cat\n\n"], ["u", "sun\n\n"], ["u", "tree\n\n"]]
    query = "Q: bird fish\nA: "
    two = "Q: cat dog\nA: cat\n\nQ: sun moon star\nA: sun\n\nQ: bird fish\nA:"
    three = "Q: cat dog\nA: cat\n\nQ: sun moon star\nA: sun\n\nQ: tree\nA: tree\n\nQ: bird fish\nA:"
    budget = len(VOCAB.encode(two)) + 1  # + EOS: exactly two exemplars fit
    assert len(VOCAB.encode(three)) + 1 > budget

    def run(max_len):
        ds = T.join_exemplars(_zipped(train_in, train_tg, query, 1), num_shots=3, vocabulary=VOCAB,
                              max_input_length=max_len)
        return [(e["inputs"].decode(), int(e[T.NUM_EXEMPLARS_KEY])) for e in ds.as_numpy_iterator()]

    assert run(None) == [(three, 3)]
    assert run(budget) == [(two, 2)]
    assert run(budget - 1) == [("Q: cat dog\nA: cat\n\nQ: bird fish\nA:", 1)]
    assert run(3) == []  # not even one exemplar fits: dropped (FLAN filter_zero_shot_in_few_shot)


def test_registered_few_shot_prunes_to_the_task_feature_length():
    source = flan.records_source({"train": nli_records("train", 1, start=7), "validation": nli_records("val", 1)})
    reg = flan.register_flan_templates("tpl_prune", source, NLI_TEMPLATES[:1], vocabulary=VOCAB,
                                       variants=("three_shot",))
    shot = "cat 7\n\nQuestion: dog 7?\n\nOPTIONS:\n- yes\n- no\n\nno\n\n\n"
    query = "cat 0\n\nQuestion: dog 0?\n\nOPTIONS:\n- yes\n- no\n\n"
    budget = len(VOCAB.encode(shot + query)) + 1
    ds = seqio.get_mixture_or_task(reg.tasks["three_shot"]).get_dataset(
        {"inputs": budget, "targets": 8}, split="validation", shuffle=False)
    (ex,) = list(ds.as_numpy_iterator())
    assert ex["inputs_pretokenized"].decode() == shot + query
    assert len(ex["inputs"]) == budget and ex["inputs"][-1] == 1  # fits, EOS not trimmed


@pytest.fixture(scope="module")
def drawn():
    train = [{"q": w, "a": w.upper()} for w in quickstart_words()]
    source = flan.records_source({"train": train, "validation": [{"q": "cat dog", "a": "x"}] * 4})
    reg = flan.register_flan_templates("tpl_draws", source, [("Q: {q}", "{a}")], vocabulary=VOCAB,
                                       variants=("five_shot",))
    return reg.tasks["five_shot"], {w for w in quickstart_words()}


def quickstart_words():
    from itjax.data import synthetic
    return list(synthetic.WORDS)


def test_exemplar_draws_are_seeded_and_from_the_train_split(drawn):
    task, train_words = drawn
    a = [i for i, _, _ in texts(task, shuffle=True, seed=7)]
    b = [i for i, _, _ in texts(task, shuffle=True, seed=7)]
    c = [i for i, _, _ in texts(task, shuffle=True, seed=8)]
    assert a == b and a != c
    assert [i for i, _, _ in texts(task)] == [i for i, _, _ in texts(task)]  # shuffle=False: fixed seed
    for prompt in a:
        shots = prompt.split("\n\n\n")
        assert len(shots) == 6 and shots[-1] == "Q: cat dog\n\n"
        for shot in shots[:-1]:
            question, answer = shot.split("\n\n")
            assert question[3:] in train_words and answer == question[3:].upper()


# ----------------------------------------------------------------------------------------------------------
# Errors and malformed records.

def test_missing_field_names_task_template_and_field():
    source = flan.records_source({"train": [{"premise": "cat", "answer": "yes"}]})
    reg = flan.register_flan_templates("tpl_missing", source, [("{premise}", "{answer}"), ("{premise} {hypothesis}",
                                                                                         "{answer}")],
                                       vocabulary=VOCAB, variants=("zero_shot", "one_shot"))
    for task in reg.tasks.values():
        with pytest.raises(T.TemplateError, match=rf"Task '{task}', template 1 \(inputs pattern .*\) names field "
                                                  r"'hypothesis', but the records have fields \['answer', 'premise'\]"):
            seqio.get_mixture_or_task(task).get_dataset(LENGTHS, split="train", shuffle=False)


def test_options_placeholder_needs_the_list_field():
    ds = tf.data.Dataset.from_tensor_slices({"q": ["a"], "options": ["x"]})  # a string, not a list
    with pytest.raises(T.TemplateError, match=r"template 0 .* needs 'options' to be a list of strings"):
        T.apply_templates(ds, [T.Template("{q} {options_}", "x")], task_name="opts")
    with pytest.raises(T.TemplateError, match=r"names field 'options_' \(\{options_\} is rendered from the list "
                                              r"field 'choices'\)"):
        T.apply_templates(ds, [T.Template("{q} {options_}", "x")], task_name="opts", options_field="choices")


def test_malformed_records_are_counted_reported_or_refused(caplog):
    recs = [{"q": f"w{i}", "a": "x"} for i in range(10)]
    recs[3] = {"q": "w3"}  # missing a
    recs[6] = {"q": ["w6"], "a": "x"}  # list where the first record has a string
    strict = flan.records_source({"train": recs}, name="recs")
    with pytest.raises(flan.FlanTaskError, match=r"recs \[train\]: 2 of 10 records are malformed .* "
                                                 r"recs\[train\]\[3\], recs\[train\]\[6\]\. That is more than "
                                                 r"max_malformed_fraction=0.0"):
        strict.num_input_examples("train")
    lenient = flan.records_source({"train": recs}, name="recs", max_malformed_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="itjax.tasks.flan"):
        assert lenient.num_input_examples("train") == 8
    assert lenient.malformed == {"train": 2}
    assert "2 of 10 records are malformed" in caplog.text
    reg = flan.register_flan_templates("tpl_lenient", lenient, [("{q}", "{a}")], vocabulary=VOCAB,
                                       variants=("zero_shot",))
    assert [i for i, _, _ in texts(reg.tasks["zero_shot"], split="train")] == [
        f"w{i}" for i in range(10) if i not in (3, 6)]


def test_jsonl_source_reads_records_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"q": "cat", "a": "CAT", "options": ["CAT", "DOG"]}\n\n{"q": "dog", "a": "DOG", '
                    '"options": ["CAT", "DOG"], "n": 1}\n', encoding="utf-8")
    source = flan.jsonl_source({"train": str(good)})
    assert source.num_input_examples("train") == 2
    reg = flan.register_flan_templates("tpl_jsonl", source, [("{q}\n{options_}", "{a}")], vocabulary=VOCAB,
                                       variants=("zero_shot",))
    assert [(i, t) for i, t, _ in texts(reg.tasks["zero_shot"], split="train")] == [
        ("cat\nOPTIONS:\n- CAT\n- DOG", "CAT"), ("dog\nOPTIONS:\n- CAT\n- DOG", "DOG")]

    bad_bytes = tmp_path / "latin1.jsonl"
    bad_bytes.write_bytes(b'{"q": "a"}\n{"q": "b"}\n{"q": "caf\xe9"}\n')
    with pytest.raises(flan.FlanTaskError, match=rf"{bad_bytes}:3: not valid UTF-8 \(byte 0xe9 at column 11\)"):
        flan.jsonl_source({"train": str(bad_bytes)}).num_input_examples("train")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"q": "a"}\n{"q": "b",}\n', encoding="utf-8")
    with pytest.raises(flan.FlanTaskError, match=rf"{bad_json}:2: bad JSON"):
        flan.jsonl_source({"train": str(bad_json)}).num_input_examples("train")
    with pytest.raises(flan.FlanTaskError, match="does not exist"):
        flan.jsonl_source({"train": str(tmp_path / "nope.jsonl")})


def test_text_line_source_with_a_parsing_preprocessor(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text("cat\tCAT\ndog\tDOG\nsun\tSUN\n", encoding="utf-8")
    source = seqio.TextLineDataSource({"train": str(path), "validation": str(path)})

    @seqio.map_over_dataset
    def parse_tsv(line):
        q, a = tf.strings.split(line, "\t")[0], tf.strings.split(line, "\t")[1]
        return {"q": q, "a": a}

    reg = flan.register_flan_templates("tpl_tsv", source, [("Q: {q}", "{a}")], vocabulary=VOCAB,
                                       variants=("zero_shot", "one_shot"), preprocessors=[parse_tsv])
    assert [(i, t) for i, t, _ in texts(reg.tasks["zero_shot"])] == [("Q: cat", "CAT"), ("Q: dog", "DOG"),
                                                                     ("Q: sun", "SUN")]
    for prompt, target, _ in texts(reg.tasks["one_shot"]):
        shot, query = prompt.split("\n\n\n")
        assert query == f"Q: {target.lower()}\n\n" and shot.split("\n\n")[0][3:].upper() == shot.split("\n\n")[1]
    unparsed = flan.register_flan_templates("tpl_tsv_raw", source, [("Q: {q}", "{a}")], vocabulary=VOCAB,
                                            variants=("zero_shot",))
    with pytest.raises(T.TemplateError, match="add a preprocessor that parses each element into named fields"):
        texts(unparsed.tasks["zero_shot"])


def test_registration_errors_name_the_setting():
    source = flan.records_source({"validation": [{"q": "a", "a": "b"}]})
    with pytest.raises(flan.FlanTaskError, match="few-shot variants draw exemplars from split 'train'"):
        flan.register_flan_templates("tpl_nosplit", source, [("{q}", "{a}")], vocabulary=VOCAB,
                                     variants=("one_shot",))
    with pytest.raises(flan.FlanTaskError, match=r"num_templates=3 must be in 1\.\.1"):
        flan.register_flan_templates("tpl_nt", source, [("{q}", "{a}")], vocabulary=VOCAB, num_templates=3)


# ----------------------------------------------------------------------------------------------------------
# seqio end to end.

def test_variant_task_gives_tokenized_model_features(nli):
    ds = seqio.get_dataset(nli.tasks["two_shot"], {"inputs": 96, "targets": 8},
                           seqio.EncDecFeatureConverter(pack=False), dataset_split="validation", shuffle=False)
    ex = next(ds.as_numpy_iterator())
    assert ex["encoder_input_tokens"].shape == (96,) and ex["decoder_target_tokens"].shape == (8,)
    ids = [int(t) for t in ex["encoder_input_tokens"] if t > 1]
    expected = "cat 7\n\nQuestion: dog 7?\n\nOPTIONS:\n- yes\n- no\n\nno\n\n\n" * 2 + (
        "cat 0\n\nQuestion: dog 0?\n\nOPTIONS:\n- yes\n- no\n\n")
    assert ids == [t for t in VOCAB.encode(expected)][:len(ids)]
    assert VOCAB.decode([int(t) for t in ex["decoder_target_tokens"] if t > 1]) == "yes"
    mixture = seqio.get_mixture_or_task(nli.mixture)
    assert sorted(t.name for t in mixture.tasks) == sorted(nli.tasks.values())
    assert np.isclose(sum(mixture.get_rate(t) for t in mixture.tasks), len(nli.tasks))
