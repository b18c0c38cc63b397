"""The decoder-only feature converter: instruction examples -> causal-LM training rows with a prompt mask.

Task features (int32 token ids, rank 1):
  `inputs` (optional: omit it from TASK_FEATURE_LENGTHS for chat / LM tasks): the prompt, no loss.
  `targets`: the response (or a whole conversation), EOS included as the task's vocabulary appends it.
  `targets_loss_mask` (optional, not a length key): 1 where a `targets` token carries loss (chat tasks: assistant
      turns), 0 elsewhere; absent means every target token carries loss.

Each example becomes the sequence `s = [bos] + inputs + targets` (bos only when `bos_id` is set) and the rows
    decoder_input_tokens  = s[:-1]          decoder_target_tokens = s[1:]
    decoder_loss_weights  = loss mask of s[1:]   (0 on prompt tokens)
    decoder_causal_attention = 1 on the prompt part of decoder_input_tokens (the tokens generation starts from;
                               a prefix-LM, `DecoderOnlyModel.prefix_lm`, attends bidirectionally over them, as
                               seqio's PrefixLMFeatureConverter marks them: per packed segment)
    decoder_segment_ids   = 1 on real positions (packed: 1, 2, ... per example), 0 on padding
    decoder_positions     = 0, 1, ... per example
so position t predicts token t + 1 (the HF causal-LM convention: no artificial start token is fed, which matters
for vocabularies where id 0 is a real token, e.g. Llama 3's "!"). Real positions are always marked by
`decoder_segment_ids`, never inferred from token values.

Length: the model length is inputs + targets from TASK_FEATURE_LENGTHS; the prompt is cut to `inputs` and the
targets to `targets` tokens before the sequence is built, so `bos + inputs + targets - 1` always fits.
Packing (`pack=True`) concatenates whole examples with seqio's packer (values shifted by one around it, see
`_convert_features`): attention and positions restart per segment. `prompt_slots` P > 0 (prompt tuning on packed
rows) reserves P slots in every example at `prompt_offset` and adds `decoder_prompt_slots` (`itjax.data.prompt_slots`).
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

from itjax.data import prompt_slots as slots_lib

PROMPT = "inputs"
TARGETS = "targets"
TARGETS_LOSS_MASK = "targets_loss_mask"
_INT = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
_FEATURES = ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights", "decoder_causal_attention")


class DecoderFeatureConverter(seqio.FeatureConverter):
    """Prompt / response (or masked conversation) examples -> decoder-only rows; see the module docstring.

    Args:
      pack: pack several examples per row (segment ids and restarted positions keep them apart).
      bos_id: token prepended to every sequence (Llama's <|begin_of_text|> / <s>); None for no BOS.
      prompt_slots, prompt_offset: P slots for a soft prompt at this index of every example (0: before the first
        token, 1: after BOS); rows get P more positions and `decoder_prompt_slots`.
    """

    TASK_FEATURES = {TARGETS: _INT}
    MODEL_FEATURES = {name: _INT for name in _FEATURES + ("decoder_segment_ids", "decoder_positions")}
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, pack: bool = True, bos_id: int | None = None, prompt_slots: int = 0, prompt_offset: int = 0,
                 **kwargs):
        super().__init__(pack=pack, **kwargs)
        self.decoder_bos_id = bos_id
        self.prompt_slots, self.prompt_offset = int(prompt_slots), int(prompt_offset)
        if self.prompt_slots:
            self.MODEL_FEATURES = {**self.MODEL_FEATURES, slots_lib.DECODER_SLOTS: _INT}

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # `inputs` is optional: the task features are whichever of inputs / targets the lengths name.
        self.TASK_FEATURES = {k: _INT for k in task_feature_lengths if k in (PROMPT, TARGETS)}
        if TARGETS not in self.TASK_FEATURES:
            raise ValueError(f"TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} needs a 'targets' length for a "
                             "decoder-only model (and 'inputs' for prompt/response tasks).")
        return super().__call__(ds, task_feature_lengths)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        length = sum(task_feature_lengths.get(k, 0) for k in (PROMPT, TARGETS)) + self.prompt_slots
        return {name: length for name in self.MODEL_FEATURES}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        prompt_length = task_feature_lengths.get(PROMPT, 0)
        target_length = task_feature_lengths[TARGETS]
        bos = [] if self.decoder_bos_id is None else [self.decoder_bos_id]

        def to_row(ex):
            targets = tf.cast(ex[TARGETS][:target_length], tf.int32)
            mask = ex.get(TARGETS_LOSS_MASK, tf.ones_like(ex[TARGETS]))
            mask = tf.cast(mask[:tf.size(targets)], tf.int32)
            prompt = tf.cast(ex[PROMPT][:prompt_length], tf.int32) if PROMPT in ex and prompt_length else \
                tf.zeros([0], tf.int32)
            prompt = tf.concat([tf.constant(bos, tf.int32), prompt], 0)
            sequence = tf.concat([prompt, targets], 0)
            weights = tf.concat([tf.zeros_like(prompt), mask], 0)
            n = tf.size(sequence) - 1
            return {
                "decoder_input_tokens": sequence[:-1],
                "decoder_target_tokens": sequence[1:],
                "decoder_loss_weights": weights[1:],
                "decoder_causal_attention": tf.cast(tf.range(n) < tf.size(prompt), tf.int32),
                "decoder_segment_ids": tf.ones([n], tf.int32),
                "decoder_positions": tf.range(n, dtype=tf.int32),
            }

        ds = ds.map(to_row, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.filter(lambda ex: tf.size(ex["decoder_input_tokens"]) > 0)  # a lone token has nothing to predict
        slots, offset = self.prompt_slots, self.prompt_offset
        if slots:  # slot tokens / targets 0 (no text, no loss), prompt-side, in the example's segment
            fill = dict.fromkeys(_FEATURES + ("decoder_positions",), 0) | {"decoder_causal_attention": 1,
                                                                             "decoder_segment_ids": 1}
            ds = ds.map(lambda ex: slots_lib.insert_slots(ex, slots, offset, fill) | {
                "decoder_positions": tf.range(tf.size(ex["decoder_positions"]) + slots, dtype=tf.int32)})
        lengths = {name: prompt_length + target_length + slots for name in _FEATURES}
        if not self.pack:
            lengths.update(decoder_segment_ids=lengths["decoder_input_tokens"],
                           decoder_positions=lengths["decoder_input_tokens"])
            return self._mark_slots(seqio.utils.trim_and_pad_dataset(ds, lengths))
        # seqio's packer finds each example's length by counting non-zero values, which would cut loss weights
        # at their first 0 and drop real 0 ids (Llama 3's "!"); shifting every value by +1 makes lengths exact.
        ds = ds.map(lambda ex: {k: ex[k] + 1 for k in _FEATURES})
        packed = seqio.utils.trim_and_pack_dataset(ds, lengths, use_custom_ops=self._use_custom_packing_ops)

        def unshift(ex):
            segment_ids = ex["decoder_target_tokens_segment_ids"]
            row = {k: tf.where(segment_ids > 0, ex[k] - 1, 0) for k in _FEATURES}
            row["decoder_segment_ids"] = segment_ids
            row["decoder_positions"] = ex["decoder_target_tokens_positions"]
            return row

        return self._mark_slots(packed.map(unshift, num_parallel_calls=tf.data.AUTOTUNE))

    def _mark_slots(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        if not self.prompt_slots:
            return ds
        return ds.map(lambda row: row | {slots_lib.DECODER_SLOTS: slots_lib.slot_numbers(
            row["decoder_positions"], row["decoder_segment_ids"], self.prompt_slots, self.prompt_offset)})
