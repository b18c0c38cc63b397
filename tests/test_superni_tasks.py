"""SuperNI seqio registration (itjax.tasks.superni) over the real task sample in ../shared/data/superni."""

import json
import logging
import os

import numpy as np
import pytest
import seqio

from itjax.data import superni as superni_data
from itjax.tasks import superni

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "superni")
pytestmark = pytest.mark.skipif(
    not os.path.isdir(DATA_DIR), reason=f"SuperNI sample not found at {DATA_DIR} (CI has ../shared/data/superni)")

TEST_TASK = "task1344_glue_entailment_classification"
TRAIN_TASK = "task1146_country_capital"


def _list(name):
    return superni.read_task_list(os.path.join(DATA_DIR, "splits", "default", f"{name}_tasks.txt"))


def _present(names):
    return [n for n in names if os.path.isfile(os.path.join(DATA_DIR, "tasks", f"{n}.json"))]


def _register(prefix, **kwargs):
    return superni.register_superni(DATA_DIR, missing_tasks="skip", prefix=prefix, **kwargs)


def _ids(reg, superni_name, split, prefix):
    return reg.task_data[superni.seqio_task_name(superni_name, prefix)].columns()[split]["id"]


@pytest.fixture(scope="module")
def reg():
    return _register("superni", validate=True)


def test_mixtures_hold_the_present_split_tasks(reg):
    for role, mixture in (("train", reg.train_mixture), ("test", reg.test_mixture)):
        expected = {superni.seqio_task_name(n) for n in _present(_list(role))}
        assert {t.name for t in seqio.get_mixture_or_task(mixture).tasks} == expected
    assert reg.train_mixture == "superni_default_train" and reg.test_mixture == "superni_default_test"
    assert len(reg.test_tasks) == 14 and len(reg.train_tasks) == 32
    assert set(reg.missing_tasks) == set(_list("train") + _list("test")) - set(_present(_list("train") + _list("test")))
    assert seqio.get_mixture_or_task("superni_" + TEST_TASK).splits == ("test",)


def test_test_split_is_the_official_first_100_and_caps_are_nested(reg):
    path = os.path.join(DATA_DIR, "tasks", "task1155_bard_analogical_reasoning_trash_or_treasure.json")
    task = superni_data.load_task(path)
    ids100 = _ids(reg, task["Task"], "test", "superni")
    assert sorted(ids100) == sorted(i["id"] for i in task["Instances"][:100])
    small = _register("cap10", max_num_instances_per_task=10)
    ids10 = _ids(small, task["Task"], "test", "cap10")
    assert len(ids10) == 10 and ids10 == ids100[:10]
    everything = _register("capall", max_num_instances_per_task=None)
    assert _ids(everything, task["Task"], "test", "capall")[:100] == ids100
    assert len(_ids(everything, task["Task"], "test", "capall")) == len(task["Instances"]) == 148


def test_train_caps_nested_seeded_and_disjoint_from_validation(reg):
    a = _register("cap_a", max_num_instances_per_train_task=10)
    b = _register("cap_b", max_num_instances_per_train_task=50)
    c = _register("cap_c", max_num_instances_per_train_task=10, seed=7)
    pct = _register("cap_pct", train_percentage=10)
    for name in _present(_list("train")):
        val = _ids(reg, name, "validation", "superni")
        full = _ids(reg, name, "train", "superni")
        assert len(val) == 10 and not set(val) & set(full)
        assert _ids(a, name, "validation", "cap_a") == _ids(b, name, "validation", "cap_b") == val
        assert _ids(a, name, "train", "cap_a") == _ids(b, name, "train", "cap_b")[:10] == full[:10]
        assert _ids(pct, name, "train", "cap_pct") == full[:max(1, len(full) // 10)]
    assert _ids(c, TRAIN_TASK, "train", "cap_c") != _ids(a, TRAIN_TASK, "train", "cap_a")
    again = _register("cap_a", max_num_instances_per_train_task=10)  # re-registration replaces, same selection
    assert _ids(again, TRAIN_TASK, "train", "cap_a") == _ids(a, TRAIN_TASK, "train", "cap_a")


def test_rendered_example_equals_encode_tk_instruct(reg):
    task = superni_data.load_task(os.path.join(DATA_DIR, "tasks", f"{TEST_TASK}.json"))
    by_id = {inst["id"]: inst for inst in task["Instances"]}
    ds = seqio.get_mixture_or_task("superni_" + TEST_TASK).get_dataset(None, split="test", shuffle=False)
    for ex in ds.take(3).as_numpy_iterator():
        inst = by_id[ex["id"].decode()]
        assert ex["inputs_pretokenized"].decode() == superni_data.encode_tk_instruct(task, inst)
        assert ex["targets_pretokenized"].decode() == inst["output"][0]
        assert [r.decode() for r in ex["references"]] == inst["output"]
        assert ex["category"].decode() == "Textual Entailment" and ex["task_name"].decode() == TEST_TASK
        assert ex["input_language"].decode() == "English" and ex["source"].decode() == ", ".join(task["Source"])
    vocab = seqio.get_mixture_or_task("superni_" + TEST_TASK).output_features["inputs"].vocabulary
    short = _register("short", encoding="def_pos_2_neg_2", max_source_length=200)
    inst = task["Instances"][0]
    expected = superni_data.encode_tk_instruct(
        task, inst, max_source_length=200, **superni_data.ENCODINGS["def_pos_2_neg_2"],
        **superni_data.seqio_length_fns(vocab))
    columns = short.task_data["short_" + TEST_TASK].columns()["test"]
    assert columns["inputs"][columns["id"].index(inst["id"])] == expected


def test_metadata_reaches_the_evaluator_postprocess(reg, monkeypatch):
    name = "superni_" + TEST_TASK
    task = seqio.get_mixture_or_task(name)
    seen = []

    def spy(output, example=None, is_target=False):
        if is_target:
            seen.append({k: example[k] for k in ("task_name", "category", "source", "input_language", "id")})
        return superni.postprocess(output, example=example, is_target=is_target)

    monkeypatch.setattr(task, "_postprocess_fn", spy)
    evaluator = seqio.Evaluator(name, feature_converter=seqio.EncDecFeatureConverter(pack=False), eval_split="test",
                                sequence_length={"inputs": 1024, "targets": 32}, num_examples=8,
                                use_memory_cache=True, logger_cls=[])

    def perfect(ds):  # the targets as predictions: every example scores 100
        return [(i, ex["decoder_target_tokens"][ex["decoder_target_tokens"] > 0].tolist())
                for i, ex in ds.as_numpy_iterator()]

    all_metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=perfect)
    result = all_metrics.result()[name]
    assert result == {"exact_match": 100.0, "rougeL": 100.0}
    assert len(seen) == 8
    assert all(s["category"] == b"Textual Entailment" and s["task_name"] == TEST_TASK.encode() for s in seen)


def test_empty_validation_for_tiny_train_task_is_logged_and_loads(tmp_path, caplog):
    data_dir = _tiny_checkout(tmp_path, train_instances=1)
    with caplog.at_level(logging.WARNING, logger="itjax.tasks.superni"):
        reg = superni.register_superni(str(data_dir), prefix="tiny", validate=True)
    assert "validation gets 0" in caplog.text and TRAIN_TASK in caplog.text
    task = seqio.get_mixture_or_task(reg.train_tasks[0])
    assert len(list(task.get_dataset(None, split="validation", shuffle=False))) == 0
    assert len(list(task.get_dataset(None, split="train", shuffle=False))) == 1


def _tiny_checkout(tmp_path, train_instances=None, mutate_test=None, extra_test_names=()):
    (tmp_path / "tasks").mkdir()
    (tmp_path / "splits" / "default").mkdir(parents=True)
    for name in (TRAIN_TASK, TEST_TASK):
        with open(os.path.join(DATA_DIR, "tasks", f"{name}.json")) as f:
            task = json.load(f)
        if name == TRAIN_TASK and train_instances is not None:
            task["Instances"] = task["Instances"][:train_instances]
        if name == TEST_TASK and mutate_test:
            mutate_test(task)
        (tmp_path / "tasks" / f"{name}.json").write_text(json.dumps(task))
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text(TRAIN_TASK + "\n")
    (tmp_path / "splits" / "default" / "test_tasks.txt").write_text("\n".join((TEST_TASK,) + extra_test_names) + "\n")
    return tmp_path


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.pop("Definition"), 'key "Definition" is missing'),
    (lambda t: t.update(Instances=[]), '"Instances" is empty'),
])
def test_bad_task_file_names_the_file(tmp_path, mutate, message):
    data_dir = _tiny_checkout(tmp_path, mutate_test=mutate)
    with pytest.raises(superni_data.SuperNITaskError, match=message) as info:
        superni.register_superni(str(data_dir), prefix="bad", validate=True)
    assert f"{TEST_TASK}.json" in str(info.value)
    reg = superni.register_superni(str(data_dir), prefix="bad_lazy")  # lazy: the same error on first use
    with pytest.raises(superni_data.SuperNITaskError, match=message):
        seqio.get_mixture_or_task(reg.test_tasks[0]).get_dataset(None, split="test")


def test_split_list_naming_a_missing_task(tmp_path):
    data_dir = _tiny_checkout(tmp_path, extra_test_names=("task9999_not_there",))
    with pytest.raises(superni.SuperNISplitError, match="task9999_not_there") as info:
        superni.register_superni(str(data_dir), prefix="missing")
    assert "test_tasks.txt" in str(info.value) and "missing_tasks='skip'" in str(info.value)
    assert superni.register_superni(str(data_dir), prefix="missing", missing_tasks="skip").missing_tasks == [
        "task9999_not_there"]
    with pytest.raises(superni.SuperNISplitError, match="splits/nope"):
        superni.register_superni(str(data_dir), split_name="nope")


def test_bad_options_say_what_to_do():
    with pytest.raises(superni.SuperNISplitError, match="def_pos_2"):
        _register("opt", encoding="def_pos_3")
    with pytest.raises(superni.SuperNISplitError, match="not both"):
        _register("opt", max_num_instances_per_train_task=10, train_fraction=0.5)
    with pytest.raises(superni.SuperNISplitError, match="positive integer"):
        _register("opt", max_num_instances_per_task=0)


def test_seqio_names_are_sanitized():
    assert superni.seqio_task_name("task1_a-b c") == "superni_task1_a_b_c"
    order = superni.seeded_permutation(50, 42, "x")
    assert order == superni.seeded_permutation(50, 42, "x") and sorted(order) == list(range(50))
    assert np.any(np.array(order) != np.arange(50))
