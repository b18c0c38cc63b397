"""Mixing-rate functions and checked (sub-)mixtures (itjax.data.mixing) against seqio 0.0.20's own rules."""

import collections
import functools

import numpy as np
import pytest
import seqio
import tensorflow as tf

from itjax.data import mixing
from itjax.tasks import quickstart

VOCAB = quickstart.get_vocabulary()
FEATURES = {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)}
SIZES = {"mix_small": 10, "mix_mid": 300, "mix_big": 5000}


def _dataset_fn(split, shuffle_files, seed=None, *, name, n):
    del split, shuffle_files, seed
    return tf.data.Dataset.range(n).map(lambda i: {"inputs": tf.strings.as_string(i), "targets": name})


def _register(name, n, declare_size=True):
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(functools.partial(_dataset_fn, name=name, n=n), splits=("train",),
                                              num_input_examples={"train": n} if declare_size else None),
        preprocessors=[seqio.preprocessors.tokenize], output_features=FEATURES)
    return seqio.TaskRegistry.get(name)


@pytest.fixture(scope="module")
def tasks():
    return {name: _register(name, n) for name, n in SIZES.items()}


def test_num_examples_rate_is_capped_count_like_seqio(tasks):
    rate = mixing.mixing_rate_num_examples(maximum=300)
    assert {n: rate(t) for n, t in tasks.items()} == {"mix_small": 10.0, "mix_mid": 300.0, "mix_big": 300.0}
    assert mixing.mixing_rate_num_examples()(tasks["mix_big"]) == 5000.0
    for name, task in tasks.items():  # parity with seqio's own function (FLAN's choice)
        for kwargs in ({"maximum": 300}, {"maximum": 1000, "temperature": 3.0}, {"temperature": 2.0}):
            ours = mixing.mixing_rate_num_examples(kwargs.get("maximum"), temperature=kwargs.get("temperature", 1.0))
            assert np.isclose(ours(task), seqio.mixing_rate_num_examples(task, **kwargs)), (name, kwargs)


def test_temperature_rate(tasks):
    rate = mixing.mixing_rate_temperature(2.0, maximum=1000)
    assert np.isclose(rate(tasks["mix_small"]), 10 ** 0.5)
    assert np.isclose(rate(tasks["mix_big"]), 1000 ** 0.5)
    with pytest.raises(mixing.MixingRateError, match="temperature=0"):
        mixing.mixing_rate_temperature(0)
    with pytest.raises(mixing.MixingRateError, match="maximum=0"):
        mixing.mixing_rate_num_examples(0)


def test_unknown_size_is_a_clear_error():
    task = _register("mix_unsized", 5, declare_size=False)
    with pytest.raises(mixing.MixingRateError, match="Task 'mix_unsized' has no known number of 'train' examples"):
        mixing.mixing_rate_num_examples(100)(task)


def test_explicit_rates(tasks):
    rate = mixing.mixing_rate_explicit({"mix_small": 2.0, "mix_mid": 0.5})
    assert rate(tasks["mix_small"]) == 2.0 and rate(tasks["mix_mid"]) == 0.5
    with pytest.raises(mixing.MixingRateError, match="No explicit rate for task 'mix_big'"):
        rate(tasks["mix_big"])
    assert mixing.mixing_rate_explicit({}, default=1.5)(tasks["mix_big"]) == 1.5


def test_all_zero_rates_name_the_mixture(tasks):
    mixing.register_mixture("mix_zero", list(SIZES), default_rate=mixing.mixing_rate_explicit({}, default=0.0))
    with pytest.raises(mixing.MixingRateError, match="Mixture 'mix_zero': all mixing rates are zero"):
        seqio.get_mixture_or_task("mix_zero").get_dataset({"inputs": 8, "targets": 8}, shuffle=False)
    mixing.register_mixture("mix_negative", [("mix_small", -1.0), ("mix_mid", 1.0)])
    with pytest.raises(mixing.MixingRateError, match="Mixture 'mix_negative': rate -1.0 of 'mix_small'"):
        seqio.get_mixture_or_task("mix_negative").get_dataset({"inputs": 8, "targets": 8}, shuffle=False)
    with pytest.raises(mixing.MixingRateError, match="Mixture 'mix_top0': all sub-mixture weights are zero"):
        mixing.register_mixture_of_mixtures("mix_top0", {"mix_zero": 0.0})
    mixing.register_mixture_of_mixtures("mix_top_of_zero", {"mix_zero": 1.0, "mix_negative": 1.0})
    with pytest.raises(mixing.MixingRateError, match="all rates of its sub-mixture 'mix_zero' are zero"):
        seqio.get_mixture_or_task("mix_top_of_zero").get_dataset({"inputs": 8, "targets": 8}, shuffle=False)
    with pytest.raises(mixing.MixingRateError, match=r"\['mix_nope'\] are not registered mixtures"):
        mixing.register_mixture_of_mixtures("mix_bad", {"mix_nope": 1.0})


def test_sub_mixture_weights_are_final_shares(tasks):
    # Sub-mixture A: small + big, capped at 1000 -> within-shares 10/1010, 1000/1010. B: mid alone.
    mixing.register_mixture("mix_a", ["mix_small", "mix_big"], default_rate=mixing.mixing_rate_num_examples(1000))
    mixing.register_mixture("mix_b", ["mix_mid"], default_rate=mixing.mixing_rate_num_examples(1000))
    mixing.register_mixture_of_mixtures("mix_ab", {"mix_a": 0.75, "mix_b": 0.25})
    shares = mixing.task_shares("mix_ab")
    expected = {"mix_small": 0.75 * 10 / 1010, "mix_big": 0.75 * 1000 / 1010, "mix_mid": 0.25}
    assert shares.keys() == expected.keys()
    for name in expected:
        assert np.isclose(shares[name], expected[name]), name
    # ... and the sampled stream realises them (4000 draws: 1.5 pp is > 3 standard deviations here).
    ds = seqio.get_mixture_or_task("mix_ab").get_dataset(
        {"inputs": 8, "targets": 8}, shuffle=False, seed=3, num_epochs=None, copy_pretokenized=True)
    counts = collections.Counter(ex["targets_pretokenized"].decode() for ex in ds.take(4000).as_numpy_iterator())
    for name, share in expected.items():
        assert abs(counts[name] / 4000 - share) < 0.015, (name, counts)


def test_gin_mixture_registers_the_named_tasks_with_their_rates(tasks):
    import gin
    gin.parse_config(["import itjax.data.mixing",
                      "mixture.name = 'gin_made'",
                      "mixture.tasks = ['mix_small', ('mix_big', 3.0)]"])
    assert mixing.mixture() == "gin_made"
    made = seqio.get_mixture_or_task("gin_made")
    assert {t.name: made.get_rate(t) for t in made.tasks} == {"mix_small": 1.0, "mix_big": 3.0}
    assert mixing.task_shares("gin_made") == pytest.approx({"mix_small": 0.25, "mix_big": 0.75})


@pytest.mark.parametrize("members, message", [
    (["mix_smal"], "'mix_smal' is not a registered seqio task or mixture; did you mean: mix_small"),
    ([("mix_small", -1.0)], "rate -1.0 of 'mix_small' must be a finite number >= 0"),
])
def test_gin_mixture_names_a_bad_member(tasks, members, message):
    with pytest.raises(mixing.MixingRateError, match=message):
        mixing.mixture(name="gin_bad", tasks=members)
    assert "gin_bad" not in seqio.MixtureRegistry.names()


def test_gin_mixture_may_not_take_a_task_name(tasks):
    with pytest.raises(mixing.MixingRateError, match="mixture.name='mix_big' is the name of a registered task"):
        mixing.mixture(name="mix_big", tasks=["mix_small"])
