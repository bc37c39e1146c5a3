"""The optimizer-step benchmark: smoke mode, parameter sets from the real model configurations, memory probe."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "optimizer_step.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("optimizer_step_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.slow
def test_optimizer_step_benchmark_smoke(benchmark, tmp_path):
    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--smoke", "--json", str(tmp_path / "out.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "out.json").read_text())
    results = data["results"]
    assert set(results) == {
        "floor", "two_pass_floor", "anlo", "anlo_for_loop", "adamw_fused", "adamw_foreach"
    }
    assert results["anlo"]["state_bytes_per_param"] == 0.0
    assert 8.0 <= results["adamw_fused"]["state_bytes_per_param"] < 8.1
    # foreach AdamW makes temporaries the size of a group's gradients; ANLO only vectors with one entry per tensor.
    largest_group = max(sum(math.prod(shape) for _, shape in tensors) for _, tensors in benchmark.smoke_spec(4))
    assert results["adamw_foreach"]["extra_step_bytes"] >= 4 * largest_group
    assert results["anlo"]["extra_step_bytes"] <= 64 * data["config"]["tensors"]
    assert data["config"]["tensors"] == 24 and data["config"]["groups"] == 2 and data["config"]["parameters"] > 0
    # The check itself rejects nonsense: an ANLO that kept state, or allocated a copy of the gradients, fails it.
    data["results"]["anlo"]["state_bytes_per_param"] = 4.0
    data["results"]["anlo"]["extra_step_bytes"] = 4 * data["config"]["parameters"]
    problems = benchmark.check(data)
    assert any("anlo keeps 4.0 bytes" in problem for problem in problems)
    assert any("anlo allocates" in problem for problem in problems)


def test_extra_step_memory_counts_a_freed_temporary_and_nothing_else(benchmark):
    x = torch.ones(1 << 18)  # 1 MiB

    def temporary() -> None:
        (x * 2).sum()  # a 1 MiB temporary, freed before the call returns

    def in_place() -> None:
        x.mul_(1.0)

    assert 1 << 20 <= benchmark.extra_step_memory(temporary, torch.device("cpu")) < (1 << 20) + 4096
    assert benchmark.extra_step_memory(in_place, torch.device("cpu")) < 64  # a wrapped scalar at most


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, te_prefixes, te_modules, unet_modules",
    [("sd15", {"lora_te"}, 72, 192), ("sdxl", {"lora_te1", "lora_te2"}, 72 + 192, 722)],
)
def test_lora_spec_from_the_real_model_configs(benchmark, model, te_prefixes, te_modules, unet_modules):
    """kohya's module counts: SD 1.5 72 text-encoder + 192 U-Net modules; SDXL 72 + 192 (CLIP-L, bigG) + 722."""
    rank = 4
    spec = benchmark.model_lora_spec(model, rank)
    (te_lr, te_tensors), (unet_lr, unet_tensors) = spec
    assert (te_lr, unet_lr) == (benchmark.TEXT_ENCODER_LR, benchmark.UNET_LR)
    assert {name.split("_text_model")[0] for name, _ in te_tensors} == te_prefixes
    assert len(te_tensors) == 2 * te_modules and len(unet_tensors) == 2 * unet_modules
    for name, shape in te_tensors + unet_tensors:
        assert name.endswith((".lora_down.weight", ".lora_up.weight")), name
        assert shape[0 if "lora_down" in name else 1] == rank, (name, shape)
    groups = benchmark.materialize(spec[:1], torch.device("cpu"))
    params = benchmark.tensors_of(groups)
    assert [tuple(p.shape) for p in params] == [shape for _, shape in te_tensors]
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    grad_rms = math.sqrt(sum(p.grad.square().sum().item() for p in params) / sum(p.numel() for p in params))
    assert grad_rms == pytest.approx(1e-3, rel=0.01)


def test_unknown_optimizer_is_refused_with_the_known_names(benchmark, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--smoke", "--optimizers", "adamw,lion"])
    error = capsys.readouterr().err
    assert "--optimizers: unknown adamw" in error and "adamw_fused" in error
