"""HF <-> itjax T5 conversion parity against transformers on tiny random models made here (nothing downloaded).

Two families: T5 v1.1 (gated-GELU, separate lm_head; saved sharded, so the index file is read) and T5 1.0 (ReLU,
logits through the scaled shared embedding; saved as one file). For each: logits within 1e-4 absolute, teacher-forced
loss within 1e-5 relative, identical greedy generations, an exact HF -> itjax -> HF round trip. Plus the errors for
foreign configs / tensors, and SentencePiece tokenizer parity (seqio vs the HF T5 tokenizer).
"""

import json
import os
import random
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from itjax import convert, losses  # noqa: E402
from itjax.conversion import ConversionError, folders, safetensors_io  # noqa: E402
from itjax.conversion import t5 as t5_conversion  # noqa: E402
from itjax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402

VOCAB = 100
BATCH, INPUT_LENGTH, TARGET_LENGTH = 4, 11, 7
DECODE_LENGTH = 10

FAMILIES = {
    # name: (HF config overrides, save_pretrained kwargs)
    "t5_1_1": ({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, {"max_shard_size": "20KB"}),
    "t5_1_0": ({"feed_forward_proj": "relu", "tie_word_embeddings": True}, {}),
}


def _hf_model(family: str, seed: int = 0):
    """A tiny random HF T5 of `family`. EOS logits are boosted so that some greedy rows stop early."""
    overrides, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **overrides)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        if not overrides["tie_word_embeddings"]:  # transformers 5 ties the module; a v1.1 model has its own lm_head
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 32**-0.5)
            model.lm_head.weight[1] *= 3.0
        else:  # HF's N(0, 1) embedding makes a tiny tied model repeat one token; smaller is more varied
            model.shared.weight.mul_(0.2)
            model.shared.weight[1] *= 3.0
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory):
    """(family, HF model, HF folder, itjax folder, itjax module) for each family, converted through the CLI."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf_dir, out_dir = str(root / "hf"), str(root / "itjax")
    model = _hf_model(family)
    model.save_pretrained(hf_dir, **FAMILIES[family][1])
    convert.main(["--hf_dir", hf_dir, "--out_dir", out_dir])
    config = t5_conversion.t5_config_from_gin(os.path.join(out_dir, folders.MODEL_GIN))
    graphdef, _ = nnx.split(EncoderDecoderModel(config).abstract_module(), nnx.Param)
    module = nnx.merge(graphdef, nnx.State(t5_conversion.load_params(out_dir)))
    return family, model, hf_dir, out_dir, module


def _batch(seed: int = 1):
    """Random inputs / targets with trailing padding (0) of different lengths per row, as numpy int32."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, VOCAB, (BATCH, INPUT_LENGTH)).astype(np.int32)
    targets = rng.integers(2, VOCAB, (BATCH, TARGET_LENGTH)).astype(np.int32)
    for row, (n_in, n_out) in enumerate([(INPUT_LENGTH, TARGET_LENGTH), (5, 3), (8, 7), (1, 1)]):
        inputs[row, n_in:] = 0
        targets[row, n_out:] = 0
    decoder_inputs = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
    return inputs, targets, decoder_inputs


def test_converted_config(converted):
    family, model, _, _, module = converted
    assert module.config.feed_forward == model.config.feed_forward_proj
    assert module.config.tie_word_embeddings == (family == "t5_1_0")
    assert module.config.relative_attention_num_buckets == 8


def test_logits_match(converted):
    _, model, _, _, module = converted
    inputs, _, decoder_inputs = _batch()
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(inputs, dtype=torch.long),
                         attention_mask=torch.tensor(inputs > 0, dtype=torch.long),
                         decoder_input_ids=torch.tensor(decoder_inputs, dtype=torch.long)).logits.numpy()
    logits = np.asarray(module(jnp.asarray(inputs), jnp.asarray(decoder_inputs)))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_teacher_forced_loss_matches(converted):
    _, model, _, _, module = converted
    inputs, targets, decoder_inputs = _batch(seed=2)
    labels = np.where(targets > 0, targets, -100)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(inputs, dtype=torch.long),
                         attention_mask=torch.tensor(inputs > 0, dtype=torch.long),
                         labels=torch.tensor(labels, dtype=torch.long)).loss.item()
    logits = module(jnp.asarray(inputs), jnp.asarray(decoder_inputs))
    token_loss, _ = losses.cross_entropy_with_z_loss(logits, jnp.asarray(targets), 0.0)
    weights = (targets > 0).astype(np.float32)
    loss = float(jnp.sum(token_loss * weights) / weights.sum())
    assert loss == pytest.approx(expected, rel=1e-5)


def test_greedy_generation_identical(converted):
    """HF output = [start, tokens..., EOS, pad...] (stops when all rows are done); itjax = tokens, EOS, then 0."""
    _, model, _, _, module = converted
    inputs, _, _ = _batch(seed=3)
    with torch.no_grad():
        hf = model.generate(input_ids=torch.tensor(inputs, dtype=torch.long),
                            attention_mask=torch.tensor(inputs > 0, dtype=torch.long),
                            num_beams=1, do_sample=False, max_new_tokens=DECODE_LENGTH).numpy()[:, 1:]
    hf = np.pad(hf, ((0, 0), (0, DECODE_LENGTH - hf.shape[1])))
    ours = np.asarray(EncoderDecoderModel(module.config).generate(
        module, {"encoder_input_tokens": jnp.asarray(inputs)}, max_decode_length=DECODE_LENGTH, eos_id=1))
    np.testing.assert_array_equal(ours, hf)
    stopped = (ours == 1).any(axis=1)
    assert stopped.any() and not stopped.all(), "the test should cover rows with and without EOS"


def _hf_tensors(hf_dir: str) -> dict:
    return {name: tensor for file in sorted(os.listdir(hf_dir)) if file.endswith(".safetensors")
            for name, tensor in load_file(os.path.join(hf_dir, file)).items()}


def test_round_trip_is_exact(converted, tmp_path):
    _, model, hf_dir, out_dir, _ = converted
    back_dir = str(tmp_path / "back")
    convert.main(["--to_hf", "--hf_dir", back_dir, "--out_dir", out_dir])
    original, back = _hf_tensors(hf_dir), _hf_tensors(back_dir)
    assert set(original) <= set(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(back_dir).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    inputs, _, decoder_inputs = _batch()
    with torch.no_grad():
        args = dict(input_ids=torch.tensor(inputs, dtype=torch.long),
                    attention_mask=torch.tensor(inputs > 0, dtype=torch.long),
                    decoder_input_ids=torch.tensor(decoder_inputs, dtype=torch.long))
        assert torch.equal(reloaded(**args).logits, model(**args).logits)


def test_sharded_export(converted, tmp_path):
    """A small shard size writes HF's index + shards, which read back to the same parameters."""
    _, _, _, out_dir, _ = converted
    config = t5_conversion.t5_config_from_gin(os.path.join(out_dir, folders.MODEL_GIN))
    params = t5_conversion.load_params(out_dir, config)
    files = safetensors_io.write_safetensors(t5_conversion.params_to_hf_t5(params, config), str(tmp_path),
                                             max_shard_size=30_000)
    assert safetensors_io.HF_INDEX_FILE in files and len(files) > 2
    again = t5_conversion.hf_t5_to_params(safetensors_io.SafetensorsReader(str(tmp_path)), config)
    for (path, a), (_, b) in zip(_leaves(params), _leaves(again)):
        assert np.array_equal(np.asarray(a), b), path


def _leaves(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_bfloat16_checkpoint_reads_without_torch(tmp_path):
    """bf16 safetensors (numpy has no bf16 dtype) are read through the raw reader and widened to fp32 exactly."""
    model = _hf_model("t5_1_1")
    model.to(torch.bfloat16).save_pretrained(str(tmp_path))
    reader = safetensors_io.SafetensorsReader(str(tmp_path))
    expected = model.shared.weight.detach().float().numpy()
    assert np.array_equal(reader.get("shared.weight"), expected)


@pytest.fixture()
def tied_hf_dir(tmp_path):
    hf_dir = str(tmp_path / "hf")
    _hf_model("t5_1_0").save_pretrained(hf_dir)
    return hf_dir


def test_non_t5_config_is_rejected(tied_hf_dir):
    path = os.path.join(tied_hf_dir, folders.HF_CONFIG)
    with open(path) as f:
        config = json.load(f)
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConversionError, match="LlamaForCausalLM"):
        t5_conversion.t5_config_from_hf(config)
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(SystemExit, match="model_type='llama'"):
        convert.main(["--hf_dir", tied_hf_dir, "--out_dir", os.path.join(tied_hf_dir, "out")])


def test_mismatched_tensors_are_listed_in_one_error(tied_hf_dir):
    file = os.path.join(tied_hf_dir, safetensors_io.HF_SINGLE_FILE)
    tensors = load_file(file)
    tensors["encoder.block.0.layer.0.SelfAttention.q.bias"] = np.zeros(32, np.float32)  # unknown
    tensors["decoder.block.1.layer.2.DenseReluDense.wo.weight"] = np.zeros((32, 50), np.float32)  # wrong shape
    del tensors["encoder.final_layer_norm.weight"]  # missing
    save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(tied_hf_dir, folders.HF_CONFIG)) as f:
        config = t5_conversion.t5_config_from_hf(json.load(f))
    with pytest.raises(ConversionError) as error:
        t5_conversion.hf_t5_to_params(safetensors_io.SafetensorsReader(tied_hf_dir), config)
    message = str(error.value)
    for name in ("encoder.block.0.layer.0.SelfAttention.q.bias", "decoder.block.1.layer.2.DenseReluDense.wo.weight",
                 "encoder.final_layer_norm.weight", "3 tensors"):
        assert name in message


def test_tied_config_with_separate_lm_head_is_rejected(tied_hf_dir):
    file = os.path.join(tied_hf_dir, safetensors_io.HF_SINGLE_FILE)
    tensors = load_file(file)
    tensors["lm_head.weight"] = tensors["shared.weight"] + 1.0
    save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(tied_hf_dir, folders.HF_CONFIG)) as f:
        config = t5_conversion.t5_config_from_hf(json.load(f))
    with pytest.raises(ConversionError, match="lm_head.weight"):
        t5_conversion.hf_t5_to_params(safetensors_io.SafetensorsReader(tied_hf_dir), config)


def test_unsupported_feed_forward_is_rejected():
    with pytest.raises(ConversionError, match="gated-relu"):
        t5_conversion.t5_config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-relu"})


def test_transformers_4_style_config():
    """transformers 4.x configs say tie_word_embeddings (no scale_decoder_outputs); both spellings map."""
    v1_1 = {"model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "num_layers": 2}
    assert not t5_conversion.t5_config_from_hf(v1_1).tie_word_embeddings
    assert t5_conversion.t5_config_from_hf({"model_type": "t5", "num_layers": 2}).tie_word_embeddings  # T5 1.0 default
    assert not t5_conversion.t5_config_from_hf({**v1_1, "tie_word_embeddings": True,
                                          "scale_decoder_outputs": False}).tie_word_embeddings


def test_sentencepiece_ids_match_hf_tokenizer(tmp_path):
    """seqio.SentencePieceVocabulary ids + EOS (1) == the HF T5 tokenizer's ids, for the spiece.model that
    itjax.convert carried from a HF folder to the itjax folder and back."""
    import sentencepiece
    import seqio

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 8))) for _ in range(200)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(500)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(tmp_path / "spiece"), vocab_size=100, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    hf_dir, out_dir, back_dir = (str(tmp_path / name) for name in ("hf", "itjax", "back"))
    _hf_model("t5_1_1").save_pretrained(hf_dir)
    shutil.copy(tmp_path / "spiece.model", os.path.join(hf_dir, folders.SPIECE))
    convert.main(["--hf_dir", hf_dir, "--out_dir", out_dir])  # carries spiece.model over both ways
    convert.main(["--to_hf", "--hf_dir", back_dir, "--out_dir", out_dir])
    # transformers 5 builds its (fast) T5Tokenizer from spiece.model in from_pretrained; the
    # `T5Tokenizer(vocab_file=...)` constructor does not load the SentencePiece pieces.
    hf_tokenizer = transformers.T5Tokenizer.from_pretrained(back_dir)
    vocabulary = seqio.SentencePieceVocabulary(os.path.join(out_dir, folders.SPIECE))
    texts = [lines[0], lines[1].upper(), " ".join(words[:12]) + ", Hello World 123!", "  two  spaces  ", ""]
    for text in texts:
        assert list(vocabulary.encode(text)) + [vocabulary.eos_id] == hf_tokenizer(text).input_ids, text
    assert (vocabulary.pad_id, vocabulary.eos_id) == (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id)
