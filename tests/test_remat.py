"""Rematerialisation policies (T5Config / LlamaConfig.remat_policy): same loss and gradients as no remat, less
activation memory kept for the backward pass (the dry run's figure), and a clear error for an unknown policy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from itjax.models.llama import Llama, LlamaConfig
from itjax.models.t5 import T5, T5Config

T5_TINY = T5Config(vocab_size=64, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_encoder_layers=2,
                   num_decoder_layers=2, dropout_rate=0.1)
LLAMA_TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, dropout_rate=0.1)
TOKENS = np.random.RandomState(0).randint(1, 64, size=(2, 24)).astype(np.int32)


def _loss_fn(kind):
    def loss(model, rng):
        if kind == "t5":
            logits = model(TOKENS, TOKENS, dropout_rng=rng)
        else:
            logits = model(TOKENS, dropout_rng=rng)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return loss


def _loss_and_grads(kind, config):
    model = (T5 if kind == "t5" else Llama)(config, rngs=nnx.Rngs(params=0))
    return nnx.value_and_grad(_loss_fn(kind))(model, jax.random.key(3))


@pytest.mark.parametrize("kind,config", [("t5", T5_TINY), ("llama", LLAMA_TINY)])
@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims"])
def test_remat_keeps_loss_and_gradients(kind, config, policy):
    loss, grads = _loss_and_grads(kind, config)
    loss_r, grads_r = _loss_and_grads(kind, dataclasses.replace(config, remat_policy=policy))
    assert float(loss) == pytest.approx(float(loss_r), abs=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(nnx.to_pure_dict(grads_r))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _saved_bytes(policy):
    """Activation bytes kept for the backward pass of a 6-layer Llama's train step (dry-run figure)."""
    from itjax.dry_run import abstract_batch, saved_activation_bytes
    from itjax.models.decoder_only import DecoderOnlyModel
    from itjax.partitioning import Partitioner
    from itjax.trainer import Trainer
    config = dataclasses.replace(LLAMA_TINY, num_layers=6, hidden_size=128, intermediate_size=512, dropout_rate=0.0,
                                 remat_policy=policy)
    model = DecoderOnlyModel(config)
    trainer = Trainer(model, optax.sgd(0.1), Partitioner())
    batch = abstract_batch(model.feature_converter_cls(pack=True), {"inputs": 128, "targets": 128}, 8,
                           trainer.partitioner.batch_sharding)
    return saved_activation_bytes(trainer, batch)


def test_remat_reduces_saved_activations():
    none, minimal, full = (_saved_bytes(p) for p in ("none", "dots_with_no_batch_dims", "full"))
    assert full < minimal < none
    assert full < 0.1 * none


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="remat_policy='everything'.*expected one of"):
        dataclasses.replace(LLAMA_TINY, remat_policy="everything")


def test_residual_bytes_match_jax_print_saved_residuals(capsys):
    """The dry run's count (public jax API only) equals the list jax itself prints, less the arguments."""
    import re

    import jax.ad_checkpoint

    from itjax.dry_run import residual_bytes

    def loss(params, x):
        h = jnp.tanh(x @ params["w1"]).astype(jnp.bfloat16)
        return jnp.sum(jax.nn.relu(h.astype(jnp.float32) @ params["w2"]) ** 2)

    params = {"w1": jnp.ones((16, 32)), "w2": jnp.ones((32, 8))}
    x = jnp.ones((4, 16))
    jax.ad_checkpoint.print_saved_residuals(loss, params, x)
    sizes = {"f32": 4, "bf16": 2, "i32": 4, "bool": 1}
    expected = 0
    for line in capsys.readouterr().out.splitlines():
        if "from the argument" in line:
            continue
        dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
        expected += sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    assert expected > 0
    assert residual_bytes(loss, params, x) == expected
