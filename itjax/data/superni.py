"""Super-NaturalInstructions task files and the Tk-Instruct prompt encoding.

`load_task(path)` reads one `tasks/<name>.json` file of the allenai/natural-instructions release (or a file
of the same format, e.g. the quickstart tasks) and checks the keys the encoding and evaluation use.

`encode_tk_instruct(task, instance, ...)` renders the model input exactly like the `DataCollatorForNI` of
Tk-Instruct (yizhongw/Tk-Instruct, `src/ni_collator.py`), including its quirks:

* a '.' is appended to the definition, example inputs/outputs/explanations and the instance input when they
  do not already end in punctuation (`string.punctuation`);
* examples are rendered as " Positive Example k -\\nInput: ...\\n Output: ...\\n\\n" (note the leading spaces);
* the instance comes last: "Now complete the following example -\\nInput: ...\\nOutput: ";
* with `max_source_length`, positive and then negative examples are added one by one only while the
  tokenized text still fits; the collator measures `definition + " ".join(examples so far) + new example +
  instance` (examples joined with a space and without the task name) but the final prompt joins them with "";
* a prompt that is still too long is cut to `max_source_length` tokens and decoded back to text.

The collator measures lengths with a HF tokenizer call, whose ids include the EOS token for T5 tokenizers;
`seqio_length_fns(vocabulary)` gives the same count (and the cut) for a seqio vocabulary.
"""

from __future__ import annotations

import json
import os
import string
from typing import Any, Callable, Mapping, Optional

ENCODINGS: dict[str, dict[str, Any]] = {
    # Instruction encodings compared in the Tk-Instruct paper (Wang et al., 2022).
    "input_only": dict(add_task_definition=False, num_pos_examples=0, num_neg_examples=0, add_explanation=False),
    "def": dict(add_task_definition=True, num_pos_examples=0, num_neg_examples=0, add_explanation=False),
    "pos_2": dict(add_task_definition=False, num_pos_examples=2, num_neg_examples=0, add_explanation=False),
    "def_pos_2": dict(add_task_definition=True, num_pos_examples=2, num_neg_examples=0, add_explanation=False),
    "def_pos_2_neg_2": dict(add_task_definition=True, num_pos_examples=2, num_neg_examples=2, add_explanation=False),
    "def_pos_2_expl": dict(add_task_definition=True, num_pos_examples=2, num_neg_examples=0, add_explanation=True),
}

# The collator with `tk_instruct=True` draws one of these per instance (the Tk-Instruct training mix).
TK_INSTRUCT_RANDOM_ENCODINGS = ("def", "pos_2", "def_pos_2", "def_pos_2_neg_2", "def_pos_2_expl")

REQUIRED_KEYS = ("Definition", "Positive Examples", "Negative Examples", "Instances")
EXAMPLE_KEYS = ("input", "output")
INSTANCE_KEYS = ("id", "input", "output")


class SuperNITaskError(ValueError):
    """A task file that cannot be used; the message names the file and the key at fault."""


# ----------------------------------------------------------------------------------------------------------
# Loading.

def _fail(path: str, key: str, problem: str) -> SuperNITaskError:
    return SuperNITaskError(
        f"{path}: {key} {problem}. Fix the file to follow the Super-NaturalInstructions task format "
        "(allenai/natural-instructions, tasks/README.md) or regenerate it."
    )


def _check_examples(path: str, key: str, examples: Any) -> None:
    if not isinstance(examples, list):
        raise _fail(path, f'"{key}"', f"must be a list, got {type(examples).__name__}")
    for i, example in enumerate(examples):
        for field in EXAMPLE_KEYS:
            if not isinstance(example, dict) or not isinstance(example.get(field), str):
                raise _fail(path, f'"{key}"[{i}]["{field}"]', "is missing or not a string")


def _check_instances(path: str, instances: Any) -> None:
    if not isinstance(instances, list) or not instances:
        raise _fail(path, '"Instances"', "is empty or not a list; a task needs at least one instance")
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise _fail(path, f'"Instances"[{i}]', "is not an object")
        for field in INSTANCE_KEYS:
            if field not in instance:
                raise _fail(path, f'"Instances"[{i}]["{field}"]', "is missing")
        output = instance["output"]
        if not isinstance(output, list) or not output or not all(isinstance(o, str) for o in output):
            raise _fail(path, f'"Instances"[{i}]["output"]', "must be a non-empty list of acceptable outputs")


def validate_task(task: Any, path: str = "<task>") -> None:
    """Raises SuperNITaskError naming `path` and the key when `task` lacks what encoding / evaluation use."""
    if not isinstance(task, dict):
        raise SuperNITaskError(f"{path}: the top level must be a JSON object, got {type(task).__name__}.")
    for key in REQUIRED_KEYS:
        if key not in task:
            raise _fail(path, f'key "{key}"', f"is missing (required keys: {', '.join(REQUIRED_KEYS)})")
    definition = task["Definition"]
    if isinstance(definition, list):
        if not definition or not isinstance(definition[0], str):
            raise _fail(path, '"Definition"', "must be a string or a list holding one string")
    elif not isinstance(definition, str):
        raise _fail(path, '"Definition"', "must be a string or a list holding one string")
    _check_examples(path, "Positive Examples", task["Positive Examples"])
    _check_examples(path, "Negative Examples", task["Negative Examples"])
    _check_instances(path, task["Instances"])


def load_task(path: str) -> dict:
    """Reads and validates one task file; adds "Task" (the file name without '.json') like Tk-Instruct does."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SuperNITaskError(f"{path}: cannot read the task file ({e.strerror}).") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SuperNITaskError(
            f"{path}: not UTF-8 (invalid byte at offset {e.start}); task files must be UTF-8 encoded JSON."
        ) from e
    try:
        task = json.loads(text)  # accepts the NaN of upstream synthetic tasks' "URL", as json.load does
    except json.JSONDecodeError as e:
        raise SuperNITaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from e
    validate_task(task, path)
    task.setdefault("Task", os.path.splitext(os.path.basename(path))[0])
    return task


# ----------------------------------------------------------------------------------------------------------
# The Tk-Instruct encoding.

def _end_with_punctuation(text: str) -> str:
    """The collator's rule: append '.' unless the last character is in string.punctuation."""
    return text if text[-1] in string.punctuation else text + "."


def _render_example(kind: str, index: int, example: Mapping[str, str], add_explanation: bool) -> str:
    """' Positive Example 1 -\\nInput: x.\\n Output: y.\\n[ Explanation: z.\\n]\\n' as the collator writes it."""
    text = _end_with_punctuation(f" {kind} Example {index + 1} -\nInput: {example['input'].strip()}") + "\n"
    text = _end_with_punctuation(text + f" Output: {example['output'].strip()}") + "\n"
    if add_explanation and "explanation" in example:
        text = _end_with_punctuation(text + f" Explanation: {example['explanation'].strip()}") + "\n"
    return text + "\n"


def _render_definition(task: Mapping[str, Any]) -> str:
    definition = task["Definition"]
    if isinstance(definition, list):
        definition = definition[0]
    return _end_with_punctuation("Definition: " + definition.strip()) + "\n\n"


def _render_instance(instance: Mapping[str, Any]) -> str:
    return _end_with_punctuation(f"Now complete the following example -\nInput: {instance['input'].strip()}") + (
        "\nOutput: "
    )


def encode_tk_instruct(
    task: Mapping[str, Any],
    instance: Mapping[str, Any],
    *,
    add_task_name: bool = False,
    add_task_definition: bool = True,
    num_pos_examples: int = 2,
    num_neg_examples: int = 0,
    add_explanation: bool = False,
    max_source_length: Optional[int] = None,
    count_tokens: Optional[Callable[[str], int]] = None,
    truncate: Optional[Callable[[str, int], str]] = None,
) -> str:
    """The Tk-Instruct source text for one instance of `task` (defaults: "def + 2 pos", no explanations).

    Args:
      task: a task dict as returned by `load_task` ("Task" is needed only with add_task_name).
      instance: one element of task["Instances"] (uses its "input").
      add_task_name, add_task_definition, num_pos_examples, num_neg_examples, add_explanation: the collator's
        options; `ENCODINGS` holds the named settings of the paper ("input_only" is no definition, no examples).
      max_source_length: token budget of the source, EOS included (None: no limit, examples always added).
      count_tokens: text -> number of tokens as the collator counts them (`len(tokenizer(text)["input_ids"])`,
        EOS included); required with max_source_length.
      truncate: (text, n) -> text of the first n tokens, used when the final source is still too long (the
        collator's decode of the cut ids); None leaves the text whole for the downstream trim.
    """
    if max_source_length is not None and count_tokens is None:
        raise ValueError("encode_tk_instruct: max_source_length needs count_tokens (see seqio_length_fns).")

    def fits(text: str) -> bool:
        return max_source_length is None or count_tokens(text) <= max_source_length

    task_input = _render_instance(instance)
    task_name = ""
    if add_task_name:
        if "Task" not in task:
            raise KeyError('encode_tk_instruct: add_task_name=True needs task["Task"] (set by load_task).')
        task_name = task["Task"] + ". "
    definition = _render_definition(task) if add_task_definition else ""

    pos_examples: list[str] = []
    for idx, example in enumerate(task["Positive Examples"][:num_pos_examples]):
        text = _render_example("Positive", idx, example, add_explanation)
        if not fits(definition + " ".join(pos_examples) + text + task_input):
            break
        pos_examples.append(text)

    neg_examples: list[str] = []
    for idx, example in enumerate(task["Negative Examples"][:num_neg_examples]):
        text = _render_example("Negative", idx, example, add_explanation)
        if not fits(definition + " ".join(pos_examples) + " ".join(neg_examples) + text + task_input):
            break
        neg_examples.append(text)

    source = task_name + definition + "".join(pos_examples) + "".join(neg_examples) + task_input
    if truncate is not None and not fits(source):
        source = truncate(source, max_source_length)
    return source


def seqio_length_fns(vocabulary: Any, add_eos: bool = True) -> dict[str, Callable]:
    """`count_tokens` / `truncate` for encode_tk_instruct from a seqio.Vocabulary (or anything with
    encode(str) -> ids and decode(ids) -> str). add_eos counts the EOS the model input will end with,
    like a T5 tokenizer call in the collator."""

    def count_tokens(text: str) -> int:
        return len(vocabulary.encode(text)) + int(add_eos)

    def truncate(text: str, max_length: int) -> str:
        return vocabulary.decode(list(vocabulary.encode(text))[:max_length])

    return {"count_tokens": count_tokens, "truncate": truncate}
