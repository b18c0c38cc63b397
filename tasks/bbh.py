"""BIG-Bench Hard (Suzgun et al., 2022) as seqio Tasks, from a local copy of suzgunmirac/BIG-Bench-Hard.

    from itjax.tasks import bbh
    reg = bbh.register_bbh("/data/BIG-Bench-Hard", vocabulary="/path/to/spiece.model")
    reg.mixtures   # {'cot': 'bbh_cot', 'direct': 'bbh_direct'}
    reg.tasks      # {'cot': ['bbh_boolean_expressions_cot', ...], 'direct': ['bbh_boolean_expressions_direct', ...]}

`data_dir` has the repository's layout: `bbh/<task>.json` ({"examples": [{"input", "target"}, ...]}) and
`cot-prompts/<task>.txt` (a canary line, a "-----" line, then the task description and three worked exemplars).
Nothing is read or registered on import. Every task has the single split `test` (all its examples).

Prompts, as the paper's evaluation built them (checked against the official code-davinci-002 output files, which
record every prompt):
  chain of thought  <prompt file after its header> + "\\n\\nQ: " + input + "\\nA: Let's think step by step."
  answer only       the same description and exemplars, each exemplar's reasoning replaced by its final answer
                    ("A: " + the text after "So the answer is ", final period dropped), + "\\n\\nQ: " + input + "\\nA:"
Features before tokenization (tf.string): inputs (the prompt; seqio keeps it as `inputs_pretokenized`), targets
(the gold answer, e.g. "(B)", "False", "-219"). A prompt longer than TASK_FEATURE_LENGTHS['inputs'] stops the
evaluation with the task's name and the length it needs (tasks/prompt_length.py): prompts are never truncated.

Scoring: generation ends at EOS or where the model starts the next question ("\\n\\nQ:"; the postprocessor cuts
there, as decoding cannot stop on a string). The postprocessor extracts the answer (`itjax.metrics.bbh_answer`:
chain of thought: the text after the last "So the answer is ", final period removed, else the whole stripped
generation; answer only: the stripped generation) and `exact_match` (0-100) compares it with the target string
exactly. The paper's BBH number is the unweighted mean over tasks (`bbh_average`). Chain-of-thought answers need
a decode length of at least 256 tokens: `check_decode_length` refuses less.

Registering from gin (an entry point with an EVAL_MIXTURE / MIXTURE_OR_TASK_NAME macro):
    --gin_bindings="import itjax.tasks.bbh" --gin.register_bbh.data_dir=/data/BIG-Bench-Hard
    --gin.register_bbh.vocabulary=/path/to/spiece.model --gin.EVAL_MIXTURE="@bbh_mixture()"
`bbh_mixture(style)` registers with the bound `register_bbh` settings and returns the mixture's name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from itjax.metrics import BBH_ANSWER_PHRASE, BBH_STOP, bbh_answer, macro_average, strict_exact_match
from itjax.tasks import common
from itjax.tasks.prompt_length import length_check

logger = logging.getLogger(__name__)

STYLES = ("cot", "direct")
SPLIT = "test"
COT_CUE = "Let's think step by step."
MIN_COT_DECODE_LENGTH = 256  # the paper's generation budget for chain-of-thought answers
_HEADER_RULE = "-----\n"  # the line after the canary string in the official prompt files
_QUESTION = re.compile(r"(?:^|\n\n)Q: ")
_TASK_STYLES: dict[str, str] = {}  # every BBH task registered in this process -> 'cot' / 'direct'


class BBHDataError(ValueError):
    """A BBH file that is missing or not in the official layout; the message names the file."""


# ----------------------------------------------------------------------------------------------------------
# Prompt files.

@dataclasses.dataclass(frozen=True)
class Exemplar:
    """One worked example of a prompt file: the question text, its reasoning ("Let's think step by step. ...
    So the answer is X.") and the final answer X."""

    question: str
    reasoning: str
    answer: str


@dataclasses.dataclass(frozen=True)
class FewShotPrompt:
    """A parsed prompt file: `text` (everything after the canary header), `description` (the text before the
    first exemplar) and the exemplars."""

    text: str
    description: str
    exemplars: tuple[Exemplar, ...]

    def cot_prompt(self, question: str) -> str:
        """The chain-of-thought prompt for one input."""
        return f"{self.text}\n\nQ: {question}\nA: {COT_CUE}"

    def direct_text(self) -> str:
        """The exemplars with answers only: description + ("\\n\\nQ: " + question + "\\nA: " + answer) each."""
        shots = "".join(f"\n\nQ: {ex.question}\nA: {ex.answer}" for ex in self.exemplars)
        return self.description + shots if self.description else shots[2:]

    def direct_prompt(self, question: str) -> str:
        """The answer-only prompt for one input."""
        return f"{self.direct_text()}\n\nQ: {question}\nA:"


def strip_header(text: str) -> str:
    """The prompt file's text after its canary header (a canary line and a "-----" line); files from before the
    canary strings were added have no header and are returned unchanged."""
    first, sep, rest = text.partition("\n")
    if sep and "canary" in first.lower() and rest.startswith(_HEADER_RULE):
        return rest[len(_HEADER_RULE):]
    return text


def parse_prompt(text: str, path: str = "<prompt>") -> FewShotPrompt:
    """Parses a prompt file's text (header already stripped) into description and exemplars.

    Exemplars start with "Q: " (at the start or after a blank line) and answer with "A: Let's think step by step."
    and a reasoning that ends "So the answer is <answer>." Raises BBHDataError naming `path` otherwise.
    """
    starts = list(_QUESTION.finditer(text))
    if not starts:
        raise BBHDataError(f"{path}: no exemplar (a line starting 'Q: ') found; is this a BBH cot-prompts file?")
    description = text[:starts[0].start()]
    exemplars = []
    for number, (match, following) in enumerate(zip(starts, starts[1:] + [None]), 1):
        block = text[match.end():following.start() if following else len(text)]
        question, cue, reasoning = block.partition(f"\nA: {COT_CUE}")
        if not cue:
            raise BBHDataError(f"{path}: exemplar {number} has no answer line starting 'A: {COT_CUE}'.")
        reasoning = COT_CUE + reasoning
        if BBH_ANSWER_PHRASE not in reasoning:
            raise BBHDataError(f"{path}: exemplar {number}'s reasoning has no '{BBH_ANSWER_PHRASE.strip()}', so its "
                               "answer-only form cannot be built.")
        exemplars.append(Exemplar(question, reasoning, bbh_answer(reasoning, chain_of_thought=True)))
    return FewShotPrompt(text, description, tuple(exemplars))


def read_prompt_file(path: str) -> FewShotPrompt:
    """Reads and parses `cot-prompts/<task>.txt`."""
    if not os.path.isfile(path):
        raise BBHDataError(f"BBH prompt file {path} does not exist; the folder needs the repository's "
                           "cot-prompts/<task>.txt next to bbh/<task>.json.")
    with open(path, encoding="utf-8") as f:
        return parse_prompt(strip_header(f.read()), path)


def read_examples(path: str) -> list[dict[str, str]]:
    """The examples of `bbh/<task>.json`: [{'input': str, 'target': str}, ...]."""
    if not os.path.isfile(path):
        raise BBHDataError(f"BBH task file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise BBHDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise BBHDataError(f"{path}: expected an object with a non-empty 'examples' list.")
    for i, ex in enumerate(examples):
        for key in ("input", "target"):
            if not isinstance(ex, dict) or not isinstance(ex.get(key), str):
                raise BBHDataError(f"{path}: example {i} has no string {key!r} field.")
    return examples


def task_names(data_dir: str) -> list[str]:
    """The tasks of a BBH folder: the names of `bbh/*.json`, sorted."""
    folder = os.path.join(data_dir, "bbh")
    if not os.path.isdir(folder):
        raise BBHDataError(f"{folder} does not exist; data_dir must be a BIG-Bench-Hard checkout (bbh/<task>.json, "
                           "cot-prompts/<task>.txt).")
    names = sorted(f[:-len(".json")] for f in os.listdir(folder) if f.endswith(".json"))
    if not names:
        raise BBHDataError(f"{folder} holds no <task>.json files.")
    return names


# ----------------------------------------------------------------------------------------------------------
# Tasks.

def postprocess(output: Any, example: Optional[Mapping[str, Any]] = None, is_target: bool = False, *,
                chain_of_thought: bool, stop_strings: Sequence[str] = (BBH_STOP,)) -> Any:
    """Targets pass through (as str); predictions become their extracted answer (itjax.metrics.bbh_answer)."""
    del example
    if isinstance(output, bytes):
        output = output.decode("utf-8")
    return output if is_target else bbh_answer(output, chain_of_thought, stop_strings)


def _dataset_fn(split: str, shuffle_files: bool = False, seed: Optional[int] = None, *, prompts: Sequence[str],
                targets: Sequence[str], name: str) -> tf.data.Dataset:
    del shuffle_files, seed
    if split != SPLIT:
        raise ValueError(f"{name}: BBH tasks have only the {SPLIT!r} split, not {split!r}.")
    return tf.data.Dataset.from_tensor_slices({"inputs": tf.constant(list(prompts), tf.string),
                                               "targets": tf.constant(list(targets), tf.string)})


@dataclasses.dataclass
class BBHRegistration:
    """What register_bbh registered: {style: task names}, {style: mixture name}, and each BBH task's prompt."""

    tasks: dict[str, list[str]]
    mixtures: dict[str, str]
    prompts: dict[str, FewShotPrompt] = dataclasses.field(repr=False)


@gin.configurable
def register_bbh(data_dir: str, *, tasks: Optional[Sequence[str]] = None, styles: Sequence[str] = STYLES,
                 vocabulary: Optional[Union[seqio.Vocabulary, str]] = None, inputs_add_eos: bool = True,
                 stop_strings: Sequence[str] = (BBH_STOP,), prefix: str = "bbh") -> BBHRegistration:
    """Registers `<prefix>_<task>_<style>` Tasks (split "test") and the `<prefix>_<style>` mixtures (rate 1 per
    task). Registering again replaces the earlier Tasks. Reads every file now, so a missing or malformed file
    fails here, naming it.

    Args:
      data_dir: a BIG-Bench-Hard checkout (`bbh/<task>.json`, `cot-prompts/<task>.txt`).
      tasks: BBH task names to register (default: every `bbh/*.json`); each needs both files.
      styles: "cot" (chain of thought) and / or "direct" (answer only).
      vocabulary: seqio vocabulary or SentencePiece model path (default: the quickstart vocabulary, which runs
        offline; evaluate a model with its own vocabulary).
      inputs_add_eos: end the tokenized prompt with EOS (T5 encoders were trained so); False for decoder-only models,
        where the answer must follow "A:" directly.
      stop_strings: a generation is cut at the first of these (the start of a next question). Vocabularies that
        cannot encode newlines (T5's SentencePiece model turns them into spaces) never produce "\\n\\nQ:"; add
        " Q: " for them.
      prefix: name prefix of the tasks and mixtures.
    """
    unknown = sorted(set(styles) - set(STYLES))
    if unknown or not styles:
        raise ValueError(f"register_bbh(styles={list(styles)!r}): use 'cot' and / or 'direct'.")
    names = list(tasks) if tasks is not None else task_names(data_dir)
    vocabulary = common.vocabulary_from(vocabulary, BBHDataError)
    features = {"inputs": seqio.Feature(vocabulary=vocabulary, add_eos=inputs_add_eos, required=True),
                "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True)}
    registered: dict[str, list[str]] = {style: [] for style in styles}
    prompts: dict[str, FewShotPrompt] = {}
    for bbh_name in names:
        examples = read_examples(os.path.join(data_dir, "bbh", f"{bbh_name}.json"))
        prompt = read_prompt_file(os.path.join(data_dir, "cot-prompts", f"{bbh_name}.txt"))
        prompts[bbh_name] = prompt
        for style in styles:
            name = f"{prefix}_{bbh_name}_{style}"
            build = prompt.cot_prompt if style == "cot" else prompt.direct_prompt
            source = seqio.FunctionDataSource(
                functools.partial(_dataset_fn, prompts=[build(ex["input"]) for ex in examples],
                                  targets=[ex["target"] for ex in examples], name=name), splits=(SPLIT,))
            common.replace_in_registry(seqio.TaskRegistry, name, source=source, output_features=features,
                                       preprocessors=[seqio.preprocessors.tokenize, length_check(name),
                                                      seqio.preprocessors.append_eos_after_trim],
                                       postprocess_fn=functools.partial(postprocess, chain_of_thought=style == "cot",
                                                                        stop_strings=tuple(stop_strings)),
                                       metric_fns=[strict_exact_match])
            _TASK_STYLES[name] = style
            registered[style].append(name)
    mixtures = {}
    for style in styles:
        mixtures[style] = f"{prefix}_{style}"
        common.replace_in_registry(seqio.MixtureRegistry, mixtures[style], tasks=registered[style],
                                   default_rate=1.0)
    logger.info("Registered %d BBH tasks (%s) from %s.", len(names), ", ".join(styles), data_dir)
    return BBHRegistration(registered, mixtures, prompts)


@gin.configurable
def bbh_mixture(style: str = "direct") -> str:
    """Registers BBH with the gin-bound `register_bbh` arguments and returns the `style` mixture's name (for a
    mixture macro: `EVAL_MIXTURE = @bbh_mixture()`)."""
    if style not in STYLES:
        raise ValueError(f"bbh_mixture(style={style!r}): use 'cot' or 'direct'.")
    return register_bbh(styles=(style,)).mixtures[style]  # data_dir etc. come from gin


def check_decode_length(mixture_or_task_name: str, max_decode_length: int) -> None:
    """Raises ValueError if `mixture_or_task_name` holds BBH chain-of-thought tasks and `max_decode_length` (the
    number of tokens generation may produce) is below MIN_COT_DECODE_LENGTH; the reasoning would be cut before
    its answer."""
    subtasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
    cot = [t.name for t in subtasks if _TASK_STYLES.get(t.name) == "cot"]
    if cot and max_decode_length < MIN_COT_DECODE_LENGTH:
        raise ValueError(
            f"{mixture_or_task_name!r} has {len(cot)} BBH chain-of-thought task(s) (e.g. {cot[0]!r}) but the decode "
            f"length is {max_decode_length} tokens; chain-of-thought answers need at least {MIN_COT_DECODE_LENGTH} "
            f"(set train.max_decode_length, or the evaluation's max_decode_length, to {MIN_COT_DECODE_LENGTH}).")


def bbh_average(per_task: Mapping[str, Mapping[str, float]], key: str = "exact_match",
                prefix: str = "bbh") -> dict[str, float]:
    """{task: score} for the BBH tasks (`<prefix>_<task>_cot` / `_direct`) among `per_task` (an evaluation's
    {task: metrics}, or lines read back from metrics.jsonl), plus 'average': their unweighted mean (the paper's BBH
    number). Other entries (e.g. 'all') are ignored. Average CoT and answer-only results separately."""
    pattern = re.compile(rf"{re.escape(prefix)}_\w+_(cot|direct)")
    scores = {task: record[key] for task, record in per_task.items() if pattern.fullmatch(task) and key in record}
    if not scores:
        raise ValueError(f"No BBH task with a {key!r} score among {sorted(per_task)}.")
    return {**scores, "average": macro_average({t: {key: v} for t, v in scores.items()}, key)}
