"""`python -m itjax.data show|stats` on the built-in quickstart mixture, a chat task and a P3 rank-classification
task; unknown names give the near-match error."""

import math
import os
import runpy
import sys

import numpy as np
import pytest
import seqio

from itjax.data import __main__ as cli
from itjax.data import chat as chat_lib
from itjax.tasks import chat, p3, quickstart

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES_DIR = os.path.join(REPO_ROOT, os.pardir, "shared", "data", "promptsource", "templates")
VOCAB = quickstart.get_vocabulary()

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "Copy the words"}, {"role": "assistant", "content": "the words"}]},
    {"messages": [{"role": "user", "content": "Write the first word"}, {"role": "assistant", "content": "word"}]},
    {"messages": [{"role": "system", "content": "Return the first digit"}, {"role": "user", "content": "1 2 3"},
                  {"role": "assistant", "content": "1"}]},
    {"messages": [{"role": "user", "content": "Reverse the list of words"},
                  {"role": "assistant", "content": "words of list the Reverse"},
                  {"role": "user", "content": "Copy the list"}, {"role": "assistant", "content": "the list"}]},
]


def _nearest_rank(values, p):
    ordered = sorted(values)
    return ordered[math.ceil(p / 100 * len(ordered)) - 1]


def _first(name, split):
    task = seqio.get_mixture_or_task(name)
    return next(task.get_dataset(None, split=split, shuffle=False).as_numpy_iterator())


def test_show_quickstart_mixture(capsys):
    assert cli.main(["show", "quickstart", "--split", "validation", "--num", "1", "--num_tasks", "2",
                     "--gin_file", "quickstart.gin"]) == 0
    out = capsys.readouterr().out
    assert "mixture 'quickstart': 14 tasks; showing 2" in out
    assert out.count("=== quickstart_") == 2
    ex = _first("quickstart_capitalize_words", "validation")
    block = out.split("=== quickstart_capitalize_words [validation] example 0 ===\n")[1].split("===")[0]
    text = "\n".join("    " + line for line in ex["inputs_pretokenized"].decode().splitlines())
    assert text in block
    ids = ex["inputs"].tolist()
    assert f"  inputs: {len(ids)} tokens, feature length 112\n    ids:    {ids}\n" in block  # quickstart.gin lengths
    assert str([VOCAB.tokenizer.id_to_piece(i) for i in ex["targets"].tolist()]) in block
    assert "task_name=task9004_capitalize_words" in block


def test_stats_quickstart_from_the_gin_lengths(capsys):
    assert cli.main(["stats", "--gin_file", "quickstart.gin", "--split", "validation", "--num_examples", "20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("quickstart [validation]: 14 task(s), first 20 examples per task; feature lengths "
                          "{'inputs': 112, 'targets': 8}")
    task = seqio.get_mixture_or_task("quickstart_count_words")
    lengths = [len(ex["inputs"]) for ex in task.get_dataset(None, split="validation", shuffle=False)
               .take(20).as_numpy_iterator()]
    (line,) = [l for l in out.splitlines() if l.startswith("quickstart_count_words ")]
    cells = line.split()
    assert cells[1:3] == ["20", "inputs"]
    assert [int(c) for c in cells[3:8]] == [_nearest_rank(lengths, p) for p in (50, 90, 95, 99)] + [max(lengths)]
    assert cells[8] == "0.0%"
    (all_line,) = [l for l in out.splitlines() if l.startswith("all ")]
    assert all_line.split()[1] == "280"


@pytest.fixture(scope="module")
def chat_task():
    chat.register_chat_task("test_cli_chat", {"train": CONVERSATIONS}, format="messages", vocabulary=VOCAB)
    return [len(chat_lib.tokenize_conversation(chat_lib.parse_record(r, "messages"), VOCAB)[0])
            for r in CONVERSATIONS]


def test_stats_and_show_of_a_chat_task(chat_task, capsys):
    lengths = chat_task
    limit = sorted(lengths)[-2]  # exactly one conversation is longer: 25% truncated
    per_task = cli.stats("test_cli_chat", feature_lengths={"targets": limit})
    out = capsys.readouterr().out
    assert per_task["test_cli_chat"]["targets"] == lengths
    (line,) = [l for l in out.splitlines()[1:] if l.startswith("test_cli_chat ")]
    assert line.split()[1:] == ["4", "targets"] + [str(_nearest_rank(lengths, p)) for p in (50, 90, 95, 99)] + \
        [str(max(lengths)), "25.0%"]

    assert cli.main(["show", "test_cli_chat", "--num", "4", "--feature_lengths", f"targets={limit}"]) == 0
    out = capsys.readouterr().out
    assert "targets_loss_mask" in out and out.count("TRUNCATED in training") == 1
    assert "carry loss: 'words of list the Reverse' | 'the list'" in out
    assert "<|system|>\n    Return the first digit" in out  # the rendered conversation text, indented


def test_show_a_p3_rank_classification_task(capsys):
    records = [{"premise": "The cat sat.", "hypothesis": "A cat sat.", "idx": 0, "label": 0}]
    p3.register_p3("super_glue", "rte", {"validation": records}, templates_dir=TEMPLATES_DIR, vocabulary=VOCAB,
                   template_names=["GPT-3 style"])
    cli.show("super_glue_rte_GPT_3_style_score_eval", split="validation", num=2)
    out = capsys.readouterr().out
    assert out.count("=== super_glue_rte_GPT_3_style_score_eval [validation]") == 2
    assert "idx=[0, 1], is_correct=False" in out and "  targets (text):\n    True\n" in out
    assert cli.main(["stats", "super_glue_rte_GPT_3_style_score_eval"]) == 2  # no train split
    assert "has no split 'train'" in capsys.readouterr().err


def test_unknown_name_gives_the_near_match_error(capsys, monkeypatch):
    assert cli.main(["stats", "quickstart_copy_wrds"]) == 2
    assert "Did you mean: quickstart_copy_words" in capsys.readouterr().err
    assert cli.main(["show"]) == 2
    assert "name a task or mixture" in capsys.readouterr().err
    with pytest.raises(Exception, match="--feature_lengths='inputs:3'"):
        cli.parse_feature_lengths("inputs:3")
    # The module entry point itself (`python -m itjax.data`), run in this process.
    monkeypatch.setattr(sys, "argv", ["python -m itjax.data", "show", "quickstrat"])
    monkeypatch.delitem(sys.modules, "itjax.data.__main__")  # runpy executes a fresh copy as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("itjax.data", run_name="__main__")
    assert exit_info.value.code == 2 and "Did you mean: quickstart" in capsys.readouterr().err
    assert np.isnan(cli.length_stats([], 3)["max"])
