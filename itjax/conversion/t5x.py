"""T5X checkpoint -> itjax folder (`python -m itjax.convert --t5x_checkpoint CKPT --out_dir OUT [--t5x_gin ...]`).

Reads the parameters of a T5X T5 encoder-decoder (t5x/examples/t5 or scalable_t5 networks; T5 1.0, T5 v1.1,
Flan-T5, mT5, UL2-style) from either checkpoint format (`t5x_read`), and writes the folder the HF conversion writes
(`folders`: OUT/checkpoint, OUT/model.gin, OUT/spiece.model), so training, `itjax.infer` and `--to_hf` work on it.

Tensor mapping (T5X name under `target/` -> itjax path; `E` embed, `H` heads, `D` head dim, `B` buckets):

    token_embedder/embedding                     [V, E]      -> shared.embedding                      copy
    {encoder,decoder}/relpos_bias/rel_embedding  [H, B]      -> {encoder,decoder}.relative_bias.embedding  [B, H]
    encoder/layers_<i>/attention/{query,key,value}/kernel  [E, H*D] or [E, H, D] -> encoder.layers[i].attention.{q,k,v}
    encoder/layers_<i>/attention/out/kernel      [H*D, E] or [H, D, E]           -> encoder.layers[i].attention.o
    encoder/layers_<i>/pre_{attention,mlp}_layer_norm/scale                      -> .pre_{attention,mlp}_norm.scale
    {encoder,decoder}/layers_<i>/mlp/{wi,wi_0,wi_1,wo}/kernel                    -> .mlp.{wi,wi_0,wi_1,wo}.kernel
    decoder/layers_<i>/{self_attention, encoder_decoder_attention}/...           -> .{self_attention, cross_attention}
    decoder/layers_<i>/pre_{self_attention,cross_attention,mlp}_layer_norm/scale -> .pre_{..}_norm.scale
    {encoder,decoder}/{encoder,decoder}_norm/scale                               -> {encoder,decoder}.final_norm.scale
    decoder/logits_dense/kernel                  [E, V]      -> lm_head.kernel (absent: tied, logits_via_embedding)

Scanned models (`scan_layers`) hold each stack's layers as one tree `encoder/encoder/<layer path>` (and
`decoder/decoder/...`) with the layers stacked on axis `param_scan_axis` (T5X's default 1): each stacked tensor is
read once and split into the per-layer itjax paths.

Architecture. From T5X's `network.T5Config` bindings when `--t5x_gin` is given (T5X's defaults for unbound
fields), checked against the shapes; otherwise from the shapes: vocab / embed from the embedding, heads and
buckets from the relative-position table, head dim from the query kernel, MLP width and gating from `mlp/wi*`,
layer counts from the layer names (or the scan axis), an untied output layer when `logits_dense` exists, and the
stated defaults of T5X's networks: relative-position max distance 128, layer-norm epsilon 1e-6, decoder start id 0.
A gated MLP needs `--t5x_gin` or `--mlp_activation` (T5 v1.1's GELU and UL2's SiLU have the same shapes); an
ungated one is ReLU (T5 1.0) unless the flag says otherwise. Not converted: per-layer relative-position tables
(scalable_t5 / umT5 layout; itjax's T5 shares one table per stack), refused with the tensors named.

Memory: tensors are read one at a time (legacy: one tensorstore array; orbax: a partial restore of one leaf),
copied into the output tree, and dropped before the next is read; only the output being written stays in memory.
Nothing is written until every check passed and every tensor was read; OUT must not hold files.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any, Mapping

import numpy as np

from itjax.conversion import ConversionError, folders, t5x_gin, t5x_read
from itjax.conversion.mapping import Params, Path, get_path, set_path

MAX_DISTANCE = 128  # T5X's networks fix max_distance=128 (and 32 buckets) in RelativePositionBiases
# T5X network.T5Config defaults (t5x/examples/t5/network.py) for fields a gin file leaves unbound.
T5X_DEFAULTS = {"emb_dim": 512, "num_heads": 8, "num_encoder_layers": 6, "num_decoder_layers": 6, "head_dim": 64,
                "mlp_dim": 2048, "mlp_activations": ("relu",), "logits_via_embedding": False, "param_scan_axis": 1}
# T5X mlp_activations -> (itjax feed_forward, whether the activated branch is wi_1 rather than wi_0).
ACTIVATIONS = {("relu",): ("relu", False)}
for _name, _t5x in (("gated-gelu", ("gelu",)), ("gated-silu", ("silu", "swish"))):
    for _act in _t5x:
        ACTIVATIONS[(_act, "linear")] = (_name, False)
        ACTIVATIONS[("linear", _act)] = (_name, True)
MLP_FLAG_CHOICES = ("gated-gelu", "gated-silu", "relu")

_ATTENTION = {"query": ("q", "qkv"), "key": ("k", "qkv"), "value": ("v", "qkv"), "out": ("o", "out")}
# Per-layer T5X module names -> itjax module names.
_ENCODER_LAYER = {"attention": "attention", "pre_attention_layer_norm": "pre_attention_norm",
                  "pre_mlp_layer_norm": "pre_mlp_norm"}
_DECODER_LAYER = {"self_attention": "self_attention", "encoder_decoder_attention": "cross_attention",
                  "pre_self_attention_layer_norm": "pre_self_attention_norm",
                  "pre_cross_attention_layer_norm": "pre_cross_attention_norm", "pre_mlp_layer_norm": "pre_mlp_norm"}
_PER_LAYER_RELPOS = re.compile(r"^(encoder|decoder)/(layers_\d+|encoder|decoder)/relpos_bias/")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the checkpoint stores layers: scanned (stacked on `scan_axis`) or per layer."""

    scanned: bool
    scan_axis: int = 1


@dataclasses.dataclass(frozen=True)
class Entry:
    """One T5X tensor and where it goes: `path` (an itjax path; for scanned tensors its layer index is None and
    filled per layer), `kind` ('copy', 'relpos', 'qkv', 'out'), `layers` (scanned: the stack size, else None)."""

    name: str
    path: Path
    kind: str
    layers: int | None = None


# ------------------------------------------------------------------------------------------------- names
def _layer_entries(stack: str, modules: Mapping[str, str], config, swap: bool) -> list[tuple[str, Path, str]]:
    """(T5X path inside one layer, itjax path inside one layer, kind) for every tensor of one layer."""
    out = []
    for t5x_module, module in modules.items():
        if t5x_module.endswith("layer_norm"):
            out.append((f"{t5x_module}/scale", (module, "scale"), "copy"))
        else:
            out += [(f"{t5x_module}/{n}/kernel", (module, p, "kernel"), kind) for n, (p, kind) in _ATTENTION.items()]
    if config.feed_forward == "relu":
        names = {"wi": "wi", "wo": "wo"}
    else:
        names = {"wi_0": "wi_1" if swap else "wi_0", "wi_1": "wi_0" if swap else "wi_1", "wo": "wo"}
    out += [(f"mlp/{n}/kernel", ("mlp", p, "kernel"), "copy") for n, p in names.items()]
    return out


def tensor_entries(config, layout: Layout, swap_gate: bool = False) -> list[Entry]:
    """Every T5X parameter of a model with `config` (an itjax T5Config) in `layout`, and where it goes."""
    entries = [Entry("token_embedder/embedding", ("shared", "embedding"), "copy")]
    for stack, modules, count in (("encoder", _ENCODER_LAYER, config.num_encoder_layers),
                                  ("decoder", _DECODER_LAYER, config.num_decoder_layers)):
        entries.append(Entry(f"{stack}/relpos_bias/rel_embedding", (stack, "relative_bias", "embedding"), "relpos"))
        for sub, path, kind in _layer_entries(stack, modules, config, swap_gate):
            if layout.scanned:
                entries.append(Entry(f"{stack}/{stack}/{sub}", (stack, "layers", None) + path, kind, count))
            else:
                entries += [Entry(f"{stack}/layers_{i}/{sub}", (stack, "layers", i) + path, kind)
                            for i in range(count)]
        entries.append(Entry(f"{stack}/{stack}_norm/scale", (stack, "final_norm", "scale"), "copy"))
    if not config.tie_word_embeddings:
        entries.append(Entry("decoder/logits_dense/kernel", ("lm_head", "kernel"), "copy"))
    return entries


def t5x_shapes(kind: str, itjax_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The T5X shapes (2-D with heads joined, as t5x/examples/t5 writes, or N-D as scalable_t5 does) of one layer's
    tensor that becomes an itjax parameter of `itjax_shape`."""
    if kind == "relpos":
        return [tuple(reversed(itjax_shape))]
    if kind == "qkv":  # [E, H, D]
        return [(itjax_shape[0], itjax_shape[1] * itjax_shape[2]), tuple(itjax_shape)]
    if kind == "out":  # [H, D, E]
        return [(itjax_shape[0] * itjax_shape[1], itjax_shape[2]), tuple(itjax_shape)]
    return [tuple(itjax_shape)]


def to_itjax(kind: str, array: np.ndarray, itjax_shape: tuple[int, ...]) -> np.ndarray:
    """One layer's T5X tensor -> the itjax parameter (float32, C-contiguous). Heads are joined row-major
    (index h * D + d), so 'qkv' / 'out' are plain reshapes."""
    out = array.T if kind == "relpos" else array.reshape(itjax_shape)
    return np.ascontiguousarray(out, dtype=np.float32)


# ------------------------------------------------------------------------------------------------- architecture
def _layer_count(shapes: Mapping[str, tuple[int, ...]], stack: str, layout: Layout) -> tuple[int, str] | None:
    if layout.scanned:
        name = f"{stack}/{stack}/pre_mlp_layer_norm/scale"
        if name in shapes and len(shapes[name]) > layout.scan_axis:
            return shapes[name][layout.scan_axis], name
        return None
    indices = {int(m.group(1)) for n in shapes if (m := re.match(rf"{stack}/layers_(\d+)/", n))}
    return (max(indices) + 1, f"{stack}/layers_0 .. layers_{max(indices)}") if indices else None


def _unstacked(shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    return shape[:layout.scan_axis] + shape[layout.scan_axis + 1:] if layout.scanned else shape


def shape_facts(shapes: Mapping[str, tuple[int, ...]], layout: Layout) -> dict[str, tuple[Any, str]]:
    """T5X T5Config field -> (value implied by the checkpoint's shapes, the tensor it comes from), for the fields
    the shapes determine (plus 'gated' and 'num_buckets'). Fields whose tensor is missing are left out."""
    facts: dict[str, tuple[Any, str]] = {}
    layer = "encoder/encoder" if layout.scanned else "encoder/layers_0"
    name = "token_embedder/embedding"
    if len(shapes.get(name, ())) == 2:
        facts["vocab_size"], facts["emb_dim"] = (shapes[name][0], name), (shapes[name][1], name)
    name = "encoder/relpos_bias/rel_embedding"
    if len(shapes.get(name, ())) == 2:
        facts["num_heads"], facts["num_buckets"] = (shapes[name][0], name), (shapes[name][1], name)
    name = f"{layer}/attention/query/kernel"
    if name in shapes and "num_heads" in facts:
        query = _unstacked(shapes[name], layout)
        heads = facts["num_heads"][0]
        if len(query) == 3:
            facts["head_dim"] = (query[2], name)
        elif len(query) == 2 and query[1] % heads == 0:
            facts["head_dim"] = (query[1] // heads, name)
    for wi in ("wi_0", "wi"):
        name = f"{layer}/mlp/{wi}/kernel"
        if name in shapes:
            facts["mlp_dim"] = (_unstacked(shapes[name], layout)[-1], name)
            facts["gated"] = (wi == "wi_0", name)
            break
    for stack in ("encoder", "decoder"):
        count = _layer_count(shapes, stack, layout)
        if count:
            facts[f"num_{stack}_layers"] = count
    facts["logits_via_embedding"] = ("decoder/logits_dense/kernel" not in shapes, "decoder/logits_dense/kernel")
    return facts


def _feed_forward_from_flag(gated: bool | None, mlp_activation: str | None, where: str) -> str:
    if mlp_activation is not None:
        if gated is not None and gated != mlp_activation.startswith("gated-"):
            raise ConversionError(f"--mlp_activation {mlp_activation} does not match the checkpoint's MLP ({where} "
                                  f"is {'gated: wi_0, wi_1' if gated else 'not gated: wi'}).")
        return mlp_activation
    if gated:
        raise ConversionError(
            f"the checkpoint's MLP is gated ({where}), and T5 v1.1 / Flan-T5 (GELU) and UL2 (SiLU) have the same "
            "shapes: pass --t5x_gin with the run's config.gin (network.T5Config.mlp_activations), or "
            "--mlp_activation gated-gelu (T5 v1.1, Flan-T5, mT5) or --mlp_activation gated-silu (UL2).")
    return "relu"


def _from_gin(bindings: Mapping[str, Any], facts: Mapping[str, tuple[Any, str]], shapes: Mapping[str, tuple],
              layout: Layout, mlp_activation: str | None) -> tuple[dict[str, Any], bool]:
    """T5X fields from the gin bindings (T5X defaults for unbound ones), checked against the shapes; the first
    disagreement is named. Returns (fields, swap_gate)."""
    fields = {**T5X_DEFAULTS, **bindings}
    if "vocab_size" not in fields:
        raise ConversionError("--t5x_gin binds no network.T5Config.vocab_size (T5X requires it).")
    activations = tuple(fields["mlp_activations"])
    if activations not in ACTIVATIONS:
        raise ConversionError(f"--t5x_gin: network.T5Config.mlp_activations = {activations} is not supported; "
                              f"itjax converts {sorted(ACTIVATIONS)}.")
    feed_forward, swap = ACTIVATIONS[activations]
    if mlp_activation is not None and mlp_activation != feed_forward:
        raise ConversionError(f"--mlp_activation {mlp_activation} contradicts --t5x_gin's mlp_activations = "
                              f"{activations} ({feed_forward}); drop the flag.")
    expected = {**fields, "gated": feed_forward != "relu"}
    if "scan_layers" in bindings and bool(bindings["scan_layers"]) != layout.scanned:
        raise ConversionError(f"--t5x_gin and the checkpoint disagree: network.T5Config.scan_layers = "
                              f"{bindings['scan_layers']}, but the checkpoint's layers are "
                              f"{'scanned (encoder/encoder/...)' if layout.scanned else 'per layer (layers_<i>)'}.")
    for field in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "gated", "num_encoder_layers",
                  "num_decoder_layers", "logits_via_embedding"):
        if field in facts and facts[field][0] != expected[field]:
            value, name = facts[field]
            binding = f"mlp_activations = {activations!r}" if field == "gated" else f"{field} = {expected[field]!r}"
            found = f"{name} {tuple(shapes[name])}" if name in shapes else name
            raise ConversionError(f"--t5x_gin and the checkpoint disagree (first mismatch): network.T5Config."
                                  f"{binding}, but the checkpoint's {found} means {field} = {value!r}.")
    return {**fields, "feed_forward": feed_forward}, swap


def architecture(shapes: Mapping[str, tuple[int, ...]], bindings: Mapping[str, Any] | None = None,
                 mlp_activation: str | None = None):
    """(itjax T5Config, Layout, swap_gate) of the checkpoint with parameter `shapes` (see the module docstring).

    bindings: `t5x_gin.read_t5_config_bindings` of --t5x_gin, or None. mlp_activation: one of MLP_FLAG_CHOICES.
    """
    from itjax.models.t5 import T5Config

    scanned = any(n.startswith(("encoder/encoder/", "decoder/decoder/")) for n in shapes)
    layout = Layout(scanned, int((bindings or {}).get("param_scan_axis", 1)) if scanned else 1)
    per_layer_relpos = sorted(n for n in shapes if _PER_LAYER_RELPOS.match(n))
    if per_layer_relpos:
        raise ConversionError(
            f"the checkpoint has relative-position tables per layer ({', '.join(per_layer_relpos[:4])}"
            f"{', ...' if len(per_layer_relpos) > 4 else ''}: T5X's scalable_t5 / umT5 layout); itjax's T5 shares "
            "one table per stack (encoder/relpos_bias, decoder/relpos_bias: the t5x/examples/t5 layout of T5 1.0, "
            "T5 v1.1, Flan-T5, mT5 and UL2), so this network is not supported.")
    facts = shape_facts(shapes, layout)
    required = ("vocab_size", "num_heads", "head_dim", "mlp_dim", "num_encoder_layers", "num_decoder_layers")
    missing = [f for f in required if f not in facts]
    if missing:
        raise ConversionError(
            f"the checkpoint is not a T5X T5 encoder-decoder: its shapes do not give {', '.join(missing)} (it needs "
            "token_embedder/embedding, encoder/relpos_bias/rel_embedding, encoder/layers_<i>/... or "
            f"encoder/encoder/...). Its parameters: {', '.join(sorted(shapes)[:12])}"
            f"{' ...' if len(shapes) > 12 else ''}")
    if bindings is not None:
        fields, swap = _from_gin(bindings, facts, shapes, layout, mlp_activation)
    else:
        gated, where = facts.get("gated", (None, "mlp/wi*"))
        feed_forward = _feed_forward_from_flag(gated, mlp_activation, where)
        fields = {field: value for field, (value, _) in facts.items()}
        fields["feed_forward"] = feed_forward
        swap = False
    config = T5Config(
        vocab_size=int(fields["vocab_size"]), d_model=int(fields["emb_dim"]), num_heads=int(fields["num_heads"]),
        d_kv=int(fields["head_dim"]), d_ff=int(fields["mlp_dim"]),
        num_encoder_layers=int(fields["num_encoder_layers"]), num_decoder_layers=int(fields["num_decoder_layers"]),
        relative_attention_num_buckets=int(facts["num_buckets"][0]), relative_attention_max_distance=MAX_DISTANCE,
        feed_forward=fields["feed_forward"], tie_word_embeddings=bool(fields["logits_via_embedding"]))
    return config, layout, swap


def check_tensors(shapes: Mapping[str, tuple[int, ...]], entries: list[Entry], template: Params,
                  layout: Layout) -> None:
    """One ConversionError listing the checkpoint's unknown parameter names, the missing ones and wrong shapes."""
    expected = {}
    for e in entries:
        path = tuple(0 if k is None else k for k in e.path)
        options = t5x_shapes(e.kind, get_path(template, path).shape)
        if e.layers is not None:
            options = [s[:layout.scan_axis] + (e.layers,) + s[layout.scan_axis:] for s in options]
        expected[e.name] = options
    problems = [f"  {n}: unknown parameter name {tuple(shapes[n])}" for n in sorted(set(shapes) - set(expected))]
    problems += [f"  {n}: missing" for n in sorted(set(expected) - set(shapes))]
    problems += [f"  {n}: shape {tuple(shapes[n])} != expected {' or '.join(map(str, expected[n]))}"
                 for n in sorted(set(shapes) & set(expected)) if tuple(shapes[n]) not in expected[n]]
    if problems:
        raise ConversionError(f"the T5X checkpoint does not match a T5 encoder-decoder of its architecture "
                              f"({len(problems)} parameters):\n" + "\n".join(problems)
                              + "\nIs it a t5x/examples/t5-style T5? Check --t5x_gin against the checkpoint.")


# ------------------------------------------------------------------------------------------------- conversion
def read_params(checkpoint, entries: list[Entry], template: Params, layout: Layout) -> Params:
    """Fills `template` (ShapeDtypeStruct leaves) in place with the checkpoint's tensors, one tensor at a time."""
    for e in entries:
        array = checkpoint.read(e.name)
        if e.layers is None:
            set_path(template, e.path, to_itjax(e.kind, array, get_path(template, e.path).shape))
        else:
            for i in range(e.layers):
                path = tuple(i if k is None else k for k in e.path)
                layer = np.take(array, i, axis=layout.scan_axis)
                set_path(template, path, to_itjax(e.kind, layer, get_path(template, path).shape))
        del array
    return template


def _check_vocabulary(path: str, config) -> None:
    if not os.path.isfile(path):
        raise ConversionError(f"--vocabulary {path} does not exist.")
    import sentencepiece

    try:
        size = sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
    except (RuntimeError, OSError) as e:
        raise ConversionError(f"--vocabulary {path} is not a SentencePiece model ({e}).") from None
    if size > config.vocab_size:
        raise ConversionError(f"--vocabulary {path} has {size} pieces, more than the checkpoint's "
                              f"{config.vocab_size} embeddings; is it the model's vocabulary?")


def t5x_to_itjax(checkpoint_path: str, out_dir: str, *, gin_file: str | None = None,
                 vocabulary: str | None = None, mlp_activation: str | None = None):
    """T5X checkpoint -> itjax folder (checkpoint, model.gin, spiece.model when `vocabulary` is given).

    Returns (T5Config, the checkpoint's format: 'legacy' or 'orbax'). Raises ConversionError, with nothing
    written, for a non-empty `out_dir`, missing files, a gin file that disagrees with the shapes, or parameters
    that do not map.
    """
    from itjax.conversion import t5

    folders.require_empty_dir(out_dir, "--out_dir")
    if mlp_activation is not None and mlp_activation not in MLP_FLAG_CHOICES:
        raise ConversionError(f"--mlp_activation {mlp_activation!r}: expected one of {MLP_FLAG_CHOICES}.")
    checkpoint = t5x_read.open_checkpoint(checkpoint_path)
    bindings = t5x_gin.read_t5_config_bindings(gin_file) if gin_file else None
    config, layout, swap = architecture(checkpoint.shapes, bindings, mlp_activation)
    if vocabulary:
        _check_vocabulary(vocabulary, config)
    template = t5.abstract_params(config)
    entries = tensor_entries(config, layout, swap)
    check_tensors(checkpoint.shapes, entries, template, layout)
    params = read_params(checkpoint, entries, template, layout)
    os.makedirs(out_dir, exist_ok=True)
    folders.save_params(params, out_dir)
    source = os.path.abspath(checkpoint_path)
    comment = (f"Converted from the T5X checkpoint {source} ({checkpoint.format} format"
               f"{', architecture from ' + os.path.abspath(gin_file) if gin_file else ''}) by itjax.convert.")
    with open(os.path.join(out_dir, folders.MODEL_GIN), "w") as f:
        f.write(t5.model_gin_text(config, comment))
    if vocabulary:
        shutil.copyfile(vocabulary, os.path.join(out_dir, folders.SPIECE))
    return config, checkpoint.format
