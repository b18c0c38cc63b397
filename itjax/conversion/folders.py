"""The itjax model folder that `python -m itjax.convert` writes and `itjax.training.train(initial_checkpoint_path=)`
reads:

    OUT/checkpoint     orbax StandardCheckpointer save of the parameter pure dict
                       (`nnx.to_pure_dict(nnx.split(module, nnx.Param)[1])`, float32)
    OUT/model.gin      the gin model file building the matching model (`MODEL = ...` and every config field)
    OUT/<tokenizer>    the HF tokenizer / generation files present in the source folder (TOKENIZER_FILES)
    OUT/hf_config.json the source config.json (Llama family: `--to_hf` restores its non-architecture fields)

Nothing is ever overwritten: conversion refuses a target folder that already holds files.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

from itjax.conversion import ConversionError
from itjax.conversion.mapping import Params

CHECKPOINT_DIR = "checkpoint"
MODEL_GIN = "model.gin"
HF_CONFIG = "config.json"
SPIECE = "spiece.model"
# Carried over unchanged in both directions (whichever exist).
TOKENIZER_FILES = (SPIECE, "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def require_empty_dir(path: str, flag: str) -> None:
    """Raises ConversionError if `path` exists and is not an empty folder (`flag` names the CLI option)."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConversionError(f"{flag} {path} already exists and is not empty; itjax.convert never overwrites "
                              "files: choose a new folder or delete this one.")


def abstract_params(make_module: Callable[[], object]) -> Params:
    """The parameter pure dict of the module `make_module()` builds, with ShapeDtypeStruct leaves (no allocation)."""
    from flax import nnx

    module = nnx.eval_shape(make_module)
    return nnx.to_pure_dict(nnx.split(module, nnx.Param)[1])


def save_params(params: Params, out_dir: str) -> str:
    """Saves the parameter pure dict with orbax to `out_dir/checkpoint` (must not exist). Returns the path."""
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(out_dir), CHECKPOINT_DIR)
    if os.path.exists(path):
        raise ConversionError(f"{path} already exists; choose a new --out_dir or delete it first.")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    return path


def restore_params(out_dir: str, template: Params) -> Params:
    """Restores `out_dir/checkpoint` into the shapes of `template` (array or ShapeDtypeStruct leaves) as a pure
    dict of host arrays."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(os.path.abspath(out_dir), CHECKPOINT_DIR)
    if not os.path.isdir(path):
        raise ConversionError(f"{path} does not exist; --out_dir must be a folder written by itjax.convert.")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies the TOKENIZER_FILES present in `src_dir` to `dst_dir`. Returns their names."""
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, name))]
    for name in copied:
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    return copied
