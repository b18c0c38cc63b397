"""Prompt slots: room for a soft prompt (prompt tuning) at the start of every packed example.

Prompt tuning on packed rows gives every example of a row its own copy of the P prompt vectors, at its own start,
so a packed row is equivalent to its examples run one per row. The data pipeline reserves P slots in front of each
example *before* packing (so the packer's length budget counts them and a row never overflows), and the model's
prompt hook writes prompt vector k into slot k (`itjax.peft.prompt_tuning.Prompt.fill`). The slots are a row
feature, int32 [batch, length]:

    encoder_prompt_slots (T5, encoder side) / decoder_prompt_slots (Llama)
        k + 1 at the k-th prompt slot of a segment (k = 0 .. P-1), 0 elsewhere.

Slot tokens are 0 (not text: token counts and `text_tokens` skip them) while the segment ids and positions treat
them as real: T5's encoder input becomes [P slots] + inputs with `inputs` P longer; a decoder row becomes
[P slots] + sequence (`offset` 0) or [bos] + [P slots] + rest (`offset` 1, PromptTuning.position='after_bos'),
its positions counting the slots, as the unpacked prompt hook numbers them.
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf

ENCODER_SLOTS = "encoder_prompt_slots"
DECODER_SLOTS = "decoder_prompt_slots"


def slot_numbers(positions: tf.Tensor, segment_ids: tf.Tensor, length: int, offset: int = 0) -> tf.Tensor:
    """The slots feature from a row's positions / segment ids [..., l]: position - offset + 1 where
    offset <= position < offset + length in a real segment, else 0."""
    inside = (segment_ids > 0) & (positions >= offset) & (positions < offset + length)
    return tf.where(inside, positions - offset + 1, 0)


def insert_slots(row: Mapping[str, tf.Tensor], length: int, offset: int, fill: Mapping[str, int]) -> dict:
    """One example's features [n] -> [n + length] with `length` entries of fill[name] at `offset`."""
    return {name: tf.concat([value[:offset], tf.fill([length], tf.constant(fill[name], value.dtype)),
                             value[offset:]], 0) for name, value in row.items()}


class PromptSlotsEncDecFeatureConverter(seqio.EncDecFeatureConverter):
    """`seqio.EncDecFeatureConverter` for packed rows with P prompt slots in front of every example's inputs.

    The model's encoder length is TASK_FEATURE_LENGTHS['inputs'] + P (as the unpacked prompt hook makes it): each
    example keeps up to `inputs` tokens of its own, as unpacked. Adds `encoder_prompt_slots`.
    """

    MODEL_FEATURES = {**seqio.EncDecFeatureConverter.MODEL_FEATURES,
                      ENCODER_SLOTS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}

    def __init__(self, prompt_slots: int, pack: bool = True, **kwargs):
        if not pack or prompt_slots < 1:
            raise ValueError(f"PromptSlotsEncDecFeatureConverter(prompt_slots={prompt_slots}, pack={pack}): prompt "
                             "slots are for packed rows (pack=True) and need prompt_slots >= 1.")
        super().__init__(pack=True, **kwargs)
        self.prompt_slots = int(prompt_slots)

    def _with_slots(self, task_feature_lengths: Mapping[str, int]) -> dict:
        return {**task_feature_lengths, "inputs": task_feature_lengths["inputs"] + self.prompt_slots}

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        length = self.prompt_slots
        lengths = task_feature_lengths

        def reserve(ex):  # placeholders 1 (the packer measures an example by its non-zero entries), zeroed below
            inputs = tf.cast(ex["inputs"][:lengths["inputs"]], tf.int32)
            return {**ex, "inputs": tf.concat([tf.ones([length], tf.int32), inputs], 0)}

        def mark(row):
            slots = slot_numbers(row["encoder_positions"], row["encoder_segment_ids"], length)
            return {**row, "encoder_input_tokens": tf.where(slots > 0, 0, row["encoder_input_tokens"]),
                    ENCODER_SLOTS: slots}

        packed = super()._convert_features(ds.map(reserve, num_parallel_calls=tf.data.AUTOTUNE),
                                           self._with_slots(task_feature_lengths))
        return packed.map(mark, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        lengths = super().get_model_feature_lengths(self._with_slots(task_feature_lengths))
        return {**lengths, ENCODER_SLOTS: lengths["encoder_input_tokens"]}
