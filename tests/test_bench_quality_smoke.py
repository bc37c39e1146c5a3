"""The LoRA-quality benchmark: its smoke mode, the SinkGD variant and the summary arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import lora_quality as lq


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    out = tmp_path_factory.mktemp("quality")
    threads = torch.get_num_threads()
    try:
        code = lq.main(["--smoke", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert (out / "lora_quality.png").read_bytes().startswith(b"\x89PNG")
    return code, json.loads((out / "lora_quality.json").read_text()), (out / "lora_quality.md").read_text()


def test_smoke_run_succeeds_with_finite_curves_and_a_table(smoke: tuple[int, dict, str]) -> None:
    code, report, table = smoke
    assert code == 0
    runs = report["runs"]
    assert {(r["label"], r["lr"]) for r in runs} == {(o, lr) for o in lq.SMOKE_OPTIMIZERS for lr in lq.SMOKE_LRS}
    for r in runs:
        assert r["steps"] == [0, 5, 10]
        assert all(math.isfinite(x) for x in r["losses"])
    assert len({r["losses"][0] for r in runs}) == 1  # every run starts from the same pretrained model
    for label in lq.SMOKE_OPTIMIZERS:
        assert f"| {label} |" in table


def test_steps_to_reach_is_the_first_step_at_or_below_target() -> None:
    assert lq.steps_to_reach([0, 10, 20, 30], [1.0, 0.7, 0.5, 0.6], 0.5) == 20
    assert lq.steps_to_reach([0, 10], [1.0, 0.7], 0.5) is None


def _run(label: str, lr: float, seed: int, losses: list[float]) -> lq.RunResult:
    return lq.RunResult(label, lr, seed, [0, 10, 20, 30], losses, 0.0)


def test_summary_picks_best_lr_by_final_loss_and_counts_steps_to_adamw_best() -> None:
    results = [
        _run("AdamW", 1e-4, 0, [1.0, 0.9, 0.8, 0.7]),
        _run("AdamW", 1e-3, 0, [1.0, 0.8, 0.6, 0.5]),
        _run("AdamW", 1e-3, 1, [1.0, 0.8, 0.6, 0.7]),  # mean final 0.6, best mean 0.6 at step 20
        _run("X", 1e-4, 0, [1.0, 0.6, 0.55, 0.55]),
        _run("X", 1e-3, 0, [1.0, 0.5, 0.6, 0.9]),
    ]
    rows = {row.label: row for row in lq.summarize(results, (1e-4, 1e-3))}
    adamw, x = rows["AdamW"], rows["X"]
    assert adamw.best_lr == 1e-3 and adamw.final_mean == pytest.approx(0.6)
    assert adamw.final_std == pytest.approx(0.1 * math.sqrt(2))
    assert adamw.steps_to_target == 20 and adamw.ratio_to_adamw == pytest.approx(1.0)
    assert x.best_lr == 1e-4 and x.steps_to_target == 10 and x.ratio_to_adamw == pytest.approx(0.5)
    assert "| X | 1e-04 | 0.55000 ± 0.00000 | -8.33 % |" in lq.markdown_table(list(rows.values()))


def test_unknown_optimizer_label_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        lq.parse_args(["--optimizers", "AdamW", "Adam"])
    assert "--optimizers: unknown label(s) ['Adam']" in capsys.readouterr().err


def test_variant_seeds_default_to_seeds_and_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    assert lq.parse_args(["--seeds", "4"]).variant_seeds == 4
    assert lq.parse_args(["--seeds", "4", "--variant_seeds", "2"]).variant_seeds == 2
    with pytest.raises(SystemExit):
        lq.parse_args(["--variant_seeds", "0"])
    assert "--variant_seeds: expected a positive integer, got 0" in capsys.readouterr().err
