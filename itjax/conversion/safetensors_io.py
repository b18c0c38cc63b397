"""HF safetensors folders without torch: a streamed reader (one tensor at a time) and a sharded writer.

A HF folder holds `model.safetensors`, or shards listed in `model.safetensors.index.json` (`weight_map`: tensor
name -> shard file). numpy has no bfloat16, so BF16 tensors are read from the file's raw bytes and widened to
float32 exactly (a bf16 value is the upper 16 bits of the float32 with the same value).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import numpy as np

from itjax.conversion import ConversionError

HF_SINGLE_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3  # bytes


class SafetensorsReader:
    """Lazy access to the tensors of a HF folder (single file or sharded), one tensor at a time, no torch."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, HF_INDEX_FILE)
        single = os.path.join(hf_dir, HF_SINGLE_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="numpy") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise ConversionError(f"{hf_dir}: neither {HF_SINGLE_FILE} nor {HF_INDEX_FILE} found; convert .bin "
                                  f"checkpoints to safetensors first (transformers `save_pretrained`).")

    @classmethod
    def of_file(cls, path: str) -> "SafetensorsReader":
        """A reader of one safetensors file (e.g. a peft folder's adapter_model.safetensors)."""
        from safetensors import safe_open

        reader = cls.__new__(cls)
        with safe_open(path, framework="numpy") as f:
            reader.files = {name: path for name in f.keys()}
        return reader

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, read from the file headers only."""
        from safetensors import safe_open

        shapes = {}
        for path in sorted(set(self.files.values())):
            with safe_open(path, framework="numpy") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        return shapes

    def get(self, name: str) -> np.ndarray:
        """One tensor as numpy (bfloat16 widened to float32 exactly)."""
        from safetensors import safe_open

        path = self.files[name]
        with safe_open(path, framework="numpy") as f:
            if f.get_slice(name).get_dtype() == "BF16":
                return _read_bf16(path, name)
            return f.get_tensor(name)


def _read_bf16(path: str, name: str) -> np.ndarray:
    """Reads a bfloat16 tensor (which numpy cannot represent) as float32, from the safetensors header layout."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(header_size))[name]
    begin, end = info["data_offsets"]
    raw = np.memmap(path, dtype="<u2", mode="r", offset=8 + header_size + begin, shape=((end - begin) // 2,))
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], hf_dir: str,
                      max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Writes tensors as `model.safetensors`, or shards plus `model.safetensors.index.json` when they exceed
    `max_shard_size` bytes. Holds at most one shard in memory. Returns the written file names."""
    from safetensors.numpy import save_file

    shards: list[str] = []
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}
    shard_bytes = total_bytes = 0

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, os.path.join(hf_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shards.append(name)
        shard.clear()

    for name, array in tensors:
        if shard and shard_bytes + array.nbytes > max_shard_size:
            flush()
            shard_bytes = 0
        shard[name] = array
        shard_bytes += array.nbytes
        total_bytes += array.nbytes
    if shard:
        flush()
    return _name_shards(hf_dir, shards, weight_map, total_bytes)


def _name_shards(hf_dir: str, shards: list[str], weight_map: dict[str, str], total_bytes: int) -> list[str]:
    """Renames shards to HF's `model-0000i-of-0000n.safetensors` (or `model.safetensors`) and writes the index."""
    if len(shards) == 1:
        os.replace(os.path.join(hf_dir, shards[0]), os.path.join(hf_dir, HF_SINGLE_FILE))
        return [HF_SINGLE_FILE]
    final = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
    for old, new in final.items():
        os.replace(os.path.join(hf_dir, old), os.path.join(hf_dir, new))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    with open(os.path.join(hf_dir, HF_INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return list(final.values()) + [HF_INDEX_FILE]
