"""Autoregressive decoding for the encoder-decoder models with a functional key/value cache.

The encoder runs once, the cross-attention keys / values are computed once, and the decoder advances one token
per `jax.lax.while_loop` iteration, reading and writing self-attention keys / values in arrays
[batch, max_decode_length, heads, kv] carried by the loop (`itjax.models.t5.DecodeCache`). Everything is
jittable: jit a function that merges the model from its state and calls the decoder here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from itjax.models.t5 import T5, DecodeCache


class _GreedyState(NamedTuple):
    position: jax.Array  # scalar int32, the decoder position being fed
    last_tokens: jax.Array  # [batch] int32, the tokens at `position`
    cache: DecodeCache
    tokens: jax.Array  # [batch, max_decode_length] int32, generated so far (0 elsewhere)
    done: jax.Array  # [batch] bool, True once the row has emitted EOS


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Masks logits [batch, vocab] outside the top-k tokens and outside the nucleus of probability top_p.

    top_k=0 and top_p=1.0 disable the filters. The nucleus keeps the smallest set of most likely tokens whose
    probability reaches top_p (the most likely token is always kept).
    """
    masked = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, masked, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Probability mass of the tokens strictly more likely than each sorted token.
        before = cumulative - jax.nn.softmax(sorted_logits, axis=-1)
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, masked, logits)
    return logits


def greedy_decode(
    model: T5, encoder_input_tokens: jax.Array, *, max_decode_length: int, eos_id: int = 1
) -> jax.Array:
    """Greedy (argmax) decoding: `sample_decode` with temperature 0. Returns [batch, max_decode_length]."""
    return sample_decode(model, encoder_input_tokens, max_decode_length=max_decode_length, eos_id=eos_id)


def sample_decode(
    model: T5, encoder_input_tokens: jax.Array, *, max_decode_length: int, eos_id: int = 1,
    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
) -> jax.Array:
    """Greedy (temperature 0) or sampled decoding with temperature, top-k and nucleus (top-p) filtering.

    Args:
      model: the T5 model (decoding is deterministic: no dropout).
      encoder_input_tokens: int32 [batch, l_in], 0 = padding (no packing).
      max_decode_length: maximum number of generated tokens (static).
      eos_id: end-of-sequence token id.
      temperature: 0 = argmax; otherwise logits are divided by it before sampling.
      top_k, top_p: filters applied before sampling (see filter_logits); ignored for temperature 0.
      rng: PRNG key, required when temperature > 0.

    Returns:
      int32 [batch, max_decode_length]: generated tokens without the start token, EOS included, 0 after EOS.
      The loop stops as soon as every row has emitted EOS.
    """
    if temperature > 0 and rng is None:
        raise ValueError("sample_decode: temperature > 0 needs a PRNG key (rng=jax.random.key(seed)).")
    batch = encoder_input_tokens.shape[0]
    encoded = model.encode(encoder_input_tokens)
    start = jnp.full((batch,), model.config.decoder_start_token_id, jnp.int32)
    initial = _GreedyState(
        position=jnp.zeros((), jnp.int32),
        last_tokens=start,
        cache=model.init_decode_cache(encoded, encoder_input_tokens, max_decode_length),
        tokens=jnp.zeros((batch, max_decode_length), jnp.int32),
        done=jnp.zeros((batch,), jnp.bool_),
    )

    def not_finished(state: _GreedyState) -> jax.Array:
        return (state.position < max_decode_length) & ~jnp.all(state.done)

    def step(state: _GreedyState) -> _GreedyState:
        logits, cache = model.decode_step(state.last_tokens, state.position, state.cache)
        if temperature > 0:
            logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
            chosen = jax.random.categorical(jax.random.fold_in(rng, state.position), logits, axis=-1)
        else:
            chosen = jnp.argmax(logits, axis=-1)
        next_tokens = jnp.where(state.done, 0, chosen.astype(jnp.int32))
        return _GreedyState(
            position=state.position + 1,
            last_tokens=next_tokens,
            cache=cache,
            tokens=state.tokens.at[:, state.position].set(next_tokens),
            done=state.done | (next_tokens == eos_id),
        )

    return jax.lax.while_loop(not_finished, step, initial).tokens


class _BeamState(NamedTuple):
    position: jax.Array  # scalar int32, the decoder position being fed
    last_tokens: jax.Array  # [batch * beams] int32
    cache: DecodeCache  # rows of beam k of example b at b * beams + k
    alive_tokens: jax.Array  # [batch, beams, max_decode_length] int32
    alive_scores: jax.Array  # [batch, beams] float32, summed log-probabilities
    finished_tokens: jax.Array  # [batch, beams, max_decode_length] int32
    finished_scores: jax.Array  # [batch, beams] float32, length-normalised (-inf: empty slot)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """T5X / GNMT brevity penalty ((5 + length) / 6) ** alpha; scores are divided by it (alpha 0: none)."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(
    model: T5, encoder_input_tokens: jax.Array, *, max_decode_length: int, num_beams: int = 4,
    alpha: float = 0.6, eos_id: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with a length penalty (T5X's defaults: 4 beams, alpha 0.6).

    A hypothesis ends when it emits EOS; its score is its summed log-probability divided by
    length_penalty(number of tokens incl. EOS, alpha). Hypotheses still alive at max_decode_length are ranked
    the same way. The loop stops early once no alive beam can beat the finished ones.

    Args:
      encoder_input_tokens: int32 [batch, l_in], 0 = padding.
    Returns:
      (tokens int32 [batch, max_decode_length] of the best hypothesis, EOS included and 0 after it,
       scores float32 [batch], its length-normalised log-probability).
    """
    batch, k = encoder_input_tokens.shape[0], num_beams
    neg_inf = jnp.float32(-1e30)
    repeated = jnp.repeat(encoder_input_tokens, k, axis=0)
    encoded = model.encode(repeated)
    initial = _BeamState(
        position=jnp.zeros((), jnp.int32),
        last_tokens=jnp.full((batch * k,), model.config.decoder_start_token_id, jnp.int32),
        cache=model.init_decode_cache(encoded, repeated, max_decode_length),
        alive_tokens=jnp.zeros((batch, k, max_decode_length), jnp.int32),
        # Only beam 0 is live at the start, so the first step does not pick the same token k times.
        alive_scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf), (batch, 1)),
        finished_tokens=jnp.zeros((batch, k, max_decode_length), jnp.int32),
        finished_scores=jnp.full((batch, k), neg_inf),
    )
    best_possible_penalty = length_penalty(jnp.int32(max_decode_length), alpha)

    def not_finished(state: _BeamState) -> jax.Array:
        # Log-probabilities only fall as a hypothesis grows; its best conceivable final score is its current one
        # divided by the largest penalty.
        best_alive = state.alive_scores[:, 0] / best_possible_penalty
        can_improve = best_alive > jnp.min(state.finished_scores, axis=-1)
        return (state.position < max_decode_length) & jnp.any(can_improve)

    def step(state: _BeamState) -> _BeamState:
        logits, cache = model.decode_step(state.last_tokens, state.position, state.cache)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        candidates = (state.alive_scores[:, :, None] + log_probs).reshape(batch, k * vocab)
        # 2k candidates guarantee k that do not end here, even if k of them are EOS.
        top_scores, top_index = jax.lax.top_k(candidates, 2 * k)
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        sequences = jnp.take_along_axis(state.alive_tokens, origin[:, :, None], axis=1)
        sequences = sequences.at[:, :, state.position].set(token)
        is_eos = token == eos_id

        # New alive beams: the k best candidates that did not emit EOS.
        alive_rank = jnp.where(is_eos, neg_inf, top_scores)
        alive_scores, alive_pick = jax.lax.top_k(alive_rank, k)
        alive_tokens = jnp.take_along_axis(sequences, alive_pick[:, :, None], axis=1)
        alive_origin = jnp.take_along_axis(origin, alive_pick, axis=1)
        rows = (jnp.arange(batch)[:, None] * k + alive_origin).reshape(-1)
        cache = jax.tree.map(lambda x: x[rows], cache)

        # Finished: merge this step's EOS candidates into the k best so far.
        new_finished = jnp.where(is_eos, top_scores / length_penalty(state.position + 1, alpha), neg_inf)
        merged_scores = jnp.concatenate([state.finished_scores, new_finished], axis=1)
        merged_tokens = jnp.concatenate([state.finished_tokens, sequences], axis=1)
        finished_scores, finished_pick = jax.lax.top_k(merged_scores, k)
        finished_tokens = jnp.take_along_axis(merged_tokens, finished_pick[:, :, None], axis=1)

        return _BeamState(
            position=state.position + 1,
            last_tokens=alive_tokens[:, :, state.position].reshape(-1),
            cache=cache,
            alive_tokens=alive_tokens,
            alive_scores=alive_scores,
            finished_tokens=finished_tokens,
            finished_scores=finished_scores,
        )

    final = jax.lax.while_loop(not_finished, step, initial)
    # Rows with no finished hypothesis fall back to their alive beams, ranked by the same normalised score.
    alive_normalised = final.alive_scores / length_penalty(final.position, alpha)
    scores = jnp.concatenate([final.finished_scores, alive_normalised], axis=1)
    tokens = jnp.concatenate([final.finished_tokens, final.alive_tokens], axis=1)
    best = jnp.argmax(scores, axis=1)
    best_tokens = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
    return best_tokens, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]
