"""Sampling filters, sampled decoding and beam search (against greedy decoding and exhaustive search), for both
model families through the one set of loops in itjax.models.decoding: T5 (encoder-decoder) and Llama (decoder-only,
with left- and right-padded prompts of different lengths)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itjax.models import decoding
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.encoder_decoder import EncoderDecoderModel
from itjax.models.llama import Llama, LlamaConfig
from itjax.models.t5 import T5, T5Config

# Tiny vocabularies so every output sequence can be enumerated. T5: ids 0 (pad / start), 1 (EOS), 2..5.
# Llama: 0 and 2..5 are ordinary tokens (id 0 is real in Llama 3), 1 is EOS.
T5_CONFIG = T5Config(vocab_size=6, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=1,
                     num_decoder_layers=2)
LLAMA_CONFIG = LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                           num_kv_heads=2)
EOS = 1
FAMILIES = ("t5", "llama")
WORDS = {"t5": range(2, 6), "llama": (0, 2, 3, 4, 5)}  # tokens that do not end a sequence


@pytest.fixture(scope="module")
def models():
    t5 = T5(T5_CONFIG, rngs=nnx.Rngs(3))
    llama = Llama(LLAMA_CONFIG, rngs=nnx.Rngs(1))
    # Scale the output layers so sequences have clearly different probabilities, yet greedy decoding does not
    # find every best sequence (the exhaustive-search test checks it).
    t5.lm_head.kernel[...] = t5.lm_head.kernel[...] * 2.0
    llama.lm_head.kernel[...] = llama.lm_head.kernel[...] * 6.0
    return {"t5": t5, "llama": llama}


LLAMA_PROMPTS = [[3, 0, 5, 2, 4, 4, 2], [2, 5, 0, 3], [4, 0], [5, 5, 2, 3, 0]]
LEFT_PADDED = (1, 3)
LLAMA_WIDTH = 16  # longest prompt + longest continuation the tests score, padded


@pytest.fixture(scope="module")
def inputs():
    """T5: encoder tokens [4, 7] (row 1 padded). Llama: (tokens [4, 7], mask) with rows 1 and 3 left-padded."""
    t5 = jax.random.randint(jax.random.key(7), (4, 7), 2, T5_CONFIG.vocab_size, dtype=jnp.int32).at[1, 5:].set(0)
    tokens, mask = np.zeros((4, 7), np.int32), np.zeros((4, 7), bool)
    for i, prompt in enumerate(LLAMA_PROMPTS):
        start = 7 - len(prompt) if i in LEFT_PADDED else 0
        tokens[i, start:start + len(prompt)], mask[i, start:start + len(prompt)] = prompt, True
    return {"t5": t5, "llama": (jnp.asarray(tokens), jnp.asarray(mask))}


WRAPPERS = {"t5": EncoderDecoderModel(T5_CONFIG), "llama": DecoderOnlyModel(LLAMA_CONFIG)}


def model_batch(family, inputs):
    """The model interface's rows for the test inputs (Llama: the prompt marked by decoder_causal_attention)."""
    if family == "t5":
        return {"encoder_input_tokens": inputs}
    tokens, mask = inputs
    return {"decoder_input_tokens": tokens, "decoder_causal_attention": mask.astype(jnp.int32)}


@functools.partial(nnx.jit, static_argnames=("family", "max_len", "options", "eos"))
def sample(model, inputs, rng, *, family, max_len, options=(), eos=EOS):
    """The family's sampling through the model interface (temperature 0 = greedy), jitted once per configuration."""
    return WRAPPERS[family].generate(model, model_batch(family, inputs), max_decode_length=max_len, eos_id=eos,
                                     method="sample", rng=rng, **dict({"temperature": 0.0} | dict(options)))


@functools.partial(nnx.jit, static_argnames=("family", "max_len", "num_beams", "eos"))
def beam(model, inputs, alpha, *, family, max_len, num_beams, eos=EOS):
    """The family's beam search (its decode functions); alpha may be traced (one compilation for every penalty)."""
    fns = WRAPPERS[family].decode_fns(model, model_batch(family, inputs), max_len)
    return decoding.beam(fns, max_decode_length=max_len, num_beams=num_beams, alpha=alpha, eos_id=eos)


@nnx.jit
def _t5_logits(model, encoder_tokens, decoder_inputs):
    return model(encoder_tokens, decoder_inputs)


@nnx.jit
def _llama_logits(model, tokens):
    return model(tokens)


def step_log_probs(family, model, inputs, row, sequences):
    """Teacher-forced log-probabilities [n, max_len, vocab]: entry t is the distribution of sequences[i][t]
    given row `row`'s input (encoder tokens / prompt) and sequences[i][:t]."""
    max_len = max(len(s) for s in sequences)
    padded = np.zeros((len(sequences), max_len), np.int32)
    for i, s in enumerate(sequences):
        padded[i, :len(s)] = s
    if family == "t5":
        decoder_inputs = np.pad(padded[:, :-1], ((0, 0), (1, 0)), constant_values=T5_CONFIG.decoder_start_token_id)
        encoder = jnp.repeat(inputs[row][None], len(sequences), axis=0)
        logits = _t5_logits(model, encoder, jnp.asarray(decoder_inputs))
    else:
        prompt = LLAMA_PROMPTS[row]
        # Right padding after the continuation is invisible to the causal model; one width for every call.
        tokens = np.zeros((len(sequences), LLAMA_WIDTH), np.int32)
        tokens[:, :len(prompt)], tokens[:, len(prompt):len(prompt) + max_len] = prompt, padded
        logits = _llama_logits(model, jnp.asarray(tokens))[:, len(prompt) - 1:len(prompt) - 1 + max_len]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def sequence_log_probs(family, model, inputs, row, sequences):
    """Summed log-probability of each sequence (ending in EOS or not) for one example."""
    log_probs = step_log_probs(family, model, inputs, row, sequences)
    return [float(sum(log_probs[i, t, tok] for t, tok in enumerate(s))) for i, s in enumerate(sequences)]


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda x: (np.asarray(x) > -1e30).astype(int).tolist()  # noqa: E731
    assert kept(decoding.filter_logits(logits, top_k=2)) == [[1, 1, 0, 0]]
    assert kept(decoding.filter_logits(logits, top_p=0.5)) == [[1, 0, 0, 0]]
    assert kept(decoding.filter_logits(logits, top_p=0.7)) == [[1, 1, 0, 0]]
    assert kept(decoding.filter_logits(logits, top_p=0.81)) == [[1, 1, 1, 0]]
    assert kept(decoding.filter_logits(logits)) == [[1, 1, 1, 1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_seeded_and_top_k_1_is_greedy(models, inputs, family):
    model, x = models[family], inputs[family]
    run = functools.partial(sample, model, x, family=family, max_len=5)
    greedy = run(None)
    assert len(np.unique(greedy)) >= 3, "degenerate test model"
    np.testing.assert_array_equal(run(jax.random.key(0), options=(("temperature", 1.0), ("top_k", 1))), greedy)
    hot = (("temperature", 2.0),)
    np.testing.assert_array_equal(run(jax.random.key(1), options=hot), run(jax.random.key(1), options=hot))
    draws = [run(jax.random.key(seed), options=hot) for seed in range(4)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    with pytest.raises(ValueError, match="PRNG key"):
        run(None, options=hot)


def test_llama_greedy_matches_naive_recomputation(models, inputs):
    """Cached greedy continuation of left- and right-padded prompts = argmax of the full model on the prefix."""
    model = models["llama"]
    got = np.asarray(sample(model, inputs["llama"], None, family="llama", max_len=5))
    for row, prompt in enumerate(LLAMA_PROMPTS):
        sequence, expected = list(prompt), []
        for _ in range(5):
            padded = np.zeros((1, LLAMA_WIDTH), np.int32)
            padded[0, :len(sequence)] = sequence
            token = int(np.argmax(_llama_logits(model, jnp.asarray(padded))[0, len(sequence) - 1]))
            expected.append(token)
            sequence.append(token)
            if token == EOS:
                break
        assert got[row].tolist() == expected + [0] * (5 - len(expected))


def test_llama_top_p_sampling_stays_in_the_nucleus(models, inputs):
    model, (tokens, mask) = models["llama"], inputs["llama"]
    copies, max_len, top_p = 16, 4, 0.6
    many = (jnp.repeat(tokens, copies, axis=0), jnp.repeat(mask, copies, axis=0))

    def outside_nucleus(options):
        """Sampled tokens (before / at EOS) whose more likely tokens already hold >= top_p probability, and
        sampled tokens that were not the most likely one."""
        out = np.asarray(sample(model, many, jax.random.key(0), family="llama", max_len=max_len, options=options))
        outside, not_argmax = 0, 0
        for row in range(len(LLAMA_PROMPTS)):
            rows = out[row * copies:(row + 1) * copies]
            probs = np.exp(step_log_probs("llama", model, inputs["llama"], row, [r.tolist() for r in rows]))
            for i, r in enumerate(rows):
                for t, token in enumerate(r):
                    p = probs[i, t]
                    outside += p[p > p[token]].sum() >= top_p + 1e-6
                    not_argmax += token != np.argmax(p)
                    if token == EOS:
                        break
        return outside, not_argmax

    outside, not_argmax = outside_nucleus((("temperature", 1.0), ("top_p", top_p)))
    assert outside == 0 and not_argmax > 0  # the nucleus held more than the argmax, and nothing beyond it
    outside, _ = outside_nucleus((("temperature", 1.0),))
    assert outside > 0  # without the filter, the same draws leave the nucleus


@pytest.mark.parametrize("family", FAMILIES)
def test_one_beam_is_greedy(models, inputs, family):
    # Without EOS the single beam follows the argmax path. (With EOS it may rightly return a hypothesis that ended
    # earlier with a higher score than greedy's continuation, as T5X's beam search does.)
    no_eos = 6
    greedy = sample(models[family], inputs[family], None, family=family, max_len=6, eos=no_eos)
    tokens, _ = beam(models[family], inputs[family], 0.0, family=family, max_len=6, num_beams=1, eos=no_eos)
    np.testing.assert_array_equal(tokens, greedy)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_finds_the_best_sequence_by_exhaustive_search(models, inputs, family, alpha):
    model, x, words, max_length = models[family], inputs[family], WORDS[family], 3
    # Enough beams to keep every alive prefix before the last step (4^2 = 16 for T5, 5^2 = 25 for Llama).
    tokens, scores = beam(model, x, jnp.float32(alpha), family=family, max_len=max_length,
                          num_beams=len(words) ** 2)
    candidates = [[*body, last] for length in range(1, max_length + 1)
                  for body in itertools.product(words, repeat=length - 1)
                  for last in ((EOS, *words) if length == max_length else (EOS,))]
    greedy = np.asarray(sample(model, x, None, family=family, max_len=max_length))
    beats_greedy = 0
    for row in range(4):
        log_probs = sequence_log_probs(family, model, x, row, candidates)
        normalised = [lp / float(decoding.length_penalty(len(s), alpha)) for lp, s in zip(log_probs, candidates)]
        best = int(np.argmax(normalised))
        expected = np.zeros(max_length, np.int32)
        expected[:len(candidates[best])] = candidates[best]
        np.testing.assert_array_equal(tokens[row], expected)
        assert float(scores[row]) == pytest.approx(normalised[best], abs=1e-4)
        beats_greedy += not np.array_equal(expected, greedy[row])
    assert beats_greedy, "test model too easy: greedy decoding already finds every best sequence"
