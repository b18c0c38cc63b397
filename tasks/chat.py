"""Chat and Alpaca-style instruction data as seqio Tasks (for decoder-only training).

    from itjax.tasks import chat
    chat.register_chat_task("alpaca", "/data/alpaca_data.json", format="alpaca", vocabulary=vocab)
    chat.register_chat_task("sharegpt", {"train": "sg_train.jsonl", "validation": "sg_val.jsonl"},
                            format="sharegpt", vocabulary=vocab, template=chat_lib.ChatTemplate(...))

Formats and rendering: itjax.data.chat. A single path is the "train" split. Files are read on first use (or at
registration with `validate=True`); malformed records are skipped and reported as a warning naming file and line
(`on_malformed="error"` raises instead). Features:

* alpaca / dolly (single turn): `inputs` (the Alpaca prompt) and `targets` (the response), tf.string, tokenized by
  seqio (`inputs` without EOS, `targets` with EOS). Metrics: exact match / ROUGE-L (itjax.metrics).
* sharegpt / messages (multi-turn), already tokenized:
      targets            int32 [length]  the whole rendered conversation, ending with EOS
      targets_loss_mask  int32 [length]  1 on assistant-turn tokens (incl. their end marker / EOS), 0 elsewhere
      targets_pretokenized  tf.string []  the rendered conversation text (for display)
  Only `targets` is an output feature (TASK_FEATURE_LENGTHS needs just 'targets'); the decoder-only feature
  converter cuts the mask to the trimmed targets. No metrics (language-model loss only).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

from itjax.data import chat as chat_lib
from itjax.metrics import superni_metrics

logger = logging.getLogger(__name__)

Source = Union[str, Mapping[str, Union[str, Sequence[Any]]]]


class ChatData:
    """One chat task's data: reads, renders and tokenizes every split once (on first use); `reports[split]` is
    the ChatFileReport of the split's malformed records once it has been read."""

    def __init__(self, name: str, source: Mapping[str, Any], fmt: str, vocabulary: seqio.Vocabulary,
                 template: chat_lib.ChatTemplate, on_malformed: str):
        self.name, self.source, self.format = name, dict(source), fmt
        self.vocabulary, self.template, self.on_malformed = vocabulary, template, on_malformed
        self.reports: dict[str, chat_lib.ChatFileReport] = {}
        self._columns: dict[str, dict[str, list]] = {}

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.source)

    def _records(self, split: str) -> list:
        value = self.source[split]
        if isinstance(value, str):
            parsed, report = chat_lib.read_records(value, self.format)
        else:
            parsed, report = chat_lib.parse_records(list(value), self.format, f"task {self.name!r} split {split!r}")
        self.reports[split] = report
        if report.malformed:
            if self.on_malformed == "error":
                raise chat_lib.ChatDataError(f"chat task {self.name!r}: {report.summary()}")
            logger.warning("chat task %r: %s", self.name, report.summary())
        return parsed

    def columns(self, split: str) -> dict[str, list]:
        if split not in self._columns:
            records = self._records(split)
            if self.format in chat_lib.SINGLE_TURN_FORMATS:
                self._columns[split] = {"inputs": [r["inputs"] for r in records],
                                        "targets": [r["targets"] for r in records]}
            else:
                ids, masks = zip(*[chat_lib.tokenize_conversation(m, self.vocabulary, self.template)
                                   for m in records]) if records else ((), ())
                tokenizer = getattr(self.vocabulary, "tokenizer", None)  # SentencePiece: show EOS as its piece
                eos = tokenizer.id_to_piece(self.vocabulary.eos_id) if hasattr(tokenizer, "id_to_piece") else "</s>"
                self._columns[split] = {"targets": list(ids), "targets_loss_mask": list(masks),
                                        "targets_pretokenized": [self.template.render(m, eos) for m in records]}
        return self._columns[split]

    def dataset_fn(self, split: str, shuffle_files: bool = False, seed: Optional[int] = None) -> tf.data.Dataset:
        """seqio FunctionDataSource signature; in-memory data, so shuffle_files / seed do nothing."""
        del shuffle_files, seed
        if split not in self.source:
            raise ValueError(f"chat task {self.name!r} has splits {self.splits}, not {split!r}.")
        cols = self.columns(split)
        if self.format in chat_lib.SINGLE_TURN_FORMATS:
            return tf.data.Dataset.from_tensor_slices(
                {k: tf.constant(v, tf.string, shape=[len(v)]) for k, v in cols.items()})
        ragged = {k: tf.RaggedTensor.from_row_lengths(
            np.concatenate(cols[k]) if cols[k] else np.zeros([0], np.int32),
            np.asarray([len(row) for row in cols[k]], np.int64)) for k in ("targets", "targets_loss_mask")}
        texts = cols["targets_pretokenized"]
        return tf.data.Dataset.from_tensor_slices(
            dict(ragged, targets_pretokenized=tf.constant(texts, tf.string, shape=[len(texts)])))


def register_chat_task(name: str, path_or_source: Source, *, format: str, vocabulary: seqio.Vocabulary,  # noqa: A002
                       template: chat_lib.ChatTemplate = chat_lib.DEFAULT_TEMPLATE, on_malformed: str = "skip",
                       validate: bool = False) -> ChatData:
    """Registers (or replaces) the seqio Task `name`; returns its data object (`.reports[split]` after reading).

    Args:
      name: seqio task name.
      path_or_source: a JSON-lines / JSON-array file (the "train" split), or {split: file path or list of records}.
      format: "alpaca", "dolly", "sharegpt" or "messages" (see itjax.data.chat).
      vocabulary: the seqio vocabulary of the model.
      template: role markers of multi-turn conversations.
      on_malformed: "skip" (warn with file and line) or "error".
      validate: read and render every split now instead of on first use.
    """
    if format not in chat_lib.FORMATS:
        raise ValueError(f"register_chat_task({name!r}): format={format!r}; use one of {chat_lib.FORMATS}.")
    if on_malformed not in ("skip", "error"):
        raise ValueError(f"register_chat_task({name!r}): on_malformed={on_malformed!r}; use 'skip' or 'error'.")
    source = {"train": path_or_source} if isinstance(path_or_source, str) else dict(path_or_source)
    if not source:
        raise ValueError(f"register_chat_task({name!r}): no splits given.")
    data = ChatData(name, source, format, vocabulary, template, on_malformed)
    if validate:
        for split in data.splits:
            data.columns(split)
    if format in chat_lib.SINGLE_TURN_FORMATS:
        kwargs = dict(
            preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
            output_features={"inputs": seqio.Feature(vocabulary, add_eos=False, required=True),
                             "targets": seqio.Feature(vocabulary, add_eos=True, required=True)},
            metric_fns=[superni_metrics])
    else:
        kwargs = dict(preprocessors=[],
                      output_features={"targets": seqio.Feature(vocabulary, add_eos=False, required=True)})
    if name in seqio.TaskRegistry.names():  # re-registration replaces (seqio raises on duplicates)
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(data.dataset_fn, splits=data.splits), **kwargs)
    return data
