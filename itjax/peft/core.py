"""What every parameter-efficient method shares: the adapter variable type, target lookup and adapter dropout.

A method is a gin-configurable object whose `apply(module, rngs)` performs surgery on a freshly built model
(T5 or Llama): it swaps targeted `Dense` layers for adapter-carrying subclasses, or sets a model's hook attribute
(`input_prompt`, attention `extra_kv`). Adapter weights are `AdapterParam`s, a subclass of `nnx.Param`, so

    graphdef, adapter, base = nnx.split(module, AdapterParam, nnx.Param)

separates the trainable adapter from the frozen base. Surgery keeps every base variable at its original path
(a LoRA layer adopts the replaced layer's `kernel`), so the base tree equals the plain model's parameter tree and
an ordinary checkpoint (`train.initial_checkpoint_path`) loads into it unchanged.
"""

from __future__ import annotations

import abc

import contextlib
import contextvars
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from itjax.config import ConfigError
from itjax import param_paths
from itjax.models import scan
from itjax.models.layers import Dense


class AdapterParam(nnx.Param):
    """A trainable adapter weight; everything else in a PEFT model (plain `nnx.Param`) is frozen."""


class PeftConfigError(ConfigError):
    """A PEFT setting does not fit the model or the task (the message names the gin setting)."""


class PeftMethod(abc.ABC):
    """Interface of a PEFT method (LoRA, PromptTuning, PrefixTuning, IA3).

    apply(module, rngs): adds the adapter to a freshly built module (in place) and returns it. Adapter values may
      depend on the base weights already in `module` (prompt tuning's 'vocab' initialisation), so the trainer
      applies it after the base weights are loaded. `rngs.params()` draws the adapter's initialisation keys.
    check(task_feature_lengths, pack, task=None): raises PeftConfigError when the method cannot run on these
      features (`task`, the seqio task or mixture, lets a method read its vocabulary).
    feature_converter_kwargs(pack): what the training rows' feature converter needs for the method (default none).
    dropout_rate: > 0 when the adapter applies dropout (the trainer then provides `adapter_dropout` keys).
    """

    name = "peft"
    dropout_rate = 0.0

    @abc.abstractmethod
    def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        """The method's surgery on `module` (see the class docstring)."""

    def check(self, task_feature_lengths: dict, pack: bool, task=None) -> None:
        del task_feature_lengths, pack, task

    def feature_converter_kwargs(self, pack: bool) -> dict:
        """Extra keyword arguments for the model's `feature_converter(pack=...)` of the training rows (prompt
        tuning: the prompt slots of packed rows)."""
        del pack
        return {}

    def check_layout(self, abstract_base) -> None:
        """Raises PeftConfigError when the frozen base as the method stores it (ShapeDtypeStructs carrying their
        mesh shardings) cannot be laid out (QLoRA: a shard would split a quantization block)."""
        del abstract_base


# ------------------------------------------------------------------------------------------------ targets
def path_name(path: tuple) -> str:
    """('encoder', 'layers', 0, 'attention', 'q') -> 'encoder.layers.0.attention.q'."""
    return ".".join(str(p) for p in path)


def dense_layers(module: nnx.Module) -> dict[tuple, Dense]:
    """Every `Dense` sub-module (incl. Llama's biased `Projection`) by its path, e.g. ('encoder', 'layers', 0,
    'attention', 'q')."""
    return {tuple(path): node for path, node in nnx.iter_graph(module)
            if isinstance(node, Dense) and len(path) > 0}


def model_family(module: nnx.Module) -> str:
    """'llama' for the decoder-only family (q_proj-style layer names), 't5' otherwise: which defaults a method
    uses (target layers, the embedding table)."""
    return "llama" if any(p[-1] == "q_proj" for p in dense_layers(module)) else "t5"


def find_targets(module: nnx.Module, target_modules: Sequence[str], setting: str) -> dict[tuple, Dense]:
    """The Dense layers whose attribute name (the last path element) is one of `target_modules`.

    Raises PeftConfigError naming `setting` when a name matches no layer, listing the names that exist.
    """
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if not target_modules:
        raise PeftConfigError(f"{setting} is empty; name at least one layer to adapt.")
    layers = dense_layers(module)
    available = sorted({str(path[-1]) for path in layers})
    unknown = [name for name in target_modules if name not in available]
    if unknown:
        raise PeftConfigError(f"{setting}={list(target_modules)}: {unknown} match no layer of "
                              f"{type(module).__name__}; available names: {available}.")
    return {path: layer for path, layer in layers.items() if str(path[-1]) in target_modules}


def submodule(module: nnx.Module, path: Sequence) -> nnx.Module:
    for key in path:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def replace(module: nnx.Module, path: tuple, new: nnx.Module) -> None:
    """Puts `new` at `path` (attribute or nnx.List index) inside `module`."""
    parent, key = submodule(module, path[:-1]), path[-1]
    if isinstance(key, int):
        parent[key] = new
    else:
        setattr(parent, key, new)


def stack_shape(layer: Dense) -> tuple[int, ...]:
    """The leading layer-stack dims of a Dense inside a `scan_layers` stack ((L,)), else ()."""
    axes = _kernel_axes(layer)
    lead = 0
    while lead < len(axes) and axes[lead] == param_paths.LAYER_AXIS:
        lead += 1
    return tuple(layer.kernel.shape[:lead])


def stack_axes(layer: Dense) -> tuple:
    """Logical names of `stack_shape(layer)`: what an adapter variable of this layer puts in front of its own."""
    return (param_paths.LAYER_AXIS,) * len(stack_shape(layer))


def in_shape(layer: Dense) -> tuple[int, ...]:
    """A Dense layer's input dims (without layer-stack dims)."""
    lead = len(stack_shape(layer))
    return tuple(layer.kernel.shape[lead:lead + layer.num_in_dims])


def out_shape(layer: Dense) -> tuple[int, ...]:
    return tuple(layer.kernel.shape[len(stack_shape(layer)) + layer.num_in_dims:])


def out_axes(layer: Dense) -> tuple:
    """Logical axis names of a Dense layer's output dims (from its kernel's metadata)."""
    return _kernel_axes(layer)[len(stack_shape(layer)) + layer.num_in_dims:]


def in_axes(layer: Dense) -> tuple:
    lead = len(stack_shape(layer))
    return _kernel_axes(layer)[lead:lead + layer.num_in_dims]


def stacked_init(init, key: jax.Array, stack: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
    """`init(key, shape)` for one layer, or independent draws [*stack, *shape] for a layer stack (so fan-in based
    initialisers see one layer's fans)."""
    if not stack:
        return init(key, shape, jnp.float32)
    keys = jax.random.split(key, math.prod(stack))
    return jax.vmap(lambda k: init(k, shape, jnp.float32))(keys).reshape(stack + shape)


def _kernel_axes(layer: Dense) -> tuple:
    meta = layer.kernel.get_metadata()
    axes = meta.get("out_sharding") or meta.get("sharding_names")
    return tuple(axes) if axes is not None else (None,) * len(layer.kernel.shape)


def adopt_dense(new: Dense, old: Dense) -> None:
    """Makes `new` (a Dense subclass built without Dense.__init__) use `old`'s variables and settings, so the
    base weights keep their paths (`.../q/kernel`, Llama's `.../q_proj/bias`)."""
    new.kernel = old.kernel
    new.num_in_dims = old.num_in_dims
    new.dtype = old.dtype
    if hasattr(old, "bias"):
        new.bias = old.bias


def dense_forward(layer: Dense, x: jax.Array) -> jax.Array:
    """The base projection of a Dense (plus Llama's optional bias): [..., *in_dims] -> [..., *out_dims]."""
    y = Dense.__call__(layer, x)
    if hasattr(layer, "bias"):
        y = y + layer.bias[...].astype(layer.dtype)
    return y


# ------------------------------------------------------------------------------------------------ dropout
_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar("itjax_adapter_dropout", default=None)


@contextlib.contextmanager
def adapter_dropout(key: jax.Array | None) -> Iterator[None]:
    """Enables adapter dropout (e.g. LoRA's) for model code traced inside, with keys derived from `key`.

    Model layers take no PRNG argument (`Dense.__call__(x)`), so adapter layers read the step's key from here and
    fold in their own `layer_id`: the forward pass stays a pure function of (params, inputs, key).
    """
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def dropout_key(layer_id: int) -> jax.Array | None:
    """The dropout key of adapter `layer_id` (in a `scan_layers` stack, also of the scanned layer), or None."""
    key = _DROPOUT_KEY.get()
    if key is None:
        return None
    key = jax.random.fold_in(key, layer_id)
    index = scan.current_layer_index()
    return key if index is None else jax.random.fold_in(key, index)


def submodule_dict(tree: dict, path: Sequence) -> dict:
    """The node at `path` of a parameter pure dict; a clear error when the base has no such layer."""
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise PeftConfigError(f"the base parameters have no layer {path_name(tuple(path))}: the adapter "
                                  "belongs to another model.")
        node = node[key]
    return node


def feature_converter_kwargs(method: PeftMethod | None, pack: bool) -> dict:
    """`method.feature_converter_kwargs(pack)`, {} without a PEFT method: for `model.feature_converter(pack=pack,
    **...)` wherever training rows are built."""
    return {} if method is None else method.feature_converter_kwargs(pack)
