"""Prompt tuning (Lester et al. 2021): P trainable input vectors in front of a frozen model's embedded input.

T5: the prompt is a prefix of the encoder input; the encoder, cross-attention and decoding see P + l_in positions
and the prompt positions are never masked. Llama: the P vectors are inserted into the token sequence at the start
(`position='start'`) or after the first token (`'after_bos'`: rows that begin with BOS); tokens after the insertion
point move P rotary positions on, and the prompt positions' outputs are dropped, so logits keep the input's length.
Packed rows (`train.pack = True`): every example gets its own prompt at its own start. The feature converter reserves
P slots per example (`feature_converter_kwargs`, itjax.data.prompt_slots) with the positions and segment ids the
unpacked insertion gives, and the model hook writes the prompt into them (`Prompt.fill`), so a packed row computes
what its examples compute one per row. Evaluation and inference rows stay unpacked (the insertion above).

Initialisations, as the prompt-tuning paper and repo:
  'uniform'        U(-init_range, init_range) (the repo's 0.5 default)
  'vocab'          rows sampled without replacement from the first `population_size` (5000) embedding rows
  'class_labels'   the first vectors are the embeddings of `class_labels` (each label's pieces averaged), the rest
                   sampled as 'vocab'

Adapter variable: `input_prompt.embedding` [P, embed], logical axes (None, 'embed').
"""

from __future__ import annotations

from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from itjax.peft import core
from itjax.peft.core import AdapterParam, PeftConfigError

INITS = ("uniform", "vocab", "class_labels")
POSITIONS = ("start", "after_bos")


class Prompt(nnx.Module):
    """The trainable prompt and the sequence bookkeeping the model hooks call (see T5 / Llama `input_prompt`)."""

    def __init__(self, values: jax.Array, offset: int):
        self.embedding = AdapterParam(values, out_sharding=(None, "embed"), eager_sharding=False)
        self.length = int(values.shape[0])
        self.offset = offset

    def _insert(self, x: jax.Array, middle: jax.Array) -> jax.Array:
        """x [batch, l, ...], middle [batch, P, ...] -> [batch, l + P, ...] with middle at `offset`."""
        return jnp.concatenate([x[:, :self.offset], middle.astype(x.dtype), x[:, self.offset:]], axis=1)

    def insert(self, x: jax.Array) -> jax.Array:
        """Embedded inputs [batch, l, embed] -> [batch, l + P, embed] with the prompt at `offset`."""
        prompt = jnp.broadcast_to(self.embedding[...].astype(x.dtype), (x.shape[0],) + self.embedding.shape)
        return self._insert(x, prompt)

    def _repeat(self, column: jax.Array) -> jax.Array:
        """[batch] -> [batch, P]."""
        return jnp.broadcast_to(column[:, None], (column.shape[0], self.length))

    def insert_ids(self, tokens: jax.Array, segment_ids: jax.Array | None = None):
        """Tokens [batch, l] as masks see them (P non-padding placeholders, id 1, at `offset`) and segment ids
        (the prompt joins the segment of the token after it). Returns (tokens, segment ids or None)."""
        tokens = self._insert(tokens, jnp.ones((tokens.shape[0], self.length), tokens.dtype))
        if segment_ids is not None:
            segment_ids = self._insert(segment_ids, self._repeat(segment_ids[:, self.offset]))
        return tokens, segment_ids

    def insert_mask(self, mask: jax.Array) -> jax.Array:
        """Token mask [batch, l] bool -> [batch, l + P] with the prompt positions real."""
        return self._insert(mask, jnp.ones((mask.shape[0], self.length), mask.dtype))

    def insert_sequence(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None):
        """Decoder-only rows: embedded x [batch, l, embed], positions [batch, l] -> x, positions and segment ids of
        length l + P. The prompt takes positions p..p+P-1 (p = the position of the token at `offset`); later
        tokens move P positions on."""
        start = positions[:, self.offset]
        prompt_positions = start[:, None] + jnp.arange(self.length, dtype=positions.dtype)[None, :]
        positions = jnp.concatenate([positions[:, :self.offset], prompt_positions,
                                     positions[:, self.offset:] + self.length], axis=1)
        if segment_ids is not None:
            segment_ids = self._insert(segment_ids, self._repeat(segment_ids[:, self.offset]))
        return self.insert(x), positions, segment_ids

    def fill(self, x: jax.Array, slots: jax.Array) -> jax.Array:
        """Packed rows: embedded x [batch, l, embed] with prompt vector k written where slots [batch, l] == k + 1
        (slots 0: x unchanged). Slot numbers above P give NaN (jnp.take's fill) rather than a wrong vector."""
        vectors = jnp.take(self.embedding[...].astype(x.dtype), jnp.maximum(slots - 1, 0), axis=0)
        return jnp.where((slots > 0)[..., None], vectors, x)

    @staticmethod
    def mark_slots(tokens: jax.Array, slots: jax.Array) -> jax.Array:
        """Packed rows: tokens [batch, l] as padding masks see them (prompt slots, token 0 in the data, real)."""
        return jnp.where(slots > 0, jnp.ones_like(tokens), tokens)

    def remove(self, x: jax.Array) -> jax.Array:
        """[batch, l + P, ...] -> [batch, l, ...]: drops the prompt positions."""
        return jnp.concatenate([x[:, :self.offset], x[:, self.offset + self.length:]], axis=1)


def _embedding_table(module: nnx.Module) -> jax.Array:
    table = module.embed_tokens if core.model_family(module) == "llama" else module.shared
    return table.embedding[...]


def _vocabulary(vocabulary):
    if isinstance(vocabulary, str):
        import seqio
        return seqio.SentencePieceVocabulary(vocabulary)
    return vocabulary


@gin.configurable(module="itjax.peft")
class PromptTuning(core.PeftMethod):
    """Soft prompt tuning.

    Args:
      length: number of prompt vectors P.
      position: 'start' (T5: the encoder input prefix; decoders: before the first token) or 'after_bos'
        (decoder-only rows that start with BOS).
      init: 'uniform', 'vocab' or 'class_labels' (see the module docstring).
      class_labels: label words for init='class_labels' (e.g. ['positive', 'negative']).
      vocabulary: a seqio vocabulary or a SentencePiece model path to tokenize class_labels; None = the training
        task's inputs vocabulary.
      init_range: half-width of the 'uniform' initialisation.
      population_size: 'vocab' samples from this many first (most frequent, for SentencePiece) embedding rows.
      max_input_length: optional input budget: TASK_FEATURE_LENGTHS['inputs'] + length must not exceed it (e.g.
        512, T5's pre-training length: the prompt-tuning setups shorten the inputs to make room for the prompt).
    """

    name = "prompt_tuning"

    def __init__(self, length: int = 20, position: str = "start", init: str = "vocab",
                 class_labels: Sequence[str] = (), vocabulary: Any = None, init_range: float = 0.5,
                 population_size: int = 5000, max_input_length: int | None = None):
        if length < 1:
            raise PeftConfigError(f"PromptTuning.length={length}; it must be a positive integer.")
        if position not in POSITIONS:
            raise PeftConfigError(f"PromptTuning.position={position!r}; expected one of {POSITIONS}.")
        if init not in INITS:
            raise PeftConfigError(f"PromptTuning.init={init!r}; expected one of {INITS}.")
        if init == "class_labels" and not class_labels:
            raise PeftConfigError("PromptTuning.init='class_labels' needs PromptTuning.class_labels (label words).")
        self.length = int(length)
        self.position = position
        self.init = init
        self.class_labels = tuple(class_labels)
        self.vocabulary = vocabulary
        self.init_range = float(init_range)
        self.population_size = int(population_size)
        self.max_input_length = max_input_length

    def __repr__(self) -> str:
        return f"PromptTuning(length={self.length}, position={self.position!r}, init={self.init!r})"

    def check(self, task_feature_lengths: dict, pack: bool, task=None) -> None:
        inputs = task_feature_lengths.get("inputs", 0)
        if pack:  # a row holds length + P slots, each example P + its own tokens: P >= length leaves no room for two
            key = "inputs" if "inputs" in task_feature_lengths else "targets"
            budget = task_feature_lengths.get(key, 0)
            if self.length >= budget:
                raise PeftConfigError(
                    f"PromptTuning.length={self.length} is not shorter than TASK_FEATURE_LENGTHS[{key!r}]={budget}: "
                    f"packed rows reserve {self.length} prompt slots in front of every example, so no two examples "
                    "would ever share a row. Use a shorter prompt, longer inputs, or train.pack = False.")
        if self.max_input_length is not None and inputs + self.length > self.max_input_length:
            raise PeftConfigError(
                f"PromptTuning.length={self.length} no longer fits: TASK_FEATURE_LENGTHS['inputs']={inputs} + "
                f"{self.length} prompt vectors > PromptTuning.max_input_length={self.max_input_length}; set "
                f"TASK_FEATURE_LENGTHS['inputs'] <= {self.max_input_length - self.length} or a shorter prompt.")
        if self.vocabulary is None and task is not None and "inputs" in task.output_features:
            self.vocabulary = task.output_features["inputs"].vocabulary

    def feature_converter_kwargs(self, pack: bool) -> dict:
        """Packed rows reserve the prompt's slots at its offset in every example (itjax.data.prompt_slots)."""
        if not pack:
            return {}
        return {"prompt_slots": self.length, "prompt_offset": 1 if self.position == "after_bos" else 0}

    def initial_values(self, table: jax.Array, rngs: nnx.Rngs) -> jax.Array:
        """[P, embed] float32 initial prompt from the (base) embedding table [vocab, embed]."""
        table = jnp.asarray(table)
        shape = (self.length, table.shape[1])
        if self.init == "uniform":
            return jax.random.uniform(rngs.params(), shape, jnp.float32, -self.init_range, self.init_range)
        population = min(self.population_size, table.shape[0])
        replace = self.length > population
        rows = jax.random.choice(rngs.params(), population, (self.length,), replace=replace)
        values = table[rows].astype(jnp.float32)
        if self.init == "class_labels":
            labels = self._label_embeddings(table)[:self.length]
            values = values.at[:labels.shape[0]].set(labels)
        return values

    def _label_embeddings(self, table: jax.Array) -> jax.Array:
        vocabulary = _vocabulary(self.vocabulary)
        if vocabulary is None:
            raise PeftConfigError("PromptTuning.init='class_labels' needs a vocabulary to tokenize the labels: set "
                                  "PromptTuning.vocabulary (a SentencePiece model path).")
        vectors = []
        for label in self.class_labels:
            ids = [i for i in vocabulary.encode(label) if 0 < i < table.shape[0]]
            if not ids:
                raise PeftConfigError(f"PromptTuning.class_labels: {label!r} encodes to no vocabulary pieces.")
            vectors.append(jnp.mean(table[jnp.asarray(ids)].astype(jnp.float32), axis=0))
        return jnp.stack(vectors)

    def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        family = core.model_family(module)
        if family == "t5" and self.position != "start":
            raise PeftConfigError(f"PromptTuning.position={self.position!r}: T5's prompt is the encoder input prefix; "
                                  "use 'start'.")
        offset = 1 if self.position == "after_bos" else 0
        module.input_prompt = Prompt(self.initial_values(_embedding_table(module), rngs), offset)
        return module
