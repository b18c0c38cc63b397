import jax.numpy as jnp
import numpy as np
import pytest

from itjax import losses


def test_cross_entropy_matches_hand_computation():
    logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = jnp.array([[2, 1]])
    loss, z = losses.cross_entropy_with_z_loss(logits, targets, z_loss=0.0)
    log_z0 = np.log(np.exp(1) + np.exp(2) + np.exp(3))
    np.testing.assert_allclose(loss, [[log_z0 - 3.0, np.log(3.0)]], rtol=1e-6)
    np.testing.assert_allclose(z, 0.0)
    loss_z, z = losses.cross_entropy_with_z_loss(logits, targets, z_loss=1e-4)
    np.testing.assert_allclose(z, [[1e-4 * log_z0 ** 2, 1e-4 * np.log(3.0) ** 2]], rtol=1e-5)
    np.testing.assert_allclose(loss_z, loss + z, rtol=1e-6)


def test_normalizing_factors():
    weights = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
    w, d = losses.normalized_weights_and_factor(weights, None, None)
    assert float(d) == 1.0 and np.array_equal(w, weights)
    _, d = losses.normalized_weights_and_factor(weights, None, 233472.0)
    assert float(d) == 233472.0
    _, d = losses.normalized_weights_and_factor(weights, None, losses.NUM_REAL_TARGET_TOKENS)
    assert float(d) == 4.0
    _, d = losses.normalized_weights_and_factor(weights, None, losses.NUM_TOTAL_TARGET_TOKENS)
    assert float(d) == 8.0
    w, d = losses.normalized_weights_and_factor(weights, None, losses.AVERAGE_PER_SEQUENCE)
    np.testing.assert_allclose(w, [[1 / 3, 1 / 3, 1 / 3, 0], [1, 0, 0, 0]], rtol=1e-6)
    assert float(d) == 2.0
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        losses.normalized_weights_and_factor(weights, None, "PER_TOKEN")


def test_average_per_sequence_respects_packed_segments():
    # Row 0 packs a 2-token and a 1-token example; row 1 holds one 3-token example.
    weights = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]], jnp.float32)
    segments = jnp.array([[1, 1, 2, 0], [1, 1, 1, 0]])
    w, d = losses.normalized_weights_and_factor(weights, segments, losses.AVERAGE_PER_SEQUENCE)
    np.testing.assert_allclose(w, [[0.5, 0.5, 1.0, 0], [1 / 3, 1 / 3, 1 / 3, 0]], rtol=1e-6)
    assert float(d) == pytest.approx(3.0)


def test_schedules():
    from itjax import optimizers
    cosine = optimizers.cosine_decay_schedule(learning_rate=2e-2, warmup_steps=100, decay_steps=2000)
    assert float(cosine(0)) == 0.0
    assert float(cosine(50)) == pytest.approx(1e-2)
    assert float(cosine(100)) == pytest.approx(2e-2)
    assert float(cosine(1050)) == pytest.approx(1e-2, rel=1e-4)  # half way through the cosine
    assert float(cosine(2000)) == pytest.approx(0.0, abs=1e-9)
    short = optimizers.cosine_decay_schedule(learning_rate=1.0, warmup_steps=100, decay_steps=6)
    assert float(short(3)) == pytest.approx(1.0) and float(short(6)) == pytest.approx(0.0, abs=1e-7)
    rsqrt = optimizers.rsqrt_schedule(learning_rate=1.0, warmup_steps=10_000)
    assert float(rsqrt(jnp.int32(5))) == pytest.approx(0.01)
    assert float(rsqrt(jnp.int32(40_000))) == pytest.approx(0.005)
    linear = optimizers.linear_decay_schedule(learning_rate=1.0, warmup_steps=10, decay_steps=110)
    assert float(linear(5)) == pytest.approx(0.5) and float(linear(60)) == pytest.approx(0.5)
    constant = optimizers.constant_schedule(learning_rate=1e-3, warmup_steps=10)
    assert float(constant(5)) == pytest.approx(5e-4) and float(constant(500)) == pytest.approx(1e-3)
