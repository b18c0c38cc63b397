"""Parameter-path conventions shared by models, checkpoints, optimizers, PEFT and conversion: layer stacks.

A transformer's repeated layers live under a key named `LAYER_AXIS` ('layers'), in one of two layouts of a
parameter pure dict (nested dicts of arrays or `jax.ShapeDtypeStruct`s):

    per layer:  ...layers.{0..L-1}.<leaf path>     e.g. encoder.layers.3.mlp.wo.kernel    [mlp, embed]
    stacked:    ...layers.<leaf path>  [L, ...]     e.g. encoder.layers.mlp.wo.kernel      [L, mlp, embed]

(the stacked layout is what `scan_layers=True` models hold, with the logical axis name 'layers' first). This
module reads paths (`layer_stack`, `is_stacked`) and converts between the layouts (`stack_layers`,
`unstack_layers`); it imports no model code, so any module may import it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp

LAYER_AXIS = "layers"


def layer_stack(keys: Sequence[str]) -> tuple[tuple[str, ...], bool] | None:
    """For a parameter path (its keys as strings): (the path of its layer stack, up to and including 'layers';
    whether the stack is stacked, i.e. the key after 'layers' is a name, not a layer index), or None outside
    stacks. E.g. ('encoder', 'layers', 'mlp', 'wo', 'kernel') -> (('encoder', 'layers'), True)."""
    for i, key in enumerate(keys[:-1]):
        if key == LAYER_AXIS:
            return tuple(keys[:i + 1]), not str(keys[i + 1]).isdigit()
    return None


def _is_layer_index(key: Any) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _is_per_layer(node: Any) -> bool:
    return isinstance(node, dict) and bool(node) and all(_is_layer_index(k) for k in node)


def is_stacked(tree: Any) -> bool | None:
    """True if a parameter pure dict keeps its layer stacks stacked, False if per layer, None without stacks."""
    found = None
    for node in _layer_nodes(tree):
        found = not _is_per_layer(node)
    return found


def _layer_nodes(tree: Any) -> Iterator[Any]:
    if isinstance(tree, dict):
        for key, child in tree.items():
            if key == LAYER_AXIS and isinstance(child, dict):
                yield child
            else:
                yield from _layer_nodes(child)


def _map_layer_nodes(tree: Any, fn: Callable[[dict], dict]) -> Any:
    if not isinstance(tree, dict):
        return tree
    return {key: fn(child) if key == LAYER_AXIS and isinstance(child, dict) else _map_layer_nodes(child, fn)
            for key, child in tree.items()}


def stack_layers(tree: Any, stack: Callable[[list], Any] = jnp.stack) -> Any:
    """Per-layer pure dict (`...layers.{0..L-1}.<leaf path>`) -> stacked (`...layers.<leaf path>` [L, ...]).

    Stacks that are already stacked are left as they are. `stack` joins a list of L leaves (default jnp.stack; use
    np.stack on host arrays).
    """
    def stack_node(node: dict) -> dict:
        if not _is_per_layer(node):
            return node
        ordered = [node[k] for k in sorted(node, key=int)]
        if [int(k) for k in sorted(node, key=int)] != list(range(len(ordered))):
            raise ValueError(f"layer indices {sorted(node, key=int)} are not 0..{len(ordered) - 1}")
        return jax.tree.map(lambda *leaves: stack(list(leaves)), *ordered)
    return _map_layer_nodes(tree, stack_node)


def stack_abstract(leaves: list) -> jax.ShapeDtypeStruct:
    """The `stack` of `stack_layers` for `jax.ShapeDtypeStruct` leaves: shape [L, ...], sharding replicated over L."""
    first = leaves[0]
    sharding = first.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype, sharding=sharding)


def unstack_layers(tree: Any) -> Any:
    """Stacked pure dict (`...layers.<leaf path>` [L, ...]) -> per layer (`...layers.{i}.<leaf path>`, int keys).

    Works on arrays and on `jax.ShapeDtypeStruct` leaves (shapes lose the leading L; shardings, if any, lose their
    first dimension). Stacks that are already per layer are left as they are.
    """
    def unstack_node(node: dict) -> dict:
        if _is_per_layer(node):
            return node
        num = jax.tree.leaves(node)[0].shape[0]
        return {i: jax.tree.map(lambda leaf, i=i: _layer_slice(leaf, i), node) for i in range(num)}
    return _map_layer_nodes(tree, unstack_node)


def _layer_slice(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[i]
