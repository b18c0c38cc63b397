"""Test session setup: 8 fake CPU devices (for the sharding tests) before JAX initialises, quiet TF logs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_gin():
    """Every test starts and ends with an empty gin config."""
    gin.clear_config()
    yield
    gin.clear_config()
