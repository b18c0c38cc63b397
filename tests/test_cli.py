"""A quiet start (itjax.cli): the entry points print no TensorFlow / oneDNN / absl / CUDA start-up lines unless asked,
real warnings still show, and importing the entry-point modules changes no process-wide state."""

import os
import subprocess
import sys
import textwrap

import pytest

from itjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow 2.21 / jax print on this 2-core CPU machine without the filter (and on GPU hosts: cuDNN etc.).
NOISE = ("oneDNN", "cuInit", "cuda drivers", "absl::InitializeLog", "cuDNN", "cuFFT", "cuBLAS",
         "An NVIDIA GPU may be present", "cpu_feature_guard", "TensorFlow binary is optimized")


def _env(**extra):
    env = dict(os.environ, **extra)
    for name in ("TF_CPP_MIN_LOG_LEVEL", cli.VERBOSE_ENV):  # conftest sets the first; test the defaults
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def _assert_quiet(result):
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert not [line for line in output.splitlines() if any(n in line for n in NOISE)], output[-3000:]


def test_known_start_up_lines_are_noise_and_real_warnings_are_not():
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796588628.207573    6307 port.cc:153] oneDNN custom operations are on. You may see slightly",
        "I0000 00:00:1796588628.208705    6307 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU",
        "E0000 00:00:1796588636.488137    6307 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
        "E0000 00:00:1712345678.123456    1234 cuda_dnn.cc:8310] Unable to register cuDNN factory: Attempting to",
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
        "appropriate compiler flags.",
    ]
    real = ["W0000 00:00:1796588636.488137    6307 op_level_cost_estimator.cc:699] Error in PredictCost() for Foo",
            "UserWarning: something the user should see", "error: gin file 'x.gin' not found"]
    assert all(cli.is_noise(line) for line in noise)
    assert not any(cli.is_noise(line) for line in real)


def test_filtered_stderr_drops_noise_written_by_native_code_and_keeps_the_rest(capfd):
    with cli.filtered_stderr():
        os.write(2, b"E0000 00:00:1.2    1 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\n")
        os.write(2, b"a real problem\n")
        print("from python", file=sys.stderr)
    err = capfd.readouterr().err
    assert "cuInit" not in err and "a real problem" in err and "from python" in err


def test_importing_the_entry_points_changes_no_process_wide_state():
    script = textwrap.dedent("""
        import logging, sys
        import gin, jax
        def state():
            root = logging.getLogger()
            return (list(root.handlers), list(root.filters), root.level, list(gin.config._FILE_READERS),
                    list(gin.config._LOCATION_PREFIXES), gin.config_str(), dict(jax.config.values),
                    {n: logging.getLogger(n).level for n in ("absl", "jax", "tensorflow", "orbax", "seqio", "itjax")},
                    [f for f in logging.getLogger("jax._src.xla_bridge").filters])
        before = state()
        import itjax.cli, itjax.config, itjax.partitioning, itjax.train, itjax.eval, itjax.data.__main__
        assert state() == before, "an import changed global state"
        assert "tensorflow" not in sys.modules, "itjax.train imports TensorFlow before cli.start"
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_data_cli_starts_quietly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "itjax.data", "show", "quickstart", "--num", "1", "--num_tasks",
                             "1", "--feature_lengths", "inputs=112,targets=8"],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    _assert_quiet(result)
    assert "quickstart_" in result.stdout


@pytest.mark.slow
def test_a_tiny_training_run_starts_quietly(tmp_path):
    """`python -m itjax.train --gin_file=quickstart.gin` for one step on this CPU machine: our output only."""
    result = subprocess.run([sys.executable, "-m", "itjax.train", "--gin_file=quickstart.gin", "--gin.TRAIN_STEPS=1",
                             "--gin.BATCH_SIZE=8", f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.train.eval_period=0",
                             "--gin.train.eval_num_examples=8", "--gin.train.eval_batch_size=8", "--no_progress"],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    _assert_quiet(result)
    assert "Evaluation at step 1" in result.stdout


def test_logging_setup_keeps_real_warnings_and_drops_the_gpu_notice(capsys):
    import logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        cli.setup_logging()
        cli.setup_logging()  # an in-process caller may start twice: still one handler of ours
        assert sum(isinstance(h, cli._StderrHandler) for h in root.handlers) == 1
        logging.getLogger("jax._src.xla_bridge").warning("An NVIDIA GPU may be present on this machine, but a "
                                                          "CUDA-enabled jaxlib is not installed. Falling back to cpu.")
        logging.getLogger("itjax").warning("Checkpoint 3 cannot be restored; trying an older one.")
        logging.getLogger("itjax").info("Mesh {'data': 8}")
        err = capsys.readouterr().err
        assert "NVIDIA" not in err and "WARNING itjax: Checkpoint 3 cannot be restored" in err and "Mesh" not in err
        cli.setup_logging(verbose=True)
        logging.getLogger("itjax").info("Mesh {'data': 8}")
        assert "INFO itjax: Mesh" in capsys.readouterr().err
    finally:
        for handler in list(root.handlers):
            if isinstance(handler, cli._StderrHandler):
                root.removeHandler(handler)
        for handler in saved[0]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("jax._src.xla_bridge").removeFilter(cli._DROP_MESSAGES)
