"""The README's quick starts, cut to their first 2 of 5 epochs: the loss visibly falls and conv layers train."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

import sdxl_train_network
import train_network
from library.sdxl import SdxlNetworkTrainer

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 40  # 16 images × 10 repeats / batch 4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("entry_point", "trainer_name", "config", "lora_name", "conv_key"),
    [
        (train_network, "NetworkTrainer", "quickstart.toml", "quickstart_lora",
         "lora_unet_up_blocks_1_resnets_0_conv1.lora_down.weight"),
        (sdxl_train_network, "SdxlNetworkTrainer", "sdxl_quickstart.toml", "sdxl_quickstart_lora",
         "lora_unet_output_blocks_5_0_in_layers_2.lora_down.weight"),  # a full-size ResNet conv
    ],
    ids=["sd1", "sdxl"],
)  # fmt: skip
def test_quickstart_config_learns_in_two_epochs(entry_point, trainer_name, config, lora_name, conv_key, tmp_path,
                                                monkeypatch):
    monkeypatch.chdir(REPO)  # the config names data/demo relative to the repository
    trainers = []

    class RecordingTrainer(getattr(entry_point, trainer_name)):
        def __init__(self) -> None:
            super().__init__()
            trainers.append(self)

    monkeypatch.setattr(entry_point, trainer_name, RecordingTrainer)
    steps = 2 * STEPS_PER_EPOCH
    output = entry_point.main(
        ["--config_file", f"configs/{config}", "--max_train_steps", str(steps), "--output_dir", str(tmp_path)]
    )

    losses = trainers[0].loss_history
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    first_epoch = sum(losses[:STEPS_PER_EPOCH]) / STEPS_PER_EPOCH
    second_epoch = sum(losses[STEPS_PER_EPOCH:]) / STEPS_PER_EPOCH
    assert second_epoch < 0.8 * first_epoch, (first_epoch, second_epoch)
    assert Path(output) == tmp_path / f"{lora_name}.safetensors"
    with safe_open(output, framework="pt") as handle:
        assert conv_key in handle.keys()  # conv_dim reached the file
        if isinstance(trainers[0], SdxlNetworkTrainer):
            assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert not list((REPO / "data" / "demo").rglob("*.npz"))  # latents and text outputs cached in memory only

