"""BIG-Bench Hard: official prompts (CoT and answer-only) from the shared BBH folder, answer extraction, strict
exact match and the task average, registration (Python and gin), errors naming the file, the prompt-length and
decode-length checks, and scoring through seqio's Evaluator with chosen generations."""

import json
import os
import shutil

import gin
import numpy as np
import pytest
import seqio

from itjax import metrics
from itjax.tasks import bbh, quickstart
from itjax.tasks.prompt_length import PromptTooLongError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BBH_DIR = os.path.join(REPO_ROOT, os.pardir, "shared", "data", "bbh")
VOCAB = quickstart.get_vocabulary()
TASKS = ["boolean_expressions", "navigate", "object_counting", "word_sorting"]

# The official answer-only prompt of boolean_expressions' first example, as recorded in the paper's
# code-davinci-002 outputs (code-davinci-002-direct/boolean_expressions_few_shot_template_0-255000.json).
OFFICIAL_DIRECT_PROMPT = (
    "Evaluate the result of a random Boolean expression.\n\n"
    "Q: not ( ( not not True ) ) is\nA: False\n\n"
    "Q: True and False and not True and True is\nA: False\n\n"
    "Q: not not ( not ( False ) ) is\nA: True\n\n"
    "Q: not ( True ) and ( True ) is\nA:")


@pytest.fixture(scope="module")
def registered():
    return bbh.register_bbh(BBH_DIR, tasks=TASKS, vocabulary=VOCAB)


def _prompts(name, lengths=None):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="test", shuffle=False)
    return [(ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()) for ex in ds.as_numpy_iterator()]


# ------------------------------------------------------------------------------------------ prompts

def test_prompts_are_the_official_ones(registered):
    with open(os.path.join(BBH_DIR, "cot-prompts", "boolean_expressions.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith("BENCHMARK DATA SHOULD NEVER APPEAR") and lines[1] == "-----"
    body = "\n".join(lines[2:])  # the file after its canary header
    cot = _prompts("bbh_boolean_expressions_cot")
    direct = _prompts("bbh_boolean_expressions_direct")
    assert len(cot) == len(direct) == 250
    assert cot[0] == (body + "\n\nQ: not ( True ) and ( True ) is\nA: Let's think step by step.", "False")
    assert cot[0][0].startswith("Evaluate the result of a random Boolean expression.\n\nQ: not ( ( not not True ) ) "
                                "is\nA: Let's think step by step.\nRemember that (i) expressions")
    assert direct[0] == (OFFICIAL_DIRECT_PROMPT, "False")
    with open(os.path.join(BBH_DIR, "bbh", "boolean_expressions.json"), encoding="utf-8") as f:
        last = json.load(f)["examples"][-1]
    assert direct[-1][0] == OFFICIAL_DIRECT_PROMPT.rsplit("Q: ", 1)[0] + f"Q: {last['input']}\nA:"


def test_answer_only_exemplars_keep_question_and_final_answer(registered):
    """Multi-line questions (options lists) stay whole; the answer is the text after "So the answer is "."""
    assert [ex.answer for ex in registered.prompts["navigate"].exemplars] == ["No", "No", "Yes"]
    assert [ex.answer for ex in registered.prompts["object_counting"].exemplars] == ["6", "11", "8"]
    assert [ex.answer for ex in registered.prompts["word_sorting"].exemplars] == [
        "costume counterpart oven", "credulity hypochlorite phone ponderosa",
        "arson aspect census mugho newt parthia seismography"]
    navigate = registered.prompts["navigate"]
    assert navigate.exemplars[0].question.startswith("If you follow these instructions, do you return to the "
                                                     "starting point? Turn left. Turn around.")
    assert navigate.exemplars[0].question.endswith("Options:\n- Yes\n- No")
    direct = navigate.direct_prompt("QUESTION")
    assert direct.startswith("Given a series of navigation instructions, determine whether one would end up back "
                             "at the starting point.\n\nQ: If you follow these instructions")
    assert "\nOptions:\n- Yes\n- No\nA: No\n\nQ: " in direct and direct.endswith("\n\nQ: QUESTION\nA:")
    assert "step by step" not in direct


def test_prompt_files_without_canary_header_and_parse_errors(tmp_path):
    text = "Describe.\n\nQ: one?\nA: Let's think step by step.\nIt is one. So the answer is 1.\n\nQ: two?\nA: " \
           "Let's think step by step.\nSo the answer is (B)."
    assert bbh.strip_header(text) == text  # the repository before canary strings were added
    assert bbh.strip_header("canary GUID x\n-----\n" + text) == text
    parsed = bbh.parse_prompt(text)
    assert parsed.description == "Describe." and [e.answer for e in parsed.exemplars] == ["1", "(B)"]
    assert parsed.direct_prompt("three?") == "Describe.\n\nQ: one?\nA: 1\n\nQ: two?\nA: (B)\n\nQ: three?\nA:"
    with pytest.raises(bbh.BBHDataError, match=r"p\.txt: exemplar 2's reasoning has no 'So the answer is'"):
        bbh.parse_prompt(text.replace("So the answer is (B).", "B."), "p.txt")
    with pytest.raises(bbh.BBHDataError, match=r"p\.txt: exemplar 1 has no answer line"):
        bbh.parse_prompt("Q: one?\nA: 1", "p.txt")


# ------------------------------------------------------------------------------------------ scoring

def test_answer_extraction():
    # From the official code-davinci-002 CoT outputs: the answer is the text after the last phrase.
    assert metrics.bbh_answer("Plugging in A and B, we get: Z = A and B = False and True = False. So the answer is "
                              "False.", chain_of_thought=True) == "False"
    assert metrics.bbh_answer("So the answer is (A). Wait. So the answer is (C).\n\nQ: next question\nA: ... So the "
                              "answer is (D).", chain_of_thought=True) == "(C)"  # cut at the next question first
    assert metrics.bbh_answer(" So the answer is 1.5.", chain_of_thought=True) == "1.5"  # one final period only
    assert metrics.bbh_answer("  (B) because  ", chain_of_thought=True) == "(B) because"  # no phrase: whole text
    assert metrics.bbh_answer(" False\n\nQ: True is\nA: True", chain_of_thought=False) == "False"
    assert metrics.bbh_answer(" So the answer is No.", chain_of_thought=False) == "So the answer is No."
    # A vocabulary without newlines (T5) decodes the next question as " Q: ": an extra stop string cuts there.
    t5_style = "So the answer is Yes. Q: Is it? A: Let's think step by step. So the answer is No."
    assert metrics.bbh_answer(t5_style, chain_of_thought=True) == "No"
    assert metrics.bbh_answer(t5_style, chain_of_thought=True, stops=("\n\nQ:", " Q: ")) == "Yes"


def test_exact_match_and_task_average():
    assert metrics.strict_exact_match(["(A)", "False", "(B)", "8"], ["(A)", "false", "B", "8"]) == \
        {"exact_match": 50.0}
    results = {"bbhavg_navigate_direct": {"exact_match": 50.0, "num_examples": 250},
               "bbhavg_snarks_direct": {"exact_match": 80.0, "num_examples": 178},
               "quickstart_copy_words": {"exact_match": 10.0, "num_examples": 100},
               "all": {"exact_match": 62.5, "num_examples": 428}}
    assert bbh.bbh_average(results, prefix="bbhavg") == {"bbhavg_navigate_direct": 50.0,
                                                         "bbhavg_snarks_direct": 80.0, "average": 65.0}
    with pytest.raises(ValueError, match="No BBH task"):
        bbh.bbh_average({"all": {"exact_match": 1.0}})


def test_scoring_through_seqio_evaluator(registered):
    """Chosen generations go through seqio's decode -> postprocess (cut, extract) -> metric path. A byte
    vocabulary, so that newlines (the "\n\nQ:" stop) survive decoding."""
    flip = {"Yes": "No", "No": "Yes"}
    vocab = seqio.ByteVocabulary()
    bbh.register_bbh(BBH_DIR, tasks=["navigate"], vocabulary=vocab, prefix="bbhbytes")
    for name in ["bbhbytes_navigate_cot", "bbhbytes_navigate_direct"]:
        evaluator = seqio.Evaluator(name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
                                    eval_split="test", sequence_length={"inputs": 4096, "targets": 8},
                                    num_examples=4, use_memory_cache=True)
        targets = [t for _, t in _prompts(name)[:4]]
        if name.endswith("_cot"):  # 3 of 4 right: the wrong one answers with the other option
            generations = [f"Start. So the answer is {t}.\n\nQ: x So the answer is {flip[t]}." for t in targets[:3]]
            generations.append(f"So the answer is {flip[targets[3]]}.")
        else:
            generations = [f" {t}\n\nQ: more" for t in targets[:3]] + [flip[targets[3]]]

        tokens = [vocab.encode(g) + [vocab.eos_id] for g in generations]  # padded like a decode: ids, EOS, 0s
        tokens = [t + [0] * (max(map(len, tokens)) - len(t)) for t in tokens]

        def predict_fn(ds):
            return [(int(i), tokens[int(i)]) for i, _ in ds.as_numpy_iterator()]

        result = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)[0].result()
        assert result == {name: {"exact_match": 75.0}}


# ------------------------------------------------------------------------------------------ registration

def test_registration_names_mixtures_and_replacement(registered):
    assert registered.mixtures == {"cot": "bbh_cot", "direct": "bbh_direct"}
    assert registered.tasks["cot"] == [f"bbh_{t}_cot" for t in TASKS]
    assert sorted(t.name for t in seqio.get_mixture_or_task("bbh_direct").tasks) == \
        sorted(f"bbh_{t}_direct" for t in TASKS)
    assert seqio.get_mixture_or_task("bbh_navigate_cot").splits == ("test",)
    again = bbh.register_bbh(BBH_DIR, tasks=["navigate"], styles=("direct",), vocabulary=VOCAB, prefix="bbh2")
    assert again.tasks == {"direct": ["bbh2_navigate_direct"]} and again.mixtures == {"direct": "bbh2_direct"}
    bbh.register_bbh(BBH_DIR, tasks=["navigate"], styles=("direct",), vocabulary=VOCAB, prefix="bbh2")  # replaces
    with pytest.raises(ValueError, match="use 'cot' and / or 'direct'"):
        bbh.register_bbh(BBH_DIR, styles=("fewshot",), vocabulary=VOCAB)


def test_all_shared_tasks_register_by_default():
    reg = bbh.register_bbh(BBH_DIR, styles=("direct",), vocabulary=VOCAB, prefix="bbhall")
    assert len(reg.tasks["direct"]) == len(os.listdir(os.path.join(BBH_DIR, "bbh"))) == 13


def test_registration_from_gin():
    gin.parse_config([
        "import itjax.tasks.bbh",
        f"register_bbh.data_dir = '{BBH_DIR}'",
        "register_bbh.tasks = ['navigate']",
        "register_bbh.prefix = 'bbhgin'",
        "EVAL_MIXTURE = @bbh_mixture()",
        "bbh_mixture.style = 'cot'",
    ])
    assert gin.query_parameter("%EVAL_MIXTURE").scoped_configurable_fn() == "bbhgin_cot"
    assert [t.name for t in seqio.get_mixture_or_task("bbhgin_cot").tasks] == ["bbhgin_navigate_cot"]


def test_missing_or_malformed_files_name_the_file(tmp_path):
    shutil.copytree(BBH_DIR, tmp_path / "bbh_copy")
    root = tmp_path / "bbh_copy"
    os.remove(root / "cot-prompts" / "navigate.txt")
    with pytest.raises(bbh.BBHDataError, match=r"cot-prompts/navigate\.txt does not exist"):
        bbh.register_bbh(str(root), vocabulary=VOCAB)
    with pytest.raises(bbh.BBHDataError, match=r"bbh/missing_task\.json does not exist"):
        bbh.register_bbh(BBH_DIR, tasks=["missing_task"], vocabulary=VOCAB)
    (root / "bbh" / "navigate.json").write_text(json.dumps({"examples": [{"input": "q"}]}))
    with pytest.raises(bbh.BBHDataError, match=r"navigate\.json: example 0 has no string 'target' field"):
        bbh.register_bbh(str(root), tasks=["navigate"], vocabulary=VOCAB)
    with pytest.raises(bbh.BBHDataError, match="must be a BIG-Bench-Hard checkout"):
        bbh.register_bbh(str(tmp_path), vocabulary=VOCAB)


def test_long_prompt_is_an_error_naming_task_and_length(registered):
    longest = max(len(VOCAB.encode(p)) for p, _ in _prompts("bbh_object_counting_direct")) + 1  # + EOS
    with pytest.raises(PromptTooLongError, match=rf"'bbh_object_counting_direct'.*set TASK_FEATURE_LENGTHS\['inputs'\]"
                                                 rf" to at least {longest}\."):
        _prompts("bbh_object_counting_direct", {"inputs": longest - 1, "targets": 8})
    rows = _prompts("bbh_object_counting_direct", {"inputs": longest, "targets": 8})  # fits exactly: not cut
    task = seqio.get_mixture_or_task("bbh_object_counting_direct")
    tokens = [len(ex["inputs"]) for ex in task.get_dataset({"inputs": longest, "targets": 8}, split="test",
                                                             shuffle=False).as_numpy_iterator()]
    assert len(rows) == 250 and max(tokens) == longest and np.all(np.array(tokens) <= longest)


def test_decode_length_check(registered):
    bbh.check_decode_length("bbh_cot", bbh.MIN_COT_DECODE_LENGTH)
    bbh.check_decode_length("bbh_direct", 8)  # answer-only tasks need no long decode
    with pytest.raises(ValueError, match=r"'bbh_cot' has 4 BBH chain-of-thought task.*decode length is 128 "
                                         r"tokens.*at least 256"):
        bbh.check_decode_length("bbh_cot", 128)


def test_check_script_against_official_output_files(tmp_path, capsys):
    """scripts/check_bbh_prompts.py on a checkout whose official outputs file holds two navigate examples: one
    prompt as itjax builds it and one not, one generation right and one wrong (published accuracy 50)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("check_bbh_prompts",
                                                  os.path.join(REPO_ROOT, "scripts", "check_bbh_prompts.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = tmp_path / "BIG-Bench-Hard"
    for folder in ("bbh", "cot-prompts"):
        (root / folder).mkdir(parents=True)
        shutil.copy(os.path.join(BBH_DIR, folder, "navigate" + (".json" if folder == "bbh" else ".txt")),
                    root / folder)
    prompt = bbh.read_prompt_file(str(root / "cot-prompts" / "navigate.txt"))
    examples = bbh.read_examples(str(root / "bbh" / "navigate.json"))[:2]
    (root / "bbh" / "navigate.json").write_text(json.dumps({"examples": examples}))
    out = root / script.OUTPUTS / "code-davinci-002-cot"
    out.mkdir(parents=True)
    wrong = {"Yes": "No", "No": "Yes"}[examples[1]["target"]]
    outputs = [{"input": prompt.cot_prompt(examples[0]["input"]), "target": examples[0]["target"],
                "prediction": f"Reasons. So the answer is {examples[0]['target']}."},
               {"input": "an older prompt", "target": examples[1]["target"], "prediction": f"So the answer is {wrong}."}]
    (out / "navigate_few_shot_template_0-255000.json").write_text(json.dumps({"outputs": outputs}))
    (out / "navigate_few_shot_template_0-255000_eval_metrics.jsonl").write_text('{"accuracy": 50.0}\n')
    assert script.check(str(root)) == 0
    printed = capsys.readouterr().out
    assert "navigate" in printed and "prompts identical   1/  2   accuracy  50.00 (published  50.00)" in printed
    assert "no official outputs file" in printed  # the direct style has none here
    (out / "navigate_few_shot_template_0-255000_eval_metrics.jsonl").write_text('{"accuracy": 100.0}\n')
    assert script.check(str(root)) == 1
