"""A seqio preprocessor that refuses prompts longer than the inputs length instead of letting them be cut.

seqio's `append_eos_after_trim` and the feature converters cut every feature to its length in
TASK_FEATURE_LENGTHS without a word. For few-shot benchmarks (BBH, MMLU) a cut prompt loses its question, so the
held-out tasks put `check_inputs_fit` after `seqio.preprocessors.tokenize` and before anything that trims.
"""

from __future__ import annotations

import functools
from typing import Mapping, Optional

import seqio
import tensorflow as tf


class PromptTooLongError(ValueError):
    """A tokenized prompt does not fit the inputs length; the message names the task and the length it needs."""


def check_inputs_fit(ds: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None,
                     output_features: Optional[Mapping[str, seqio.Feature]] = None, *,
                     task_name: str) -> tf.data.Dataset:
    """Raises PromptTooLongError when any tokenized `inputs` (+1 for the EOS the feature appends) is longer than
    `sequence_length['inputs']`; returns `ds` unchanged. No check without an inputs length.

    Reads the whole (tokenized, in-memory) dataset once, eagerly: meant for evaluation tasks of a few thousand
    examples, where it runs once when the evaluator caches the task.
    """
    limit = (sequence_length or {}).get("inputs")
    if limit is None or isinstance(limit, (tuple, list)):
        return ds
    eos = int(bool(output_features and output_features["inputs"].add_eos))
    lengths = [int(n) + eos for n in ds.map(lambda ex: tf.size(ex["inputs"])).as_numpy_iterator()]
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise PromptTooLongError(
            f"Task {task_name!r}: {len(too_long)} of {len(lengths)} prompts are longer than the inputs length "
            f"{limit} (the longest needs {max(too_long)} tokens{', EOS included' if eos else ''}). Prompts are "
            f"never truncated: set TASK_FEATURE_LENGTHS['inputs'] to at least {max(too_long)}.")
    return ds


def length_check(task_name: str):
    """`check_inputs_fit` bound to a task name, for a seqio preprocessor list."""
    return functools.partial(check_inputs_fit, task_name=task_name)
