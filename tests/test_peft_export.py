"""Adapter export: an itjax LoRA adapter saved with `save_peft_adapter`, and prompt tuning / (IA)3 / prefix tuning
adapters saved with `save_method_adapter`, load with HF `peft` onto the transformers model (tiny random T5 v1.1 and
Llama, converted to itjax with itjax's own HF conversion) and give the same logits."""

import copy
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from two_tasks import TWO_TASKS
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from itjax import param_paths  # noqa: E402
from itjax.conversion import folders  # noqa: E402
from itjax.conversion import t5 as t5_conversion  # noqa: E402
from itjax.conversion.llama import llama_config_from_hf, params_from_hf_state_dict  # noqa: E402
from itjax.models.encoder_decoder import EncoderDecoderModel  # noqa: E402
from itjax.models.llama import Llama  # noqa: E402
from itjax.peft import IA3, AdapterParam, LoRA, PrefixTuning, PromptTuning, merge_lora  # noqa: E402
from itjax.peft.core import PeftConfigError  # noqa: E402
from itjax.peft.export import ADAPTER_CONFIG, save_peft_adapter  # noqa: E402
from tiny_hf import tiny_hf_t5  # noqa: E402
from itjax.peft.export_methods import save_method_adapter  # noqa: E402

T5_TARGETS = ("q", "k", "v", "o", "wi_0", "wi_1", "wo")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomise_adapter(module, seed):
    """LoRA B starts at zero (a no-op); give A and B random values so the parity test sees a real update."""
    state = nnx.state(module, AdapterParam)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, values))
    nnx.update(module, state)
    return nnx.to_pure_dict(nnx.state(module, AdapterParam))


def _base(module):
    return nnx.to_pure_dict(nnx.split(module, AdapterParam, nnx.Param)[2])


def _peft_logits(hf_model, adapter_dir, **inputs):
    model = peft.PeftModel.from_pretrained(hf_model, adapter_dir).eval()
    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()


def test_t5_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    hf = tiny_hf_t5()
    with torch.no_grad():
        hf.lm_head.weight = torch.nn.Parameter(torch.randn(96, 32) * 32**-0.5)
    hf.save_pretrained(str(tmp_path / "hf"))
    t5_conversion.hf_to_itjax(str(tmp_path / "hf"), str(tmp_path / "itjax"))
    config = t5_conversion.t5_config_from_gin(str(tmp_path / "itjax" / folders.MODEL_GIN))
    model = EncoderDecoderModel(config)
    module = model.make_module(0)
    nnx.update(module, t5_conversion.load_params(str(tmp_path / "itjax")))
    lora = LoRA(rank=4, alpha=8.0, target_modules=T5_TARGETS)
    lora.apply(module, nnx.Rngs(params=1))
    adapter = _randomise_adapter(module, 2)

    rng = np.random.default_rng(0)
    inputs = rng.integers(2, 96, (2, 10)).astype(np.int32)
    inputs[1, 7:] = 0
    targets = rng.integers(2, 96, (2, 6)).astype(np.int32)
    decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    batch = {"encoder_input_tokens": inputs, "decoder_input_tokens": decoder_inputs}
    ours = np.asarray(model.logits(module, batch))

    save_peft_adapter(str(tmp_path / "adapter"), adapter, lora)
    with open(tmp_path / "adapter" / ADAPTER_CONFIG) as f:
        assert json.load(f)["task_type"] == "SEQ_2_SEQ_LM"
    theirs = _peft_logits(hf, str(tmp_path / "adapter"), input_ids=inputs, attention_mask=(inputs > 0).astype(np.int64),
                          decoder_input_ids=decoder_inputs)
    without_lora = np.asarray(model.logits(EncoderDecoderModel(config).make_module(0), batch))
    assert np.abs(ours - without_lora).max() > 1e-2  # the adapter changes the outputs
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # Merged into the base weights, the plain model gives the same logits.
    merged_module = model.make_module(0)
    nnx.update(merged_module, merge_lora(_base(module), adapter, alpha=lora.alpha))
    np.testing.assert_allclose(np.asarray(model.logits(merged_module, batch)), ours, atol=1e-4, rtol=0)


def test_llama_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    config = llama_config_from_hf(hf.config.to_dict())
    module = Llama(config, rngs=nnx.Rngs(0))
    nnx.update(module, params_from_hf_state_dict({k: v.numpy() for k, v in hf.state_dict().items()}, config))
    lora = LoRA(rank=4, alpha=16.0, target_modules=LLAMA_TARGETS)
    lora.apply(module, nnx.Rngs(params=1))
    adapter = _randomise_adapter(module, 3)
    tokens = np.random.default_rng(1).integers(1, 128, (2, 12)).astype(np.int32)
    ours = np.asarray(module(tokens))

    save_peft_adapter(str(tmp_path / "adapter"), adapter, lora)
    with open(tmp_path / "adapter" / ADAPTER_CONFIG) as f:
        config_json = json.load(f)
    assert config_json["task_type"] == "CAUSAL_LM" and config_json["target_modules"] == sorted(LLAMA_TARGETS)
    theirs = _peft_logits(hf, str(tmp_path / "adapter"), input_ids=tokens.astype(np.int64))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert os.path.getsize(tmp_path / "adapter" / "adapter_model.safetensors") < 200_000


# ------------------------------------------------------------------------ prompt tuning, (IA)3, prefix tuning
def _tiny_t5(tmp_path):
    """(HF T5, itjax EncoderDecoderModel, a factory of itjax modules holding the converted HF weights)."""
    hf = tiny_hf_t5()
    hf.save_pretrained(str(tmp_path / "hf"))
    t5_conversion.hf_to_itjax(str(tmp_path / "hf"), str(tmp_path / "itjax"))
    config = t5_conversion.t5_config_from_gin(str(tmp_path / "itjax" / folders.MODEL_GIN))
    model = EncoderDecoderModel(config)
    params = t5_conversion.load_params(str(tmp_path / "itjax"))

    def make():
        module = model.make_module(0)
        nnx.update(module, params)
        return module
    return hf, model, make


def _t5_batch():
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, 96, (2, 10)).astype(np.int32)
    inputs[1, 7:] = 0
    targets = rng.integers(2, 96, (2, 6)).astype(np.int32)
    return {"encoder_input_tokens": inputs, "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0)))}


def _t5_peft_logits(hf, adapter_dir, batch):
    inputs = batch["encoder_input_tokens"]
    return _peft_logits(copy.deepcopy(hf), adapter_dir, input_ids=inputs,
                        attention_mask=(inputs > 0).astype(np.int64), decoder_input_ids=batch["decoder_input_tokens"])


def _tiny_llama():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    config = llama_config_from_hf(hf.config.to_dict())
    params = params_from_hf_state_dict({k: v.numpy() for k, v in hf.state_dict().items()}, config)

    def make(scan=False):
        """scan: a `scan_layers` model (stacked layers), whose adapter export must unstack."""
        module = Llama(dataclasses.replace(config, scan_layers=scan), rngs=nnx.Rngs(0))
        nnx.update(module, param_paths.stack_layers(params, stack=np.stack) if scan else params)
        return module
    return hf, config, make


LLAMA_TOKENS = np.random.default_rng(1).integers(1, 128, (2, 12)).astype(np.int32)


@pytest.mark.parametrize("method", ["prompt", "ia3"])
def test_t5_prompt_and_ia3_adapters_load_in_peft_with_the_same_logits(tmp_path, method):
    hf, model, make = _tiny_t5(tmp_path)
    module = make()
    peft_method = PromptTuning(length=3, init="uniform") if method == "prompt" else IA3()
    peft_method.apply(module, nnx.Rngs(params=1))
    adapter = _randomise_adapter(module, 2)
    batch = _t5_batch()
    ours = np.asarray(model.logits(module, batch))
    assert np.abs(ours - np.asarray(model.logits(make(), batch))).max() > 1e-2  # the adapter changes the outputs
    save_method_adapter(str(tmp_path / "adapter"), adapter, peft_method, model.config)
    with open(tmp_path / "adapter" / ADAPTER_CONFIG) as f:
        saved = json.load(f)
    assert saved["task_type"] == "SEQ_2_SEQ_LM"
    if method == "prompt":
        assert saved["num_transformer_submodules"] == 1 and saved["num_virtual_tokens"] == 3
    else:  # peft's own T5 default: k, v (self- and cross-attention) and the feed-forward wo
        assert saved["target_modules"] == ["k", "v", "wo"] and saved["feedforward_modules"] == ["wo"]
    np.testing.assert_allclose(ours, _t5_peft_logits(hf, str(tmp_path / "adapter"), batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "ia3", "ia3_scan", "prefix", "prefix_scan", "prefix_mlp"])
def test_llama_prompt_ia3_and_prefix_adapters_load_in_peft_with_the_same_logits(tmp_path, method):
    hf, config, make = _tiny_llama()
    module = make(scan=method.endswith("_scan"))
    peft_method = {"prompt": PromptTuning(length=3, init="uniform"), "ia3": IA3(), "ia3_scan": IA3(),
                   "prefix": PrefixTuning(length=4), "prefix_scan": PrefixTuning(length=4),
                   "prefix_mlp": PrefixTuning(length=4, reparameterize=True, hidden_size=16)}[method]
    peft_method.apply(module, nnx.Rngs(params=1))
    adapter = _randomise_adapter(module, 3)
    ours = np.asarray(module(LLAMA_TOKENS))
    assert np.abs(ours - np.asarray(make()(LLAMA_TOKENS))).max() > 1e-2
    save_method_adapter(str(tmp_path / "adapter"), adapter, peft_method, config)
    theirs = _peft_logits(copy.deepcopy(hf), str(tmp_path / "adapter"), input_ids=LLAMA_TOKENS.astype(np.int64))
    if method == "prompt":  # peft returns the virtual tokens' logits too; itjax drops them
        theirs = theirs[:, 3:]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_exports_peft_cannot_represent_are_refused(tmp_path):
    _, model, make = _tiny_t5(tmp_path)
    module = make()
    prefix = PrefixTuning(length=2)
    prefix.apply(module, nnx.Rngs(params=1))
    with pytest.raises(PeftConfigError, match="prefix tuning on T5 does not export to peft.*cross-attention"):
        save_method_adapter(str(tmp_path / "t5_prefix"), nnx.to_pure_dict(nnx.state(module, AdapterParam)),
                            prefix, model.config)
    _, config, make_llama = _tiny_llama()
    module = make_llama()
    prompt = PromptTuning(length=2, position="after_bos", init="uniform")
    prompt.apply(module, nnx.Rngs(params=1))
    with pytest.raises(PeftConfigError, match="position='after_bos'"):
        save_method_adapter(str(tmp_path / "after_bos"), nnx.to_pure_dict(nnx.state(module, AdapterParam)),
                            prompt, config)
    assert not (tmp_path / "t5_prefix").exists() and not (tmp_path / "after_bos").exists()


def test_ia3_run_exports_adapter_and_base_with_the_cli(tmp_path):
    """`itjax.convert --from_run RUN --peft_out ADAPTER --out_dir OUT --to_hf --hf_dir HF` on an (IA)3 run: OUT / HF
    hold the frozen base, ADAPTER loads with peft onto it and gives the run's logits."""
    import gin

    from itjax import convert, runs
    from itjax import train as train_lib

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None, eos_token_id=1,
        pad_token_id=0)).save_pretrained(str(tmp_path / "hf"))
    convert.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "converted")])
    gin.clear_config()
    run = tmp_path / "run"
    assert train_lib.main([
        "--gin_file=quickstart_decoder.gin", f"--gin_file={tmp_path / 'converted' / 'model.gin'}",
        "--gin_file=peft/ia3.gin", f"--gin.MODEL_DIR='{run}'",
        *TWO_TASKS,
        f"--gin.train.initial_checkpoint_path='{tmp_path / 'converted'}'", "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8", "--gin.train.eval_period=0", "--gin.train.eval_num_examples=1",
        "--gin.train.eval_batch_size=8", "--gin.train.async_checkpointing=False",
        "--gin.cosine_decay_schedule.warmup_steps=1", "--no_progress"]) == 0
    convert.main(["--from_run", str(run), "--out_dir", str(tmp_path / "out"), "--peft_out", str(tmp_path / "adapter"),
                  "--to_hf", "--hf_dir", str(tmp_path / "out_hf")])
    loaded = runs.load(str(run))
    tokens = np.random.default_rng(2).integers(2, 640, (2, 16))
    ours = np.asarray(loaded.trainer.module(loaded.params)(np.asarray(tokens, np.int32)))

    def hf_logits(folder):
        with torch.no_grad():
            return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(
                torch.tensor(tokens)).logits.numpy()
    plain = hf_logits(str(tmp_path / "hf"))
    np.testing.assert_allclose(hf_logits(str(tmp_path / "out_hf")), plain, atol=1e-5)  # --out_dir: the frozen base
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out_hf"), dtype=torch.float32).eval()
    np.testing.assert_allclose(ours, _peft_logits(base, str(tmp_path / "adapter"), input_ids=tokens), atol=1e-4,
                               rtol=0)
    assert np.abs(ours - plain).max() > 1e-4  # training moved the (IA)3 vectors off ones
