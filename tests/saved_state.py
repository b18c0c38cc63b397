"""Reading a run's saved train state and progress in tests (shared by the resilience tests)."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def saved_state(model_dir, step):
    """The saved train state of `step` as numpy arrays (a flat {path: array}), read onto one device (the saving
    run may have had other devices)."""
    path = os.path.join(model_dir, "checkpoints", str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path)
        metadata = getattr(metadata, "item_metadata", metadata)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata,
                              is_leaf=lambda m: hasattr(m, "shape"))
        tree = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def train_lines(model_dir):
    """How many train lines the run's metrics.jsonl holds so far (0 before it exists): its progress."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum('"split": "train"' in line for line in f)
