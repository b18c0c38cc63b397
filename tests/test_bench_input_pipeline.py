"""scripts/bench_input_pipeline.py runs through on both mixtures with a few steps and prints its table (slow tier:
it registers the SuperNI sample, builds both pipelines and compiles the quickstart train step)."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPERNI = os.path.join(ROOT, "..", "shared", "data", "superni")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not os.path.isdir(os.path.join(SUPERNI, "tasks")), reason="needs ../shared/data/superni")
def test_pipeline_bench_prints_both_mixtures(monkeypatch, capsys):
    bench = _load_script("bench_input_pipeline")
    monkeypatch.setattr(sys, "argv", ["bench_input_pipeline.py", "--superni_dir", SUPERNI, "--batch", "8",
                                      "--steps", "2", "--repeats", "1", "--pipeline_batches", "3",
                                      "--log_period", "2", "--settle_s", "0"])
    bench.main()
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines()
            if line.startswith("| superni ") or line.startswith("| flan ")}
    assert sorted(rows) == ["flan", "superni"], out
    for name, cells in rows.items():
        batches_per_s, tokens_per_s, slots_per_s = (float(c.replace(",", "")) for c in cells[:3])
        assert batches_per_s > 0 and 0 < tokens_per_s <= slots_per_s, (name, cells)
        # Token slots of a batch: 8 rows x (112 + 8); per second = batches/s x 960 (rounding aside).
        assert slots_per_s == pytest.approx(batches_per_s * 8 * 120, rel=0.02), (name, cells)
        fed_ms, memory_ms, ratio, rate, wait_ms = (float(c.strip().rstrip("x")) for c in cells[3:8])
        assert fed_ms > 0 and memory_ms > 0 and rate > 0 and 0 <= wait_ms <= fed_ms, (name, cells)
        assert ratio == pytest.approx(fed_ms / memory_ms, abs=0.01), (name, cells)


def test_unknown_mixture_is_refused(monkeypatch):
    bench = _load_script("bench_input_pipeline")
    monkeypatch.setattr(sys, "argv", ["bench_input_pipeline.py", "--mixtures", "superni,c4"])
    with pytest.raises(SystemExit, match="--mixtures='superni,c4': choose from superni, flan"):
        bench.main()
