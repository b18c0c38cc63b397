"""`scan_layers=True`: the stacked, `jax.lax.scan`-ned layer stacks compute what the per-layer models compute.

Both families, built from the same seed, have equal parameters (stacked vs per layer), logits (with and without
dropout), gradients under a remat policy, and greedy / beam decodes; checkpoints of one layout load into models of
the other; PEFT adapters on a stacked model equal per-layer adapters; training on 8 fake devices with FSDP follows
the per-layer run's losses; Adafactor's statistics stay per layer. (Scanned runs exporting to HF and peft:
tests/test_export_run.py.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from itjax import checkpoints
from itjax.conversion import folders
from itjax.models import decoding, scan
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.encoder_decoder import EncoderDecoderModel
from itjax.models.llama import Llama, LlamaConfig
from itjax.models.t5 import T5, T5Config
from itjax.partitioning import FSDP_RULES, Partitioner
from itjax.peft import IA3, LoRA
from itjax.peft.core import AdapterParam, PeftConfigError
from itjax.peft.prefix_tuning import PrefixTuning
from itjax.trainer import Trainer

LLAMA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                    num_kv_heads=2, dropout_rate=0.1)
T5_CONFIG = T5Config(vocab_size=96, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_encoder_layers=2,
                     num_decoder_layers=3, dropout_rate=0.1)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(2, 96, size=(2, 12)), jnp.int32)
DECODER_TOKENS = jnp.asarray(np.random.RandomState(1).randint(2, 96, size=(2, 6)), jnp.int32)


def _pair(config, cls, **scanned):
    """(per-layer model, scanned model) from the same seed."""
    return (cls(config, rngs=nnx.Rngs(0)),
            cls(dataclasses.replace(config, scan_layers=True, **scanned), rngs=nnx.Rngs(0)))


def _params(module, kind=nnx.Param):
    return nnx.to_pure_dict(nnx.state(module, kind))


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


@nnx.jit
def _forward(model, dropout_rng=None):
    if isinstance(model, Llama):
        return model(TOKENS, dropout_rng=dropout_rng)
    return model(TOKENS, DECODER_TOKENS, dropout_rng=dropout_rng)


@pytest.mark.parametrize("config,cls", [(LLAMA, Llama), (T5_CONFIG, T5)], ids=["llama", "t5"])
def test_scanned_model_equals_per_layer_model(config, cls):
    per_layer, scanned = _pair(config, cls, remat_policy="full")
    stacked = _params(scanned)
    some_kernel = stacked["layers"] if cls is Llama else stacked["decoder"]["layers"]
    assert jax.tree.leaves(some_kernel)[0].shape[0] == (3 if cls is Llama else config.num_decoder_layers)
    assert _max_diff(scan.stack_layers(_params(per_layer)), stacked) == 0.0  # layer i = layer i
    # The stacked dimension carries the 'layers' logical axis (replicated by every rules table).
    state = nnx.state(scanned, nnx.Param)
    q = state["layers"]["self_attn"]["q_proj"]["kernel"] if cls is Llama else \
        state["encoder"]["layers"]["attention"]["q"]["kernel"]
    assert tuple(q.get_metadata()["out_sharding"]) == ("layers", "embed", "heads", "kv")

    np.testing.assert_allclose(_forward(scanned), _forward(per_layer), atol=1e-5)
    key = jax.random.key(3)  # dropout: the scanned layers draw the per-layer model's keys
    np.testing.assert_allclose(_forward(scanned, key), _forward(per_layer, key), atol=1e-5)
    assert np.abs(_forward(scanned, key) - _forward(scanned)).max() > 1e-3

    def loss(model):  # (without dropout: compiling dropout's PRNG for a second pass costs more than it tests)
        return jnp.mean(_forward(model) ** 2)
    grad = nnx.jit(nnx.grad(loss))
    grads_per_layer = scan.stack_layers(nnx.to_pure_dict(grad(per_layer)))
    grads_scanned = nnx.to_pure_dict(grad(scanned))
    assert _max_diff(grads_per_layer, grads_scanned) < 1e-5


@pytest.mark.parametrize("method", ["greedy", "beam"])
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_scanned_decoding_equals_per_layer(family, method):
    if family == "llama":
        per_layer, scanned = _pair(LLAMA, Llama)
        mask = jnp.arange(12)[None, :] >= jnp.array([[0], [4]])  # row 1 left-padded

        def fns(model):
            return DecoderOnlyModel(LLAMA).decode_fns(
                model, {"decoder_input_tokens": jnp.where(mask, TOKENS, 0), "decoder_causal_attention": mask}, 7)
    else:
        per_layer, scanned = _pair(T5_CONFIG, T5)

        def fns(model):
            return EncoderDecoderModel(T5_CONFIG).decode_fns(model, {"encoder_input_tokens": TOKENS}, 7)
    expected = decoding.generate(fns(per_layer), max_decode_length=7, eos_id=1, method=method, num_beams=3)
    got = decoding.generate(fns(scanned), max_decode_length=7, eos_id=1, method=method, num_beams=3)
    assert got.tolist() == expected.tolist()
    cache = scanned.init_decode_cache(2, 9) if family == "llama" else \
        scanned.init_decode_cache(scanned.encode(TOKENS), TOKENS, 9)
    stacked = cache.keys if family == "llama" else cache.self_keys
    assert stacked.shape[:2] == (3, 2)  # [layers, batch, ...]


def test_stack_and_unstack_layers_round_trip():
    per_layer = _params(T5(T5_CONFIG, rngs=nnx.Rngs(0)))
    stacked = scan.stack_layers(per_layer)
    assert scan.is_stacked(stacked) and scan.is_stacked(per_layer) is False
    assert scan.is_stacked({"shared": {"embedding": np.zeros(2)}}) is None
    assert _max_diff(scan.unstack_layers(stacked), per_layer) == 0.0
    assert scan.stack_layers(stacked) is not None and _max_diff(scan.stack_layers(stacked), stacked) == 0.0
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "fsdp"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", None))
    abstract = {"layers": {"w": jax.ShapeDtypeStruct((3, 16, 4), jnp.float32, sharding=sharding)}}
    per_layer_abstract = scan.unstack_layers(abstract)
    assert sorted(per_layer_abstract["layers"]) == [0, 1, 2]
    assert per_layer_abstract["layers"][1]["w"].shape == (16, 4)
    assert per_layer_abstract["layers"][1]["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    restacked = scan.stack_layers(per_layer_abstract, stack=scan.stack_abstract)["layers"]["w"]
    assert restacked.shape == (3, 16, 4) and restacked.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


@pytest.mark.parametrize("saved_scanned", [False, True], ids=["per_layer_into_scanned", "scanned_into_per_layer"])
def test_initial_checkpoint_loads_into_the_other_layout(saved_scanned, tmp_path):
    model = DecoderOnlyModel(dataclasses.replace(LLAMA, scan_layers=saved_scanned))
    other = DecoderOnlyModel(dataclasses.replace(LLAMA, scan_layers=not saved_scanned))
    saved = jax.tree.map(np.asarray, _params(model.make_module(7)))
    folders.save_params(saved, str(tmp_path))
    partitioner = Partitioner(devices=jax.devices(), data=1, fsdp=-1, logical_axis_rules=FSDP_RULES)
    trainer = Trainer(other, optax.sgd(0.1), partitioner)
    restored = checkpoints.restore_initial_params(str(tmp_path), trainer.abstract_state["params"])
    convert = scan.unstack_layers if saved_scanned else scan.stack_layers
    assert _max_diff(restored, convert(saved)) == 0.0
    shardings = jax.tree.map(lambda x: x.sharding, restored)
    assert jax.tree.leaves(shardings) == jax.tree.leaves(trainer.param_shardings)  # laid out as the model wants


def test_training_a_scanned_model_on_8_devices_follows_the_per_layer_run():
    batch_size, length = 8, 16
    rng = np.random.RandomState(0)
    tokens = rng.randint(2, 96, size=(batch_size, length)).astype(np.int32)
    batch = {"decoder_target_tokens": tokens, "decoder_input_tokens": np.roll(tokens, 1, axis=1),
             "decoder_loss_weights": np.ones_like(tokens, np.float32),
             "decoder_positions": np.tile(np.arange(length, dtype=np.int32), (batch_size, 1)),
             "decoder_segment_ids": np.ones_like(tokens)}
    config = dataclasses.replace(LLAMA, dropout_rate=0.0)
    losses = {}
    for scanned in (False, True):
        partitioner = Partitioner(devices=jax.devices(), data=1, fsdp=-1, logical_axis_rules=FSDP_RULES)
        model = DecoderOnlyModel(dataclasses.replace(config, scan_layers=scanned, remat_policy="full"))
        trainer = Trainer(model, optax.adamw(1e-2), partitioner)
        state = trainer.init_state()
        global_batch = {k: jax.device_put(v, partitioner.batch_sharding(v.ndim)) for k, v in batch.items()}
        losses[scanned] = []
        for _ in range(4):
            state, metrics = trainer.train_step(state, global_batch)
            losses[scanned].append(float(metrics["loss"]))
        if scanned:
            gate = trainer.param_shardings["layers"]["mlp"]["gate_proj"]["kernel"]
            assert gate.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # layers replicated, embed sharded
            assert state["params"]["layers"]["mlp"]["gate_proj"]["kernel"].shape == (3, 32, 48)
    assert losses[True][-1] < losses[True][0]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def _randomize_adapters(module, seed):
    """Gives every adapter weight random values (LoRA's B starts at 0, IA3 at 1), in place."""
    state = nnx.state(module, AdapterParam)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    values = [0.1 * jax.random.normal(k, x.shape) + (1.0 if x.ndim and np.all(np.asarray(x) == 1) else 0.0)
              for k, x in zip(keys, leaves)]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, values))
    nnx.update(module, state)


@pytest.mark.parametrize("family,method", [
    ("llama", LoRA(rank=2, target_modules=("q_proj", "v_proj", "down_proj"))), ("llama", IA3()),
    ("llama", PrefixTuning(length=3)), ("t5", PrefixTuning(length=3))], ids=["lora", "ia3", "prefix", "t5_prefix"])
def test_peft_adapters_on_a_scanned_stack_equal_per_layer_adapters(family, method):
    config, cls = (LLAMA, Llama) if family == "llama" else (T5_CONFIG, T5)
    config = dataclasses.replace(config, dropout_rate=0.0)
    per_layer, scanned = _pair(config, cls)
    method.apply(per_layer, nnx.Rngs(params=1))
    method.apply(scanned, nnx.Rngs(params=1))
    _randomize_adapters(per_layer, 2)
    adapter = _params(per_layer, AdapterParam)
    stacked_adapter = scan.stack_layers(adapter)
    assert jax.tree.map(np.shape, stacked_adapter) == jax.tree.map(np.shape, _params(scanned, AdapterParam))
    state = nnx.state(scanned, AdapterParam)
    nnx.replace_by_pure_dict(state, stacked_adapter)
    nnx.update(scanned, state)
    assert np.abs(_forward(per_layer) - _forward(cls(config, rngs=nnx.Rngs(0)))).max() > 1e-3  # not a no-op
    np.testing.assert_allclose(_forward(scanned), _forward(per_layer), atol=1e-5)


def test_lora_on_a_stack_draws_independent_layers_and_dropout_masks():
    scanned = Llama(dataclasses.replace(LLAMA, scan_layers=True), rngs=nnx.Rngs(0))
    LoRA(rank=2).apply(scanned, nnx.Rngs(params=1))
    a = np.asarray(scanned.layers.self_attn.q_proj.lora_a[...])
    assert a.shape == (3, 32, 2) and not np.allclose(a[0], a[1])
    bound = 1 / np.sqrt(32)  # one layer's fan-in, not the stack's
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound
    from itjax.peft.core import adapter_dropout, dropout_key
    with adapter_dropout(jax.random.key(0)):
        _, keys = scan.scan(scanned.layers, lambda layer, carry, _: (carry, jax.random.key_data(dropout_key(0))),
                            None)
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == 3  # each scanned layer its own dropout mask


def test_prefix_reparameterization_on_a_scanned_stack_is_refused():
    scanned = Llama(dataclasses.replace(LLAMA, scan_layers=True), rngs=nnx.Rngs(0))
    with pytest.raises(PeftConfigError, match="scan_layers=False"):
        PrefixTuning(length=3, reparameterize=True).apply(scanned, nnx.Rngs(params=1))


def test_adafactor_updates_each_layer_of_a_stack_as_the_per_layer_model():
    """Adafactor's factoring, update clipping and parameter scale are per-tensor: per layer, also in a stack."""
    from itjax import optimizers

    per_layer = _params(T5(T5_CONFIG, rngs=nnx.Rngs(0)))
    # Layers of very different scales, so statistics pooled over a stack would differ from per-layer ones.
    per_layer = scan.unstack_layers(jax.tree.map(
        lambda x: x * (jnp.arange(x.shape[0], dtype=x.dtype) + 1).reshape((-1,) + (1,) * (x.ndim - 1)),
        scan.stack_layers(per_layer)))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size % 97), x.shape), per_layer)

    def run(tx, params, grads):
        @jax.jit
        def steps(params, grads):
            state = tx.init(params)
            for _ in range(3):
                updates, state = tx.update(grads, state, params)
                params = optax.apply_updates(params, updates)
            return params
        return steps(params, grads)

    tx = optimizers.adafactor(learning_rate=1e-2)
    expected = scan.stack_layers(run(tx, per_layer, grads))
    stacked = run(tx, scan.stack_layers(per_layer), scan.stack_layers(grads))
    assert _max_diff(stacked, expected) < 1e-6
    pooled = run(optax.adafactor(1e-2, decay_offset=0, eps=1e-30, factored=True), scan.stack_layers(per_layer),
                 scan.stack_layers(grads))
    assert _max_diff(pooled, expected) > 1e-4  # plain Adafactor on a stack would mix the layers
