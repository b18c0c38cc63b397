"""SeqIO registrations of the built-in quickstart data (embedded in the package; needs no download).

One Task per synthetic SuperNI task file in `tasks/data/quickstart/` (made by scripts/make_quickstart_data.py),
named `quickstart_<short name>` (`quickstart_copy_words`, ...), and the Mixture `quickstart` over all of them
at equal rates (the tasks have the same size).

Each example is rendered in Python with the Tk-Instruct "definition + 2 positive examples" encoding
(itjax.data.superni.encode_tk_instruct, with the collator's token-budget rule at MAX_SOURCE_LENGTH). Features
before tokenization:

    inputs     tf.string []      the rendered prompt ("Definition: ... Output: ")
    targets    tf.string []      the first acceptable output (the training target)
    references tf.string [None]  all acceptable outputs (scored by max over references)
    task_name  tf.string []      SuperNI task name, e.g. "task9001_copy_words"
    id         tf.string []      SuperNI instance id

Splits: "validation" = the first 100 instances of each file, "train" = the rest (itjax.data.synthetic).
`inputs` and `targets` are tokenized with QUICKSTART_VOCABULARY and end with EOS; MAX_SOURCE_LENGTH (inputs)
and MAX_TARGET_LENGTH bound every example. The longest actually are 101 and 7 tokens (EOS included; train and
validation, counted by `python -m itjax.data stats quickstart`), so gin/quickstart.gin's TASK_FEATURE_LENGTHS
{'inputs': 112, 'targets': 8} cut nothing.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import seqio
import tensorflow as tf

from itjax.data import superni, synthetic
from itjax.metrics import superni_metrics

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quickstart")
SPM_PATH = os.path.join(DATA_DIR, "spm.model")
MAX_SOURCE_LENGTH = 128  # tokens incl. EOS; the longest rendered prompt has 101
MAX_TARGET_LENGTH = 16  # tokens incl. EOS; the longest target has 7
MIXTURE_NAME = "quickstart"
SPLITS = synthetic.SPLITS

QUICKSTART_VOCABULARY = seqio.SentencePieceVocabulary(SPM_PATH, extra_ids=0)


def get_vocabulary() -> seqio.SentencePieceVocabulary:
    """The quickstart SentencePiece vocabulary (640 pieces, T5 ids: pad 0, eos 1, unk 2)."""
    return QUICKSTART_VOCABULARY


def seqio_task_name(superni_name: str) -> str:
    """'task9001_copy_words' -> 'quickstart_copy_words'."""
    return "quickstart_" + superni_name.split("_", 1)[1]


SUPERNI_TASK_NAMES = tuple(synthetic.task_names())
TASK_NAMES = tuple(seqio_task_name(name) for name in SUPERNI_TASK_NAMES)

OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=QUICKSTART_VOCABULARY, add_eos=True, required=True),
    "targets": seqio.Feature(vocabulary=QUICKSTART_VOCABULARY, add_eos=True, required=True),
}


def _task_path(superni_name: str) -> str:
    path = os.path.join(DATA_DIR, f"{superni_name}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Quickstart task file {path} is missing; run `python scripts/make_quickstart_data.py` to create it."
        )
    return path


@functools.lru_cache(maxsize=None)
def rendered_examples(superni_name: str, split: str) -> dict[str, Any]:
    """Columns of one task split, rendered once per process: inputs, targets, references (ragged), ids."""
    task = superni.load_task(_task_path(superni_name))
    length_fns = superni.seqio_length_fns(QUICKSTART_VOCABULARY)
    instances = synthetic.split_instances(task["Instances"], split)
    return {
        "inputs": [
            superni.encode_tk_instruct(task, inst, max_source_length=MAX_SOURCE_LENGTH, **length_fns)
            for inst in instances
        ],
        "targets": [inst["output"][0] for inst in instances],
        "references": [list(inst["output"]) for inst in instances],
        "task_name": [task["Task"]] * len(instances),
        "id": [inst["id"] for inst in instances],
    }


def _dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None, *, superni_name: str) -> tf.data.Dataset:
    """The tf.data source of one task. One in-memory 'file': shuffle_files and seed have nothing to do here
    (seqio shuffles examples after preprocessing)."""
    del shuffle_files, seed
    if split not in SPLITS:
        raise ValueError(f"{seqio_task_name(superni_name)} has splits {SPLITS}, not {split!r}.")
    columns = dict(rendered_examples(superni_name, split))
    columns["references"] = tf.ragged.constant(columns["references"], dtype=tf.string)
    return tf.data.Dataset.from_tensor_slices(columns)


def postprocess(output: Any, example: Optional[dict] = None, is_target: bool = False) -> Any:
    """Predictions pass through unchanged; for targets (is_target=True) returns the example's list of
    acceptable outputs as Python str, so superni_metrics scores the max over references."""
    if is_target and example is not None and "references" in example:
        return [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in example["references"]]
    return output


def _register_task(superni_name: str) -> None:
    name = seqio_task_name(superni_name)
    if name in seqio.TaskRegistry.names():  # module reloaded: replace, seqio raises on duplicates
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            dataset_fn=functools.partial(_dataset_fn, superni_name=superni_name), splits=SPLITS
        ),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=OUTPUT_FEATURES,
        postprocess_fn=postprocess,
        metric_fns=[superni_metrics],
    )


def register() -> None:
    """(Re-)registers the quickstart Tasks and Mixture; safe to call more than once."""
    for superni_name in SUPERNI_TASK_NAMES:
        _register_task(superni_name)
    if MIXTURE_NAME in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(MIXTURE_NAME)
    seqio.MixtureRegistry.add(MIXTURE_NAME, list(TASK_NAMES), default_rate=1.0)


register()
