"""Sampling filters, sampled decoding and beam search (against greedy decoding and exhaustive search)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itjax.models import decoding
from itjax.models.t5 import T5, T5Config

# A tiny vocabulary so every output sequence can be enumerated: ids 0 (pad / start), 1 (EOS), 2..5.
CONFIG = T5Config(vocab_size=6, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=1,
                  num_decoder_layers=2)
EOS = 1


@pytest.fixture(scope="module")
def model():
    model = T5(CONFIG, rngs=nnx.Rngs(3))
    # Sharpen the output layer so sequences have clearly different probabilities.
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 4.0
    return model


@pytest.fixture(scope="module")
def inputs():
    tokens = jax.random.randint(jax.random.key(7), (4, 7), 2, CONFIG.vocab_size, dtype=jnp.int32)
    return tokens.at[1, 5:].set(0)


def sequence_log_prob(model, encoder_tokens, sequence):
    """Teacher-forced log-probability of `sequence` (ending in EOS or not) for one example."""
    decoder_inputs = jnp.asarray([[CONFIG.decoder_start_token_id] + list(sequence[:-1])], jnp.int32)
    logits = model(encoder_tokens[None], decoder_inputs)
    log_probs = jax.nn.log_softmax(logits[0], axis=-1)
    return float(sum(log_probs[t, token] for t, token in enumerate(sequence)))


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: (np.asarray(x) > -1e30).astype(int).tolist()  # noqa: E731
    assert kept(decoding.filter_logits(logits, top_k=2)) == [[1, 1, 0, 0]]
    assert kept(decoding.filter_logits(logits, top_p=0.5)) == [[1, 0, 0, 0]]
    assert kept(decoding.filter_logits(logits, top_p=0.7)) == [[1, 1, 0, 0]]
    assert kept(decoding.filter_logits(logits, top_p=0.81)) == [[1, 1, 1, 0]]
    assert kept(decoding.filter_logits(logits)) == [[1, 1, 1, 1]]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model, inputs):
    greedy = decoding.greedy_decode(model, inputs, max_decode_length=5, eos_id=EOS)
    top1 = decoding.sample_decode(model, inputs, max_decode_length=5, eos_id=EOS, temperature=1.0, top_k=1,
                                  rng=jax.random.key(0))
    np.testing.assert_array_equal(top1, greedy)
    a = decoding.sample_decode(model, inputs, max_decode_length=5, eos_id=EOS, temperature=2.0,
                               rng=jax.random.key(1))
    b = decoding.sample_decode(model, inputs, max_decode_length=5, eos_id=EOS, temperature=2.0,
                               rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    draws = [decoding.sample_decode(model, inputs, max_decode_length=5, eos_id=EOS, temperature=2.0,
                                    rng=jax.random.key(seed)) for seed in range(4)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    with pytest.raises(ValueError, match="PRNG key"):
        decoding.sample_decode(model, inputs, max_decode_length=5, temperature=1.0)


def test_one_beam_is_greedy(model, inputs):
    greedy = decoding.greedy_decode(model, inputs, max_decode_length=6, eos_id=EOS)
    beam, _ = decoding.beam_search(model, inputs, max_decode_length=6, num_beams=1, alpha=0.0, eos_id=EOS)
    np.testing.assert_array_equal(beam, greedy)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_finds_the_best_sequence_by_exhaustive_search(model, inputs, alpha):
    max_length = 3
    # 4 non-EOS tokens: at most 4^2 = 16 alive prefixes before the last step; 16 beams keep them all.
    tokens, scores = decoding.beam_search(model, inputs, max_decode_length=max_length, num_beams=16, alpha=alpha,
                                          eos_id=EOS)
    words = range(2, CONFIG.vocab_size)
    for row in range(inputs.shape[0]):
        best, best_sequence = -np.inf, None
        for length in range(1, max_length + 1):
            for body in itertools.product(words, repeat=length - 1):
                for last in (EOS, *words) if length == max_length else (EOS,):
                    sequence = [*body, last]
                    score = sequence_log_prob(model, inputs[row], sequence)
                    score /= float(decoding.length_penalty(jnp.int32(len(sequence)), alpha))
                    if score > best:
                        best, best_sequence = score, sequence
        expected = np.zeros(max_length, np.int32)
        expected[:len(best_sequence)] = best_sequence
        np.testing.assert_array_equal(tokens[row], expected)
        assert float(scores[row]) == pytest.approx(best, abs=1e-4)
