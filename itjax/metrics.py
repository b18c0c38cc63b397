"""Super-NaturalInstructions evaluation metrics, as the official scripts compute them.

Follows Tk-Instruct `src/compute_metrics.py` (the numbers of the Super-NaturalInstructions paper) and the
natural-instructions `eval/automatic/evaluation.py`:

* exact match compares `normalize_answer` forms: lower-cased, ASCII punctuation removed, whitespace collapsed.
  Articles are KEPT (the SQuAD article removal is disabled in the official code).
* ROUGE-L is the F-measure of `rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)` on the raw
  strings (the scorer lower-cases, keeps [a-z0-9] tokens and Porter-stems tokens longer than 3 characters).
  `xlingual=True` scores non-English text like the official `SplitTokenizer` path: whitespace tokens, no
  stemming. Left out: the later Tk-Instruct variant that tokenizes with the GPT-2 tokenizer (needs a download).
* each instance scores the max over its acceptable references; scores are averaged over instances, times 100
  and rounded to 4 decimals.

`superni_metrics(targets, predictions)` is the seqio metric function (targets: one reference list per example).
BIG-Bench Hard scoring (`bbh_answer`, `strict_exact_match`, `macro_average`) is at the end of the module.
"""

from __future__ import annotations

import functools
import string
from collections import defaultdict
from typing import Callable, Mapping, Sequence, Union

from rouge_score import rouge_scorer

References = Union[str, Sequence[str]]

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop string.punctuation characters, collapse whitespace ('The  Cat!' -> 'the cat')."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


class _WhitespaceTokenizer:
    """The official non-English tokenizer: `str.split()`, no lower-casing, no stemming."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@functools.lru_cache(maxsize=None)
def _rouge_l_scorer(xlingual: bool) -> rouge_scorer.RougeScorer:
    if xlingual:
        return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str, *, xlingual: bool = False) -> float:
    """ROUGE-L F-measure in [0, 1] of one prediction against one reference."""
    return _rouge_l_scorer(xlingual).score(target=reference, prediction=prediction)["rougeL"].fmeasure


def max_over_references(
    metric_fn: Callable[[str, str], float], prediction: str, references: Sequence[str]
) -> float:
    """The best score of `prediction` against any acceptable reference."""
    return max(metric_fn(prediction, reference) for reference in references)


def _as_reference_list(references: References, index: int) -> list[str]:
    if isinstance(references, str):  # a single reference, e.g. from a task without a reference list
        return [references]
    references = list(references)
    if not references:
        raise ValueError(f"Example {index} has no reference outputs; every example needs at least one.")
    return references


def compute_metrics(
    predictions: Sequence[str], references: Sequence[References], *, xlingual: bool = False
) -> dict[str, float]:
    """{'exact_match', 'rougeL'} in 0-100 (4 decimals) over paired predictions and reference lists."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} reference lists.")
    if not predictions:
        raise ValueError("No examples to score.")
    em_total, rouge_total = 0.0, 0.0
    rouge = functools.partial(rouge_l, xlingual=xlingual)
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        refs = _as_reference_list(refs, i)
        em_total += max_over_references(exact_match, prediction, refs)
        rouge_total += max_over_references(rouge, prediction, refs)
    n = len(predictions)
    return {"exact_match": round(100.0 * em_total / n, 4), "rougeL": round(100.0 * rouge_total / n, 4)}


def compute_grouped_metrics(
    predictions: Sequence[str],
    references: Sequence[References],
    groups: Sequence[str],
    *,
    xlingual: bool = False,
) -> dict[str, float]:
    """compute_metrics per group (task or category), keyed '<metric>_for_<group>' as in the official code."""
    if not len(predictions) == len(references) == len(groups):
        raise ValueError(
            f"Got {len(predictions)} predictions, {len(references)} reference lists and {len(groups)} groups."
        )
    by_group: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for prediction, refs, group in zip(predictions, references, groups):
        by_group[group][0].append(prediction)
        by_group[group][1].append(refs)
    results = {}
    for group, (group_predictions, group_references) in by_group.items():
        for metric, value in compute_metrics(group_predictions, group_references, xlingual=xlingual).items():
            results[f"{metric}_for_{group}"] = value
    return results


def superni_metrics(targets: Sequence[References], predictions: Sequence[str]) -> dict[str, float]:
    """seqio metric_fn: targets[i] is the list of acceptable outputs of example i, predictions[i] its output."""
    return compute_metrics(list(predictions), list(targets))


# ----------------------------------------------------------------------------------------------------------
# BIG-Bench Hard (Suzgun et al., 2022): answer extraction and strict exact match. The rules reproduce the
# published accuracies of the official code-davinci-002 outputs (all 27 tasks, CoT and answer-only) exactly.

BBH_STOP = "\n\nQ:"  # generation ends where the model starts the next question
BBH_ANSWER_PHRASE = "So the answer is "


def cut_at_stop(text: str, stops: Sequence[str] = (BBH_STOP,)) -> str:
    """The text before the first occurrence of any of `stops` (all of it when none occurs)."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text


def bbh_answer(generation: str, chain_of_thought: bool, stops: Sequence[str] = (BBH_STOP,)) -> str:
    """The answer in a BBH generation, cut at the next question (`stops`, default "\\n\\nQ:").

    Chain of thought: the text after the last "So the answer is ", stripped, without one final period; the whole
    stripped generation when the phrase is missing. Answer-only: the stripped generation.
    """
    text = cut_at_stop(generation, stops)
    if chain_of_thought:
        start = text.rfind(BBH_ANSWER_PHRASE)
        if start >= 0:
            answer = text[start + len(BBH_ANSWER_PHRASE):].strip()
            return answer[:-1] if answer.endswith(".") else answer
    return text.strip()


def strict_exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """seqio metric_fn: {'exact_match': 0-100}, the share of predictions equal to their target string (no
    normalisation: BBH compares "(A)" with "(A)", "False" with "False")."""
    if len(targets) != len(predictions):
        raise ValueError(f"Got {len(predictions)} predictions but {len(targets)} targets.")
    if not targets:
        raise ValueError("No examples to score.")
    return {"exact_match": 100.0 * sum(p == t for p, t in zip(predictions, targets)) / len(targets)}


def macro_average(per_task: Mapping[str, Mapping[str, float]], key: str) -> float:
    """The unweighted mean of `per_task[task][key]` over tasks (BBH's average over tasks)."""
    values = [record[key] for record in per_task.values()]
    if not values:
        raise ValueError(f"No tasks to average {key!r} over.")
    return sum(values) / len(values)
