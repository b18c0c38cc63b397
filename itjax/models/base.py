"""BaseModel: the one contract between a model family and the rest of itjax (T5X's `BaseModel` idea).

The trainer, evaluation, inference and the dry run call a model only through these methods; a family
(`EncoderDecoderModel` for T5, `DecoderOnlyModel` for Llama) fills in the abstract ones:

    feature_converter(pack)              the seqio feature converter of its rows (packed or not)
    build_module(rngs)                   its nnx module (make_module / abstract_module wrap it)
    logits(module, batch, dropout_rng)   teacher-forced logits [batch, length, vocab] float32
    decode_fns(module, batch, n)         how `itjax.models.decoding` continues each row (a `decoding.DecodeFns`)
    inference_batch(...)                 its rows built from token ids (for `itjax.inference`)

and inherits what is the same for every family: the constructor (config, z_loss, loss_normalizing_factor),
make_module / abstract_module, loss_weights (the loss normaliser), loss_terms, dropout_enabled, generate /
predict (any decoding method) and score. Batches are the feature converter's int32 [batch, length] arrays; every
family has `decoder_target_tokens` and `decoder_loss_weights` (and, packed, `decoder_segment_ids`).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from itjax import flops, losses
from itjax.models import decoding

if TYPE_CHECKING:  # seqio (and TensorFlow) load with a family's feature converter, not with this interface
    import seqio

Batch = Mapping[str, jax.Array]


class BaseModel(abc.ABC):
    """A model family's module plus its training conventions.

    Args:
      config: the module's config dataclass (T5Config, LlamaConfig); must have `dropout_rate`.
      z_loss: T5X's auxiliary z-loss coefficient (1e-4 in T5X's configs; 0 for plain cross-entropy).
      loss_normalizing_factor: None (sum), a number, or a losses.SPECIAL_FACTORS name.
    """

    def __init__(self, config, z_loss: float = 1e-4,
                 loss_normalizing_factor: float | str | None = losses.NUM_REAL_TARGET_TOKENS):
        self.config = config
        self.z_loss = z_loss
        self.loss_normalizing_factor = loss_normalizing_factor

    # ------------------------------------------------------------------------------------------ per family
    @abc.abstractmethod
    def feature_converter(self, pack: bool = True, **kwargs) -> seqio.FeatureConverter:
        """The seqio feature converter producing this model's rows; `pack` concatenates examples per row.
        kwargs go to the converter (e.g. `use_custom_packing_ops`)."""

    @abc.abstractmethod
    def build_module(self, rngs: nnx.Rngs) -> nnx.Module:
        """The family's nnx module for `self.config`, parameters drawn from `rngs`."""

    @abc.abstractmethod
    def logits(self, module: nnx.Module, batch: Batch, dropout_rng: jax.Array | None = None) -> jax.Array:
        """Teacher-forced logits [batch, length, vocab] float32; position t scores decoder_target_tokens[:, t]."""

    @abc.abstractmethod
    def decode_fns(self, module: nnx.Module, batch: Batch, max_decode_length: int) -> decoding.DecodeFns:
        """How `itjax.models.decoding` continues each (unpacked) row of `batch` for max_decode_length tokens."""

    @abc.abstractmethod
    def inference_batch(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]] | None,
                        lengths: Mapping[str, int], batch_size: int) -> dict[str, np.ndarray]:
        """Unpacked rows of `feature_converter(pack=False)` from token ids (targets None: for generation).
        Returns int32 arrays with batch_size rows; rows past len(inputs) are padding."""

    @abc.abstractmethod
    def attention_shape(self) -> flops.AttentionShape:
        """Layer counts and attention width for the model-FLOP count (`itjax.flops.train_step_flops`)."""

    # -------------------------------------------------------------------------------------------- shared
    def feature_converter_cls(self, pack: bool = True, **kwargs) -> seqio.FeatureConverter:
        """The former name of `feature_converter` (same call: `model.feature_converter_cls(pack=...)`)."""
        return self.feature_converter(pack=pack, **kwargs)

    def make_module(self, seed: int) -> nnx.Module:
        """A freshly initialised module (parameters drawn from `seed`)."""
        return self.build_module(nnx.Rngs(params=seed))

    def abstract_module(self, seed: int = 0) -> nnx.Module:
        """The module with ShapeDtypeStruct leaves: shapes and logical axes without allocating weights."""
        return nnx.eval_shape(lambda: self.make_module(seed))

    @property
    def dropout_enabled(self) -> bool:
        """Whether training draws dropout keys (the config's dropout_rate > 0)."""
        return self.config.dropout_rate > 0

    def loss_weights(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """The loss normaliser for a global batch: (per-token weights [batch, length] float32, divisor scalar).

        The training loss is `loss_terms(module, batch, weights)["loss_sum"] / divisor` (`loss_normalizing_factor`
        decides both; see `losses.normalized_weights_and_factor`).
        """
        return losses.normalized_weights_and_factor(batch["decoder_loss_weights"], batch.get("decoder_segment_ids"),
                                                    self.loss_normalizing_factor)

    def loss_terms(self, module: nnx.Module, batch: Batch, weights: jax.Array,
                   dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        """Sums over the batch: weighted loss (z-loss included), z-loss, correct target tokens, target tokens.

        `weights` [batch, length] are the (possibly renormalised) per-token loss weights.
        """
        return losses.teacher_forced_terms(self.logits(module, batch, dropout_rng), batch["decoder_target_tokens"],
                                           batch["decoder_loss_weights"], weights, self.z_loss)

    def score(self, module: nnx.Module, batch: Batch) -> jax.Array:
        """Log-likelihood of each row's target tokens: [batch] float32 (nats, summed over loss-weighted tokens)."""
        return losses.target_log_likelihood(self.logits(module, batch), batch["decoder_target_tokens"],
                                            batch["decoder_loss_weights"])

    def generate(self, module: nnx.Module, batch: Batch, *, max_decode_length: int, eos_id: int | jax.Array,
                 method: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 rng: jax.Array | None = None, num_beams: int = 4, alpha: float = 0.6) -> jax.Array:
        """Decodes each row with a KV cache (`decoding.generate`: "greedy", "sample" or "beam").

        Returns int32 [batch, max_decode_length]: generated tokens, EOS included, 0 after EOS.
        """
        return decoding.generate(self.decode_fns(module, batch, max_decode_length),
                                 max_decode_length=max_decode_length, eos_id=eos_id, method=method,
                                 temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, num_beams=num_beams,
                                 alpha=alpha)

    def predict(self, module: nnx.Module, batch: Batch, max_decode_length: int, eos_id: int = 1) -> jax.Array:
        """Greedy decoding with a KV cache: [batch, max_decode_length] token ids (0 after EOS)."""
        return self.generate(module, batch, max_decode_length=max_decode_length, eos_id=eos_id)
