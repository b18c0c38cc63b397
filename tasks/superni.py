"""Super-NaturalInstructions (SuperNI) as seqio Tasks and Mixtures, from a natural-instructions checkout.

    from itjax.tasks import superni
    reg = superni.register_superni("/data/natural-instructions", split_name="default", encoding="def_pos_2")
    reg.train_mixture, reg.test_mixture   # 'superni_default_train', 'superni_default_test'

`data_dir` holds `tasks/<task>.json` and `splits/<split_name>/{train,test}_tasks.txt` (the layout of
allenai/natural-instructions). One Task per listed SuperNI task, named `<prefix>_<task name>` with characters seqio
rejects replaced by '_' (`superni_task1344_glue_entailment_classification`); nothing is registered on import.

Splits and instance selection (all seeded by `seed` and the task name, so a task's selection does not depend on
which other tasks are registered):

* test tasks (split "test"): upstream puts each test task's label-balanced evaluation instances first, and
  Tk-Instruct evaluates on `Instances[:100]`. The candidates are ordered as a seeded permutation of
  `Instances[:100]` followed by a seeded permutation of the rest; the split is the first
  `max_num_instances_per_task` of that order (100 = exactly the official evaluation instances).
* train tasks (splits "validation" and "train"): one seeded permutation of all instances; "validation" is its
  first `num_validation_instances_per_train_task` instances, "train" is the first `max_num_instances_per_train_task`
  (or `train_fraction` of) the remaining ones. Caps are therefore nested (the 100 are a subset of the 200) and the
  validation instances never change with the train cap and never overlap the train split.
  Small-task rule (logged as a warning): validation takes at most half of a task's instances
  (`min(num_validation, n // 2)`), so a task with one instance has no validation example.
* test tasks with `downstream_splits=True` (the downstream partition of Gupta 2023, "quick learners"): "test" is
  as above but drawn only from `Instances[:100]`; "validation" is `Instances[100:100 + v]` and the train pool is
  `Instances[100 + v:]` (never the test instances), "train" its first `num_downstream_train_instances` in a seeded
  shuffle (None: all), so sizes 100 / 200 / 1000 / all are nested prefixes. v is
  `num_downstream_validation_instances` (10). Small-task rule (one warning per task): with r = n - 100 instances
  beyond the test set, v = min(10, r // 2) (validation shrinks first; train keeps the rest); a task with r = 0
  (<= 100 instances) has an empty "train" and "validation" (all of it stays test): it has rate 0 in the test
  mixture (evaluated, never trained on), and `superni_mixture(task=...)` for it fails naming the task.
  With this option the test mixture's rates are examples-proportional on "train" (multi-task training on the
  downstream tasks). From gin: itjax.tasks.superni_gin (`MIXTURE_OR_TASK_NAME = @superni_mixture()`).

Features before tokenization (tf.string): inputs (rendered with itjax.data.superni.encode_tk_instruct),
targets (first acceptable output), references [None] (all acceptable outputs), id, task_name, category (first of
"Categories"), source, input_language, output_language (list-valued fields joined with ", "). Only inputs and
targets are tokenized; the rest reaches seqio's Evaluator (postprocess_fn gets the whole example) and the metric
`itjax.metrics.superni_metrics` scores the max over `references`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
from typing import Any, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from itjax.data import superni
from itjax.metrics import superni_metrics

logger = logging.getLogger(__name__)

OFFICIAL_TEST_INSTANCES = 100  # upstream: the first 100 instances of a test task are its evaluation set
TRAIN_TASK_SPLITS = ("train", "validation")
TEST_TASK_SPLITS = ("test",)
DOWNSTREAM_TASK_SPLITS = ("train", "validation", "test")
_INVALID_NAME_CHARS = re.compile(r"[^\w.:]")


_REGISTERED_TASK_DATA: dict[str, dict] = {}  # prefix -> {seqio task name: _TaskData} of the latest registration


class SuperNISplitError(ValueError):
    """A split list or registration option that cannot be used; the message names the file or option."""


# ----------------------------------------------------------------------------------------------------------
# Names and split lists.

def seqio_task_name(superni_name: str, prefix: str = "superni") -> str:
    """'task001_quoref_question_generation' -> 'superni_task001_quoref_question_generation' (seqio-safe)."""
    return _INVALID_NAME_CHARS.sub("_", f"{prefix}_{superni_name}")


def read_task_list(path: str) -> list[str]:
    """Task names of one split file, in order (blank lines ignored, '.json' suffixes dropped)."""
    if not os.path.isfile(path):
        raise SuperNISplitError(
            f"Split list {path} does not exist; point data_dir at a natural-instructions checkout "
            "(with splits/<split_name>/train_tasks.txt and test_tasks.txt) or pick an existing split_name.")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    return [n[:-len(".json")] if n.endswith(".json") else n for n in names]


# ----------------------------------------------------------------------------------------------------------
# Instance selection.

def seeded_permutation(n: int, seed: int, task_name: str) -> list[int]:
    """A permutation of range(n) fixed by (seed, task_name); stable across processes and Python runs."""
    order = list(range(n))
    random.Random(f"{seed}/{task_name}").shuffle(order)
    return order


def select_test_instances(instances: Sequence[Any], cap: Optional[int], seed: int, task_name: str) -> list:
    """The "test" split of a test task: the first `cap` of (shuffled official 100, then shuffled rest)."""
    head = list(instances[:OFFICIAL_TEST_INSTANCES])
    tail = list(instances[OFFICIAL_TEST_INSTANCES:])
    ordered = [head[i] for i in seeded_permutation(len(head), seed, task_name)]
    ordered += [tail[i] for i in seeded_permutation(len(tail), seed, task_name + "/rest")]
    return ordered if cap is None else ordered[:cap]


def split_downstream_instances(
    instances: Sequence[Any],
    *,
    num_validation: int,
    cap: Optional[int],
    seed: int,
    task_name: str,
    log: bool = True,
) -> dict[str, list]:
    """{"test", "validation", "train"} of a downstream (partitioned) test task; disjoint; train caps nested.

    test: a seeded permutation of `Instances[:100]`; validation: `Instances[100:100 + v]` with
    v = min(num_validation, r // 2), r = n - 100; train: the first `cap` (None: all) of a seeded permutation of
    `Instances[100 + v:]`. Logs a warning for a task with fewer than 100 + 2 * num_validation instances.
    """
    head = list(instances[:OFFICIAL_TEST_INSTANCES])
    rest = list(instances[OFFICIAL_TEST_INSTANCES:])
    test = [head[i] for i in seeded_permutation(len(head), seed, task_name)]
    n_val = min(num_validation, len(rest) // 2)
    pool = rest[n_val:]
    pool = [pool[i] for i in seeded_permutation(len(pool), seed, task_name + "/train")]
    train = pool if cap is None else pool[:cap]
    if log and not pool:
        logger.warning(
            "SuperNI test task %s has %d instances (<= %d): all are test, it gets no validation and NO train data "
            "(rate 0 in the test mixture).", task_name, len(instances), OFFICIAL_TEST_INSTANCES)
    elif log and n_val < num_validation:
        logger.warning(
            "SuperNI test task %s has %d instances: test gets the first %d, validation %d (min(%d, %d // 2), "
            "validation shrinks first), train the other %d.", task_name, len(instances), OFFICIAL_TEST_INSTANCES,
            n_val, num_validation, len(rest), len(pool))
    elif log and cap is not None and len(pool) < cap:
        logger.warning("SuperNI test task %s has %d train instances, fewer than the %d asked for: train gets all %d.",
                       task_name, len(pool), cap, len(pool))
    return {"test": test, "validation": rest[:n_val], "train": train}


def num_train_instances(pool_size: int, cap: Optional[int], fraction: Optional[float]) -> int:
    """How many of `pool_size` candidates a train split keeps (a fraction keeps at least one)."""
    if fraction is not None:
        return max(1, int(fraction * pool_size)) if pool_size else 0
    return pool_size if cap is None else min(cap, pool_size)


def split_train_instances(
    instances: Sequence[Any],
    *,
    num_validation: int,
    cap: Optional[int],
    fraction: Optional[float],
    seed: int,
    task_name: str,
) -> dict[str, list]:
    """{"validation": [...], "train": [...]} of a train task; disjoint, nested in cap / fraction."""
    ordered = [instances[i] for i in seeded_permutation(len(instances), seed, task_name)]
    n_val = min(num_validation, len(ordered) // 2)
    if n_val < num_validation:
        logger.warning(
            "SuperNI train task %s has %d instances: validation gets %d (at most half of the task, rule "
            "min(num_validation=%d, n // 2)), train draws from the other %d.",
            task_name, len(ordered), n_val, num_validation, len(ordered) - n_val)
    pool = ordered[n_val:]
    return {"validation": ordered[:n_val], "train": pool[:num_train_instances(len(pool), cap, fraction)]}


# ----------------------------------------------------------------------------------------------------------
# One task's data.

def _join(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return "" if value is None else str(value)


def task_metadata(task: Mapping[str, Any]) -> dict[str, str]:
    """task_name, category (first of "Categories"), source and languages of a loaded task dict."""
    categories = task.get("Categories") or [""]
    return {
        "task_name": task["Task"],
        "category": str(categories[0]),
        "source": _join(task.get("Source")),
        "input_language": _join(task.get("Input_language")),
        "output_language": _join(task.get("Output_language")),
    }


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """The recorded instance-selection settings of a registration (see the module docstring)."""

    seed: int = 42
    max_num_instances_per_task: Optional[int] = OFFICIAL_TEST_INSTANCES
    max_num_instances_per_train_task: Optional[int] = None
    train_fraction: Optional[float] = None
    num_validation_instances_per_train_task: int = 10
    downstream_splits: bool = False
    num_downstream_train_instances: Optional[int] = None
    num_downstream_validation_instances: int = 10

    def __post_init__(self):
        if not self.downstream_splits and self.num_downstream_train_instances is not None:
            raise SuperNISplitError("num_downstream_train_instances needs downstream_splits=True (test tasks get "
                                    "train / validation / test splits only then).")
        if self.num_downstream_validation_instances < 0:
            raise SuperNISplitError("num_downstream_validation_instances must be >= 0.")
        for name in ("max_num_instances_per_task", "max_num_instances_per_train_task",
                     "num_downstream_train_instances"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SuperNISplitError(f"{name}={value!r}: use a positive integer, or None for all instances.")
        if self.train_fraction is not None and self.max_num_instances_per_train_task is not None:
            raise SuperNISplitError(
                "Set either max_num_instances_per_train_task or train_fraction (percentage / 100), not both.")
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            raise SuperNISplitError(f"train_fraction={self.train_fraction!r}: use a number in (0, 1].")
        if self.num_validation_instances_per_train_task < 0:
            raise SuperNISplitError("num_validation_instances_per_train_task must be >= 0.")


class _TaskData:
    """Loads one task file on first use and renders the columns of all its splits once."""

    def __init__(self, path: str, is_test: bool, selection: SelectionConfig, encode_kwargs: dict):
        self.path, self.is_test, self.selection, self.encode_kwargs = path, is_test, selection, encode_kwargs
        self._columns: Optional[dict[str, dict[str, list]]] = None
        self._counts: Optional[dict[str, int]] = None

    @property
    def splits(self) -> tuple[str, ...]:
        if self.is_test:
            return DOWNSTREAM_TASK_SPLITS if self.selection.downstream_splits else TEST_TASK_SPLITS
        return TRAIN_TASK_SPLITS

    def _select(self, task: Mapping[str, Any]) -> dict[str, list]:
        s, name = self.selection, task["Task"]
        if self.is_test and s.downstream_splits:  # logs its small-task rule once per task (counted or rendered)
            splits = split_downstream_instances(task["Instances"], num_validation=s.num_downstream_validation_instances,
                                                cap=s.num_downstream_train_instances, seed=s.seed, task_name=name,
                                                log=self._counts is None)
            if s.max_num_instances_per_task is not None:
                splits["test"] = splits["test"][:s.max_num_instances_per_task]
            return splits
        if self.is_test:
            return {"test": select_test_instances(task["Instances"], s.max_num_instances_per_task, s.seed, name)}
        return split_train_instances(
            task["Instances"], num_validation=s.num_validation_instances_per_train_task,
            cap=s.max_num_instances_per_train_task, fraction=s.train_fraction, seed=s.seed, task_name=name)

    def columns(self) -> dict[str, dict[str, list]]:
        """{split: {feature: list}}; raises SuperNITaskError naming the file if it is malformed."""
        if self._columns is None:
            task = superni.load_task(self.path)
            metadata = task_metadata(task)
            self._columns = {}
            for split, instances in self._select(task).items():
                cols = {
                    "inputs": [superni.encode_tk_instruct(task, inst, **self.encode_kwargs) for inst in instances],
                    "targets": [inst["output"][0] for inst in instances],
                    "references": [list(inst["output"]) for inst in instances],
                    "id": [str(inst["id"]) for inst in instances],
                }
                cols.update({key: [value] * len(instances) for key, value in metadata.items()})
                self._columns[split] = cols
        return self._columns

    def num_examples(self, split: str) -> int:
        """Examples of `split`; counts the selection without rendering prompts when they are not built yet."""
        if self._columns is not None:
            return len(self._columns[split]["id"])
        if self._counts is None:
            self._counts = {k: len(v) for k, v in self._select(superni.load_task(self.path)).items()}
        return self._counts[split]

    def dataset_fn(self, split: str, shuffle_files: bool = False, seed: Optional[int] = None) -> tf.data.Dataset:
        """seqio FunctionDataSource signature; one in-memory 'file', so shuffle_files / seed do nothing."""
        del shuffle_files, seed
        if split not in self.splits:
            raise ValueError(f"{self.path}: this SuperNI task has splits {self.splits}, not {split!r}.")
        columns = dict(self.columns()[split])
        columns["references"] = tf.ragged.constant(columns["references"], dtype=tf.string, ragged_rank=1)
        if not columns["id"]:  # from_tensor_slices cannot infer shapes of empty lists
            columns = {k: tf.constant([], tf.string) if k != "references" else v for k, v in columns.items()}
        return tf.data.Dataset.from_tensor_slices(columns)


def postprocess(output: Any, example: Optional[dict] = None, is_target: bool = False) -> Any:
    """Predictions pass through; for targets returns the example's acceptable outputs (str) for superni_metrics."""
    if is_target and example is not None and "references" in example:
        return [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in example["references"]]
    return output


# ----------------------------------------------------------------------------------------------------------
# Registration.

@dataclasses.dataclass
class SuperNIRegistration:
    """What register_superni registered: seqio names, the SuperNI names skipped, and the recorded settings."""

    train_mixture: str
    test_mixture: str
    train_tasks: list[str]
    test_tasks: list[str]
    missing_tasks: list[str]
    selection: SelectionConfig
    encoding: dict[str, Any]
    task_data: dict[str, _TaskData] = dataclasses.field(repr=False)
    prefix: str = "superni"


def _encoding_kwargs(encoding: Union[str, Mapping[str, Any]], max_source_length: Optional[int],
                     vocabulary: seqio.Vocabulary) -> dict[str, Any]:
    if isinstance(encoding, str):
        if encoding not in superni.ENCODINGS:
            raise SuperNISplitError(
                f"encoding={encoding!r} is not one of {sorted(superni.ENCODINGS)}; or pass a dict of "
                "encode_tk_instruct options (add_task_name, add_task_definition, num_pos_examples, ...).")
        kwargs = dict(superni.ENCODINGS[encoding])
    else:
        kwargs = dict(encoding)
    if max_source_length is not None:
        kwargs.update(max_source_length=max_source_length, **superni.seqio_length_fns(vocabulary))
    return kwargs


def _present_tasks(data_dir: str, names: list[str], list_path: str, missing_tasks: str) -> tuple[list, list]:
    present = [n for n in names if os.path.isfile(os.path.join(data_dir, "tasks", f"{n}.json"))]
    missing = [n for n in names if n not in set(present)]
    if missing and missing_tasks == "error":
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SuperNISplitError(
            f"{list_path} names {len(missing)} task(s) with no file in {os.path.join(data_dir, 'tasks')}: {shown}. "
            "Use a complete natural-instructions checkout, or pass missing_tasks='skip' to register only the "
            "tasks that are present.")
    if missing:
        logger.warning("%s: %d listed tasks have no task file and are skipped.", list_path, len(missing))
    return present, missing


def _replace_task(name: str, data: _TaskData, output_features: Mapping[str, seqio.Feature]) -> None:
    if name in seqio.TaskRegistry.names():  # re-registration replaces (seqio raises on duplicates)
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn=data.dataset_fn, splits=data.splits),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=output_features,
        postprocess_fn=postprocess,
        metric_fns=[superni_metrics],
    )


def _replace_mixture(name: str, tasks: list, default_rate: Any) -> None:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    if tasks:
        seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


def register_superni(
    data_dir: str,
    *,
    split_name: str = "default",
    encoding: Union[str, Mapping[str, Any]] = "def_pos_2",
    max_num_instances_per_task: Optional[int] = OFFICIAL_TEST_INSTANCES,
    max_num_instances_per_train_task: Optional[int] = None,
    train_fraction: Optional[float] = None,
    train_percentage: Optional[float] = None,
    num_validation_instances_per_train_task: int = 10,
    max_source_length: Optional[int] = None,
    vocabulary: Optional[Union[seqio.Vocabulary, str]] = None,
    seed: int = 42,
    prefix: str = "superni",
    missing_tasks: str = "error",
    validate: bool = False,
    downstream_splits: bool = False,
    num_downstream_train_instances: Optional[int] = None,
    num_downstream_validation_instances: int = 10,
    only_tasks: Optional[Sequence[str]] = None,
) -> SuperNIRegistration:
    """Registers one seqio Task per task of `splits/<split_name>` and the mixtures `<prefix>_<split_name>_train` /
    `<prefix>_<split_name>_test`. Calling it again with the same names replaces the earlier registration.

    Args:
      data_dir: a natural-instructions checkout (`tasks/*.json`, `splits/<split_name>/{train,test}_tasks.txt`).
      split_name: the folder under `splits/` ("default": 757 English train / 119 test tasks).
      encoding: a name of itjax.data.superni.ENCODINGS ("def_pos_2", "input_only", ...) or a dict of
        encode_tk_instruct options.
      max_num_instances_per_task: cap of each test task's "test" split (Tk-Instruct: 100; None: all).
      max_num_instances_per_train_task: cap of each train task's "train" split (10, 100, 200, 1000, None: all).
      train_fraction / train_percentage: keep this share of each train task's train pool instead of a cap
        (0.1 or 10 for 10%); nested like the caps.
      num_validation_instances_per_train_task: held out per train task as "validation" (at most half the task).
      max_source_length: token budget of the rendered input (the collator adds examples only while it fits).
      vocabulary: seqio vocabulary or a SentencePiece model path for inputs / targets (default: the quickstart
        vocabulary, which runs offline; for T5 use its sentencepiece.model).
      seed: the recorded seed of every instance permutation.
      prefix: seqio name prefix of tasks and mixtures.
      missing_tasks: "error" (default) if a split list names a task without a file, or "skip" to register the rest.
      validate: load and check every task file now (default: on first use of each task).
      downstream_splits: give test tasks "train" / "validation" / "test" splits (the downstream partition of the
        module docstring: test = the official first 100, validation the next 10, train from the rest).
      num_downstream_train_instances: with downstream_splits, each test task's "train" size (100, 200, 1000;
        None: all); nested prefixes of one seeded order.
      num_downstream_validation_instances: with downstream_splits, each test task's "validation" size (10).
      only_tasks: register only these SuperNI task names of the split lists (e.g. a few test tasks for a small
        study); a name in neither list is an error naming it.
    """
    if train_percentage is not None:
        if train_fraction is not None:
            raise SuperNISplitError("Set train_fraction or train_percentage, not both.")
        train_fraction = train_percentage / 100.0
    if missing_tasks not in ("error", "skip"):
        raise SuperNISplitError(f"missing_tasks={missing_tasks!r}: use 'error' or 'skip'.")
    selection = SelectionConfig(seed, max_num_instances_per_task, max_num_instances_per_train_task, train_fraction,
                                num_validation_instances_per_train_task, downstream_splits,
                                num_downstream_train_instances, num_downstream_validation_instances)
    vocabulary = _vocabulary(vocabulary)
    encode_kwargs = _encoding_kwargs(encoding, max_source_length, vocabulary)
    output_features = {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
    }

    split_dir = os.path.join(data_dir, "splits", split_name)
    lists = {role: os.path.join(split_dir, f"{role}_tasks.txt") for role in ("train", "test")}
    names = {role: read_task_list(path) for role, path in lists.items()}
    if only_tasks is not None:
        unknown = [n for n in only_tasks if n not in set(names["train"]) | set(names["test"])]
        if unknown:
            raise SuperNISplitError(f"only_tasks names {', '.join(unknown)}, listed in neither {lists['train']} nor "
                                    f"{lists['test']}; check the names.")
        names = {role: [n for n in listed if n in set(only_tasks)] for role, listed in names.items()}
    overlap = sorted(set(names["train"]) & set(names["test"]))
    if overlap:
        raise SuperNISplitError(f"{split_dir}: tasks listed as both train and test: {', '.join(overlap[:5])}.")

    registered: dict[str, list[str]] = {}
    task_data: dict[str, _TaskData] = {}
    missing: list[str] = []
    for role in ("train", "test"):
        present, absent = _present_tasks(data_dir, names[role], lists[role], missing_tasks)
        missing += absent
        registered[role] = []
        for superni_name in present:
            name = seqio_task_name(superni_name, prefix)
            path = os.path.join(data_dir, "tasks", f"{superni_name}.json")
            data = _TaskData(path, role == "test", selection, encode_kwargs)
            if validate:
                data.columns()
            _replace_task(name, data, output_features)
            task_data[name] = data
            registered[role].append(name)

    _REGISTERED_TASK_DATA[prefix] = task_data
    train_mixture, test_mixture = f"{prefix}_{split_name}_train", f"{prefix}_{split_name}_test"
    # Examples-proportional rates (Tk-Instruct concatenates the capped train tasks); evaluated when sampled.
    _replace_mixture(train_mixture, registered["train"],
                     lambda task: float(task_data[task.name].num_examples("train")))
    # Downstream partition: multi-task training on the test tasks mixes them examples-proportionally too.
    _replace_mixture(test_mixture, registered["test"],
                     (lambda task: float(task_data[task.name].num_examples("train"))) if downstream_splits else 1.0)
    logger.info("Registered SuperNI split %r: %d train / %d test tasks (%d missing), seed %d, %s, encoding %r.",
                split_name, len(registered["train"]), len(registered["test"]), len(missing), seed, selection,
                encoding)
    return SuperNIRegistration(train_mixture, test_mixture, registered["train"], registered["test"], missing,
                               selection, dict(encode_kwargs), task_data, prefix)


def _vocabulary(vocabulary: Optional[Union[seqio.Vocabulary, str]]) -> seqio.Vocabulary:
    if vocabulary is None:
        from itjax.tasks import quickstart  # the embedded vocabulary; imported lazily (registers quickstart)

        return quickstart.get_vocabulary()
    if isinstance(vocabulary, str):
        if not os.path.isfile(vocabulary):
            raise SuperNISplitError(f"vocabulary={vocabulary!r}: no SentencePiece model file at that path.")
        return seqio.SentencePieceVocabulary(vocabulary)
    return vocabulary
