"""Procedural instruction tasks in the Super-NaturalInstructions task-file format (the quickstart data).

Every task is a small, deterministic function of a short input built from a fixed pool of words and digits,
so a ~1-3M parameter T5 trained from scratch on 2 CPU cores learns all of them in a few hundred steps:
outputs are token-level functions of the input (copy, reverse, map each word to its UPPER / Capitalised /
vowel-less form, pick, count, compare), and the quickstart vocabulary holds every word form as one piece.

Each task is one dict with exactly the keys of an upstream `tasks/<name>.json` file ("Contributors", "Source",
"URL", "Categories", "Reasoning", "Definition", "Input_language", "Output_language", "Instruction_language",
"Domains", "Positive Examples", "Negative Examples", "Instances", "Instance License"). Upstream synthetic tasks
have `"URL": [NaN]`, which strict JSON parsers reject; these files use `"URL": []` instead.

Split rule (the SuperNI convention for evaluation tasks, whose first 100 instances are the evaluation set):
`Instances[:NUM_VALIDATION]` is the "validation" split, the rest is "train". Inputs are unique within a task
and never equal a positive or negative example's input, so no input is in both splits.

Entry points: `generate_tasks(seed)` -> {task name: task dict}, `write_tasks(out_dir, seed)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Callable, Sequence

QUICKSTART_SEED = 0
NUM_INSTANCES = 1100  # per task, validation included
NUM_VALIDATION = 100  # Instances[:100] -> "validation", Instances[100:] -> "train"
SPLITS = ("train", "validation")

# 40 short lowercase words. Their vowel-less forms are pairwise distinct and non-empty, and no form of one
# word equals a form of another, so every task answer is unambiguous.
WORDS = (
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "cake", "milk", "rain",
    "snow", "wind", "star", "book", "door", "lamp", "ship", "frog", "king", "rose",
    "gold", "salt", "bell", "desk", "coin", "leaf", "nest", "road", "sand", "wolf",
    "bear", "hill", "lake", "corn", "rice", "duck", "goat", "kite", "ring", "boat",
)
DIGITS = tuple(str(d) for d in range(10))
NUMBER_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VOWELS = frozenset("aeiou")


def remove_vowels(word: str) -> str:
    """'frog' -> 'frg' (a, e, i, o, u removed; 'y' is kept, as in SuperNI task365)."""
    return "".join(ch for ch in word if ch not in VOWELS)


def word_forms() -> list[str]:
    """Every surface form the word tasks use (lower, UPPER, Capitalised, vowel-less), in a fixed order.

    The quickstart vocabulary must hold each of these as a single piece.
    """
    forms = []
    for transform in (str.lower, str.upper, str.capitalize, remove_vowels):
        forms.extend(transform(w) for w in WORDS)
    return list(dict.fromkeys(forms))  # dedupe, keep order


# ----------------------------------------------------------------------------------------------------------
# Input samplers. Each gets the task's RNG and the instance index (used to balance classification labels).

def _words(rng: random.Random, low: int, high: int) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def _word_list_sampler(low: int, high: int) -> Callable[[random.Random, int], str]:
    return lambda rng, index: " ".join(_words(rng, low, high))


def _digit_list_sampler(low: int, high: int) -> Callable[[random.Random, int], str]:
    return lambda rng, index: " ".join(rng.choice(DIGITS) for _ in range(rng.randint(low, high)))


def _sample_number(rng: random.Random, index: int) -> str:
    """A 2-4 digit number; even for even `index`, odd otherwise (balanced labels in every split)."""
    num_digits = rng.randint(2, 4)
    value = rng.randrange(10 ** (num_digits - 1), 10**num_digits)
    return str(value - (value % 2) + (index % 2))


def _sample_membership(rng: random.Random, index: int) -> str:
    """'List: dog sun cat. Word: cat'; the word is in the list for even `index` (balanced yes / no)."""
    words = rng.sample(WORDS, rng.randint(4, 6))
    listed, absent = words[:-1], words[-1]
    query = rng.choice(listed) if index % 2 == 0 else absent
    return f"List: {' '.join(listed)}. Word: {query}"


# ----------------------------------------------------------------------------------------------------------
# Solvers: input string -> list of acceptable outputs (the first is the training target).

def _map_words(fn: Callable[[str], str]) -> Callable[[str], list[str]]:
    return lambda text: [" ".join(fn(w) for w in text.split())]


def _count_words(text: str) -> list[str]:
    n = len(text.split())
    return [str(n), NUMBER_NAMES[n]]


def _largest_digit(text: str) -> list[str]:
    d = max(int(x) for x in text.split())
    return [str(d), NUMBER_NAMES[d]]


def _parity(text: str) -> list[str]:
    return ["even" if int(text) % 2 == 0 else "odd"]


def _membership(text: str) -> list[str]:
    listed, query = text.removeprefix("List: ").split(". Word: ")
    return ["yes" if query in listed.split() else "no"]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One procedural task: its SuperNI metadata, an input sampler, a solver and hand-written examples."""

    number: int  # SuperNI-style id: task<number>_<short_name>
    short_name: str
    definition: str
    sample: Callable[[random.Random, int], str]
    solve: Callable[[str], list[str]]
    positive: Sequence[tuple[str, str]]  # (input, explanation); outputs come from `solve`
    negative: tuple[str, str, str]  # (input, wrong output, explanation)
    categories: Sequence[str] = ("Program Execution",)
    reasoning: Sequence[str] = ()
    domains: Sequence[str] = ("Code",)

    @property
    def name(self) -> str:
        return f"task{self.number}_{self.short_name}"


_WORD_LIST = "In this task, you are given a list of words."
_DIGIT_LIST = "In this task, you are given a list of digits."
_COUNTING = ("Numerical Reasoning", "Mathematics -> Counting")
_ARITHMETIC = ("Numerical Reasoning", "Mathematics -> Arithmetic")

TASK_SPECS: tuple[TaskSpec, ...] = (
    TaskSpec(
        9001, "copy_words", f"{_WORD_LIST} Copy the words exactly as they are.",
        _word_list_sampler(2, 4), _map_words(lambda w: w),
        [("cat dog sun", "The words are copied in the same order."),
         ("tree rain book milk", "Every word is written again, unchanged.")],
        ("fish star bell", "fish bell", "The word star is missing from the output."),
    ),
    TaskSpec(
        9002, "reverse_words", f"{_WORD_LIST} Write the words in reverse order.",
        _word_list_sampler(2, 4), lambda text: [" ".join(reversed(text.split()))],
        [("cat dog sun", "The last word comes first and the first word comes last."),
         ("tree rain book milk", "The four words are written from the last to the first.")],
        ("fish star bell", "fish star bell", "The words are in the original order, not reversed."),
    ),
    TaskSpec(
        9003, "uppercase_words", f"{_WORD_LIST} Write every word in upper case letters.",
        _word_list_sampler(2, 4), _map_words(str.upper),
        [("cat dog sun", "Every letter of every word is upper case."),
         ("tree rain book milk", "All four words are written in capital letters.")],
        ("fish star bell", "Fish Star Bell", "Only the first letter of each word is upper case."),
    ),
    TaskSpec(
        9004, "capitalize_words", f"{_WORD_LIST} Capitalize the first letter of every word.",
        _word_list_sampler(2, 4), _map_words(str.capitalize),
        [("cat dog sun", "Each word starts with a capital letter."),
         ("tree rain book milk", "The first letter of each word is upper case, the rest is lower case.")],
        ("fish star bell", "FISH STAR BELL", "All letters are upper case, not only the first one."),
    ),
    TaskSpec(
        9005, "first_word", f"{_WORD_LIST} Return only the first word of the list.",
        _word_list_sampler(2, 5), lambda text: [text.split()[0]],
        [("cat dog sun", "The list starts with cat."),
         ("tree rain book milk", "The first word of the list is tree.")],
        ("fish star bell", "bell", "bell is the last word, not the first."),
    ),
    TaskSpec(
        9006, "last_word", f"{_WORD_LIST} Return only the last word of the list.",
        _word_list_sampler(2, 5), lambda text: [text.split()[-1]],
        [("cat dog sun", "The list ends with sun."),
         ("tree rain book milk", "The last word of the list is milk.")],
        ("fish star bell", "fish", "fish is the first word, not the last."),
    ),
    TaskSpec(
        9007, "count_words", f"{_WORD_LIST} Count the words and answer with a number.",
        _word_list_sampler(2, 6), _count_words,
        [("cat dog sun", "There are three words in the list."),
         ("tree rain book milk", "The list has four words.")],
        ("fish star bell", "2", "The list has three words, not two."),
        reasoning=_COUNTING, domains=("Code", "Mathematics"),
    ),
    TaskSpec(
        9008, "remove_vowels", f"{_WORD_LIST} Remove the vowels a, e, i, o and u from every word.",
        _word_list_sampler(2, 4), _map_words(remove_vowels),
        [("cat dog sun", "The vowels a, o and u are removed."),
         ("tree rain book milk", "Every vowel is removed and the consonants stay in order.")],
        ("fish star bell", "i a e", "The output keeps the vowels instead of removing them."),
    ),
    TaskSpec(
        9009, "duplicate_words", f"{_WORD_LIST} Write every word twice, keeping the order of the list.",
        _word_list_sampler(2, 3), _map_words(lambda w: f"{w} {w}"),
        [("cat dog sun", "Each word is written two times in a row."),
         ("tree rain", "tree and rain are each repeated once.")],
        ("fish star bell", "fish star bell fish star bell", "The whole list is repeated instead of each word."),
    ),
    TaskSpec(
        9010, "first_two_digits", f"{_DIGIT_LIST} Return the first two digits of the list.",
        _digit_list_sampler(3, 5), lambda text: [" ".join(text.split()[:2])],
        [("3 8 1 9", "The list starts with 3 and 8."),
         ("5 0 7 2 6", "The first two digits are 5 and 0.")],
        ("4 1 9 2", "9 2", "These are the last two digits, not the first two."),
        domains=("Mathematics",),
    ),
    TaskSpec(
        9011, "last_two_digits", f"{_DIGIT_LIST} Return the last two digits of the list.",
        _digit_list_sampler(3, 5), lambda text: [" ".join(text.split()[-2:])],
        [("3 8 1 9", "The list ends with 1 and 9."),
         ("5 0 7 2 6", "The last two digits are 2 and 6.")],
        ("4 1 9 2", "4 1", "These are the first two digits, not the last two."),
        domains=("Mathematics",),
    ),
    TaskSpec(
        9012, "largest_digit", f"{_DIGIT_LIST} Return the largest digit in the list.",
        _digit_list_sampler(3, 5), _largest_digit,
        [("3 8 1 9", "9 is larger than 3, 8 and 1."),
         ("5 0 7 2 6", "7 is the largest digit of the list.")],
        ("4 1 9 2", "1", "1 is the smallest digit, not the largest."),
        reasoning=_ARITHMETIC, domains=("Mathematics",),
    ),
    TaskSpec(
        9013, "even_or_odd",
        'In this task, you are given a number. Answer "even" if the number is even and "odd" if it is odd.',
        _sample_number, _parity,
        [("48", "48 ends with 8, so it is even."),
         ("715", "715 ends with 5, so it is odd.")],
        ("36", "odd", "36 can be divided by 2, so it is even."),
        categories=("Mathematics",), reasoning=_ARITHMETIC, domains=("Mathematics",),
    ),
    TaskSpec(
        9014, "contains_word",
        'In this task, you are given a list of words and a word. Answer "yes" if the word is in the list '
        'and "no" if it is not.',
        _sample_membership, _membership,
        [("List: cat dog sun. Word: dog", "dog is the second word of the list."),
         ("List: tree rain book milk. Word: star", "star does not appear in the list.")],
        ("List: fish star bell. Word: bell", "no", "bell is the last word of the list, so the answer is yes."),
        reasoning=("Reasoning on Strings",),
    ),
)


def task_names() -> list[str]:
    """SuperNI-style names of all generated tasks, e.g. 'task9001_copy_words'."""
    return [spec.name for spec in TASK_SPECS]


def _instance_id(spec: TaskSpec, rng: random.Random) -> str:
    return f"task{spec.number}-{rng.getrandbits(128):032x}"  # upstream style: task365-<32 hex digits>


def _instances(spec: TaskSpec, seed: int, reserved: set[str]) -> list[dict]:
    """NUM_INSTANCES instances with unique inputs, none of them in `reserved` (the example inputs)."""
    rng = random.Random(f"{seed}/{spec.name}/inputs")  # str seeds hash with sha512: stable across runs
    id_rng = random.Random(f"{seed}/{spec.name}/ids")
    seen = set(reserved)
    instances = []
    attempts = 0
    while len(instances) < NUM_INSTANCES:
        attempts += 1
        if attempts > 100 * NUM_INSTANCES:
            raise RuntimeError(f"{spec.name}: cannot draw {NUM_INSTANCES} distinct inputs; widen its sampler.")
        text = spec.sample(rng, len(instances))
        if text in seen:
            continue
        seen.add(text)
        instances.append({"id": _instance_id(spec, id_rng), "input": text, "output": spec.solve(text)})
    return instances


def build_task(spec: TaskSpec, seed: int) -> dict:
    """The SuperNI task dict of one spec (keys in upstream order)."""
    positive = [{"input": text, "output": spec.solve(text)[0], "explanation": why} for text, why in spec.positive]
    neg_input, neg_output, neg_why = spec.negative
    if neg_output in spec.solve(neg_input):
        raise AssertionError(f"{spec.name}: the negative example's output {neg_output!r} is actually correct.")
    negative = [{"input": neg_input, "output": neg_output, "explanation": neg_why}]
    reserved = {ex["input"] for ex in positive + negative}
    return {
        "Contributors": ["itjax"],
        "Source": ["synthetic"],
        "URL": [],
        "Categories": list(spec.categories),
        "Reasoning": list(spec.reasoning),
        "Definition": [spec.definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": list(spec.domains),
        "Positive Examples": positive,
        "Negative Examples": negative,
        "Instances": _instances(spec, seed, reserved),
        "Instance License": ["Apache 2.0"],
    }


def generate_tasks(seed: int = QUICKSTART_SEED) -> dict[str, dict]:
    """All tasks as {'task9001_copy_words': task dict, ...}; the same seed always gives the same dicts."""
    return {spec.name: build_task(spec, seed) for spec in TASK_SPECS}


def split_instances(instances: Sequence[dict], split: str) -> list[dict]:
    """The instances of `split` under the rule above: the first NUM_VALIDATION are 'validation'."""
    if split == "validation":
        return list(instances[:NUM_VALIDATION])
    if split == "train":
        return list(instances[NUM_VALIDATION:])
    raise ValueError(f"Unknown split {split!r}; the quickstart tasks have splits {SPLITS}.")


def dumps_task(task: dict) -> str:
    """Serialises a task like the shared SuperNI sample: UTF-8 text, indent 1, trailing newline."""
    return json.dumps(task, ensure_ascii=False, indent=1) + "\n"


def write_tasks(out_dir: str, seed: int = QUICKSTART_SEED) -> list[str]:
    """Writes `<out_dir>/<task name>.json` for every task; returns the paths in TASK_SPECS order."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, task in generate_tasks(seed).items():
        path = os.path.join(out_dir, f"{name}.json")
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(dumps_task(task))
        paths.append(path)
    return paths
