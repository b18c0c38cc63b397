"""Reading the parameters of a T5X checkpoint, one tensor at a time, in either format T5X writes.

    legacy   CKPT/checkpoint is a msgpack file (flax.serialization) of `{'version': 3, 'optimizer': state}` where
             state = {'target': params, 'state': {'step', 'param_states'}}; each large array is replaced by the
             JSON of a tensorstore spec `{'driver': 'zarr', 'kvstore': {'driver': 'file', 'path':
             'target.encoder.layers_0.attention.query.kernel'}, ...}` whose path is relative to CKPT (the zarr
             arrays beside the file); small arrays may sit in the msgpack itself. This is the format of the
             released T5 v1.1 / Flan-T5 / UL2 checkpoints. Version-0 files (no 'optimizer' level) are read too.
    orbax    CKPT/state/ is an orbax PyTree checkpoint (OCDBT) of the same state dict (current T5X's
             `OrbaxCheckpointManagerInterface`, item 'state').

Only `target` (the parameters) is read; the optimizer slots (`state/param_states`) are ignored. Names are the
parameter paths joined with '/', without the 'target/' prefix (e.g. 'encoder/layers_0/attention/query/kernel').
Every array comes back as float32 numpy (bfloat16 widened exactly).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from itjax.conversion import ConversionError

LEGACY_FILE = "checkpoint"
ORBAX_DIR = "state"
ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")  # files of an orbax PyTree checkpoint folder
TARGET = "target"
_STEP_DIR = re.compile(r"checkpoint_(\d+)$")


def open_checkpoint(path: str) -> "LegacyCheckpoint | OrbaxCheckpoint":
    """The T5X checkpoint at `path`: a `checkpoint_<step>` folder (either format), its msgpack `checkpoint` file or
    its orbax `state` folder.

    Raises ConversionError naming the path when it is missing or is not a T5X checkpoint (a T5X model folder with
    several `checkpoint_<step>` folders gets the list of steps to choose from).
    """
    flag = "--t5x_checkpoint"
    if not os.path.exists(path):
        raise ConversionError(f"{flag} {path} does not exist.")
    if os.path.isfile(path):
        return LegacyCheckpoint(path)
    if os.path.isdir(os.path.join(path, ORBAX_DIR)):
        return OrbaxCheckpoint(os.path.join(path, ORBAX_DIR))
    if any(os.path.exists(os.path.join(path, name)) for name in ORBAX_MARKERS):  # the `state` folder itself
        return OrbaxCheckpoint(path)
    if os.path.isfile(os.path.join(path, LEGACY_FILE)):
        return LegacyCheckpoint(os.path.join(path, LEGACY_FILE))
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(path)) if m)
    if steps:
        raise ConversionError(f"{flag} {path} is a T5X model folder with checkpoints at steps {steps}; pass one "
                              f"checkpoint folder, e.g. {os.path.join(path, f'checkpoint_{steps[-1]}')}.")
    raise ConversionError(f"{flag} {path} is not a T5X checkpoint: expected a checkpoint_<step> folder holding a "
                          f"msgpack '{LEGACY_FILE}' file (legacy format) or an orbax '{ORBAX_DIR}/' folder.")


def _flatten(tree: Any, is_leaf, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and not is_leaf(tree):
        out = {}
        for key, child in tree.items():
            out.update(_flatten(child, is_leaf, f"{prefix}{key}/"))
        return out
    return {prefix.rstrip("/"): tree}


def _as_float32(array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiu" and array.dtype.name != "bfloat16":
        raise ConversionError(f"unexpected array dtype {array.dtype} in the T5X checkpoint")
    return np.ascontiguousarray(array, dtype=np.float32)


class LegacyCheckpoint:
    """A legacy T5X checkpoint: the msgpack file `file` and the zarr arrays beside it (see the module docstring).

    shapes: parameter name -> shape, for every leaf of `target`. `read(name)` -> float32 array.
    """

    format = "legacy"

    def __init__(self, file: str):
        from flax import serialization

        self.file = file
        self.directory = os.path.dirname(os.path.abspath(file))
        try:
            with open(file, "rb") as f:
                contents = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several unrelated types on foreign bytes
            raise ConversionError(f"--t5x_checkpoint {file} is not a T5X msgpack checkpoint file ({e}).") from None
        state = contents.get("optimizer", contents) if isinstance(contents, dict) else None
        if not isinstance(state, dict) or TARGET not in state:
            raise ConversionError(f"--t5x_checkpoint {file} holds no '{TARGET}' (parameter) tree; is it a T5X "
                                  "checkpoint?")
        self.version = contents.get("version", 0)
        self._leaves = _flatten(state[TARGET], is_leaf=_is_spec)
        self.shapes = {name: self._shape(leaf) for name, leaf in self._leaves.items()}

    @staticmethod
    def _shape(leaf) -> tuple[int, ...]:
        if _is_spec(leaf):
            shape = leaf.get("metadata", {}).get("shape")
            if shape is None:
                raise ConversionError(f"tensorstore spec without metadata.shape: {leaf}")
            return tuple(int(s) for s in _as_list(shape))
        return tuple(np.shape(leaf))

    def read(self, name: str) -> np.ndarray:
        """The parameter `name` as a float32 numpy array."""
        leaf = self._leaves[name]
        if not _is_spec(leaf):
            return _as_float32(leaf)
        import tensorstore as ts

        spec = _local_spec(leaf, self.directory)
        try:
            store = ts.open(spec, read=True, open=True).result()
            array = store.read().result()
        except Exception as e:  # tensorstore reports missing or torn arrays as ValueError / RuntimeError
            raise ConversionError(f"--t5x_checkpoint: cannot read '{name}' from {_spec_path(spec)} ({e}).") from None
        if array.dtype == np.uint16 and self.version < 3:  # version 2 stored bfloat16 as its uint16 bits
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return _as_float32(array)


def _is_spec(node) -> bool:
    return isinstance(node, dict) and "driver" in node and "kvstore" in node


def _as_list(value):
    """flax.serialization writes lists as {'0': .., '1': ..} when they pass through its list handler."""
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=int)]
    return list(value)


def _local_spec(spec: dict, directory: str) -> dict:
    """The spec with its kvstore pointed at the local copy of the array (T5X writes paths relative to the
    checkpoint folder; 'gfile' / 'gcs' drivers become 'file', as T5X does when restoring a copied checkpoint)."""
    spec = dict(spec)
    kvstore = dict(spec["kvstore"])
    metadata = dict(spec.get("metadata", {}))
    for key in ("shape", "chunks"):
        if key in metadata:
            metadata[key] = _as_list(metadata[key])
    spec["metadata"] = metadata
    path = kvstore.get("path", spec.pop("path", None))  # tensorstore < 0.1.14 kept the path at the top
    if path is None:
        raise ConversionError(f"tensorstore spec without a path: {spec}")
    spec["kvstore"] = {"driver": "file", "path": os.path.join(directory, path)}
    return spec


def _spec_path(spec: dict) -> str:
    return spec["kvstore"]["path"]


class OrbaxCheckpoint:
    """An orbax-format T5X checkpoint: the PyTree checkpoint folder `directory` (`checkpoint_<step>/state`).

    shapes: parameter name -> shape, from the orbax metadata. `read(name)` restores that one array.
    """

    format = "orbax"

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp
        from etils import epath

        self.directory = os.path.abspath(directory)
        try:
            metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory))
        except Exception as e:  # orbax raises FileNotFoundError / ValueError / KeyError on foreign folders
            raise ConversionError(f"--t5x_checkpoint: {self.directory} is not a readable orbax checkpoint "
                                  f"({type(e).__name__}: {e}).") from None
        tree = getattr(metadata, "tree", metadata)
        if not isinstance(tree, dict) or TARGET not in tree:
            raise ConversionError(f"--t5x_checkpoint: the orbax checkpoint {self.directory} holds no '{TARGET}' "
                                  "(parameter) tree; is it a T5X checkpoint?")
        self._leaves = _flatten(tree[TARGET], is_leaf=lambda node: False)
        self.shapes = {name: tuple(getattr(leaf, "shape", ())) for name, leaf in self._leaves.items()}

    def read(self, name: str) -> np.ndarray:
        """Restores the parameter `name` alone (orbax partial restore) as a float32 numpy array."""
        import jax
        import orbax.checkpoint as ocp

        def nest(leaf):
            tree = leaf
            for key in reversed([TARGET] + name.split("/")):
                tree = {key: tree}
            return tree

        meta = self._leaves[name]
        item = nest(jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype))
        args = ocp.args.PyTreeRestore(item=item, restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)),
                                      partial_restore=True)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(self.directory, args=args)
        for key in [TARGET] + name.split("/"):
            restored = restored[key]
        return _as_float32(restored)
