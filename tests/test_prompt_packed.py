"""Prompt tuning on packed rows (itjax.data.prompt_slots + the models' prompt hooks).

A packed row built by the real feature converters (P prompt slots per example) must compute what its examples
compute one per row through today's unpacked prompt insertion: per-example log-likelihoods and the prompt's gradient
agree within 1e-5, for T5 (prompt on the encoder) and Llama (before the first token or after BOS).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from flax import nnx

from itjax.data import pipeline
from itjax.data.prompt_slots import DECODER_SLOTS, ENCODER_SLOTS
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.encoder_decoder import EncoderDecoderModel
from itjax.models.llama import Llama, LlamaConfig
from itjax.models.t5 import T5, T5Config
from itjax.partitioning import Partitioner
from itjax.peft import AdapterParam, PeftConfigError, PromptTuning
from itjax.peft.core import feature_converter_kwargs
from itjax.trainer import Trainer

P = 3
LENGTHS = {"inputs": 12, "targets": 6}
# (inputs, targets) of varying lengths: several share a packed row; the last one's inputs are cut to 12.
EXAMPLES = [([5, 6, 7, 1], [8, 9, 1]), ([10, 11, 1], [12, 1]), ([13, 14, 15, 16, 17, 1], [18, 19, 20, 1]),
            ([21, 1], [22, 23, 24, 25, 1]), ([26, 27, 28, 1], [29, 1]), (list(range(30, 46)) + [1], [46, 47, 1])]


def _rows(converter, lengths=LENGTHS) -> dict[str, np.ndarray]:
    """All rows of `converter` over EXAMPLES, in order: {feature: int32 [rows, length]}."""
    def gen():  # trimmed to the lengths, as seqio.get_dataset does
        for inputs, targets in EXAMPLES:
            yield {"inputs": np.array(inputs[:lengths["inputs"]], np.int32),
                   "targets": np.array(targets[:lengths["targets"]], np.int32)}
    spec = {k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")}
    rows = list(converter(tf.data.Dataset.from_generator(gen, output_signature=spec), lengths).as_numpy_iterator())
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def _t5():
    config = T5Config(vocab_size=64, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=2,
                      num_decoder_layers=2)
    return EncoderDecoderModel(config), T5(config, rngs=nnx.Rngs(0))


def _llama(bos_id=None):
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    return DecoderOnlyModel(config, bos_id=bos_id), Llama(config, rngs=nnx.Rngs(0))


FAMILIES = {"t5": (_t5, "start"), "llama": (_llama, "start"), "llama_after_bos": (lambda: _llama(2), "after_bos")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request):
    """(family, model, prompt-tuned module, unpacked rows, packed rows with prompt slots), built once per family."""
    return (request.param,) + _setup(request.param)


def _setup(family):
    make, position = FAMILIES[family]
    model, module = make()
    method = PromptTuning(length=P, position=position, init="uniform")
    module = method.apply(module, nnx.Rngs(params=1))
    unpacked = _rows(model.feature_converter(pack=False))
    packed = _rows(model.feature_converter(pack=True, **feature_converter_kwargs(method, True)))
    return model, module, unpacked, packed


def _token_log_probs(model, module, rows):
    """Per-token target log-probabilities times (loss weight > 0), [rows, length], and d(sum)/d(prompt) [P, embed]."""
    graphdef, adapter, rest = nnx.split(module, AdapterParam, ...)
    batch = {k: jnp.asarray(v) for k, v in rows.items()}

    def f(adapter, batch):
        logits = model.logits(nnx.merge(graphdef, adapter, rest), batch)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["decoder_target_tokens"][..., None], -1)[..., 0]
        lp = lp * (batch["decoder_loss_weights"] > 0)
        return jnp.sum(lp), lp

    grads, lp = jax.jit(jax.grad(f, has_aux=True))(adapter, batch)
    return np.asarray(lp), np.asarray(grads["input_prompt"]["embedding"][...])


def _per_segment(values, segment_ids):
    """Sums of values [rows, length] per (row, segment), in packing order."""
    return np.array([values[r][segment_ids[r] == s].sum() for r in range(len(values))
                     for s in range(1, segment_ids[r].max() + 1)])


def test_packed_rows_equal_their_examples_one_per_row(setup):
    family, model, module, unpacked, packed = setup
    slots = packed[ENCODER_SLOTS if family == "t5" else DECODER_SLOTS]
    segments = packed["decoder_segment_ids"]
    assert len(packed["decoder_segment_ids"]) < len(EXAMPLES) and segments.max() >= 2  # rows really hold several
    np.testing.assert_array_equal(slots[slots > 0], np.tile(np.arange(1, P + 1), len(EXAMPLES)))  # 1..P per example
    lp_unpacked, grad_unpacked = _token_log_probs(model, module, unpacked)
    lp_packed, grad_packed = _token_log_probs(model, module, packed)
    per_example = lp_unpacked.sum(axis=1)
    assert per_example.shape == (len(EXAMPLES),) and np.all(per_example < 0)
    np.testing.assert_allclose(_per_segment(lp_packed, segments), per_example, rtol=1e-5, atol=1e-5)
    assert np.abs(grad_unpacked).max() > 1e-3
    np.testing.assert_allclose(grad_packed, grad_unpacked, rtol=1e-5, atol=1e-5)


def test_a_segment_does_not_see_another_segments_prompt(setup):
    """Scrambling the prompt slots of a row's first segment changes that segment's outputs and nothing else."""
    family, model, module, _, packed = setup
    key = ENCODER_SLOTS if family == "t5" else DECODER_SLOTS
    first = (packed["encoder_segment_ids"] if family == "t5" else packed["decoder_segment_ids"]) == 1
    scrambled = dict(packed)
    scrambled[key] = np.where(first & (packed[key] > 0), P + 1 - packed[key], packed[key])  # prompt order reversed
    lp, _ = _token_log_probs(model, module, packed)
    lp_scrambled, _ = _token_log_probs(model, module, scrambled)
    target_first = packed["decoder_segment_ids"] == 1
    assert np.abs(lp - lp_scrambled)[target_first].max() > 1e-4  # the first segment sees its own prompt ...
    np.testing.assert_array_equal(lp[~target_first], lp_scrambled[~target_first])  # ... and only it does


def test_converters_reserve_the_slots_as_the_unpacked_hook_places_the_prompt():
    """Decoder rows after BOS: per segment [bos, P slots, rest], slot tokens / targets / weights 0, positions
    0.. counting the slots, prompt-side for decoder_causal_attention; T5: P slots (token 0) before the inputs."""
    model, _ = _llama(bos_id=2)
    rows = _rows(model.feature_converter(pack=True, prompt_slots=P, prompt_offset=1))
    unpacked = _rows(model.feature_converter(pack=False))
    length = LENGTHS["inputs"] + LENGTHS["targets"]
    assert rows["decoder_input_tokens"].shape[1] == length + P
    example = 0
    for r in range(len(rows["decoder_segment_ids"])):
        for s in range(1, rows["decoder_segment_ids"][r].max() + 1):
            seg = {k: v[r][rows["decoder_segment_ids"][r] == s] for k, v in rows.items()}
            n = int(unpacked["decoder_segment_ids"][example].sum())
            ref = {k: v[example][:n] for k, v in unpacked.items()}
            for name in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
                np.testing.assert_array_equal(np.delete(seg[name], range(1, 1 + P)), ref[name])
                assert not seg[name][1:1 + P].any()
            np.testing.assert_array_equal(seg["decoder_positions"], np.arange(n + P))
            np.testing.assert_array_equal(seg[DECODER_SLOTS], [0] + list(range(1, P + 1)) + [0] * (n - 1))
            assert seg["decoder_causal_attention"][:1 + P].all()
            example += 1
    assert example == len(EXAMPLES)

    t5_model, _ = _t5()
    rows = _rows(t5_model.feature_converter(pack=True, prompt_slots=P))
    lengths = t5_model.feature_converter(pack=True, prompt_slots=P).get_model_feature_lengths(LENGTHS)
    assert lengths["encoder_input_tokens"] == lengths[ENCODER_SLOTS] == LENGTHS["inputs"] + P
    starts = rows["encoder_positions"] == 0
    assert np.all(rows[ENCODER_SLOTS][(rows["encoder_segment_ids"] > 0) & starts] == 1)
    assert not rows["encoder_input_tokens"][rows[ENCODER_SLOTS] > 0].any()
    last = rows["encoder_segment_ids"][-1]
    kept = rows["encoder_input_tokens"][-1][last == last.max()]
    np.testing.assert_array_equal(kept[P:], list(range(30, 42)))  # the last example keeps its first 12 inputs


@pytest.mark.slow
def test_a_short_packed_training_run_learns():
    """Prompt tuning of a small T5 on packed quickstart rows through the Trainer: the loss goes down."""
    model = EncoderDecoderModel(T5Config(vocab_size=640, d_model=32, num_heads=2, d_kv=16, d_ff=64,
                                         num_encoder_layers=1, num_decoder_layers=1))
    method = PromptTuning(length=4, init="vocab")
    lengths = {"inputs": 160, "targets": 8}  # quickstart inputs: about 70 tokens, so rows hold two examples
    method.check(lengths, True)
    trainer = Trainer(model, optax.adam(0.3), Partitioner(devices=jax.devices()[:1]), peft=method)
    trainer.base_params = trainer.init_base_params()
    converter = model.feature_converter(pack=True, **feature_converter_kwargs(method, True))
    batches = pipeline.numpy_batches(pipeline.train_dataset("quickstart", lengths, 4, converter, seed=0))
    state, losses, segments = trainer.init_state(), [], 0
    for _ in range(8):
        batch = next(batches)
        segments = max(segments, batch["encoder_segment_ids"].max())
        state, metrics = trainer.train_step(state, pipeline.to_global(batch, trainer.partitioner.batch_sharding))
        losses.append(float(metrics["loss"]))
    assert segments >= 2 and ENCODER_SLOTS in batch
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses


@pytest.mark.slow
def test_train_dry_run_compiles_packed_prompt_tuning(tmp_path, monkeypatch, capsys):
    """`itjax.train --dry_run` builds the packed rows' shapes with the prompt slots (inputs + P)."""
    from itjax import dry_run as dry_run_lib
    from itjax import train as train_lib
    monkeypatch.chdir(tmp_path)
    shapes, abstract_batch = {}, dry_run_lib.abstract_batch
    monkeypatch.setattr(dry_run_lib, "abstract_batch", lambda *a, **k: shapes.update(abstract_batch(*a, **k)) or
                        shapes)
    code = train_lib.main(["--gin_file=models/t5_1_1_quickstart.gin", "--gin_file=runs/train.gin",
                           "--gin_file=peft/prompt_tuning.gin",
                           "--dry_run", "--gin.train.pack=True", "--gin.BATCH_SIZE=8",
                           "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "parameters:" in captured.out
    assert shapes["encoder_input_tokens"].shape == shapes[ENCODER_SLOTS].shape == (8, 32 + 20)  # P = 20 slots


def test_bad_input_is_named():
    with pytest.raises(PeftConfigError, match=r"PromptTuning.length=12 is not shorter than "
                                              r"TASK_FEATURE_LENGTHS\['inputs'\]=12: packed rows reserve 12"):
        PromptTuning(length=12).check(LENGTHS, True)
    with pytest.raises(PeftConfigError, match=r"TASK_FEATURE_LENGTHS\['targets'\]=6"):  # chat tasks: no inputs
        PromptTuning(length=6).check({"targets": 6}, True)
    PromptTuning(length=12).check(LENGTHS, False)  # unpacked: the prompt comes on top, as before
    model, module = _llama()
    tokens = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="prompt_slots given but the model has no input_prompt"):
        module(tokens, prompt_slots=jnp.zeros((1, 4), jnp.int32))
    _, t5 = _t5()
    with pytest.raises(ValueError, match="encoder_prompt_slots given but the model has no input_prompt"):
        t5(tokens, tokens, encoder_prompt_slots=jnp.zeros((1, 4), jnp.int32))
    _, prompted, _, packed = _setup("t5")
    with pytest.raises(ValueError, match="packed rows .* with an input_prompt need encoder_prompt_slots"):
        prompted(packed["encoder_input_tokens"], packed["decoder_input_tokens"],
                 encoder_segment_ids=packed["encoder_segment_ids"], decoder_segment_ids=packed["decoder_segment_ids"])
