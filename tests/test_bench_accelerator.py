"""scripts/bench_accelerator.py with its tiny CPU shapes, and the Colab setup cell of the notebooks in colab/."""

import importlib.metadata
import importlib.util
import os
import sys

import nbformat
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(ROOT, "colab")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_script("bench_accelerator")


def test_implementations_per_backend():
    assert bench.implementations("cpu", "t5") == bench.implementations("cpu", "llama") == ["xla"]
    assert bench.implementations("gpu", "t5") == bench.implementations("gpu", "llama") == ["xla", "cudnn"]
    assert bench.implementations("tpu", "t5") == ["xla"]  # no TPU kernel takes T5's position bias
    assert bench.implementations("tpu", "llama") == ["xla", "splash"]


def test_packed_rows_are_what_the_feature_converter_makes():
    rows = bench.llama_packed_batch(vocab=640, batch=3, length=64, segments=4, rng=np.random.default_rng(1))
    for r in range(3):
        segments = rows["decoder_segment_ids"][r]
        assert segments[0] == 1 and segments[-1] == 4 and np.all(np.diff(segments) >= 0)
        for s in range(1, 5):
            where = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(rows["decoder_positions"][r, where], np.arange(where.size))
            # Within a segment the targets are the inputs shifted by one; loss only after the prompt.
            np.testing.assert_array_equal(rows["decoder_input_tokens"][r, where][1:],
                                          rows["decoder_target_tokens"][r, where][:-1])
            prompt = rows["decoder_causal_attention"][r, where]
            assert np.all(prompt + rows["decoder_loss_weights"][r, where] == 1)


def test_tiny_table_on_cpu(monkeypatch, capsys):
    # Two of the three rows (llama_8192 differs from llama_2048 only in length): each row compiles a train step.
    monkeypatch.setattr(sys, "argv", ["bench_accelerator.py", "--steps", "1", "--rows", "flan_t5_xl,llama_2048"])
    bench.main()
    out = capsys.readouterr().out
    table = out[out.index("| row |"):].splitlines()
    rows = [line.split("|")[1:-1] for line in table[2:] if line.startswith("| ")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("flan_t5_xl", "xla"), ("llama_2048", "xla")], out
    assert [r[2].strip() for r in rows] == ["2 x (64 + 16)", "2 x 128 packed"]
    for r in rows:
        tokens_per_s, tflops, mfu = float(r[6].replace(",", "")), float(r[7]), float(r[8].strip().rstrip("%"))
        assert tokens_per_s > 0 and tflops > 0 and mfu > 0, r
        assert np.isfinite(float(r[11])), r  # the loss of the last step
    assert "ITJAX_TEST_ACCELERATOR" not in out  # on a CPU the chip tests are not run


def test_unknown_row_is_refused(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_accelerator.py", "--rows", "gpt5", "--tests", "skip"])
    with pytest.raises(SystemExit, match="--rows: unknown \\['gpt5'\\]"):
        bench.main()


# ------------------------------------------------------------------------------------------------------------------
# The Colab setup cell
# ------------------------------------------------------------------------------------------------------------------


def _setup_cells():
    cells = {}
    for name in sorted(os.listdir(COLAB)):
        if name.endswith(".ipynb"):
            notebook = nbformat.read(os.path.join(COLAB, name), as_version=4)
            found = [c.source for c in notebook.cells if c.cell_type == "code" and c.source.startswith("# Colab setup")]
            assert len(found) == 1, f"{name}: expected one '# Colab setup' cell"
            first_code = next(c for c in notebook.cells if c.cell_type == "code")
            assert first_code.source == found[0], f"{name}: the Colab setup cell must be the first code cell"
            cells[name] = found[0]
    return cells


def _run_cell(source, monkeypatch, *, colab, tpu=False):
    calls = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if colab and name == "google.colab" else real_find_spec(name, *a))
    monkeypatch.setattr("subprocess.check_call", lambda command: calls.append(command[3:]))
    monkeypatch.setattr("glob.glob", lambda pattern: ["/dev/accel0"] if tpu and pattern == "/dev/accel*" else [])
    monkeypatch.delenv("TPU_ACCELERATOR_TYPE", raising=False)
    exec(compile(source, "<colab setup cell>", "exec"), {})
    return calls


def test_colab_cell_is_the_same_everywhere_and_a_no_op_off_colab(monkeypatch, capsys):
    cells = _setup_cells()
    assert len(set(cells.values())) == 1, sorted(cells)
    assert _run_cell(next(iter(cells.values())), monkeypatch, colab=False) == []
    assert capsys.readouterr().out == ""


def test_colab_cell_installs_itjax_and_jax_tpu_on_a_tpu_runtime(monkeypatch, tmp_path, capsys):
    source = next(iter(_setup_cells().values()))
    monkeypatch.setenv("ITJAX_SOURCE", str(tmp_path))
    jax_version = importlib.metadata.version("jax")
    assert _run_cell(source, monkeypatch, colab=True, tpu=True) == [
        ["install", "-q", str(tmp_path)], ["install", "-q", f"jax[tpu]=={jax_version}"]]
    assert "Colab TPU runtime" in capsys.readouterr().out
    assert _run_cell(source, monkeypatch, colab=True, tpu=False) == [["install", "-q", str(tmp_path)]]
    monkeypatch.setenv("ITJAX_SOURCE", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="missing.*clone or upload the repository to /content/itjax"):
        _run_cell(source, monkeypatch, colab=True, tpu=True)
