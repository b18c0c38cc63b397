"""Smoke tests: the benchmark scripts run end to end on tiny shapes and print what they promise (no timings are
asserted). The side-by-side script also checks itself: with the same weights on both sides the tiny models' greedy
generations agree token for token, which fails if the weight copy or the EOS switch-off breaks, and the training
rows' logits agree (the script stops otherwise), which fails if the HF side computes another function (e.g. attends
across packed examples)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> str:
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=ROOT)  # one CPU device, this checkout's itjax
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_bench_decode_prints_throughput():
    out = _run("scripts/bench_decode.py", "--model_gin", "models/llama_quickstart.gin", "--batch", "2",
               "--inputs", "8", "--new_tokens", "4", "--repeats", "1")
    assert "batch 2, 8 input tokens -> 4 new" in out
    assert out.strip().splitlines()[-1].startswith("throughput: ")


def test_bench_vs_peers_smoke_table():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = _run("scripts/bench_vs_peers.py", "--smoke", "--repeats", "1", "--rows", "t5_train,llama_lora,t5_gen8,llama_gen8")
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:] for line in table[2:]] == ["t5_train", "llama_lora", "t5_gen2", "llama_gen2"]
    assert "t5_gen2: greedy tokens identical in 2/2 rows" in out
    assert "llama_gen2: greedy tokens identical in 2/2 rows" in out
    for row in ("t5_train", "llama_lora"):
        assert f"{row}: first-row logits agree to " in out


def test_bench_vs_peers_llama_rows_with_recomputation():
    """--llama_remat full: itjax scanned layers with remat 'full' against HF gradient checkpointing (the scanned
    parameters are unstacked for the HF copy)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = _run("scripts/bench_vs_peers.py", "--smoke", "--repeats", "1", "--rows", "llama_train",
               "--llama_remat", "full")
    rows = [line for line in out.splitlines() if line.startswith("| llama_train")]
    assert len(rows) == 1 and "both sides recompute layers" in rows[0]
    assert "llama_train: first-row logits agree to " in out
