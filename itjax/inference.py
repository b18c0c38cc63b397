"""Using a trained model from Python (notebooks, scripts, `itjax.infer`): restore its weights, generate, score.

Works for both model families: the model object builds its own rows from token ids (`model.inference_batch`, the
layout of its feature converter) and says how to decode them (`model.decode_fns`, see `itjax.models.decoding`).
Text fields are tokenized as the task's features do it: EOS appended after trimming when the feature has
`add_eos` (seqio's `append_eos_after_trim`); token-id fields are used as given.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.experimental.multihost_utils
import numpy as np
import seqio

from itjax import config as config_lib
from itjax import runs
from itjax.data import pipeline
from itjax.trainer import Trainer


def restore_params(trainer: Trainer, model_dir: str, step: int | None = None):
    """Parameters of the checkpoint at `step` (default: the latest) in MODEL_DIR, laid out for `trainer`; only
    the parameters are read (see `itjax.runs`, whose `load` also builds the model and vocabulary from the run).

    For a PEFT trainer these are the adapter's; the frozen base the checkpoint points to is loaded into
    `trainer.base_params` (checked against the fingerprint the adapter was trained on).
    """
    step = runs.resolve_step(model_dir, step)
    checkpoint = runs.checkpoint_dir(model_dir, step)
    if trainer.peft is not None and trainer.base_params is None:
        runs.restore_base(trainer, checkpoint, runs.read_base_pointer(checkpoint), None)
    return runs.restore_state_params(runs.state_dir(model_dir, step), trainer.abstract_state["params"])


def token_ids(example: dict, text_key: str, ids_key: str, vocabulary, length: int, add_eos: bool) -> list[int]:
    """Token ids of one field: `ids_key` as given, or `text_key` tokenized (trimmed to fit `length` with the EOS
    appended when add_eos, as seqio's append_eos_after_trim does)."""
    if ids_key in example:
        return [int(i) for i in example[ids_key]]
    ids = list(vocabulary.encode(example[text_key]))
    return ids[:max(length - 1, 0)] + [vocabulary.eos_id] if add_eos else ids[:length]


def _batches(examples: Sequence[dict], batch_size: int) -> Iterator[tuple[int, list[dict]]]:
    for start in range(0, len(examples), batch_size):
        yield start, list(examples[start:start + batch_size])


def _gather(out: jax.Array) -> np.ndarray:
    """A batch-sharded result as one numpy array on every process."""
    return np.asarray(jax.experimental.multihost_utils.process_allgather(out, tiled=True))


def _global(trainer: Trainer, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return pipeline.to_global(batch, trainer.partitioner.batch_sharding, host_local=False)


def generate_examples(trainer: Trainer, params, examples: Sequence[dict], vocabulary, *, input_length: int,
                      max_decode_length: int, target_length: int | None = None, batch_size: int = 8,
                      decode: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      num_beams: int = 4, alpha: float = 0.6, seed: int = 0,
                      inputs_add_eos: bool = True) -> list[dict]:
    """Returns each example (`inputs` text or `input_ids`) with `prediction` and `prediction_ids` added.

    decode: "greedy", "sample" (temperature, top_k, top_p, seed) or "beam" (num_beams, alpha).
    input_length / target_length: the task feature lengths the model was trained with (target_length, default
    max_decode_length, only sizes the rows of decoder-only models: prompt + targets, as in training).
    inputs_add_eos: append EOS to text inputs (the task's `inputs` feature `add_eos`).
    """
    model, eos = trainer.model, vocabulary.eos_id
    lengths = {"inputs": input_length, "targets": target_length or max_decode_length}
    results = []
    for start, chunk in _batches(examples, batch_size):
        inputs = [token_ids(ex, "inputs", "input_ids", vocabulary, input_length, inputs_add_eos) for ex in chunk]
        batch = _global(trainer, model.inference_batch(inputs, None, lengths, batch_size))
        # Trainer.generate: compiled once per decoding setting and batch shape, reused by later calls.
        out = trainer.generate(params, batch, max_decode_length=max_decode_length, eos_id=eos, method=decode,
                               temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, alpha=alpha,
                               rng=jax.random.fold_in(jax.random.key(seed), start))
        for example, row in zip(chunk, _gather(out)):
            ids = row.tolist()
            ids = ids[:ids.index(eos)] if eos in ids else ids
            results.append({**example, "prediction": vocabulary.decode(ids), "prediction_ids": ids})
    return results


def score_examples(trainer: Trainer, params, examples: Sequence[dict], vocabulary, *, input_length: int,
                   target_length: int, batch_size: int = 8, inputs_add_eos: bool = True,
                   targets_add_eos: bool = True) -> list[dict]:
    """Returns each example with `log_likelihood` (nats, summed over the target tokens the model scores) of its
    `targets` / `target_ids` given its `inputs` / `input_ids` (`trainer.model.score`).

    inputs_add_eos / targets_add_eos: append EOS to text inputs / targets (the task's features' `add_eos`).
    """
    lengths = {"inputs": input_length, "targets": target_length}
    results = []
    for _, chunk in _batches(examples, batch_size):
        if any("targets" not in ex and "target_ids" not in ex for ex in chunk):
            raise config_lib.ConfigError("--mode=score needs 'targets' (text) or 'target_ids' in every line.")
        inputs = [token_ids(ex, "inputs", "input_ids", vocabulary, input_length, inputs_add_eos) for ex in chunk]
        targets = [token_ids(ex, "targets", "target_ids", vocabulary, target_length, targets_add_eos)
                   for ex in chunk]
        batch = _global(trainer, trainer.model.inference_batch(inputs, targets, lengths, batch_size))
        scores = _gather(trainer.score(params, batch))
        results.extend({**ex, "log_likelihood": float(s)} for ex, s in zip(chunk, scores))
    return results


def generate(trainer: Trainer, params, vocabulary: seqio.Vocabulary, prompts: Sequence[str], *,
             input_length: int, max_decode_length: int, batch_size: int = 8) -> list[str]:
    """Greedy generations for raw text prompts (tokenized with `vocabulary`, EOS appended, truncated to fit)."""
    examples = [{"inputs": prompt} for prompt in prompts]
    results = generate_examples(trainer, params, examples, vocabulary, input_length=input_length,
                                max_decode_length=max_decode_length, batch_size=batch_size)
    return [r["prediction"] for r in results]
