"""Gin plumbing shared by the entry points: file lookup, `--gin.NAME=VALUE` overrides, binding checks.

A run is fully described by its gin files plus overrides (T5X convention). Gin file names resolve, in order,
against the working directory, every `--gin_search_paths` folder, and the project's own `gin/` folder (shipped
inside the wheel as `itjax/_gin`, so it also works from an installed wheel).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
from typing import Any, Iterable, Iterator, Mapping, Sequence

import gin

# Macros every training run must define (the names T5X users know).
REQUIRED_TRAIN_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS", "BATCH_SIZE")
# A dry run (`itjax.train --dry_run`) needs only a model and the shapes: these two macros...
REQUIRED_DRY_RUN_MACROS = ("TASK_FEATURE_LENGTHS", "BATCH_SIZE")
# ...and these take a stand-in value when a gin file uses them but nothing sets them (TRAIN_STEPS: only a
# learning-rate schedule reads it in a dry run, and nothing runs).
DRY_RUN_MACRO_DEFAULTS = {"MODEL_DIR": None, "MIXTURE_OR_TASK_NAME": None, "INITIAL_CHECKPOINT_PATH": None,
                          "TRAIN_STEPS": 1}
# Macros the project's gin files define or use; never offered as the misspelling of another one (a model file's
# MODEL is not a misspelled MODEL_DIR).
KNOWN_MACROS = frozenset(REQUIRED_TRAIN_MACROS) | {"MODEL", "LEARNING_RATE", "INITIAL_CHECKPOINT_PATH"}


def _not_found_noise(record: logging.LogRecord) -> bool:
    """gin logs an ERROR on the root logger for each search path an `include` is *not* found in before it finds
    the file; those are noise (a real miss raises)."""
    return not str(record.msg).startswith("Path not found:")


def _never_raises(exists):
    """gin's package-resource lookup treats `runs/train.gin` as file `train.gin` of Python package `runs`; a plain
    `runs/` folder in the working directory (e.g. a MODEL_DIR parent) is a namespace package without a file
    location and makes it raise TypeError instead of moving on to the next search path."""
    def safe_exists(path: str) -> bool:
        try:
            return exists(path)
        except TypeError:
            return False
    return safe_exists


@contextlib.contextmanager
def gin_search_paths(paths: Sequence[str] = ()) -> Iterator[None]:
    """Inside this block gin resolves `include` lines against `paths`, then the project's `gin/` folder.

    gin keeps its search paths and file readers in module globals; this adds to them for the block only (and
    quiets gin's "Path not found" log lines meanwhile), so parsing one config leaves nothing behind for the next.
    """
    saved_paths = list(gin.config._LOCATION_PREFIXES)  # gin has no public API to remove a search path
    saved_readers = list(gin.config._FILE_READERS)
    root = logging.getLogger()
    root.addFilter(_not_found_noise)
    try:
        for path in [*paths, builtin_gin_dir()]:
            gin.add_config_file_search_path(path)
        gin.config._FILE_READERS[:] = [(reader, _never_raises(exists)) for reader, exists in saved_readers]
        yield
    finally:
        gin.config._LOCATION_PREFIXES[:] = saved_paths
        gin.config._FILE_READERS[:] = saved_readers
        root.removeFilter(_not_found_noise)


def parse_gin_file(path: str, skip_unknown: bool | Sequence[str] = False) -> None:
    """`gin.parse_config_file(path)` with the project's `gin/` folder on the search path for its includes
    (model size files include their family file: `include 'models/t5_1_1_family.gin'`)."""
    with gin_search_paths([]):
        gin.parse_config_file(path, skip_unknown=skip_unknown)


class ConfigError(ValueError):
    """A user-fixable problem in gin files, overrides or flags. The message says what to change."""


def builtin_gin_dir() -> str:
    """The folder holding the project's gin files: `gin/` in a checkout (also editable installs), else the copy
    packaged as `itjax/_gin` (pyproject.toml maps it)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.join(os.path.dirname(package_dir), "gin")
    # The marker file matters: next to an installed package, `site-packages/gin` is the gin-config library.
    return checkout if os.path.isfile(os.path.join(checkout, "quickstart.gin")) else os.path.join(package_dir, "_gin")


def split_gin_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Pulls `--gin.NAME=VALUE` flags out of argv; returns (bindings as 'NAME = VALUE', remaining argv).

    `--gin.TRAIN_STEPS=100` becomes the binding `TRAIN_STEPS = 100`; strings need gin quoting:
    `--gin.MODEL_DIR="'/tmp/run'"`. A bare unquoted path is accepted too for MODEL_DIR-like values
    (anything that is not a valid gin literal and contains '/' is quoted for you).
    """
    bindings, rest = [], []
    for arg in argv:
        match = re.fullmatch(r"--gin\.([^=]+)=(.*)", arg, flags=re.DOTALL)
        if match is None:
            rest.append(arg)
            continue
        name, value = match.group(1).strip(), match.group(2).strip()
        if "/" in value and not re.match(r"""^['"%@(\[{]""", value):
            value = repr(value)
        bindings.append(f"{name} = {value}")
    return bindings, rest


def resolve_gin_file(name: str, search_paths: Iterable[str]) -> str:
    """Finds a gin file by path or by name relative to the search paths and the built-in `gin/` folder."""
    candidates = [name] + [os.path.join(p, name) for p in search_paths]
    candidates.append(os.path.join(builtin_gin_dir(), name))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ConfigError(
        f"gin file {name!r} not found. Looked in: {', '.join(dict.fromkeys(os.path.dirname(c) or '.' for c in candidates))}. "
        "Pass a path, or a name relative to --gin_search_paths or the project's gin/ folder (e.g. quickstart.gin)."
    )


def _parse_files_and_bindings(resolved: Sequence[str], bindings: Sequence[str]) -> None:
    for path in resolved:
        try:
            gin.parse_config_file(path)
        except (ValueError, SyntaxError, KeyError, ImportError, OSError) as e:
            raise ConfigError(f"error in gin file {path}: {e}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError, KeyError, ImportError, OSError) as e:
            raise ConfigError(f"error in gin binding `{binding}` (from --gin.* or --gin_bindings): {e}") from e


def binds_training_loop() -> bool:
    """Whether the parsed config binds `train` (a run file such as runs/train.gin is among the files)."""
    return bool(gin.config._CONFIG.get(("", "itjax.training.train")))


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
              required_macros: Sequence[str] = (), macro_defaults: Mapping[str, Any] | None = None,
              default_run_file: str | None = None) -> list[str]:
    """Parses gin files then bindings (later ones win), checks macros, finalizes. Returns the resolved paths.

    Errors in a file or binding are re-raised as ConfigError naming the file or binding; see `check_macros` for
    what `required_macros` enforces (pass REQUIRED_TRAIN_MACROS for a training run). `macro_defaults`: values for
    macros the config uses (`%NAME`) but does not set, e.g. DRY_RUN_MACRO_DEFAULTS. `default_run_file` (e.g.
    'runs/train.gin', for a dry run of a model file alone): parsed when no file binds the training loop, before
    the files and bindings, which are then parsed again on top of it.
    """
    search_paths = [os.path.abspath(p) for p in search_paths]
    resolved = [resolve_gin_file(f, search_paths) for f in gin_files]
    with gin_search_paths(search_paths):
        _parse_files_and_bindings(resolved, bindings)
        if default_run_file and not binds_training_loop():
            run_file = resolve_gin_file(default_run_file, search_paths)
            _parse_files_and_bindings([run_file, *resolved], bindings)
            resolved.insert(0, run_file)
    if macro_defaults:
        defined, referenced = _macros()
        for name in sorted(referenced - defined):
            if name in macro_defaults:
                gin.parse_config(f"{name} = {macro_defaults[name]!r}")
    if required_macros:  # a full run config: every macro must be set and used
        check_macros(required_macros)
    try:
        gin.finalize()
    except ValueError as e:
        raise ConfigError(f"gin config is incomplete: {str(e).splitlines()[0]}") from e
    return resolved


def _macro_references(value, found: set[str]) -> None:
    """Collects names of macros (`%NAME`) referenced anywhere inside a bound value."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.configurable.name == "macro":
            found.update(value.scopes)
    elif isinstance(value, dict):
        for v in value.values():
            _macro_references(v, found)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _macro_references(v, found)


def _macros() -> tuple[set[str], set[str]]:
    """(macros set, macros used as %NAME) in the current gin config."""
    defined, referenced = set(), set()
    for (scope, selector), params in gin.config._CONFIG.items():  # gin has no public API for this listing
        if selector == "gin.macro":
            defined.add(scope)
        for value in params.values():
            _macro_references(value, referenced)
    return defined, referenced


def check_macros(required: Sequence[str] = REQUIRED_TRAIN_MACROS) -> None:
    """Fails before any work if a required macro is unset, or a macro is set that nothing uses.

    A macro that is defined but never referenced is almost always a misspelling (`TRAIN_STPES = 10`): it would
    otherwise be silently ignored.
    """
    defined, referenced = _macros()
    for name in required:
        if name not in defined:
            # Only a macro that nothing uses and that the project does not define can be a misspelling of `name`.
            candidates = sorted(defined - referenced - KNOWN_MACROS - set(required))
            hint = difflib.get_close_matches(name, candidates, n=1)
            extra = f" (did you mean to set {name} instead of {hint[0]}?)" if hint else ""
            loop = ""
            if "MODEL" in defined and not binds_training_loop():
                loop = (" The gin files define a MODEL but no training loop: add --gin_file=runs/train.gin, or use "
                        "an experiment file that includes it (e.g. quickstart.gin).")
            raise ConfigError(f"required gin binding {name} is not set{extra}: add `{name} = ...` to a gin file "
                              f"or pass --gin.{name}=VALUE.{loop}")
    for name in sorted(referenced - defined):
        raise ConfigError(f"gin binding {name} is used (%{name}) but never set: add `{name} = ...` to a gin file "
                          f"or pass --gin.{name}=VALUE.")
    for name in sorted(defined - referenced - set(required)):
        hint = difflib.get_close_matches(name, sorted(referenced | set(required)), n=1)
        extra = f"; did you mean {hint[0]}?" if hint else ""
        raise ConfigError(f"gin binding {name} is set but nothing uses it{extra} Check the spelling of --gin.{name} "
                          "or of the macro in your gin files.")


def evaluate(value: Any) -> Any:
    """A value from `gin.query_parameter` as the configurable would receive it: a macro (`%X`) or call (`@f()`)
    evaluated, a bare configurable reference (`@f`) as the function, anything else as it is."""
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
    return value


def macro_value(name: str) -> Any:
    """The value of gin macro `name` as `%name` gives it to a configurable; None when the macro is unbound.

    A configurable reference in a macro (`MIXTURE_OR_TASK_NAME = @mixture()`) is called inside the macro's scope, as
    gin does when it evaluates `%name`: a run's operative config.gin binds that call's parameters under the scope
    (`MIXTURE_OR_TASK_NAME/mixture.name = ...`), so calling the bare `@mixture()` would miss them."""
    try:
        value = gin.query_parameter(f"{name}/macro.value")
    except ValueError:
        return None
    with gin.config_scope(name):
        return evaluate(value)


def save_operative_config(model_dir: str) -> str:
    """Writes the operative gin config to MODEL_DIR/config.gin (local or gs://); an existing, different one is
    kept, renamed config.<n>.gin."""
    from etils import epath

    path = epath.Path(model_dir) / "config.gin"
    text = gin.operative_config_str()
    if path.exists() and path.read_text() != text:
        index = 1
        while (epath.Path(model_dir) / f"config.{index}.gin").exists():
            index += 1
        path.rename(epath.Path(model_dir) / f"config.{index}.gin")
    path.write_text(text)
    path = str(path)
    return path
