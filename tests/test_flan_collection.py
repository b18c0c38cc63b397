"""The FLAN 2022 mixture (itjax.tasks.flan.register_flan2022_mixture): realised shares of a sampled stream.

Synthetic tasks of very different sizes (declared to seqio through num_input_examples, no cache) in
every collection; the expected shares are computed here from FLAN's rule (collection weight x min(n, cap) /
sum of min(n, cap) in the collection), independently of seqio's rate code.
"""

import collections
import functools
import math
import time

import pytest
import seqio
import tensorflow as tf

from itjax.data import mixing
from itjax.tasks import flan, quickstart

SIZES = {  # collection -> sizes of its tasks (caps: flan2021 30k, t0 20k, niv2 5k, cot 100k, dialog 200k)
    "flan2021": [1000, 30000, 90000],
    "t0": [500, 60000],
    "niv2": [100, 3000, 9000],
    "cot": [2000, 150000],
    "dialog": [7000, 400000],
}
NUM_SAMPLES = 100_000  # 1 pp is about 3 binomial standard deviations (or more) for every share checked below


def _dataset_fn(split, shuffle_files, seed=None, *, n, name):
    """n examples of already tokenized ids (no tokenizer in the loop: 100k draws stay fast)."""
    del split, shuffle_files, seed
    return tf.data.Dataset.range(n).map(
        lambda i: {"inputs": tf.cast(tf.stack([i % 500 + 2, 3]), tf.int32), "targets": tf.constant([4], tf.int32),
                   "_task_name": tf.constant(name)})


def _register_task(name, n):
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    vocab = quickstart.get_vocabulary()
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(functools.partial(_dataset_fn, n=n, name=name), splits=("train",),
                                              num_input_examples={"train": n}),
        preprocessors=[], output_features={"inputs": seqio.Feature(vocab), "targets": seqio.Feature(vocab)})


@pytest.fixture(scope="module")
def mixture():
    members = {}
    for collection, sizes in SIZES.items():
        names = [f"coll_{collection}_{j}" for j in range(len(sizes))]
        for name, n in zip(names, sizes):
            _register_task(name, n)
        if collection == "dialog":  # a collection may also list a mixture: it stands for its tasks
            mixing.register_mixture("coll_dialog_group", names, default_rate=1.0)
            names = ["coll_dialog_group"]
        members[collection] = names
    return flan.register_flan2022_mixture(**members, name="test_flan2022")


def _expected_task_shares():
    weights = flan.FLAN2022_WEIGHTS
    total = sum(weights.values())
    out = {}
    for collection, sizes in SIZES.items():
        capped = [min(n, flan.FLAN2022_CAPS[collection]) for n in sizes]
        for j, c in enumerate(capped):
            out[(collection, j)] = weights[collection] / total * c / sum(capped)
    return out


def test_registered_names(mixture):
    assert mixture == {"flan2021": "test_flan2022_flan2021", "t0": "test_flan2022_t0", "niv2": "test_flan2022_niv2",
                       "cot": "test_flan2022_cot", "dialog": "test_flan2022_dialog", "mixture": "test_flan2022"}
    assert len(seqio.get_mixture_or_task("test_flan2022").tasks) == sum(len(s) for s in SIZES.values())


def test_sampled_shares_match_flan_weights_and_caps(mixture):
    ds = seqio.get_mixture_or_task(mixture["mixture"]).get_dataset(
        {"inputs": 16, "targets": 4}, split="train", shuffle=False, seed=0, num_epochs=None,
        passthrough_features=["_task_name"]).map(lambda ex: {"_task_name": ex["_task_name"]})
    start = time.time()
    counts = collections.Counter()
    for batch in ds.take(NUM_SAMPLES).batch(5000).as_numpy_iterator():  # batched: Python sees 20 batches
        counts.update(name.decode() for name in batch["_task_name"])
    print(f"sampled {NUM_SAMPLES} examples in {time.time() - start:.1f} s")
    assert sum(counts.values()) == NUM_SAMPLES

    expected = _expected_task_shares()
    realised = {(c, j): counts[f"coll_{c}_{j}"] / NUM_SAMPLES for c, sizes in SIZES.items() for j in range(len(sizes))}
    for collection, sizes in SIZES.items():
        share = sum(realised[(collection, j)] for j in range(len(sizes)))
        print(f"{collection}: share {share:.4f} (weight {flan.FLAN2022_WEIGHTS[collection]}), tasks "
              f"{[round(realised[(collection, j)] / share, 4) for j in range(len(sizes))]}")
        assert abs(share - flan.FLAN2022_WEIGHTS[collection]) < 0.01, (collection, share)
        for j in range(len(sizes)):
            within = realised[(collection, j)] / share
            want = expected[(collection, j)] / flan.FLAN2022_WEIGHTS[collection]
            assert abs(within - want) < 0.01, (collection, j, within, want)
            assert abs(realised[(collection, j)] - expected[(collection, j)]) < 0.01
    assert math.isclose(sum(flan.FLAN2022_WEIGHTS.values()), 1.0)


def test_empty_collections_and_unknown_tasks_are_reported(mixture, caplog):
    with pytest.raises(flan.FlanTaskError, match="every collection is empty"):
        flan.register_flan2022_mixture(name="test_empty")
    with pytest.raises(flan.FlanTaskError, match="collection 't0': 'nope' is not a registered seqio task"):
        flan.register_flan2022_mixture(t0=["nope"], name="test_unknown")
    names = flan.register_flan2022_mixture(flan2021=["coll_flan2021_0"],
                                           niv2=["coll_niv2_0"], name="test_partial")
    assert set(names) == {"flan2021", "niv2", "mixture"}
    assert "shares become {'test_partial_flan2021': 0.6667, 'test_partial_niv2': 0.3333}" in caplog.text
