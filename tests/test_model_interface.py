"""The model interface (`itjax.models.base.BaseModel`), the trainer's one compiled generate path, and no global state
changed by importing itjax's model code (issue 10, items 1-3)."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
from flax import nnx

from itjax.data.feature_converters import DecoderFeatureConverter
from itjax.models import base, decoding
from itjax.models.decoder_only import DecoderOnlyModel
from itjax.models.encoder_decoder import EncoderDecoderModel
from itjax.models.llama import LlamaConfig
from itjax.models.t5 import T5Config
from itjax.partitioning import Partitioner
from itjax.peft import IA3, LoRA, PrefixTuning, PromptTuning
from itjax.trainer import Trainer

T5_TINY = T5Config(vocab_size=32, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_encoder_layers=1,
                   num_decoder_layers=1)
LLAMA_TINY = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                         num_kv_heads=1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_both_families_implement_the_interface():
    t5, llama = EncoderDecoderModel(T5_TINY), DecoderOnlyModel(LLAMA_TINY, bos_id=3)
    assert isinstance(t5, base.BaseModel) and isinstance(llama, base.BaseModel)
    # One method, with the old name kept: model.feature_converter_cls(pack=...).
    for converter in (t5.feature_converter(pack=False), t5.feature_converter_cls(pack=False)):
        assert isinstance(converter, seqio.EncDecFeatureConverter) and not converter.pack
    for converter in (llama.feature_converter(pack=True), llama.feature_converter_cls(pack=True)):
        assert isinstance(converter, DecoderFeatureConverter) and converter.pack and converter.decoder_bos_id == 3
    assert not t5.dropout_enabled
    assert EncoderDecoderModel(dataclasses.replace(T5_TINY, dropout_rate=0.1)).dropout_enabled
    with pytest.raises(TypeError, match="abstract"):
        base.BaseModel(T5_TINY)


def test_loss_weights_are_the_models_normaliser():
    batch = {"decoder_loss_weights": jnp.array([[1, 1, 0], [1, 0, 0]], jnp.int32)}
    weights, divisor = EncoderDecoderModel(T5_TINY).loss_weights(batch)  # default: NUM_REAL_TARGET_TOKENS
    np.testing.assert_array_equal(weights, [[1, 1, 0], [1, 0, 0]])
    assert float(divisor) == 3.0
    _, divisor = EncoderDecoderModel(T5_TINY, loss_normalizing_factor=None).loss_weights(batch)
    assert float(divisor) == 1.0


def test_decoding_names_that_moved_fail_naming_the_new_ones():
    with pytest.raises(AttributeError, match="t5_decode_fns.*itjax.models.encoder_decoder.t5_decode_fns"):
        decoding.t5_decode_fns  # noqa: B018
    with pytest.raises(AttributeError, match="greedy_generate.*DecoderOnlyModel"):
        decoding.greedy_generate  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        decoding.nonsense  # noqa: B018


def test_importing_itjax_changes_no_flax_setting_and_imports_go_one_way():
    code = (
        "import sys\n"
        "from flax import nnx\n"
        "from flax import config\n"
        "default = nnx.using_eager_sharding()\n"
        "assert default == config.flax_always_shard_variable\n"
        "import itjax.models.decoding\n"
        "families = [m for m in ('itjax.models.t5', 'itjax.models.llama') if m in sys.modules]\n"
        "assert not families, f'decoding imported {families}'\n"
        "import itjax.models.llama\n"
        "assert 'itjax.models.t5' not in sys.modules, 'llama imported t5'\n"
        "import itjax.models, itjax.models.encoder_decoder, itjax.models.decoder_only, itjax.peft, itjax.trainer\n"
        "import itjax.optimizers, itjax.dry_run, itjax.param_paths, itjax.data.vocabularies\n"
        "assert nnx.using_eager_sharding() == default, 'an import changed nnx.use_eager_sharding'\n"
        "assert 'itjax.conversion' not in sys.modules, 'data.vocabularies imported conversion'\n"
        "print('ok', default)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok True"  # flax's default: eager sharding on, as users get it


@pytest.mark.parametrize("family", ["t5", "llama"])
def test_models_and_adapters_build_with_eager_sharding_on_outside_a_mesh(family):
    """Model construction does not depend on the process-wide setting: logical axis names stay metadata."""
    # Llama with a scanned layer stack: the stacked variables (scan.stack_modules) are covered too.
    model = (EncoderDecoderModel(T5_TINY) if family == "t5"
             else DecoderOnlyModel(dataclasses.replace(LLAMA_TINY, num_layers=2, scan_layers=True)))
    with nnx.use_eager_sharding(True):
        module = model.make_module(0)
        abstract = model.abstract_module(0)
        for method in (LoRA(rank=2), IA3(), PrefixTuning(length=2), PromptTuning(length=2)):
            method.apply(model.make_module(0), nnx.Rngs(params=1))
    kernel = jax.tree.leaves(nnx.state(module, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    assert kernel.get_metadata()["eager_sharding"] is False
    assert jax.tree.structure(nnx.state(abstract)) == jax.tree.structure(nnx.state(module))


@pytest.fixture(scope="module")
def t5_trainer():
    model = EncoderDecoderModel(T5_TINY)
    trainer = Trainer(model, optax.sgd(0.0), Partitioner(devices=jax.devices()[:1]))
    params = trainer.init_state()["params"]
    tokens = np.random.RandomState(0).randint(2, 32, size=(2, 6)).astype(np.int32)
    batch = model.inference_batch(tokens.tolist(), None, {"inputs": 6, "targets": 8}, batch_size=2)
    return trainer, params, batch


def _direct(trainer, params, batch, rng=None, **kwargs):
    """The model interface's generate, jitted by hand: what Trainer.generate must return."""
    fn = jax.jit(lambda p, b, key: trainer.model.generate(trainer.module(p), b, rng=key, **kwargs))
    return np.asarray(fn(params, batch, rng))


def test_trainer_generate_is_keyed_by_eos_id(t5_trainer):
    trainer, params, batch = t5_trainer
    no_eos = np.asarray(trainer.predict(params, batch, max_decode_length=8, eos_id=31))
    assert len(np.unique(no_eos)) >= 3, "degenerate test model"
    eos = int(no_eos[0, 2])  # a token row 0 emits: with it as EOS, row 0 stops at step 2 at the latest
    stopped = np.asarray(trainer.predict(params, batch, max_decode_length=8, eos_id=eos))
    np.testing.assert_array_equal(stopped, _direct(trainer, params, batch, max_decode_length=8, eos_id=eos))
    assert not np.array_equal(stopped, no_eos) and np.all(stopped[0, 3:] == 0)
    # The first call's EOS does not stick (the former cache keyed by max_decode_length only).
    np.testing.assert_array_equal(trainer.predict(params, batch, max_decode_length=8, eos_id=31), no_eos)


def test_trainer_generate_methods_and_cache(t5_trainer):
    trainer, params, batch = t5_trainer
    trainer._generate.clear()
    for method, options in (("beam", {"num_beams": 3, "alpha": 0.6}),
                            ("sample", {"temperature": 1.0, "top_k": 5, "rng": jax.random.key(0)})):
        got = trainer.generate(params, batch, max_decode_length=8, eos_id=1, method=method, **options)
        assert got.shape == (2, 8) and got.dtype == jnp.int32
        np.testing.assert_array_equal(
            got, _direct(trainer, params, batch, max_decode_length=8, eos_id=1, method=method, **options))
    assert len(trainer._generate) == 2
    # A new key is an argument, not a new program; sampling options and beam width are part of the program.
    trainer.generate(params, batch, max_decode_length=8, eos_id=1, method="sample", temperature=1.0, top_k=5,
                     rng=jax.random.key(1))
    assert len(trainer._generate) == 2
    trainer.generate(params, batch, max_decode_length=8, eos_id=1, method="beam", num_beams=2)
    assert len(trainer._generate) == 3
    with pytest.raises(ValueError, match="needs rng"):
        trainer.generate(params, batch, max_decode_length=8, eos_id=1, method="sample")
    with pytest.raises(ValueError, match="'greedy', 'sample' or 'beam'"):
        trainer.generate(params, batch, max_decode_length=8, eos_id=1, method="nucleus")
