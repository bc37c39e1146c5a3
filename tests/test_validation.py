"""``--validation_split`` (library/validation.py): the held-out images, the loss at fixed noise, and a training run
that is unchanged by validating.

The end-to-end check trains the same two images twice: once from a folder that also holds a third image, held out
by ``--validation_split`` and validated every 2 steps, once from a folder with only the two training images and no
validation. Network dropout, caption shuffling, flips and random timesteps are on, so any draw that validation
took from the training RNG would change the losses and the weights.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from test_resume import COLORS, FOLDER, base_args, train
from test_train_network import read_scalars

import train_network
from library import validation
from library.dataset import build_dataset


def make_images(root: Path, count: int) -> Path:
    images = root / "data" / "2_sks"
    images.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 255 - 40 * i, 90)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"sks, color {i}", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("validation"), 5)


def dataset_args(root: Path) -> argparse.Namespace:
    return train_network.parse_args(
        ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(root / "data"),
         "--caption_extension", ".txt", "--resolution", "64", "--seed", "5", "--output_dir", str(root / "out")],
        sdxl=False,
    )


def test_split_is_disjoint_deterministic_and_held_out_once(workspace):
    group = build_dataset(dataset_args(workspace))
    train, held_out = validation.split_dataset(group, 0.4, seed=9)
    train_paths = {item.path for d in train.datasets for item in d.items}
    held_paths = {item.path for d in held_out.datasets for item in d.items}
    assert len(train_paths) == 3 and len(held_paths) == 2  # int(5 · 0.6) = 3 kept
    assert train_paths | held_paths == {item.path for item in group.datasets[0].items}
    assert not train_paths & held_paths
    assert len(train) == 3 * 2 and len(held_out) == 2  # training keeps its 2 repeats, validation sees each once
    assert train.num_train_images == 6
    again_train, _ = validation.split_dataset(group, 0.4, seed=9)
    assert {item.path for d in again_train.datasets for item in d.items} == train_paths
    other_seeds = {frozenset(i.path for i in validation.split_dataset(group, 0.4, s)[1].datasets[0].items)
                   for s in range(10)}
    assert len(other_seeds) > 1  # the seed chooses the held-out images


def test_split_leaving_an_empty_part_is_refused(workspace):
    group = build_dataset(dataset_args(workspace))
    with pytest.raises(validation.ValidationSplitError, match=r"--validation_split 0.9: 5 training image\(s\) in .* "
                                                             r"leave 0 for training and 5 for validation"):
        validation.split_dataset(group, 0.9, seed=0)


def test_validation_loss_uses_fixed_noise_and_leaves_the_training_rng_alone():
    """Two passes give the same loss; it equals the loss computed by hand at the seeded noise; the global RNG,
    the network's training mode and its gradients are as before; dropout is off during the pass."""
    accelerator = Accelerator(cpu=True)
    network = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    batches = [{"x": torch.ones(2, 3) * i} for i in range(3)]

    def compute_loss(batch: dict) -> torch.Tensor:
        noise = torch.randn(2, 3)
        return ((network(batch["x"]) - noise) ** 2).mean()

    torch.manual_seed(123)
    rng_before = torch.random.get_rng_state()
    network.train()
    first = validation.validation_loss(accelerator, network, batches, compute_loss, seed=7, max_batches=2)
    second = validation.validation_loss(accelerator, network, batches, compute_loss, seed=7, max_batches=2)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert network.training
    assert all(p.grad is None for p in network.parameters())

    generator = torch.Generator().manual_seed(7)
    network.eval()
    with torch.no_grad():
        expected = [((network(b["x"]) - torch.randn(2, 3, generator=generator)) ** 2).mean().item() for b in batches[:2]]
    assert first == second == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_recorder_names_match_sd_scripts():
    recorder = validation.ValidationRecorder()
    assert recorder.step_logs(2.0) == {"loss/validation/step_current": 2.0, "loss/validation/step_average": 2.0}
    assert recorder.step_logs(4.0)["loss/validation/step_average"] == 3.0
    assert recorder.epoch_logs(1.0) == {"loss/validation/epoch_current": 1.0, "loss/validation/epoch_average": 1.0}


@pytest.fixture(scope="module")
def validated_and_plain_runs(make_shape_workspace):
    """(run with validation, run without, log folder of the first): the same two training images, 8 steps."""
    root = make_shape_workspace("validation_e2e", FOLDER, COLORS)
    validated = train(base_args(root, "validated", "--validation_split", "0.25", "--validate_every_n_steps", "2",
                                "--logging_dir", str(root / "logs")))

    # the images the split kept for training, in a folder of their own
    args = train_network.parse_args(base_args(root, "split", "--validation_split", "0.25"), sdxl=False)
    kept, _ = validation.split_dataset(build_dataset(args), args.validation_split, validation.validation_seed(args))
    plain_images = root / "plain" / "2_sks shape"
    plain_images.mkdir(parents=True)
    for item in kept.datasets[0].items:
        shutil.copy(item.path, plain_images)
        shutil.copy(Path(item.path).with_suffix(".txt"), plain_images)
    argv = base_args(root, "plain")
    argv[argv.index("--train_data_dir") + 1] = str(root / "plain")
    plain = train(argv)
    return validated, plain, root / "logs"


@pytest.mark.slow
def test_validation_leaves_training_losses_and_weights_unchanged(validated_and_plain_runs):
    validated, plain, _ = validated_and_plain_runs
    assert len(validated.loss_history) == 8
    assert validated.loss_history == plain.loss_history
    with_validation, without = load_file(validated.output_file), load_file(plain.output_file)
    assert with_validation.keys() == without.keys()
    for key in without:
        assert torch.equal(with_validation[key], without[key]), key


@pytest.mark.slow
def test_validation_loss_is_logged_under_sd_scripts_names(validated_and_plain_runs):
    _, _, logs = validated_and_plain_runs
    scalars = read_scalars(logs)
    current, average = scalars["loss/validation/step_current"], scalars["loss/validation/step_average"]
    assert len(current) == 4  # after steps 2, 4, 6 and 8
    assert average == pytest.approx([sum(current[: i + 1]) / (i + 1) for i in range(4)], rel=1e-6)
    assert len(set(current)) == 4  # same noise, changing weights: each pass measures the weights of its step
    assert "loss/validation/epoch_current" not in scalars  # --validate_every_n_steps alone: no epoch passes
