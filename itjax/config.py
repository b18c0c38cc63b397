"""Gin plumbing shared by the entry points: file lookup, `--gin.NAME=VALUE` overrides, binding checks.

A run is fully described by its gin files plus overrides (T5X convention). Gin file names resolve, in order,
against the working directory, every `--gin_search_paths` folder, and the project's own `gin/` folder (shipped
inside the wheel as `itjax/_gin`, so it also works from an installed wheel).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Iterable, Sequence

import gin

# Macros every training run must define (the names T5X users know).
REQUIRED_TRAIN_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS", "BATCH_SIZE")


# gin logs an ERROR on the root logger for each search path an `include` is *not* found in before it finds the
# file; those are noise (a real miss raises).
logging.getLogger().addFilter(lambda record: not str(record.msg).startswith("Path not found:"))



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


gin.config._FILE_READERS[:] = [(reader, _never_raises(exists)) for reader, exists in gin.config._FILE_READERS]


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


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
              required_macros: Sequence[str] = ()) -> list[str]:
    """Parses gin files then bindings (later ones win), checks macros, finalizes. Returns the resolved paths.

    Errors in a file or binding are re-raised as ConfigError naming the file or binding; see `check_macros` for
    what `required_macros` enforces (pass REQUIRED_TRAIN_MACROS for a training run).
    """
    search_paths = [os.path.abspath(p) for p in search_paths]
    for path in [*search_paths, builtin_gin_dir()]:
        gin.add_config_file_search_path(path)
    resolved = [resolve_gin_file(f, search_paths) for f in gin_files]
    for path in resolved:
        try:
            gin.parse_config_file(path)
        except (ValueError, SyntaxError, KeyError, ImportError) as e:
            raise ConfigError(f"error in gin file {path}: {e}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError, KeyError, ImportError) as e:
            raise ConfigError(f"error in gin binding `{binding}` (from --gin.* or --gin_bindings): {e}") from e
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


def check_macros(required: Sequence[str] = REQUIRED_TRAIN_MACROS) -> None:
    """Fails before any work if a required macro is unset, or a macro is set that nothing uses.

    A macro that is defined but never referenced is almost always a misspelling (`TRAIN_STPES = 10`): it would
    otherwise be silently ignored.
    """
    defined, referenced = set(), set()
    for (scope, selector), params in gin.config._CONFIG.items():  # gin has no public API for this listing
        if selector == "gin.macro":
            defined.add(scope)
        for value in params.values():
            _macro_references(value, referenced)
    for name in required:
        if name not in defined:
            hint = difflib.get_close_matches(name, sorted(defined), n=1)
            extra = f" (did you mean to set {name} instead of {hint[0]}?)" if hint else ""
            raise ConfigError(f"required gin binding {name} is not set{extra}: add `{name} = ...` to a gin file "
                              f"or pass --gin.{name}=VALUE.")
    for name in sorted(referenced - defined):
        raise ConfigError(f"gin binding {name} is used (%{name}) but never set: add `{name} = ...` to a gin file "
                          f"or pass --gin.{name}=VALUE.")
    for name in sorted(defined - referenced - set(required)):
        hint = difflib.get_close_matches(name, sorted(referenced | set(required)), n=1)
        extra = f"; did you mean {hint[0]}?" if hint else ""
        raise ConfigError(f"gin binding {name} is set but nothing uses it{extra} Check the spelling of --gin.{name} "
                          "or of the macro in your gin files.")


def save_operative_config(model_dir: str) -> str:
    """Writes the operative gin config to MODEL_DIR/config.gin; an existing, different one is kept, renamed."""
    path = os.path.join(model_dir, "config.gin")
    text = gin.operative_config_str()
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old != text:
            index = 1
            while os.path.exists(os.path.join(model_dir, f"config.{index}.gin")):
                index += 1
            os.replace(path, os.path.join(model_dir, f"config.{index}.gin"))
    with open(path, "w") as f:
        f.write(text)
    return path
