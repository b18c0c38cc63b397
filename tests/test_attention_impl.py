"""Tests for `attention_impl` (itjax.models.attention): the kernel paths against the einsum reference.

On CPU, `attention.emulated_kernels()` runs 'cudnn' as `jax.nn.dot_product_attention(implementation='xla')` with the
arguments cuDNN gets (causal flag, window, dense mask for packed rows, T5's bias) and 'splash' as the Pallas kernel in
interpret mode, so their argument building is checked against 'xla' (float32: outputs and gradients to 1e-5) for T5
(relative-position bias, padding, packing, encoder and decoder, cached decoding) and Llama (causal, grouped-query,
sliding window, packed segments, cached decoding). Tests marked `gpu` / `tpu` run the real kernels against 'xla' on
the chip (skipped elsewhere; see tests/conftest.py).
"""

import dataclasses

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from itjax.models import attention
from itjax.models.llama import Llama, LlamaConfig, causal_segment_mask
from itjax.models.t5 import T5, T5Config

T5_TINY = T5Config(vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=1,
                   num_decoder_layers=1)
LLAMA_TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, sliding_window=5)


def _twins(model_cls, config, implementation, seed=0):
    """('xla' model, `implementation` model) with the same parameters."""
    reference = model_cls(config, rngs=nnx.Rngs(seed))
    other = model_cls(dataclasses.replace(config, attention_impl=implementation), rngs=nnx.Rngs(seed + 1))
    nnx.update(other, nnx.state(reference, nnx.Param))
    return reference, other


def _outputs_and_grads(models, loss_fn, *args):
    """For each model: (outputs, gradient of loss with respect to every Param), where loss_fn(model, *args) returns
    (loss, outputs), all in one jitted program (one compilation; traced in the caller's context). Outputs are
    compared element by element rather than the scalar loss, a random-signed sum whose cancellation would turn
    float summation-order noise into a large relative difference."""
    parts = [nnx.split(model, nnx.Param, ...) for model in models]

    @jax.jit
    def run(all_params, *args):
        results = []
        for (graphdef, _, rest), params in zip(parts, all_params):
            (_, outputs), grads = jax.value_and_grad(
                lambda p: loss_fn(nnx.merge(graphdef, p, rest), *args), has_aux=True)(params)
            results.append((outputs, grads))
        return results
    return run([params for _, params, _ in parts], *args)


def _reference_and_kernel(make_fn, implementation, *args):
    """(make_fn('xla')(*args), make_fn(implementation)(*args)), both in one jitted program under emulation."""
    with attention.emulated_kernels():
        return jax.jit(lambda *a: (make_fn("xla")(*a), make_fn(implementation)(*a)))(*args)


def _assert_same(reference, other, tol=1e-5):
    """Equal pytrees of arrays up to `tol` relative to each leaf's largest magnitude."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(reference), jax.tree_util.tree_leaves(other)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(float(np.max(np.abs(a))), 1e-6)
        np.testing.assert_allclose(b, a, atol=tol * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


def _weights(shape, seed=7):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ------------------------------------------------------------------------------------------------------------------
# The attention core alone
# ------------------------------------------------------------------------------------------------------------------


def _qkv(batch=2, length=12, heads=4, kv_heads=2, d=8, keys_length=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    k_len = keys_length or length
    return (jax.random.normal(ks[0], (batch, length, heads, d)), jax.random.normal(ks[1], (batch, k_len, kv_heads, d)),
            jax.random.normal(ks[2], (batch, k_len, kv_heads, d)))


@pytest.mark.parametrize("window", [None, 150])
def test_causal_blocks_equal_the_dense_mask(window):
    """'xla' with a CausalMask runs query blocks that skip the masked upper triangle (and, with a window, the keys
    before it): outputs and gradients equal the dense-mask computation, for less work. 300 tokens: blocks of 128,
    128 and 44; packed segments with padding; grouped-query heads."""
    q, k, v = _qkv(batch=2, length=300, heads=4, kv_heads=2, d=8)
    segments = jnp.array([[1] * 100 + [2] * 170 + [0] * 30, [1] * 300])
    mask = attention.CausalMask(causal_segment_mask(segments, 300, window), segments, window)

    def run(mask):
        def total(q, k, v):
            out = attention.attend(q, k, v, mask=mask, scale=8**-0.5)
            return jnp.sum(out * _weights(q.shape)), out
        return jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)

    (_, blocked), blocked_grads = jax.jit(run(mask))(q, k, v)
    (_, dense), dense_grads = jax.jit(run(mask.dense))(q, k, v)
    _assert_same((dense, dense_grads), (blocked, blocked_grads))
    flops = [jax.jit(run(m)).lower(q, k, v).compile().cost_analysis()["flops"] for m in (mask, mask.dense)]
    assert flops[0] < 0.8 * flops[1], flops


def test_causal_block_size():
    assert attention.causal_block_size(100) == 128
    assert attention.causal_block_size(1024) == 128  # 8 blocks
    assert attention.causal_block_size(2048) == 128  # 16 blocks
    assert attention.causal_block_size(8192) == 512  # at most CAUSAL_MAX_BLOCKS


def test_cudnn_arguments_match_einsum_causal_gqa():
    """Grouped-query heads, causal; unpacked (the causal flag alone) and packed with a 3-token window (flag, window
    and the dense segment mask)."""
    q, k, v = _qkv()
    segments = jnp.array([[1] * 5 + [2] * 6 + [0], [1] * 12])
    masks = [attention.CausalMask(causal_segment_mask(None, 12)),
             attention.CausalMask(causal_segment_mask(segments, 12, 3), segments, 3)]

    def loss(impl):
        def total(q, k, v):
            outs = [attention.attend(q, k, v, implementation=impl, mask=mask, scale=8**-0.5) for mask in masks]
            return jnp.sum((outs[0] + 2 * outs[1]) * _weights(q.shape))
        return jax.value_and_grad(total, argnums=(0, 1, 2))
    _assert_same(*_reference_and_kernel(loss, "cudnn", q, k, v))


def test_cudnn_arguments_match_einsum_bias_and_cross_attention():
    """T5-style: scale 1, a [1, heads, q, k] position bias plus a [batch, 1, 1, k] padding mask as one bias, and a
    cross-attention bias [batch, 1, 1, k] alone (broadcast over queries for cuDNN)."""
    q, k, v = _qkv(heads=4, kv_heads=4, keys_length=10)
    padding = jnp.arange(10)[None, :] < jnp.array([7, 10])[:, None]
    pad_bias = jnp.where(padding, 0.0, -1e10)[:, None, None, :]
    position_bias = _weights((1, 4, 12, 10), seed=3)

    def loss(impl):
        def total(q, k, v, position_bias):
            self_like = attention.attend(q, k, v, implementation=impl, bias=position_bias + pad_bias)
            cross_like = attention.attend(q, k, v, implementation=impl, bias=pad_bias)
            return jnp.sum((self_like + 2 * cross_like) * _weights(q.shape))
        return jax.value_and_grad(total, argnums=(0, 1, 2, 3))
    _assert_same(*_reference_and_kernel(loss, "cudnn", q, k, v, position_bias))


def test_splash_interpreted_matches_einsum():
    """Splash (Pallas interpreter): grouped-query heads, a 40-token window, two packed segments + padding."""
    q, k, v = _qkv(batch=2, length=128, heads=4, kv_heads=2, d=16)
    segments = jnp.array([[1] * 50 + [2] * 60 + [0] * 18, [1] * 128])
    mask = attention.CausalMask(causal_segment_mask(segments, 128, 40), segments, 40)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention.attend(q, k, v, implementation=impl, mask=mask, scale=0.25)
                                       * _weights(q.shape))
    _assert_same(*_reference_and_kernel(lambda impl: jax.value_and_grad(loss(impl), argnums=(0, 1, 2)), "splash",
                                        q, k, v))


def test_splash_runs_per_shard_under_a_mesh():
    """Under 2D partitioning rules (rows over data x fsdp, heads over tensor) the kernel runs in a shard_map."""
    from itjax.partitioning import STANDARD_2D_RULES, Partitioner

    partitioner = Partitioner(data=2, fsdp=2, tensor=2, logical_axis_rules=STANDARD_2D_RULES,
                              devices=jax.devices()[:8])
    q, k, v = _qkv(batch=4, length=128, heads=4, kv_heads=2, d=16)
    segments = jnp.array([[1] * 50 + [2] * 78] * 2 + [[1] * 128] * 2)
    mask = attention.CausalMask(causal_segment_mask(segments, 128), segments)

    def run(impl):
        def attend(q, k, v):
            with partitioner.axis_rules():
                return attention.attend(q, k, v, implementation=impl, mask=mask, scale=0.25)
        return attend
    sharding = partitioner.sharding(("batch", "length", "heads", "kv"))
    _assert_same(*_reference_and_kernel(run, "splash", *(jax.device_put(x, sharding) for x in (q, k, v))))


def test_splash_kernel_in_tpu_interpret_mode():
    """The kernel `attend` builds, run by Pallas's TPU interpreter (simulated TPU memory) against the einsum. One row
    and kv head: jax 0.10.2's TPU interpreter cannot run a vmapped pallas_call (it zips the batched grid with the
    kernel's 3 dimension semantics: "safe_zip() argument 1 has length 3 but argument 0 has length 4"), so the
    vmapped model path is tested with the Pallas HLO interpreter (`interpret=True`, `emulated_kernels()`)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    q, k, v = _qkv(batch=1, length=128, heads=2, kv_heads=1, d=16)
    segments = jnp.array([[1] * 70 + [2] * 58])
    kernel = attention.splash_kernel(128, 2, None, False)
    with pltpu.force_tpu_interpret_mode():
        out = jax.jit(kernel)(jnp.transpose(q[0], (1, 0, 2)) * 0.25, k[0, :, 0], v[0, :, 0],
                              segment_ids=kernel_lib.SegmentIds(segments[0], segments[0]))
    mask = causal_segment_mask(segments, 128)
    expected = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask=mask, scale=0.25))(q, k, v)
    _assert_same(expected[0], jnp.transpose(out, (1, 0, 2)))


# ------------------------------------------------------------------------------------------------------------------
# Whole models, emulated kernels against 'xla'
# ------------------------------------------------------------------------------------------------------------------


def _t5_batch(packed):
    enc = jax.random.randint(jax.random.key(1), (2, 12), 1, 64, dtype=jnp.int32)
    dec = jax.random.randint(jax.random.key(2), (2, 8), 1, 64, dtype=jnp.int32)
    if not packed:
        return dict(encoder_input_tokens=enc.at[0, 9:].set(0), decoder_input_tokens=dec)
    enc_seg = jnp.array([[1] * 5 + [2] * 6 + [0], [1] * 12])
    dec_seg = jnp.array([[1] * 3 + [2] * 4 + [0], [1] * 8])
    return dict(encoder_input_tokens=enc * (enc_seg > 0), decoder_input_tokens=dec * (dec_seg > 0),
                encoder_segment_ids=enc_seg, decoder_segment_ids=dec_seg)


def _t5_loss(model, batch):
    """(sum of the logits weighted at random, logits)."""
    logits = model(**batch)
    return jnp.sum(logits * _weights((2, 8, 64))), logits


def test_t5_cudnn_path_matches_xla():
    """Packed rows (segment masks and padding in the bias) through encoder, decoder and cross-attention."""
    reference, fused = _twins(T5, T5_TINY, "cudnn")
    batch = _t5_batch(packed=True)
    with attention.emulated_kernels():
        _assert_same(*_outputs_and_grads([reference, fused], _t5_loss, batch))


def test_t5_cudnn_cached_decoding_matches_xla():
    """Encoder through the cuDNN path, decoding steps through 'xla' (the fallback): logits equal the reference's
    cached decoding and its teacher-forced pass."""
    reference, fused = _twins(T5, T5_TINY, "cudnn")
    batch = _t5_batch(packed=False)
    batch["decoder_input_tokens"] = batch["decoder_input_tokens"][:, :3]

    @nnx.jit
    def teacher_forced_and_decoded(reference, model, enc, dec):
        cache = model.init_decode_cache(model.encode(enc), enc, dec.shape[1])
        steps = []
        for t in range(dec.shape[1]):
            logits, cache = model.decode_step(dec[:, t], jnp.int32(t), cache)
            steps.append(logits)
        return reference(enc, dec), jnp.stack(steps, axis=1)

    with attention.emulated_kernels():
        _assert_same(*teacher_forced_and_decoded(reference, fused, batch["encoder_input_tokens"],
                                                 batch["decoder_input_tokens"]))


def _llama_batch(packed):
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 1, 64, dtype=jnp.int32)
    if not packed:
        return dict(tokens=tokens)
    segments = jnp.array([[1] * 5 + [2] * 6 + [0], [1] * 12])
    positions = jnp.array([list(range(5)) + list(range(6)) + [0], list(range(12))])
    return dict(tokens=tokens * (segments > 0), segment_ids=segments, positions=positions)


def _llama_loss(model, batch):
    """(sum of the logits weighted at random, logits)."""
    logits = model(batch["tokens"], segment_ids=batch.get("segment_ids"), positions=batch.get("positions"))
    return jnp.sum(logits * _weights(logits.shape)), logits


def test_llama_cudnn_path_matches_xla():
    """Grouped-query heads, a 5-token window and packed rows (causal flag, window and the dense segment mask)."""
    reference, fused = _twins(Llama, LLAMA_TINY, "cudnn")
    batch = _llama_batch(packed=True)
    with attention.emulated_kernels():
        _assert_same(*_outputs_and_grads([reference, fused], _llama_loss, batch))


def test_llama_cached_decoding_falls_back_to_xla():
    """Prefill and decoding steps of a 'cudnn' model run 'xla' (no emulation needed on this CPU)."""
    reference, other = _twins(Llama, LLAMA_TINY, "cudnn")
    tokens = _llama_batch(packed=False)["tokens"]

    def run(model, tokens):
        cache = model.init_decode_cache(2, 12)
        first, positions, cache = model.prefill(tokens[:, :10], jnp.ones((2, 10), bool), cache)
        second, cache = model.decode_step(tokens[:, 10], positions, cache)
        return jnp.stack([first, second], axis=1)

    _assert_same(*nnx.jit(lambda a, b, tokens: (run(a, tokens), run(b, tokens)))(reference, other, tokens))


def test_llama_splash_path_matches_xla():
    """The Llama call site's segment ids and window reach the (interpreted) kernel: logits equal 'xla'."""
    config = dataclasses.replace(LLAMA_TINY, sliding_window=40)
    reference, fused = _twins(Llama, config, "splash")
    segments = jnp.array([[1] * 50 + [2] * 78, [1] * 100 + [0] * 28])
    positions = jnp.array([list(range(50)) + list(range(78)), list(range(128))])
    tokens = jax.random.randint(jax.random.key(4), (2, 128), 1, 64, dtype=jnp.int32) * (segments > 0)
    forward = nnx.jit(lambda models, tokens, segments, positions: [
        model(tokens, segment_ids=segments, positions=positions) for model in models])
    with attention.emulated_kernels():
        _assert_same(*forward([reference, fused], tokens, segments, positions))


# ------------------------------------------------------------------------------------------------------------------
# Configuration and errors
# ------------------------------------------------------------------------------------------------------------------


def test_gin_sets_attention_impl():
    import itjax.models.decoder_only  # noqa: F401  (registers LlamaConfig)
    import itjax.models.encoder_decoder  # noqa: F401  (registers T5Config)

    gin.parse_config(["T5Config.attention_impl = 'cudnn'", "LlamaConfig.attention_impl = 'splash'"])
    t5 = gin.get_configurable("T5Config")(vocab_size=8, d_model=8, num_heads=2, d_kv=4, d_ff=8,
                                          num_encoder_layers=1, num_decoder_layers=1)
    llama = gin.get_configurable("LlamaConfig")(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                                                num_heads=2, num_kv_heads=1)
    assert (t5.attention_impl, llama.attention_impl) == ("cudnn", "splash")


def test_bad_values_are_refused_by_the_config():
    with pytest.raises(ValueError, match=r"T5Config.attention_impl='splash'.*no bias input.*'xla'"):
        dataclasses.replace(T5_TINY, attention_impl="splash")
    with pytest.raises(ValueError, match=r"LlamaConfig.attention_impl='flash'; expected one of"):
        dataclasses.replace(LLAMA_TINY, attention_impl="flash")


@pytest.mark.skipif(jax.default_backend() in ("gpu", "tpu"), reason="checks the refusal on a CPU")
def test_kernel_on_the_wrong_backend_names_the_alternative():
    for implementation in ("cudnn", "splash"):
        model = Llama(dataclasses.replace(LLAMA_TINY, attention_impl=implementation), rngs=nnx.Rngs(0))
        with pytest.raises(RuntimeError, match=rf"attention_impl='{implementation}' needs .* runs on 'cpu'.*'xla'"):
            nnx.eval_shape(lambda model: model(jnp.ones((1, 128), jnp.int32)), model)


def test_unsupported_calls_are_refused():
    model = T5(dataclasses.replace(T5_TINY, attention_impl="cudnn", dropout_rate=0.1), rngs=nnx.Rngs(0))
    batch = _t5_batch(packed=False)
    with attention.emulated_kernels(), pytest.raises(ValueError, match="no dropout on attention weights"):
        nnx.eval_shape(lambda model: model(**batch, dropout_rng=jax.random.key(0)), model)
    splash = Llama(dataclasses.replace(LLAMA_TINY, attention_impl="splash"), rngs=nnx.Rngs(0))
    with attention.emulated_kernels(), pytest.raises(ValueError, match="multiples of 128.*'xla'"):
        nnx.eval_shape(lambda model: model(jnp.ones((1, 12), jnp.int32)), splash)
    q, k, v = _qkv()
    with attention.emulated_kernels(), pytest.raises(ValueError, match="'splash' runs causal self-attention"):
        attention.attend(q, k, v, implementation="splash", mask=jnp.ones((1, 1, 12, 12), bool))


# ------------------------------------------------------------------------------------------------------------------
# On the chip: the real kernels against 'xla' (bfloat16 tolerances)
# ------------------------------------------------------------------------------------------------------------------


def _bf16_close(reference, other, tol=3e-2):
    _assert_same(reference, other, tol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_on_gpu_matches_xla(packed):
    t5 = dataclasses.replace(T5_TINY, dtype="bfloat16", d_kv=16)
    _bf16_close(*_outputs_and_grads(_twins(T5, t5, "cudnn"), _t5_loss, _t5_batch(packed)))
    llama = dataclasses.replace(LLAMA_TINY, dtype="bfloat16", hidden_size=64)
    _bf16_close(*_outputs_and_grads(_twins(Llama, llama, "cudnn"), _llama_loss, _llama_batch(packed)))


@pytest.mark.tpu
@pytest.mark.parametrize("window", [None, 100])
def test_splash_on_tpu_matches_xla(window):
    config = dataclasses.replace(LLAMA_TINY, hidden_size=512, num_heads=4, num_kv_heads=2, sliding_window=window)
    segments = jnp.concatenate([jnp.ones((2, 300), jnp.int32), 2 * jnp.ones((2, 212), jnp.int32)], axis=1)
    positions = jnp.concatenate([jnp.arange(300), jnp.arange(212)])[None].repeat(2, 0)
    tokens = jax.random.randint(jax.random.key(4), (2, 512), 1, 64, dtype=jnp.int32)
    batch = dict(tokens=tokens, segment_ids=segments, positions=positions)
    _assert_same(*_outputs_and_grads(_twins(Llama, config, "splash"), _llama_loss, batch), tol=1e-2)  # the TPU's default matmul precision differs between the two


def test_softmax_and_its_derivative_equal_jax_nn_softmax():
    """`attention.softmax` (its own JVP, reading only the output) against JAX's softmax: values, a JVP and a VJP, with
    a fully masked row (every logit MASK_BIAS: uniform weights) and large logits (the max shift)."""
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5, 7)) * 30.0
    logits = logits.at[0, 0, 0].set(attention.MASK_BIAS)
    tangent = jax.random.normal(jax.random.key(1), logits.shape)
    cotangent = jax.random.normal(jax.random.key(2), logits.shape)
    ours, reference = attention.softmax, lambda x: jax.nn.softmax(x, axis=-1)
    np.testing.assert_allclose(ours(logits), reference(logits), atol=1e-7)
    np.testing.assert_allclose(ours(logits)[0, 0, 0], np.full(7, 1 / 7), rtol=1e-6)
    np.testing.assert_allclose(jax.jvp(ours, (logits,), (tangent,))[1],
                               jax.jvp(reference, (logits,), (tangent,))[1], atol=1e-6)
    np.testing.assert_allclose(jax.vjp(ours, logits)[1](cotangent)[0], jax.vjp(reference, logits)[1](cotangent)[0],
                               atol=1e-6)
    # Second derivative too (the custom JVP is itself differentiable).
    hvp = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(f(y) * cotangent))(x) * tangent))(logits)
    np.testing.assert_allclose(hvp(ours), hvp(reference), atol=1e-5)
