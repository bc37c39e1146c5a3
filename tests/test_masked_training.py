"""End-to-end masked-loss runs on the tiny SD 1.x and SDXL models (CPU, a few steps each): mask images with
--masked_loss, alpha masks with --alpha_mask, cached and uncached latents, and the metadata of the LoRA file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from library.config import parse_args
from library.sdxl import SdxlNetworkTrainer
from library.trainer import NetworkTrainer
from shape_images import write_shape_images  # tests/shape_images.py

pytestmark = pytest.mark.slow

COLORS = ("red", "green", "blue", "yellow")


def shape_mask(image_path: Path) -> np.ndarray:
    """255 on the ellipse, 0 on the white background."""
    pixels = np.asarray(Image.open(image_path).convert("RGB"))
    return np.where((pixels != 255).any(axis=-1), 255, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Shape images with mask images (``img``/``mask``), the same images with the mask as alpha (``alpha/1_x``)
    and fully transparent (``clear/1_x``), and a ``--dataset_config`` pairing ``img`` with ``mask``."""
    root = tmp_path_factory.mktemp("masked_training")
    images = write_shape_images(root / "img", COLORS, caption="a photo of sks shape")
    for folder in ("mask", "alpha/1_x", "clear/1_x"):
        (root / folder).mkdir(parents=True)
    for path in sorted(images.glob("*.png")):
        mask = shape_mask(path)
        Image.fromarray(mask).save(root / "mask" / path.name)
        rgb = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(np.dstack([rgb, mask])).save(root / "alpha" / "1_x" / path.name)
        Image.fromarray(np.dstack([rgb, np.zeros_like(mask)])).save(root / "clear" / "1_x" / path.name)
        for folder in ("alpha/1_x", "clear/1_x"):
            (root / folder / path.with_suffix(".txt").name).write_text("a photo of sks shape", encoding="utf-8")
    (root / "masks.toml").write_text(
        "[general]\ncaption_extension = '.txt'\n[[datasets]]\n[[datasets.subsets]]\n"
        f"image_dir = '{(root / 'img').as_posix()}'\nconditioning_data_dir = '{(root / 'mask').as_posix()}'\n"
        "flip_aug = true\n",
        encoding="utf-8",
    )
    return root


def common_args(root: Path, model: str, name: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", model, "--resolution", "64", "--max_data_loader_n_workers", "0",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
        "--network_args", "conv_dim=4", "conv_alpha=4", "--optimizer_type", "AdamW", "--learning_rate", "1e-2",
        "--lr_scheduler", "constant", "--max_train_steps", "3", "--seed", "7", "--min_timestep", "400",
        "--max_timestep", "600", "--output_dir", str(root / "out"), "--output_name", name,
    ]


def train(root: Path, model: str, name: str, *extra: str) -> NetworkTrainer:
    sdxl = model == "tiny-sdxl"
    trainer = SdxlNetworkTrainer() if sdxl else NetworkTrainer()
    trainer.train(parse_args([*common_args(root, model, name), *extra], sdxl=sdxl))
    return trainer


def metadata(trainer: NetworkTrainer) -> dict[str, str]:
    with safe_open(trainer.output_file, framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_mask_images_train_and_are_recorded(workspace, model):
    trainer = train(workspace, model, f"{model}-mask-images", "--dataset_config", str(workspace / "masks.toml"),
                    "--masked_loss")
    assert len(trainer.loss_history) == 3 and all(np.isfinite(trainer.loss_history))
    meta = metadata(trainer)
    assert meta["ss_masked_loss"] == "True"
    assert json.loads(meta["ss_datasets"])[0]["subsets"][0]["image_dir"] == "img"
    weights = load_file(trainer.output_file)
    assert any(key.endswith("lora_up.weight") and value.abs().max() > 0 for key, value in weights.items())


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_fully_transparent_images_give_no_gradient(workspace, model):
    """Alpha 0 everywhere masks out every pixel: the loss is 0 and the LoRA's up weights stay at their zero
    initialisation (with --masked_loss unset: alpha masks apply by themselves, as in sd-scripts)."""
    trainer = train(workspace, model, f"{model}-clear", "--train_data_dir", str(workspace / "clear"), "--alpha_mask")
    assert trainer.loss_history == [0.0, 0.0, 0.0]
    weights = load_file(trainer.output_file)
    ups = [value for key, value in weights.items() if key.endswith("lora_up.weight")]
    assert ups and all(torch.count_nonzero(up) == 0 for up in ups)
    assert metadata(trainer)["ss_masked_loss"] == "False"


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sdxl"])
def test_alpha_masks_cached_and_uncached_give_the_same_losses(workspace, model):
    for npz in (workspace / "alpha" / "1_x").glob("*.npz"):
        npz.unlink()  # the cache files of the other model: the cache's fingerprint does not know the VAE
    common = ("--train_data_dir", str(workspace / "alpha"), "--alpha_mask", "--flip_aug", "--masked_loss")
    uncached = train(workspace, model, f"{model}-alpha", *common)
    cached = train(workspace, model, f"{model}-alpha-cached", *common, "--cache_latents_to_disk")
    assert uncached.loss_history == pytest.approx(cached.loss_history, rel=1e-5, abs=1e-6)
    unmasked = train(workspace, model, f"{model}-unmasked", "--train_data_dir", str(workspace / "alpha"),
                     "--flip_aug")
    assert unmasked.loss_history != pytest.approx(uncached.loss_history, rel=1e-3)
    with np.load(workspace / "alpha" / "1_x" / "0.npz") as data:
        np.testing.assert_array_equal(data["alpha_mask"] * 255, shape_mask(workspace / "img" / "0.png"))
    meta = metadata(cached)
    assert meta["ss_masked_loss"] == "True" and meta["ss_cache_latents"] == "True"
