"""One HF tensor <-> one itjax parameter: the map, the layout change both ways, and the checked streaming fill.

Layout kinds (`W` a torch Linear weight [out, in]; itjax kernels are [in, out] with attention in T5X einsum layout,
`E` = embed, `H` = heads, `D` = head dim):

    copy     same array                         (embeddings, norm scales, relative-position tables)
    linear   W.T                                [out, in] -> [in, out]
    qkv      W.T.reshape                        [H*D, E] -> [E, H, D]
    out      W.T.reshape                        [E, H*D] -> [H, D, E]
    bias     reshape                            [H*D] -> [H, D]
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Mapping

import numpy as np

from itjax.conversion import ConversionError

Params = dict  # nnx pure dict: nested dicts (layer indices are int keys) of float32 arrays
Path = tuple  # a path into Params, e.g. ("layers", 0, "self_attn", "q_proj", "kernel")
KINDS = ("copy", "linear", "qkv", "out", "bias")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one HF tensor becomes one itjax parameter (`kind` one of KINDS)."""

    hf_name: str
    path: Path
    kind: str


def to_itjax(kind: str, weight: np.ndarray, itjax_shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> itjax parameter of `itjax_shape` (float32, C-contiguous)."""
    if kind == "copy":
        out = weight
    elif kind == "linear":
        out = weight.T
    elif kind == "bias":
        out = weight.reshape(itjax_shape)
    else:  # 'qkv': [H*D, E] -> [E, H, D];  'out': [E, H*D] -> [H, D, E]
        out = weight.T.reshape(itjax_shape)
    return np.ascontiguousarray(out, dtype=np.float32)


def to_hf(kind: str, param: np.ndarray) -> np.ndarray:
    """itjax parameter -> HF tensor (exact inverse of `to_itjax`), float32, C-contiguous."""
    param = np.asarray(param, np.float32)
    if kind == "bias":
        return np.ascontiguousarray(param.reshape(-1))
    if kind == "qkv":
        param = param.reshape(param.shape[0], -1)
    elif kind == "out":
        param = param.reshape(-1, param.shape[-1])
    return np.ascontiguousarray(param if kind == "copy" else param.T)


def hf_shape(kind: str, itjax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that maps to an itjax parameter of `itjax_shape`."""
    if kind == "copy":
        return tuple(itjax_shape)
    if kind == "linear":
        return tuple(reversed(itjax_shape))
    if kind == "bias":
        return (int(np.prod(itjax_shape)),)
    if kind == "qkv":  # [E, H, D] -> [H*D, E]
        return (itjax_shape[1] * itjax_shape[2], itjax_shape[0])
    return (itjax_shape[2], itjax_shape[0] * itjax_shape[1])  # 'out': [H, D, E] -> [E, H*D]


def get_path(tree: Params, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: Params, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def check_tensors(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]], *,
                  tolerated: Mapping[str, tuple[int, ...] | None] = (), what: str, hint: str) -> None:
    """Raises one ConversionError listing every missing, unexpected or mis-shaped tensor.

    expected: HF name -> shape of the tensors the model needs; shapes: what the checkpoint holds;
    tolerated: extra names that may be present (name -> required shape, or None for any shape);
    what / hint: the message's subject ("a llama model of its config.json") and advice.
    """
    tolerated = dict(tolerated)
    problems = [f"  {n}: missing" for n in sorted(set(expected) - set(shapes))]
    problems += [f"  {n}: unexpected tensor {tuple(shapes[n])}"
                 for n in sorted(set(shapes) - set(expected) - set(tolerated))]
    wanted = {**{k: v for k, v in tolerated.items() if v is not None}, **expected}
    problems += [f"  {n}: shape {tuple(shapes[n])} != expected {tuple(wanted[n])}"
                 for n in sorted(set(shapes) & set(wanted)) if tuple(shapes[n]) != tuple(wanted[n])]
    if problems:
        raise ConversionError(f"the HF checkpoint does not match {what} ({len(problems)} tensors):\n"
                              + "\n".join(problems) + f"\n{hint}")


def fill_params(template: Params, maps: Iterable[TensorMap], get) -> Params:
    """Replaces the ShapeDtypeStruct leaves of `template` in place, one tensor at a time: for each map,
    `get(hf_name)` (a numpy array) is converted to the leaf's shape. Returns `template`."""
    for m in maps:
        set_path(template, m.path, to_itjax(m.kind, get(m.hf_name), get_path(template, m.path).shape))
    return template


def export_tensors(params: Params, maps: Iterable[TensorMap],
                   dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, array of `dtype`: 'float32', 'bfloat16' or 'float16') for every map, one at a
    time. Narrowing rounds to nearest even; a value read from a checkpoint of that dtype comes back exactly."""
    np_dtype = np_dtype_of(dtype)
    for m in maps:
        yield m.hf_name, to_hf(m.kind, get_path(params, m.path)).astype(np_dtype)


def np_dtype_of(dtype: str) -> np.dtype:
    """'float32' / 'bfloat16' / 'float16' -> numpy dtype (bfloat16 from ml_dtypes, which safetensors writes as BF16)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if dtype not in ("float32", "float16"):
        raise ConversionError(f"HF dtype {dtype!r} is not supported; use float32, bfloat16 or float16.")
    return np.dtype(dtype)
