"""Greedy generation for the decoder-only Llama-family models with a functional key/value cache.

The prompt batch is written into the cache by one `Llama.prefill` call; then one token per row is generated per
`jax.lax.while_loop` iteration with `Llama.decode_step`, the cache (`itjax.models.llama.DecodeCache`) carried by
the loop. Everything is jittable: jit a function that merges the model from its state and calls
`greedy_generate` (`max_new_tokens` and `eos_id` static).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from itjax.models.llama import DecodeCache, Llama


class _GreedyState(NamedTuple):
    step: jax.Array  # scalar int32, index of the token being generated
    logits: jax.Array  # [batch, vocab] float32, the distribution of that token
    positions: jax.Array  # [batch] int32, its rotary position
    cache: DecodeCache
    tokens: jax.Array  # [batch, max_new_tokens] int32, generated so far (0 elsewhere)
    done: jax.Array  # [batch] bool, True once the row has emitted EOS


def greedy_generate(
    model: Llama, prompt_tokens: jax.Array, prompt_lengths: jax.Array, *, max_new_tokens: int, eos_id: int
) -> jax.Array:
    """Greedy (argmax) continuation of a prompt batch.

    Args:
      model: the Llama-family model (decoding is deterministic: no dropout).
      prompt_tokens: int32 [batch, l], right-padded with 0; every row holds at least one real token.
      prompt_lengths: int32 [batch], the number of real tokens per row.
      max_new_tokens: maximum number of generated tokens (static).
      eos_id: end-of-sequence token id.

    Returns:
      int32 [batch, max_new_tokens]: generated tokens (prompt excluded), EOS included, 0 after EOS.
      The loop stops as soon as every row has emitted EOS.
    """
    batch, length = prompt_tokens.shape
    token_mask = jnp.arange(length)[None, :] < prompt_lengths[:, None]
    cache = model.init_decode_cache(batch, length + max_new_tokens)
    logits, positions, cache = model.prefill(prompt_tokens, token_mask, cache)
    initial = _GreedyState(
        step=jnp.zeros((), jnp.int32),
        logits=logits,
        positions=positions,
        cache=cache,
        tokens=jnp.zeros((batch, max_new_tokens), jnp.int32),
        done=jnp.zeros((batch,), jnp.bool_),
    )

    def not_finished(state: _GreedyState) -> jax.Array:
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def step(state: _GreedyState) -> _GreedyState:
        next_tokens = jnp.where(state.done, 0, jnp.argmax(state.logits, axis=-1).astype(jnp.int32))
        tokens = state.tokens.at[:, state.step].set(next_tokens)
        done = state.done | (next_tokens == eos_id)
        # The last generated token needs no forward pass; skipping it also keeps the cache within bounds.
        logits, cache = jax.lax.cond(
            (state.step + 1 < max_new_tokens) & ~jnp.all(done),
            lambda: model.decode_step(next_tokens, state.positions, state.cache),
            lambda: (state.logits, state.cache),
        )
        return _GreedyState(state.step + 1, logits, state.positions + 1, cache, tokens, done)

    return jax.lax.while_loop(not_finished, step, initial).tokens
