"""Mixing rates for seqio Mixtures, and mixtures of mixtures whose weights are final shares.

Rate functions (callables `seqio.Task -> float`, what seqio.Mixture accepts as a rate):

* `mixing_rate_num_examples(maximum)`: examples-proportional with a per-task cap, T5 / FLAN semantics
  rate = min(num_examples, maximum) (FLAN mixtures_utils.register_mixture uses seqio.mixing_rate_num_examples with
  maximum = the collection's cap). The size is the task's cached example count if it is cached, else its source's
  `num_input_examples(split)` (declare it on FunctionDataSource / TFDS knows it).
* `mixing_rate_temperature(temperature, maximum)`: rate = min(n, maximum) ** (1 / temperature) (T5's
  temperature-scaled mixing; T = 1 is examples-proportional, large T tends to equal rates).
* `mixing_rate_explicit({task name: rate})`: fixed rates by task name.

Mixtures of mixtures: seqio 0.0.20 (Mixture.get_rate) gives a task of sub-mixture M the rate
    rate_top(M) * rate_M(task) / total_rate(M),
i.e. it normalises each sub-mixture, so the top-level rates of sub-mixtures ARE their final shares (after dividing
by the sum of the top-level rates), whatever the sizes inside them: the meaning FLAN gives its collection weights.
`register_mixture_of_mixtures` relies on that (tests/test_mixing.py checks it against seqio) and adds the checks
seqio lacks. Caveat (seqio): a task without the requested split is dropped by Mixture.get_dataset and the
remaining rates are renormalised over all tasks, which changes the shares; give every task the split.

`RateCheckedMixture` (the mixture class of everything registered here) raises, naming the mixture, when all rates
are zero, a rate is negative or not finite, or a sub-mixture's rates sum to zero (seqio would divide by zero or
hand NaN weights to tf.data).
"""

from __future__ import annotations

import difflib
import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import gin
import seqio

logger = logging.getLogger(__name__)

RateFn = Callable[[seqio.Task], float]


class MixingRateError(ValueError):
    """A mixing rate that cannot be used; the message names the mixture or task."""


def _num_examples(task: seqio.Task, split: str) -> int:
    if task.cache_dir:
        return int(task.get_cached_stats(split)["examples"])
    n = task.num_input_examples(split)
    if n is None:
        raise MixingRateError(
            f"Task {task.name!r} has no known number of {split!r} examples, which an examples-proportional rate "
            "needs: declare it on the source (e.g. seqio.FunctionDataSource(..., num_input_examples={split: n})), "
            "cache the task, or use an explicit rate.")
    return int(n)


def mixing_rate_num_examples(maximum: Optional[int] = None, *, temperature: float = 1.0, scale: float = 1.0,
                             split: str = "train") -> RateFn:
    """rate(task) = (min(scale * num_examples, maximum)) ** (1 / temperature); maximum=None: no cap."""
    if maximum is not None and maximum <= 0:
        raise MixingRateError(f"maximum={maximum!r}: the per-task cap must be a positive number of examples.")
    if temperature <= 0:
        raise MixingRateError(f"temperature={temperature!r} must be > 0.")

    def rate(task: seqio.Task) -> float:
        r = float(_num_examples(task, split)) * scale
        if maximum is not None:
            r = min(r, float(maximum))
        return r ** (1.0 / temperature) if temperature != 1.0 else r

    rate.__name__ = f"mixing_rate_num_examples(maximum={maximum}, temperature={temperature})"
    return rate


def mixing_rate_temperature(temperature: float, maximum: Optional[int] = None, *, split: str = "train") -> RateFn:
    """Temperature-scaled examples-proportional rate: min(n, maximum) ** (1 / temperature)."""
    return mixing_rate_num_examples(maximum, temperature=temperature, split=split)


def mixing_rate_explicit(rates: Mapping[str, float], default: Optional[float] = None) -> RateFn:
    """rate(task) = rates[task.name] (or `default` for unlisted tasks; None: unlisted tasks are an error)."""
    rates = dict(rates)

    def rate(task: seqio.Task) -> float:
        if task.name in rates:
            return float(rates[task.name])
        if default is None:
            raise MixingRateError(f"No explicit rate for task {task.name!r}; rates are given for {sorted(rates)}. "
                                  "Add it, or pass default=.")
        return float(default)

    rate.__name__ = "mixing_rate_explicit"
    return rate


def _check_rate(value: float, mixture: str, member: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise MixingRateError(f"Mixture {mixture!r}: rate {value!r} of {member!r} must be a finite number >= 0.")
    return value


class RateCheckedMixture(seqio.Mixture):
    """seqio.Mixture that checks its rates where seqio computes them (Mixture.get_dataset / get_rate)."""

    def get_rate(self, task: seqio.Task) -> float:
        for mix in self._sub_mixtures:
            if task in mix.tasks and mix.total_rate <= 0:
                raise MixingRateError(f"Mixture {self.name!r}: all rates of its sub-mixture {mix.name!r} are zero, "
                                      "so its share cannot be split among its tasks.")
        return _check_rate(float(super().get_rate(task)), self.name, task.name)

    def _get_all_mixing_rates(self, tasks):
        rates = super()._get_all_mixing_rates(tasks)
        if not any(r > 0 for r in rates):
            raise MixingRateError(f"Mixture {self.name!r}: all mixing rates are zero (tasks: "
                                  f"{[t.name for t in tasks]}); give at least one task a positive rate.")
        return rates


def _replace(name: str, tasks: Sequence[Any], default_rate: Any = None) -> seqio.Mixture:
    if name in seqio.MixtureRegistry.names():  # re-registration replaces (seqio raises on duplicates)
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate, mixture_cls=RateCheckedMixture)


def register_mixture(name: str, tasks: Sequence[Union[str, tuple[str, Any]]],
                     default_rate: Union[float, RateFn, None] = None) -> seqio.Mixture:
    """Registers (or replaces) a RateCheckedMixture of tasks / sub-mixtures, as seqio.MixtureRegistry.add."""
    if not tasks:
        raise MixingRateError(f"Mixture {name!r} has no tasks.")
    return _replace(name, list(tasks), default_rate)


@gin.configurable
def mixture(name: str = gin.REQUIRED, tasks: Sequence[Union[str, tuple[str, float]]] = gin.REQUIRED,
            default_rate: float = 1.0) -> str:
    """Registers a mixture from gin and returns its name, for a macro: a run on part of a collection without Python,
    e.g. `MIXTURE_OR_TASK_NAME = @mixture()` with `mixture.name = 'quickstart_words'` and
    `mixture.tasks = ['quickstart_copy_words', ('quickstart_reverse_words', 2.0)]` (a bare name gets `default_rate`;
    rates are relative, as seqio's). Every member must be a registered task or mixture; an unknown one is an error
    naming it and the closest registered names."""
    import itjax.tasks  # noqa: F401  (registers the built-in tasks; imported here, not at module level: it imports us)
    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    for member in tasks:
        member_name = member[0] if isinstance(member, (tuple, list)) else member
        if member_name not in known:
            close = difflib.get_close_matches(str(member_name), sorted(known), n=3)
            raise MixingRateError(f"mixture.tasks of {name!r}: {member_name!r} is not a registered seqio task or "
                                  f"mixture{'; did you mean: ' + ', '.join(close) if close else ''}.")
        if isinstance(member, (tuple, list)):
            _check_rate(float(member[1]), name, member_name)
    if name in known - set(seqio.MixtureRegistry.names()):
        raise MixingRateError(f"mixture.name={name!r} is the name of a registered task; choose another name.")
    register_mixture(name, [tuple(m) if isinstance(m, list) else m for m in tasks], default_rate)
    return name


def register_mixture_of_mixtures(name: str, weights: Mapping[str, float]) -> seqio.Mixture:
    """Registers (or replaces) a mixture whose members are registered mixtures; weight / sum(weights) is the final
    share of each sub-mixture's examples, however its own rates are set."""
    missing = [m for m in weights if m not in seqio.MixtureRegistry.names()]
    if missing:
        raise MixingRateError(f"Mixture {name!r}: {missing} are not registered mixtures (register the "
                              "sub-mixtures first).")
    for member, w in weights.items():
        if not isinstance(w, (int, float)):
            raise MixingRateError(f"Mixture {name!r}: the weight of sub-mixture {member!r} must be a number "
                                  f"(seqio needs numeric sub-mixture rates), got {w!r}.")
        _check_rate(float(w), name, member)
    if not any(w > 0 for w in weights.values()):
        raise MixingRateError(f"Mixture {name!r}: all sub-mixture weights are zero: {dict(weights)}.")
    return _replace(name, [(m, float(w)) for m, w in weights.items()])


def task_shares(mixture: Union[str, seqio.Mixture]) -> dict[str, float]:
    """{task name: expected fraction of the mixture's examples}, from seqio's own get_rate (sums to 1)."""
    mix = seqio.get_mixture_or_task(mixture) if isinstance(mixture, str) else mixture
    rates = {t.name: float(mix.get_rate(t)) for t in mix.tasks}
    total = sum(rates.values())
    if total <= 0:
        raise MixingRateError(f"Mixture {mix.name!r}: all mixing rates are zero.")
    return {k: v / total for k, v in rates.items()}
