"""Test session setup: 8 fake CPU devices (for the sharding tests) before JAX initialises, quiet TF logs, and one
JAX compilation cache for the session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests run on the CPU unless ITJAX_TEST_ACCELERATOR=1: then the GPU stays visible and the tests marked `gpu` / `tpu`
# (skipped elsewhere, see pytest_collection_modifyitems) run on the chip, e.g.
# `ITJAX_TEST_ACCELERATOR=1 python -m pytest -q -m "gpu or tpu"`.
if os.environ.get("ITJAX_TEST_ACCELERATOR") != "1":
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# JAX's persistent compilation cache, fresh for each session: many tests run the same program again (every
# in-process `itjax.train` / `itjax.infer` builds a new Trainer, whose jitted steps miss JAX's in-memory cache), and
# an executable compiled once is then loaded instead of compiled again. Set in the environment, so notebook kernels
# and `python -m itjax.*` subprocesses started by the tests share it. Keys cover the program, its shardings, the
# devices and the JAX/XLA versions, so a hit is the same executable; compilation itself stays exercised by the
# first test that needs each program.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="itjax_tests_jax_cache_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # tiny models compile in < 1 s

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_gin():
    """Every test starts and ends with an empty gin config."""
    gin.clear_config()
    yield
    gin.clear_config()


# Test tiers. `python -m pytest -m "not slow"` is the fast tier for iteration (unit tests, single-function parity
# checks); the full suite (what CI runs) adds the modules below, whose tests train, export, convert, run notebooks
# or start processes, and the tests marked `@pytest.mark.slow` where they are defined. Chosen from
# `pytest --durations` (a module is slow when most of its tests take more than a few seconds each).
SLOW_MODULES = {
    "test_convert_llama", "test_convert_t5", "test_data_resume", "test_decoder_only", "test_decoding_search",
    "test_export_run", "test_infer_decoder", "test_layouts", "test_llama_parity", "test_multiprocess",
    "test_notebooks", "test_peft", "test_peft_export", "test_peft_notebook", "test_study_notebook",
    "test_remat", "test_resilience", "test_runs", "test_scan_layers", "test_train_e2e",
    "test_convert_t5x", "test_eval_cli", "test_peft_import", "test_bench_input_pipeline", "test_bench_scripts",
}


def pytest_collection_modifyitems(config, items):
    backend = None
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        for chip in ("gpu", "tpu"):
            if chip in item.keywords:
                if backend is None:
                    import jax
                    backend = jax.default_backend()
                if backend != chip:
                    item.add_marker(pytest.mark.skip(
                        reason=f"needs a {chip.upper()} (JAX runs on {backend!r}; set ITJAX_TEST_ACCELERATOR=1 on one)"))
