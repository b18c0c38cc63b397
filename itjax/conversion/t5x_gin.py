"""The `network.T5Config` bindings of a T5X gin file (the operative `config.gin` T5X writes to its model folder),
read without importing t5x.

gin's own parser (`gin.config_parser.ConfigParser`) reads the statements; configurable references (`@x()`) and
macros (`%X`) are kept as markers instead of being resolved against registered configurables, so nothing of t5x,
seqio or the network has to be importable. Macros used as T5Config values are then looked up among the file's
macro bindings (`DROPOUT_RATE = 0.1`). Both binding forms are read: `network.T5Config.emb_dim = 768` lines (what
T5X writes) and `network.T5Config:` blocks (hand-written model files). `include` statements are followed relative
to the including file. The last binding of a name wins, as in gin.

Accepted selectors: any configurable named `T5Config` whose module path is T5X's (`network.T5Config`,
`t5x.examples.t5.network.T5Config`, `t5x.examples.scalable_t5.network.T5Config`, ...). A scoped T5Config binding
(`encoder/network.T5Config.x`) or a field this reader does not know is refused, since it could change the
architecture in a way the conversion would silently ignore.
"""

from __future__ import annotations

import os
from typing import Any

from itjax.conversion import ConversionError

# network.T5Config fields of t5x/examples/t5 and t5x/examples/scalable_t5 (T5X's T5 networks).
T5X_FIELDS = ("vocab_size", "dtype", "emb_dim", "num_heads", "num_encoder_layers", "num_decoder_layers",
              "head_dim", "mlp_dim", "mlp_activations", "dropout_rate", "logits_via_embedding",
              "float32_attention_logits", "remat_policy", "scan_layers", "param_scan_axis")
# Fields the conversion does not use (activation dtype, dropout, remat: set those in itjax's gin); a macro of theirs
# that the file leaves unresolved (`DROPOUT_RATE = %gin.REQUIRED` in a model file) is not an error.
UNUSED_FIELDS = ("dtype", "dropout_rate", "float32_attention_logits", "remat_policy")
FLAG = "--t5x_gin"


class _Reference:
    def __init__(self, name: str, evaluate: bool):
        self.name, self.evaluate = name, evaluate

    def __repr__(self) -> str:
        return f"@{self.name}{'()' if self.evaluate else ''}"


class _Macro:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"%{self.name}"


def _is_t5_config(selector: str) -> bool:
    return selector.rpartition(".")[2] == "T5Config" and not selector.startswith("itjax.")


def _statements(path: str, seen: tuple[str, ...] = ()):
    """Yields the BindingStatements of `path` and its includes, in order."""
    from gin import config_parser

    class Delegate(config_parser.ParserDelegate):
        def configurable_reference(self, scoped_configurable_name, evaluate):
            return _Reference(scoped_configurable_name, evaluate)

        def macro(self, macro_name):
            return _Macro(macro_name)

    if not os.path.isfile(path):
        raise ConversionError(f"{FLAG} {path} does not exist." if not seen else
                              f"{FLAG}: {seen[-1]} includes {path}, which does not exist; pass the operative "
                              "config.gin T5X wrote to the run's model folder (it has no includes).")
    if path in seen:
        raise ConversionError(f"{FLAG}: {path} includes itself (through {' -> '.join(seen)}).")
    with open(path, encoding="utf-8") as f:
        try:
            statements = list(config_parser.ConfigParser(f, Delegate()))
        except SyntaxError as e:
            raise ConversionError(f"{FLAG} {path}:{e.lineno}: not valid gin ({e.msg}).") from None
    for statement in statements:
        if isinstance(statement, config_parser.IncludeStatement):
            yield from _statements(os.path.join(os.path.dirname(path), statement.filename), seen + (path,))
        elif isinstance(statement, config_parser.BindingStatement):
            yield statement


def read_t5_config_bindings(path: str) -> dict[str, Any]:
    """T5X `network.T5Config` field -> value (macros resolved) bound in the gin file `path`.

    Raises ConversionError naming the file and line for scoped or unknown T5Config bindings, unresolvable macros
    and configurable references as values, and when the file binds no T5Config at all.
    """
    macros: dict[str, Any] = {}
    bindings: dict[str, tuple[Any, Any]] = {}
    for statement in _statements(path):
        where = f"{statement.location.filename or path}:{statement.location.line_num}"
        if not statement.arg_name and not statement.scope:
            macros[statement.selector] = statement.value
        elif _is_t5_config(statement.selector):
            binding = f"{statement.selector}.{statement.arg_name}"
            if statement.scope:
                raise ConversionError(f"{FLAG} {where}: the scoped binding {statement.scope}/{binding} is not "
                                      "supported; bind the T5Config fields without a scope.")
            if statement.arg_name not in T5X_FIELDS:
                raise ConversionError(f"{FLAG} {where}: {binding} is not a field of T5X's T5Config that itjax "
                                      f"knows ({', '.join(T5X_FIELDS)}); the network is not one itjax converts.")
            bindings[statement.arg_name] = (statement.value, where)
    if not bindings:
        raise ConversionError(f"{FLAG} {path} binds no network.T5Config field; pass the operative config.gin of "
                              "the T5X run that wrote the checkpoint.")
    resolved = {}
    for name, (value, where) in bindings.items():
        try:
            resolved[name] = _resolve(value, macros, where, name)
        except ConversionError:
            if name not in UNUSED_FIELDS:
                raise
    return resolved


def _resolve(value: Any, macros: dict[str, Any], where: str, name: str, depth: int = 0) -> Any:
    if isinstance(value, _Macro):
        if value.name not in macros or depth > 20:
            raise ConversionError(f"{FLAG} {where}: T5Config.{name} = {value!r}, and the macro {value.name} is "
                                  "not bound in the file (or its includes).")
        return _resolve(macros[value.name], macros, where, name, depth + 1)
    if isinstance(value, _Reference):
        raise ConversionError(f"{FLAG} {where}: T5Config.{name} = {value!r} is a configurable reference; itjax "
                              "needs a literal value here.")
    return value
