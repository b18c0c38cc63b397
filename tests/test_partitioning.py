import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from itjax import partitioning
from itjax.partitioning import Partitioner, logical_to_mesh_spec


def test_rules_map_logical_names_to_mesh_axes():
    rules = partitioning.STANDARD_2D_RULES
    assert logical_to_mesh_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("vocab", "embed"), rules) == P("tensor", "fsdp")
    assert logical_to_mesh_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert logical_to_mesh_spec(("relpos_buckets", "heads"), rules) == P(None, "tensor")


def test_a_mesh_axis_is_used_once_per_array():
    rules = (("heads", "tensor"), ("kv", "tensor"), ("kv", None))
    # `kv` wants `tensor` too, but `heads` already took it: replicated.
    assert logical_to_mesh_spec(("embed", "heads", "kv"), rules) == P(None, "tensor", None)
    # Of two rules for a name, the first whose axes are still free wins.
    rules = (("batch", "data"), ("embed", "data"), ("embed", "fsdp"))
    assert logical_to_mesh_spec(("batch", "embed"), rules) == P("data", "fsdp")


def test_mesh_shape_fills_minus_one_and_checks_the_product():
    assert jax.device_count() == 8  # tests/conftest.py forces 8 CPU devices
    assert dict(Partitioner(data=-1).mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(Partitioner(data=2, fsdp=-1, tensor=2).mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 4 devices but 8"):
        Partitioner(data=2, fsdp=2, tensor=1)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        Partitioner(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="not divisible"):
        Partitioner(data=-1, tensor=3)


def test_batch_divisor_counts_the_batch_sharded_axes():
    p = Partitioner(data=2, fsdp=2, tensor=2, logical_axis_rules=partitioning.STANDARD_2D_RULES)
    assert p.batch_divisor == 4
    p = Partitioner(data=1, fsdp=1, tensor=-1, logical_axis_rules=partitioning.TENSOR_PARALLEL_RULES)
    assert p.batch_divisor == 1


def test_optimizer_state_follows_parameter_shardings():
    p = Partitioner(data=1, fsdp=-1, tensor=1, logical_axis_rules=partitioning.FSDP_RULES)
    params = {"dense": {"kernel": np.zeros((256, 128), np.float32)}, "norm": {"scale": np.zeros((256,), np.float32)}}
    axes = {"dense": {"kernel": ("embed", "mlp")}, "norm": {"scale": ("embed",)}}
    shardings = p.param_shardings(axes)
    assert shardings["dense"]["kernel"].spec == P("fsdp", None)
    for tx in (optax.adamw(1e-3), optax.adafactor(1e-3)):
        state = jax.eval_shape(tx.init, params)
        state_shardings = p.optimizer_state_shardings(state, params, shardings)
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        flat_shardings = jax.tree.leaves(state_shardings, is_leaf=lambda x: hasattr(x, "spec"))
        for (path, leaf), sharding in zip(flat, flat_shardings):
            if leaf.shape == (256, 128):
                assert sharding.spec == P("fsdp", None), path
            elif leaf.shape not in ((256,),):
                assert sharding.spec == P(), path  # counts and factored statistics are replicated


def test_with_logical_constraint_is_a_noop_outside_a_mesh_and_shards_inside():
    x = jax.numpy.ones((8, 4))
    assert partitioning.with_logical_constraint(x, ("batch", "embed")) is x
    p = Partitioner(data=-1)

    @jax.jit
    def f(x):
        return partitioning.with_logical_constraint(x * 2, ("batch", "embed"))

    with p.axis_rules():
        y = f(x)
    # Rows split 8 ways (XLA drops the size-1 fsdp axis from the normalised spec).
    assert y.sharding.shard_shape(y.shape) == (1, 4)
    with pytest.raises(ValueError, match="rank"):
        with p.axis_rules():
            partitioning.with_logical_constraint(x, ("batch",))
