"""QLoRA: LoRA on a frozen base stored in NF4 blocks or int8 channels (`LoRA.base_quantization`).

The quantizer is checked against an independent numpy round-to-nearest, the NF4 table against the published one;
the quantized model against LoRA on the dequantized float32 base; layout (8 fake devices, scan_layers), the saved
residuals of the backward pass, training, export and the refusals on the quickstart T5 / a tiny HF Llama.
Tests that compile a train or forward step are marked slow (the full suite runs them).
"""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from two_tasks import TWO_TASKS

from itjax import config as config_lib
from itjax import dry_run, param_paths
from itjax.data import pipeline
from itjax.partitioning import STANDARD_2D_RULES, Partitioner
from itjax.peft import LoRA, PeftConfigError, PromptTuning, quantization
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (registers the gin configurables)

LENGTHS = {"inputs": 112, "targets": 8}
BATCH = 8
ONE_DEVICE = jax.devices()[:1]

# QLoRA paper, Appendix E / bitsandbytes `create_normal_map()`: the NF4 data type's 16 values.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def _model(*bindings):
    gin.clear_config()
    config_lib.parse_gin(["quickstart.gin"], list(bindings))
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    gin.clear_config()
    return model


def _batch(vocab=640, inputs=LENGTHS["inputs"], targets=LENGTHS["targets"]):
    """A fixed random encoder-decoder batch (the loss must fall as the adapter fits it)."""
    rng = np.random.default_rng(0)
    target_tokens = rng.integers(2, vocab, (BATCH, targets), dtype=np.int32)
    return {"encoder_input_tokens": rng.integers(2, vocab, (BATCH, inputs), dtype=np.int32),
            "decoder_target_tokens": target_tokens,
            "decoder_input_tokens": np.concatenate([np.zeros((BATCH, 1), np.int32), target_tokens[:, :-1]], axis=1),
            "decoder_loss_weights": np.ones((BATCH, targets), np.int32)}


@pytest.fixture(scope="module")
def t5():
    return _model(), [_batch()] * 8


def _trainer(model, devices=ONE_DEVICE, partitioner=None, **lora):
    lora = {"rank": 4, "alpha": 8.0, "target_modules": ("q", "v", "wi_0", "wo"), **lora}
    trainer = Trainer(model, optax.adam(1e-2), partitioner or Partitioner(devices=devices), peft=LoRA(**lora))
    trainer.base_params = trainer.init_base_params()
    return trainer


def _train(trainer, batches):
    state, losses = trainer.init_state(), []
    for batch in batches:
        state, metrics = trainer.train_step(state, pipeline.to_global(batch, trainer.partitioner.batch_sharding))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


def _logits(trainer, params, base, batch):
    with trainer.partitioner.axis_rules():
        return np.asarray(jax.jit(lambda p, b, x: trainer.model.logits(trainer.module(p, b), x))(params, base, batch))


# ------------------------------------------------------------------------------------------------ quantizer
def test_nf4_table_equals_the_published_values():
    code = quantization.nf4_code()
    np.testing.assert_allclose(code, PUBLISHED_NF4, rtol=0, atol=1e-6)
    assert code[7] == 0.0 and code.dtype == np.float32


def _reference_nf4(w, block):
    """Independent numpy NF4: nearest published value of w / block absmax, per block of `block` rows."""
    rows, cols = w.shape
    blocks = w.reshape(rows // block, block, cols)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    table = np.asarray(PUBLISHED_NF4, np.float32)
    nearest = table[np.abs(blocks[..., None] / absmax[..., None] - table).argmin(-1)]
    return (nearest * absmax).reshape(rows, cols), absmax


def test_nf4_round_trip_is_nearest_code_and_packed():
    w = np.random.RandomState(0).standard_normal((256, 48)).astype(np.float32)
    arrays = quantization.quantize(jnp.asarray(w), 1, 1, "nf4", block_size=64, double=False)
    assert arrays["codes"].dtype == jnp.uint8 and arrays["codes"].shape == (128, 48)  # two codes per byte
    assert arrays["scales"].shape == (4, 48)
    back = np.asarray(quantization.dequantize(arrays, (256,), (48,), "nf4"))
    expected, absmax = _reference_nf4(w, 64)
    np.testing.assert_allclose(back, expected, rtol=0, atol=1e-6)
    # half the largest gap of the table (-1.0 -> -0.6962) times the block absmax bounds the error
    bound = 0.5 * np.diff(PUBLISHED_NF4).max() * np.repeat(absmax[:, 0], 64, axis=0)
    assert np.all(np.abs(back - w) <= bound + 1e-6)


def test_int8_round_trip_per_output_channel():
    w = np.random.RandomState(1).standard_normal((3, 40, 4, 8)).astype(np.float32)  # [L, in, heads, kv]
    arrays = quantization.quantize(jnp.asarray(w), 1, 2, "int8")
    assert arrays["codes"].dtype == jnp.int8 and arrays["scales"].shape == (3, 4, 8)
    back = np.asarray(quantization.dequantize(arrays, (40,), (4, 8), "int8"))
    absmax = np.abs(w).max(axis=1, keepdims=True)
    assert np.all(np.abs(back - w) <= absmax / 254 + 1e-6)
    np.testing.assert_allclose(np.abs(back).max(axis=1, keepdims=True), absmax, rtol=1e-6)


def test_double_quantization_bytes_and_error():
    w = jax.random.normal(jax.random.key(0), (512, 512))
    single = quantization.quantize(w, 1, 1, "nf4", block_size=64, double=False)
    double = quantization.quantize(w, 1, 1, "nf4", block_size=64, double=True)
    assert set(double) == {"codes", "scale_codes", "scale_scales", "scale_offset"}
    assert double["scale_codes"].dtype == jnp.int8 and double["scale_scales"].shape == (8, 2)  # groups of 256
    size = lambda arrays: sum(x.nbytes for x in arrays.values()) / w.size  # noqa: E731
    assert size(single) == pytest.approx(0.5625)
    assert size(double) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256) + 4 / w.size)  # 0.516
    scales = np.asarray(quantization._dequantize_scales(double))
    second = np.repeat(np.asarray(double["scale_scales"]), 256, axis=-1)
    assert np.all(np.abs(scales - np.asarray(single["scales"])) <= second / 254 + 1e-6)
    error = lambda arrays: float(jnp.abs(quantization.dequantize(arrays, (512,), (512,), "nf4") - w).mean())  # noqa
    assert error(double) < 1.01 * error(single)


# ------------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def nf4_run(t5):
    """A QLoRA (nf4) run of 8 steps on the quickstart T5: (trainer, base before, state, losses)."""
    model, batches = t5
    trainer = _trainer(model, base_quantization="nf4")
    before = jax.device_get(trainer.base_params)
    state, losses = _train(trainer, batches)
    return trainer, before, state, losses


@pytest.mark.slow  # trains / compiles the model (the fast tier keeps the unit tests)
def test_quantized_base_trains_only_the_adapter(nf4_run):
    trainer, before, state, losses = nf4_run
    assert losses[-1] < losses[0] - 0.3, losses
    layer = trainer.base_params["encoder"]["layers"][0]
    assert layer["attention"]["q"]["qkernel"]["codes"].dtype == jnp.uint8  # adapted layer: quantized base
    assert layer["attention"]["k"]["qkernel"]["codes"].dtype == jnp.uint8  # untargeted layer: quantized too
    assert "kernel" in trainer.base_params["lm_head"]  # the output layer stays float32
    adapter_leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    assert {str(path[-1].key) for path, _ in adapter_leaves} == {"lora_a", "lora_b"}
    assert all(np.abs(np.asarray(x)).max() > 0 for path, x in adapter_leaves if path[-1].key == "lora_b")
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(trainer.base_params))):
        np.testing.assert_array_equal(a, b)  # the frozen base is untouched
    kernel_bytes, count = quantization.quantized_kernel_bytes(trainer.base_params, trainer.abstract_plain_base_params)
    assert kernel_bytes / count == pytest.approx(0.5 + 1 / 64, abs=0.01)


@pytest.mark.slow  # trains / compiles the model (the fast tier keeps the unit tests)
def test_quantized_layer_equals_lora_on_the_dequantized_base(t5, nf4_run):
    model, batches = t5
    trainer, _, state, _ = nf4_run
    plain = quantization.plain_base_params(trainer, state["params"])
    reference = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE),
                        peft=LoRA(rank=4, alpha=8.0, target_modules=("q", "v", "wi_0", "wo")))
    assert jax.tree.structure(plain) == jax.tree.structure(reference.abstract_base_params)
    batch = pipeline.to_global(batches[0], trainer.partitioner.batch_sharding)
    got = _logits(trainer, state["params"], trainer.base_params, batch)
    expected = _logits(reference, state["params"], plain, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 reassociation only
    original = jax.device_get(trainer.init_plain_base_params())  # the float32 base it was quantized from
    kernel = original["encoder"]["layers"][0]["attention"]["q"]["kernel"]
    assert 0 < np.abs(plain["encoder"]["layers"][0]["attention"]["q"]["kernel"] - kernel).max() < 0.2 * np.abs(
        kernel).max()


@pytest.mark.parametrize("fmt,scan", [("int8", False), ("nf4", True)])
def test_backward_keeps_no_full_precision_base_kernel(fmt, scan, monkeypatch):
    """The dry run's saved residuals of the train loss hold no float array shaped like a base kernel (in a
    scan_layers stack: like the stacked kernel, one per scanned layer)."""
    model = _model(f"T5Config.scan_layers = {scan}")
    trainer = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE),
                      peft=LoRA(rank=4, alpha=8.0, base_quantization=fmt))
    batch = dry_run.abstract_batch(model.feature_converter(pack=False), LENGTHS, BATCH,
                                   trainer.partitioner.batch_sharding)
    kernels = {tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(trainer.abstract_plain_base_params)[0]
               if path[-1].key == "kernel" and path[0].key != "lm_head"}

    def kernel_copies():
        return [r for r in dry_run.train_residuals(trainer, batch)
                if tuple(r.shape) in kernels and jnp.issubdtype(r.dtype, jnp.floating)]
    assert kernel_copies() == []
    # The check can fail: without the checkpoint around dequantize + matmul the dequantized kernels are kept.
    monkeypatch.setattr(quantization.jax, "checkpoint", lambda f, **kwargs: f)
    assert len(kernel_copies()) >= 4


@pytest.mark.slow  # trains / compiles the model (the fast tier keeps the unit tests)
def test_sharded_and_scanned_base_holds_whole_blocks(t5, nf4_run):
    model, batches = t5
    trainer, _, state, _ = nf4_run
    scanned = _model("T5Config.scan_layers = True")
    mesh = Partitioner(devices=jax.devices(), data=2, fsdp=2, tensor=2, logical_axis_rules=STANDARD_2D_RULES)
    sharded = _trainer(scanned, partitioner=mesh, base_quantization="nf4")
    q = sharded.base_params["encoder"]["layers"]["attention"]["q"]["qkernel"]
    # [L, embed/2 codes, heads, kv], embed over fsdp (2), heads over tensor (2): 32 bytes = one 64-input block each
    assert q["codes"].shape == (2, 64, 4, 32)
    assert q["codes"].sharding.shard_shape(q["codes"].shape) == (2, 32, 2, 32)
    assert q["scale_codes"].sharding.shard_shape(q["scale_codes"].shape) == (2, 1, 2, 32)
    o = sharded.base_params["encoder"]["layers"]["attention"]["o"]["qkernel"]  # [L, heads*kv/2, embed]: 2 heads
    assert o["codes"].sharding.shard_shape(o["codes"].shape) == (2, 32, 64)
    # The stacked, sharded quantized base is the per-layer one (same seed) stacked; so is the model's output.
    stacked = param_paths.stack_layers(jax.device_get(trainer.base_params), stack=np.stack)
    jax.tree.map(np.testing.assert_array_equal, stacked, jax.device_get(sharded.base_params))
    batch = pipeline.to_global(batches[0], mesh.batch_sharding)
    zero = jax.tree.map(jnp.zeros_like, state["params"])  # lora_b = 0: the quantized base model alone
    sharded_zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sharded.abstract_state["params"])
    np.testing.assert_allclose(_logits(sharded, sharded_zero, sharded.base_params, batch),
                               _logits(trainer, zero, trainer.base_params,
                                       pipeline.to_global(batches[0], trainer.partitioner.batch_sharding)),
                               rtol=1e-5, atol=1e-5)
    four_way = Partitioner(devices=jax.devices(), data=1, fsdp=4, tensor=2, logical_axis_rules=STANDARD_2D_RULES)
    with pytest.raises(PeftConfigError, match="quantization_block_size"):
        Trainer(scanned, optax.adam(1e-2), four_way, peft=LoRA(base_quantization="nf4"))


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_quantization_settings_are_refused(t5):
    model, _ = t5
    with pytest.raises(PeftConfigError, match=r"LoRA.base_quantization='nf3'"):
        LoRA(base_quantization="nf3")
    with pytest.raises(PeftConfigError, match="LoRA.double_quantization=True applies to .*'nf4' only"):
        LoRA(base_quantization="int8", double_quantization=True)
    with pytest.raises(PeftConfigError, match=r"layer .*layers.0.*attention.o contracts over 128 inputs .*"
                                              r"LoRA.quantization_block_size=48"):
        Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE),
                peft=LoRA(base_quantization="nf4", quantization_block_size=48, target_modules=("o",)))


def test_quantization_bound_for_another_method_is_refused():
    gin.clear_config()
    config_lib.parse_gin(["quickstart.gin", "peft/qlora.gin", "peft/prompt_tuning.gin"], [])
    try:
        with pytest.raises(PeftConfigError, match=r"LoRA.base_quantization = 'nf4' is bound but train.peft = "
                                                  r"PromptTuning.*LoRA only"):
            quantization.check_quantization_bindings(PromptTuning())
        quantization.check_quantization_bindings(LoRA(base_quantization="nf4"))  # accepted
    finally:
        gin.clear_config()
    with pytest.raises(config_lib.ConfigError, match="PromptTuning.base_quantization"):
        config_lib.parse_gin(["quickstart.gin", "peft/prompt_tuning.gin"], ["PromptTuning.base_quantization = 'nf4'"])


# ------------------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_qlora_run_exports_merged_and_as_peft_adapter(tmp_path):
    """A QLoRA run on a converted tiny HF Llama: --merge_lora gives the dequantized base plus the update (HF logits
    equal itjax's QLoRA model's); --peft_out's adapter loads with peft onto the float32 HF base and equals itjax's
    LoRA on the float32 base."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from itjax import convert, runs, train as train_lib

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      bos_token_id=None, eos_token_id=1, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    convert.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "converted")])
    run = str(tmp_path / "run")
    assert train_lib.main([
        "--gin_file=quickstart_decoder.gin", f"--gin_file={tmp_path / 'converted' / 'model.gin'}",
        "--gin_file=peft/qlora.gin", "--gin.LoRA.rank=4",
        *TWO_TASKS,
        f"--gin.MODEL_DIR='{run}'", f"--gin.train.initial_checkpoint_path='{tmp_path / 'converted'}'",
        "--gin.TRAIN_STEPS=3", "--gin.BATCH_SIZE=8", "--gin.train.eval_period=0", "--gin.train.eval_num_examples=1",
        "--gin.train.eval_batch_size=8", "--gin.train.async_checkpointing=False",
        "--gin.cosine_decay_schedule.warmup_steps=1", "--no_progress"]) == 0
    convert.main(["--merge_lora", run, "--out_dir", str(tmp_path / "out"), "--peft_out", str(tmp_path / "adapter"),
                  "--to_hf", "--hf_dir", str(tmp_path / "merged_hf")])
    tokens = np.random.RandomState(0).randint(2, 640, size=(2, 16))
    loaded = runs.load(run)
    assert loaded.peft.base_quantization == "nf4" and loaded.trainer.base_is_transformed
    qlora = np.asarray(loaded.trainer.module(loaded.params)(jnp.asarray(tokens, jnp.int32)))
    fp32 = Trainer(loaded.model, optax.identity(), Partitioner(devices=ONE_DEVICE),
                   peft=LoRA(rank=4, alpha=loaded.peft.alpha))
    fp32.base_params = runs.load(str(tmp_path / "converted")).params
    on_fp32 = np.asarray(fp32.module(loaded.params)(jnp.asarray(tokens, jnp.int32)))

    def hf(folder):
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        merged = hf(tmp_path / "merged_hf")(torch.tensor(tokens)).logits.numpy()
        adapted = peft.PeftModel.from_pretrained(hf(tmp_path / "hf"), str(tmp_path / "adapter")).eval()(
            torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(merged, qlora, atol=1e-4)
    np.testing.assert_allclose(adapted, on_fp32, atol=1e-4)
    assert np.abs(qlora - on_fp32).max() > 1e-4  # the two bases differ by the quantization error
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["r"] == 4
    assert os.path.isdir(tmp_path / "out" / "checkpoint")
