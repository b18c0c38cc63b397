"""Same numbers on 1 device and on 8 (fake CPU) devices under the data-parallel, FSDP and tensor-parallel layouts.

The first 10 training losses of the quickstart configuration (fixed seed, dropout off) must agree within 1e-4.
Gradient accumulation over microbatches must reproduce the full-batch update.
"""

import gin
import jax
import numpy as np
import pytest

from itjax import config as config_lib
from itjax.data import pipeline
from itjax.partitioning import Partitioner
from itjax.trainer import Trainer
import itjax.training  # noqa: F401  (registers the gin configurables)

LENGTHS = {"inputs": 128, "targets": 16}
BATCH = 16
STEPS = 10


# The quickstart model has 4 heads: tensor parallelism over 4 devices, data parallel over the other 2.
LAYOUT_BINDINGS = {"partitioning/tensor_parallel.gin": ["Partitioner.data = -1", "Partitioner.tensor = 4"]}


def _quickstart(layout_file=None):
    """Parses quickstart.gin (+ a partitioning file); returns (model, optimizer)."""
    gin.clear_config()
    files = ["quickstart.gin"] + ([layout_file] if layout_file else [])
    config_lib.parse_gin(files, ["itjax.models.T5Config.dropout_rate = 0.0", *LAYOUT_BINDINGS.get(layout_file, [])])
    model = gin.query_parameter("train.model").scoped_configurable_fn()
    optimizer = gin.query_parameter("train.optimizer").scoped_configurable_fn()
    return model, optimizer


@pytest.fixture(scope="module")
def batches():
    model, _ = _quickstart()
    ds = pipeline.train_dataset("quickstart", LENGTHS, BATCH, model.feature_converter_cls(pack=True), seed=0)
    it = pipeline.numpy_batches(ds)
    return [next(it) for _ in range(STEPS)]


def _losses(layout_file, devices, batches, num_microbatches=1):
    model, optimizer = _quickstart(layout_file)
    partitioner = Partitioner(devices=devices) if layout_file is None else gin.get_configurable(Partitioner)()
    trainer = Trainer(model, optimizer, partitioner, num_microbatches=num_microbatches)
    state = trainer.init_state()
    losses = []
    for batch in batches:
        state, metrics = trainer.train_step(state, pipeline.to_global(batch, partitioner.batch_sharding))
        losses.append(float(metrics["loss"]))
    return np.array(losses), partitioner


@pytest.fixture(scope="module")
def single_device(batches):
    return _losses(None, jax.devices()[:1], batches)


@pytest.mark.parametrize("layout", ["partitioning/data_parallel.gin", "partitioning/fsdp.gin",
                                    "partitioning/tensor_parallel.gin"])
def test_layout_reproduces_single_device_losses(layout, batches, single_device):
    reference, _ = single_device
    assert reference[-1] < reference[0]  # it is actually training
    losses, partitioner = _losses(layout, jax.devices(), batches)
    assert partitioner.mesh.size == 8
    np.testing.assert_allclose(losses, reference, atol=1e-4, rtol=0)


def test_layouts_really_shard_the_parameters(batches):
    model, optimizer = _quickstart("partitioning/fsdp.gin")
    trainer = Trainer(model, optimizer, gin.get_configurable(Partitioner)())
    wi = trainer.param_shardings["encoder"]["layers"][0]["mlp"]["wi_0"]["kernel"]
    assert wi.shard_shape((128, 256)) == (16, 256)  # embed split 8 ways over fsdp
    model, optimizer = _quickstart("partitioning/tensor_parallel.gin")
    trainer = Trainer(model, optimizer, gin.get_configurable(Partitioner)())
    q = trainer.param_shardings["encoder"]["layers"][0]["attention"]["q"]["kernel"]
    assert q.shard_shape((128, 4, 32)) == (128, 1, 32)  # 4 heads over tensor=4
    lm_head = trainer.param_shardings["lm_head"]["kernel"]
    assert lm_head.shard_shape((128, 640)) == (128, 160)


def test_microbatches_give_the_full_batch_update(batches, single_device):
    reference, _ = single_device
    # Losses at steps 2 and 3 depend on the accumulated updates of the steps before.
    losses, _ = _losses(None, jax.devices()[:1], batches[:3], num_microbatches=4)
    np.testing.assert_allclose(losses, reference[:3], atol=1e-5, rtol=0)


def test_dry_run_lays_out_and_compiles_a_real_size_without_allocating(tmp_path, capsys):
    from itjax import train as train_lib
    gin.clear_config()
    model_dir = tmp_path / "never_created"
    code = train_lib.main(["--gin_file=quickstart.gin", "--gin_file=partitioning/fsdp.gin",
                           "--gin_file=models/t5_1_1_small.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}",
                           "--gin.BATCH_SIZE=8", f"--gin.MODEL_DIR={model_dir}", "--dry_run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "parameters: 76,961,152" in out and "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
    # fp32 parameters split 8 ways over fsdp (only the tiny relative-position tables are replicated).
    per_device = float(out.split("param_bytes_per_device: ")[1].split(" GiB")[0]) * 2**30
    assert per_device == pytest.approx(76_961_152 * 4 / 8, rel=0.01)
    assert "compiled_temp_bytes" in out
    assert not model_dir.exists()
