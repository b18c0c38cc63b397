"""MMLU (Hendrycks et al., 2021) as seqio rank-classification Tasks, from the official CSV files.

    from itjax.tasks import mmlu
    reg = mmlu.register_mmlu("/data/mmlu/data", vocabulary="/path/to/spiece.model")
    reg.mixture             # 'mmlu' (all subjects); reg.category_mixtures: {'STEM': 'mmlu_stem', ...}
    reg.tasks               # ['mmlu_abstract_algebra', 'mmlu_anatomy', ...]

`data_dir` holds `dev/<subject>_dev.csv` and `test/<subject>_test.csv` (the official `data/` folder; a folder
holding that `data/` works too). Rows have no header: question, choice A, B, C, D, answer letter. Cells are used as
written (the official script reads them with pandas, which turns a cell "None" into "nan" and an all-number
column into floats; here text stays text). One Task per subject with a test file, split `test`.

Prompts (hendrycks/test evaluate.py, `gen_prompt` + `format_example`):
    "The following are multiple choice questions (with answers) about" + " " + " ".join(subject words) + ".\\n\\n"
    + per dev exemplar: question + "\\nA. " + a + "\\nB. " + b + "\\nC. " + c + "\\nD. " + d + "\\nAnswer: " + X + "\\n\\n"
    + the test question in the same form, ending "\\nAnswer:"
The official `format_subject` puts a space before every word, so the header reads "about  abstract algebra." with
two spaces; kept, to score the prompts the published numbers were measured on. The first `num_shots` (5) dev rows
are the exemplars; when the tokenized prompt does not fit TASK_FEATURE_LENGTHS['inputs'], exemplars are dropped
from the end until it does (as the official evaluation does); a question that does not fit even with no exemplar
stops the evaluation, naming the task and the length it needs.

Scoring: rank classification (as tasks/p3.py): each question becomes four examples whose targets are the letters
"A" .. "D" (`answer_prefix` + letter, no EOS); the evaluator scores each letter's log-likelihood (score_fn,
itjax.evaluation) and the highest-scoring letter is the answer. Metrics per subject: `rank_accuracy` (0-100;
`accuracy` is the teacher-forced token accuracy in itjax's evaluation) and `num_questions`. `mmlu_summary` turns
an evaluation's per-task results into accuracy per subject, per category (STEM, humanities, social sciences,
other: the official categories.py grouping) and the micro average over all questions.

From gin: --gin_bindings="import itjax.tasks.mmlu" --gin.register_mmlu.data_dir=/data/mmlu/data
    --gin.register_mmlu.vocabulary=/path/to/spiece.model --gin.EVAL_MIXTURE="@mmlu_mixture()"
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from itjax.tasks import common, p3
from itjax.tasks.prompt_length import length_check

logger = logging.getLogger(__name__)

LETTERS = ("A", "B", "C", "D")
SPLIT = "test"
NUM_SHOTS = 5

# hendrycks/test categories.py: subject -> subcategory, and category -> subcategories.
SUBCATEGORIES = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
CATEGORIES = {
    "STEM": ("physics", "chemistry", "biology", "computer science", "math", "engineering"),
    "humanities": ("history", "philosophy", "law"),
    "social sciences": ("politics", "culture", "economics", "geography", "psychology"),
    "other": ("other", "business", "health"),  # categories.py: "other (business, health, misc.)"
}


class MMLUDataError(ValueError):
    """An MMLU file that is missing or not in the official layout; the message names the file (and line)."""


def category(subject: str) -> Optional[str]:
    """The official category of a subject ('STEM', 'humanities', 'social sciences', 'other'); None if unknown."""
    sub = SUBCATEGORIES.get(subject)
    return next((name for name, subs in CATEGORIES.items() if sub in subs), None)


# ----------------------------------------------------------------------------------------------------------
# Files and prompt pieces.

def read_rows(path: str) -> list[tuple[str, str, str, str, str, str]]:
    """The rows of an MMLU CSV file: (question, A, B, C, D, answer letter), cells as written."""
    if not os.path.isfile(path):
        raise MMLUDataError(f"MMLU file {path} does not exist.")
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 6:
                raise MMLUDataError(f"{path}:{reader.line_num}: {len(row)} columns; MMLU rows have 6 (question, "
                                    "four choices, answer letter) and no header.")
            if row[5].strip() not in LETTERS:
                raise MMLUDataError(f"{path}:{reader.line_num}: answer column is {row[5]!r}, not one of A, B, C, D.")
            rows.append(tuple(row[:5]) + (row[5].strip(),))
    return rows


def header(subject: str) -> str:
    """The prompt's first line: official format_subject (a space before each word) inside the fixed sentence."""
    words = "".join(" " + word for word in subject.split("_"))
    return f"The following are multiple choice questions (with answers) about {words}.\n\n"


def format_question(row: Sequence[str], with_answer: bool) -> str:
    """question + "\\nA. .." .. "\\nD. .." + "\\nAnswer:" (+ " X\\n\\n" for an exemplar)."""
    text = row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row[1:5])) + "\nAnswer:"
    return text + f" {row[5]}\n\n" if with_answer else text


def _data_folder(data_dir: str) -> str:
    for folder in (data_dir, os.path.join(data_dir, "data")):
        if os.path.isdir(os.path.join(folder, "test")):
            return folder
    raise MMLUDataError(f"{os.path.join(data_dir, 'test')} does not exist; data_dir must hold the official "
                        "dev/<subject>_dev.csv and test/<subject>_test.csv files.")


def subjects_in(data_dir: str) -> list[str]:
    """Subjects with a test file, sorted (as the official script lists them)."""
    folder = os.path.join(_data_folder(data_dir), "test")
    names = sorted(f[:-len("_test.csv")] for f in os.listdir(folder) if f.endswith("_test.csv"))
    if not names:
        raise MMLUDataError(f"{folder} holds no <subject>_test.csv files.")
    return names


# ----------------------------------------------------------------------------------------------------------
# Tasks.

def _dataset_fn(split: str, shuffle_files: bool = False, seed: Optional[int] = None, *, columns: Mapping[str, Any],
                name: str) -> tf.data.Dataset:
    del shuffle_files, seed
    if split != SPLIT:
        raise ValueError(f"{name}: MMLU tasks have only the {SPLIT!r} split, not {split!r}.")
    n = len(columns["question"])
    shots = tf.constant(list(columns["shots"]), tf.string, shape=[len(columns["shots"])])
    return tf.data.Dataset.from_tensor_slices({
        "question": tf.constant(columns["question"], tf.string, shape=[n]),
        "targets": tf.constant(columns["targets"], tf.string, shape=[n]),
    }).map(lambda ex: {**ex, "header": tf.constant(columns["header"]), "shots": shots})


def build_prompt(ds: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None,
                 output_features: Optional[Mapping[str, seqio.Feature]] = None, *,
                 answer_prefix: str = "") -> tf.data.Dataset:
    """header + the first k exemplars + question, for the largest k (<= the number of shots) whose tokenized prompt
    (+ EOS if the inputs feature adds one) fits `sequence_length['inputs']` (all shots without a length; none
    when even k = 0 does not fit: tasks/prompt_length.py then names the length needed). Adds `answer_choices`
    (the four letters with `answer_prefix`) for expand_choices; `targets` (the answer) gets the same prefix."""
    limit = (sequence_length or {}).get("inputs")
    feature = (output_features or {}).get("inputs")

    def build(ex):
        num = ex["shots"].shape[0]
        prompts = tf.stack([tf.strings.join([ex["header"], tf.strings.reduce_join(ex["shots"][:k]), ex["question"]])
                            for k in range(num + 1)])  # k = 0 .. num exemplars
        if limit is None or feature is None:
            keep = num
        else:
            def length(texts):
                return tf.cast(feature.vocabulary.encode_tf(texts).row_lengths(), tf.int32) + int(feature.add_eos)

            def fewer_shots():  # tokenizes every candidate only when the full prompt does not fit
                return tf.maximum(tf.reduce_max(tf.where(length(prompts) <= limit, tf.range(num + 1), -1)), 0)

            keep = tf.cond(length(prompts[-1:])[0] <= limit, lambda: tf.constant(num), fewer_shots)
        return {"inputs": tf.gather(prompts, keep), "targets": answer_prefix + ex["targets"],
                "answer_choices": tf.constant([answer_prefix + letter for letter in LETTERS])}

    return ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)


def expand_choices(ds: tf.data.Dataset, output_features: Mapping[str, seqio.Feature], *,
                   choices: Sequence[str] = LETTERS) -> tf.data.Dataset:
    """Tokenized questions -> one row per answer choice (p3.rank_classification's rows, built after tokenizing, so
    each prompt is tokenized once, not once per choice): idx [2] (question, choice), inputs (+ _pretokenized),
    targets (the choice's tokens + _pretokenized), is_correct, weight. `choices`: the same for every question."""
    ids = [output_features["targets"].vocabulary.encode(choice) for choice in choices]
    n = len(choices)

    def rows(index, ex):  # [n, ...] tensors, one row per choice
        return {"idx": tf.stack([tf.fill([n], tf.cast(index, tf.int32)), tf.range(n, dtype=tf.int32)], axis=1),
                "inputs": tf.tile(ex["inputs"][None], [n, 1]),
                "inputs_pretokenized": tf.fill([n], ex["inputs_pretokenized"]),
                "targets_pretokenized": tf.constant(list(choices)),
                "is_correct": tf.equal(tf.constant(list(choices)), ex["targets_pretokenized"]),
                "weight": tf.ones([n], tf.float32)}

    if len({len(i) for i in ids}) == 1:  # the usual case: every letter is the same number of tokens
        return ds.enumerate().map(lambda i, ex: {**rows(i, ex), "targets": tf.constant(ids, tf.int32)}).unbatch()
    ragged = tf.ragged.constant(ids, dtype=tf.int32)
    return ds.enumerate().flat_map(lambda i, ex: tf.data.Dataset.range(n).map(
        lambda c: {**{k: v[c] for k, v in rows(i, ex).items()}, "targets": ragged[c]}))


def rank_metric(targets: Sequence[tuple], scores: Sequence[float]) -> dict[str, float]:
    """p3.rank_classification_metric (`rank_accuracy`, 0-100) plus `num_questions`."""
    return {**p3.rank_classification_metric(targets, scores), "num_questions": float(len({t[0][0] for t in targets}))}


@dataclasses.dataclass
class MMLURegistration:
    """What register_mmlu registered: task names, the all-subject mixture, {category: mixture}, {task: subject}."""

    tasks: list[str]
    mixture: str
    category_mixtures: dict[str, str]
    subjects: dict[str, str]


@gin.configurable
def register_mmlu(data_dir: str, *, subjects: Optional[Sequence[str]] = None, num_shots: int = NUM_SHOTS,
                  vocabulary: Optional[Union[seqio.Vocabulary, str]] = None, inputs_add_eos: bool = True,
                  answer_prefix: str = "", prefix: str = "mmlu") -> MMLURegistration:
    """Registers `<prefix>_<subject>` Tasks (split "test"), the mixture `<prefix>` and one mixture per official
    category (`<prefix>_stem`, `_humanities`, `_social_sciences`, `_other`; subjects outside the official list
    are only in `<prefix>`). Reads every file now, so a missing or malformed file fails here, naming it.

    Args:
      data_dir: the official `data/` folder (dev/, test/) or the folder holding it.
      subjects: subjects to register (default: every test file); each needs its dev file.
      num_shots: dev exemplars per prompt (official: 5), fewer when the prompt does not fit.
      vocabulary: seqio vocabulary or SentencePiece model path (default: the quickstart vocabulary, offline).
      inputs_add_eos: end the tokenized prompt with EOS (T5 encoders; Flan-T5's MMLU evaluation did); False for
        decoder-only models, where the letter must follow "Answer:" directly.
      answer_prefix: text before each letter target. "" scores the letter as the vocabulary tokenizes it alone
        (SentencePiece: "▁A", the token after "Answer:"); byte-level BPE vocabularies (Llama 3) need " " so the
        target is the " A" token that follows "Answer:" in running text.
    """
    folder = _data_folder(data_dir)
    names = list(subjects) if subjects is not None else subjects_in(data_dir)
    vocabulary = common.vocabulary_from(vocabulary, MMLUDataError)
    features = {"inputs": seqio.Feature(vocabulary=vocabulary, add_eos=inputs_add_eos, required=True),
                "targets": seqio.Feature(vocabulary=vocabulary, add_eos=False, required=True)}
    tasks, task_subjects = [], {}
    by_category: dict[str, list[str]] = {name: [] for name in CATEGORIES}
    for subject in names:
        test = read_rows(os.path.join(folder, "test", f"{subject}_test.csv"))
        dev = read_rows(os.path.join(folder, "dev", f"{subject}_dev.csv"))[:num_shots]
        if not test:
            raise MMLUDataError(f"{os.path.join(folder, 'test', f'{subject}_test.csv')} has no rows.")
        columns = {"header": header(subject), "shots": [format_question(row, True) for row in dev],
                   "question": [format_question(row, False) for row in test], "targets": [row[5] for row in test]}
        name = f"{prefix}_{subject}"
        source = seqio.FunctionDataSource(functools.partial(_dataset_fn, columns=columns, name=name), splits=(SPLIT,))
        common.replace_in_registry(seqio.TaskRegistry, name, source=source, output_features=features,
                                   preprocessors=[functools.partial(build_prompt, answer_prefix=answer_prefix),
                                                  seqio.preprocessors.tokenize, length_check(name),
                                                  functools.partial(expand_choices,
                                                                    choices=[answer_prefix + x for x in LETTERS]),
                                                  seqio.preprocessors.append_eos_after_trim],
                                   postprocess_fn=p3.rank_classification_postprocess, metric_fns=[rank_metric])
        tasks.append(name)
        task_subjects[name] = subject
        if category(subject) is None:
            logger.warning("MMLU subject %r is not in the official category list; it is only in mixture %r.",
                           subject, prefix)
        else:
            by_category[category(subject)].append(name)
    common.replace_in_registry(seqio.MixtureRegistry, prefix, tasks=tasks, default_rate=1.0)
    category_mixtures = {}
    for cat, members in by_category.items():
        if members:
            category_mixtures[cat] = f"{prefix}_{cat.lower().replace(' ', '_')}"
            common.replace_in_registry(seqio.MixtureRegistry, category_mixtures[cat], tasks=members,
                                       default_rate=1.0)
    logger.info("Registered %d MMLU subjects (%d-shot) from %s.", len(tasks), num_shots, folder)
    return MMLURegistration(tasks, prefix, category_mixtures, task_subjects)


@gin.configurable
def mmlu_mixture(category_name: Optional[str] = None) -> str:
    """Registers MMLU with the gin-bound `register_mmlu` arguments and returns the mixture's name (all subjects,
    or one official category: 'STEM', 'humanities', 'social sciences', 'other'). For a mixture macro:
    `EVAL_MIXTURE = @mmlu_mixture()`."""
    reg = register_mmlu()  # data_dir etc. come from gin
    if category_name is None:
        return reg.mixture
    if category_name not in reg.category_mixtures:
        raise ValueError(f"mmlu_mixture(category_name={category_name!r}): registered categories are "
                         f"{sorted(reg.category_mixtures)}.")
    return reg.category_mixtures[category_name]


def mmlu_summary(per_task: Mapping[str, Mapping[str, float]], prefix: str = "mmlu") -> dict[str, Any]:
    """Accuracy per subject, per category and over all questions, from an evaluation's {task: metrics} (the
    `<prefix>_<subject>` tasks' `rank_accuracy` and `num_questions`; other tasks and 'all' are ignored). Works on
    results read back from metrics.jsonl too: subjects come from the task names, nothing needs to be registered.

    Returns {'subjects': {subject: accuracy}, 'categories': {category: accuracy}, 'average': accuracy,
    'num_questions': int}; category and overall numbers are micro averages (every question counts once), as the
    official script's "Average accuracy" and the category figures of the MMLU paper.
    """
    correct: dict[str, float] = {}
    counts: dict[str, float] = {}
    for task, record in per_task.items():
        if not task.startswith(prefix + "_") or "rank_accuracy" not in record or "num_questions" not in record:
            continue
        subject = task[len(prefix) + 1:]
        counts[subject] = record["num_questions"]
        correct[subject] = record["rank_accuracy"] / 100.0 * record["num_questions"]
    if not counts:
        raise ValueError(f"No MMLU task results among {sorted(per_task)}; register_mmlu registers them.")

    def accuracy(subjects):
        total = sum(counts[s] for s in subjects)
        return 100.0 * sum(correct[s] for s in subjects) / total

    categories = {}
    for cat in CATEGORIES:
        members = [s for s in counts if category(s) == cat]
        if members:
            categories[cat] = accuracy(members)
    return {"subjects": {s: accuracy([s]) for s in sorted(counts)}, "categories": categories,
            "average": accuracy(list(counts)), "num_questions": int(sum(counts.values()))}
