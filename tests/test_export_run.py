"""`python -m itjax.convert --from_run`: a fine-tuned run (full, or LoRA merged into its base) back to HF.

A tiny random HF Llama is converted, fine-tuned for a few steps on the quickstart mixture (fully, and with LoRA),
exported with the CLI and loaded with transformers: its logits equal itjax's for the trained weights; the LoRA
run's unmerged adapter loads with peft onto the original HF model with the same logits. The same holds for runs
that scan over layers (stacked parameters, loaded from the per-layer converted checkpoint, exported per layer).
"""

import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from two_tasks import TWO_TASKS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from itjax import convert, runs, train as train_lib  # noqa: E402
from itjax.peft.export import load_lora_run  # noqa: E402

TOKENS = np.random.RandomState(0).randint(2, 640, size=(2, 16))


@pytest.fixture(scope="module")
def hf_and_converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_run")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      bos_token_id=None, eos_token_id=1, pad_token_id=0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(root / "hf")
    convert.main(["--hf_dir", str(root / "hf"), "--out_dir", str(root / "converted")])
    return root


def _train(root, name, *extra):
    gin.clear_config()
    model_dir = str(root / name)
    assert train_lib.main([
        "--gin_file=quickstart_decoder.gin", f"--gin_file={root / 'converted' / 'model.gin'}", *TWO_TASKS, *extra,
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.train.initial_checkpoint_path='{root / 'converted'}'",
        "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8", "--gin.train.eval_period=0", "--gin.train.eval_num_examples=1",
        "--gin.train.eval_batch_size=8",
        "--gin.train.async_checkpointing=False", "--gin.cosine_decay_schedule.warmup_steps=1", "--no_progress"]) == 0
    return model_dir


def _hf_logits(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _itjax_logits(trainer_module):
    return np.asarray(trainer_module(jnp.asarray(TOKENS, jnp.int32)))


def _check_full_run_export(root, name, *extra):
    """Trains a full fine-tuning run, exports it with --from_run --to_hf; transformers' logits must equal itjax's.
    Returns the run's restored parameters."""
    from flax import nnx

    run = _train(root, name, *extra)
    convert.main(["--from_run", run, "--out_dir", str(root / f"{name}_out"), "--to_hf", "--hf_dir",
                  str(root / f"{name}_hf")])
    loaded = runs.load(run)
    params = jax.device_get(loaded.params)
    module = loaded.model.make_module(0)
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(module, state)
    exported = _hf_logits(root / f"{name}_hf")
    np.testing.assert_allclose(exported, _itjax_logits(module), atol=1e-4)
    assert np.abs(exported - _hf_logits(root / "hf")).max() > 1e-3  # training changed the model
    assert sorted(os.listdir(root / f"{name}_out")) == ["checkpoint", "generation_config.json", "hf_config.json",
                                                      "model.gin"]
    return params


def _check_lora_run_export(root, name, *extra):
    """Trains a LoRA run, exports it merged (--merge_lora --to_hf) and as a peft adapter (--peft_out): both give
    itjax's logits in transformers. Returns the run's (base, adapter)."""
    peft = pytest.importorskip("peft")
    import optax
    from itjax.partitioning import Partitioner
    from itjax.trainer import Trainer

    run = _train(root, name, *extra, "--gin_file=peft/lora.gin", "--gin.LoRA.rank=4")
    convert.main(["--merge_lora", run, "--out_dir", str(root / f"{name}_out"), "--peft_out",
                  str(root / f"{name}_adapter"), "--to_hf", "--hf_dir", str(root / f"{name}_hf")])
    base, adapter, lora, model = load_lora_run(run)
    trainer = Trainer(model, optax.sgd(0.0), Partitioner(devices=jax.devices()[:1]), peft=lora)
    trainer.base_params = base
    expected = _itjax_logits(trainer.module(adapter))
    merged = _hf_logits(root / f"{name}_hf")
    np.testing.assert_allclose(merged, expected, atol=1e-4)
    assert np.abs(merged - _hf_logits(root / "hf")).max() > 1e-4  # the adapter is not a no-op
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(base_hf, str(root / f"{name}_adapter")).eval()(
            torch.tensor(TOKENS)).logits
    np.testing.assert_allclose(adapted.numpy(), expected, atol=1e-4)
    return base, adapter


def test_full_fine_tuning_run_exports_to_hf(hf_and_converted):
    _check_full_run_export(hf_and_converted, "full")


def test_lora_run_exports_merged_and_as_peft_adapter(hf_and_converted):
    _check_lora_run_export(hf_and_converted, "lora")


def test_from_run_refuses_what_it_cannot_export(hf_and_converted, tmp_path):
    root = hf_and_converted
    with pytest.raises(SystemExit, match="is neither a training run's MODEL_DIR"):
        convert.main(["--from_run", str(tmp_path), "--out_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="already holds files|not empty"):
        convert.main(["--from_run", str(root / "full"), "--out_dir", str(root / "converted")])
    with pytest.raises(SystemExit, match="--merge_lora: .* is not a LoRA run"):
        convert.main(["--merge_lora", str(root / "full"), "--out_dir", str(tmp_path / "merged")])
    with pytest.raises(SystemExit, match="is an itjax.convert folder, not a training run"):
        convert.main(["--from_run", str(root / "converted"), "--out_dir", str(tmp_path / "from_converted")])
    with pytest.raises(SystemExit, match="has no checkpoint at step 7; its checkpoints are at steps"):
        convert.main(["--from_run", str(root / "full"), "--checkpoint_step", "7", "--out_dir", str(tmp_path / "o")])
    assert not any(os.path.exists(tmp_path / name) for name in ("merged", "from_converted", "o"))


def test_scanned_runs_export_to_hf(hf_and_converted):
    """Scanned full and LoRA runs start from the per-layer converted checkpoint (stacked on load) and export per
    layer: transformers' logits equal the scanned itjax model's, merged and through peft."""
    from itjax.models import scan

    scanned = ("--gin.LlamaConfig.scan_layers=True", "--gin.LlamaConfig.remat_policy='full'")
    assert scan.is_stacked(_check_full_run_export(hf_and_converted, "scan_full", *scanned))
    base, adapter = _check_lora_run_export(hf_and_converted, "scan_lora", *scanned)
    assert scan.is_stacked(base) and scan.is_stacked(adapter)
