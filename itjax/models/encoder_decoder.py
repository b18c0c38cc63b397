"""EncoderDecoderModel: the T5 family behind the `BaseModel` interface (the T5X `EncoderDecoderModel` idea).

Batches are the features of `seqio.EncDecFeatureConverter`: `encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights` [batch, length] and, when packed, `*_segment_ids` / `*_positions`.
Decoding encodes each row's `encoder_input_tokens` once and feeds the decoder from its start token
(`t5_decode_fns`, this family's hook into `itjax.models.decoding`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from itjax import flops, losses
from itjax.data.prompt_slots import PromptSlotsEncDecFeatureConverter
from itjax.models import decoding
from itjax.models.base import BaseModel
from itjax.models.t5 import T5, T5Config

gin.external_configurable(T5Config, module="itjax.models")

Batch = Mapping[str, jax.Array]


def t5_decode_fns(model: T5, encoder_input_tokens: jax.Array, max_decode_length: int) -> decoding.DecodeFns:
    """Decoding with a T5 module: encoder_input_tokens int32 [batch, l_in] (0 = padding, unpacked); the carry is
    the `t5.DecodeCache` (self-attention keys / values for max_decode_length positions, cross keys / values)."""

    def start():
        batch = encoder_input_tokens.shape[0]
        encoded = model.encode(encoder_input_tokens)
        cache = model.init_decode_cache(encoded, encoder_input_tokens, max_decode_length)
        first = jnp.full((batch,), model.config.decoder_start_token_id, jnp.int32)
        return model.decode_step(first, jnp.zeros((), jnp.int32), cache)

    def step(tokens, index, cache):
        # Generated token `index` sits at decoder position index + 1 (position 0 holds the start token).
        return model.decode_step(tokens, index + 1, cache)

    return decoding.DecodeFns(start, step, lambda cache: cache.batch_axes())


@gin.configurable(module="itjax.models")
class EncoderDecoderModel(BaseModel):
    """A T5-family model plus its training conventions.

    Args:
      config: the module's T5Config.
      z_loss: T5X's auxiliary z-loss coefficient (1e-4 in T5X's configs).
      loss_normalizing_factor: None (sum), a number, or a losses.SPECIAL_FACTORS name.
    """

    def __init__(self, config: T5Config = gin.REQUIRED, z_loss: float = 1e-4,
                 loss_normalizing_factor: float | str | None = losses.NUM_REAL_TARGET_TOKENS):
        super().__init__(config, z_loss=z_loss, loss_normalizing_factor=loss_normalizing_factor)

    def feature_converter(self, pack: bool = True, prompt_slots: int = 0, prompt_offset: int = 0,
                          **kwargs) -> seqio.FeatureConverter:
        """`seqio.EncDecFeatureConverter` (kwargs go to it); with `prompt_slots` P (prompt tuning on packed rows)
        its subclass reserving P encoder slots per example (`itjax.data.prompt_slots`; T5's prompt is always at
        the start: `prompt_offset` must be 0)."""
        if not prompt_slots:
            return seqio.EncDecFeatureConverter(pack=pack, **kwargs)
        if prompt_offset:
            raise ValueError(f"prompt_offset={prompt_offset}: T5's prompt slots are at the start of the inputs.")
        return PromptSlotsEncDecFeatureConverter(prompt_slots, pack=pack, **kwargs)

    def attention_shape(self) -> flops.AttentionShape:
        c = self.config
        return flops.AttentionShape(encoder_layers=c.num_encoder_layers, decoder_layers=c.num_decoder_layers,
                                    width=c.num_heads * c.d_kv, cross_attention=True,
                                    tied_output_embedding=("shared", "embedding") if c.tie_word_embeddings else None)

    def build_module(self, rngs: nnx.Rngs) -> T5:
        return T5(self.config, rngs=rngs)

    def logits(self, module: T5, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [batch, target_length, vocab] float32."""
        return module(
            batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"), decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"), decoder_positions=batch.get("decoder_positions"),
            encoder_prompt_slots=batch.get("encoder_prompt_slots"), dropout_rng=dropout_rng)

    def decode_fns(self, module: T5, batch: Batch, max_decode_length: int) -> decoding.DecodeFns:
        """Decoding of each row's `encoder_input_tokens` (unpacked); the other features are not read."""
        return t5_decode_fns(module, batch["encoder_input_tokens"], max_decode_length)

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
