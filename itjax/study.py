"""A study as gin: a grid of named axes over an ordinary experiment, expanded into `itjax.train` runs.

The gin surface (one configurable, `study`; see gin/studies/*.gin):

    study.name = 'smoke'
    study.base_gin_files = ['quickstart.gin']          # the ordinary experiment every run starts from
    study.base_bindings = ["import itjax.tasks.superni_gin", "register_superni.data_dir = '${superni_dir}'",
                           "MIXTURE_OR_TASK_NAME = @superni_mixture()", "TRAIN_STEPS = 20"]
    study.variables = {'superni_dir': '/data/natural-instructions'}   # ${name} in any binding string
    study.tasks = '${superni_dir}/splits/default/test_tasks.txt'       # or a list of names
    study.axes = {                                     # axis -> {value name: [gin bindings]}, in this order
        'setting': {'mtl': [], 'stl': ["superni_mixture.task = '${task}'"]},
        'size': {'100': ['register_superni.num_downstream_train_instances = 100'], ...},
        'encoding': {'def_pos_2': ["register_superni.encoding = 'def_pos_2'"], 'input_only': [...]},
        'start': {'t5_3b': ["train.initial_checkpoint_path = '${t5_3b}'"], ...},
        'seed': {'0': ['train.random_seed = 0']},
    }
    study.pre_stage = {                                # optional: a first training stage some runs start from
        'axis': 'pre_finetune',                        # its axis name in cells and run ids
        'values': {'none': None, 'def_pos_2': [...], 'input_only': [...]},   # None: no first stage
        'bindings': [...],                             # every stage-1 run (after base_gin_files / base_bindings)
        'inherit': ['start', 'seed'],                  # axes a stage-1 run shares with the runs built on it
    }
    study.report = {                                   # optional: what `python -m itjax.report STUDY` needs
        'size_axis': 'size', 'size_values': {'100': 3.09, ..., 'all': 100.0},   # x of the score-vs-size plots
        'size_label': '% of all train instances', 'seed_axis': 'seed',
        'superni_dir': '${superni_dir}',               # task categories from <superni_dir>/tasks/<task>.json
        'references': [{'name': 'Tk-Instruct few-shot', 'metric': 'rougeL', 'value': 54.30,
                        'where': {'setting': 'mtl', 'size': '200'}}, ...],   # where: cells it compares with
    }
    (checked and used by itjax.study_report; the sweep stores it, ${name}s filled in, in STUDY/study.json)

Expansion. Every combination of one value per axis (x one pre_stage value) is a cell. A value whose bindings
contain `${task}` expands into one cell per task of `study.tasks` (the cell gets `task`; e.g. STL: one model per
task); other cells train on whatever the bindings name (e.g. MTL: the whole mixture). A run's gin is
`base_gin_files` + base_bindings + the cell's axis bindings (in axis order) + `MODEL_DIR = STUDY/<run id>`.
With a pre_stage value other than None, a stage-1 run (base + the inherited axes' bindings + pre_stage bindings +
the value's bindings) is trained once per (value, inherited axes), exported with `itjax.convert --from_run` to
`STUDY/<stage-1 id>/export`, and the cell's run appends `<checkpoint_binding> = '<that export>'` (default
`train.initial_checkpoint_path`), which overrides the start axis' checkpoint. Bindings are gin text;
`${name}` is replaced from `study.variables` (an unknown name is an error naming it); `${tasks}` is the list of
study.tasks as a gin literal.

Run ids are `axis=value` pairs joined by '__' (`setting=stl__task=task1155_...__size=100__...`); the shard of a
run is that of its group: its stage-1 run's id, or its own id without a first stage.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import string
from typing import Any, Mapping, Optional, Sequence

import gin

from itjax.config import ConfigError

STAGE1, STAGE2 = "pre", "main"
_ID_UNSAFE = re.compile(r"[^\w.=+-]")


@dataclasses.dataclass(frozen=True)
class Run:
    """One `itjax.train` run of a study.

    run_id: file-system safe id (also its MODEL_DIR's name under the study folder).
    stage: "pre" (a first stage, exported for the runs built on it) or "main".
    cell: {axis: value name} (+ "task" for per-task cells); what the report groups by.
    gin_files: gin files, resolved as `itjax.train --gin_file` resolves them.
    bindings: gin bindings in order (later ones win), without MODEL_DIR (the sweep adds it).
    depends_on: the run_id of the stage-1 run this run starts from, or None.
    group: the shard key (stage-1 id or own id).
    """

    run_id: str
    stage: str
    cell: dict
    gin_files: tuple
    bindings: tuple
    depends_on: Optional[str]
    group: str


@dataclasses.dataclass
class Study:
    """A parsed `study` gin configurable (see the module docstring)."""

    name: str
    base_gin_files: list
    base_bindings: list
    axes: dict
    tasks: Any = None
    variables: dict = dataclasses.field(default_factory=dict)
    pre_stage: Optional[dict] = None
    checkpoint_binding: str = "train.initial_checkpoint_path"
    report: dict = dataclasses.field(default_factory=dict)


@gin.configurable
def study(name: str = gin.REQUIRED, base_gin_files: Sequence[str] = gin.REQUIRED, base_bindings: Sequence[str] = (),
          axes: Mapping[str, Mapping[str, Optional[Sequence[str]]]] = gin.REQUIRED, tasks: Any = None,
          variables: Optional[Mapping[str, Any]] = None, pre_stage: Optional[Mapping[str, Any]] = None,
          checkpoint_binding: str = "train.initial_checkpoint_path",
          report: Optional[Mapping[str, Any]] = None) -> Study:
    """The study of the parsed gin file (see the module docstring for each argument)."""
    return Study(name, list(base_gin_files), list(base_bindings), {k: dict(v) for k, v in axes.items()}, tasks,
                 dict(variables or {}), dict(pre_stage) if pre_stage else None, checkpoint_binding,
                 _plain(dict(report or {})))


def _plain(value: Any) -> Any:
    """gin's immutable containers (tuples, frozen dicts) -> JSON-able lists / dicts."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_study(gin_files: Sequence[str], bindings: Sequence[str] = (), search_paths: Sequence[str] = ()) -> Study:
    """Parses study gin files (+ `study.x = y` overrides) into a Study; ConfigError names a bad file / binding."""
    from itjax import config as config_lib

    gin.clear_config()
    try:
        config_lib.parse_gin(gin_files, bindings, search_paths)
        try:
            return study()
        except TypeError as e:  # gin.REQUIRED arguments left unbound
            raise ConfigError(f"study gin {', '.join(gin_files)}: {e}; bind study.name, study.base_gin_files and "
                              "study.axes.") from e
    finally:
        gin.clear_config()


def _id_part(text: str) -> str:
    return _ID_UNSAFE.sub("_", str(text))


def run_id(cell: Mapping[str, Any]) -> str:
    """'axis=value' pairs joined by '__', characters outside [A-Za-z0-9_.=+-] replaced by '_'."""
    return "__".join(f"{_id_part(k)}={_id_part(v)}" for k, v in cell.items())


class _Template(string.Template):
    braceidpattern = r"[_a-zA-Z][_a-zA-Z0-9]*"


def substitute(text: str, variables: Mapping[str, Any], where: str) -> str:
    """`${name}` -> variables[name]; an unknown name is a ConfigError naming it and `where`."""
    try:
        return _Template(text).substitute({k: str(v) for k, v in variables.items()})
    except KeyError as e:
        raise ConfigError(f"{where}: `{text}` uses ${{{e.args[0]}}}, which study.variables does not set "
                          f"(it sets: {', '.join(sorted(variables)) or 'nothing'}).") from None
    except ValueError as e:
        raise ConfigError(f"{where}: `{text}`: {e} (write $$ for a literal $).") from None


def study_tasks(st: Study) -> list[str]:
    """The task names `${task}` expands over: study.tasks as a list, or read from a split-list file path."""
    if st.tasks is None:
        return []
    if isinstance(st.tasks, str):
        path = substitute(st.tasks, st.variables, "study.tasks")
        if not os.path.isfile(path):
            raise ConfigError(f"study.tasks = {path!r}: no such task list file (one task name per line); set "
                              "study.variables or study.tasks to an existing file, or give a list of names.")
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        return [n[:-len(".json")] if n.endswith(".json") else n for n in names]
    return [str(t) for t in st.tasks]


def _axis_values(st: Study, axis: str, values: Mapping[str, Any], tasks: list[str]) -> list[tuple[dict, list]]:
    """[(cell part, bindings)] of one axis; values binding ${task} expand into one entry per task."""
    if not values:
        raise ConfigError(f"study.axes[{axis!r}] has no values; give at least one (value name -> [bindings]).")
    out = []
    for value, bindings in values.items():
        bindings = list(bindings or [])
        if not all(isinstance(b, str) for b in bindings):
            raise ConfigError(f"study.axes[{axis!r}][{value!r}] must be a list of gin binding strings.")
        if any("${task}" in b for b in bindings):
            if not tasks:
                raise ConfigError(f"study.axes[{axis!r}][{value!r}] binds ${{task}} but study.tasks is empty.")
            for task in tasks:
                variables = {**st.variables, "task": task}
                out.append(({axis: value, "task": task},
                            [substitute(b, variables, f"study.axes[{axis!r}][{value!r}]") for b in bindings]))
        else:
            out.append(({axis: value}, [substitute(b, st.variables, f"study.axes[{axis!r}][{value!r}]")
                                        for b in bindings]))
    return out


def expand(st: Study) -> list[Run]:
    """All runs of the study: stage-1 runs first (each once), then the cells, in grid order."""
    tasks = study_tasks(st)
    st = dataclasses.replace(st, variables={"tasks": repr(tasks), **st.variables})
    axes = {axis: _axis_values(st, axis, values, tasks) for axis, values in st.axes.items()}
    base = [substitute(b, st.variables, "study.base_bindings") for b in st.base_bindings]
    files = tuple(substitute(f, st.variables, "study.base_gin_files") for f in st.base_gin_files)
    pre = st.pre_stage
    pre_values: list[tuple[Optional[str], Optional[list]]] = [(None, None)]
    if pre:
        unknown = sorted(set(pre) - {"axis", "values", "bindings", "inherit"})
        if unknown or "axis" not in pre or not pre.get("values"):
            raise ConfigError(f"study.pre_stage needs 'axis' and 'values' (and may have 'bindings', 'inherit'); "
                              f"got keys {sorted(pre)}.")
        missing = [a for a in pre.get("inherit", []) if a not in st.axes]
        if missing:
            raise ConfigError(f"study.pre_stage['inherit'] names {missing}, which are not axes of study.axes "
                              f"({', '.join(st.axes)}).")
        if pre["axis"] in st.axes or pre["axis"] == "task":
            raise ConfigError(f"study.pre_stage['axis'] = {pre['axis']!r} is already an axis name; pick another.")
        pre_values = [(v, None if b is None else [substitute(x, st.variables, f"study.pre_stage values[{v!r}]")
                                                  for x in b]) for v, b in pre["values"].items()]
    stage1: dict[str, Run] = {}
    mains: list[Run] = []
    for combo in itertools.product(*axes.values()):
        cell, bindings = {}, list(base)
        for part, axis_bindings in combo:
            cell.update(part)
            bindings += axis_bindings
        for pre_value, pre_bindings in pre_values:
            full_cell = dict(cell)
            depends_on = None
            extra: list[str] = []
            if pre:
                full_cell[pre["axis"]] = pre_value
            if pre_bindings is not None:
                inherited = {a: cell[a] for a in pre.get("inherit", [])}
                s1_cell = {pre["axis"]: pre_value, **inherited}
                depends_on = "pre__" + run_id(s1_cell)
                if depends_on not in stage1:
                    s1_bindings = list(base)
                    for part, axis_bindings in combo:
                        if next(iter(part)) in inherited:
                            s1_bindings += axis_bindings
                    s1_bindings += [substitute(b, st.variables, "study.pre_stage['bindings']")
                                    for b in pre.get("bindings", [])] + pre_bindings
                    stage1[depends_on] = Run(depends_on, STAGE1, s1_cell, files, tuple(s1_bindings), None,
                                             depends_on)
                extra = [f"{st.checkpoint_binding} = {{STUDY}}/{depends_on}/export"]
            rid = run_id(full_cell)
            mains.append(Run(rid, STAGE2, full_cell, files, tuple(bindings + extra), depends_on,
                             depends_on or rid))
    ids = [r.run_id for r in mains]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"two cells have the same run id {dup!r}: axis value names must differ after characters "
                          "outside [A-Za-z0-9_.=+-] become '_'.")
    return list(stage1.values()) + mains


def resolve_bindings(run: Run, study_dir: str) -> list[str]:
    """The run's bindings with the study folder filled in and its MODEL_DIR appended."""
    study_dir = os.path.abspath(study_dir)
    out = []
    for b in run.bindings:
        if "{STUDY}/" in b:
            name, _, path = b.partition(" = ")
            b = f"{name} = {path.replace('{STUDY}', study_dir)!r}"
        out.append(b)
    return out + [f"MODEL_DIR = {os.path.join(study_dir, run.run_id)!r}"]


def report_options(st: Study) -> dict:
    """study.report with `${name}`s filled in from study.variables; a 'superni_dir' that exists is made absolute
    (the report may run from another folder than the sweep)."""

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return substitute(value, st.variables, "study.report")
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    options = fill(st.report)
    if isinstance(options.get("superni_dir"), str) and os.path.isdir(options["superni_dir"]):
        options["superni_dir"] = os.path.abspath(options["superni_dir"])
    return options


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"--shard {text!r}: write i/n with 0 <= i < n (e.g. --shard 0/4 ... --shard 3/4).")
    return int(match.group(1)), int(match.group(2))


def shard(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """The runs of shard `index` of `count`: groups (a stage-1 run and the runs built on it, or a single run)
    dealt round-robin in sorted order of their keys; disjoint and covering, the same on every machine."""
    groups = sorted({r.group for r in runs})
    mine = {g for i, g in enumerate(groups) if i % count == index}
    return [r for r in runs if r.group in mine]
