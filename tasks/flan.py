"""FLAN-style template tasks (zero-shot / few-shot / no-options / CoT / input inversion) and the FLAN 2022 mixture.

    from itjax.tasks import flan
    source = flan.jsonl_source({"train": "rte_train.jsonl", "validation": "rte_val.jsonl"})
    reg = flan.register_flan_templates("rte", source, RTE_TEMPLATES, vocabulary=vocab)
    reg.tasks   # {"zero_shot": "rte_template_0to10_zero_shot", "five_shot": "rte_template_0to10_five_shot", ...}
    reg.mixture # "rte_variants": all of them at equal rates

Task names follow FLAN (flan/v2/tasks.py, few_shot.ShotConfig): `<task>[_cot|_input_inversion]_template_0to<T>
[_no_opt]_<k>_shot`, T the number of templates used, k in words ("zero", "one", ..., "ten"). Every variant task is
one seqio Task over all T templates, record n rendered with template n mod T (FLAN's batch formatter); the
rendering rules are those of itjax.data.templates (cites the FLAN files). Few-shot exemplars come from the
`train` split through seqio.experimental.FewshotDataSource (the FLAN mechanism): a seeded shuffle of the train split,
so the draws are fixed by the `seed` given to get_dataset (seed 0 when shuffle=False). As in FLAN, an exemplar
drawn for a `train` query may be that query itself. A few-shot task reports its source's sizes for mixing rates
(FLAN subtracts num_shots; negligible either way).

Features after preprocessing: `inputs`, `targets` (token ids, EOS added), `inputs_pretokenized`,
`targets_pretokenized`, `_template_idx` (int32), `_template_type` (FLAN's "zs_opt", "zs_noopt", "fs_opt",
"fs_noopt"), `_task_name` (the base task name), `_num_exemplars` (few-shot only) and every field of the record
(zero-shot; few-shot keeps the query's fields), so postprocess / metric functions see the metadata.

`register_flan2022_mixture` builds the FLAN 2022 collection (flan/v2/mixtures.py): one sub-mixture per collection
with examples-proportional rates capped per task (FLAN 30k, T0 20k, CoT 100k, NIv2 5k, Dialog 200k: mixtures.py
DEFAULT_MIXTURE_MAX_EXAMPLES) and the default final weights flan2021 0.4, t0 0.32, niv2 0.2, cot 0.05, dialog 0.03
(FLAN's mixtures.py itself uses the rates 4 : 3 : 1 : 1 : 1; pass `weights=` to change them), each weight being the
final share of its collection's examples (itjax.data.mixing).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

from itjax.config import ConfigError
from itjax.data import mixing
from itjax.data import templates as tmpl

logger = logging.getLogger(__name__)

SHOT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_VARIANT = re.compile(r"^(?:(cot|input_inversion)_)?(no_opt_)?(" + "|".join(SHOT_WORDS) + r")_shot$")

FLAN2022_COLLECTIONS = ("flan2021", "t0", "niv2", "cot", "dialog")
FLAN2022_CAPS = {"flan2021": 30000, "t0": 20000, "niv2": 5000, "cot": 100000, "dialog": 200000}
FLAN2022_WEIGHTS = {"flan2021": 0.4, "t0": 0.32, "niv2": 0.2, "cot": 0.05, "dialog": 0.03}


class FlanTaskError(ConfigError):
    """A FLAN-style registration that cannot be built; the message names the task and setting."""


# ----------------------------------------------------------------------------------------------------------
# Record sources: JSONL files / in-memory records -> seqio DataSource (dicts of tf.string features).

class RecordsDataSource(seqio.FunctionDataSource):
    """A DataSource over Python records (dicts), read once per split on first use.

    The first record of a split fixes its schema: each field is a string (numbers and booleans are converted
    with str()) or a list of strings (1-D feature). A later record that lacks a schema field, has None, a nested
    object, or a list where the schema has a string (or the reverse) is malformed: it is skipped, counted
    (`malformed[split]`) and logged with its location; more than `max_malformed_fraction` of a split malformed
    is an error naming the first locations. Extra fields of a record are ignored.
    """

    def __init__(self, load_split: Callable[[str], Iterable[tuple[str, Any]]], splits: Sequence[str], *,
                 name: str, max_malformed_fraction: float = 0.0):
        if not 0.0 <= max_malformed_fraction <= 1.0:
            raise FlanTaskError(f"max_malformed_fraction={max_malformed_fraction!r} must be in [0, 1].")
        self._load_split, self._name, self._max_malformed = load_split, name, max_malformed_fraction
        self._columns: dict[str, dict[str, list]] = {}
        self.malformed: dict[str, int] = {}
        super().__init__(dataset_fn=self._dataset_fn, splits=tuple(splits))

    def __repr__(self):
        return f"RecordsDataSource({self._name!r}, splits={self.splits})"

    def columns(self, split: str) -> dict[str, list]:
        """{field: values} of the split's valid records (loaded and checked on first use)."""
        if split not in self.splits:
            raise FlanTaskError(f"{self._name}: no split {split!r}; splits are {list(self.splits)}.")
        if split not in self._columns:
            self._columns[split] = self._read(split)
        return self._columns[split]

    def num_input_examples(self, split: str) -> int:
        cols = self.columns(split)
        return len(next(iter(cols.values()))) if cols else 0

    def _read(self, split: str) -> dict[str, list]:
        schema: Optional[dict[str, bool]] = None  # field -> is a list
        cols: dict[str, list] = {}
        bad: list[str] = []
        total = 0
        for location, record in self._load_split(split):
            total += 1
            if schema is None:
                schema = _schema(record, location)
                cols = {k: [] for k in schema}
            values = _conform(record, schema)
            if values is None:
                bad.append(location)
                continue
            for k, v in values.items():
                cols[k].append(v)
        self.malformed[split] = len(bad)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            message = (f"{self._name} [{split}]: {len(bad)} of {total} records are malformed (missing or mistyped "
                       f"fields {sorted(schema)} of the first record) and were skipped: {shown}.")
            if len(bad) > self._max_malformed * total:
                raise FlanTaskError(message + f" That is more than max_malformed_fraction={self._max_malformed}; "
                                    "fix the records or raise the threshold.")
            logger.warning(message)
        return cols

    def _dataset_fn(self, split: str, shuffle_files: bool = False, seed: Optional[int] = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one in-memory "file"; seqio shuffles examples
        cols = self.columns(split)
        if not cols or not next(iter(cols.values())):
            raise FlanTaskError(f"{self._name} [{split}]: no records.")
        tensors = {k: tf.ragged.constant(v, dtype=tf.string, ragged_rank=1) if isinstance(v[0], list)
                   else tf.constant(v, dtype=tf.string) for k, v in cols.items()}
        return tf.data.Dataset.from_tensor_slices(tensors)


def _scalar(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    return None


def _schema(record: Any, location: str) -> dict[str, bool]:
    if not isinstance(record, Mapping) or not record:
        raise FlanTaskError(f"{location}: the first record must be a non-empty JSON object, got {record!r}.")
    schema = {}
    for k, v in record.items():
        if isinstance(v, list) and all(_scalar(x) is not None for x in v):
            schema[k] = True
        elif _scalar(v) is not None:
            schema[k] = False
        else:
            raise FlanTaskError(f"{location}: field {k!r} of the first record is {v!r}; fields must be strings, "
                                "numbers, booleans or lists of them (flatten nested objects first).")
    return schema


def _conform(record: Any, schema: Mapping[str, bool]) -> Optional[dict[str, Any]]:
    """The record's schema fields as str / list[str], or None if malformed."""
    if not isinstance(record, Mapping):
        return None
    out = {}
    for k, is_list in schema.items():
        v = record.get(k)
        if is_list:
            if not isinstance(v, list) or any(_scalar(x) is None for x in v):
                return None
            out[k] = [_scalar(x) for x in v]
        else:
            if _scalar(v) is None:
                return None
            out[k] = _scalar(v)
    return out


def _read_jsonl(path: str) -> Iterable[tuple[str, Any]]:
    with tf.io.gfile.GFile(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FlanTaskError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                    f"{e.start + 1}); re-encode the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FlanTaskError(f"{path}:{lineno}: bad JSON ({e.msg} at column {e.colno}); each line must be "
                                    "one JSON object.") from None
            yield f"{path}:{lineno}", record


def jsonl_source(split_to_paths: Mapping[str, Union[str, Sequence[str]]], *,
                 max_malformed_fraction: float = 0.0) -> RecordsDataSource:
    """A DataSource over JSON Lines files (one JSON object per line; blank lines skipped), per split.

    Non-UTF-8 bytes or a line that is not JSON raise FlanTaskError naming the file and line; malformed records
    follow RecordsDataSource's rule.
    """
    paths = {s: [p] if isinstance(p, str) else list(p) for s, p in split_to_paths.items()}
    for split, ps in paths.items():
        for p in ps:
            if not tf.io.gfile.exists(p):
                raise FlanTaskError(f"JSONL file {p!r} (split {split!r}) does not exist.")

    def load(split):
        for p in paths[split]:
            yield from _read_jsonl(p)

    name = ", ".join(p for ps in paths.values() for p in ps)
    return RecordsDataSource(load, list(paths), name=name, max_malformed_fraction=max_malformed_fraction)


def records_source(split_to_records: Mapping[str, Sequence[Mapping[str, Any]]], *, name: str = "records",
                   max_malformed_fraction: float = 0.0) -> RecordsDataSource:
    """A DataSource over in-memory records ({split: [dict, ...]}); locations are reported as name[split][i]."""
    data = {s: list(r) for s, r in split_to_records.items()}
    return RecordsDataSource(lambda s: ((f"{name}[{s}][{i}]", r) for i, r in enumerate(data[s])), list(data),
                             name=name, max_malformed_fraction=max_malformed_fraction)


# ----------------------------------------------------------------------------------------------------------
# Variant tasks.

@dataclasses.dataclass(frozen=True)
class Variant:
    """One FLAN prompt setting: kind ("plain" / "cot" / "input_inversion"), answer options or not, shots."""

    kind: str
    no_opt: bool
    num_shots: int

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        m = _VARIANT.match(spec)
        if not m:
            raise FlanTaskError(f"variant {spec!r} is not [cot_|input_inversion_][no_opt_]<k>_shot with k in "
                                f"{SHOT_WORDS} (e.g. 'zero_shot', 'no_opt_five_shot', 'cot_zero_shot').")
        return cls(m.group(1) or "plain", bool(m.group(2)), SHOT_WORDS.index(m.group(3)))

    def task_name(self, base: str, num_templates: int) -> str:
        kind = "" if self.kind == "plain" else f"_{self.kind}"
        opt = "_no_opt" if self.no_opt else ""
        return f"{base}{kind}_template_0to{num_templates}{opt}_{SHOT_WORDS[self.num_shots]}_shot"

    @property
    def template_type(self) -> str:  # FLAN's _template_type values
        return ("zs" if self.num_shots == 0 else "fs") + ("_noopt" if self.no_opt else "_opt")


@dataclasses.dataclass
class FlanRegistration:
    """What register_flan_templates registered: {variant spec: task name}, the mixture of them, templates used."""

    tasks: dict[str, str]
    mixture: str
    num_templates: int
    templates: tuple[tmpl.Template, ...]


class _FewshotSource(seqio.experimental.FewshotDataSource):
    """FewshotDataSource that reports the original source's sizes (examples-proportional rates need them)."""

    def num_input_examples(self, split: str) -> Optional[int]:
        return self._original_source.num_input_examples(split)


@seqio.map_over_dataset
def _add_metadata(ex, task_name: str, template_type: str):
    ex = dict(ex)
    ex["_task_name"] = tf.constant(task_name)
    ex["_template_type"] = tf.constant(template_type)
    return ex


def _variant_templates(variant: Variant, templates, cot_templates, inversion_templates, cot_field, name):
    if variant.kind == "cot":
        chosen = cot_templates or tuple(tmpl.cot_template(t, cot_field) for t in templates)
    elif variant.kind == "input_inversion":
        chosen = inversion_templates or tuple(tmpl.inverted_template(t) for t in templates)
    else:
        chosen = templates
    if variant.no_opt:
        chosen = tuple(tmpl.no_options_template(t, few_shot=variant.num_shots > 0) for t in chosen)
    return tmpl.as_templates(chosen, name)


def _bind(preprocessors, output_features):
    """Record preprocessors as plain dataset -> dataset functions (FewshotDataSource calls them so)."""
    return [seqio.utils.add_kwargs_to_transform(p, output_features=output_features, sequence_length=None)
            for p in preprocessors]


def _tokenize_steps():
    return [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]


def _prune_step(num_shots: int, max_input_length: Optional[int]):
    def prune(ds, sequence_length=None, output_features=None):
        length = max_input_length or (sequence_length or {}).get("inputs")
        feature = output_features["inputs"]
        return tmpl.join_exemplars(ds, num_shots=num_shots, vocabulary=feature.vocabulary,
                                   max_input_length=length, add_eos=feature.add_eos)

    return prune


def _replace_task(name: str, **kwargs) -> None:
    if name in seqio.TaskRegistry.names():  # re-registration replaces (seqio raises on duplicates)
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, **kwargs)


def register_flan_templates(
    name: str,
    source: seqio.DataSource,
    templates: Sequence[tmpl.TemplateLike],
    *,
    vocabulary: seqio.Vocabulary,
    variants: Optional[Sequence[str]] = None,
    options_field: str = "options",
    num_templates: Optional[int] = None,
    preprocessors: Sequence[Callable] = (),
    cot_templates: Optional[Sequence[tmpl.TemplateLike]] = None,
    cot_field: str = "chain_of_thought",
    inversion_templates: Optional[Sequence[tmpl.TemplateLike]] = None,
    max_input_length: Optional[int] = None,
    train_split: str = "train",
    postprocess_fn: Optional[Callable] = None,
    metric_fns: Sequence[Callable] = (),
) -> FlanRegistration:
    """Registers one seqio Task per variant of a FLAN-style templated task, and the mixture `<name>_variants`.

    Args:
      name: the base task name (seqio-safe: letters, digits, '_').
      source: any seqio DataSource (TfdsDataSource, FunctionDataSource, TextLineDataSource, TFRecordDataSource,
        jsonl_source / records_source). Its examples, after `preprocessors`, must be dicts with the fields the
        templates name.
      templates: Template or (inputs_pattern, targets_pattern) pairs; the first `num_templates` are used.
      vocabulary: the seqio vocabulary of `inputs` and `targets` (also counts few-shot prompt tokens).
      variants: specs `[cot_|input_inversion_][no_opt_]<k>_shot` (k = zero .. ten). Default: zero_shot and
        five_shot, plus no_opt_zero_shot and no_opt_five_shot if a template uses {options_}.
      options_field: the list field `{options_}` is rendered from.
      preprocessors: record preprocessors run on the source first (e.g. parse text lines, FLAN's per-dataset
        preprocessors that produce `options` / `answer`); they take (dataset[, output_features]).
      cot_templates / inversion_templates: hand-written templates for the cot / input_inversion variants
        (FLAN's way); default: derived with itjax.data.templates.cot_template / inverted_template.
      cot_field: the rationale field of derived CoT targets.
      max_input_length: few-shot prompt budget in tokens; None: TASK_FEATURE_LENGTHS["inputs"] at get_dataset.
      train_split: where few-shot exemplars come from.
      postprocess_fn, metric_fns: passed to every variant Task.
    """
    base = tmpl.as_templates(templates, name)
    if num_templates is not None:
        if not 1 <= num_templates <= len(base):
            raise FlanTaskError(f"Task {name!r}: num_templates={num_templates} must be in 1..{len(base)} (the "
                                "number of templates given).")
        base = base[:num_templates]
    cot = tmpl.as_templates(cot_templates, f"{name} (cot_templates)") if cot_templates else None
    inversion = (tmpl.as_templates(inversion_templates, f"{name} (inversion_templates)")
                 if inversion_templates else None)
    if variants is None:
        has_options = any(tmpl.OPTIONS_PLACEHOLDER in t.fields() for t in base)
        variants = ("zero_shot", "five_shot") + (("no_opt_zero_shot", "no_opt_five_shot") if has_options else ())
    parsed = {spec: Variant.parse(spec) for spec in variants}
    if not parsed:
        raise FlanTaskError(f"Task {name!r}: variants is empty.")
    if any(v.num_shots for v in parsed.values()) and train_split not in source.splits:
        raise FlanTaskError(f"Task {name!r}: few-shot variants draw exemplars from split {train_split!r}, which the "
                            f"source does not have (splits: {list(source.splits)}).")

    output_features = {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
    }
    record_preps = _bind(preprocessors, output_features)
    registered: dict[str, str] = {}
    for spec, variant in parsed.items():
        chosen = _variant_templates(variant, base, cot, inversion, cot_field, name)
        task_name = variant.task_name(name, len(base))
        render_kwargs = dict(templates=chosen, task_name=task_name, options_field=options_field)
        metadata = functools.partial(_add_metadata, task_name=name, template_type=variant.template_type)
        if variant.num_shots == 0:
            task_source = source
            steps = list(preprocessors) + [functools.partial(tmpl.apply_templates, **render_kwargs), metadata]
        else:
            task_source = _FewshotSource(
                original_source=source, num_shots=variant.num_shots, train_split=train_split,
                train_preprocessors=record_preps + [functools.partial(tmpl.exemplar_features, **render_kwargs)],
                eval_preprocessors=record_preps + [functools.partial(tmpl.fewshot_query_features, **render_kwargs)],
                train_feature_keys=(tmpl.EXEMPLAR_INPUTS_KEY, tmpl.EXEMPLAR_TARGETS_KEY))
            steps = [_prune_step(variant.num_shots, max_input_length), metadata]
        _replace_task(task_name, source=task_source, preprocessors=steps + _tokenize_steps(),
                      output_features=output_features, postprocess_fn=postprocess_fn, metric_fns=list(metric_fns))
        registered[spec] = task_name
    mixture = f"{name}_variants"
    mixing.register_mixture(mixture, list(registered.values()), default_rate=1.0)
    logger.info("Registered FLAN-style task %r: %d templates, variants %s, mixture %r.", name, len(base),
                list(registered.values()), mixture)
    return FlanRegistration(registered, mixture, len(base), base)


# ----------------------------------------------------------------------------------------------------------
# The FLAN 2022 collection.

def _expand(names: Sequence[str], collection: str) -> list[str]:
    """Task names; a mixture name stands for its tasks (each capped on its own, as FLAN lists task variants)."""
    out: list[str] = []
    for n in names:
        if n in seqio.MixtureRegistry.names():
            out += [t.name for t in seqio.MixtureRegistry.get(n).tasks]
        elif n in seqio.TaskRegistry.names():
            out.append(n)
        else:
            raise FlanTaskError(f"FLAN 2022 collection {collection!r}: {n!r} is not a registered seqio task or "
                                "mixture; register it first (e.g. with register_flan_templates).")
    return list(dict.fromkeys(out))


def register_flan2022_mixture(
    *,
    flan2021: Sequence[str] = (),
    t0: Sequence[str] = (),
    niv2: Sequence[str] = (),
    cot: Sequence[str] = (),
    dialog: Sequence[str] = (),
    name: str = "flan2022",
    caps: Optional[Mapping[str, int]] = None,
    weights: Optional[Mapping[str, float]] = None,
) -> dict[str, str]:
    """Registers `<name>_<collection>` sub-mixtures and the mixture `<name>` over them.

    Each collection lists registered tasks or mixtures (a mixture contributes its tasks). Inside a collection a
    task's rate is min(num train examples, cap) (FLAN: seqio.mixing_rate_num_examples, maximum = the cap); the
    collection's final share of the mixture is weight / sum of the weights of the non-empty collections.
    Returns {collection: sub-mixture name, "mixture": name}.
    """
    caps = {**FLAN2022_CAPS, **(caps or {})}
    weights = {**FLAN2022_WEIGHTS, **(weights or {})}
    members = {"flan2021": flan2021, "t0": t0, "niv2": niv2, "cot": cot, "dialog": dialog}
    out: dict[str, str] = {}
    top: dict[str, float] = {}
    for collection in FLAN2022_COLLECTIONS:
        if not members[collection]:
            continue
        tasks = _expand(members[collection], collection)
        sub = f"{name}_{collection}"
        mixing.register_mixture(sub, tasks, default_rate=mixing.mixing_rate_num_examples(caps[collection]))
        out[collection] = sub
        top[sub] = weights[collection]
    if not top:
        raise FlanTaskError(f"FLAN 2022 mixture {name!r}: every collection is empty; pass task names for at least "
                            f"one of {FLAN2022_COLLECTIONS}.")
    empty = [c for c in FLAN2022_COLLECTIONS if c not in out]
    if empty:
        total = sum(top.values())
        logger.warning("FLAN 2022 mixture %r: collections %s are empty; the others' shares become %s.", name,
                       empty, {k: round(v / total, 4) for k, v in top.items()})
    mixing.register_mixture_of_mixtures(name, top)
    out["mixture"] = name
    return out
