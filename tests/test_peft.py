"""Parameter-efficient tuning (itjax.peft) through the Trainer: LoRA, prompt tuning, (IA)3, prefix tuning.

Tiny models (the quickstart T5 and the quickstart Llama), a handful of steps, compiled once per module fixture.
"""

import os

import gin
import jax
import numpy as np
import optax
import pytest
from two_tasks import TWO_TASKS
from flax import nnx

from itjax import checkpoints
from itjax import config as config_lib
from itjax.checkpoints import CheckpointMismatchError, Checkpointer, restore_peft_base
from itjax.data import pipeline
from itjax.partitioning import Partitioner
from itjax.peft import IA3, LoRA, PeftConfigError, PrefixTuning, PromptTuning, merge_lora
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (registers the gin configurables)

LENGTHS = {"inputs": 112, "targets": 8}
BATCH = 8
STEPS = 6


def _model(gin_file, *bindings):
    gin.clear_config()
    config_lib.parse_gin([gin_file], list(bindings))
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    gin.clear_config()
    return model


def _batches(model, n=STEPS):
    ds = pipeline.train_dataset("quickstart", LENGTHS, BATCH, model.feature_converter_cls(pack=False), seed=0)
    it = pipeline.numpy_batches(ds)
    return [next(it) for _ in range(n)]


def _train(trainer, batches, state=None):
    state = trainer.init_state() if state is None else state
    losses = []
    for batch in batches:
        state, metrics = trainer.train_step(state, pipeline.to_global(batch, trainer.partitioner.batch_sharding))
        losses.append(float(metrics["loss"]))
    return state, np.array(losses)


def _logits(trainer, params, batch, base=None):
    with trainer.partitioner.axis_rules():
        return np.asarray(jax.jit(lambda p, b, x: trainer.model.logits(trainer.module(p, b), x))(
            params, trainer.base_params if base is None else base, batch))


ONE_DEVICE = jax.devices()[:1]


@pytest.fixture(scope="module")
def t5():
    model = _model("quickstart.gin")
    return model, _batches(model)


@pytest.fixture(scope="module")
def llama():
    model = _model("quickstart_decoder.gin")
    return model, _batches(model)


@pytest.fixture(scope="module")
def lora_t5(t5):
    """A LoRA run on the quickstart T5: trainer, base before training, state after STEPS steps, losses."""
    model, batches = t5
    trainer = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE),
                      peft=LoRA(rank=4, alpha=8.0, target_modules=("q", "k", "v", "o", "wi_0", "wi_1", "wo")))
    trainer.base_params = trainer.init_base_params()
    base_before = jax.device_get(trainer.base_params)
    initial = trainer.init_state()
    initial_logits = _logits(trainer, initial["params"], batches[0])
    state, losses = _train(trainer, batches, initial)
    return trainer, base_before, initial_logits, state, losses


def test_lora_step_zero_is_the_base_model_exactly(t5, lora_t5):
    model, batches = t5
    trainer, base, initial_logits, _, _ = lora_t5
    plain = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE))
    np.testing.assert_array_equal(initial_logits, _logits(plain, base, batches[0]))


def test_lora_trains_only_the_adapter(lora_t5):
    trainer, base_before, _, state, losses = lora_t5
    assert losses[-1] < losses[0] - 0.5, losses
    # The frozen base is bit-identical after training.
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(trainer.base_params))):
        np.testing.assert_array_equal(before, after)
    # The train state holds only lora_a / lora_b: 7 layer types x 4 layers (2 enc + 2x2 dec attn... counted below).
    names = {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert names == {"lora_a", "lora_b"}
    adapter_size = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert trainer.num_trainable_params == adapter_size
    assert adapter_size < 0.1 * trainer.num_params
    # Adam's state is two moments per adapter weight (+ a step count): proportional to the adapter, not the model.
    opt_leaves = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(x.size for x in opt_leaves) == 2 * adapter_size
    assert trainer.optimizer_state_bytes <= 2 * adapter_size * 4 + 64
    assert "trainable" in trainer.summary() and f"{trainer.num_params:,}" in trainer.summary()


def test_adapter_checkpoint_restores_the_trained_outputs_exactly(t5, lora_t5, tmp_path):
    model, batches = t5
    trainer, _, _, state, _ = lora_t5
    expected = _logits(trainer, state["params"], batches[0])
    checkpointer = Checkpointer(str(tmp_path), period=1, use_async=False)
    checkpointer.base_pointer = {"path": None, "seed": trainer.seed,
                                 "fingerprint": checkpoints.base_fingerprint(trainer.base_params)}
    checkpointer.save(STEPS, state, {"batches_consumed": STEPS})
    checkpointer.close()
    # Only the adapter is on disk: the checkpoint is a small fraction of the model's 3.8 MB.
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs)
    assert size < 1_000_000

    fresh = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE), peft=trainer.peft)
    reader = Checkpointer(str(tmp_path), period=1, use_async=False)
    pointer = reader.saved_base_pointer(STEPS)
    restore_peft_base(fresh, None, pointer)
    restored, _ = reader.restore(STEPS, fresh.abstract_state)
    reader.close()
    np.testing.assert_array_equal(_logits(fresh, restored["params"], batches[0]), expected)


def test_adapter_onto_a_base_of_another_shape_is_refused(lora_t5):
    trainer, _, _, _, _ = lora_t5
    pointer = {"path": None, "seed": 0, "fingerprint": checkpoints.base_fingerprint(trainer.base_params)}
    other = Trainer(_model("quickstart.gin", "itjax.models.T5Config.d_ff = 64"), optax.adam(1e-2),
                    Partitioner(devices=ONE_DEVICE), peft=trainer.peft)
    with pytest.raises(CheckpointMismatchError, match=r"encoder/layers/0/mlp/wi_0/kernel: adapter's base shape "
                                                      r"\(128, 256\) != this base \(128, 64\)"):
        restore_peft_base(other, None, pointer)
    # Same shapes, other values (another seed): refused too.
    pointer["fingerprint"]["shared/embedding"]["abs_sum"] *= 1.01
    with pytest.raises(CheckpointMismatchError, match="shared/embedding: same shape, different values"):
        restore_peft_base(Trainer(trainer.model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE),
                                  peft=trainer.peft), None, pointer)


def test_merged_lora_is_a_plain_model_with_the_same_outputs(t5, lora_t5):
    model, batches = t5
    trainer, _, _, state, _ = lora_t5
    merged = merge_lora(trainer.base_params, state["params"], alpha=trainer.peft.alpha)
    plain = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE))
    np.testing.assert_allclose(_logits(plain, merged, batches[0]), _logits(trainer, state["params"], batches[0]),
                               atol=2e-4, rtol=1e-4)


def test_lora_on_llama_trains_with_family_default_targets(llama):
    model, batches = llama
    trainer = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE), peft=LoRA(rank=4, dropout=0.1))
    state, losses = _train(trainer, batches)
    names = {tuple(k.key for k in path[-2:]) for path, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert names == {("q_proj", "lora_a"), ("q_proj", "lora_b"), ("v_proj", "lora_a"), ("v_proj", "lora_b")}
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("method, message", [
    (LoRA(target_modules=("q", "query")), r"LoRA.target_modules=\['q', 'query'\]: \['query'\] match no layer of "
                                          r"T5; available names: \['k', 'lm_head', 'o', 'q', 'v', 'wi_0', 'wi_1', "
                                          r"'wo'\]"),
    (LoRA(rank=200, target_modules=("wo",)), r"LoRA.rank=200 is larger than layer decoder.layers.0.mlp.wo allows "
                                             r"\(256 inputs -> 128 outputs\); use LoRA.rank <= 128"),
])
def test_bad_lora_settings_are_named(t5, method, message):
    model, _ = t5
    with pytest.raises(PeftConfigError, match=message):
        Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE), peft=method)


LAYOUTS = {
    "partitioning/data_parallel.gin": [],
    "partitioning/fsdp.gin": [],
    # The quickstart model has 4 heads: tensor parallel over 4 devices, data parallel over the other 2.
    "partitioning/tensor_parallel.gin": ["Partitioner.data = -1", "Partitioner.tensor = 4"],
}


def _layout_trainer(layout, model, method):
    gin.clear_config()
    config_lib.parse_gin(["quickstart.gin", layout], LAYOUTS[layout])
    partitioner = gin.get_configurable(Partitioner)()
    gin.clear_config()
    return Trainer(model, optax.adam(1e-2), partitioner, peft=method)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_lora_layouts_on_8_devices_reproduce_1_device(layout, t5, lora_t5):
    model, batches = t5
    reference = lora_t5[4][:3]
    trainer = _layout_trainer(layout, model, lora_t5[0].peft)
    assert trainer.partitioner.mesh.size == 8
    _, losses = _train(trainer, batches[:3])
    np.testing.assert_allclose(losses, reference, atol=1e-4, rtol=0)


def test_adapter_params_carry_logical_axes(t5, lora_t5):
    model, _ = t5
    method = lora_t5[0].peft
    fsdp = _layout_trainer("partitioning/fsdp.gin", model, method).param_shardings
    q = fsdp["encoder"]["layers"][0]["attention"]["q"]
    assert q["lora_a"].shard_shape((128, 4)) == (16, 4)  # 'embed' split 8 ways over fsdp
    assert q["lora_b"].shard_shape((4, 4, 32)) == (4, 4, 32)
    tensor = _layout_trainer("partitioning/tensor_parallel.gin", model, method).param_shardings
    q = tensor["encoder"]["layers"][0]["attention"]["q"]
    assert q["lora_b"].shard_shape((4, 4, 32)) == (4, 1, 32)  # 'heads' over tensor=4
    assert tensor["encoder"]["layers"][0]["mlp"]["wo"]["lora_a"].shard_shape((256, 4)) == (64, 4)  # 'mlp'


METHODS = {
    "prompt_tuning": lambda: PromptTuning(length=8, init="vocab"),
    "prompt_tuning_after_bos": lambda: PromptTuning(length=8, position="after_bos", init="uniform"),
    "ia3": lambda: IA3(),
    "prefix_tuning": lambda: PrefixTuning(length=4, init_scale=0.5),
    "prefix_tuning_mlp": lambda: PrefixTuning(length=4, reparameterize=True, hidden_size=32),
}


@pytest.mark.parametrize("family", ["t5", "llama"])
@pytest.mark.parametrize("method", ["prompt_tuning", "ia3", "prefix_tuning"])
def test_method_trains_only_its_adapter(method, family, request):
    model, batches = request.getfixturevalue(family)
    if family == "llama":  # the other variants on the decoder
        method = {"prompt_tuning": "prompt_tuning_after_bos", "prefix_tuning": "prefix_tuning_mlp"}.get(method, method)
    trainer = Trainer(model, optax.adam(3e-2), Partitioner(devices=ONE_DEVICE), peft=METHODS[method]())
    trainer.base_params = trainer.init_base_params()
    base_before = jax.device_get(trainer.base_params)
    plain = Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE))
    state = trainer.init_state()
    if method == "ia3":  # ones-initialised vectors: step 0 is the base model, up to float summation order (the
        # scaled projections run one by one, the plain model's k / v as one fused product: 1 ulp seen in Llama)
        batch = pipeline.to_global(batches[0], plain.partitioner.batch_sharding)
        np.testing.assert_allclose(trainer.score(state["params"], batch), plain.score(base_before, batch),
                                   rtol=1e-6, atol=0)
    state, losses = _train(trainer, batches, state)
    assert losses[-1] < losses[0] - 0.2, losses
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(trainer.base_params))):
        np.testing.assert_array_equal(before, after)
    assert trainer.num_trainable_params == sum(x.size for x in jax.tree.leaves(state["params"]))
    assert trainer.num_trainable_params < 0.05 * trainer.num_params


def test_prompt_tuning_initialisations(t5):
    model, _ = t5
    module = model.make_module(0)
    table = np.asarray(module.shared.embedding[...])
    vocab = PromptTuning(length=4, init="vocab", population_size=50).initial_values(table, nnx.Rngs(params=0))
    # Every 'vocab' vector is a row of the first 50 embedding rows.
    assert all(np.any(np.all(np.isclose(table[:50], row), axis=1)) for row in np.asarray(vocab))
    uniform = np.asarray(PromptTuning(length=4, init="uniform").initial_values(table, nnx.Rngs(params=0)))
    assert uniform.shape == (4, 128) and np.abs(uniform).max() <= 0.5

    import seqio
    spm = os.path.join(os.path.dirname(__file__), os.pardir, "tasks", "data", "quickstart", "spm.model")
    vocabulary = seqio.SentencePieceVocabulary(spm)
    method = PromptTuning(length=4, init="class_labels", class_labels=["even", "odd words"], vocabulary=vocabulary)
    values = np.asarray(method.initial_values(table, nnx.Rngs(params=0)))
    np.testing.assert_allclose(values[0], table[vocabulary.encode("even")].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(values[1], table[vocabulary.encode("odd words")].mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("make, settings, message", [
    (lambda: PromptTuning(length=30, max_input_length=128), ({"inputs": 112, "targets": 8}, False),
     r"PromptTuning.length=30 no longer fits: TASK_FEATURE_LENGTHS\['inputs'\]=112 \+ 30 prompt vectors > "
     r"PromptTuning.max_input_length=128; set TASK_FEATURE_LENGTHS\['inputs'\] <= 98"),
    (lambda: PromptTuning(length=16), ({"inputs": 16, "targets": 8}, True),
     r"PromptTuning.length=16 is not shorter than TASK_FEATURE_LENGTHS\['inputs'\]=16: packed rows reserve"),
])
def test_bad_prompt_tuning_settings_are_named(make, settings, message):
    with pytest.raises(PeftConfigError, match=message):
        make().check(*settings)


def test_bad_prompt_and_ia3_settings_are_named(t5):
    model, _ = t5
    with pytest.raises(PeftConfigError, match="PromptTuning.init='class_labels' needs PromptTuning.class_labels"):
        PromptTuning(init="class_labels")
    with pytest.raises(PeftConfigError, match="T5's prompt is the encoder input prefix"):
        Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE), peft=PromptTuning(position="after_bos"))
    with pytest.raises(PeftConfigError, match=r"IA3.target_modules=\['k_proj'\]: \['k_proj'\] match no layer"):
        Trainer(model, optax.adam(1e-2), Partitioner(devices=ONE_DEVICE), peft=IA3(target_modules=["k_proj"],
                                                                                   feedforward_modules=[]))


def test_lora_gin_switch_trains_checkpoints_the_adapter_and_resumes(tmp_path, caplog, capsys):
    """`--gin_file=peft/lora.gin` on the quickstart: the log names the trainable share, checkpoints hold only the
    adapter plus the base pointer, and a rerun resumes onto the same base."""
    import json
    import logging

    from itjax import train as train_lib

    model_dir = str(tmp_path / "run")

    def run(steps):
        gin.clear_config()
        return train_lib.main([
            "--gin_file=quickstart.gin", "--gin_file=peft/lora.gin", f"--gin.MODEL_DIR={model_dir}",
            *TWO_TASKS,  # the adapter's checkpoint / resume / inference do not depend on the mixture
            f"--gin.TRAIN_STEPS={steps}", "--gin.TASK_FEATURE_LENGTHS={'inputs': 112, 'targets': 8}",
            "--gin.BATCH_SIZE=8", "--gin.train.eval_num_examples=2", "--gin.train.eval_batch_size=8",
            "--gin.train.eval_period=0",
            "--gin.train.log_period=1", "--gin.train.async_checkpointing=False", "--no_progress"])

    with caplog.at_level(logging.INFO, logger="itjax"):
        assert run(2) == 0
    assert any("trainable (" in r.message and "LoRA(rank=8" in r.message for r in caplog.records)
    step_dir = os.path.join(model_dir, "checkpoints", "2")
    with open(os.path.join(step_dir, "base", "metadata")) as f:
        pointer = json.load(f)
    assert pointer["path"] is None and pointer["seed"] == 0
    assert pointer["fingerprint"]["encoder/layers/0/attention/q/kernel"]["shape"] == [128, 4, 32]
    metadata = checkpoints.ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state"))
    param_paths = {checkpoints._path_str(p) for p, _ in checkpoints._flatten(
        getattr(metadata, "item_metadata", metadata)["params"])}
    assert param_paths and all(p.endswith(("lora_a", "lora_b")) for p in param_paths)
    capsys.readouterr()
    assert run(3) == 0
    assert "Restored checkpoint at step 2" in capsys.readouterr().out
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"train"' in line]
    assert steps == [1, 2, 3]

    # `itjax.infer` on the adapter checkpoint (its base loaded from the pointer) reproduces the eval predictions.
    from itjax import infer
    with open(os.path.join(model_dir, "predictions", "quickstart_copy_words-3.jsonl")) as f:
        evaluated = [json.loads(line) for line in f]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"inputs": ex["input"]}) + "\n" for ex in evaluated))
    gin.clear_config()
    assert infer.main(["--gin_file=quickstart.gin", "--gin_file=peft/lora.gin", f"--gin.MODEL_DIR={model_dir}",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': 112, 'targets': 8}", "--gin.BATCH_SIZE=8",
                       f"--input_file={tmp_path / 'in.jsonl'}", f"--output_file={tmp_path / 'out.jsonl'}"]) == 0
    inferred = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in inferred] == [ex["prediction"] for ex in evaluated]

    # What `itjax.convert --from_run` starts from: the run's base, adapter and LoRA settings, from MODEL_DIR alone.
    from itjax.peft.export import load_lora_run
    base, adapter, lora, model = load_lora_run(model_dir)
    assert (lora.rank, lora.alpha) == (8, 16.0) and set(lora_layers_of(adapter)) == {"q", "v"}
    assert np.abs(np.asarray(adapter["encoder"]["layers"][0]["attention"]["q"]["lora_b"])).max() > 0
    merged = merge_lora(base, adapter, alpha=lora.alpha)
    assert not np.array_equal(merged["encoder"]["layers"][0]["attention"]["q"]["kernel"],
                              base["encoder"]["layers"][0]["attention"]["q"]["kernel"])


def lora_layers_of(adapter):
    from itjax.peft.lora import lora_layers
    return {str(path[-1]) for path in lora_layers(adapter)}


@pytest.mark.parametrize("method", [PromptTuning(length=3, init="uniform"),
                                    PromptTuning(length=3, position="after_bos", init="uniform"),
                                    PrefixTuning(length=3), PrefixTuning(length=3, reparameterize=True, hidden_size=8)])
def test_cached_decoding_sees_the_adapter_as_the_full_pass_does(method):
    """Prompt / prefix hooks also act in the KV-cached generation path (prefill + decode_step)."""
    import jax.numpy as jnp

    from itjax.models.llama import Llama, LlamaConfig
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    module = method.apply(Llama(config, rngs=nnx.Rngs(0)), nnx.Rngs(params=1))
    tokens = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], jnp.int32)
    logits, positions, cache = module.prefill(tokens, tokens > 0, module.init_decode_cache(2, 8))
    full = module(tokens)
    np.testing.assert_allclose(logits, full[jnp.arange(2), jnp.array([3, 5])], atol=1e-5)
    step_logits, _ = module.decode_step(jnp.array([20, 21]), positions, cache)
    longer = module(jnp.array([[5, 6, 7, 8, 20, 0, 0], [9, 10, 11, 12, 13, 14, 21]], jnp.int32))
    np.testing.assert_allclose(step_logits, longer[jnp.arange(2), jnp.array([4, 6])], atol=1e-5)
    assert not np.allclose(full, Llama(config, rngs=nnx.Rngs(0))(tokens), atol=1e-3)  # the adapter acts


@pytest.mark.parametrize("method", [PromptTuning(length=3, init="vocab"), PrefixTuning(length=3)])
def test_t5_greedy_decoding_with_prompt_or_prefix_matches_the_teacher_forced_pass(method):
    import jax.numpy as jnp

    from itjax.models.encoder_decoder import EncoderDecoderModel
    from itjax.models.t5 import T5, T5Config
    config = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                      num_decoder_layers=1)
    module = method.apply(T5(config, rngs=nnx.Rngs(0)), nnx.Rngs(params=1))
    inputs = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]], jnp.int32)
    out = EncoderDecoderModel(config).generate(module, {"encoder_input_tokens": inputs}, max_decode_length=4,
                                               eos_id=1)
    teacher = jnp.argmax(module(inputs, jnp.pad(out[:, :-1], ((0, 0), (1, 0)))), axis=-1)
    after_eos = jnp.cumsum(out == 1, axis=1) - (out == 1) > 0  # greedy decoding writes 0 there
    np.testing.assert_array_equal(out, jnp.where(after_eos, 0, teacher))
