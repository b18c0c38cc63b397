"""Tests for itjax.models.t5: shapes, dtypes, relative position buckets, masking, packing, options, metadata."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itjax.models.t5 import T5, T5Config, relative_position_bucket

CONFIG = T5Config(
    vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=2, num_decoder_layers=2
)
ALLOWED_PARAM_AXES = {"vocab", "embed", "mlp", "heads", "kv", "relpos_buckets"}


@pytest.fixture(scope="module")
def model():
    return T5(CONFIG, rngs=nnx.Rngs(0))


def with_changes(config, **changes):
    return dataclasses.replace(config, **changes)


def random_tokens(seed, shape):
    """Random non-padding int32 tokens."""
    return jax.random.randint(jax.random.key(seed), shape, 1, CONFIG.vocab_size, dtype=jnp.int32)


@nnx.jit
def forward(model, encoder_input_tokens, decoder_input_tokens, **kwargs):
    """Jitted `model(...)`: one compile per shape is much faster than op-by-op execution."""
    return model(encoder_input_tokens, decoder_input_tokens, **kwargs)


def params(model):
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_logits_shape_and_dtype(model):
    logits = forward(model, random_tokens(1, (3, 7)), random_tokens(2, (3, 5)))
    assert logits.shape == (3, 5, CONFIG.vocab_size)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_bfloat16_close_to_float32(model):
    bf16 = T5(with_changes(CONFIG, dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert all(v.dtype == jnp.float32 for v in params(bf16).values())
    enc, dec = random_tokens(1, (2, 7)), random_tokens(2, (2, 5))
    expected, actual = forward(model, enc, dec), forward(bf16, enc, dec)
    assert actual.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(actual, expected, atol=0.05 * scale)
    assert not np.allclose(actual, expected, atol=1e-6)  # really computed in bfloat16


# Hand-computed from the T5 formula. Bidirectional, 32 buckets: 16 per direction (+16 when the key is after the
# query), exact below max_exact = 8, else 8 + floor(log(n / 8) / log(128 / 8) * 8) capped at 15; e.g. +20 ->
# 16 + 8 + floor(2.64) = 26, -12 -> 8 + floor(1.17) = 9, -127 -> 8 + floor(7.98) = 15, +200 -> 16 + 15 = 31.
# Causal, 32 buckets: keys after the query -> 0, exact below 16, else 16 + floor(log(n / 16) / log(128 / 16) * 16)
# capped at 31; e.g. -20 -> 16 + floor(1.72) = 17, -50 -> 16 + floor(8.77) = 24, -100 -> 16 + floor(14.1) = 30.
def test_relative_position_bucket_bidirectional():
    relative = jnp.array([-1, 0, 1, 5, 7, -8, -12, 20, -20, -127, 200, -200])
    expected = [1, 0, 17, 21, 23, 8, 9, 26, 10, 15, 31, 15]
    buckets = relative_position_bucket(relative, bidirectional=True, num_buckets=32, max_distance=128)
    assert buckets.tolist() == expected


def test_relative_position_bucket_causal():
    relative = jnp.array([1, 0, -1, -5, -15, -16, -20, -50, -100, -127, -200])
    expected = [0, 0, 1, 5, 15, 16, 17, 24, 30, 31, 31]
    buckets = relative_position_bucket(relative, bidirectional=False, num_buckets=32, max_distance=128)
    assert buckets.tolist() == expected


def test_encoder_padding_is_ignored(model):
    enc, dec = random_tokens(1, (2, 5)), random_tokens(2, (2, 4))
    padded = jnp.pad(enc, ((0, 0), (0, 3)))
    np.testing.assert_allclose(forward(model, padded, dec), forward(model, enc, dec), atol=1e-5)


def test_packed_segments_do_not_interact(model):
    enc = random_tokens(1, (1, 8))
    dec = random_tokens(2, (1, 6))
    enc_seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    dec_seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    kwargs = dict(encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)
    base = forward(model, enc, dec, **kwargs)
    # Change segment 2's encoder tokens, an encoder padding position and segment 2's decoder tokens.
    enc2 = enc.at[0, 4].set(enc[0, 4] % 63 + 1).at[0, 7].set(5)
    dec2 = dec.at[0, 3].set(dec[0, 3] % 63 + 1)
    changed = forward(model, enc2, dec2, **kwargs)
    np.testing.assert_allclose(changed[:, :3], base[:, :3], atol=1e-6)
    assert not np.allclose(changed[:, 3:5], base[:, 3:5], atol=1e-3)


def test_decoder_is_causal(model):
    enc, dec = random_tokens(1, (2, 6)), random_tokens(2, (2, 7))
    base = forward(model, enc, dec)
    t = 4
    changed = forward(model, enc, dec.at[:, t].set(dec[:, t] % 63 + 1))
    np.testing.assert_allclose(changed[:, :t], base[:, :t], atol=1e-6)
    assert not np.allclose(changed[:, t:], base[:, t:], atol=1e-3)


def test_packing_matches_separate_examples(model):
    enc_a, dec_a = random_tokens(1, (1, 4)), random_tokens(2, (1, 3))
    enc_b, dec_b = random_tokens(3, (1, 3)), random_tokens(4, (1, 4))
    enc = jnp.concatenate([enc_a, enc_b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    dec = jnp.concatenate([dec_a, dec_b, jnp.zeros((1, 1), jnp.int32)], axis=1)
    packed = forward(
        model,
        enc,
        dec,
        encoder_segment_ids=jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0]]),
        decoder_segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]),
        encoder_positions=jnp.array([[0, 1, 2, 3, 0, 1, 2, 0, 0]]),
        decoder_positions=jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]]),
    )
    np.testing.assert_allclose(packed[:, :3], forward(model, enc_a, dec_a), atol=1e-5)
    np.testing.assert_allclose(packed[:, 3:7], forward(model, enc_b, dec_b), atol=1e-5)


def test_decode_requires_both_segment_ids(model):
    enc, dec = random_tokens(1, (1, 4)), random_tokens(2, (1, 3))
    with pytest.raises(ValueError, match="segment_ids"):
        forward(model, enc, dec, encoder_segment_ids=jnp.ones((1, 4), jnp.int32))


def test_tied_relu_t5_1_0_options():
    config = with_changes(CONFIG, feed_forward="relu", tie_word_embeddings=True)
    model = T5(config, rngs=nnx.Rngs(0))
    names = params(model)
    assert not any(name.startswith("lm_head") for name in names)
    assert "encoder.layers.0.mlp.wi.kernel" in names and "encoder.layers.0.mlp.wi_0.kernel" not in names
    logits = forward(model, random_tokens(1, (2, 5)), random_tokens(2, (2, 4)))
    assert logits.shape == (2, 4, CONFIG.vocab_size) and logits.dtype == jnp.float32
    # The output layer is the embedding: scaling the table scales the logits' dependence on it.
    model.shared.embedding[...] = model.shared.embedding[...] * 2.0
    assert not np.allclose(forward(model, random_tokens(1, (2, 5)), random_tokens(2, (2, 4))), logits, atol=1e-3)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="feed_forward"):
        with_changes(CONFIG, feed_forward="swiglu")
    with pytest.raises(ValueError, match="dtype"):
        with_changes(CONFIG, dtype="float16")


def test_every_param_has_logical_axes(model):
    for config in (CONFIG, with_changes(CONFIG, feed_forward="relu", tie_word_embeddings=True)):
        for name, variable in params(T5(config, rngs=nnx.Rngs(0))).items():
            axes = variable.out_sharding
            assert axes is not None and len(axes) == variable.ndim, name
            assert set(axes) <= ALLOWED_PARAM_AXES, (name, axes)


def test_initialisation_scales_follow_t5x(model):
    d, h, kv, ff = CONFIG.d_model, CONFIG.num_heads, CONFIG.d_kv, CONFIG.d_ff
    p = params(model)
    buckets = CONFIG.relative_attention_num_buckets
    expected_std = {
        "shared.embedding": 1.0,
        "encoder.layers.0.attention.q.kernel": (d * kv) ** -0.5,
        "encoder.layers.0.attention.k.kernel": d**-0.5,
        "decoder.layers.1.cross_attention.v.kernel": d**-0.5,
        "decoder.layers.0.self_attention.o.kernel": (h * kv) ** -0.5,
        "encoder.layers.1.mlp.wi_0.kernel": d**-0.5,
        "decoder.layers.0.mlp.wo.kernel": ff**-0.5,
        "lm_head.kernel": d**-0.5,
        "encoder.relative_bias.embedding": (2.0 / (buckets + h)) ** 0.5,  # uniform fan_avg: limit / sqrt(3)
    }
    for name, std in expected_std.items():
        np.testing.assert_allclose(float(jnp.std(p[name][...])), std, rtol=0.15, err_msg=name)
    np.testing.assert_array_equal(p["encoder.final_norm.scale"][...], np.ones(d))


def test_dropout_is_a_pure_function_of_the_key():
    model = T5(with_changes(CONFIG, dropout_rate=0.2), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def train_forward(state, enc, dec, rng):
        return nnx.merge(graphdef, state)(enc, dec, dropout_rng=rng)

    enc, dec = random_tokens(1, (2, 6)), random_tokens(2, (2, 5))
    deterministic = forward(model, enc, dec)
    a = train_forward(state, enc, dec, jax.random.key(7))
    np.testing.assert_array_equal(a, train_forward(state, enc, dec, jax.random.key(7)))
    assert not np.allclose(a, train_forward(state, enc, dec, jax.random.key(8)), atol=1e-3)
    assert not np.allclose(a, deterministic, atol=1e-3)


def test_activation_constraints_under_a_two_device_mesh():
    """The logical activation names have the right ranks and map onto a real (fake-CPU) mesh."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from flax import nnx
        from jax.sharding import Mesh
        from itjax import partitioning
        from itjax.models.encoder_decoder import EncoderDecoderModel
        from itjax.models.t5 import T5, T5Config

        config = T5Config(vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=64,
                          num_encoder_layers=1, num_decoder_layers=1)
        graphdef, state = nnx.split(T5(config, rngs=nnx.Rngs(0)))
        enc = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) + 1
        dec = enc[:, :4]

        def run(state):
            model = nnx.merge(graphdef, state)
            return model(enc, dec), EncoderDecoderModel(config).generate(
                model, {"encoder_input_tokens": enc}, max_decode_length=3, eos_id=1)

        reference = jax.jit(run)(state)
        assert len(jax.devices()) == 2
        mesh = Mesh(np.array(jax.devices()).reshape(1, 1, 2), partitioning.MESH_AXES)
        with partitioning.axis_rules(mesh, partitioning.STANDARD_2D_RULES):
            sharded = jax.jit(run)(state)
        np.testing.assert_allclose(sharded[0], reference[0], atol=1e-5)
        np.testing.assert_array_equal(sharded[1], reference[1])
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
