"""`python -m itjax.infer` with a decoder-only (Llama-family) model: gin/quickstart_decoder.gin trained for two steps,
then greedy / beam / sampled generation and scoring through the CLI, checked against what training's evaluation
predicted and against DecoderOnlyModel.score on rows built by the training feature converter.

The run unties the output layer and keeps the learning rate tiny: a near-random untied model continues prompts with
varied tokens (a tied one just repeats the prompt's last token, EOS), so token-identity checks are not vacuous.
"""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from itjax import config as config_lib
from itjax import infer, inference
from itjax import train as train_lib
from itjax.data.feature_converters import DecoderFeatureConverter
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.encoder_decoder import EncoderDecoderModel
from itjax.models.llama import LlamaConfig
from itjax.models.t5 import T5Config
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer

TASK = "quickstart_copy_words"
LENGTHS = {"inputs": 112, "targets": 8}
RUN = ["--gin_file=quickstart_decoder.gin", f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
       "--gin.itjax.models.LlamaConfig.tie_word_embeddings=False", "--gin.itjax.models.LlamaConfig.num_layers=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(model_dir, the eval examples written at the final step, the task's vocabulary)."""
    model_dir = str(tmp_path_factory.mktemp("decoder_infer") / "run")
    gin.clear_config()
    assert train_lib.main(RUN + [
        f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8",
        "--gin.train.eval_num_examples=6", "--gin.train.eval_batch_size=8", "--gin.train.eval_period=0",
        "--gin.train.checkpoint_period=0", "--gin.train.async_checkpointing=False",
        "--gin.cosine_decay_schedule.warmup_steps=0", "--gin.cosine_decay_schedule.learning_rate=1e-3",
        "--no_progress"]) == 0
    with open(os.path.join(model_dir, "predictions", f"{TASK}-2.jsonl")) as f:
        evaluated = [json.loads(line) for line in f]
    vocabulary = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
    return model_dir, evaluated, vocabulary


def _infer(model_dir, tmp_path, lines, *flags):
    gin.clear_config()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert infer.main(RUN + [f"--gin.MODEL_DIR={model_dir}", f"--input_file={inp}", f"--output_file={out}",
                             "--batch_size=8", *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _ids(vocabulary, text, length):
    """The quickstart features' tokenization: EOS appended after trimming (inputs and targets alike)."""
    return list(vocabulary.encode(text))[:length - 1] + [vocabulary.eos_id]


@pytest.fixture(scope="module")
def greedy(run, tmp_path_factory):
    """CLI greedy generations for the eval inputs as text, then the same inputs as token ids."""
    model_dir, evaluated, vocabulary = run
    text = [{"inputs": ex["input"]} for ex in evaluated]
    ids = [{"input_ids": _ids(vocabulary, ex["input"], LENGTHS["inputs"])} for ex in evaluated]
    results = _infer(model_dir, tmp_path_factory.mktemp("greedy"), text + ids)
    return results[:len(text)], results[len(text):]


def test_greedy_reproduces_eval_predictions_from_text_and_ids(run, greedy):
    _, evaluated, _ = run
    predictions = [ex["prediction"] for ex in evaluated]
    assert len(set(predictions)) >= 2 and all(predictions), f"degenerate test model: {predictions}"
    from_text, from_ids = greedy
    # Text prompts give what training's evaluation predicted for the same inputs and checkpoint; token-id
    # prompts give the same tokens.
    assert [r["prediction"] for r in from_text] == predictions
    assert [r["prediction_ids"] for r in from_ids] == [r["prediction_ids"] for r in from_text]


@pytest.mark.parametrize("flags", [("--decode=beam", "--num_beams=1", "--alpha=0.0"),
                                   ("--decode=sample", "--top_k=1", "--temperature=1.5", "--seed=5")])
def test_one_beam_and_top_1_sampling_are_greedy(run, greedy, tmp_path, flags):
    model_dir, evaluated, _ = run
    out = _infer(model_dir, tmp_path, [{"inputs": ex["input"]} for ex in evaluated], *flags)
    assert [r["prediction_ids"] for r in out] == [r["prediction_ids"] for r in greedy[0]]


def _direct_scores(model_dir, pairs):
    """DecoderOnlyModel.score on rows made by the training feature converter from (inputs, targets) id lists."""
    gin.clear_config()
    config_lib.parse_gin(["quickstart_decoder.gin"], config_lib.split_gin_overrides(RUN[1:])[0])
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
    trainer = Trainer(model, optimizer, Partitioner())
    params = jax.device_get(inference.restore_params(trainer, model_dir))
    ds = tf.data.Dataset.from_generator(
        lambda: ({"inputs": i, "targets": t} for i, t in pairs),
        output_signature={k: tf.TensorSpec([None], tf.int32) for k in ("inputs", "targets")})
    rows = list(model.feature_converter_cls(pack=False)(ds, LENGTHS).as_numpy_iterator())
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    return np.asarray(model.score(trainer.module(params), batch))


def test_score_mode_equals_model_score_and_ranks_consistently(run, greedy, tmp_path):
    model_dir, evaluated, vocabulary = run
    examples = evaluated[:3]
    references = [ex["references"][0] for ex in examples]
    # Rank classification: every prompt against every reference (text lines), and the same as token ids.
    text = [{"inputs": ex["input"], "targets": ref} for ex in examples for ref in references]
    pairs = [(_ids(vocabulary, line["inputs"], LENGTHS["inputs"]),
              _ids(vocabulary, line["targets"], LENGTHS["targets"])) for line in text]
    ids = [{"input_ids": i, "target_ids": t} for i, t in pairs]
    # Single-token targets: the greedy first token must be the best scored of them.
    firsts = [g["prediction_ids"][0] for g in greedy[0][:len(examples)]]
    candidates = sorted({*firsts, 5, 17, 42, 300})
    single = [{"input_ids": pairs[3 * i][0], "target_ids": [c]} for i in range(len(examples)) for c in candidates]
    scored = _infer(model_dir, tmp_path, text + ids + single, "--mode=score")
    cli = np.array([r["log_likelihood"] for r in scored])
    n = len(text)
    np.testing.assert_allclose(cli[:n], cli[n:2 * n], rtol=1e-6)  # text == token ids
    direct = _direct_scores(model_dir, pairs)
    np.testing.assert_allclose(cli[:n], direct, rtol=1e-5, atol=1e-4)
    assert np.all(cli[:n] < 0)
    matrix, direct_matrix = cli[:n].reshape(3, 3), direct.reshape(3, 3)
    assert np.array_equal(np.argsort(matrix, axis=1), np.argsort(direct_matrix, axis=1))
    single_scores = cli[2 * n:].reshape(len(examples), len(candidates))
    assert [candidates[j] for j in np.argmax(single_scores, axis=1)] == firsts


def test_prompt_lengths_are_required(run, tmp_path, capsys):
    model_dir, _, _ = run
    gin.clear_config()
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"inputs": "x"}\n')
    assert infer.main(RUN + [f"--gin.MODEL_DIR={model_dir}", "--gin.TASK_FEATURE_LENGTHS={'targets': 8}",
                             f"--input_file={inp}", f"--output_file={tmp_path / 'o.jsonl'}"]) == 2
    assert "has no 'inputs' length" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- inference rows (no model)


def _converted(converter, examples, lengths):
    keys = examples[0].keys()
    ds = tf.data.Dataset.from_generator(lambda: iter(examples),
                                        output_signature={k: tf.TensorSpec([None], tf.int32) for k in keys})
    return [{k: v.tolist() for k, v in row.items()} for row in converter(ds, lengths).as_numpy_iterator()]


@pytest.mark.parametrize("bos_id", [None, 3])
def test_decoder_inference_rows_equal_the_feature_converters(bos_id):
    model = DecoderOnlyModel(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=8, num_layers=1,
                                         num_heads=2, num_kv_heads=1), bos_id=bos_id)
    inputs, targets = [[5, 6, 7, 8, 9, 10], [0, 4]], [[11, 1], [12, 13, 14, 15, 16, 1]]
    lengths = {"inputs": 5, "targets": 4}
    # seqio trims features to their lengths before the converter; inference_batch trims itself.
    expected = _converted(DecoderFeatureConverter(pack=False, bos_id=bos_id),
                          [{"inputs": i[:5], "targets": t[:4]} for i, t in zip(inputs, targets)], lengths)
    rows = model.inference_batch(inputs, targets, lengths, batch_size=3)
    for name in expected[0]:
        assert rows[name][:2].tolist() == [e[name] for e in expected], name
        assert not rows[name][2].any()
    # Generation rows hold the whole (cut) prompt, marked as the prompt.
    gen = model.inference_batch(inputs, None, lengths, batch_size=2)
    prompt = ([] if bos_id is None else [bos_id]) + inputs[0][:5]
    assert gen["decoder_input_tokens"][0, :len(prompt)].tolist() == prompt
    assert gen["decoder_causal_attention"][0].tolist() == [1] * len(prompt) + [0] * (9 - len(prompt))


def test_encoder_decoder_inference_rows_equal_the_feature_converters():
    model = EncoderDecoderModel(T5Config(vocab_size=32, d_model=8, num_heads=2, d_kv=4, d_ff=8,
                                         num_encoder_layers=1, num_decoder_layers=1))
    inputs, targets = [[5, 6, 7, 1], [4, 1]], [[11, 1], [12, 13, 14, 15, 1]]
    lengths = {"inputs": 3, "targets": 4}
    expected = _converted(seqio.EncDecFeatureConverter(pack=False),
                          [{"inputs": i[:3], "targets": t[:4]} for i, t in zip(inputs, targets)], lengths)
    rows = model.inference_batch(inputs, targets, lengths, batch_size=2)
    for name in expected[0]:
        assert rows[name].tolist() == [e[name] for e in expected], name


def test_checkpoint_path_alone_gives_the_same_generations(run, greedy, tmp_path):
    """`--checkpoint_path=MODEL_DIR` with no gin file: the model, task vocabulary and lengths come from the run's
    config.gin (only its parameters are read), and the generations equal the gin-file form's."""
    model_dir, evaluated, _ = run
    gin.clear_config()
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"inputs": ex["input"]}) + "\n" for ex in evaluated))
    assert infer.main([f"--checkpoint_path={model_dir}", f"--input_file={inp}", f"--output_file={out}",
                       "--batch_size=8"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction_ids"] for r in results] == [r["prediction_ids"] for r in greedy[0]]
