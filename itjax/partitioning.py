"""Device mesh and logical-axis rules -> shardings (the T5X PjitPartitioner idea, without the class zoo).

Every parameter and the main activations are annotated with *logical* axis names (`batch`, `length`, `embed`,
`mlp`, `heads`, `kv`, `vocab`, ...). A rules table maps each logical name to a *mesh* axis (`data`, `fsdp`,
`tensor`) or to None (replicated). Data parallel, FSDP and tensor parallel are different rule tables, not
different code.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# A rule maps one logical axis name to a mesh axis name, a tuple of mesh axis names, or None (replicated).
LogicalRules = Sequence[tuple[str, Any]]

# Data parallel: batch over every data-like mesh axis, parameters replicated.
DATA_PARALLEL_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
)
# FSDP (ZeRO-3 style): batch over data and fsdp, every parameter's `embed` dimension sharded over fsdp.
FSDP_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
)
# Tensor (model) parallel, Megatron style: heads / mlp / vocab split over `tensor`.
TENSOR_PARALLEL_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
# T5X's standard 2D rules: FSDP-like `embed` sharding plus tensor parallel heads / mlp / vocab.
STANDARD_2D_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)
# The layouts in gin/partitioning/*.gin bind these tables by name (`%itjax.partitioning.FSDP_RULES`), so each is
# written once, here. Registering a gin constant is a declaration like `@gin.configurable`: it binds nothing.
gin.constant("itjax.partitioning.DATA_PARALLEL_RULES", DATA_PARALLEL_RULES)
gin.constant("itjax.partitioning.FSDP_RULES", FSDP_RULES)
gin.constant("itjax.partitioning.TENSOR_PARALLEL_RULES", TENSOR_PARALLEL_RULES)
gin.constant("itjax.partitioning.STANDARD_2D_RULES", STANDARD_2D_RULES)


def logical_to_mesh_spec(logical_axes: Sequence[str | None], rules: LogicalRules) -> PartitionSpec:
    """Maps a tuple of logical axis names to a PartitionSpec with the rules table.

    As in T5X / flax: for each dimension the first rule for its name whose mesh axes are not already used by an
    earlier dimension wins; names without an applicable rule are replicated (None).
    """
    used: set[str] = set()
    spec: list[Any] = []
    for name in logical_axes:
        chosen = None
        if name is not None:
            for rule_name, mesh_axes in rules:
                if rule_name != name:
                    continue
                if mesh_axes is None:
                    break
                axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
                if used.isdisjoint(axes):
                    chosen = axes[0] if len(axes) == 1 else axes
                    used.update(axes)
                    break
        spec.append(chosen)
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class _Context:
    mesh: Mesh
    rules: LogicalRules


_ACTIVE: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("itjax_partitioning", default=None)


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Makes `with_logical_constraint` active while tracing model code under this mesh and rules table."""
    token = _ACTIVE.set(_Context(mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical axis names; a no-op outside `axis_rules` (e.g. 1 device)."""
    ctx = _ACTIVE.get()
    if ctx is None or ctx.mesh.size == 1:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"with_logical_constraint: {len(logical_axes)} names {tuple(logical_axes)} for an array "
                         f"of rank {x.ndim}")
    spec = logical_to_mesh_spec(logical_axes, ctx.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def active_sharding(logical_axes: Sequence[str | None]) -> NamedSharding | None:
    """The sharding `with_logical_constraint` would give `logical_axes`; None outside `axis_rules` or on 1 device
    (for code that must shard_map a kernel XLA cannot partition, e.g. TPU splash attention)."""
    ctx = _ACTIVE.get()
    if ctx is None or ctx.mesh.size == 1:
        return None
    return NamedSharding(ctx.mesh, logical_to_mesh_spec(logical_axes, ctx.rules))


def _mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to 'the rest of the devices' and checks the product."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"Partitioner: at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"Partitioner: {num_devices} devices are not divisible by the fixed mesh axes "
                             f"(data={data} fsdp={fsdp} tensor={tensor}); change Partitioner.* in gin.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"Partitioner: mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                         f"{math.prod(sizes)} devices but {num_devices} are available; change Partitioner.* in gin.")
    return tuple(sizes)


@gin.configurable
class Partitioner:
    """Builds the device mesh and turns logical axis names into shardings.

    Gin: `Partitioner.data`, `.fsdp`, `.tensor` are mesh axis sizes (one may be -1: all remaining devices) and
    `Partitioner.logical_axis_rules` is the rules table: one of DATA_PARALLEL_RULES etc. (in gin
    `%itjax.partitioning.FSDP_RULES`, as gin/partitioning/*.gin bind them) or a list of (logical, mesh axes) pairs.
    """

    def __init__(self, data: int = -1, fsdp: int = 1, tensor: int = 1,
                 logical_axis_rules: LogicalRules = DATA_PARALLEL_RULES, devices: Sequence[jax.Device] | None = None):
        devices = list(devices if devices is not None else jax.devices())
        shape = _mesh_shape(data, fsdp, tensor, len(devices))
        self.mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
        self.rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                           for name, axes in logical_axis_rules)

    def __repr__(self) -> str:
        return f"Partitioner(mesh={dict(self.mesh.shape)}, rules={self.rules})"

    def axis_rules(self):
        """Context manager activating `with_logical_constraint` for code traced inside it."""
        return axis_rules(self.mesh, self.rules)

    def sharding(self, logical_axes: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_mesh_spec(logical_axes, self.rules))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Sharding of an input batch array [batch, ...]: rows split over the batch axes, the rest replicated."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    @property
    def batch_divisor(self) -> int:
        """The global batch (and each microbatch) must be a multiple of this many rows."""
        spec = logical_to_mesh_spec(("batch",), self.rules)[0]
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else spec)
        return math.prod(self.mesh.shape[a] for a in axes)

    def param_shardings(self, logical_axes_tree: Any) -> Any:
        """Maps a pytree whose leaves are tuples of logical names to a pytree of NamedShardings."""
        return jax.tree.map(self.sharding, logical_axes_tree, is_leaf=lambda x: isinstance(x, tuple))

    def optimizer_state_shardings(self, opt_state: Any, params: Any, param_shardings: Any) -> Any:
        """Shardings for an optax state: a leaf shaped like its parameter takes the parameter's sharding.

        Optimizer state leaves are found by their dict key path (optax wraps the parameter tree in NamedTuples and
        sometimes dicts, e.g. multi_transform's labels, so the trailing dict keys of a leaf's path are its
        parameter's path). Anything else (step counts, Adafactor's factored row / column statistics) is small and
        replicated.
        """
        by_path = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            by_path[_dict_keys(path)] = (np.shape(leaf), _get(param_shardings, path))

        def leaf_sharding(path, leaf):
            keys = _dict_keys(path)
            for start in range(len(keys)):
                entry = by_path.get(keys[start:])
                if entry is not None and entry[0] == np.shape(leaf):
                    return entry[1]
            return self.replicated
        return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)


def _dict_keys(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _get(tree, path):
    for k in path:
        tree = tree[k.key] if isinstance(k, jax.tree_util.DictKey) else tree[k.idx]
    return tree


def logical_axes_of(state: Any) -> Any:
    """Pure-dict pytree of logical axis tuples for an nnx.State whose Params carry `sharding_names`."""
    from flax import nnx  # local: keep this module importable without flax for the rules helpers

    def names(variable):
        axes = variable.get_metadata().get("out_sharding") or variable.get_metadata().get("sharding_names")
        if axes is None:
            return (None,) * np.ndim(variable.get_value() if hasattr(variable, "get_value") else variable.value)
        return tuple(axes)
    return nnx.to_pure_dict(jax.tree.map(names, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
