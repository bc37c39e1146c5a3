"""End-to-end: train_network.py trains the other network kinds with ANLO, and their files read as kohya LoRAs."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import train_network
from library.trainer import NetworkTrainer
from networks import lora
from shape_images import write_shape_images  # tests/shape_images.py
from test_lora_anlo import tiny_sd1


@pytest.mark.slow
@pytest.mark.parametrize("network_module", ["networks.lora_fa", "networks.dylora"])
def test_train_network_with_anlo(tmp_path: Path, network_module):
    write_shape_images(tmp_path / "data" / "1_sks shape", ("red", "blue"), caption="a photo of sks shape")
    argv = [
        "--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data"),
        "--resolution", "64", "--max_data_loader_n_workers", "0", "--output_dir", str(tmp_path / "out"),
        "--output_name", "kind", "--network_module", network_module, "--network_args", "conv_dim=4", "unit=2",
        "--network_dim", "4", "--optimizer_type", "ANLO", "--learning_rate", "1e-3", "--max_train_steps", "3",
        "--seed", "3",
    ]  # fmt: skip
    if network_module == "networks.lora_fa":
        argv.remove("unit=2")
    NetworkTrainer().train(train_network.parse_args(argv, sdxl=False))
    saved = load_file(tmp_path / "out" / "kind.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if k.endswith("lora_up.weight"))  # it trained
    network, _ = lora.create_network_from_weights(1.0, str(tmp_path / "out" / "kind.safetensors"), None, *tiny_sd1())
    assert network.state_dict().keys() == saved.keys()
