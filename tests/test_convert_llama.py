"""HF <-> itjax conversion of Llama-family checkpoints against transformers, on tiny random models made here.

Cases: Llama 3 (llama3 RoPE scaling, untied; saved in shards, with a byte-level BPE tokenizer), Llama with tied
embeddings, Mistral with a 4-token sliding window, Qwen2 (q/k/v biases, tied). Each is written by `save_pretrained`
and converted with the CLI (`itjax.convert.main`). Checks: the model.gin config, fp32 logits within 1e-4 on a
right-padded batch, teacher-forced loss within 1e-5 relative, greedy generations identical to HF `generate`, the
exact HF -> itjax -> HF round trip loaded by `AutoModelForCausalLM`, sharded export, the converted folder as a
training start (`restore_initial_params` with the gin model), and the errors (unknown model_type, renamed /
mis-shaped tensors, existing output folders).
"""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from itjax import convert, losses  # noqa: E402
from itjax.checkpoints import restore_initial_params  # noqa: E402
from itjax.conversion import folders  # noqa: E402
from itjax.conversion import llama as llama_conversion  # noqa: E402
from itjax.conversion.safetensors_io import HF_INDEX_FILE, HF_SINGLE_FILE  # noqa: E402
from itjax.models.decoder_only import DecoderOnlyModel  # noqa: E402
from itjax.models.llama import Llama  # noqa: E402


def greedy_generate(module, prompt_tokens, prompt_lengths, *, max_new_tokens, eos_id):
    """Greedy continuation of right-padded prompts [batch, l] with prompt_lengths [batch] real tokens, through the
    model interface (`DecoderOnlyModel.generate`) -> [batch, max_new_tokens]."""
    mask = jnp.arange(prompt_tokens.shape[1])[None, :] < prompt_lengths[:, None]
    batch = {"decoder_input_tokens": prompt_tokens, "decoder_causal_attention": mask.astype(jnp.int32)}
    return DecoderOnlyModel(module.config).generate(module, batch, max_decode_length=max_new_tokens, eos_id=eos_id)


VOCAB, LENGTH, NEW_TOKENS = 128, 12, 8
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, bos_token_id=VOCAB - 2,
            eos_token_id=VOCAB - 1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
CASES = {
    # name: (HF config class, overrides, save_pretrained kwargs)
    "llama3_untied": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                                                     tie_word_embeddings=False), {"max_shard_size": "40KB"}),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True), {}),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=4, tie_word_embeddings=False), {}),
    "qwen2_bias": (transformers.Qwen2Config, dict(tie_word_embeddings=True), {}),
}


def _hf_model(name: str):
    """A tiny random HF model; norms / biases perturbed and weights widened so every tensor matters."""
    config_cls, overrides, _ = CASES[name]
    torch.manual_seed(0)
    config = config_cls(**TINY, **overrides, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name or param_name.endswith("bias"):
                p.copy_((1.0 if param_name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    return model


def _write_tokenizer(folder: str) -> tuple[int, int]:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) with BOS / EOS as the last ids and a BOS
    post-processor, as Llama 3 has. Returns (bos id, eos id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnop"), rng.integers(2, 9))) for _ in range(300)]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, show_progress=False)
    tokenizer.train_from_iterator([" ".join(words[i:i + 10]) for i in range(0, 300, 10)] + ["hello world"], trainer)
    tokenizer.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos, eos = tokenizer.token_to_id("<|begin_of_text|>"), tokenizer.token_to_id("<|end_of_text|>")
    assert (bos, eos) == (VOCAB - 2, VOCAB - 1)  # the ids the HF model config declares
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", bos)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>",
                                         eos_token="<|end_of_text|>").save_pretrained(folder)
    return bos, eos


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    """(case, HF model, HF folder, itjax folder, LlamaConfig read back from model.gin, itjax module)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf_dir, out_dir = str(root / "hf"), str(root / "itjax")
    model = _hf_model(name)
    model.save_pretrained(hf_dir, **CASES[name][2])
    if name == "llama3_untied":
        _write_tokenizer(hf_dir)
    convert.main(["--hf_dir", hf_dir, "--out_dir", out_dir])
    config = llama_conversion.llama_config_from_gin(os.path.join(out_dir, folders.MODEL_GIN))
    params = folders.restore_params(out_dir, llama_conversion.abstract_params(config))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, params)
    return name, model, hf_dir, out_dir, config, nnx.merge(graphdef, state)


def _padded_batch(seed: int):
    """Random tokens [3, LENGTH] right-padded with 0 to lengths 12, 7, 3, and the bool mask of real tokens."""
    rng = np.random.default_rng(seed)
    mask = np.arange(LENGTH)[None, :] < np.array([LENGTH, 7, 3])[:, None]
    return np.where(mask, rng.integers(3, VOCAB - 2, (3, LENGTH)), 0).astype(np.int32), mask


def test_converted_config_and_model_gin(converted):
    name, model, hf_dir, out_dir, config, _ = converted
    assert config == llama_conversion.llama_config_from_hf(model.config.to_dict())
    assert config.sliding_window == (4 if name == "mistral_window" else None)
    assert config.attention_bias == (name == "qwen2_bias")
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert (config.rope_scaling is not None) == (name == "llama3_untied")
    assert (os.path.exists(os.path.join(hf_dir, HF_INDEX_FILE))) == (name == "llama3_untied")  # sharded source
    with open(os.path.join(out_dir, folders.MODEL_GIN)) as f:
        text = f.read()
    assert "MODEL = @itjax.models.DecoderOnlyModel()" in text
    # BOS: the tokenizer's when the folder has one, else config.json's bos_token_id (Qwen2: none declared).
    bos_line = "itjax.models.DecoderOnlyModel.bos_id = "
    assert bos_line + str(None if name == "qwen2_bias" else VOCAB - 2) in text
    if name == "llama3_untied":  # the copied tokenizer files make the folder a vocabulary too
        from itjax.data.vocabularies import TokenizersVocabulary, get_vocabulary

        vocabulary = get_vocabulary(out_dir)
        assert isinstance(vocabulary, TokenizersVocabulary)
        assert (vocabulary.bos_id, vocabulary.eos_id) == (VOCAB - 2, VOCAB - 1)


def test_logits_match_hf(converted):
    _, model, _, _, _, module = converted
    tokens, mask = _padded_batch(1)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    got = np.asarray(module(jnp.asarray(tokens), segment_ids=jnp.asarray(mask, jnp.int32)))
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=0)


def test_teacher_forced_loss_matches_hf(converted):
    _, model, _, _, _, module = converted
    tokens, mask = _padded_batch(2)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long),
                         labels=torch.tensor(np.where(mask, tokens, -100), dtype=torch.long)).loss.item()
    logits = module(jnp.asarray(tokens), segment_ids=jnp.asarray(mask, jnp.int32))
    token_loss, _ = losses.cross_entropy_with_z_loss(logits[:, :-1], jnp.asarray(tokens[:, 1:]), 0.0)
    weights = mask[:, 1:].astype(np.float32)
    assert float(jnp.sum(token_loss * weights) / weights.sum()) == pytest.approx(expected, rel=1e-5)


def test_greedy_generation_matches_hf(converted):
    """Prompts of 9, 4 and 6 tokens (beyond Mistral's 4-token window) continued by 8 tokens, EOS never reached."""
    _, model, _, _, _, module = converted
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, VOCAB - 2, n).astype(np.int32) for n in (9, 4, 6)]
    tokens = np.zeros((3, 9), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    got = np.asarray(greedy_generate(module, jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts]),
                                     max_new_tokens=NEW_TOKENS, eos_id=-1))
    for row, prompt in zip(got, prompts):
        with torch.no_grad():
            hf = model.generate(input_ids=torch.tensor(prompt[None], dtype=torch.long),
                                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long), do_sample=False,
                                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
        np.testing.assert_array_equal(row, hf[0, len(prompt):].numpy())


def _hf_tensors(hf_dir: str) -> dict:
    return {name: tensor for file in sorted(os.listdir(hf_dir)) if file.endswith(".safetensors")
            for name, tensor in load_file(os.path.join(hf_dir, file)).items()}


def test_round_trip_is_exact_and_loads_in_transformers(converted, tmp_path):
    name, model, hf_dir, out_dir, _, _ = converted
    back_dir = str(tmp_path / "back")
    convert.main(["--to_hf", "--hf_dir", back_dir, "--out_dir", out_dir])
    original, back = _hf_tensors(hf_dir), _hf_tensors(back_dir)
    assert set(back) == set(original)
    for tensor_name, tensor in original.items():
        assert back[tensor_name].dtype == tensor.dtype and np.array_equal(back[tensor_name], tensor), tensor_name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back_dir, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    for key in ("sliding_window", "tie_word_embeddings", "rope_parameters", "bos_token_id", "eos_token_id"):
        assert getattr(reloaded.config, key, None) == getattr(model.config, key, None), key
    tokens, mask = _padded_batch(4)
    args = dict(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(reloaded(**args).logits, model(**args).logits)
    if name == "llama3_untied":  # tokenizer files travel both ways
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(back_dir)
        assert hf_tokenizer("hello world").input_ids[0] == VOCAB - 2


def test_sharded_export(converted, tmp_path):
    _, model, _, out_dir, _, _ = converted
    back_dir = str(tmp_path / "sharded")
    convert.main(["--to_hf", "--hf_dir", back_dir, "--out_dir", out_dir, "--max_shard_size_mb", "0.02"])
    with open(os.path.join(back_dir, HF_INDEX_FILE)) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back_dir).eval()
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_converted_folder_starts_training(converted):
    """model.gin builds the DecoderOnlyModel whose parameters the checkpoint restores into (train's
    initial_checkpoint_path)."""
    name, _, _, out_dir, config, module = converted
    gin.parse_config_file(os.path.join(out_dir, folders.MODEL_GIN))
    decoder_only = gin.get_configurable("itjax.models.DecoderOnlyModel")()
    assert decoder_only.config == config and decoder_only.bos_id == (None if name == "qwen2_bias" else VOCAB - 2)
    abstract = nnx.to_pure_dict(nnx.split(decoder_only.abstract_module(), nnx.Param)[1])
    restored = restore_initial_params(out_dir, abstract)
    expected = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (restored, expected))):
        assert np.array_equal(np.asarray(a), np.asarray(b)), path


# ------------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def tied_hf_dir(tmp_path_factory):
    hf_dir = str(tmp_path_factory.mktemp("errors") / "hf")
    _hf_model("llama_tied").save_pretrained(hf_dir)
    return hf_dir


def _copy_with(hf_dir: str, dst: str, edit_tensors=None, edit_config=None) -> str:
    os.makedirs(dst)
    tensors = load_file(os.path.join(hf_dir, HF_SINGLE_FILE))
    with open(os.path.join(hf_dir, folders.HF_CONFIG)) as f:
        config = json.load(f)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, os.path.join(dst, HF_SINGLE_FILE), metadata={"format": "pt"})
    with open(os.path.join(dst, folders.HF_CONFIG), "w") as f:
        json.dump(config, f)
    return dst


def test_unknown_model_type_is_refused(tied_hf_dir, tmp_path):
    hf_dir = _copy_with(tied_hf_dir, str(tmp_path / "hf"), edit_config=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(SystemExit, match=r"model_type='gpt2'.*'t5', 'mt5', 'llama', 'mistral', 'qwen2'"):
        convert.main(["--hf_dir", hf_dir, "--out_dir", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_renamed_and_misshaped_tensors_are_listed_in_one_error(tied_hf_dir, tmp_path):
    def edit(tensors):
        tensors["model.layers.1.mlp.upproj.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)  # [K*D=16, E] expected
        del tensors["model.norm.weight"]

    hf_dir = _copy_with(tied_hf_dir, str(tmp_path / "hf"), edit_tensors=edit)
    with pytest.raises(SystemExit) as error:
        convert.main(["--hf_dir", hf_dir, "--out_dir", str(tmp_path / "out")])
    message = str(error.value)
    for expected in ("4 tensors", "model.layers.1.mlp.up_proj.weight: missing", "model.norm.weight: missing",
                     "model.layers.1.mlp.upproj.weight: unexpected", "model.layers.0.self_attn.k_proj.weight: shape "
                     "(8, 32) != expected (16, 32)"):
        assert expected in message
    assert not os.path.exists(tmp_path / "out")


def test_tied_config_with_different_lm_head_is_refused(tied_hf_dir, tmp_path):
    def edit(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0

    hf_dir = _copy_with(tied_hf_dir, str(tmp_path / "hf"), edit_tensors=edit)
    with pytest.raises(SystemExit, match="lm_head.weight differs"):
        convert.main(["--hf_dir", hf_dir, "--out_dir", str(tmp_path / "out")])


def test_existing_output_folders_are_never_overwritten(tied_hf_dir, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("user data")
    with pytest.raises(SystemExit, match="already exists"):
        convert.main(["--hf_dir", tied_hf_dir, "--out_dir", str(out_dir)])
    assert os.listdir(out_dir) == ["notes.txt"]
    fresh = str(tmp_path / "fresh")
    convert.main(["--hf_dir", tied_hf_dir, "--out_dir", fresh])
    with pytest.raises(SystemExit, match="already exists"):  # converting again into the same folder
        convert.main(["--hf_dir", tied_hf_dir, "--out_dir", fresh])
    with pytest.raises(SystemExit, match="already exists"):  # exporting over an existing HF folder
        convert.main(["--to_hf", "--hf_dir", tied_hf_dir, "--out_dir", fresh])
    assert sorted(os.listdir(tied_hf_dir)) == ["config.json", "generation_config.json", HF_SINGLE_FILE]


def test_qwen2_per_layer_sliding_window_is_refused():
    hf = dict(transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4,
                                       max_window_layers=1).to_dict())
    with pytest.raises(ValueError, match="layer_types"):
        llama_conversion.llama_config_from_hf(hf)
    hf_all = transformers.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert llama_conversion.llama_config_from_hf(hf_all.to_dict()).sliding_window == 4
    hf_off = transformers.Qwen2Config(**TINY, use_sliding_window=False, sliding_window=4, max_window_layers=0)
    assert llama_conversion.llama_config_from_hf(hf_off.to_dict()).sliding_window is None


def test_bfloat16_checkpoint_round_trips_in_bfloat16(tmp_path):
    """A bf16 source is read without torch (widened exactly) and written back in bf16 (--hf_dtype auto), bit for
    bit; --hf_dtype float32 writes the widened values."""
    from safetensors.torch import load_file as load_torch

    model = _hf_model("mistral_window").to(torch.bfloat16)
    hf_dir, out_dir = str(tmp_path / "hf"), str(tmp_path / "itjax")
    model.save_pretrained(hf_dir)
    convert.main(["--hf_dir", hf_dir, "--out_dir", out_dir])
    convert.main(["--to_hf", "--hf_dir", str(tmp_path / "bf16"), "--out_dir", out_dir])
    convert.main(["--to_hf", "--hf_dir", str(tmp_path / "fp32"), "--out_dir", out_dir, "--hf_dtype", "float32"])
    original = load_torch(os.path.join(hf_dir, HF_SINGLE_FILE))
    bf16 = load_torch(str(tmp_path / "bf16" / HF_SINGLE_FILE))
    fp32 = load_torch(str(tmp_path / "fp32" / HF_SINGLE_FILE))
    assert set(bf16) == set(fp32) == set(original)
    for name, tensor in original.items():
        assert tensor.dtype == bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], tensor), name
        assert fp32[name].dtype == torch.float32 and torch.equal(fp32[name], tensor.float()), name
    with open(tmp_path / "bf16" / folders.HF_CONFIG) as f:
        assert json.load(f)["dtype"] == "bfloat16"
