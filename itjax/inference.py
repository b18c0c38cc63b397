"""Using a trained model from Python (notebooks, scripts, `itjax.infer`): restore its weights, generate, score."""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import numpy as np
import seqio

from itjax import config as config_lib
from itjax.checkpoints import Checkpointer
from itjax.data import pipeline
from itjax.models import decoding
from itjax.trainer import Trainer


def restore_params(trainer: Trainer, model_dir: str, step: int | None = None):
    """Parameters of the checkpoint at `step` (default: the latest) in MODEL_DIR, laid out for `trainer`."""
    checkpointer = Checkpointer(model_dir, period=0, use_async=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}; train first or fix MODEL_DIR.")
        state, _ = checkpointer.restore(step, trainer.abstract_state)
    finally:
        checkpointer.close()
    return state["params"]


def _ids(example: dict, text_key: str, ids_key: str, vocabulary, length: int) -> list[int]:
    """Token ids of one field, EOS appended (for text), truncated to `length`."""
    if ids_key in example:
        return list(example[ids_key])[:length]
    return (list(vocabulary.encode(example[text_key])) + [vocabulary.eos_id])[:length]


def _batches(examples: Sequence[dict], batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    for start in range(0, len(examples), batch_size):
        yield start, list(examples[start:start + batch_size])


def _pad(rows: list[list[int]], batch_size: int, length: int) -> np.ndarray:
    out = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def generate_examples(trainer: Trainer, params, examples: Sequence[dict], vocabulary, *, input_length: int,
                      max_decode_length: int, batch_size: int = 8, decode: str = "greedy", temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, num_beams: int = 4, alpha: float = 0.6,
                      seed: int = 0) -> list[dict]:
    """Returns each example (`inputs` text or `input_ids`) with `prediction` and `prediction_ids` added.

    decode: "greedy", "sample" (temperature, top_k, top_p, seed) or "beam" (num_beams, alpha).
    """
    eos = vocabulary.eos_id

    def decode_fn(module, tokens, rng):
        if decode == "beam":
            return decoding.beam_search(module, tokens, max_decode_length=max_decode_length, num_beams=num_beams,
                                        alpha=alpha, eos_id=eos)[0]
        return decoding.sample_decode(module, tokens, max_decode_length=max_decode_length, eos_id=eos,
                                      temperature=temperature if decode == "sample" else 0.0, top_k=top_k,
                                      top_p=top_p, rng=rng)

    compiled = jax.jit(lambda p, tokens, rng: decode_fn(trainer.module(p), tokens, rng))
    results = []
    for start, chunk in _batches(examples, batch_size):
        tokens = _pad([_ids(ex, "inputs", "input_ids", vocabulary, input_length) for ex in chunk], batch_size,
                      input_length)
        with trainer.partitioner.axis_rules():
            out = np.asarray(compiled(params, tokens, jax.random.fold_in(jax.random.key(seed), start)))
        for example, row in zip(chunk, out):
            ids = row.tolist()
            ids = ids[:ids.index(eos)] if eos in ids else ids
            results.append({**example, "prediction": vocabulary.decode(ids), "prediction_ids": ids})
    return results


def score_examples(trainer: Trainer, params, examples: Sequence[dict], vocabulary, *, input_length: int,
                   target_length: int, batch_size: int = 8) -> list[dict]:
    """Returns each example with `log_likelihood` (nats) of its `targets` / `target_ids` added."""
    results = []
    for _, chunk in _batches(examples, batch_size):
        if any("targets" not in ex and "target_ids" not in ex for ex in chunk):
            raise config_lib.ConfigError("--mode=score needs 'targets' (text) or 'target_ids' in every line.")
        targets = [_ids(ex, "targets", "target_ids", vocabulary, target_length) for ex in chunk]
        target_tokens = _pad(targets, batch_size, target_length)
        batch = {
            "encoder_input_tokens": _pad([_ids(ex, "inputs", "input_ids", vocabulary, input_length)
                                          for ex in chunk], batch_size, input_length),
            "decoder_target_tokens": target_tokens,
            "decoder_input_tokens": np.pad(target_tokens[:, :-1], ((0, 0), (1, 0))),
            "decoder_loss_weights": (target_tokens > 0).astype(np.int32),
        }
        batch = pipeline.to_global(batch, trainer.partitioner.batch_sharding, host_local=False)
        scores = np.asarray(trainer.score(params, batch))
        results.extend({**ex, "log_likelihood": float(s)} for ex, s in zip(chunk, scores))
    return results


def generate(trainer: Trainer, params, vocabulary: seqio.Vocabulary, prompts: Sequence[str], *,
             input_length: int, max_decode_length: int, batch_size: int = 8) -> list[str]:
    """Greedy generations for raw text prompts (tokenized with `vocabulary`, EOS appended, truncated to fit)."""
    examples = [{"inputs": prompt} for prompt in prompts]
    results = generate_examples(trainer, params, examples, vocabulary, input_length=input_length,
                                max_decode_length=max_decode_length, batch_size=batch_size)
    return [r["prediction"] for r in results]
