"""The downstream partition of SuperNI test tasks (register_superni(downstream_splits=True)) and the gin hook
superni_mixture: test = the official first 100, validation the next 10, nested train sizes from the rest."""

import json
import logging
import os

import gin
import pytest
import seqio

from itjax.tasks import superni, superni_gin

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superni")
BIG = "task1155_bard_analogical_reasoning_trash_or_treasure"  # 148 instances in the shared sample


def _ids(reg, name, split):
    return reg.task_data[superni.seqio_task_name(name, reg.prefix)].columns()[split]["id"]


@pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason="needs ../shared/data/superni")
def test_partition_of_a_real_test_task_nested_and_disjoint():
    with open(os.path.join(DATA_DIR, "tasks", f"{BIG}.json")) as f:
        instances = json.load(f)["Instances"]
    ids = [inst["id"] for inst in instances]
    regs = {size: superni.register_superni(DATA_DIR, missing_tasks="skip", prefix=f"ds{size}", downstream_splits=True,
                                           num_downstream_train_instances=size) for size in (10, 20, None)}
    full = regs[None]
    assert seqio.get_mixture_or_task(f"dsNone_{BIG}").splits == ("train", "validation", "test")
    assert sorted(_ids(full, BIG, "test")) == sorted(ids[:100])
    assert _ids(full, BIG, "validation") == ids[100:110]
    assert sorted(_ids(full, BIG, "train")) == sorted(ids[110:])  # all 38 of the pool
    assert _ids(regs[10], BIG, "train") == _ids(regs[20], BIG, "train")[:10] == _ids(full, BIG, "train")[:10]
    assert len(_ids(regs[20], BIG, "train")) == 20
    assert _ids(regs[10], BIG, "test") == _ids(full, BIG, "test")  # test never depends on the train size
    # The train tasks keep their own splits; without the option test tasks have only "test".
    plain = superni.register_superni(DATA_DIR, missing_tasks="skip", prefix="dsplain")
    assert seqio.get_mixture_or_task(f"dsplain_{BIG}").splits == ("test",)
    assert sorted(_ids(plain, BIG, "test")[:100]) == sorted(_ids(full, BIG, "test"))


def _tiny_task(n):
    return {
        "Definition": ["Repeat the input."], "Positive Examples": [{"input": "a", "output": "a"}],
        "Negative Examples": [], "Categories": ["Copy"], "Source": ["hand-made"],
        "Instances": [{"id": f"t-{i}", "input": f"word{i}", "output": [f"word{i}"]} for i in range(n)],
    }


def _tiny_checkout(tmp_path, sizes):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "default").mkdir(parents=True)
    names = [f"task90{i}_copy_{n}" for i, n in enumerate(sizes)]
    for name, n in zip(names, sizes):
        (tmp_path / "tasks" / f"{name}.json").write_text(json.dumps(_tiny_task(n)))
    (tmp_path / "tasks" / "task800_train.json").write_text(json.dumps(_tiny_task(30)))
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("task800_train\n")
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("\n".join(names) + "\n")
    return str(tmp_path), names


def test_small_tasks_rule_is_logged_and_never_touches_test(tmp_path, caplog):
    data_dir, (small, tiny, ok) = _tiny_checkout(tmp_path, (105, 60, 130))
    with caplog.at_level(logging.WARNING, logger="itjax.tasks.superni"):
        reg = superni.register_superni(data_dir, prefix="small", downstream_splits=True,
                                       num_downstream_train_instances=15, validate=True)
    counts = {n: {s: len(_ids(reg, n, s)) for s in ("test", "validation", "train")} for n in (small, tiny, ok)}
    assert counts[small] == {"test": 100, "validation": 2, "train": 3}  # 5 beyond test: validation 5 // 2
    assert counts[tiny] == {"test": 60, "validation": 0, "train": 0}
    assert counts[ok] == {"test": 100, "validation": 10, "train": 15}
    assert _ids(reg, small, "validation") == ["t-100", "t-101"]
    assert sorted(_ids(reg, small, "train")) == ["t-102", "t-103", "t-104"]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum(small in w and "validation 2" in w for w in warnings) == 1
    assert sum(tiny in w and "NO train data" in w for w in warnings) == 1
    assert not any(ok in w for w in warnings)
    # The test mixture trains examples-proportionally: the task without train data has rate 0.
    mixture = seqio.get_mixture_or_task(reg.test_mixture)
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates == {f"small_{small}": 3.0, f"small_{tiny}": 0.0, f"small_{ok}": 15.0}
    ds = mixture.get_dataset(None, split="train", shuffle=True, seed=0, num_epochs=None,
                             passthrough_features=["id"])
    seen = {ex["id"].decode() for ex in ds.take(200).as_numpy_iterator()}
    assert seen == set(_ids(reg, small, "train")) | set(_ids(reg, ok, "train"))


def test_superni_mixture_from_gin(tmp_path):
    data_dir, (small, tiny, ok) = _tiny_checkout(tmp_path, (105, 60, 130))
    gin.clear_config()
    try:
        gin.parse_config([f"register_superni.data_dir = {data_dir!r}", "register_superni.prefix = 'gin'",
                          "register_superni.downstream_splits = True",
                          "register_superni.num_downstream_train_instances = 100"])
        assert superni_gin.superni_mixture() == "gin_default_test"
        assert superni_gin.superni_mixture(role="train") == "gin_default_train"
        assert superni_gin.superni_mixture(task=ok) == f"gin_{ok}"
        with pytest.raises(superni.SuperNISplitError, match=f"{tiny}.*no train instances"):
            superni_gin.superni_mixture(task=tiny)
        with pytest.raises(superni.SuperNISplitError, match="task999_nope"):
            superni_gin.superni_mixture(task="task999_nope")
        # 2 epochs of the train split: 3 + 0 + 20 (the 130-instance task has 20 in its pool) examples, batch 4
        assert superni_gin.superni_epoch_steps(batch_size=4, mixture_or_task_name="gin_default_test") == 12
        assert superni_gin.superni_epoch_steps(batch_size=4, mixture_or_task_name=f"gin_{small}") == 2
        with pytest.raises(superni.SuperNISplitError, match="quickstart_.*not a registered SuperNI task"):
            superni_gin.superni_epoch_steps(batch_size=4, mixture_or_task_name="quickstart")
    finally:
        gin.clear_config()


def test_size_without_the_partition_and_unknown_only_tasks_are_errors(tmp_path):
    data_dir, names = _tiny_checkout(tmp_path, (105, 130))
    reg = superni.register_superni(data_dir, prefix="only", only_tasks=[names[1]])
    assert reg.test_tasks == [f"only_{names[1]}"] and reg.train_tasks == []
    with pytest.raises(superni.SuperNISplitError, match="task42_typo"):
        superni.register_superni(data_dir, prefix="only", only_tasks=["task42_typo"])
    with pytest.raises(superni.SuperNISplitError, match="downstream_splits=True"):
        superni.register_superni(data_dir, prefix="bad", num_downstream_train_instances=100)
