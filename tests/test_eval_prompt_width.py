"""Decoder-only evaluation generates from the prompt columns only (`evaluation.prompt_width`): same predictions as
from the whole rows (prompt + target columns), with a smaller prefill and KV cache."""

import jax
import numpy as np
import optax

from itjax.evaluation import prompt_width
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.llama import LlamaConfig
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer


def test_predictions_from_the_prompt_columns_equal_those_from_whole_rows():
    model = DecoderOnlyModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                         num_heads=4, num_kv_heads=2), bos_id=2)
    rng = np.random.RandomState(0)
    inputs = [rng.randint(3, 64, size=n).tolist() for n in (5, 17, 9, 1)]
    targets = [rng.randint(3, 64, size=n).tolist() for n in (8, 3, 8, 5)]
    rows = model.inference_batch(inputs, targets, {"inputs": 40, "targets": 8}, batch_size=4)
    examples = [{k: v[i] for k, v in rows.items()} for i in range(4)]
    assert prompt_width(examples) == 32  # longest prompt: bos + 17 tokens = 18 -> a multiple of 16
    assert prompt_width(examples, multiple=64) == 48  # never wider than the rows
    assert prompt_width([{"encoder_input_tokens": np.zeros(4)}]) is None  # encoder-decoder: whole rows

    trainer = Trainer(model, optax.sgd(0.0), Partitioner(devices=jax.devices()[:1]))
    params = trainer.init_state()["params"]
    whole = trainer.predict(params, rows, max_decode_length=6, eos_id=1)
    trimmed = trainer.predict(params, {k: v[:, :32] for k, v in rows.items()}, max_decode_length=6, eos_id=1)
    assert whole.shape == (4, 6) and np.any(np.asarray(whole) > 1)
    np.testing.assert_array_equal(np.asarray(trimmed), np.asarray(whole))
