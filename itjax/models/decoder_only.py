"""DecoderOnlyModel: the Llama family behind the `BaseModel` interface (T5X's `DecoderOnlyModel` idea).

Rows are those of `itjax.data.feature_converters.DecoderFeatureConverter`:
`decoder_input_tokens`, `decoder_target_tokens`, `decoder_loss_weights` (0 on prompt tokens),
`decoder_causal_attention` (1 on the prompt), `decoder_segment_ids` (0 = padding) and `decoder_positions`,
all int32 [batch, length]. Position t of a row predicts its token t + 1, so the loss, the teacher-forced accuracy
and `score` only count target tokens, and decoding continues each row's prompt (`llama_decode_fns`, this family's
hook into `itjax.models.decoding`).

Attention is causal by default (as HF's Llamas, converted or not). `prefix_lm=True` makes it a prefix LM, T5X's
decoder-only option: the prompt tokens of each packed segment (`decoder_causal_attention`) attend to each other
bidirectionally, the targets causally; generation encodes the prompt bidirectionally at prefill, then decodes
causally, so cached decoding computes exactly what the full-sequence pass does.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from itjax import flops, losses
from itjax.data.feature_converters import DecoderFeatureConverter
from itjax.models import decoding
from itjax.models.base import BaseModel
from itjax.models.llama import Llama, LlamaConfig

Batch = Mapping[str, jax.Array]


def llama_decode_fns(model: Llama, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                     max_decode_length: int, prefix_lm: bool = False) -> decoding.DecodeFns:
    """Decoding with a Llama module: prompt_tokens int32 [batch, l], prompt_mask bool [batch, l] True at real
    prompt tokens (left, right or no padding; each row's real tokens contiguous, at least one); prefix_lm: the
    prompt attends to itself bidirectionally at prefill (`DecoderOnlyModel.prefix_lm`). The carry is
    (`llama.DecodeCache` of l + max_decode_length slots, rotary position [batch] int32 of the next token to feed);
    each row continues at its own position."""

    def start():
        cache = model.init_decode_cache(prompt_tokens.shape[0], prompt_tokens.shape[1] + max_decode_length)
        logits, positions, cache = model.prefill(prompt_tokens, prompt_mask, cache, bidirectional=prefix_lm)
        return logits, (cache, positions)

    def step(tokens, index, carry):
        del index  # each row has its own position, carried
        cache, positions = carry
        logits, cache = model.decode_step(tokens, positions, cache)
        return logits, (cache, positions + 1)

    return decoding.DecodeFns(start, step, lambda carry: (carry[0].batch_axes(), 0))


@gin.configurable(module="itjax.models")
class DecoderOnlyModel(BaseModel):
    """A Llama-family causal LM plus its instruction-tuning conventions.

    Args:
      config: the module's LlamaConfig.
      z_loss: auxiliary z-loss coefficient (T5X's 1e-4; 0 for plain cross-entropy).
      loss_normalizing_factor: None (sum), a number, or a losses.SPECIAL_FACTORS name.
      bos_id: token the feature converter puts before every prompt (Llama 3: 128000, Llama 2: 1); None for
        vocabularies without BOS (the quickstart's SentencePiece model).
      prefix_lm: bidirectional attention over each segment's prompt (`decoder_causal_attention`), causal over
        its targets (T5X's prefix-LM decoders); False (the default) keeps the causal LM that HF Llamas are.
    """

    def __init__(self, config: LlamaConfig = gin.REQUIRED, z_loss: float = 1e-4,
                 loss_normalizing_factor: float | str | None = losses.NUM_REAL_TARGET_TOKENS,
                 bos_id: int | None = None, prefix_lm: bool = False):
        super().__init__(config, z_loss=z_loss, loss_normalizing_factor=loss_normalizing_factor)
        if prefix_lm and config.attention_impl == "splash":
            raise ValueError("DecoderOnlyModel.prefix_lm = True needs LlamaConfig.attention_impl 'xla' or 'cudnn': the "
                             "splash kernel's masks are fixed when it is built, but each row's prompt length differs.")
        self.bos_id = bos_id
        self.prefix_lm = prefix_lm

    def feature_converter(self, pack: bool = True, **kwargs) -> DecoderFeatureConverter:
        """`DecoderFeatureConverter` with this model's `bos_id` (kwargs go to it)."""
        return DecoderFeatureConverter(pack=pack, bos_id=self.bos_id, **kwargs)

    def attention_shape(self) -> flops.AttentionShape:
        c = self.config
        return flops.AttentionShape(encoder_layers=0, decoder_layers=c.num_layers, width=c.num_heads * c.head_dim,
                                    cross_attention=False,
                                    tied_output_embedding=(("embed_tokens", "embedding")
                                                           if c.tie_word_embeddings else None))

    def build_module(self, rngs: nnx.Rngs) -> Llama:
        return Llama(self.config, rngs=rngs)

    def logits(self, module: Llama, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [batch, length, vocab] float32; position t scores decoder_target_tokens[t]."""
        prefix = batch["decoder_causal_attention"] > 0 if self.prefix_lm else None
        return module(batch["decoder_input_tokens"], positions=batch["decoder_positions"],
                      segment_ids=batch["decoder_segment_ids"], prompt_slots=batch.get("decoder_prompt_slots"),
                      dropout_rng=dropout_rng, prefix_mask=prefix)

    def decode_fns(self, module: Llama, batch: Batch, max_decode_length: int) -> decoding.DecodeFns:
        """Continuation of each row's prompt: the `decoder_causal_attention` tokens of `decoder_input_tokens`
        (BOS + inputs; any padding side); a row without one starts from its first token."""
        tokens = batch["decoder_input_tokens"]
        mask = batch["decoder_causal_attention"] > 0
        first = jnp.arange(tokens.shape[1])[None, :] == 0
        mask = mask | (first & ~jnp.any(mask, axis=1, keepdims=True))
        return llama_decode_fns(module, jnp.where(mask, tokens, 0), mask, max_decode_length, self.prefix_lm)

    def inference_batch(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]] | None,
                        lengths: Mapping[str, int], batch_size: int) -> dict[str, np.ndarray]:
        """Unpacked rows of `DecoderFeatureConverter` for generation (targets None) or scoring.

        inputs / targets: token ids per example (EOS already appended where the task's features want it); they
        are cut to lengths['inputs'] / lengths['targets'], the prompt is [bos_id] + inputs (no EOS added here).
        Returns int32 [batch_size, inputs + targets length] arrays; rows past len(inputs) are padding. For
        generation a row holds the whole prompt, marked by decoder_causal_attention.
        """
        prompt_length, target_length = lengths.get("inputs", 0), lengths["targets"]
        width = prompt_length + target_length
        bos = [] if self.bos_id is None else [self.bos_id]
        rows = {name: np.zeros((batch_size, width), np.int32) for name in DecoderFeatureConverter.MODEL_FEATURES}
        for i, ids in enumerate(inputs):
            prompt = bos + list(ids)[:prompt_length]
            response = list(targets[i])[:target_length] if targets is not None else []
            sequence = prompt + response
            if response:
                n = len(sequence) - 1
                row_inputs, row_targets = sequence[:-1], sequence[1:]
                weights = ([0] * len(prompt) + [1] * len(response))[1:]
            else:  # generation: every prompt token is an input
                n = len(prompt)
                row_inputs, row_targets, weights = prompt, prompt[1:] + [0], [0] * n
            rows["decoder_input_tokens"][i, :n] = row_inputs
            rows["decoder_target_tokens"][i, :n] = row_targets
            rows["decoder_loss_weights"][i, :n] = weights
            rows["decoder_causal_attention"][i, :n] = np.arange(n) < len(prompt)
            rows["decoder_segment_ids"][i, :n] = 1
            rows["decoder_positions"][i, :n] = np.arange(n)
        return rows
