"""Small helpers to use a trained model from Python (notebooks, scripts): restore its weights, generate text."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import seqio

from itjax.checkpoints import Checkpointer
from itjax.data.pipeline import to_global
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


def generate(trainer: Trainer, params, vocabulary: seqio.Vocabulary, prompts: Sequence[str], *,
             input_length: int, max_decode_length: int, batch_size: int = 8) -> list[str]:
    """Greedy generation for raw text prompts (tokenized with `vocabulary`, EOS appended, truncated to fit).

    Args:
      input_length: encoder length in tokens (prompts are padded / truncated to it).
      max_decode_length: maximum generated tokens per prompt.
    """
    eos = vocabulary.eos_id
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        tokens = np.zeros((batch_size, input_length), np.int32)
        for row, text in enumerate(chunk):
            ids = list(vocabulary.encode(text))[:input_length - 1] + [eos]
            tokens[row, :len(ids)] = ids
        batch = to_global({"encoder_input_tokens": tokens}, trainer.partitioner.batch_sharding, host_local=False)
        generated = np.asarray(trainer.predict(params, batch, max_decode_length, eos_id=eos))
        outputs.extend(vocabulary.decode(row.tolist()) for row in generated[:len(chunk)])
    return outputs
