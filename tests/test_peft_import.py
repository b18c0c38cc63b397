"""`python -m itjax.convert --peft_adapter DIR --hf_dir BASE --out_dir OUT`: a HF peft LoRA adapter imported onto
its converted base. Tiny random T5 v1.1 and Llama models get random (non-zero) peft LoRA adapters (a non-default
alpha; rsLoRA); the imported folder, loaded with `itjax.runs.load`, gives peft's logits. Bad adapters are refused
with nothing written, and a LoRA run continues from the imported adapter."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from itjax import convert, runs  # noqa: E402
from tiny_hf import tiny_hf_t5  # noqa: E402


def _t5(root):
    hf = tiny_hf_t5()
    hf.save_pretrained(str(root / "hf"))
    return hf


def _llama(root, **overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, **overrides})).eval()
    hf.save_pretrained(str(root))
    return hf


def _save_adapter(hf, lora_config, folder):
    """A peft LoRA adapter with random A and B (init_lora_weights=False: not a no-op), saved to `folder`."""
    torch.manual_seed(1)
    model = peft.get_peft_model(hf, lora_config).eval()
    model.save_pretrained(str(folder))
    return model


def test_t5_lora_adapter_imports_with_peft_logits(tmp_path):
    hf = _t5(tmp_path)
    adapted = _save_adapter(hf, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=7.0, init_lora_weights=False,
                                                target_modules=["q", "v", "o", "wi_0", "wo"]), tmp_path / "adapter")
    convert.main(["--peft_adapter", str(tmp_path / "adapter"), "--hf_dir", str(tmp_path / "hf"),
                  "--out_dir", str(tmp_path / "out")])
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, 96, (2, 10)).astype(np.int32)
    inputs[1, 7:] = 0
    decoder_inputs = np.pad(rng.integers(2, 96, (2, 5)).astype(np.int32), ((0, 0), (1, 0)))
    with torch.no_grad():
        theirs = adapted(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=torch.tensor(inputs > 0),
                         decoder_input_ids=torch.tensor(decoder_inputs, dtype=torch.long)).logits.numpy()
    loaded = runs.load(str(tmp_path / "out"))
    assert loaded.peft.rank == 4 and loaded.peft.alpha == 7.0  # peft's scaling alpha / r kept as is
    batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs}
    ours = np.asarray(loaded.model.logits(loaded.trainer.module(loaded.params), batch))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    with torch.no_grad(), adapted.disable_adapter():
        plain = adapted(input_ids=torch.tensor(inputs, dtype=torch.long), attention_mask=torch.tensor(inputs > 0),
                        decoder_input_ids=torch.tensor(decoder_inputs, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - plain).max() > 1e-2  # the imported adapter is not a no-op
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter", "adapter.gin", "checkpoint", "generation_config.json",
                                                    "model.gin", "peft_adapter_config.json"]


def test_llama_rslora_adapter_imports_with_peft_logits(tmp_path):
    hf = _llama(tmp_path / "hf")
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=4.0, use_rslora=True, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    adapted = _save_adapter(hf, config, tmp_path / "adapter")
    convert.main(["--peft_adapter", str(tmp_path / "adapter"), "--hf_dir", str(tmp_path / "hf"),
                  "--out_dir", str(tmp_path / "out")])
    tokens = np.random.default_rng(1).integers(2, 640, (2, 12))
    with torch.no_grad():
        theirs = adapted(input_ids=torch.tensor(tokens)).logits.numpy()
    loaded = runs.load(str(tmp_path / "out"))
    assert np.isclose(loaded.peft.scaling, 4.0 / np.sqrt(8))  # rsLoRA: alpha / sqrt(r)
    ours = np.asarray(loaded.trainer.module(loaded.params)(np.asarray(tokens, np.int32)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    scanned = runs.load(str(tmp_path / "out"), bindings=["LlamaConfig.scan_layers = True"])  # stacked on load
    assert scanned.model.config.scan_layers
    np.testing.assert_allclose(np.asarray(scanned.trainer.module(scanned.params)(np.asarray(tokens, np.int32))),
                               theirs, atol=1e-4, rtol=0)


def test_bad_adapters_are_refused_with_nothing_written(tmp_path):
    hf = _llama(tmp_path / "hf")
    _save_adapter(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "embed_tokens"]),
                  tmp_path / "embed")
    with pytest.raises(SystemExit, match=r"no LoRA layer for: \['model.embed_tokens'\]"):
        convert.main(["--peft_adapter", str(tmp_path / "embed"), "--hf_dir", str(tmp_path / "hf"),
                      "--out_dir", str(tmp_path / "out_embed")])
    other = _llama(tmp_path / "other_hf", hidden_size=32)
    _save_adapter(other, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["v_proj"]), tmp_path / "other")
    with pytest.raises(SystemExit, match=r"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight has shape "
                                         r"\(4, 32\), but the base model's layer layers.0.self_attn.v_proj needs"):
        convert.main(["--peft_adapter", str(tmp_path / "other"), "--hf_dir", str(tmp_path / "hf"),
                      "--out_dir", str(tmp_path / "out_other")])
    with open(tmp_path / "other" / "adapter_config.json") as f:
        dora = {**json.load(f), "use_dora": True}
    os.makedirs(tmp_path / "dora")
    os.link(tmp_path / "other" / "adapter_model.safetensors", tmp_path / "dora" / "adapter_model.safetensors")
    with open(tmp_path / "dora" / "adapter_config.json", "w") as f:
        json.dump(dora, f)
    with pytest.raises(SystemExit, match="use_dora"):
        convert.main(["--peft_adapter", str(tmp_path / "dora"), "--hf_dir", str(tmp_path / "hf"),
                      "--out_dir", str(tmp_path / "out_dora")])
    assert not any((tmp_path / name).exists() for name in ("out_embed", "out_other", "out_dora"))
    os.makedirs(tmp_path / "taken")
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already exists and is not empty"):
        convert.main(["--peft_adapter", str(tmp_path / "other"), "--hf_dir", str(tmp_path / "other_hf"),
                      "--out_dir", str(tmp_path / "taken")])
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]


def test_lora_run_continues_from_the_imported_adapter(tmp_path):
    """`itjax.train` with OUT/model.gin + OUT/adapter.gin and initial_checkpoint_path=OUT starts its LoRA adapter
    from the imported one (a fresh adapter would have B = 0), on OUT's base."""
    import gin
    import jax

    from itjax import train as train_lib

    hf = _llama(tmp_path / "hf")
    _save_adapter(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8.0, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj"]), tmp_path / "adapter")
    out = tmp_path / "out"
    convert.main(["--peft_adapter", str(tmp_path / "adapter"), "--hf_dir", str(tmp_path / "hf"), "--out_dir", str(out)])
    gin.clear_config()
    run = tmp_path / "run"
    assert train_lib.main([
        "--gin_file=quickstart_decoder.gin", f"--gin_file={out / 'model.gin'}", f"--gin_file={out / 'adapter.gin'}",
        f"--gin.MODEL_DIR='{run}'", f"--gin.train.initial_checkpoint_path='{out}'", "--gin.TRAIN_STEPS=1",
        "--gin.MIXTURE_OR_TASK_NAME='quickstart_copy_words'",  # one task: all 14 tasks' pipelines would dominate
        "--gin.BATCH_SIZE=8", "--gin.train.eval_period=0", "--gin.train.eval_num_examples=1",
        "--gin.train.eval_batch_size=8", "--gin.train.async_checkpointing=False",
        "--gin.cosine_decay_schedule.learning_rate=1e-3", "--gin.cosine_decay_schedule.warmup_steps=1",
        "--no_progress"]) == 0
    imported = jax.device_get(runs.load(str(out)).params)
    trained = runs.load(str(run))
    assert trained.step == 1 and trained.peft.rank == 4 and trained.peft.alpha == 8.0
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(jax.device_get(trained.params)), strict=True):
        assert np.abs(a).max() > 0.1  # imported lora_b is not the zeros a fresh adapter starts with
        np.testing.assert_allclose(b, a, atol=0.01 * np.abs(a).max())  # one small step away from the import
