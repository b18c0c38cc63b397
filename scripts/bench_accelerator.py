"""The first run on a GPU or TPU: the chip's own tests, then a train-step table per attention implementation.

On whatever backend JAX finds:
  1. (GPU / TPU) runs the tests marked `gpu` / `tpu` (`ITJAX_TEST_ACCELERATOR=1 python -m pytest -m "gpu or tpu"`,
     see tests/conftest.py): the cuDNN and splash kernels against the einsum reference, in bfloat16, on the chip.
     This runs before this process touches the chip (a TPU is opened by one process at a time).
  2. times a train step of a Flan-T5-XL-shaped model (bfloat16, batch x (512 inputs + 128 targets), Adafactor) and
     a Llama-3.2-1B-shaped model (bfloat16, packed rows of 2048 and of 8192 tokens, AdamW) with every
     `attention_impl` the backend runs (itjax.models.attention: 'xla' everywhere, 'cudnn' on NVIDIA GPUs, 'splash'
     for Llama on TPUs), random weights and tokens, one device. Per row: tokens/s (token slots, all real here),
     model TFLOP/s and MFU (itjax.flops: PaLM's model FLOPs; peak from flops.PEAK_BF16_FLOPS by device kind), the
     compiled program's memory (XLA memory analysis: arguments + outputs + temporaries - donated aliases) and the
     device's peak bytes in use so far (`device.memory_stats()`, where the backend reports it). A row that does
     not fit prints its error (e.g. RESOURCE_EXHAUSTED) and the table goes on.
On a CPU it runs the same table with tiny shapes (one-layer quickstart models, lengths 64 + 16, 128, 256) and
skips the tests (their markers skip them there anyway): tests/test_bench_scripts.py runs it that way.

    python scripts/bench_accelerator.py                      # tests + full-size table (GPU / TPU), tiny on CPU
    python scripts/bench_accelerator.py --tests skip --rows llama_2048 --impls cudnn
    python scripts/bench_accelerator.py --remat_policy full  # if the 8192-token rows do not fit
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Row:
    """One model shape: its gin file, family, optimizer and batch (rows of `length`; T5: inputs + targets)."""
    name: str
    model_gin: str
    family: str  # 't5' or 'llama'
    optimizer: str
    batch: int
    length: int  # T5: encoder length; Llama: packed row length
    targets: int = 0  # T5 decoder length
    segments: int = 1  # Llama: examples packed per row
    bindings: tuple[str, ...] = ()  # extra gin bindings (the tiny rows' single layer)


FULL_ROWS = (
    Row("flan_t5_xl", "models/flan_t5_xl.gin", "t5", "adafactor", batch=8, length=512, targets=128),
    Row("llama_2048", "models/llama3_1b.gin", "llama", "adamw", batch=4, length=2048, segments=4),
    Row("llama_8192", "models/llama3_1b.gin", "llama", "adamw", batch=1, length=8192, segments=4),
)
_ONE_T5_LAYER = ("itjax.models.T5Config.num_encoder_layers = 1", "itjax.models.T5Config.num_decoder_layers = 1")
_ONE_LLAMA_LAYER = ("itjax.models.LlamaConfig.num_layers = 1",)
TINY_ROWS = (  # the CPU stand-ins: same code paths, one-layer quickstart-sized models (they compile quickly)
    Row("flan_t5_xl", "models/t5_1_1_quickstart.gin", "t5", "adafactor", batch=2, length=64, targets=16,
        bindings=_ONE_T5_LAYER),
    Row("llama_2048", "models/llama_quickstart.gin", "llama", "adamw", batch=2, length=128, segments=4,
        bindings=_ONE_LLAMA_LAYER),
    Row("llama_8192", "models/llama_quickstart.gin", "llama", "adamw", batch=1, length=256, segments=4,
        bindings=_ONE_LLAMA_LAYER),
)


def implementations(backend: str, family: str) -> list[str]:
    """The attention_impl values a backend runs for a family (itjax.models.attention)."""
    if backend == "gpu":
        return ["xla", "cudnn"]
    if backend == "tpu" and family == "llama":
        return ["xla", "splash"]
    return ["xla"]


def _installed(*modules: str) -> bool:
    for name in modules:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # a parent package is missing
            continue
    return False


def accelerator_present() -> bool:
    """Whether this machine has an NVIDIA GPU or a TPU with jaxlib's plugin for it, checked without opening the
    device (device files and installed modules only)."""
    gpu = _installed("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
    tpu = _installed("libtpu")
    return bool((gpu and glob.glob("/dev/nvidia[0-9]*"))
                or (tpu and (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))))


def chip_test_files() -> list[str]:
    """The test modules holding tests marked gpu or tpu."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if "pytest.mark.gpu" in text or "pytest.mark.tpu" in text:
            files.append(os.path.relpath(path, ROOT))
    return files


def run_chip_tests() -> int:
    """pytest -m "gpu or tpu" with the chip visible; returns its exit status (5 = nothing collected)."""
    env = dict(os.environ, ITJAX_TEST_ACCELERATOR="1")
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu or tpu", "-p", "no:cacheprovider",
               *chip_test_files()]
    print("$ ITJAX_TEST_ACCELERATOR=1 " + " ".join(["python", *command[1:]]), flush=True)
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def t5_batch(vocab: int, batch: int, inputs: int, targets: int, rng):
    """Unpacked encoder-decoder rows of random tokens (no padding)."""
    import numpy as np
    target_tokens = rng.integers(2, vocab, (batch, targets), dtype=np.int32)
    return {
        "encoder_input_tokens": rng.integers(2, vocab, (batch, inputs), dtype=np.int32),
        "decoder_target_tokens": target_tokens,
        "decoder_input_tokens": np.concatenate([np.zeros((batch, 1), np.int32), target_tokens[:, :-1]], axis=1),
        "decoder_loss_weights": np.ones((batch, targets), np.int32),
    }


def llama_packed_batch(vocab: int, batch: int, length: int, segments: int, rng):
    """Decoder-only rows of `segments` random-length examples each, packed as DecoderFeatureConverter packs them
    (segment ids 1..segments, positions restarting per example, loss on the second half of each example)."""
    import numpy as np
    rows = {k: np.zeros((batch, length), np.int32) for k in (
        "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights", "decoder_causal_attention",
        "decoder_segment_ids", "decoder_positions")}
    for r in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), segments - 1, replace=False)) if segments > 1 else []
        bounds = [0, *cuts, length]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            tokens = rng.integers(3, vocab, b - a + 1, dtype=np.int32)
            prompt = (b - a) // 2
            rows["decoder_input_tokens"][r, a:b] = tokens[:-1]
            rows["decoder_target_tokens"][r, a:b] = tokens[1:]
            rows["decoder_loss_weights"][r, a + prompt:b] = 1
            rows["decoder_causal_attention"][r, a:a + prompt] = 1
            rows["decoder_segment_ids"][r, a:b] = s + 1
            rows["decoder_positions"][r, a:b] = np.arange(b - a)
    return rows


def bench_row(row: Row, implementation: str, args) -> dict:
    """Compiles and times one train step; returns the table's figures."""
    import gin
    import jax
    import numpy as np

    from itjax import config as config_lib
    from itjax import flops, optimizers
    from itjax.partitioning import Partitioner
    from itjax.trainer import Trainer
    import itjax.training  # noqa: F401  (registers gin configurables)

    config = "T5Config" if row.family == "t5" else "LlamaConfig"
    gin.clear_config()
    config_lib.parse_gin([row.model_gin], [
        f"itjax.models.{config}.dtype = '{args.dtype}'", f"itjax.models.{config}.attention_impl = '{implementation}'",
        f"itjax.models.{config}.dropout_rate = 0.0", f"itjax.models.{config}.remat_policy = '{args.remat_policy}'", *row.bindings])
    model = gin.query_parameter("MODEL/macro.value").scoped_configurable_fn()
    tx = optimizers.adamw(1e-4) if row.optimizer == "adamw" else optimizers.adafactor(1e-3)
    device = jax.devices()[0]
    trainer = Trainer(model, tx, Partitioner(devices=[device]))
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    host = (t5_batch(vocab, row.batch, row.length, row.targets, rng) if row.family == "t5"
            else llama_packed_batch(vocab, row.batch, row.length, row.segments, rng))
    batch = {k: jax.device_put(v, device) for k, v in host.items()}
    start = time.perf_counter()
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.partitioner.batch_sharding(v.ndim))
                for k, v in batch.items()}
    compiled = trainer.compile_train_step(abstract)
    memory = compiled.memory_analysis()
    program_bytes = None
    if memory is not None:
        program_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                         - memory.alias_size_in_bytes)
    compile_s = time.perf_counter() - start
    state = trainer.init_state()
    # `compiled` is the trainer's jitted train step (Trainer.compile_train_step), called as Trainer.train_step does.
    state, metrics = compiled(state, batch, None)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    step_s = statistics.median(times)
    tokens = row.batch * (row.length + row.targets)
    model_flops = trainer.train_step_flops({k: v.shape for k, v in batch.items()})
    peak, peak_source = flops.peak_flops_per_device(device)
    stats = device.memory_stats() or {}
    del state, metrics, batch
    return {"params": trainer.num_params, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "tflops": model_flops / step_s / 1e12, "mfu": model_flops / step_s / peak, "peak_source": peak_source,
            "program_gib": program_bytes / 2**30 if program_bytes is not None else None,
            "peak_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
            "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", choices=["auto", "run", "skip"], default="auto",
                        help="the gpu/tpu-marked tests: auto = when a GPU / TPU and its jaxlib plugin are present")
    parser.add_argument("--shapes", choices=["auto", "full", "tiny"], default="auto",
                        help="auto: full-size models on a GPU/TPU, tiny stand-ins on a CPU")
    parser.add_argument("--rows", default="flan_t5_xl,llama_2048,llama_8192")
    parser.add_argument("--impls", default="", help="restrict attention_impl values (comma-separated)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--remat_policy", default="none", help="T5Config / LlamaConfig.remat_policy for every row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after the compiling one)")
    args = parser.parse_args()

    test_status = None
    if args.tests == "run" or (args.tests == "auto" and accelerator_present()):
        test_status = run_chip_tests()

    from itjax.cli import import_tensorflow
    import_tensorflow(quiet=False)  # TensorFlow (the input pipeline's) must not take the GPU's memory
    import jax
    backend = jax.default_backend()
    tiny = args.shapes == "tiny" or (args.shapes == "auto" and backend == "cpu")
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    by_name = {r.name: r for r in (TINY_ROWS if tiny else FULL_ROWS)}
    unknown = [r for r in chosen if r not in by_name]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {sorted(by_name)}.")
    wanted = {i.strip() for i in args.impls.split(",") if i.strip()}

    device = jax.devices()[0]
    print(f"\nbackend {backend}: {device.device_kind}, {jax.device_count()} device(s) (timing one); jax "
          f"{jax.__version__}; {'tiny CPU stand-in shapes' if tiny else 'full shapes'}; {args.dtype}, remat "
          f"{args.remat_policy}; median of {args.steps} steps", flush=True)
    header = ("row", "attention_impl", "batch x length", "params", "compile s", "step ms", "tokens/s", "TFLOP/s",
              "MFU", "program GiB", "peak GiB so far", "loss")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    peak_source = ""
    for name in chosen:
        row = by_name[name]
        shape = f"{row.batch} x ({row.length} + {row.targets})" if row.family == "t5" else \
            f"{row.batch} x {row.length} packed"
        for impl in implementations(backend, row.family):
            if wanted and impl not in wanted:
                continue
            try:
                r = bench_row(row, impl, args)
            except Exception as e:  # a row that does not fit or does not compile: report it, go on
                message = " ".join(str(e).split())[:160]
                lines.append(f"| {name} | {impl} | {shape} | | | | failed: {type(e).__name__}: {message} |||||")
                print(lines[-1], flush=True)
                continue
            peak_source = r["peak_source"]
            gib = lambda v: f"{v:.2f}" if v is not None else "n/a"  # noqa: E731
            lines.append(f"| {name} | {impl} | {shape} | {r['params'] / 1e6:,.1f}M | {r['compile_s']:.1f} | "
                         f"{r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | "
                         f"{r['mfu']:.1%} | {gib(r['program_gib'])} | {gib(r['peak_gib'])} | {r['loss']:.3f} |")
            print(lines[-1], flush=True)
            jax.clear_caches()
    print(f"\nMFU against: {peak_source}\n" + "\n".join(lines), flush=True)
    if test_status is not None:
        print(f"\nchip tests (pytest -m 'gpu or tpu'): exit status {test_status}"
              + (" (no test collected)" if test_status == 5 else ""), flush=True)
        if test_status not in (0, 5):
            sys.exit(test_status)


if __name__ == "__main__":
    main()
