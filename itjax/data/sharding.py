"""Per-host shards of a seqio task's evaluation split, and record positions that do not depend on the shard.

Evaluation on several hosts reads and tokenizes only each host's share of a task: `host_shard(task, ...)` asks
seqio for shard `index` of `num_shards`. For sources that seqio shards at the examples (every FunctionDataSource,
and file sources with fewer files than hosts) that is the round robin `ds.shard(num_shards, index)` of the source
records, so host `i`'s local record `j` is record `j * num_shards + i` of the split: interleaving the hosts'
results gives back one host's order.

Preprocessors whose output depends on a record's position (FLAN's template `n mod T`, rank classification's
record ids) must use `enumerate_records` instead of `ds.enumerate()`: under `host_shard` it yields the position in
the unsharded split, so several hosts render and score exactly what one host would.

Sources that seqio would shard by files (positions within a host's files are not positions in the split) are read
whole by every host and sharded after preprocessing: correct, but every host tokenizes everything (logged).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
from typing import Iterator, Mapping

import seqio
import tensorflow as tf

log = logging.getLogger(__name__)

# (index, num_shards) while `host_shard` builds a round-robin shard of a task's records; None otherwise.
_ROUND_ROBIN_SHARD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "itjax_round_robin_shard", default=None)


class _ArmAfterReading:
    """Wraps a task's DataSource: reading it (which may run its own preprocessors over unsharded data, e.g.
    FewshotDataSource's exemplar stream) happens with no shard known; the preprocessors seqio applies afterwards,
    to the round-robin shard, see it. Every other attribute is the wrapped source's."""

    def __init__(self, source: seqio.DataSource, shard: tuple[int, int]):
        self._wrapped, self._shard = source, shard

    def __getattr__(self, name: str):
        return getattr(self._wrapped, name)

    def get_dataset(self, *args, **kwargs) -> tf.data.Dataset:
        ds = self._wrapped.get_dataset(*args, **kwargs)
        _ROUND_ROBIN_SHARD.set(self._shard)  # reset by host_shard once the task's dataset is built
        return ds


@contextlib.contextmanager
def _no_shard_known() -> Iterator[None]:
    token = _ROUND_ROBIN_SHARD.set(None)
    try:
        yield
    finally:
        _ROUND_ROBIN_SHARD.reset(token)


def enumerate_records(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds.enumerate()` with positions (int64) in the unsharded split, also on a round-robin host shard.

    Called while a preprocessor builds its dataset (seqio applies preprocessors when `get_dataset` runs), so the
    shard it is building is known; outside the task preprocessors of a `host_shard` (including a source's own
    preprocessing of unsharded data) this is exactly `ds.enumerate()`.
    """
    shard = _ROUND_ROBIN_SHARD.get()
    ds = ds.enumerate()
    if shard is None or shard[1] == 1:
        return ds
    index, num_shards = shard
    return ds.map(lambda position, ex: (position * num_shards + index, ex))


def shards_at_examples(task: seqio.Task, split: str, num_shards: int) -> bool:
    """Whether seqio shards `task`'s split into `num_shards` by a round robin over its records (not by files)."""
    source = task.source
    return not source.supports_arbitrary_sharding and len(source.list_shards(split=split)) < num_shards


def host_shard(task: seqio.Task, split: str, sequence_length: Mapping[str, int], index: int, num_shards: int,
               num_examples: int | None = None) -> tf.data.Dataset:
    """Host `index`'s share of `task`'s `split`, preprocessed and tokenized (task features; not shuffled).

    Local example `j` is example `j * num_shards + index` of what one host would see (for sources sharded at the
    examples; see the module docstring). `num_examples`: keep only the split's first N examples, i.e. this host's
    share of them.
    """
    kwargs = dict(sequence_length=dict(sequence_length), split=split, shuffle=False, num_epochs=1, seed=42,
                  use_cached=False)
    if num_shards == 1:
        ds = task.get_dataset(**kwargs)
    elif shards_at_examples(task, split, num_shards):
        # seqio reads the whole source, keeps every num_shards-th record, then runs the task's preprocessors.
        shard_task = copy.copy(task)
        shard_task._source = _ArmAfterReading(task.source, (index, num_shards))  # noqa: SLF001 (seqio's field)
        with _no_shard_known():
            ds = shard_task.get_dataset(shard_info=seqio.ShardInfo(index, num_shards), **kwargs)
    else:
        log.info("Task %s: its %r split is sharded by files; every host reads and preprocesses all of it and "
                 "keeps every %d-th example.", task.name, split, num_shards)
        ds = task.get_dataset(**kwargs).shard(num_shards, index)
    if num_examples is not None:
        ds = ds.take(max(0, -(-(num_examples - index) // num_shards)))
    return ds
