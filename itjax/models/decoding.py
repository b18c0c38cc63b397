"""Autoregressive decoding, written once for every model family: greedy, sampling and beam search.

A model plugs in through `DecodeFns`, two pure functions over a batch of prompts that its model wrapper supplies
(`BaseModel.decode_fns(module, batch, max_decode_length)`; `encoder_decoder.t5_decode_fns`,
`decoder_only.llama_decode_fns`):

    start()                      -> (logits [batch, vocab] float32 of generated token 0, carry)
    step(tokens, index, carry)   -> (logits [batch, vocab] float32 of generated token index + 1, carry)

where `tokens` [batch] int32 are the generated tokens number `index` (a scalar int32) and `carry` is any pytree
with a batch axis in every leaf (key / value caches, per-row positions), so beam search can repeat it per beam and
reorder it with one gather per leaf. `batch_axes(carry)` gives each leaf's batch axis (the leading one, except in
the layer-stacked caches of `scan_layers` models, [layers, batch, ...]). This module imports no model family.

The loops run in `jax.lax.while_loop` with static lengths and stop as soon as every row (or every beam search
row) is done; everything is jittable. `itjax.trainer.Trainer.generate` is the compiled, cached entry point.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # score of an empty / impossible hypothesis (finite: arithmetic on it stays well defined)


class DecodeFns(NamedTuple):
    """How to decode one batch of prompts with one model (see the module docstring)."""

    start: Callable[[], tuple[jax.Array, Any]]
    step: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
    batch_axes: Callable[[Any], Any]


# ----------------------------------------------------------------------------------------------------------------
# Greedy and sampling
# ----------------------------------------------------------------------------------------------------------------


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
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Probability mass of the tokens strictly more likely than each sorted token.
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, masked, logits)
    return logits


class _SampleState(NamedTuple):
    index: jax.Array  # scalar int32, the generated token to choose next
    last_tokens: jax.Array  # [batch] int32, generated token index - 1
    carry: Any
    tokens: jax.Array  # [batch, max_decode_length] int32, generated so far (0 elsewhere)
    done: jax.Array  # [batch] bool, True once the row has emitted EOS


def sample(fns: DecodeFns, *, max_decode_length: int, eos_id: int | jax.Array, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None) -> jax.Array:
    """Greedy (temperature 0) or sampled decoding with temperature, top-k and nucleus (top-p) filtering.

    Args:
      fns: the model and prompts (`BaseModel.decode_fns`).
      max_decode_length: maximum number of generated tokens (static, >= 1).
      eos_id: end-of-sequence token id (may be traced).
      temperature: 0 = argmax; otherwise logits are divided by it before sampling.
      top_k, top_p: filters applied before sampling (see filter_logits); ignored for temperature 0.
      rng: PRNG key, required when temperature > 0; token i is drawn with `fold_in(rng, i)`.

    Returns:
      int32 [batch, max_decode_length]: generated tokens, EOS included, 0 after EOS. The model runs once per
      generated token except the last, and not at all once every row has emitted EOS.
    """
    if temperature > 0 and rng is None:
        raise ValueError("decoding.sample: temperature > 0 needs a PRNG key (rng=jax.random.key(seed)).")
    if max_decode_length < 1:
        raise ValueError(f"decoding: max_decode_length={max_decode_length}; expected >= 1.")

    def choose(logits, index, done):
        if temperature > 0:
            logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
            chosen = jax.random.categorical(jax.random.fold_in(rng, index), logits, axis=-1)
        else:
            chosen = jnp.argmax(logits, axis=-1)
        return jnp.where(done, 0, chosen.astype(jnp.int32))

    logits, carry = fns.start()
    batch = logits.shape[0]
    first = choose(logits, 0, jnp.zeros((batch,), jnp.bool_))
    initial = _SampleState(
        index=jnp.ones((), jnp.int32),
        last_tokens=first,
        carry=carry,
        tokens=jnp.zeros((batch, max_decode_length), jnp.int32).at[:, 0].set(first),
        done=first == eos_id,
    )

    def not_finished(state: _SampleState) -> jax.Array:
        return (state.index < max_decode_length) & ~jnp.all(state.done)

    def body(state: _SampleState) -> _SampleState:
        logits, carry = fns.step(state.last_tokens, state.index - 1, state.carry)
        chosen = choose(logits, state.index, state.done)
        return _SampleState(
            index=state.index + 1,
            last_tokens=chosen,
            carry=carry,
            tokens=state.tokens.at[:, state.index].set(chosen),
            done=state.done | (chosen == eos_id),
        )

    return jax.lax.while_loop(not_finished, body, initial).tokens


def greedy(fns: DecodeFns, *, max_decode_length: int, eos_id: int | jax.Array) -> jax.Array:
    """Greedy (argmax) decoding: `sample` at temperature 0. Returns int32 [batch, max_decode_length]."""
    return sample(fns, max_decode_length=max_decode_length, eos_id=eos_id)


# ----------------------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------------------


class _BeamState(NamedTuple):
    index: jax.Array  # scalar int32, the number of tokens every alive hypothesis holds
    carry: Any  # rows of beam k of example b at b * beams + k
    alive_tokens: jax.Array  # [batch, beams, max_decode_length] int32
    alive_scores: jax.Array  # [batch, beams] float32, summed log-probabilities
    finished_tokens: jax.Array  # [batch, beams, max_decode_length] int32
    finished_scores: jax.Array  # [batch, beams] float32, length-normalised (NEG_INF: empty slot)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """T5X / GNMT brevity penalty ((5 + length) / 6) ** alpha; scores are divided by it (alpha 0: none)."""
    return ((5.0 + jnp.asarray(length).astype(jnp.float32)) / 6.0) ** alpha


def beam(fns: DecodeFns, *, max_decode_length: int, num_beams: int = 4, alpha: float = 0.6,
         eos_id: int | jax.Array = 1) -> tuple[jax.Array, jax.Array]:
    """Beam search with a length penalty (T5X's defaults: 4 beams, alpha 0.6).

    A hypothesis ends when it emits EOS; its score is its summed log-probability divided by
    length_penalty(number of tokens incl. EOS, alpha). Hypotheses still alive at max_decode_length are ranked
    the same way. The loop stops early once no alive beam can beat the finished ones. The prompts are encoded /
    prefilled once and their carry repeated per beam.

    Returns:
      (tokens int32 [batch, max_decode_length] of the best hypothesis, EOS included and 0 after it,
       scores float32 [batch], its length-normalised log-probability).
    """
    if max_decode_length < 1:
        raise ValueError(f"decoding: max_decode_length={max_decode_length}; expected >= 1.")
    k = num_beams
    neg_inf = jnp.float32(NEG_INF)
    logits, carry = fns.start()
    batch = logits.shape[0]
    carry_axes = fns.batch_axes(carry)
    logits = jnp.repeat(logits, k, axis=0)
    carry = jax.tree.map(lambda x, axis: jnp.repeat(x, k, axis=axis), carry, carry_axes)

    def expand(state: _BeamState, logits: jax.Array, carry: Any) -> _BeamState:
        """Extends every alive hypothesis by one token given its next-token logits [batch * k, vocab]."""
        position = state.index
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, k, vocab)
        candidates = (state.alive_scores[:, :, None] + log_probs).reshape(batch, k * vocab)
        # 2k candidates guarantee k that do not end here, even if k of them are EOS.
        top_scores, top_index = jax.lax.top_k(candidates, 2 * k)
        origin, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        sequences = jnp.take_along_axis(state.alive_tokens, origin[:, :, None], axis=1)
        sequences = sequences.at[:, :, position].set(token)
        is_eos = token == eos_id

        # New alive beams: the k best candidates that did not emit EOS.
        alive_scores, alive_pick = jax.lax.top_k(jnp.where(is_eos, neg_inf, top_scores), k)
        alive_tokens = jnp.take_along_axis(sequences, alive_pick[:, :, None], axis=1)
        alive_origin = jnp.take_along_axis(origin, alive_pick, axis=1)
        rows = (jnp.arange(batch)[:, None] * k + alive_origin).reshape(-1)
        carry = jax.tree.map(lambda x, axis: jnp.take(x, rows, axis=axis), carry, carry_axes)

        # Finished: merge this step's EOS candidates into the k best so far.
        new_finished = jnp.where(is_eos, top_scores / length_penalty(position + 1, alpha), neg_inf)
        merged_scores = jnp.concatenate([state.finished_scores, new_finished], axis=1)
        merged_tokens = jnp.concatenate([state.finished_tokens, sequences], axis=1)
        finished_scores, finished_pick = jax.lax.top_k(merged_scores, k)
        finished_tokens = jnp.take_along_axis(merged_tokens, finished_pick[:, :, None], axis=1)
        return _BeamState(position + 1, carry, alive_tokens, alive_scores, finished_tokens, finished_scores)

    empty = _BeamState(
        index=jnp.zeros((), jnp.int32),
        carry=carry,
        alive_tokens=jnp.zeros((batch, k, max_decode_length), jnp.int32),
        # Only beam 0 is live at the start, so the first step does not pick the same token k times.
        alive_scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf), (batch, 1)),
        finished_tokens=jnp.zeros((batch, k, max_decode_length), jnp.int32),
        finished_scores=jnp.full((batch, k), neg_inf),
    )
    best_possible_penalty = length_penalty(max_decode_length, alpha)

    def not_finished(state: _BeamState) -> jax.Array:
        # Log-probabilities only fall as a hypothesis grows; its best conceivable final score is its current one
        # divided by the largest penalty.
        best_alive = state.alive_scores[:, 0] / best_possible_penalty
        can_improve = best_alive > jnp.min(state.finished_scores, axis=-1)
        return (state.index < max_decode_length) & jnp.any(can_improve)

    def body(state: _BeamState) -> _BeamState:
        last = state.alive_tokens[:, :, state.index - 1].reshape(-1)
        logits, carry = fns.step(last, state.index - 1, state.carry)
        return expand(state, logits, carry)

    final = jax.lax.while_loop(not_finished, body, expand(empty, logits, carry))
    # Rows with no finished hypothesis fall back to their alive beams, ranked by the same normalised score.
    alive_normalised = final.alive_scores / length_penalty(final.index, alpha)
    scores = jnp.concatenate([final.finished_scores, alive_normalised], axis=1)
    tokens = jnp.concatenate([final.finished_tokens, final.alive_tokens], axis=1)
    best = jnp.argmax(scores, axis=1)
    best_tokens = jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0]
    return best_tokens, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]


def generate(fns: DecodeFns, *, max_decode_length: int, eos_id: int | jax.Array, method: str = "greedy",
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, rng: jax.Array | None = None,
             num_beams: int = 4, alpha: float = 0.6) -> jax.Array:
    """One entry point for the CLI: method "greedy", "sample" (temperature, top_k, top_p, rng) or "beam"
    (num_beams, alpha). Returns int32 [batch, max_decode_length] (EOS included, 0 after it)."""
    if method == "greedy":
        return greedy(fns, max_decode_length=max_decode_length, eos_id=eos_id)
    if method == "sample":
        return sample(fns, max_decode_length=max_decode_length, eos_id=eos_id, temperature=temperature,
                      top_k=top_k, top_p=top_p, rng=rng)
    if method == "beam":
        return beam(fns, max_decode_length=max_decode_length, num_beams=num_beams, alpha=alpha, eos_id=eos_id)[0]
    raise ValueError(f"decoding.generate: method={method!r}; expected 'greedy', 'sample' or 'beam'.")


# ----------------------------------------------------------------------------------------------------------------
# Names that moved
# ----------------------------------------------------------------------------------------------------------------

_MOVED = {
    "t5_decode_fns": "itjax.models.encoder_decoder.t5_decode_fns",
    "llama_decode_fns": "itjax.models.decoder_only.llama_decode_fns",
    "greedy_decode": "model.generate(module, batch, method='greedy', ...) of an itjax.models.EncoderDecoderModel",
    "sample_decode": "model.generate(module, batch, method='sample', ...) of an itjax.models.EncoderDecoderModel",
    "beam_search": "decoding.beam(model.decode_fns(module, batch, max_decode_length), ...) of an "
                   "itjax.models.EncoderDecoderModel",
    "greedy_generate": "model.generate(module, batch, method='greedy', ...) of an itjax.models.DecoderOnlyModel",
    "sample_generate": "model.generate(module, batch, method='sample', ...) of an itjax.models.DecoderOnlyModel",
    "beam_generate": "decoding.beam(model.decode_fns(module, batch, max_decode_length), ...) of an "
                     "itjax.models.DecoderOnlyModel",
    "right_padded_mask": "a prompt mask built by the caller (DecoderOnlyModel.decode_fns reads "
                         "decoder_causal_attention)",
}


def __getattr__(name: str):
    if name in _MOVED:
        raise AttributeError(f"itjax.models.decoding.{name} was removed (decoding knows no model family); use "
                             f"{_MOVED[name]}, or Trainer.generate for a compiled, cached call.")
    raise AttributeError(f"module 'itjax.models.decoding' has no attribute {name!r}")
