"""HF <-> itjax checkpoint conversion for the T5 family (T5 1.0, T5 v1.1 / LM-adapted, Flan-T5, mT5, UL2-style).

Usage:

    python -m itjax.convert --hf_dir DIR --out_dir OUT           # HF folder -> itjax
    python -m itjax.convert --to_hf --hf_dir OUT_HF --out_dir OUT  # itjax folder OUT -> HF folder OUT_HF

An itjax model folder holds:

    OUT/checkpoint     orbax StandardCheckpointer save of the parameter pure dict
                       (`nnx.to_pure_dict(nnx.split(module, nnx.Param)[1])`, float32), see `load_params`
    OUT/model.gin      the gin model file building the matching `EncoderDecoderModel` / `T5Config`
    OUT/spiece.model   the SentencePiece vocabulary (for `seqio.SentencePieceVocabulary`), when the HF folder has one

A HF folder holds `config.json`, `model.safetensors` or shards listed in `model.safetensors.index.json`, and
`spiece.model`. Reading needs no torch (`safetensors.safe_open(..., framework="numpy")`, bfloat16 through a small
raw reader) and is streamed: one HF tensor at a time is read, converted and put into the parameter tree, so the
host holds one copy of the model plus one tensor. Export writes shards of at most `max_shard_size` bytes, so it
holds the parameters plus one shard.

Tensor mapping (HF name -> itjax path; see `itjax.models.t5` for the itjax tree; `E`=d_model, `H`=heads,
`K`=d_kv, W a torch Linear weight [out, in]):

    shared.weight                                   -> shared.embedding                        as is  [vocab, E]
    lm_head.weight (untied models)                  -> lm_head.kernel                          W.T
    {enc,dec}oder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                    -> {enc,dec}oder.relative_bias.embedding  as is  [buckets, H]
    encoder.block.i.layer.0.SelfAttention.{q,k,v}   -> encoder.layers[i].attention.{q,k,v}    W.T -> [E, H, K]
    encoder.block.i.layer.0.SelfAttention.o         -> encoder.layers[i].attention.o          W.T -> [H, K, E]
    encoder.block.i.layer.0.layer_norm              -> encoder.layers[i].pre_attention_norm.scale
    encoder.block.i.layer.1.DenseReluDense.{wi_0,wi_1,wi,wo} -> encoder.layers[i].mlp.*.kernel  W.T
    encoder.block.i.layer.1.layer_norm              -> encoder.layers[i].pre_mlp_norm.scale
    decoder.block.i.layer.{0: SelfAttention, 1: EncDecAttention, 2: DenseReluDense} and their layer_norms
                                                    -> decoder.layers[i].{self_attention, cross_attention, mlp}
                                                       and pre_{self_attention,cross_attention,mlp}_norm
    {enc,dec}oder.final_layer_norm.weight           -> {enc,dec}oder.final_norm.scale

Tied embeddings. T5 1.0 computes logits through the shared embedding with the decoder output scaled by
d_model**-0.5 (itjax `tie_word_embeddings=True`); v1.1-style models have a separate `lm_head` and no scaling.
transformers 4.x says which through `tie_word_embeddings`; transformers 5.x always ties the module and records the
scaling as `scale_decoder_outputs` (and writes `lm_head.weight` only when it differs from `shared.weight`), so the
scaling flag decides: scaled -> tied itjax model; unscaled -> untied, `lm_head.kernel` from `lm_head.weight` or,
when the file has none, from `shared.weight`. Duplicates that must equal `shared.weight` are accepted and dropped:
`{enc,dec}oder.embed_tokens.weight` always, `lm_head.weight` for scaled models. HF's unused
`decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight` (which transformers ignores on load) is
dropped too. Anything else that does not map, or has the wrong shape, fails with one error listing the tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import struct
from typing import Any, Iterator, Mapping

import numpy as np

CHECKPOINT_DIR = "checkpoint"
MODEL_GIN = "model.gin"
SPIECE = "spiece.model"
HF_CONFIG = "config.json"
HF_SINGLE_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"

T5_MODEL_TYPES = ("t5", "mt5")
T5_ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
SHARED = "shared.weight"
LM_HEAD = "lm_head.weight"
# HF tensors that carry no information of their own (see the module docstring).
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
UNUSED_HF_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)

Params = dict  # nnx pure dict: nested dicts (layer indices are int keys) of float32 arrays
Path = tuple  # a path into Params, e.g. ("encoder", "layers", 0, "attention", "q", "kernel")


class ConversionError(ValueError):
    """A checkpoint or config that this converter cannot map; the message lists the offending names."""


# ------------------------------------------------------------------------------------------------- configs
def t5_config_from_hf(hf_config: Mapping[str, Any]):
    """HF T5 / mT5 `config.json` dict -> `itjax.models.T5Config` (float32, no dropout: set those in gin).

    Raises ConversionError for non-T5 architectures or feed-forward types itjax does not implement.
    """
    from itjax.models.t5 import FEED_FORWARD_TYPES, T5Config

    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    unknown = [a for a in architectures if a not in T5_ARCHITECTURES]
    if model_type not in T5_MODEL_TYPES or unknown:
        raise ConversionError(
            f"config.json: model_type={model_type!r}, architectures={architectures} is not a T5-family "
            f"encoder-decoder; itjax.convert supports model_type {T5_MODEL_TYPES} with architectures "
            f"{T5_ARCHITECTURES}.")
    feed_forward = hf_config.get("feed_forward_proj", "relu")
    if feed_forward not in FEED_FORWARD_TYPES:
        raise ConversionError(f"config.json: feed_forward_proj={feed_forward!r} is not supported; itjax's T5 "
                              f"implements {FEED_FORWARD_TYPES}.")
    num_layers = hf_config.get("num_layers", 6)
    num_decoder_layers = hf_config.get("num_decoder_layers")
    return T5Config(
        vocab_size=hf_config.get("vocab_size", 32128),
        d_model=hf_config.get("d_model", 512),
        num_heads=hf_config.get("num_heads", 8),
        d_kv=hf_config.get("d_kv", 64),
        d_ff=hf_config.get("d_ff", 2048),
        num_encoder_layers=num_layers,
        num_decoder_layers=num_layers if num_decoder_layers is None else num_decoder_layers,
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        feed_forward=feed_forward,
        tie_word_embeddings=_scales_decoder_outputs(hf_config),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
        decoder_start_token_id=hf_config.get("decoder_start_token_id", 0) or 0,
    )


def _scales_decoder_outputs(hf_config: Mapping[str, Any]) -> bool:
    """True for T5 1.0-style logits (shared embedding, decoder output * d_model**-0.5); see the module docstring."""
    if "scale_decoder_outputs" in hf_config:  # written by transformers >= 5
        return bool(hf_config["scale_decoder_outputs"])
    return bool(hf_config.get("tie_word_embeddings", True))


def hf_config_from_t5(config) -> dict:
    """`itjax.models.T5Config` -> HF `config.json` dict that transformers 4.x and 5.x read the same way."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": config.feed_forward,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.tie_word_embeddings,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout_rate": config.dropout_rate,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": config.decoder_start_token_id,
        "dtype": "float32",
    }


def model_gin_text(config, comment: str = "Converted from a HF checkpoint by itjax.convert.") -> str:
    """The gin model file (style of gin/models/t5_1_1_small.gin) that builds `EncoderDecoderModel(config)`."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines += [
        "import itjax.models.encoder_decoder",
        "",
        "MODEL = @itjax.models.EncoderDecoderModel()",
        "itjax.models.EncoderDecoderModel.config = @itjax.models.T5Config()",
        "itjax.models.EncoderDecoderModel.z_loss = 1e-4",
        "itjax.models.EncoderDecoderModel.loss_normalizing_factor = 'NUM_REAL_TARGET_TOKENS'",
        "",
    ]
    for field in dataclasses.fields(config):
        lines.append(f"itjax.models.T5Config.{field.name} = {getattr(config, field.name)!r}")
    return "\n".join(lines) + "\n"


def t5_config_from_gin(gin_file: str):
    """Reads the `T5Config` a gin model file builds. Clears gin's global config before and after."""
    import gin

    from itjax.models.encoder_decoder import EncoderDecoderModel

    gin.clear_config()
    try:
        gin.parse_config_file(gin_file)
        config = EncoderDecoderModel().config
    finally:
        gin.clear_config()
    return config


# ------------------------------------------------------------------------------------------------- mapping
@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one HF tensor becomes one itjax parameter: `kind` is 'copy', 'linear', 'qkv' or 'out'."""

    hf_name: str
    path: Path
    kind: str


def _attention_maps(hf_prefix: str, path: Path) -> list[TensorMap]:
    kinds = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "out"}
    return [TensorMap(f"{hf_prefix}.{n}.weight", path + (n, "kernel"), kind) for n, kind in kinds.items()]


def _mlp_maps(hf_prefix: str, path: Path, feed_forward: str) -> list[TensorMap]:
    names = ("wi_0", "wi_1", "wo") if feed_forward == "gated-gelu" else ("wi", "wo")
    return [TensorMap(f"{hf_prefix}.DenseReluDense.{n}.weight", path + ("mlp", n, "kernel"), "linear")
            for n in names]


def t5_tensor_maps(config) -> list[TensorMap]:
    """Every HF tensor of a T5 model with `config` (an itjax T5Config) and where it goes. `lm_head` if untied."""
    maps = [TensorMap(SHARED, ("shared", "embedding"), "copy")]
    for stack in ("encoder", "decoder"):
        maps.append(TensorMap(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                              (stack, "relative_bias", "embedding"), "copy"))
        maps.append(TensorMap(f"{stack}.final_layer_norm.weight", (stack, "final_norm", "scale"), "copy"))
    for i in range(config.num_encoder_layers):
        hf, it = f"encoder.block.{i}.layer", ("encoder", "layers", i)
        maps += _attention_maps(f"{hf}.0.SelfAttention", it + ("attention",))
        maps.append(TensorMap(f"{hf}.0.layer_norm.weight", it + ("pre_attention_norm", "scale"), "copy"))
        maps += _mlp_maps(f"{hf}.1", it, config.feed_forward)
        maps.append(TensorMap(f"{hf}.1.layer_norm.weight", it + ("pre_mlp_norm", "scale"), "copy"))
    for i in range(config.num_decoder_layers):
        hf, it = f"decoder.block.{i}.layer", ("decoder", "layers", i)
        maps += _attention_maps(f"{hf}.0.SelfAttention", it + ("self_attention",))
        maps.append(TensorMap(f"{hf}.0.layer_norm.weight", it + ("pre_self_attention_norm", "scale"), "copy"))
        maps += _attention_maps(f"{hf}.1.EncDecAttention", it + ("cross_attention",))
        maps.append(TensorMap(f"{hf}.1.layer_norm.weight", it + ("pre_cross_attention_norm", "scale"), "copy"))
        maps += _mlp_maps(f"{hf}.2", it, config.feed_forward)
        maps.append(TensorMap(f"{hf}.2.layer_norm.weight", it + ("pre_mlp_norm", "scale"), "copy"))
    if not config.tie_word_embeddings:
        maps.append(TensorMap(LM_HEAD, ("lm_head", "kernel"), "linear"))
    return maps


def to_itjax(kind: str, weight: np.ndarray, itjax_shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> itjax parameter of `itjax_shape` (float32, C-contiguous)."""
    if kind == "copy":
        out = weight
    elif kind == "linear":
        out = weight.T
    else:  # 'qkv': [H*K, E] -> [E, H, K];  'out': [E, H*K] -> [H, K, E]
        out = weight.T.reshape(itjax_shape)
    return np.ascontiguousarray(out, dtype=np.float32)


def to_hf(kind: str, param: np.ndarray) -> np.ndarray:
    """itjax parameter -> HF tensor (exact inverse of `to_itjax`), float32, C-contiguous."""
    param = np.asarray(param, np.float32)
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
    if kind == "qkv":  # [E, H, K] -> [H*K, E]
        return (itjax_shape[1] * itjax_shape[2], itjax_shape[0])
    return (itjax_shape[2], itjax_shape[0] * itjax_shape[1])  # 'out': [H, K, E] -> [E, H*K]


def abstract_params(config) -> Params:
    """The parameter pure dict of `config` with ShapeDtypeStruct leaves (nothing allocated).

    Same tree as `EncoderDecoderModel(config).abstract_module()`, built from `T5` directly so that importing
    needs neither seqio nor TensorFlow.
    """
    from flax import nnx

    from itjax.models.t5 import T5

    module = nnx.eval_shape(lambda: T5(config, rngs=nnx.Rngs(params=0)))
    return nnx.to_pure_dict(nnx.split(module, nnx.Param)[1])


def _get(tree: Params, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Params, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------------------- reading
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


def _check_tensors(maps: list[TensorMap], shapes: Mapping[str, tuple[int, ...]], template: Params,
                   config) -> None:
    """One ConversionError listing every missing, unexpected or mis-shaped tensor."""
    expected = {m.hf_name: hf_shape(m.kind, _get(template, m.path).shape) for m in maps}
    if not config.tie_word_embeddings and LM_HEAD not in shapes:
        expected.pop(LM_HEAD)  # transformers >= 5 omits an lm_head equal to shared.weight
    duplicates = {name: expected[SHARED] for name in EMBEDDING_COPIES}
    if config.tie_word_embeddings:
        duplicates[LM_HEAD] = expected[SHARED]
    allowed = {**duplicates, **{name: None for name in UNUSED_HF_TENSORS}}
    problems = [f"  {n}: missing" for n in sorted(set(expected) - set(shapes))]
    problems += [f"  {n}: unexpected tensor {shapes[n]}" for n in sorted(set(shapes) - set(expected) - set(allowed))]
    wanted = {**expected, **duplicates}
    problems += [f"  {n}: shape {shapes[n]} != expected {wanted[n]}"
                 for n in sorted(set(shapes) & set(wanted)) if tuple(shapes[n]) != tuple(wanted[n])]
    if problems:
        raise ConversionError(
            f"the HF checkpoint does not match a T5 model of its config.json ({len(problems)} tensors):\n"
            + "\n".join(problems) + "\nCheck that config.json belongs to these weights and that the model is "
            "a plain T5 / mT5 (T5ForConditionalGeneration).")


def hf_t5_to_params(reader: SafetensorsReader, config) -> Params:
    """Streams the HF tensors of `reader` into an itjax parameter pure dict (numpy float32 leaves) for `config`.

    Raises ConversionError (listing the tensors) when names or shapes do not match, or when a tensor that must
    duplicate `shared.weight` differs from it.
    """
    params = abstract_params(config)  # filled in place: each ShapeDtypeStruct leaf is replaced by its array
    maps = t5_tensor_maps(config)
    shapes = reader.shapes()
    _check_tensors(maps, shapes, params, config)
    for m in maps:
        name = m.hf_name if m.hf_name in shapes else SHARED  # untied lm_head omitted by transformers >= 5
        kind = m.kind if name == m.hf_name else "linear"
        _set(params, m.path, to_itjax(kind, reader.get(name), _get(params, m.path).shape))
    _check_duplicates(reader, shapes, params["shared"]["embedding"], config)
    return params


def _check_duplicates(reader: SafetensorsReader, shapes, shared: np.ndarray, config) -> None:
    names = list(EMBEDDING_COPIES) + ([LM_HEAD] if config.tie_word_embeddings else [])
    differing = [n for n in names if n in shapes and not np.array_equal(reader.get(n), shared)]
    if differing:
        raise ConversionError(
            f"tensors {differing} differ from shared.weight, but this config ties them to it (T5 1.0-style "
            f"logits through the embedding). If the model has a separate output layer, set "
            f"tie_word_embeddings=false (transformers 5: scale_decoder_outputs=false) in config.json.")


# ------------------------------------------------------------------------------------------------- writing
def params_to_hf_t5(params: Params, config) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, float32 array) for every tensor of the HF model, one at a time."""
    for m in t5_tensor_maps(config):
        yield m.hf_name, to_hf(m.kind, _get(params, m.path))


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], hf_dir: str,
                      max_shard_size: int = 2 * 1024**3) -> list[str]:
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


# ------------------------------------------------------------------------------------------------- itjax folders
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


def load_params(out_dir: str, config=None) -> Params:
    """Restores `out_dir/checkpoint` as a parameter pure dict (numpy-backed jax arrays on the host).

    `config` defaults to the T5Config of `out_dir/model.gin` (reading it clears gin's global config).
    """
    import jax
    import orbax.checkpoint as ocp

    config = config or t5_config_from_gin(os.path.join(out_dir, MODEL_GIN))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params(config))
    path = os.path.join(os.path.abspath(out_dir), CHECKPOINT_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, target)


def _copy_tokenizer(src_dir: str, dst_dir: str) -> bool:
    src = os.path.join(src_dir, SPIECE)
    if not os.path.exists(src):
        return False
    shutil.copyfile(src, os.path.join(dst_dir, SPIECE))
    return True


def convert_hf_to_itjax(hf_dir: str, out_dir: str) -> Any:
    """HF T5 folder -> itjax folder (checkpoint, model.gin, spiece.model). Returns the T5Config."""
    if os.path.exists(os.path.join(out_dir, CHECKPOINT_DIR)):
        raise ConversionError(f"{out_dir}/{CHECKPOINT_DIR} already exists; choose a new --out_dir or delete it.")
    with open(os.path.join(hf_dir, HF_CONFIG)) as f:
        config = t5_config_from_hf(json.load(f))
    params = hf_t5_to_params(SafetensorsReader(hf_dir), config)
    os.makedirs(out_dir, exist_ok=True)
    save_params(params, out_dir)
    with open(os.path.join(out_dir, MODEL_GIN), "w") as f:
        f.write(model_gin_text(config, f"Converted from {os.path.abspath(hf_dir)} by itjax.convert."))
    _copy_tokenizer(hf_dir, out_dir)
    return config


def convert_itjax_to_hf(out_dir: str, hf_dir: str, max_shard_size: int = 2 * 1024**3) -> Any:
    """itjax folder (checkpoint + model.gin [+ spiece.model]) -> HF folder for `from_pretrained`. Returns config."""
    config = t5_config_from_gin(os.path.join(out_dir, MODEL_GIN))
    params = load_params(out_dir, config)
    os.makedirs(hf_dir, exist_ok=True)
    write_safetensors(params_to_hf_t5(params, config), hf_dir, max_shard_size)
    with open(os.path.join(hf_dir, HF_CONFIG), "w") as f:
        json.dump(hf_config_from_t5(config), f, indent=2)
    _copy_tokenizer(out_dir, hf_dir)
    return config


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m itjax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf_dir", required=True, help="the HF folder (read, or written with --to_hf)")
    parser.add_argument("--out_dir", required=True, help="the itjax folder (written, or read with --to_hf)")
    parser.add_argument("--to_hf", action="store_true", help="convert the itjax folder --out_dir to --hf_dir")
    parser.add_argument("--max_shard_size_mb", type=int, default=2048, help="--to_hf: safetensors shard size")
    args = parser.parse_args(argv)
    try:
        if args.to_hf:
            convert_itjax_to_hf(args.out_dir, args.hf_dir, args.max_shard_size_mb * 1024**2)
            print(f"wrote {args.hf_dir} (config.json, safetensors, tokenizer if present)")
        else:
            convert_hf_to_itjax(args.hf_dir, args.out_dir)
            print(f"wrote {args.out_dir}/{{{CHECKPOINT_DIR},{MODEL_GIN}}} (and {SPIECE} if present)")
    except (ConversionError, FileNotFoundError) as e:
        raise SystemExit(f"itjax.convert: {e}") from None


if __name__ == "__main__":
    main()
