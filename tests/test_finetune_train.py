"""End-to-end: fine-tuning metadata datasets train on the tiny SD 1.x (``--in_json``, with sd-scripts' .npz latents)
and SDXL (a ``--dataset_config`` mixing a DreamBooth and a fine-tuning dataset) models, and the LoRA files carry
the ss_* dataset metadata sd-scripts writes for them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from library.config import parse_args
from library.sdxl import SdxlNetworkTrainer
from library.trainer import NetworkTrainer
from shape_images import write_shape_images  # tests/shape_images.py

pytestmark = pytest.mark.slow

COLORS = ("red", "green", "blue", "yellow")


def common_config(root: Path, model: str) -> str:
    return f"""
pretrained_model_name_or_path = "{model}"
resolution = "64"
max_data_loader_n_workers = 0
network_module = "networks.lora"
network_dim = 2
network_alpha = 2
learning_rate = 1e-3
max_train_steps = 3
seed = 3
output_dir = "{(root / 'out').as_posix()}"
output_name = "run"
"""


def read_metadata(path: str) -> dict[str, str]:
    with safe_open(path, framework="pt") as file:
        return file.metadata()


def test_sd1_in_json_run_with_npz_latents(tmp_path):
    images = write_shape_images(tmp_path / "images", COLORS)
    metadata = {str(i): {"caption": f"shape {color}", "tags": color, "train_resolution": [64, 64]}
                for i, color in enumerate(COLORS)}
    rng = np.random.default_rng(0)
    for i in range(len(COLORS)):  # what prepare_buckets_latents.py writes next to each image
        np.savez(images / f"{i}.npz", latents=rng.standard_normal((4, 8, 8), dtype=np.float32))
    (tmp_path / "meta_lat.json").write_text(json.dumps(metadata), encoding="utf-8")
    config = tmp_path / "config.toml"
    config.write_text(common_config(tmp_path, "tiny-sd1") + f'in_json = "{(tmp_path / "meta_lat.json").as_posix()}"\n'
                      f'train_data_dir = "{images.as_posix()}"\ndataset_repeats = 2\n', encoding="utf-8")

    trainer = NetworkTrainer()
    output = trainer.train(parse_args(["--config_file", str(config)], sdxl=False))
    metadata_out = read_metadata(output)
    assert json.loads(metadata_out["ss_dataset_dirs"]) == {"meta_lat.json": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(metadata_out["ss_tag_frequency"]) == {"meta_lat.json": {color: 1 for color in COLORS}}
    assert metadata_out["ss_num_train_images"] == "8"
    assert metadata_out["ss_enable_bucket"] == "True"  # train_resolution switches bucketing on
    assert all(np.isfinite(trainer.loss_history))


def test_sdxl_dataset_config_mixing_dreambooth_and_finetuning(tmp_path):
    write_shape_images(tmp_path / "db", COLORS[:2], caption="sks shape")
    ft_images = write_shape_images(tmp_path / "ft", COLORS[2:])
    metadata = {str(i): {"caption": f"shape {color}"} for i, color in enumerate(COLORS[2:])}
    (tmp_path / "ft.json").write_text(json.dumps(metadata), encoding="utf-8")
    dataset_config = tmp_path / "dataset.toml"
    dataset_config.write_text(
        "[general]\ncaption_extension = '.txt'\n"
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'db').as_posix()}'\nnum_repeats = 1\n"
        f"[[datasets]]\n[[datasets.subsets]]\nmetadata_file = '{(tmp_path / 'ft.json').as_posix()}'\n"
        f"image_dir = '{ft_images.as_posix()}'\nnum_repeats = 2\n",
        encoding="utf-8",
    )
    config = tmp_path / "config.toml"
    config.write_text(common_config(tmp_path, "tiny-sdxl") + f'dataset_config = "{dataset_config.as_posix()}"\n',
                      encoding="utf-8")

    trainer = SdxlNetworkTrainer()
    output = trainer.train(parse_args(["--config_file", str(config)], sdxl=True))
    metadata_out = read_metadata(output)
    datasets = json.loads(metadata_out["ss_datasets"])
    assert [d["is_dreambooth"] for d in datasets] == [True, False]
    assert datasets[1]["subsets"][0]["metadata_file"] == "ft.json"
    assert json.loads(metadata_out["ss_dataset_dirs"]) == {"db": {"n_repeats": 1, "img_count": 2},
                                                           "ft.json": {"n_repeats": 2, "img_count": 2}}
    assert metadata_out["ss_num_train_images"] == "6"
    assert all(np.isfinite(trainer.loss_history))
