"""benchmarks/train_memory.py: the full-size models it builds, its grid and table, and one tiny run measured in a
subprocess."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks import train_memory
from library.tiny_models import build_tokenizer


@pytest.mark.parametrize(
    ("sdxl", "unet_params", "encoder_params"),
    [(False, 859_520_964, [123_060_480]), (True, 2_567_463_684, [123_060_480, 694_659_840])],
)
def test_full_size_models_have_the_published_shapes_in_bf16(sdxl, unet_params, encoder_params):
    bundle = SimpleNamespace(tokenizers=[build_tokenizer()])
    with torch.device("meta"):
        train_memory.build_full_size(bundle, sdxl)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(bundle.unet) == unet_params
    assert count(bundle.vae) == 83_653_863  # the SD / SDXL VAE
    assert [count(encoder) for encoder in bundle.text_encoders] == encoder_params
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored


def test_the_grid_covers_every_combination_and_the_table_shows_the_fp8_saving():
    args = train_memory.parse_args(["--models", "SD1.5", "--ranks", "32", "128"])
    specs = train_memory.plan(args)
    assert len(specs) == 2 * 2 * 2 * 3
    assert len({json.dumps(spec, sort_keys=True) for spec in specs}) == len(specs)

    def row(fp8: bool, peak: float) -> dict:
        return dict(model="SD1.5", rank=32, optimizer="ANLO", fp8=fp8, checkpointing=True, device="cpu",
                    measure="peak RSS", training_peak_mib=peak, run_peak_mib=peak + 1, unet_parameter_mib=1.0)

    table = train_memory.markdown_table([row(False, 3000.0), row(True, 2200.0)])
    assert "| SD1.5 | 32 | ANLO | yes | yes | 1 MiB | 2,200 MiB | 800 MiB | 2,201 MiB | peak RSS |" in table


def test_a_training_command_is_what_a_user_types():
    spec = dict(model="SDXL", rank=32, optimizer="AdamW8bit", fp8=True, checkpointing=True, resolution=64, steps=2)
    argv = train_memory.training_argv(spec, "data", "out")
    for flag in ("--fp8_base", "--gradient_checkpointing", "--cache_text_encoder_outputs", "--cache_latents"):
        assert flag in argv
    assert argv[argv.index("--optimizer_type") + 1] == "AdamW8bit"
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"


@pytest.mark.slow
def test_a_tiny_run_is_measured_in_its_own_process():
    spec = dict(model="tiny-sd1", rank=4, optimizer="ANLO", fp8=True, checkpointing=True, resolution=64, steps=2)
    result = train_memory.run_in_subprocess(spec, timeout=600)
    assert result["device"] == "cpu" and result["measure"] == "peak RSS"
    assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
    assert 100 < result["training_start_mib"] <= result["training_peak_mib"] <= result["run_peak_mib"]
    assert result["lora_file_bytes"] > 0
