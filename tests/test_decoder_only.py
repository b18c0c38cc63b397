"""Decoder-only instruction tuning: the feature converter's rows, DecoderOnlyModel's loss / predict / score, and a
short end-to-end `itjax.train` run of gin/quickstart_decoder.gin (packed and unpacked)."""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from itjax import train as train_lib
from itjax.data.feature_converters import DecoderFeatureConverter
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.llama import LlamaConfig

CONFIG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def _dataset(examples):
    keys = examples[0].keys()
    return tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={k: tf.TensorSpec([None], tf.int32) for k in keys})


def _rows(examples, lengths, pack, bos_id=None, **kwargs):
    ds = DecoderFeatureConverter(pack=pack, bos_id=bos_id, **kwargs)(_dataset(examples), lengths)
    return [{k: v.tolist() for k, v in row.items()} for row in ds.as_numpy_iterator()]


def test_rows_shift_by_one_and_mask_the_prompt():
    (row,) = _rows([{"inputs": [5, 6, 7], "targets": [8, 9, 1]}], {"inputs": 4, "targets": 4}, pack=False, bos_id=2)
    assert row == {
        "decoder_input_tokens": [2, 5, 6, 7, 8, 9, 0, 0],
        "decoder_target_tokens": [5, 6, 7, 8, 9, 1, 0, 0],
        "decoder_loss_weights": [0, 0, 0, 1, 1, 1, 0, 0],
        "decoder_causal_attention": [1, 1, 1, 1, 0, 0, 0, 0],
        "decoder_segment_ids": [1, 1, 1, 1, 1, 1, 0, 0],
        "decoder_positions": [0, 1, 2, 3, 4, 5, 0, 0],
    }


def test_packing_keeps_zero_ids_weights_and_segments():
    """Token id 0 is a real token for Llama 3 ('!'); packing must not mistake it (or a 0 weight) for padding."""
    examples = [{"inputs": [0, 3], "targets": [0, 1]}, {"inputs": [4], "targets": [5, 0, 1]}]
    (row,) = _rows(examples, {"inputs": 4, "targets": 4}, pack=True)
    assert row == {
        "decoder_input_tokens": [0, 3, 0, 4, 5, 0, 0, 0],
        "decoder_target_tokens": [3, 0, 1, 5, 0, 1, 0, 0],
        "decoder_loss_weights": [0, 1, 1, 1, 1, 1, 0, 0],
        "decoder_causal_attention": [1, 1, 0, 1, 0, 0, 0, 0],
        "decoder_segment_ids": [1, 1, 1, 2, 2, 2, 0, 0],
        "decoder_positions": [0, 1, 2, 0, 1, 2, 0, 0],
    }


def test_chat_rows_take_the_loss_mask_and_truncate():
    examples = [{"targets": [7, 8, 9, 10, 11, 1], "targets_loss_mask": [0, 0, 1, 1, 0, 1]}]
    # seqio trims `targets` to its length before the converter but not the extra mask feature: the converter does.
    (row,) = _rows(examples, {"targets": 5}, pack=False, apply_length_check=False)
    assert row["decoder_input_tokens"] == [7, 8, 9, 10, 0]
    assert row["decoder_target_tokens"] == [8, 9, 10, 11, 0]
    assert row["decoder_loss_weights"] == [0, 1, 1, 0, 0]
    assert row["decoder_causal_attention"] == [0, 0, 0, 0, 0]


def test_lengths_without_targets_are_refused():
    with pytest.raises(ValueError, match="needs a 'targets' length"):
        DecoderFeatureConverter(pack=False)(_dataset([{"inputs": [1]}]), {"inputs": 4})


@pytest.fixture(scope="module")
def model_and_module():
    model = DecoderOnlyModel(CONFIG, z_loss=0.0, bos_id=2)
    module = model.make_module(seed=0)
    # Scale the weights up so greedy decoding is not dominated by ties.
    state = nnx.state(module, nnx.Param)
    nnx.update(module, jax.tree.map(lambda x: x * 4.0, state))
    return model, module


def _batch(examples, lengths, pack, bos_id=2):
    rows = _rows(examples, lengths, pack, bos_id)
    return {k: jnp.asarray([r[k] for r in rows], jnp.int32) for k in rows[0]}


EXAMPLES = [{"inputs": [5, 6, 7], "targets": [8, 9, 1]}, {"inputs": [10, 11], "targets": [12, 13, 14, 1]},
            {"inputs": [15], "targets": [16, 1]}]
LENGTHS = {"inputs": 4, "targets": 5}


# The plain full forward pass, the reference below; jitted (one compile per sequence length) because op-by-op it
# compiles every primitive again for each new length.
_forward = nnx.jit(lambda module, tokens: module(tokens))


def test_packed_loss_equals_the_sum_of_separate_losses(model_and_module):
    model, module = model_and_module
    packed = _batch(EXAMPLES, LENGTHS, pack=True)
    assert packed["decoder_segment_ids"].shape[0] < len(EXAMPLES)  # several examples share a row
    separate = _batch(EXAMPLES, LENGTHS, pack=False)
    loss_terms = nnx.jit(model.loss_terms)  # compiled, as in training (op by op it is several times slower)
    terms_p = loss_terms(module, packed, packed["decoder_loss_weights"].astype(jnp.float32))
    terms_s = loss_terms(module, separate, separate["decoder_loss_weights"].astype(jnp.float32))
    assert float(terms_p["tokens"]) == float(terms_s["tokens"]) == 9.0
    np.testing.assert_allclose(float(terms_p["loss_sum"]), float(terms_s["loss_sum"]), rtol=1e-5)


def test_score_is_the_target_log_likelihood(model_and_module):
    model, module = model_and_module
    batch = _batch(EXAMPLES, LENGTHS, pack=False)
    scores = nnx.jit(model.score)(module, batch)
    for i, ex in enumerate(EXAMPLES):
        sequence = [2] + ex["inputs"] + ex["targets"]
        logits = _forward(module, jnp.asarray([sequence[:-1]], jnp.int32))[0]
        log_probs = jax.nn.log_softmax(logits)
        first_target = len(ex["inputs"])  # position predicting targets[0] (BOS shifts by one)
        expected = sum(float(log_probs[first_target + j, t]) for j, t in enumerate(ex["targets"]))
        assert float(scores[i]) == pytest.approx(expected, abs=1e-4)


def test_predict_continues_the_prompt_like_naive_greedy(model_and_module):
    model, module = model_and_module
    batch = _batch(EXAMPLES, LENGTHS, pack=False)
    predicted = np.asarray(model.predict(module, batch, max_decode_length=6, eos_id=1))
    for i, ex in enumerate(EXAMPLES):
        sequence, expected = [2] + ex["inputs"], []
        for _ in range(6):
            token = int(jnp.argmax(_forward(module, jnp.asarray([sequence], jnp.int32))[0, -1]))
            expected.append(token)
            sequence.append(token)
            if token == 1:
                break
        assert predicted[i].tolist() == expected + [0] * (6 - len(expected))


@pytest.mark.parametrize("pack", [False, True])
def test_quickstart_decoder_trains_and_evaluates(tmp_path, pack):
    model_dir = str(tmp_path / "run")
    gin.clear_config()
    assert train_lib.main([
        "--gin_file=quickstart_decoder.gin", f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=8",
        "--gin.BATCH_SIZE=8", f"--gin.train.pack={pack}", "--gin.train.eval_num_examples=2",
        "--gin.train.eval_batch_size=8",
        "--gin.train.eval_period=0", "--gin.train.log_period=1", "--gin.train.async_checkpointing=False",
        "--gin.cosine_decay_schedule.warmup_steps=2", "--no_progress"]) == 0
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    losses = [r["loss"] for r in lines if r["split"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    final = [r for r in lines if r["split"] == "validation" and r["task"] == "all"]
    assert final and final[-1]["step"] == 8 and 0.0 <= final[-1]["exact_match"] <= 100.0
    predictions = os.listdir(os.path.join(model_dir, "predictions"))
    assert any(name.endswith("-8.jsonl") for name in predictions)


def test_llama_sft_dry_run_compiles_with_remat(tmp_path, capsys):
    """gin/llama3_8b_sft.gin's layout and step, shrunk to 2 layers so it compiles in seconds on 8 fake devices."""
    gin.clear_config()
    model_dir = tmp_path / "never_created"
    args = ["--gin_file=llama3_8b_sft.gin", "--gin.MIXTURE_OR_TASK_NAME='quickstart'",
            "--gin.INITIAL_CHECKPOINT_PATH=None", "--gin.itjax.models.LlamaConfig.num_layers=2",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 32}", "--gin.BATCH_SIZE=8",
            f"--gin.MODEL_DIR='{model_dir}'", "--dry_run"]
    assert train_lib.main(args) == 0
    out = capsys.readouterr().out
    # 2 of Llama-3.1-8B's 32 layers: embeddings + lm_head (2 x 128256 x 4096) + 2 x 218,112,000 + final norm.
    assert "parameters: 1,486,901,248" in out and "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
    saved_full = float(out.split("saved_activation_bytes_global: ")[1].split(" GiB")[0])
    gin.clear_config()
    assert train_lib.main(args + ["--gin.itjax.models.LlamaConfig.remat_policy='none'"]) == 0
    out = capsys.readouterr().out
    assert float(out.split("saved_activation_bytes_global: ")[1].split(" GiB")[0]) > 3 * saved_full
    assert not model_dir.exists()
