"""The VRAM benchmark: its CPU smoke mode, the optimizer-state accounting and the real U-Net configs."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from benchmarks import vram


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp("vram")
    threads = torch.get_num_threads()
    try:
        code = vram.main(["--smoke", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads((out / "vram.json").read_text())
    assert (out / "vram.md").read_text().count("| tiny-") == len(report["results"])
    return code, report


@pytest.mark.slow
def test_smoke_mode_passes_its_checks_and_reports_state_bytes(smoke: tuple[int, dict]) -> None:
    code, report = smoke
    assert code == 0
    results = report["results"]
    assert {(r["model"], r["optimizer"]) for r in results} == {
        (m, o) for m in vram.TINY_MODELS for o in vram.OPTIMIZERS
    }
    for r in results:
        assert r["lora_changed"] and r["peak_mib"] is None and r["step_ms"] > 0
        expected = {"ANLO": 0, "ANLO+orthogonalize": 0, "AdamW": 8 * r["lora_params"]}.get(r["optimizer"])
        if expected is not None:
            assert r["state_bytes"] == expected
        else:  # AdamW8bit: 1 byte per moment for tensors of >= 4096 elements, fp32 below
            assert 2 * r["lora_params"] < r["state_bytes"] < 8 * r["lora_params"]


@pytest.mark.slow
def test_full_size_lora_sizes_match_kohya_module_counts(smoke: tuple[int, dict]) -> None:
    sizes = {(s["model"], s["rank"]): s for s in smoke[1]["full_size_lora"]}
    assert sizes[("SD1.5", 32)]["modules"] == 192  # sd-scripts' U-Net target count for SD 1.5
    for model in ("SD1.5", "SDXL"):
        assert sizes[(model, 128)]["params"] == 4 * sizes[(model, 32)]["params"]  # linear in rank, no conv targets


def test_state_bytes_count_every_moment_tensor() -> None:
    weights = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.AdamW(weights, lr=1e-3)
    for w in weights:
        w.grad = torch.ones_like(w)
    optimizer.step()
    assert vram.optimizer_state_bytes(optimizer) == 2 * 4 * (35 + 3)  # exp_avg + exp_avg_sq in fp32


def test_check_reports_state_that_is_not_expected() -> None:
    bad = vram.Measurement("m", 8, 4, "ANLO", "fp32", 100, 4, 0.0, None, 0.1, True, 0.0)
    stuck = vram.Measurement("m", 8, 4, "AdamW", "fp32", 100, 800, 0.0, None, float("nan"), False, 0.0)
    problems = vram.check([bad, stuck])
    assert any("ANLO" in p and "0.040 bytes of state per parameter, expected 0" in p for p in problems)
    assert any("loss nan is not finite" in p for p in problems)
    assert any("left every LoRA weight unchanged" in p for p in problems)


@pytest.mark.parametrize(("config", "params"), [(vram.SD15_UNET, 859_520_964), (vram.SDXL_UNET, 2_567_463_684)])
def test_full_size_configs_have_the_published_parameter_counts(config: dict, params: int) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    assert sum(p.numel() for p in unet.parameters()) == params


def test_bad_rank_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        vram.parse_args(["--ranks", "0"])
    assert "--ranks: expected positive integers" in capsys.readouterr().err
