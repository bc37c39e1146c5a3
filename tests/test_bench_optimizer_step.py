"""The optimizer-step benchmark's smoke mode runs, checks itself and writes sane JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"


def test_optimizer_step_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("optimizer_step_benchmark", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--smoke", "--json", str(tmp_path / "out.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "out.json").read_text())
    results = data["results"]
    assert set(results) == {"floor", "anlo", "anlo_for_loop", "adamw_fused", "adamw_foreach"}
    assert results["anlo"]["state_bytes_per_param"] == 0.0
    assert 8.0 <= results["adamw_fused"]["state_bytes_per_param"] < 8.1
    assert data["config"]["tensors"] == 2 * data["config"]["modules"] and data["config"]["parameters"] > 0
    # The check itself rejects nonsense: an ANLO that kept state would fail it.
    data["results"]["anlo"]["state_bytes_per_param"] = 4.0
    assert any("anlo keeps 4.0 bytes" in problem for problem in benchmark.check(data))
