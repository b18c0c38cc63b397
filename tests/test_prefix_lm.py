"""Prefix-LM decoders (`DecoderOnlyModel.prefix_lm`): the mask, packed segments, the loss, cached greedy decoding
against full-sequence recomputation, the emulated 'cudnn' path and the 'splash' refusal. The tests that compile a
model are marked slow (tens of seconds each under load: XLA compilation)."""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from itjax.data.feature_converters import DecoderFeatureConverter
from itjax.models import attention
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.llama import LlamaConfig, causal_segment_mask

CONFIG = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
EXAMPLES = [{"inputs": [5, 6, 7], "targets": [8, 9, 1]}, {"inputs": [10, 11], "targets": [12, 13, 14, 1]},
            {"inputs": [15], "targets": [16, 1]}]
LENGTHS = {"inputs": 4, "targets": 5}


def _batch(examples, pack, bos_id=2):
    ds = tf.data.Dataset.from_generator(
        lambda: iter(examples), output_signature={k: tf.TensorSpec([None], tf.int32) for k in examples[0]})
    rows = list(DecoderFeatureConverter(pack=pack, bos_id=bos_id)(ds, LENGTHS).as_numpy_iterator())
    return {k: jnp.asarray(np.stack([r[k] for r in rows]), jnp.int32) for k in rows[0]}


def _scaled(model, seed=0):
    """model's module with weights scaled up so greedy decoding is not dominated by ties."""
    module = model.make_module(seed=seed)
    nnx.update(module, jax.tree.map(lambda x: x * 4.0, nnx.state(module, nnx.Param)))
    return module


@pytest.fixture(scope="module")
def models():
    """(prefix-LM model, causal model, one module both use)."""
    prefix, causal = DecoderOnlyModel(CONFIG, z_loss=0.0, bos_id=2, prefix_lm=True), DecoderOnlyModel(
        CONFIG, z_loss=0.0, bos_id=2)
    return prefix, causal, _scaled(prefix)


def test_mask_is_bidirectional_on_each_segments_prompt_only():
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    prefix = jnp.array([[1, 1, 0, 0, 1, 0, 0, 0]])
    mask = np.asarray(causal_segment_mask(segments, 8, prefix=prefix))[0, 0].astype(int)
    expected = np.array([
        [1, 1, 0, 0, 0, 0, 0, 0],  # prompt of segment 1 sees the whole prompt, not its targets
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # targets: causal
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # segment 2 never sees segment 1 (whose prompt is marked too)
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding: only itself (its rows carry no loss)
    ])
    np.testing.assert_array_equal(mask, expected)
    causal = np.asarray(causal_segment_mask(segments, 8))[0, 0].astype(int)
    np.testing.assert_array_equal(causal, np.tril(expected))  # without the prefix: row 0 sees only itself


@pytest.mark.slow
def test_prompt_sees_later_prompt_tokens_and_targets_stay_causal(models):
    prefix_model, causal_model, module = models
    one = _batch(EXAMPLES[:1], pack=False)  # [2, 5, 6, 7 | 8, 9, 0, 0]: prompt 0..3
    batch = {k: jnp.concatenate([v] * 3) for k, v in one.items()}  # rows: as is, prompt token 3 / token 5 changed
    batch["decoder_input_tokens"] = batch["decoder_input_tokens"].at[1, 3].set(20).at[2, 5].set(20)
    both = nnx.jit(lambda m, b: (prefix_model.logits(m, b), causal_model.logits(m, b)))
    logits, causal = (np.asarray(x) for x in both(module, batch))
    # Position 0 sees prompt token 3 under prefix-LM (it would not under a causal mask) ...
    assert np.abs(logits[1, 0] - logits[0, 0]).max() > 1e-3
    # ... but no position before 5 sees target-side token 5.
    np.testing.assert_allclose(logits[2, :5], logits[0, :5], atol=1e-6)
    assert np.abs(causal[0, :3] - logits[0, :3]).max() > 1e-3  # the masks differ on the prompt


@pytest.mark.slow
def test_packed_loss_equals_separate_and_counts_only_targets(models):
    prefix_model, causal_model, module = models
    packed, separate = _batch(EXAMPLES, pack=True), _batch(EXAMPLES, pack=False)
    assert packed["decoder_segment_ids"].shape[0] < len(EXAMPLES)

    @nnx.jit
    def all_terms(m, packed, separate):
        def weights(b):
            return b["decoder_loss_weights"].astype(jnp.float32)
        return (prefix_model.loss_terms(m, packed, weights(packed)),
                prefix_model.loss_terms(m, separate, weights(separate)),
                causal_model.loss_terms(m, separate, weights(separate)))

    terms_p, terms_s, causal = all_terms(module, packed, separate)
    assert float(terms_p["tokens"]) == float(terms_s["tokens"]) == 9.0  # the 9 target tokens, as causal
    np.testing.assert_allclose(float(terms_p["loss_sum"]), float(terms_s["loss_sum"]), rtol=1e-5)
    assert abs(float(causal["loss_sum"]) - float(terms_s["loss_sum"])) > 1e-3


@pytest.mark.slow
def test_cached_greedy_decoding_equals_full_recomputation():
    """Each greedy token is the argmax of a full prefix-LM pass over prompt + tokens so far (the prompt marked
    bidirectional), i.e. prefill encodes the prompt bidirectionally and the steps decode causally."""
    model = DecoderOnlyModel(CONFIG, z_loss=0.0, bos_id=2, prefix_lm=True)
    module = _scaled(model, seed=1)
    batch = _batch(EXAMPLES, pack=False)  # rows of different prompt lengths (right-padded)
    predicted = np.asarray(model.predict(module, batch, max_decode_length=6, eos_id=1))
    width = 12  # every sequence right-padded to one width (one compilation): later pads never reach a position

    @nnx.jit
    def last_logits(m, tokens, n, n_prompt):  # prefix-LM and causal logits after token n - 1
        prefix = jnp.arange(width)[None] < n_prompt
        return m(tokens, prefix_mask=prefix)[0, n - 1], m(tokens)[0, n - 1]

    differs = False
    for i, ex in enumerate(EXAMPLES):
        sequence, expected = [2] + ex["inputs"], []
        n_prompt = len(sequence)
        for _ in range(6):
            tokens = jnp.asarray([sequence + [0] * (width - len(sequence))], jnp.int32)
            logits, causal = last_logits(module, tokens, len(sequence), n_prompt)
            differs |= int(jnp.argmax(logits)) != int(jnp.argmax(causal))
            expected.append(int(jnp.argmax(logits)))
            sequence.append(expected[-1])
            if expected[-1] == 1:
                break
        assert predicted[i].tolist() == expected + [0] * (6 - len(expected))
    assert differs  # a causal prefill would have decoded something else


@pytest.mark.slow
def test_emulated_cudnn_matches_xla():
    """'cudnn' (emulated: its arguments through jax.nn.dot_product_attention) gets the dense prefix-LM mask, not
    its causal flag: float32 logits of packed rows equal 'xla' and differ from the causal model's."""
    xla_model = DecoderOnlyModel(CONFIG, bos_id=2, prefix_lm=True)
    cudnn_model = DecoderOnlyModel(dataclasses.replace(CONFIG, attention_impl="cudnn"), bos_id=2, prefix_lm=True)
    module = _scaled(xla_model)
    cudnn_module = cudnn_model.make_module(seed=1)
    nnx.update(cudnn_module, nnx.state(module, nnx.Param))
    causal_model = DecoderOnlyModel(CONFIG, bos_id=2)
    batch = _batch(EXAMPLES, pack=True)  # packed: segment ids and per-segment prompts
    with attention.emulated_kernels():
        outputs = nnx.jit(lambda m, k, b: (xla_model.logits(m, b), cudnn_model.logits(k, b),
                                           causal_model.logits(m, b)))(module, cudnn_module, batch)
    real = np.asarray(batch["decoder_segment_ids"]) > 0
    reference, kernel, causal = (np.asarray(x)[real] for x in outputs)
    np.testing.assert_allclose(kernel, reference, atol=1e-4, rtol=1e-4)
    assert np.abs(causal - reference).max() > 1e-2


def test_splash_is_refused():
    with pytest.raises(ValueError, match="prefix_lm = True needs LlamaConfig.attention_impl"):
        DecoderOnlyModel(dataclasses.replace(CONFIG, attention_impl="splash"), prefix_lm=True)
    q = k = v = jnp.ones((1, 128, 2, 8))
    mask = attention.CausalMask(causal_segment_mask(None, 128), prefix=jnp.ones((1, 128), bool))
    with attention.emulated_kernels(), pytest.raises(ValueError, match="cannot run prefix-LM"):
        attention.attend(q, k, v, implementation="splash", mask=mask)


def test_causal_by_default():
    """HF-converted and existing decoder configs keep causal attention unless prefix_lm is set."""
    assert DecoderOnlyModel(CONFIG).prefix_lm is False


def test_exported_model_gin_keeps_prefix_lm_and_to_hf_refuses(tmp_path):
    """`--from_run` writes prefix_lm into model.gin (re-read, it builds a prefix-LM model); `--to_hf` refuses such a
    folder (HF's Llama is causal only) before writing anything."""
    from itjax.conversion import ConversionError, llama

    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / "model.gin").write_text(llama.model_gin_text(CONFIG, None, prefix_lm=True))
    gin.parse_config((out_dir / "model.gin").read_text())
    assert DecoderOnlyModel().prefix_lm is True
    gin.clear_config()
    with pytest.raises(ConversionError, match="prefix-LM model .* causally only"):
        llama.itjax_to_hf(str(out_dir), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
    assert "prefix_lm" not in llama.model_gin_text(CONFIG, None)  # causal models: as before
