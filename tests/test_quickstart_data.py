"""The built-in quickstart data: reproducible files, clean splits, vocabulary, seqio registrations."""

import glob
import importlib
import importlib.util
import os

import pytest

from itjax.data import superni, synthetic
from itjax.metrics import superni_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(REPO, "tasks", "data", "quickstart")
SUPERNI_KEYS = [
    "Contributors", "Source", "URL", "Categories", "Reasoning", "Definition", "Input_language",
    "Output_language", "Instruction_language", "Domains", "Positive Examples", "Negative Examples",
    "Instances", "Instance License",
]


@pytest.fixture(scope="module")
def quickstart():
    import itjax.tasks.quickstart as module  # registers the tasks

    return module


@pytest.fixture(scope="module")
def tasks():
    return {name: superni.load_task(os.path.join(DATA_DIR, f"{name}.json")) for name in synthetic.task_names()}


def test_regenerating_reproduces_the_committed_files(tmp_path):
    paths = synthetic.write_tasks(str(tmp_path), synthetic.QUICKSTART_SEED)
    committed = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DATA_DIR, "task*.json")))
    assert sorted(os.path.basename(p) for p in paths) == committed
    for path in paths:
        with open(path, "rb") as new, open(os.path.join(DATA_DIR, os.path.basename(path)), "rb") as old:
            assert new.read() == old.read(), f"{path} differs; run scripts/make_quickstart_data.py"


def test_retraining_reproduces_the_committed_vocabulary(tmp_path, tasks):
    spec = importlib.util.spec_from_file_location("make_quickstart_data", os.path.join(REPO, "scripts", "make_quickstart_data.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.train_vocabulary(script.corpus_sentences(tasks), str(tmp_path / "spm"), vocab_size=640)
    with open(tmp_path / "spm.model", "rb") as new, open(os.path.join(DATA_DIR, "spm.model"), "rb") as old:
        assert new.read() == old.read()


def test_task_files_have_the_superni_format(tasks):
    assert len(tasks) >= 12
    for name, task in tasks.items():
        assert [k for k in task if k != "Task"] == SUPERNI_KEYS, name
        assert len(task["Definition"]) == 1 and task["Definition"][0].endswith(".")
        assert len(task["Positive Examples"]) == 2 and len(task["Negative Examples"]) == 1
        assert all(set(ex) == {"input", "output", "explanation"} for ex in task["Positive Examples"])
        assert all(inst["id"].startswith(name.split("_")[0] + "-") for inst in task["Instances"])
    assert any(len(inst["output"]) > 1 for task in tasks.values() for inst in task["Instances"])


def test_splits_are_disjoint_and_exclude_the_examples(tasks):
    for name, task in tasks.items():
        train = synthetic.split_instances(task["Instances"], "train")
        validation = synthetic.split_instances(task["Instances"], "validation")
        assert len(validation) == synthetic.NUM_VALIDATION and len(train) == synthetic.NUM_INSTANCES - 100
        train_inputs = {inst["input"] for inst in train}
        validation_inputs = {inst["input"] for inst in validation}
        assert len(train_inputs) == len(train) and len(validation_inputs) == len(validation)
        assert not train_inputs & validation_inputs, name
        examples = {ex["input"] for ex in task["Positive Examples"] + task["Negative Examples"]}
        assert not examples & (train_inputs | validation_inputs), name
    with pytest.raises(ValueError, match="Unknown split 'test'"):
        synthetic.split_instances([], "test")


def test_outputs_follow_the_task_rules(tasks):
    def first(name):
        return tasks[name]["Instances"][0]

    inst = first("task9002_reverse_words")
    assert inst["output"] == [" ".join(inst["input"].split()[::-1])]
    inst = first("task9007_count_words")
    n = len(inst["input"].split())
    assert inst["output"] == [str(n), synthetic.NUMBER_NAMES[n]]
    inst = first("task9008_remove_vowels")
    assert not set(inst["output"][0]) & set("aeiou")
    labels = [i["output"][0] for i in synthetic.split_instances(tasks["task9013_even_or_odd"]["Instances"], "validation")]
    assert labels.count("even") == labels.count("odd") == 50  # balanced evaluation labels


def test_vocabulary_has_every_word_form_as_one_piece(quickstart):
    vocab = quickstart.get_vocabulary()
    assert vocab.vocab_size == 640 and (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    for form in synthetic.word_forms() + list(synthetic.DIGITS):
        ids = vocab.encode(form)
        assert len(ids) == 1 and vocab.decode(ids) == form, form
    assert len(vocab.encode("Fish FISH fsh 3 8")) == 5
    assert vocab.decode(vocab.encode("Output: 5416")) == "Output: 5416"


def test_all_examples_fit_the_feature_lengths(quickstart):
    vocab = quickstart.get_vocabulary()
    for name in quickstart.SUPERNI_TASK_NAMES:
        for split in synthetic.SPLITS:
            columns = quickstart.rendered_examples(name, split)
            assert max(len(vocab.encode(s)) + 1 for s in columns["inputs"]) <= quickstart.MAX_SOURCE_LENGTH
            assert max(len(vocab.encode(s)) + 1 for s in columns["targets"]) <= quickstart.MAX_TARGET_LENGTH


def test_mixture_yields_tokenized_prompts(quickstart):
    import seqio

    assert len(quickstart.TASK_NAMES) >= 12 and "quickstart_copy_words" in quickstart.TASK_NAMES
    mixture = seqio.get_mixture_or_task("quickstart")
    assert sorted(t.name for t in mixture.tasks) == sorted(quickstart.TASK_NAMES)
    lengths = {"inputs": quickstart.MAX_SOURCE_LENGTH, "targets": quickstart.MAX_TARGET_LENGTH}
    dataset = mixture.get_dataset(lengths, split="validation", shuffle=False, seed=0)
    vocab = quickstart.get_vocabulary()
    for example in dataset.take(8).as_numpy_iterator():
        assert example["inputs"][-1] == vocab.eos_id and example["targets"][-1] == vocab.eos_id
        assert vocab.decode(example["inputs"].tolist()).startswith("Definition:")


def test_task_features_postprocess_and_metric(quickstart):
    import seqio

    task = seqio.get_mixture_or_task("quickstart_count_words")
    lengths = {"inputs": quickstart.MAX_SOURCE_LENGTH, "targets": quickstart.MAX_TARGET_LENGTH}
    example = next(task.get_dataset(lengths, split="validation", shuffle=False).as_numpy_iterator())
    assert {"inputs", "targets", "references", "task_name", "id", "inputs_pretokenized"} <= set(example)
    assert example["task_name"] == b"task9007_count_words" and example["id"].startswith(b"task9007-")
    references = task.postprocess_fn(example["targets_pretokenized"].decode(), example=example, is_target=True)
    n = example["references"][0].decode()
    assert references == [n, synthetic.NUMBER_NAMES[int(n)]]
    assert task.postprocess_fn("seven") == "seven"
    assert superni_metrics([references], [references[1]]) == {"exact_match": 100.0, "rougeL": 100.0}


def test_registering_twice_does_not_crash(quickstart):
    import seqio

    importlib.reload(quickstart)
    quickstart.register()
    assert "quickstart" in seqio.MixtureRegistry.names()
