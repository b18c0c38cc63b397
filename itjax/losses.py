"""Token-level cross entropy with T5X's z-loss and loss-normalizing-factor conventions."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# String values accepted for `loss_normalizing_factor` (T5X's SpecialLossNormalizingFactor names).
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"      # divide by the number of target tokens with weight > 0
NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"    # divide by batch * target length (padding included)
AVERAGE_PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"          # mean over tokens within each sequence, then over sequences
SPECIAL_FACTORS = (NUM_REAL_TARGET_TOKENS, NUM_TOTAL_TARGET_TOKENS, AVERAGE_PER_SEQUENCE)


def cross_entropy_with_z_loss(logits: jax.Array, targets: jax.Array, z_loss: float = 0.0
                              ) -> tuple[jax.Array, jax.Array]:
    """Per-token cross entropy plus `z_loss * log(Z)^2` (keeps the softmax normaliser near 1, as in T5X / PaLM).

    Args:
      logits: [batch, length, vocab] float32.
      targets: [batch, length] int token ids.
      z_loss: coefficient of the auxiliary z-loss (T5X default 1e-4).
    Returns:
      (loss, z_loss_term), both [batch, length] float32 in nats; `loss` already includes `z_loss_term`.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    z_term = z_loss * jnp.square(log_z)
    return log_z - target_logit + z_term, z_term


def normalized_weights_and_factor(weights: jax.Array, segment_ids: jax.Array | None,
                                  loss_normalizing_factor: float | str | None) -> tuple[jax.Array, jax.Array]:
    """Returns (per-token weights, scalar divisor) so that loss = sum(token_loss * weights) / divisor.

    Computed on the whole global batch *before* it is split into microbatches, so gradient accumulation gives
    the same update as one big batch.

    Args:
      weights: [batch, length] target loss weights (0 for padding / non-target tokens).
      segment_ids: [batch, length] packed segment ids, or None when examples are not packed.
      loss_normalizing_factor: None (plain sum), a number (sum / number, T5X's fixed factor), or one of
        SPECIAL_FACTORS.
    """
    weights = weights.astype(jnp.float32)
    if loss_normalizing_factor is None:
        return weights, jnp.float32(1.0)
    if isinstance(loss_normalizing_factor, (int, float)):
        return weights, jnp.float32(loss_normalizing_factor)
    if loss_normalizing_factor == NUM_REAL_TARGET_TOKENS:
        return weights, jnp.maximum(jnp.sum(weights), 1.0)
    if loss_normalizing_factor == NUM_TOTAL_TARGET_TOKENS:
        return weights, jnp.float32(weights.size)
    if loss_normalizing_factor == AVERAGE_PER_SEQUENCE:
        if segment_ids is None:
            segment_ids = (weights > 0).astype(jnp.int32)
        # Tokens per (row, segment): compare every position's segment id with every other's in the row.
        same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
        tokens_in_segment = jnp.einsum("bqk,bk->bq", same_segment.astype(jnp.float32), weights)
        per_token = jnp.where(weights > 0, weights / jnp.maximum(tokens_in_segment, 1.0), 0.0)
        num_sequences = jnp.sum(per_token)  # each real sequence contributes exactly 1
        return per_token, jnp.maximum(num_sequences, 1.0)
    raise ValueError(f"loss_normalizing_factor={loss_normalizing_factor!r} is not a number, None or one of "
                     f"{SPECIAL_FACTORS}; fix the gin binding `loss_normalizing_factor`.")


def teacher_forced_terms(logits: jax.Array, targets: jax.Array, loss_weights: jax.Array, weights: jax.Array,
                         z_loss: float) -> dict[str, jax.Array]:
    """Batch sums the trainer needs from teacher-forced logits [batch, length, vocab] and int targets
    [batch, length]: weighted loss (z-loss included) and z-loss under `weights` (the renormalised per-token
    weights), plus correct argmax tokens and the number of real target tokens (`loss_weights` > 0)."""
    token_loss, z_term = cross_entropy_with_z_loss(logits, targets, z_loss)
    real = (loss_weights > 0).astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * real
    return {
        "loss_sum": jnp.sum(token_loss * weights),
        "z_loss_sum": jnp.sum(z_term * weights),
        "correct": jnp.sum(correct),
        "tokens": jnp.sum(real),
    }


def target_log_likelihood(logits: jax.Array, targets: jax.Array, loss_weights: jax.Array) -> jax.Array:
    """Summed log-probability (nats) of each row's targets where `loss_weights` > 0: [batch] float32."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(target_lp * (loss_weights > 0), axis=-1)
