"""Tests for itjax.models.decoding with T5, through the model interface (`EncoderDecoderModel.generate`): the cached
greedy decoder against a naive full-recompute loop (the Llama family: tests/test_decoding_search.py,
tests/test_llama_parity.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itjax.models.encoder_decoder import EncoderDecoderModel
from itjax.models.t5 import T5, T5Config

CONFIG = T5Config(
    vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=2, num_decoder_layers=2
)
MAX_LENGTH = 10
NO_EOS = CONFIG.vocab_size  # an id the model never emits


def greedy_decode(model, encoder_input_tokens, *, max_decode_length, eos_id):
    """Greedy decoding of a T5 module through the model interface (config taken from the module)."""
    return EncoderDecoderModel(model.config).generate(model, {"encoder_input_tokens": encoder_input_tokens},
                                                      max_decode_length=max_decode_length, eos_id=eos_id)


@pytest.fixture(scope="module")
def model():
    return T5(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def encoder_inputs():
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 2, CONFIG.vocab_size, dtype=jnp.int32)
    return tokens.at[1, 6:].set(0).at[2, 3:].set(0)  # rows of different lengths, right-padded


@nnx.jit(static_argnames=("max_decode_length", "eos_id"))
def jit_greedy_decode(model, encoder_input_tokens, *, max_decode_length, eos_id):
    return greedy_decode(model, encoder_input_tokens, max_decode_length=max_decode_length, eos_id=eos_id)


def naive_greedy_decode(model, encoder_input_tokens, max_decode_length):
    """Reruns the full teacher-forced model on the growing prefix; no EOS handling."""
    forward = nnx.jit(lambda m, enc, dec: m(enc, dec))
    batch = encoder_input_tokens.shape[0]
    decoder_inputs = np.full((batch, max_decode_length), CONFIG.decoder_start_token_id, np.int32)
    generated = np.zeros((batch, max_decode_length), np.int32)
    for t in range(max_decode_length):
        # Positions after t hold placeholders; the causal decoder ignores them for position t.
        logits = forward(model, encoder_input_tokens, jnp.asarray(decoder_inputs))
        generated[:, t] = np.argmax(logits[:, t], axis=-1)
        if t + 1 < max_decode_length:
            decoder_inputs[:, t + 1] = generated[:, t]
    return generated


def truncate_after_eos(tokens, eos_id):
    out = np.array(tokens)
    for row in out:
        hits = np.flatnonzero(row == eos_id)
        if hits.size:
            row[hits[0] + 1 :] = 0
    return out


@pytest.fixture(scope="module")
def reference(model, encoder_inputs):
    return naive_greedy_decode(model, encoder_inputs, MAX_LENGTH)


def test_cached_greedy_matches_naive_loop(model, encoder_inputs, reference):
    assert len(np.unique(reference)) >= 4, "degenerate test model: outputs are (almost) all one token"
    tokens = jit_greedy_decode(model, encoder_inputs, max_decode_length=MAX_LENGTH, eos_id=NO_EOS)
    assert tokens.shape == (3, MAX_LENGTH) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, reference)


def test_decode_step_logits_match_teacher_forcing(model, encoder_inputs):
    decoder_inputs = jax.random.randint(jax.random.key(2), (3, 6), 1, CONFIG.vocab_size, dtype=jnp.int32)
    expected = nnx.jit(lambda m, enc, dec: m(enc, dec))(model, encoder_inputs, decoder_inputs)
    cache = model.init_decode_cache(model.encode(encoder_inputs), encoder_inputs, max_decode_length=8)
    decode_step = nnx.jit(lambda m, tokens, position, cache: m.decode_step(tokens, position, cache))
    for t in range(decoder_inputs.shape[1]):
        logits, cache = decode_step(model, decoder_inputs[:, t], jnp.int32(t), cache)
        np.testing.assert_allclose(logits, expected[:, t], atol=1e-5, err_msg=f"position {t}")


def test_stops_at_eos_and_zero_fills(model, encoder_inputs, reference):
    eos_id = int(reference[0, 2])  # row 0 emits it at step 2 at the latest
    tokens = jit_greedy_decode(model, encoder_inputs, max_decode_length=MAX_LENGTH, eos_id=eos_id)
    expected = truncate_after_eos(reference, eos_id)
    np.testing.assert_array_equal(tokens, expected)
    assert np.all(expected[0, 3:] == 0)


def test_loop_ends_when_every_row_has_finished(model, encoder_inputs, reference):
    steps = []

    class CountingModel:
        """Delegates to the model and counts executed decode steps (not traces)."""

        config = model.config
        encode = model.encode
        init_decode_cache = model.init_decode_cache

        def decode_step(self, *args):
            jax.debug.callback(lambda: steps.append(1))
            return model.decode_step(*args)

    eos_id = int(reference[0, 2])
    first_hit = int(np.flatnonzero(reference[0] == eos_id)[0])
    counting = CountingModel()
    tokens = jax.jit(lambda enc: greedy_decode(counting, enc, max_decode_length=MAX_LENGTH, eos_id=eos_id))(
        encoder_inputs[:1])
    jax.effects_barrier()
    assert len(steps) == first_hit + 1
    np.testing.assert_array_equal(tokens, truncate_after_eos(reference[:1], eos_id))


def test_greedy_decode_under_jit_with_split_state(model, encoder_inputs, reference):
    graphdef, state = nnx.split(model)

    @jax.jit
    def decode(state, encoder_input_tokens):
        return greedy_decode(nnx.merge(graphdef, state), encoder_input_tokens, max_decode_length=MAX_LENGTH,
                             eos_id=NO_EOS)

    np.testing.assert_array_equal(decode(state, encoder_inputs), reference)


def test_tied_relu_model_decodes():
    model = T5(dataclasses.replace(CONFIG, feed_forward="relu", tie_word_embeddings=True), rngs=nnx.Rngs(0))
    enc = jnp.arange(1, 13, dtype=jnp.int32).reshape(2, 6)
    tokens = jit_greedy_decode(model, enc, max_decode_length=4, eos_id=NO_EOS)
    np.testing.assert_array_equal(tokens, naive_greedy_decode(model, enc, 4))


def test_bfloat16_model_decodes():
    model = T5(dataclasses.replace(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(0))
    enc = jnp.arange(1, 13, dtype=jnp.int32).reshape(2, 6)
    tokens = jit_greedy_decode(model, enc, max_decode_length=4, eos_id=NO_EOS)
    assert tokens.shape == (2, 4) and tokens.dtype == jnp.int32
    assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < CONFIG.vocab_size))
