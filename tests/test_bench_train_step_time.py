"""benchmarks/train_step_time.py: its command lines, rounds and table, and a tiny invocation timed in subprocesses."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import train_memory, train_step_time


def test_each_configuration_trains_with_its_optimizer_arguments_and_learning_rate():
    spec = dict(model="SDXL", rank=32, config="ANLO+lr_free", resolution=512, steps=4, mixed_precision="no", round=0)
    argv = train_step_time.training_argv(spec, "data", "out")
    assert argv[argv.index("--optimizer_type") + 1] == "ANLO"
    assert argv[argv.index("--optimizer_args") + 1:argv.index("--optimizer_args") + 3] == [
        "orthogonalize=False", "lr_free=True"]
    assert float(argv[argv.index("--learning_rate") + 1]) == 1.0
    assert argv[argv.index("--resolution") + 1] == "512"
    assert argv[argv.index("--mixed_precision") + 1] == "no"
    for flag in ("--gradient_checkpointing", "--cache_latents", "--network_train_unet_only",
                 "--cache_text_encoder_outputs"):
        assert flag in argv
    assert "--fp8_base" not in argv
    adamw = train_step_time.training_argv(dict(spec, config="AdamW"), "data", "out")
    assert "--optimizer_args" not in adamw and float(adamw[adamw.index("--learning_rate") + 1]) == 1e-4


def test_rounds_interleave_the_configurations():
    args = train_step_time.parse_args(["--rounds", "2", "--configs", "ANLO", "AdamW", "--rank", "128"])
    assert [(spec["round"], spec["config"]) for spec in train_step_time.plan(args)] == [
        (0, "ANLO"), (0, "AdamW"), (1, "ANLO"), (1, "AdamW")]
    assert {spec["rank"] for spec in train_step_time.plan(args)} == {128}


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--rounds", "0"], ["--rank", "0"]])
def test_bad_arguments_fail_with_a_message(argv, capsys):
    with pytest.raises(SystemExit):
        train_step_time.parse_args(argv)
    assert "expected --rank >= 1, --steps >= 2" in capsys.readouterr().err


def _result(config: str, steps: list[float], optimizer: list[float]) -> dict:
    return dict(model="SD1.5", rank=32, config=config, resolution=512, device="cpu", step_seconds=steps,
                optimizer_seconds=optimizer, skipped_steps=0, load_average=[1.0, 2.0], mixed_precision="bf16")


def test_medians_leave_out_each_runs_first_step_and_ratios_are_to_the_baseline():
    results = [
        _result("ANLO", [99.0, 10.0, 12.0], [9.0, 0.1, 0.1]),
        _result("ANLO+orthogonalize", [99.0, 11.0, 13.0], [9.0, 0.5, 0.7]),
        _result("ANLO", [99.0, 14.0, 16.0], [9.0, 0.1, 0.3]),
    ]
    rows = train_step_time.summarize(results, "ANLO")
    assert [row["config"] for row in rows] == ["ANLO", "ANLO+orthogonalize"]
    baseline, orthogonalize = rows
    assert baseline["runs"] == 2 and baseline["timed_steps"] == 4
    assert baseline["step_s"] == 13.0 and baseline["min_step_s"] == 10.0  # median of 10, 12, 14, 16
    assert baseline["optimizer_s"] == pytest.approx(0.1)
    assert baseline["ratio"] == 1.0 and baseline["added_optimizer_s"] == 0.0
    assert orthogonalize["ratio"] == pytest.approx(12.0 / 13.0)
    assert orthogonalize["added_optimizer_s"] == pytest.approx(0.5)
    table = train_step_time.markdown_table(rows, "ANLO")
    # optimizer.step() adds 0.5 s to the baseline's 13 s step: +3.8 %
    assert "| SD1.5 | 512 | bf16 | 32 | ANLO+orthogonalize | ANLO | orthogonalize=True | 0.0001 | 1 × 2 | 12.00 " \
           "| 11.00 | 0.923× | 600 | 5.00% | +3.85% | 1.0–2.0 |" in table


@pytest.mark.slow
def test_a_tiny_invocation_times_every_step_without_changing_the_training(tmp_path, capsys):
    assert train_step_time.main(["--tiny", "--resolution", "64", "--rank", "4", "--steps", "3",
                                 "--configs", "ANLO", "ANLO+orthogonalize", "--out", str(tmp_path)]) == 0
    results = [json.loads(line) for line in (tmp_path / "train_step_time.jsonl").read_text().splitlines()]
    assert [result["config"] for result in results] == ["ANLO", "ANLO+orthogonalize"]
    for result in results:
        assert result["model"] == "tiny-sd1" and result["skipped_steps"] == 0
        assert len(result["step_seconds"]) == len(result["optimizer_seconds"]) == 3
        assert all(0 < inner < step for inner, step in zip(result["optimizer_seconds"], result["step_seconds"]))
        assert len(result["losses"]) == 3 and all(math.isfinite(loss) for loss in result["losses"])
    # the timing hooks change nothing: train_memory's run of ANLO (its default, orthogonalize=True; same flags, no
    # hooks) has the same losses as the timed ANLO+orthogonalize run
    plain = train_memory.run_in_subprocess(dict(model="tiny-sd1", rank=4, optimizer="ANLO", fp8=False,
                                                checkpointing=True, resolution=64, steps=3), timeout=600)
    assert results[1]["losses"] == plain["losses"] != results[0]["losses"]
    table = (tmp_path / "train_step_time.md").read_text()
    assert table == capsys.readouterr().out.split("\n", 2)[-1].rstrip("\n") + "\n"
    baseline_row = table.splitlines()[2].split(" | ")
    assert baseline_row[11] == "1.000×" and baseline_row[14] == "+0.00%"  # the baseline against itself
    assert len(table.splitlines()) == 4


def test_table_only_writes_the_last_invocations_table_without_running(tmp_path):
    old = dict(_result("ANLO", [9.0, 50.0], [1.0, 1.0]), invocation="A")
    new = [dict(_result(config, [9.0, seconds], [1.0, 0.5]), invocation="B")
           for config, seconds in (("ANLO", 10.0), ("AdamW", 12.0))]
    (tmp_path / "train_step_time.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [old, *new]))
    assert train_step_time.main(["--table_only", "--out", str(tmp_path)]) == 0
    rows = (tmp_path / "train_step_time.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[9:12] for row in rows] == [["10.00", "10.00", "1.000×"], ["12.00", "12.00", "1.200×"]]
