"""EncoderDecoderModel: what the trainer needs from a T5-family model (the T5X `EncoderDecoderModel` idea).

It owns the module config and the loss conventions, and exposes pure functions of (module, batch) that the
trainer jits: `loss_terms` for training / teacher-forced eval, `predict` for generation, `score` for
per-example log-likelihoods; `decode_fns` (the model's hook into `itjax.models.decoding`) and `inference_batch`
(rows from token ids) serve `itjax.inference`. Batches are the features of `seqio.EncDecFeatureConverter`:
`encoder_input_tokens`, `decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` [batch, length]
and, when packed, `*_segment_ids` / `*_positions`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import gin
import jax
import numpy as np
import seqio
from flax import nnx

from itjax import losses
from itjax.models import decoding
from itjax.models.t5 import T5, T5Config

gin.external_configurable(T5Config, module="itjax.models")

Batch = Mapping[str, jax.Array]


@gin.configurable(module="itjax.models")
class EncoderDecoderModel:
    """A T5-family model plus its training conventions.

    Args:
      config: the module's T5Config.
      z_loss: T5X's auxiliary z-loss coefficient (1e-4 in T5X's configs).
      loss_normalizing_factor: None (sum), a number, or a losses.SPECIAL_FACTORS name.
    """

    feature_converter_cls = seqio.EncDecFeatureConverter

    def __init__(self, config: T5Config = gin.REQUIRED, z_loss: float = 1e-4,
                 loss_normalizing_factor: float | str | None = losses.NUM_REAL_TARGET_TOKENS):
        self.config = config
        self.z_loss = z_loss
        self.loss_normalizing_factor = loss_normalizing_factor

    def make_module(self, seed: int) -> T5:
        """A freshly initialised module (parameters drawn from `seed`)."""
        return T5(self.config, rngs=nnx.Rngs(params=seed))

    def abstract_module(self, seed: int = 0) -> T5:
        """The module with ShapeDtypeStruct leaves: shapes and logical axes without allocating weights."""
        return nnx.eval_shape(lambda: self.make_module(seed))

    @staticmethod
    def logits(module: T5, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [batch, target_length, vocab] float32."""
        return module(
            batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"), decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"), decoder_positions=batch.get("decoder_positions"),
            dropout_rng=dropout_rng)

    def loss_terms(self, module: T5, batch: Batch, weights: jax.Array,
                   dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """Sums over the batch: weighted loss (z-loss included), z-loss, correct tokens, real target tokens.

        `weights` [batch, length] are the (possibly renormalised) per-token loss weights.
        """
        return losses.teacher_forced_terms(self.logits(module, batch, dropout_rng), batch["decoder_target_tokens"],
                                           batch["decoder_loss_weights"], weights, self.z_loss)

    @staticmethod
    def decode_fns(module: T5, batch: Batch, max_decode_length: int) -> decoding.DecodeFns:
        """Decoding of each row's `encoder_input_tokens` (unpacked) for `itjax.models.decoding`."""
        return decoding.t5_decode_fns(module, batch["encoder_input_tokens"], max_decode_length)

    def predict(self, module: T5, batch: Batch, max_decode_length: int, eos_id: int = 1) -> jax.Array:
        """Greedy decoding with a KV cache: [batch, max_decode_length] token ids (0 after EOS)."""
        return decoding.greedy(self.decode_fns(module, batch, max_decode_length), max_decode_length=max_decode_length,
                               eos_id=eos_id)

    def inference_batch(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]] | None,
                        lengths: Mapping[str, int], batch_size: int) -> dict[str, np.ndarray]:
        """Unpacked `seqio.EncDecFeatureConverter` rows from token ids (EOS already appended where wanted).

        inputs / targets are cut to lengths['inputs'] / lengths['targets']; targets None (generation) leaves the
        decoder features 0. Returns int32 arrays with batch_size rows; rows past len(inputs) are padding.
        """
        def pad(rows, length):
            out = np.zeros((batch_size, length), np.int32)
            for i, row in enumerate(rows):
                row = list(row)[:length]
                out[i, :len(row)] = row
            return out

        target_tokens = pad(targets if targets is not None else [], lengths["targets"])
        decoder_inputs = np.roll(target_tokens, 1, axis=1)  # seqio's autoregressive inputs: start + targets[:-1]
        decoder_inputs[:, 0] = self.config.decoder_start_token_id
        return {
            "encoder_input_tokens": pad(inputs, lengths["inputs"]),
            "decoder_input_tokens": decoder_inputs,
            "decoder_target_tokens": target_tokens,
            "decoder_loss_weights": (target_tokens > 0).astype(np.int32),
        }

    def score(self, module: T5, batch: Batch) -> jax.Array:
        """Log-likelihood of each example's targets under the model: [batch] float32 (nats, summed over tokens)."""
        return losses.target_log_likelihood(self.logits(module, batch), batch["decoder_target_tokens"],
                                            batch["decoder_loss_weights"])
