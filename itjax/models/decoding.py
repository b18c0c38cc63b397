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


def greedy_decode(
    model: T5, encoder_input_tokens: jax.Array, *, max_decode_length: int, eos_id: int = 1
) -> jax.Array:
    """Greedy (argmax) decoding.

    Args:
      model: the T5 model (decoding is deterministic: no dropout).
      encoder_input_tokens: int32 [batch, l_in], 0 = padding (no packing).
      max_decode_length: maximum number of generated tokens (static).
      eos_id: end-of-sequence token id.

    Returns:
      int32 [batch, max_decode_length]: generated tokens without the start token, EOS included, 0 after EOS.
      The loop stops as soon as every row has emitted EOS.
    """
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
        next_tokens = jnp.where(state.done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        return _GreedyState(
            position=state.position + 1,
            last_tokens=next_tokens,
            cache=cache,
            tokens=state.tokens.at[:, state.position].set(next_tokens),
            done=state.done | (next_tokens == eos_id),
        )

    return jax.lax.while_loop(not_finished, step, initial).tokens
