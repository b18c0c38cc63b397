"""What one evaluation reads and how: mixture, split, feature lengths, batch size, decode length, examples.

Shared by `python -m itjax.eval` (a checkpoint on any mixture) and a training run's extra eval mixtures
(`train.extra_evals`), so both resolve defaults and check settings the same way:

* `default_split`: the preferred split (the run's `train.eval_split`) if some task of the mixture has it, else
  'validation', else 'test' (BBH and MMLU have only `test` to evaluate on).
* `check`: the mixture is registered, the feature lengths cover its features, and a BBH chain-of-thought mixture
  gets at least 256 decode tokens (`itjax.tasks.bbh.check_decode_length`, when that module registered tasks;
  called here, not in `itjax.evaluation`, so the evaluation library does not depend on task modules).
* `parse_extra_evals`: `train.extra_evals` ({mixture: period}, {mixture: {setting: value}} or a list of
  {'mixture': name, setting: value}) -> EvalSpecs.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Mapping

import seqio

from itjax.config import ConfigError
from itjax.data import pipeline

FALLBACK_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """One evaluation's settings.

    Attributes:
      mixture_or_task_name: registered seqio mixture or task.
      split: the split evaluated.
      task_feature_lengths: {'inputs': n, 'targets': m} in tokens (fixed: one compiled shape).
      batch_size: global eval batch size in examples.
      max_decode_length: generation budget in tokens (None: the targets length).
      num_examples: the first N examples of each task (None: all).
      period: training steps between evaluations (extra eval mixtures; 0: only at the end).
    """

    mixture_or_task_name: str
    split: str
    task_feature_lengths: Mapping[str, int]
    batch_size: int
    max_decode_length: int | None = None
    num_examples: int | None = None
    period: int = 0

    @property
    def decode_length(self) -> int:
        """The tokens generation may produce (max_decode_length, else the targets length)."""
        return self.max_decode_length or int(self.task_feature_lengths.get("targets", 0))


def _splits_with_metrics(mixture_or_task_name: str) -> set[str]:
    tasks = seqio.get_subtasks(pipeline.get_mixture_or_task(mixture_or_task_name))
    return {split for task in tasks if task.metric_fns for split in task.splits}


def default_split(mixture_or_task_name: str, preferred: str | None = None) -> str:
    """`preferred` if a task of the mixture (one with metric functions) has that split, else 'validation', else
    'test'; `preferred` (or 'validation') when none has either (the evaluation then says so)."""
    splits = _splits_with_metrics(mixture_or_task_name)
    for split in ([preferred] if preferred else []) + list(FALLBACK_SPLITS):
        if split in splits:
            return split
    return preferred or FALLBACK_SPLITS[0]


def check(spec: EvalSpec, where: str) -> None:
    """ConfigError (prefixed by `where`, the flag or binding that set `spec`) unless the mixture is registered, the
    lengths cover its features, the batch size is positive and a BBH chain-of-thought mixture may decode 256
    tokens."""
    try:
        task = pipeline.get_mixture_or_task(spec.mixture_or_task_name)
        pipeline.check_feature_lengths(task, spec.task_feature_lengths)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not isinstance(spec.batch_size, int) or spec.batch_size <= 0:
        raise ConfigError(f"{where}: the eval batch size must be a positive integer, got {spec.batch_size!r}.")
    if spec.split not in _splits_with_metrics(spec.mixture_or_task_name):
        raise ConfigError(f"{where}: no task of {spec.mixture_or_task_name!r} with metric functions has a "
                          f"{spec.split!r} split (they have: "
                          f"{', '.join(sorted(_splits_with_metrics(spec.mixture_or_task_name))) or 'none'}).")
    # The task module owns the rule. BBH tasks exist only if it was imported (it registers them), and importing it
    # here could come after gin locked its config (it holds gin configurables): look it up instead.
    bbh = sys.modules.get("itjax.tasks.bbh")
    if bbh is not None:
        try:
            bbh.check_decode_length(spec.mixture_or_task_name, spec.decode_length)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


EXTRA_EVAL_KEYS = ("period", "split", "task_feature_lengths", "batch_size", "max_decode_length", "num_examples")


def parse_extra_evals(extra_evals: Mapping[str, Any] | None, *, main: EvalSpec, eval_period: int,
                      binding: str = "train.extra_evals") -> list[EvalSpec]:
    """The extra eval mixtures of a training run, checked.

    Args:
      extra_evals: {mixture: period} or {mixture: {key: value}} with keys from EXTRA_EVAL_KEYS, or a list of
        {'mixture': name, key: value} (for names gin computes: `'mixture': @bbh_mixture()`); a key left out
        takes the main evaluation's value (`main`; period: `eval_period`; split: `default_split` preferring the
        main split).
      main: the run's main evaluation (mixture, split, lengths, batch size, decode length, examples).
      eval_period: the run's `train.eval_period`.
      binding: the gin binding named in errors.
    """
    if isinstance(extra_evals, (list, tuple)):  # [{'mixture': name, ...settings}]: a name gin computes, e.g.
        items = []                                 # {'mixture': @bbh_mixture(), 'period': 500}
        for item in extra_evals:
            if not isinstance(item, dict) or "mixture" not in item:
                raise ConfigError(f"{binding}: each item of the list needs a 'mixture' key (and optionally "
                                  f"{', '.join(EXTRA_EVAL_KEYS)}), got {item!r}.")
            items.append((item["mixture"], {k: v for k, v in item.items() if k != "mixture"}))
    else:
        items = list((extra_evals or {}).items())
    specs = []
    for name, settings in items:
        where = f"{binding}[{name!r}]"
        if not isinstance(name, str):
            raise ConfigError(f"{binding}: keys are mixture or task names, got {name!r}.")
        if isinstance(settings, bool) or not isinstance(settings, (int, dict)):
            raise ConfigError(f"{where}: give a period (steps, e.g. {{{name!r}: 500}}) or a dict of settings "
                              f"({', '.join(EXTRA_EVAL_KEYS)}), not {settings!r}.")
        settings = {"period": settings} if isinstance(settings, int) else dict(settings)
        unknown = sorted(set(settings) - set(EXTRA_EVAL_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {', '.join(EXTRA_EVAL_KEYS)}.")
        try:
            split = settings.get("split") or default_split(name, main.split)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        spec = EvalSpec(
            mixture_or_task_name=name, split=split,
            task_feature_lengths=dict(settings.get("task_feature_lengths", main.task_feature_lengths)),
            batch_size=settings.get("batch_size", main.batch_size),
            max_decode_length=settings.get("max_decode_length", main.max_decode_length),
            num_examples=settings.get("num_examples", main.num_examples),
            period=settings.get("period", eval_period))
        if not isinstance(spec.period, int) or isinstance(spec.period, bool) or spec.period < 0:
            raise ConfigError(f"{where}: the period must be a number of steps >= 0 (0: only at the end), got "
                              f"{spec.period!r}.")
        if (spec.mixture_or_task_name, spec.split) == (main.mixture_or_task_name, main.split):
            raise ConfigError(f"{where}: that is the run's main evaluation ({main.mixture_or_task_name!r} on "
                              f"{main.split!r}); change train.eval_period / eval_* instead, or evaluate another "
                              "split.")
        check(spec, where)
        specs.append(spec)
    return specs
