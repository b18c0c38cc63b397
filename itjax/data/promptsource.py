"""P3 prompt templates (promptsource `templates.yaml`) loaded and rendered without the promptsource package.

Layout (bigscience-workshop/promptsource): `<templates_dir>/<dataset>/<subset>/templates.yaml`, or
`<templates_dir>/<dataset>/templates.yaml` for a dataset without subsets. Each file maps template ids to YAML
objects tagged `!Template` (id, name, jinja, answer_choices, reference, metadata: `!TemplateMetadata`).

Rendering reproduces promptsource's `Template.apply` (the version T0 was trained with):

* the Jinja environment is a plain `Environment(loader=BaseLoader)` with `zip` as a global and the filters
  `choice` (a random element) and `most_frequent` (the most common items, ties in first-seen order);
* string fields have every `|||` replaced by a placeholder before rendering (restored afterwards), so only the
  template's own `|||` separates the prompt from the target;
* `answer_choices` is its own Jinja expression, rendered with the record and split on `|||` (each choice
  stripped); the list is visible to the main template as `answer_choices`;
* with `truncate=True` (promptsource's default) every `}}` becomes `| string | truncate(2048) }}`, so each
  substituted value is cut to 2048 characters (Jinja's `truncate`: leeway 5, at a word boundary, then "...");
* the output is split on `|||` and each part stripped: `[prompt, target]` for a well-formed template.

Deliberate differences: undefined fields raise (promptsource renders them as ""), naming the YAML file, the
template and the missing field; `choice` draws from a `random.Random` passed per record (callers seed it from the
record index), so a pipeline renders the same strings on every run and host; one render gives the prompt, target
and choices (promptsource renders the choices twice when T0 asks for them separately).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import random
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import jinja2
import jinja2.meta
import yaml

TEXT_VAR_LENGTH = 2048  # promptsource's per-variable truncation, in characters
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's placeholder for "|||" inside field values
SEPARATOR = "|||"
_RNG_VAR = "__itjax_rng__"  # the per-record random.Random, passed to `choice` through the Jinja context


class PromptTemplateError(ValueError):
    """A templates.yaml that cannot be read, or a template that cannot be rendered; names file and template."""


# ----------------------------------------------------------------------------------------------------------
# Jinja environment (promptsource's helpers).

@jinja2.pass_context
def _choice(context, choices):
    rng = context.get(_RNG_VAR) or random
    return rng.choice(list(choices))


def most_frequent(items):
    """The items occurring most often (all of them on a tie, in first-seen order); None for no items."""
    if not items:
        return None
    counts = collections.Counter(items).most_common()
    return [item for item, count in counts if count == counts[0][1]]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=jinja2.StrictUndefined)
    env.globals.update(zip=zip)
    env.filters["choice"] = _choice
    env.filters["most_frequent"] = most_frequent
    return env


_ENV = _environment()


def remove_hyphens(record: Mapping[str, Any]) -> dict[str, Any]:
    """Field names with '-' become '_' (Jinja cannot name them); what promptsource.utils.removeHyphen does."""
    return {key.replace("-", "_"): value for key, value in record.items()}


def _escape_pipes(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.replace(SEPARATOR, PIPE_PROTECTOR) if isinstance(v, str) else v for k, v in record.items()}


def _unescape_pipes(text: str) -> str:
    return text.replace(PIPE_PROTECTOR, SEPARATOR)


# ----------------------------------------------------------------------------------------------------------
# One template.

@dataclasses.dataclass(frozen=True)
class Rendered:
    """A template applied to one record: the prompt, the target and the answer choices (None: open-ended)."""

    inputs: str
    targets: str
    answer_choices: Optional[list[str]]


@dataclasses.dataclass(frozen=True)
class Template:
    """One promptsource template. `path` is the templates.yaml it came from (for error messages)."""

    id: str
    name: str
    jinja: str
    answer_choices: Optional[str] = None
    reference: str = ""
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: str = "<templates.yaml>"

    def _where(self) -> str:
        return f"{self.path}: template {self.name!r} (id {self.id})"

    def _compile(self, source: str, what: str) -> jinja2.Template:
        try:
            return _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise PromptTemplateError(f"{self._where()}: Jinja syntax error in {what} (line {e.lineno}): "
                                      f"{e.message}. Fix the template text in the YAML file.") from None

    @functools.cached_property
    def _compiled(self) -> dict[str, Optional[jinja2.Template]]:
        jinja = self.jinja.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
        return {
            "jinja": self._compile(self.jinja, "jinja"),
            "jinja_truncated": self._compile(jinja, "jinja"),
            "answer_choices": (self._compile(self.answer_choices, "answer_choices")
                               if self.answer_choices is not None else None),
        }

    def check_syntax(self) -> None:
        """Compiles the Jinja now; raises PromptTemplateError naming file, template and line on a syntax error."""
        _ = self._compiled

    def _render(self, what: str, record: Mapping[str, Any], rng: Optional[random.Random], where: str) -> str:
        try:
            return self._compiled[what].render(**record, **{_RNG_VAR: rng})
        except jinja2.UndefinedError as e:
            fields = ", ".join(sorted(k for k in record if k not in ("answer_choices", _RNG_VAR)))
            raise PromptTemplateError(f"{self._where()}: {e.message} in {what.split('_truncated')[0]} while "
                                      f"rendering {where}; the record has fields [{fields}].") from None
        except PromptTemplateError:
            raise
        except Exception as e:  # noqa: BLE001  (any Jinja runtime error: name the template and the record)
            raise PromptTemplateError(f"{self._where()}: rendering {where} failed in "
                                      f"{what.split('_truncated')[0]}: {type(e).__name__}: {e}") from None

    def answer_choices_list(self, record: Mapping[str, Any], rng: Optional[random.Random] = None,
                            where: str = "a record") -> Optional[list[str]]:
        """The rendered answer choices of a record (each stripped), or None for an open-ended template."""
        if self.answer_choices is None:
            return None
        rendered = self._render("answer_choices", _escape_pipes(record), rng, where)
        return [_unescape_pipes(choice.strip()) for choice in rendered.split(SEPARATOR)]

    def fixed_answer_choices(self) -> Optional[list[str]]:
        """The choices if the answer_choices expression uses no record field (e.g. "Yes ||| No"), else None."""
        if self.answer_choices is None:
            return None
        if jinja2.meta.find_undeclared_variables(_ENV.parse(self.answer_choices)):
            return None
        return [choice.strip() for choice in self._compiled["answer_choices"].render().split(SEPARATOR)]

    def apply_parts(self, record: Mapping[str, Any], *, truncate: bool = True, rng: Optional[random.Random] = None,
                    where: str = "a record") -> tuple[list[str], Optional[list[str]]]:
        """promptsource's `Template.apply`: (the rendered parts split on '|||' and stripped, the choices)."""
        if "answer_choices" in record:
            raise PromptTemplateError(f"{self._where()}: {where} has a field named 'answer_choices', which "
                                      "promptsource reserves for the template's choices; rename it.")
        choices = self.answer_choices_list(record, rng, where)
        protected = dict(_escape_pipes(record), answer_choices=choices)
        rendered = self._render("jinja_truncated" if truncate else "jinja", protected, rng, where)
        return [_unescape_pipes(part).strip() for part in rendered.split(SEPARATOR)], choices

    def apply(self, record: Mapping[str, Any], *, truncate: bool = True, rng: Optional[random.Random] = None,
              where: str = "a record") -> Optional[Rendered]:
        """The (prompt, target, choices) of a record, as T0 built its examples: hyphens in field names become
        underscores; a rendering without exactly one '|||', or with an empty prompt or target (e.g. an unlabeled
        test record), gives None (T0 drops such examples)."""
        parts, choices = self.apply_parts(remove_hyphens(record), truncate=truncate, rng=rng, where=where)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            return None
        return Rendered(parts[0], parts[1], choices)


# ----------------------------------------------------------------------------------------------------------
# templates.yaml files.

class _TemplatesLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus promptsource's two tags, both read as plain mappings."""


def _mapping(loader: yaml.Loader, node: yaml.Node) -> dict:
    return loader.construct_mapping(node, deep=True)


_TemplatesLoader.add_constructor("!Template", _mapping)
_TemplatesLoader.add_constructor("!TemplateMetadata", _mapping)


def templates_path(templates_dir: str, dataset_name: str, subset: Optional[str] = None) -> str:
    """`<templates_dir>/<dataset>[/<subset>]/templates.yaml`."""
    parts = [templates_dir, dataset_name] + ([subset] if subset else []) + ["templates.yaml"]
    return os.path.join(*parts)


def load_templates(path: str) -> dict[str, Template]:
    """All templates of one templates.yaml, keyed by template name (sorted, as promptsource lists them).

    Raises PromptTemplateError naming the file for a missing file, invalid YAML, a template without `name` /
    `jinja`, two templates with one name, or a Jinja syntax error (all templates are compiled here).
    """
    if not os.path.isfile(path):
        raise PromptTemplateError(f"{path}: no such templates file; templates_dir must hold promptsource's "
                                  "layout <dataset>/<subset>/templates.yaml (e.g. promptsource/templates).")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_TemplatesLoader)  # noqa: S506  (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise PromptTemplateError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise PromptTemplateError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict):
        raise PromptTemplateError(f"{path}: expected a mapping with a 'templates' mapping (promptsource format).")
    out: dict[str, Template] = {}
    for key, entry in data["templates"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or \
                not isinstance(entry.get("jinja"), str):
            raise PromptTemplateError(f"{path}: template {key!r} needs string fields 'name' and 'jinja'.")
        choices = entry.get("answer_choices")
        template = Template(id=str(entry.get("id", key)), name=entry["name"], jinja=entry["jinja"],
                            answer_choices=None if choices is None else str(choices),
                            reference=str(entry.get("reference") or ""), metadata=dict(entry.get("metadata") or {}),
                            path=path)
        if template.name in out:
            raise PromptTemplateError(f"{path}: two templates are named {template.name!r} "
                                      f"(ids {out[template.name].id} and {template.id}).")
        template.check_syntax()
        out[template.name] = template
    return dict(sorted(out.items()))


_TASK_NAME_INVALID = re.compile(r"[^\w\d\._]+")


def t0_task_name(dataset_name: str, subset: Optional[str], template_name: str) -> str:
    """T0's seqio task name: 'super_glue', 'rte', 'GPT-3 style' -> 'super_glue_rte_GPT_3_style'."""
    name = dataset_name + (f"_{subset}_" if subset else "_") + template_name
    return _TASK_NAME_INVALID.sub("_", name)


def record_rng(seed: int, template: Template, index: int) -> random.Random:
    """The random source of `choice` for record `index` under `template` (stable across runs and hosts)."""
    return random.Random(f"{seed}/{template.id}/{index}")


def render_records(template: Template, records: Iterable[Mapping[str, Any]], *, seed: int = 0,
                   source: str = "record") -> tuple[list[Rendered], int]:
    """Applies `template` to every record; returns (the kept renderings, how many records were dropped).
    Errors name the record as f"{source} {n}", n counting from 1."""
    kept, dropped = [], 0
    for index, record in enumerate(records):
        rendered = template.apply(record, rng=record_rng(seed, template, index), where=f"{source} {index + 1}")
        if rendered is None:
            dropped += 1
        else:
            kept.append(rendered)
    return kept, dropped


def select_templates(templates: Mapping[str, Template], names: Optional[Sequence[str]], path: str) -> list[Template]:
    """The named templates (all if None); an unknown name raises, listing the file's template names."""
    if names is None:
        return list(templates.values())
    unknown = [n for n in names if n not in templates]
    if unknown:
        raise PromptTemplateError(f"{path}: no template named {', '.join(map(repr, unknown))}; it has: "
                                  f"{', '.join(map(repr, templates))}.")
    return [templates[n] for n in names]
