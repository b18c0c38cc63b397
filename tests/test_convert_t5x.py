"""T5X checkpoint -> itjax conversion, checked against transformers' T5 on tiny random models made here.

t5x is not installable, so the checkpoints are written the way T5X writes them (t5x/checkpoints.py):
- legacy: `checkpoint_<step>/checkpoint` = msgpack (flax.serialization.msgpack_serialize) of
  `{'version': 3, 'optimizer': {'target': ..., 'state': {'step', 'param_states'}}}` whose large leaves are the JSON
  of tensorstore zarr specs (gzip, kvstore path 'target.<dotted name>' relative to the folder) and small ones
  inline; the zarr arrays are written with tensorstore beside the file (optionally through a 'cast' spec to
  bfloat16, as T5X's save_dtype does);
- orbax: an orbax CheckpointManager with T5X's step prefix 'checkpoint' and item 'state' saved by
  PyTreeCheckpointHandler(use_ocdbt=True) (T5X's OrbaxCheckpointManagerInterface).
Parameter names and layouts follow t5x/examples/t5/network.py (per layer, 2-D kernels with heads joined, shared
relative-position tables) and, for the scanned layout, layers stacked on axis 1 under encoder/encoder/... with the
N-D kernels of t5x/examples/scalable_t5/layers.py.

The reference model is transformers' T5ForConditionalGeneration loaded with the same weights through the published
T5X -> HF name mapping (transformers' convert_t5x_checkpoint_to_pytorch.py), written out below independently of the
converter. Parity: per-example log-likelihoods as T5X's `EncoderDecoderModel.score_batch` computes them (decoder
inputs = targets shifted right with 0 first; sum of the target tokens' log-probabilities) within 1e-4 relative.
`scripts/check_t5x_fidelity.py <t5x checkout>` also scores these checkpoints with T5X's own network code
(t5x/examples/t5/network.py + layers.py, flax linen); t5x is not installable here, so that is a script, not a test.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from itjax import convert, infer  # noqa: E402
from itjax.conversion import ConversionError, folders  # noqa: E402
from itjax.conversion import t5 as t5_conversion  # noqa: E402
from itjax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402

VOCAB = 672  # >= the 640 pieces of the quickstart SentencePiece model used as --vocabulary
EMBED, HEADS, HEAD_DIM, MLP, BUCKETS = 32, 4, 8, 48, 32
ENC_LAYERS, DEC_LAYERS = 2, 3
SPM = os.path.join(os.path.dirname(__file__), "..", "tasks", "data", "quickstart", "spm.model")

# name: (format, scanned, T5X mlp_activations, logits_via_embedding, save as bfloat16, give config.gin)
CASES = {
    "legacy_t5_1_1": ("legacy", False, ("gelu", "linear"), False, False, True),
    "legacy_scanned_ul2": ("legacy", True, ("silu", "linear"), False, True, False),
    "orbax_t5_1_0": ("orbax", False, ("relu",), True, False, False),
    "orbax_scanned_ul2": ("orbax", True, ("swish", "linear"), False, False, True),
}


# ------------------------------------------------------------------------------------------------- T5X side
def t5x_params(activations, tied, seed=0, bf16=False):
    """A T5X parameter tree (flat: '/'-joined names -> float32) of t5x/examples/t5's Transformer, per layer."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=None):
        return rng.normal(0, scale or shape[0] ** -0.5, shape).astype(np.float32)

    p = {"token_embedder/embedding": w(VOCAB, EMBED, scale=0.5 if tied else 1.0)}
    mlp = ["wi"] if len(activations) == 1 else ["wi_0", "wi_1"]

    def attention(prefix):
        for n in ("query", "key", "value"):
            p[f"{prefix}/{n}/kernel"] = w(EMBED, HEADS * HEAD_DIM)
        p[f"{prefix}/out/kernel"] = w(HEADS * HEAD_DIM, EMBED)

    def layer_norm(name):
        p[name] = 1.0 + 0.1 * w(EMBED, scale=1.0)

    def mlp_block(prefix):
        for n in mlp:
            p[f"{prefix}/mlp/{n}/kernel"] = w(EMBED, MLP)
        p[f"{prefix}/mlp/wo/kernel"] = w(MLP, EMBED)

    for stack, layers in (("encoder", ENC_LAYERS), ("decoder", DEC_LAYERS)):
        p[f"{stack}/relpos_bias/rel_embedding"] = w(HEADS, BUCKETS, scale=0.5)
        for i in range(layers):
            prefix = f"{stack}/layers_{i}"
            if stack == "encoder":
                layer_norm(f"{prefix}/pre_attention_layer_norm/scale")
                attention(f"{prefix}/attention")
            else:
                layer_norm(f"{prefix}/pre_self_attention_layer_norm/scale")
                attention(f"{prefix}/self_attention")
                layer_norm(f"{prefix}/pre_cross_attention_layer_norm/scale")
                attention(f"{prefix}/encoder_decoder_attention")
            layer_norm(f"{prefix}/pre_mlp_layer_norm/scale")
            mlp_block(prefix)
        layer_norm(f"{stack}/{stack}_norm/scale")
    if not tied:
        p["decoder/logits_dense/kernel"] = w(EMBED, VOCAB)
    if bf16:  # values a bfloat16 checkpoint holds exactly
        import ml_dtypes
        p = {name: x.astype(ml_dtypes.bfloat16).astype(np.float32) for name, x in p.items()}
    return p


def scanned(params):
    """The scanned layout (scalable_t5): `<stack>/<stack>/<layer path>` stacked on axis 1, N-D attention kernels."""
    out, stacked = {}, {}
    for name, x in params.items():
        parts = name.split("/")
        if len(parts) > 2 and parts[1].startswith("layers_"):
            sub = "/".join(parts[2:])
            if sub.endswith(("query/kernel", "key/kernel", "value/kernel")):
                x = x.reshape(EMBED, HEADS, HEAD_DIM)
            elif sub.endswith("out/kernel"):
                x = x.reshape(HEADS, HEAD_DIM, EMBED)
            stacked.setdefault(f"{parts[0]}/{parts[0]}/{sub}", []).append(x)
        else:
            out[name] = x
    out.update({name: np.stack(xs, axis=1) for name, xs in stacked.items()})
    return out


def _nest(flat):
    tree = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _optimizer_slots(params):
    """Adafactor-like slots under state/param_states (must be ignored by the converter)."""
    return {f"{name}/v_row": np.ones(x.shape[:1], np.float32) for name, x in params.items()}


def write_legacy(ckpt_dir, params, step=100, bf16=False):
    """T5X's legacy Checkpointer.save layout (see the module docstring)."""
    import tensorstore as ts
    from flax import serialization

    os.makedirs(ckpt_dir)

    def write(name, x, dtype):
        spec = ts.Spec({"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": name.replace("/", ".")},
                        "metadata": {"compressor": {"id": "gzip"}, "shape": x.shape, "chunks": np.array(x.shape)}})
        relative = spec.to_json()
        absolute = json.loads(json.dumps(relative))
        absolute["kvstore"]["path"] = os.path.join(ckpt_dir, absolute["kvstore"]["path"])
        if dtype != "float32":  # T5X's save_dtype: a cast spec around the zarr one
            absolute = {"base": absolute, "driver": "cast", "dtype": "float32"}
        ts.open(absolute, create=True, open=True).result().write(x).result()
        return relative

    target = {name: write(f"target/{name}", x, "bfloat16" if bf16 else "float32") for name, x in params.items()}
    slots = _optimizer_slots(params)
    slots = {name: (write(f"state/param_states/{name}", x, "float32") if i % 2 else x)
             for i, (name, x) in enumerate(slots.items())}
    state = {"version": 3, "optimizer": {"target": _nest(target),
                                         "state": {"step": np.int32(step), "param_states": _nest(slots)}}}
    with open(os.path.join(ckpt_dir, "checkpoint"), "wb") as f:
        f.write(serialization.msgpack_serialize(state))


def write_orbax(model_dir, params, step=100):
    """T5X's OrbaxCheckpointManagerInterface.save layout: model_dir/checkpoint_<step>/state (OCDBT)."""
    import orbax.checkpoint as ocp

    state = {"target": _nest(params), "state": {"step": np.int32(step),
                                                 "param_states": _nest(_optimizer_slots(params))}}
    options = ocp.CheckpointManagerOptions(step_prefix="checkpoint", create=True)
    with ocp.CheckpointManager(model_dir, options=options,
                               item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)}) as manager:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
        manager.wait_until_finished()
    return os.path.join(model_dir, f"checkpoint_{step}")


def config_gin(path, activations, tied, scanned_layers, **overrides):
    """An operative config.gin as T5X writes it (macros, imports, `network.T5Config.x = v` lines)."""
    fields = {"dropout_rate": "%DROPOUT_RATE", "dtype": "'bfloat16'", "emb_dim": EMBED, "head_dim": HEAD_DIM,
              "logits_via_embedding": tied, "mlp_activations": repr(tuple(activations)), "mlp_dim": MLP,
              "num_decoder_layers": DEC_LAYERS, "num_encoder_layers": ENC_LAYERS, "num_heads": HEADS,
              "vocab_size": "%VOCAB_SIZE", **overrides}
    if scanned_layers:
        fields.update(scan_layers=True, param_scan_axis=1, remat_policy="'minimal'")
    lines = ["from __gin__ import dynamic_registration", "import seqio",
             "from t5x.examples.scalable_t5 import network" if scanned_layers else
             "from t5x.examples.t5 import network", "", "# Macros:",
             "# " + "=" * 78, "DROPOUT_RATE = 0.0", f"VOCAB_SIZE = {VOCAB}", "",
             "# Parameters for network.T5Config:", "# " + "=" * 78]
    lines += [f"network.T5Config.{k} = {v}" for k, v in sorted(fields.items())]
    lines += ["", "network.Transformer.config = @network.T5Config()"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------------- HF side
def hf_model(params, activations, tied):
    """transformers' T5 with the T5X weights, through the published T5X -> HF mapping."""
    gated = len(activations) == 2
    act = {"gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}[activations[0]]
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=EMBED, d_kv=HEAD_DIM, d_ff=MLP, num_layers=ENC_LAYERS,
        num_decoder_layers=DEC_LAYERS, num_heads=HEADS, relative_attention_num_buckets=BUCKETS,
        relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj=("gated-" if gated else "") + act,
        tie_word_embeddings=tied, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(config).eval()
    sd = {"shared.weight": params["token_embedder/embedding"]}

    def attention(hf, t5x):
        for h, t in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
            sd[f"{hf}.{h}.weight"] = params[f"{t5x}/{t}/kernel"].T

    def mlp(hf, t5x):
        for n in (("wi_0", "wi_1") if gated else ("wi",)) + ("wo",):
            sd[f"{hf}.DenseReluDense.{n}.weight"] = params[f"{t5x}/mlp/{n}/kernel"].T

    for stack, layers in (("encoder", ENC_LAYERS), ("decoder", DEC_LAYERS)):
        sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            params[f"{stack}/relpos_bias/rel_embedding"].T
        sd[f"{stack}.final_layer_norm.weight"] = params[f"{stack}/{stack}_norm/scale"]
        for i in range(layers):
            hf, t5x = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
            if stack == "encoder":
                attention(f"{hf}.0.SelfAttention", f"{t5x}/attention")
                sd[f"{hf}.0.layer_norm.weight"] = params[f"{t5x}/pre_attention_layer_norm/scale"]
                mlp(f"{hf}.1", t5x)
                sd[f"{hf}.1.layer_norm.weight"] = params[f"{t5x}/pre_mlp_layer_norm/scale"]
            else:
                attention(f"{hf}.0.SelfAttention", f"{t5x}/self_attention")
                sd[f"{hf}.0.layer_norm.weight"] = params[f"{t5x}/pre_self_attention_layer_norm/scale"]
                attention(f"{hf}.1.EncDecAttention", f"{t5x}/encoder_decoder_attention")
                sd[f"{hf}.1.layer_norm.weight"] = params[f"{t5x}/pre_cross_attention_layer_norm/scale"]
                mlp(f"{hf}.2", t5x)
                sd[f"{hf}.2.layer_norm.weight"] = params[f"{t5x}/pre_mlp_layer_norm/scale"]
    result = model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if not tied:  # transformers 5 ties the module; T5X's logits_dense is a separate output layer
        model.lm_head.weight = torch.nn.Parameter(torch.tensor(params["decoder/logits_dense/kernel"].T.copy()))
    return model


def batch(seed=1, input_length=9, target_length=6):
    """Unpacked rows as T5X feeds score_batch: EOS-terminated inputs / targets padded with 0, decoder inputs = the
    targets shifted right with 0 first."""
    rng = np.random.default_rng(seed)
    inputs = np.zeros((4, input_length), np.int32)
    targets = np.zeros((4, target_length), np.int32)
    for row, (n_in, n_out) in enumerate([(8, 5), (3, 2), (5, 4), (1, 1)]):
        inputs[row, :n_in + 1] = list(rng.integers(2, VOCAB, n_in)) + [1]
        targets[row, :n_out + 1] = list(rng.integers(2, VOCAB, n_out)) + [1]
    decoder_inputs = np.concatenate([np.zeros((4, 1), np.int32), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.int32)}


def hf_scores(model, b):
    """T5X score_batch semantics on the HF model: sum of target log-probs, decoder inputs = shifted targets."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(b["encoder_input_tokens"], dtype=torch.long),
                       attention_mask=torch.tensor(b["encoder_input_tokens"] > 0, dtype=torch.long),
                       decoder_input_ids=torch.tensor(b["decoder_input_tokens"], dtype=torch.long)).logits
        log_probs = torch.log_softmax(logits.double(), -1).numpy()
    targets = b["decoder_target_tokens"]
    token = np.take_along_axis(log_probs, targets[..., None].astype(np.int64), -1)[..., 0]
    return (token * (targets > 0)).sum(-1)


def itjax_scores(out_dir, b):
    config = t5_conversion.t5_config_from_gin(os.path.join(out_dir, folders.MODEL_GIN))
    model = EncoderDecoderModel(config)
    graphdef, _ = nnx.split(model.abstract_module(), nnx.Param)
    module = nnx.merge(graphdef, nnx.State(t5_conversion.load_params(out_dir, config)))
    return config, np.asarray(model.score(module, {k: jnp.asarray(v) for k, v in b.items()}))


# ------------------------------------------------------------------------------------------------- parity
def _write_case(root, case):
    fmt, is_scanned, activations, tied, bf16, with_gin = CASES[case]
    params = t5x_params(activations, tied, seed=sorted(CASES).index(case), bf16=bf16)
    stored = scanned(params) if is_scanned else params
    if fmt == "legacy":
        ckpt = os.path.join(root, "t5x_model", "checkpoint_100")
        write_legacy(ckpt, stored, bf16=bf16)
    else:
        ckpt = write_orbax(os.path.join(root, "t5x_model"), stored)
    gin_file = config_gin(os.path.join(root, "config.gin"), activations, tied, is_scanned) if with_gin else None
    return params, ckpt, gin_file


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    """(case, T5X params (per layer), itjax folder, HF reference model), converted through the CLI."""
    case = request.param
    root = str(tmp_path_factory.mktemp(case))
    params, ckpt, gin_file = _write_case(root, case)
    _, _, activations, tied, _, _ = CASES[case]
    out_dir = os.path.join(root, "itjax")
    if case == "orbax_t5_1_0":
        ckpt = os.path.join(ckpt, "state")  # the orbax folder itself is accepted too
    argv = ["--t5x_checkpoint", ckpt, "--out_dir", out_dir]
    if gin_file:
        argv += ["--t5x_gin", gin_file]
    elif len(activations) == 2:
        argv += ["--mlp_activation", "gated-silu" if activations[0] in ("silu", "swish") else "gated-gelu"]
    if case == "legacy_t5_1_1":
        argv += ["--vocabulary", SPM]
    convert.main(argv)
    return case, params, out_dir, hf_model(params, activations, tied)


def test_log_likelihoods_match_hf_t5(converted):
    case, _, out_dir, model = converted
    b = batch()
    config, scores = itjax_scores(out_dir, b)
    expected = hf_scores(model, b)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=0)
    _, _, activations, tied, _, _ = CASES[case]
    assert config.feed_forward == {"gelu": "gated-gelu", "silu": "gated-silu", "swish": "gated-silu",
                                   "relu": "relu"}[activations[0]]
    assert config.tie_word_embeddings == tied
    assert (config.num_encoder_layers, config.num_decoder_layers, config.num_heads) == (ENC_LAYERS, DEC_LAYERS, HEADS)
    assert sorted(os.listdir(out_dir)) == sorted(["checkpoint", "model.gin"]
                                                 + (["spiece.model"] if case == "legacy_t5_1_1" else []))


@pytest.mark.parametrize("converted", ["legacy_t5_1_1", "orbax_scanned_ul2"], indirect=True)
def test_to_hf_and_infer_on_the_converted_folder(converted, tmp_path):
    """`--to_hf` writes a folder transformers loads with the same scores (gated-silu included), and
    `itjax.infer --mode=score` on the converted folder (with its --vocabulary) gives T5X's per-example
    log-likelihoods."""
    case, _, out_dir, model = converted
    b = batch(seed=3)
    expected = hf_scores(model, b)
    hf_dir = str(tmp_path / "hf")
    convert.main(["--to_hf", "--hf_dir", hf_dir, "--out_dir", out_dir])
    exported = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    assert exported.config.feed_forward_proj == model.config.feed_forward_proj
    np.testing.assert_allclose(hf_scores(exported, b), expected, rtol=1e-5, atol=0)
    if case != "legacy_t5_1_1":
        return  # itjax.infer needs the vocabulary, which only this folder was given

    rows = [{"input_ids": [int(t) for t in r if t], "target_ids": [int(t) for t in s if t]}
            for r, s in zip(b["encoder_input_tokens"], b["decoder_target_tokens"])]
    with open(tmp_path / "in.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    infer.main(["--checkpoint_path", out_dir, "--input_file", str(tmp_path / "in.jsonl"), "--output_file",
                str(tmp_path / "out.jsonl"), "--mode", "score", "--input_length", "9", "--target_length", "6"])
    with open(tmp_path / "out.jsonl") as f:
        scores = [json.loads(line)["log_likelihood"] for line in f]
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def legacy_ckpt(tmp_path_factory):
    """A per-layer gated-GELU legacy checkpoint and its config.gin, written once for the bad-input tests."""
    root = str(tmp_path_factory.mktemp("bad"))
    params, ckpt, gin_file = _write_case(root, "legacy_t5_1_1")
    return root, params, ckpt, gin_file


def _refused(argv, *fragments):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    message = str(e.value)
    assert message.startswith("itjax.convert: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_gated_mlp_without_config_is_refused(legacy_ckpt, tmp_path):
    _, _, ckpt, _ = legacy_ckpt
    out = str(tmp_path / "out")
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", out], "gated", "--t5x_gin", "--mlp_activation gated-silu")
    assert not os.path.exists(out)


def test_gin_disagreeing_with_shapes_names_the_first_mismatch(legacy_ckpt, tmp_path):
    _, _, ckpt, _ = legacy_ckpt
    gin_file = config_gin(str(tmp_path / "config.gin"), ("gelu", "linear"), False, False, emb_dim=64, num_heads=2)
    out = str(tmp_path / "out")
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", out, "--t5x_gin", gin_file],
             "first mismatch", "network.T5Config.emb_dim = 64", f"token_embedder/embedding ({VOCAB}, {EMBED})")
    gin_file = config_gin(str(tmp_path / "ul2.gin"), ("silu", "linear"), False, False, num_decoder_layers=2)
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", out, "--t5x_gin", gin_file],
             "num_decoder_layers = 2", "decoder/layers_0 .. layers_2")
    assert not os.path.exists(out)


def test_unknown_parameter_names_are_listed(tmp_path):
    params = t5x_params(("gelu", "linear"), False)
    params["encoder/layers_0/attention/query/bias"] = np.zeros(HEADS * HEAD_DIM, np.float32)
    params["decoder/extra_head/kernel"] = np.zeros((EMBED, 3), np.float32)
    ckpt = write_orbax(str(tmp_path / "model"), params)
    out = str(tmp_path / "out")
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", out, "--mlp_activation", "gated-gelu"],
             "decoder/extra_head/kernel: unknown parameter name (32, 3)",
             "encoder/layers_0/attention/query/bias: unknown parameter name (32,)")
    assert not os.path.exists(out)


def test_per_layer_relative_position_tables_are_refused(tmp_path):
    """scalable_t5 / umT5 networks keep a table per layer (per layer, or stacked under encoder/encoder/...)."""
    params = t5x_params(("relu",), True)
    params["encoder/layers_1/relpos_bias/rel_embedding"] = params["encoder/relpos_bias/rel_embedding"]
    ckpt = str(tmp_path / "checkpoint_1")
    write_legacy(ckpt, params)
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", str(tmp_path / "out")],
             "encoder/layers_1/relpos_bias/rel_embedding", "one table per stack")
    stacked = scanned(t5x_params(("gelu", "linear"), False))
    stacked["decoder/decoder/relpos_bias/rel_embedding"] = np.zeros((HEADS, DEC_LAYERS, BUCKETS), np.float32)
    ckpt = write_orbax(str(tmp_path / "scalable"), stacked)
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", str(tmp_path / "out"), "--mlp_activation", "gated-gelu"],
             "decoder/decoder/relpos_bias/rel_embedding", "scalable_t5")
    assert not os.path.exists(tmp_path / "out")


def test_missing_files_are_named_and_nothing_is_written(legacy_ckpt, tmp_path):
    root, _, ckpt, gin_file = legacy_ckpt
    out = str(tmp_path / "out")
    _refused(["--t5x_checkpoint", str(tmp_path / "nope"), "--out_dir", out], "--t5x_checkpoint", "does not exist")
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", out, "--t5x_gin", str(tmp_path / "none.gin")],
             "--t5x_gin", "none.gin does not exist")
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", out, "--t5x_gin", gin_file, "--vocabulary",
              str(tmp_path / "spm.model")], "--vocabulary", "does not exist")
    _refused(["--t5x_checkpoint", os.path.dirname(ckpt), "--out_dir", out, "--t5x_gin", gin_file],
             "checkpoints at steps [100]", "checkpoint_100")
    # A zarr array deleted from the checkpoint: found while reading, after the checks, and still nothing written.
    broken = str(tmp_path / "checkpoint_100")
    os.makedirs(broken)
    for name in os.listdir(ckpt):
        if name != "target.decoder.layers_2.mlp.wo.kernel":
            os.symlink(os.path.join(ckpt, name), os.path.join(broken, name))
    _refused(["--t5x_checkpoint", broken, "--out_dir", out, "--t5x_gin", gin_file],
             "decoder/layers_2/mlp/wo/kernel")
    assert not os.path.exists(out)


def test_existing_output_folder_is_never_written_into(legacy_ckpt, tmp_path):
    _, _, ckpt, gin_file = legacy_ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _refused(["--t5x_checkpoint", ckpt, "--out_dir", str(out), "--t5x_gin", gin_file], "already exists")
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_legacy_reader_older_checkpoint_forms(tmp_path):
    """Older T5X files: version 2 (bfloat16 stored as its uint16 bits), tensorstore < 0.1.14 specs (path at the top,
    not in the kvstore), version 0 (no 'optimizer' level), 'gfile' drivers, and arrays inline in the msgpack."""
    import ml_dtypes
    import tensorstore as ts
    from flax import serialization

    from itjax.conversion import t5x_read

    value = np.array([[1.5, -2.25, 3.0e-3], [7.0, 0.0, -1.0]], np.float32)
    bits = value.astype(ml_dtypes.bfloat16).view(np.uint16)
    for version, dtype, stored in ((0, "float32", value), (2, "uint16", bits), (3, "float32", value)):
        folder = tmp_path / f"v{version}"
        folder.mkdir()
        spec = {"driver": "zarr", "dtype": dtype, "path": "target.a.kernel", "kvstore": {"driver": "gfile"},
                "metadata": {"compressor": {"id": "gzip"}, "shape": list(value.shape), "chunks": [2, 3]}}
        ts.open({**spec, "kvstore": {"driver": "file", "path": str(folder / "target.a.kernel")}, "path": ""},
                create=True, open=True).result().write(stored).result()
        tree = {"target": {"a": {"kernel": spec}, "b": {"scale": value[0]}}, "state": {"step": np.int32(1)}}
        contents = {"version": version, "optimizer": tree} if version else tree
        (folder / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
        checkpoint = t5x_read.open_checkpoint(str(folder))
        assert checkpoint.shapes == {"a/kernel": (2, 3), "b/scale": (3,)}
        np.testing.assert_array_equal(checkpoint.read("a/kernel"), value.astype(ml_dtypes.bfloat16).astype(np.float32)
                                      if version == 2 else value)
        np.testing.assert_array_equal(checkpoint.read("b/scale"), value[0])


# ------------------------------------------------------------------------------------------------- config.gin
def test_gin_reader_blocks_includes_and_macros(tmp_path):
    """A hand-written model file (block syntax, an include, an unresolved macro on a field the conversion does not
    use) reads like the operative config T5X writes."""
    from itjax.conversion import t5x_gin

    (tmp_path / "sizes.gin").write_text("network.T5Config.num_heads = 12\nnetwork.T5Config.emb_dim = 512\n")
    (tmp_path / "model.gin").write_text(
        "from __gin__ import dynamic_registration\nfrom t5x.examples.t5 import network\ninclude 'sizes.gin'\n"
        "DROPOUT_RATE = %gin.REQUIRED\nMLP_ACTS = ('silu', 'linear')\n"
        "network.Transformer.config = @network.T5Config()\n"
        "network.T5Config:\n  vocab_size = 32128\n  emb_dim = 768\n  mlp_activations = %MLP_ACTS\n"
        "  dropout_rate = %DROPOUT_RATE\n")
    assert t5x_gin.read_t5_config_bindings(str(tmp_path / "model.gin")) == {
        "num_heads": 12, "emb_dim": 768, "vocab_size": 32128, "mlp_activations": ("silu", "linear")}
    (tmp_path / "bad.gin").write_text("network.T5Config.vocab_size = 10\nnetwork.T5Config.num_experts = 8\n")
    with pytest.raises(ConversionError, match=r"bad.gin:2: network.T5Config.num_experts is not a field"):
        t5x_gin.read_t5_config_bindings(str(tmp_path / "bad.gin"))
    (tmp_path / "scoped.gin").write_text("encoder/network.T5Config.num_heads = 4\n")
    with pytest.raises(ConversionError, match="scoped binding encoder/network.T5Config.num_heads"):
        t5x_gin.read_t5_config_bindings(str(tmp_path / "scoped.gin"))
    (tmp_path / "macro.gin").write_text("network.T5Config.emb_dim = %EMB\n")
    with pytest.raises(ConversionError, match="the macro EMB is not bound"):
        t5x_gin.read_t5_config_bindings(str(tmp_path / "macro.gin"))
