"""FLAN-style prompt templates: parse, check and render them inside a tf.data pipeline.

A template is a pair of patterns, `inputs` and `targets`, with named placeholders `{field}` that are filled from
the fields of a record; `{{` and `}}` are literal braces (Python `str.format` escaping, as in FLAN's patterns).
A task has many templates. Rendering follows google-research/FLAN `flan/v2` (read for this module; the rules
below say which file each one comes from):

* Fields (`preprocessors.py` format_from_feature_dictionary): a string field is inserted as is, a non-string
  scalar (int, float, bool) through `tf.strings.as_string`. The records' structure is checked once, before the
  first record is rendered: a template naming a field the records lack is refused with the task name, the template
  index and the field (TemplateError).
* `{options_}` (`preprocessors.py` format_options, the deterministic form): built from the 1-D string field
  `options` (configurable) as "OPTIONS:\\n- " + "\\n- ".join(options), e.g. "OPTIONS:\\n- yes\\n- no".
* Template choice (`preprocessors.py` batch_apply_template): FLAN batches the dataset by the number of templates
  and gives the i-th example of every batch template i, i.e. example number n of the (shard's) source order gets
  template n mod T. Same rule here, except that the last incomplete batch is kept (FLAN drops it).
* No-options templates (`templates.py`, PATTERNS_NO_OPTIONS and FEWSHOT_PATTERNS_NO_OPTIONS): the input pattern
  with its options placeholder deleted by a fixed list of string replacements (NO_OPTIONS_REPLACEMENTS_*); the
  target pattern is unchanged.
* Few-shot (`templates.py` FewShotPattern, `few_shot.py`, `tasks.py` "_x_shot" tasks): a template carries
  `inputs_prefix`, `targets_prefix`, `x_y_delimiter`, `example_separator` (FLAN's defaults "", "", "\\n\\n",
  "\\n\\n\\n"). An exemplar is
      inputs_prefix + inputs + x_y_delimiter + targets_prefix + targets + example_separator
  the exemplars are concatenated with nothing in between, and the prompt ends with the example's own
      inputs_prefix + inputs + x_y_delimiter + targets_prefix
  with trailing spaces (not newlines) removed (FLAN remove_trailing_spaces_escape_newlines); the target is the
  rendered target pattern with surrounding whitespace stripped (FLAN strip_targets=True). Exemplars use the same
  template as the example they precede (FLAN prune_fewshot_examples_by_template_idx).
* Few-shot length pruning (`preprocessors.py` prune_fewshot_examples_by_length, filter_zero_shot_in_few_shot):
  exemplars are dropped from the end until the tokenized prompt (+ EOS if the feature adds one) fits the input
  length; an example for which not even one exemplar fits is dropped from the few-shot task, as in FLAN (it is
  still in the zero-shot task). Unlike FLAN, which adds up the token counts of separately tokenized pieces, the
  whole prompt is tokenized, so "fits" is exact.
* Chain-of-thought (CoT): FLAN writes CoT templates by hand (`templates.py` "cot", "synth_cot_*"); pass them as
  templates whose target names the rationale field. `cot_template` derives one from an answer template with the
  target form FLAN uses most, "{chain_of_thought}\\nThe answer is {answer}" (synth_cot_natural_questions 0 and 8).
* Input inversion: FLAN writes inverted templates by hand (`templates.py` "*_input_inversion", e.g.
  predict_next_turn_dialog_input_inversion: the old target fields go into the prompt, the old input fields become
  the target). `inverted_template` derives one by swapping the two patterns.

Functions here are tf.data transforms (`dataset -> dataset`) usable as seqio preprocessors; tasks/flan.py
registers seqio Tasks with them.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Iterable, Mapping, Optional, Sequence, Union

import tensorflow as tf

from itjax.data import sharding

OPTIONS_PLACEHOLDER = "options_"  # the derived field FLAN renders from the `options` list
TEMPLATE_IDX_KEY = "_template_idx"
EXEMPLAR_INPUTS_KEY = "_exemplar_inputs"  # [num_templates] strings: one record as an exemplar, per template
EXEMPLAR_TARGETS_KEY = "_exemplar_targets"
NUM_EXEMPLARS_KEY = "_num_exemplars"

# FLAN templates.py PATTERNS_NO_OPTIONS (zero-shot), applied in this order to the input pattern.
NO_OPTIONS_REPLACEMENTS_ZERO_SHOT = ("\n\n{options_}", "\n{options_}", "{options_}", "\n\n{options_str}")
# FLAN templates.py FEWSHOT_PATTERNS_NO_OPTIONS (few-shot), applied in this order to the input pattern.
NO_OPTIONS_REPLACEMENTS_FEW_SHOT = ("\n\n{options_}", "\n{options_}", " | {options_}", " {options_}",
                                    " ({options_})", "{options_}", "\n\n{options_str}", "\n{options_str}")


class TemplateError(ValueError):
    """A template that cannot be parsed or rendered; the message names the task, template index and field."""


@dataclasses.dataclass(frozen=True)
class Template:
    """One prompt template: `inputs` / `targets` patterns plus FLAN's few-shot formatting (FewShotPattern)."""

    inputs: str
    targets: str
    inputs_prefix: str = ""
    targets_prefix: str = ""
    x_y_delimiter: str = "\n\n"
    example_separator: str = "\n\n\n"

    def fields(self) -> set[str]:
        """Placeholder names of both patterns (`options_` included as written)."""
        return {f for p in (self.inputs, self.targets) for _, f in parse_pattern(p) if f is not None}


TemplateLike = Union[Template, Sequence[str]]


def as_template(template: TemplateLike) -> Template:
    """A Template from a Template or an (inputs, targets) pair."""
    if isinstance(template, Template):
        return template
    if isinstance(template, (tuple, list)) and len(template) == 2 and all(isinstance(p, str) for p in template):
        return Template(template[0], template[1])
    raise TemplateError(f"A template is a Template or an (inputs_pattern, targets_pattern) pair of str, got "
                        f"{template!r}.")


def as_templates(templates: Iterable[TemplateLike], task_name: str) -> tuple[Template, ...]:
    """Templates, each checked to parse; raises TemplateError naming the task and template index."""
    out = []
    for i, t in enumerate(templates):
        try:
            t = as_template(t)
            for pattern in (t.inputs, t.targets):
                parse_pattern(pattern)
        except TemplateError as e:
            raise TemplateError(f"Task {task_name!r}, template {i}: {e}") from None
        out.append(t)
    if not out:
        raise TemplateError(f"Task {task_name!r} has no templates; pass at least one (inputs, targets) pair.")
    return tuple(out)


def parse_pattern(pattern: str) -> tuple[tuple[str, Optional[str]], ...]:
    """Splits a pattern into (literal text, field name or None) pieces; `{{` / `}}` become literal braces.

    Only plain named fields are allowed: no positional `{}`, attribute / index access, conversion or format spec.
    """
    try:
        pieces = list(string.Formatter().parse(pattern))
    except ValueError as e:  # unmatched single brace
        raise TemplateError(f"pattern {pattern!r} cannot be parsed ({e}); write a literal brace as '{{{{' or "
                            "'}}}}'.") from None
    out = []
    for literal, field, spec, conversion in pieces:
        if field is not None and (not field.isidentifier() or spec or conversion):
            whole = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise TemplateError(f"pattern {pattern!r} has placeholder {whole!r}; placeholders are plain field "
                                "names like {question} (literal braces are written '{{' and '}}').")
        out.append((literal, field))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Deriving template variants.

def no_options_template(template: Template, *, few_shot: bool = False) -> Template:
    """The template without its answer options (FLAN's replacement list; zero-shot and few-shot lists differ)."""
    replacements = NO_OPTIONS_REPLACEMENTS_FEW_SHOT if few_shot else NO_OPTIONS_REPLACEMENTS_ZERO_SHOT
    inputs = template.inputs
    for old in replacements:
        inputs = inputs.replace(old, "")
    return dataclasses.replace(template, inputs=inputs)


def cot_template(template: Template, cot_field: str = "chain_of_thought") -> Template:
    """A chain-of-thought template: the rationale, then "The answer is " and the original target pattern."""
    return dataclasses.replace(template, targets="{" + cot_field + "}\nThe answer is " + template.targets)


def inverted_template(template: Template) -> Template:
    """The input-inversion template: the target pattern becomes the prompt and the input pattern the target."""
    return dataclasses.replace(template, inputs=template.targets, targets=template.inputs)


# ----------------------------------------------------------------------------------------------------------
# Structure checks (once per dataset, before any record is rendered).

def check_fields(templates: Sequence[Template], element_spec: Mapping[str, tf.TensorSpec], *, task_name: str,
                 options_field: str = "options") -> None:
    """Raises TemplateError if a template names a field the records lack or cannot render.

    Scalar fields of any dtype can be rendered; `{options_}` needs a 1-D string field `options_field`.
    """
    if not isinstance(element_spec, Mapping):
        raise TemplateError(f"Task {task_name!r}: templates render records that are dicts of features, but the "
                            f"source (after its preprocessors) yields {element_spec}; add a preprocessor that "
                            "parses each element into named fields.")
    available = sorted(element_spec)
    for i, template in enumerate(templates):
        for which, pattern in (("inputs", template.inputs), ("targets", template.targets)):
            for _, field in parse_pattern(pattern):
                if field is None:
                    continue
                source = options_field if field == OPTIONS_PLACEHOLDER else field
                where = f"Task {task_name!r}, template {i} ({which} pattern {pattern!r})"
                if source not in element_spec:
                    derived = f" ({{{field}}} is rendered from the list field {source!r})" if source != field else ""
                    raise TemplateError(f"{where} names field {field!r}{derived}, but the records have fields "
                                        f"{available}. Fix the template, or add a preprocessor that provides "
                                        f"{source!r}.")
                spec = element_spec[source]
                rank = spec.shape.rank if isinstance(spec, (tf.TensorSpec, tf.RaggedTensorSpec)) else None
                if field == OPTIONS_PLACEHOLDER and (rank != 1 or spec.dtype != tf.string):
                    raise TemplateError(f"{where}: {{options_}} needs {source!r} to be a list of strings, but it "
                                        f"is {spec}.")
                if field != OPTIONS_PLACEHOLDER and rank != 0:
                    raise TemplateError(f"{where}: field {field!r} is {spec}, not a single value; only scalar "
                                        "fields can be inserted (a list of answer choices goes in {options_}).")


# ----------------------------------------------------------------------------------------------------------
# Rendering (TF ops, inside dataset.map).

def format_options(options: tf.Tensor) -> tf.Tensor:
    """["yes", "no"] -> "OPTIONS:\\n- yes\\n- no" (FLAN format_options, deterministic form)."""
    return tf.strings.join(["OPTIONS:\n- ", tf.strings.reduce_join(options, separator="\n- ")])


def render(pattern: str, record: Mapping[str, tf.Tensor], options_field: str = "options") -> tf.Tensor:
    """The pattern filled from one record: a scalar tf.string."""
    parts: list = []
    for literal, field in parse_pattern(pattern):
        if literal:
            parts.append(literal)
        if field == OPTIONS_PLACEHOLDER:
            parts.append(format_options(record[options_field]))
        elif field is not None:
            value = record[field]
            parts.append(value if value.dtype == tf.string else tf.strings.as_string(value))
    return tf.strings.join(parts) if parts else tf.constant("")


def _strip_trailing_spaces(text: tf.Tensor) -> tf.Tensor:
    return tf.strings.regex_replace(text, " *$", "")


def _all_templates(templates: Sequence[Template], record, options_field, fn) -> tf.Tensor:
    """[num_templates] strings: fn(template, record, options_field) for every template (few-shot exemplars need
    them all: the query's template is chosen later)."""
    return tf.stack([fn(t, record, options_field) for t in templates])


def _one_template(templates: Sequence[Template], record, options_field, fn, index: tf.Tensor) -> tf.Tensor:
    """fn(templates[index], record, options_field): only the chosen template is rendered (tf.switch_case), so a
    task with many templates costs one rendering per record on the input pipeline's hot path."""
    branches = [lambda t=t: fn(t, record, options_field) for t in templates]
    return tf.switch_case(index, branches)


def _inputs(t: Template, record, options_field) -> tf.Tensor:
    return render(t.inputs, record, options_field)


def _targets(t: Template, record, options_field) -> tf.Tensor:
    return render(t.targets, record, options_field)


def _with_template_index(ds: tf.data.Dataset, num_templates: int) -> tf.data.Dataset:
    """Adds `_template_idx` = position in the dataset mod num_templates (FLAN batch_apply_template)."""

    def add(i, ex):
        ex = dict(ex)
        ex[TEMPLATE_IDX_KEY] = tf.cast(i % num_templates, tf.int32)
        return ex

    # Positions in the whole split, also on one host's shard of an evaluation (itjax.data.sharding).
    return sharding.enumerate_records(ds).map(add, num_parallel_calls=tf.data.AUTOTUNE)


def apply_templates(ds: tf.data.Dataset, templates: Sequence[Template], *, task_name: str,
                    options_field: str = "options") -> tf.data.Dataset:
    """Zero-shot: sets `inputs` / `targets` of record n from template n mod T; adds `_template_idx` (int32)."""
    check_fields(templates, ds.element_spec, task_name=task_name, options_field=options_field)
    ds = _with_template_index(ds, len(templates))

    def fill(ex):
        out = dict(ex)
        idx = ex[TEMPLATE_IDX_KEY]
        out["inputs"] = _one_template(templates, ex, options_field, _inputs, idx)
        out["targets"] = _one_template(templates, ex, options_field, _targets, idx)
        return out

    return ds.map(fill, num_parallel_calls=tf.data.AUTOTUNE)


def _exemplar_inputs(t: Template, record, options_field) -> tf.Tensor:
    return tf.strings.join([t.inputs_prefix, render(t.inputs, record, options_field), t.x_y_delimiter,
                            t.targets_prefix])


def _exemplar_targets(t: Template, record, options_field) -> tf.Tensor:
    return tf.strings.join([render(t.targets, record, options_field), t.example_separator])


def exemplar_features(ds: tf.data.Dataset, templates: Sequence[Template], *, task_name: str,
                      options_field: str = "options") -> tf.data.Dataset:
    """Few-shot, train side: each record rendered as an exemplar with every template.

    Returns only `_exemplar_inputs` / `_exemplar_targets` ([num_templates] strings each), which batch into
    [num_shots, num_templates] in seqio's FewshotDataSource.
    """
    check_fields(templates, ds.element_spec, task_name=task_name, options_field=options_field)

    def fill(ex):
        return {EXEMPLAR_INPUTS_KEY: _all_templates(templates, ex, options_field, _exemplar_inputs),
                EXEMPLAR_TARGETS_KEY: _all_templates(templates, ex, options_field, _exemplar_targets)}

    return ds.map(fill, num_parallel_calls=tf.data.AUTOTUNE)


def fewshot_query_features(ds: tf.data.Dataset, templates: Sequence[Template], *, task_name: str,
                           options_field: str = "options") -> tf.data.Dataset:
    """Few-shot, eval side: record n gets template n mod T; `inputs` is its prompt ending (no exemplars yet),
    `targets` its stripped target; other fields pass through."""
    check_fields(templates, ds.element_spec, task_name=task_name, options_field=options_field)
    ds = _with_template_index(ds, len(templates))

    def fill(ex):
        out = dict(ex)
        idx = ex[TEMPLATE_IDX_KEY]
        out["inputs"] = _one_template(templates, ex, options_field, _exemplar_inputs, idx)
        out["targets"] = tf.strings.strip(_one_template(templates, ex, options_field, _targets, idx))
        return out

    return ds.map(fill, num_parallel_calls=tf.data.AUTOTUNE)


def join_exemplars(ds: tf.data.Dataset, *, num_shots: int, vocabulary=None, max_input_length: Optional[int] = None,
                   add_eos: bool = True) -> tf.data.Dataset:
    """Few-shot, after zipping ({"train": exemplars [num_shots, T], "eval": query}): the final prompt.

    Keeps the first j exemplars (rendered with the query's template) for the largest j <= num_shots whose prompt
    fits `max_input_length` tokens of `vocabulary` (+1 for EOS if add_eos); None: keep all. Drops queries for
    which j = 0 (FLAN). Output: the query's features with `inputs` = exemplars + prompt ending (trailing spaces
    removed) and `_num_exemplars` (int32).
    """

    def build(ex):
        query = ex["eval"]
        idx = query[TEMPLATE_IDX_KEY]
        pieces = tf.strings.join([tf.gather(ex["train"][EXEMPLAR_INPUTS_KEY], idx, axis=1),
                                  tf.gather(ex["train"][EXEMPLAR_TARGETS_KEY], idx, axis=1)])  # [num_shots]
        # candidate prompts with j = 0..num_shots exemplars
        prompts = tf.stack([_strip_trailing_spaces(tf.strings.join(
            [tf.strings.reduce_join(pieces[:j]), query["inputs"]])) for j in range(num_shots + 1)])
        if max_input_length is None or vocabulary is None:
            keep = tf.constant(num_shots, tf.int32)
        else:
            lengths = tf.cast(vocabulary.encode_tf(prompts).row_lengths(), tf.int32) + int(add_eos)
            fits = tf.logical_and(lengths <= max_input_length, tf.range(num_shots + 1) >= 1)
            # largest j that fits; -1 if none (dropped below)
            keep = tf.reduce_max(tf.where(fits, tf.range(num_shots + 1), -1))
        out = dict(query)
        out["inputs"] = tf.gather(prompts, tf.maximum(keep, 0))
        out[NUM_EXEMPLARS_KEY] = keep
        return out

    ds = ds.map(build, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.filter(lambda ex: ex[NUM_EXEMPLARS_KEY] >= 1)
