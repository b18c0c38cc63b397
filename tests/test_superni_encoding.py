"""The Tk-Instruct encoding against strings derived by hand from Tk-Instruct's src/ni_collator.py, and the
task-file loader's errors."""

import copy
import glob
import json
import os

import pytest

from itjax.data import superni

TOY_TASK = {
    "Task": "task001_toy",
    "Definition": ["Reverse the words"],  # no final punctuation: the collator appends '.'
    "Positive Examples": [
        {"input": "a b", "output": "b a", "explanation": "Reversed"},
        {"input": " x y z? ", "output": "z y x!", "explanation": "Also reversed."},  # stripped, no '.' added
        {"input": "m n", "output": "n m", "explanation": "Third"},
    ],
    "Negative Examples": [{"input": "c d", "output": "c d", "explanation": "Not reversed"}],
    "Instances": [{"id": "task001-1", "input": "  p q  ", "output": ["q p"]}],
}
INSTANCE = TOY_TASK["Instances"][0]

DEFINITION = "Definition: Reverse the words.\n\n"
POS_1 = " Positive Example 1 -\nInput: a b.\n Output: b a.\n\n"
POS_2 = " Positive Example 2 -\nInput: x y z?\n Output: z y x!\n\n"
POS_3 = " Positive Example 3 -\nInput: m n.\n Output: n m.\n\n"
QUERY = "Now complete the following example -\nInput: p q.\nOutput: "


def words_plus_eos(text):
    """A stand-in tokenizer: one token per whitespace-separated word, plus EOS."""
    return len(text.split()) + 1


def test_default_is_definition_plus_two_positive_examples():
    expected = (
        "Definition: Reverse the words.\n\n"
        " Positive Example 1 -\nInput: a b.\n Output: b a.\n\n"
        " Positive Example 2 -\nInput: x y z?\n Output: z y x!\n\n"
        "Now complete the following example -\nInput: p q.\nOutput: "
    )
    assert superni.encode_tk_instruct(TOY_TASK, INSTANCE) == expected


def test_input_only_baseline():
    source = superni.encode_tk_instruct(TOY_TASK, INSTANCE, **superni.ENCODINGS["input_only"])
    assert source == "Now complete the following example -\nInput: p q.\nOutput: "


def test_task_name_explanations_and_negative_examples():
    source = superni.encode_tk_instruct(
        TOY_TASK, INSTANCE, add_task_name=True, num_pos_examples=1, num_neg_examples=2, add_explanation=True
    )
    assert source == (
        "task001_toy. Definition: Reverse the words.\n\n"
        " Positive Example 1 -\nInput: a b.\n Output: b a.\n Explanation: Reversed.\n\n"
        " Negative Example 1 -\nInput: c d.\n Output: c d.\n Explanation: Not reversed.\n\n"
        "Now complete the following example -\nInput: p q.\nOutput: "
    )


def test_definition_as_plain_string_and_empty_input():
    task = dict(TOY_TASK, Definition="Say it!")
    source = superni.encode_tk_instruct(task, {"input": "", "output": ["x"]}, num_pos_examples=0)
    assert source == "Definition: Say it!\n\nNow complete the following example -\nInput: .\nOutput: "


def test_max_source_length_drops_examples_that_do_not_fit():
    # Word counts: definition 4, POS_1 10, POS_2 12, query 10, EOS 1.
    # Check for example 1: 4 + 10 + 10 + 1 = 25; check for example 2: 4 + 10 + 12 + 10 + 1 = 37.
    def encode(max_len):
        return superni.encode_tk_instruct(
            TOY_TASK, INSTANCE, max_source_length=max_len, count_tokens=words_plus_eos
        )

    assert encode(37) == DEFINITION + POS_1 + POS_2 + QUERY
    assert encode(36) == DEFINITION + POS_1 + QUERY
    assert encode(25) == DEFINITION + POS_1 + QUERY
    assert encode(24) == DEFINITION + QUERY  # too long already: kept whole when no truncate is given


def test_length_check_joins_examples_with_a_space_like_the_collator():
    # The collator checks `definition + " ".join(examples) + new + query` but emits "".join(examples): with
    # a character tokenizer the check for example 3 sees one extra space, so a budget that exactly fits the
    # three-example prompt still drops example 3.
    three = DEFINITION + POS_1 + POS_2 + POS_3 + QUERY
    source = superni.encode_tk_instruct(
        TOY_TASK, INSTANCE, num_pos_examples=3, max_source_length=len(three) + 1, count_tokens=lambda t: len(t) + 1
    )
    assert source == DEFINITION + POS_1 + POS_2 + QUERY
    source = superni.encode_tk_instruct(
        TOY_TASK, INSTANCE, num_pos_examples=3, max_source_length=len(three) + 2, count_tokens=lambda t: len(t) + 1
    )
    assert source == three


def test_task_name_is_not_counted_when_adding_examples_but_is_truncated():
    source = superni.encode_tk_instruct(
        TOY_TASK,
        INSTANCE,
        add_task_name=True,
        num_pos_examples=1,
        max_source_length=25,  # fits definition + POS_1 + query (25) but not with the task name (26)
        count_tokens=words_plus_eos,
        truncate=lambda text, n: " ".join(text.split()[:n]),
    )
    assert source == "task001_toy. Definition: Reverse the words. Positive Example 1 - Input: a b. Output: b a. " + (
        "Now complete the following example - Input: p q. Output:"  # 25 words: the EOS no longer fits
    )


def test_max_source_length_needs_a_token_counter():
    with pytest.raises(ValueError, match="count_tokens"):
        superni.encode_tk_instruct(TOY_TASK, INSTANCE, max_source_length=10)


def test_seqio_length_fns_count_eos():
    class FakeVocabulary:
        def encode(self, text):
            return list(range(len(text.split())))

        def decode(self, ids):
            return " ".join("w" for _ in ids)

    fns = superni.seqio_length_fns(FakeVocabulary())
    assert fns["count_tokens"]("a b c") == 4
    assert fns["truncate"]("a b c", 2) == "w w"


# ----------------------------------------------------------------------------------------------------------
# Loading task files.


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode("utf-8"))
    return str(path)


def test_load_task_adds_the_task_name(tmp_path):
    task = {k: v for k, v in TOY_TASK.items() if k != "Task"}
    loaded = superni.load_task(write(tmp_path, "task001_toy.json", task))
    assert loaded["Task"] == "task001_toy"
    assert superni.encode_tk_instruct(loaded, loaded["Instances"][0], add_task_name=True).startswith("task001_toy. ")


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda t: t.pop("Definition"), 'key "Definition" is missing'),
        (lambda t: t.pop("Positive Examples"), 'key "Positive Examples" is missing'),
        (lambda t: t.update(Instances=[]), '"Instances" is empty'),
        (lambda t: t["Instances"][0].pop("output"), '"Instances"[0]["output"] is missing'),
        (lambda t: t["Instances"][0].update(output="q p"), '"Instances"[0]["output"] must be a non-empty list'),
        (lambda t: t["Positive Examples"][1].pop("input"), '"Positive Examples"[1]["input"] is missing'),
    ],
)
def test_malformed_task_names_file_and_key(tmp_path, mutate, key):
    task = copy.deepcopy(TOY_TASK)
    mutate(task)
    path = write(tmp_path, "task002_bad.json", task)
    with pytest.raises(superni.SuperNITaskError) as error:
        superni.load_task(path)
    assert path in str(error.value) and key in str(error.value)


def test_not_utf8_or_not_json(tmp_path):
    path = write(tmp_path, "latin1.json", '{"Definition": ["café"]}'.encode("latin-1"))
    with pytest.raises(superni.SuperNITaskError, match="latin1.json: not UTF-8"):
        superni.load_task(path)
    path = write(tmp_path, "broken.json", b'{"Definition": ')
    with pytest.raises(superni.SuperNITaskError, match="broken.json: not valid JSON"):
        superni.load_task(path)
    with pytest.raises(superni.SuperNITaskError, match="cannot read"):
        superni.load_task(str(tmp_path / "missing.json"))


SHARED_TASKS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superni", "tasks")


@pytest.mark.skipif(not os.path.isdir(SHARED_TASKS), reason="needs ../shared/data/superni (CI has it)")
def test_real_superni_files_load_and_encode():
    for path in sorted(glob.glob(os.path.join(SHARED_TASKS, "*.json"))):
        task = superni.load_task(path)
        source = superni.encode_tk_instruct(task, task["Instances"][0])
        assert source.startswith("Definition: ") and source.endswith("\nOutput: ")
