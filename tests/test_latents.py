"""Latents: VAE posterior mean, in-memory and on-disk caches, cache reuse and invalidation."""

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import parser_args  # tests/helpers.py
from library.dataset import build_dataset
from library.latents import encode_latents, latents_npz_path
from library.tiny_models import build_tiny


@pytest.fixture(scope="module")
def vae():
    return build_tiny("tiny-sd1")["vae"].eval()


@pytest.fixture
def counted_vae(vae, monkeypatch):
    """The tiny VAE with a count of the images it encodes."""
    encoded = []
    original = vae.encode

    def encode(images, *args, **kwargs):
        encoded.append(images.shape[0])
        return original(images, *args, **kwargs)

    monkeypatch.setattr(vae, "encode", encode)
    return SimpleNamespace(vae=vae, count=lambda: sum(encoded), reset=encoded.clear)


def write_image(path: Path, seed: int, size=(32, 32)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_dir(tmp_path):
    write_image(tmp_path / "2_x" / "a.png", seed=1)
    write_image(tmp_path / "2_x" / "b.png", seed=2, size=(48, 32))
    return tmp_path


def make_dataset(root, **overrides):
    args = dict(train_data_dir=str(root), resolution="32", train_batch_size=2, seed=3, caption_extension=".txt")
    return build_dataset(parser_args(**{**args, **overrides}))


def batches(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_encode_latents_is_the_unscaled_posterior_mean(vae):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = encode_latents(vae, images)
    assert latents.shape == (2, 4, 4, 4)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    torch.testing.assert_close(latents, posterior.mean)
    assert not torch.allclose(latents, posterior.mean * vae.config.scaling_factor)


def test_memory_cache_matches_encoding_on_the_fly(image_dir, vae):
    dataset = make_dataset(image_dir)
    uncached = batches(dataset)
    dataset.cache_latents(vae, to_disk=False, device="cpu", dtype=torch.float32, batch_size=1)
    cached = batches(dataset)
    for plain, fast in zip(uncached, cached):
        assert plain["image_keys"] == fast["image_keys"] and fast["images"] is None
        torch.testing.assert_close(fast["latents"], encode_latents(vae, plain["images"]), atol=1e-5, rtol=1e-5)
        for key in ("captions", "original_sizes_hw", "crop_top_lefts", "target_sizes_hw"):
            assert plain[key] == fast[key] if isinstance(plain[key], list) else torch.equal(plain[key], fast[key])


def test_disk_cache_is_written_reused_and_invalidated(image_dir, counted_vae):
    dataset = make_dataset(image_dir)
    dataset.cache_latents(counted_vae.vae, to_disk=True, device="cpu", dtype=torch.float32, batch_size=4)
    assert counted_vae.count() == 2
    npz_a, npz_b = latents_npz_path(image_dir / "2_x" / "a.png"), latents_npz_path(image_dir / "2_x" / "b.png")
    with np.load(npz_b) as data:
        assert {"latents", "original_size", "crop_ltrb", "cache_fingerprint"} <= set(data.files)
        assert data["latents"].shape == (4, 4, 4)
        assert data["original_size"].tolist() == [48, 32] and data["crop_ltrb"].tolist() == [8, 0, 40, 32]
    assert sorted(p.name for p in (image_dir / "2_x").iterdir()) == ["a.npz", "a.png", "b.npz", "b.png"]
    on_disk = batches(dataset)
    for batch in on_disk:
        assert batch["images"] is None and batch["latents"].shape == (2, 4, 4, 4)

    counted_vae.reset()
    again = make_dataset(image_dir)
    again.cache_latents(counted_vae.vae, to_disk=True, device="cpu", dtype=torch.float32, batch_size=4)
    assert counted_vae.count() == 0  # unchanged images: nothing re-encoded
    for first, second in zip(on_disk, batches(again)):
        assert torch.equal(first["latents"], second["latents"])

    write_image(image_dir / "2_x" / "a.png", seed=99)  # same size, new content
    stat = os.stat(image_dir / "2_x" / "a.png")
    os.utime(image_dir / "2_x" / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    old_b = npz_b.read_bytes()
    counted_vae.reset()
    make_dataset(image_dir).cache_latents(counted_vae.vae, to_disk=True, device="cpu", dtype=torch.float32,
                                          batch_size=4)
    assert counted_vae.count() == 1 and npz_b.read_bytes() == old_b
    with np.load(npz_a) as data:
        expected = np.asarray(Image.open(image_dir / "2_x" / "a.png"), dtype=np.float32) / 127.5 - 1
        reference = encode_latents(counted_vae.vae, torch.from_numpy(expected).permute(2, 0, 1)[None])
        np.testing.assert_allclose(data["latents"], reference[0].numpy(), atol=1e-5)


def test_settings_change_invalidates_and_skip_cache_check_trusts(image_dir, counted_vae):
    make_dataset(image_dir).cache_latents(counted_vae.vae, True, "cpu", torch.float32, 4)
    counted_vae.reset()
    make_dataset(image_dir, flip_aug=True).cache_latents(counted_vae.vae, True, "cpu", torch.float32, 4)
    assert counted_vae.count() == 4  # both images, and their mirror images
    with np.load(latents_npz_path(image_dir / "2_x" / "a.png")) as data:
        assert "latents_flipped" in data.files

    write_image(image_dir / "2_x" / "a.png", seed=7)
    stat = os.stat(image_dir / "2_x" / "a.png")
    os.utime(image_dir / "2_x" / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    counted_vae.reset()
    make_dataset(image_dir, flip_aug=True, skip_cache_check=True).cache_latents(counted_vae.vae, True, "cpu",
                                                                                torch.float32, 4)
    assert counted_vae.count() == 0


def test_sd_scripts_cache_without_fingerprint_is_recomputed(image_dir, counted_vae):
    np.savez(latents_npz_path(image_dir / "2_x" / "a.png"), latents=np.zeros((4, 4, 4), np.float32),
             original_size=np.array([32, 32]), crop_ltrb=np.array([0, 0, 32, 32]))
    make_dataset(image_dir).cache_latents(counted_vae.vae, True, "cpu", torch.float32, 4)
    assert counted_vae.count() == 2
    with np.load(latents_npz_path(image_dir / "2_x" / "a.png")) as data:
        assert np.abs(data["latents"]).sum() > 0


def test_cached_flip_serves_the_mirror_latents(tmp_path, vae):
    write_image(tmp_path / "6_x" / "a.png", seed=5)
    dataset = make_dataset(tmp_path, flip_aug=True, train_batch_size=1)
    dataset.cache_latents(vae, False, "cpu", torch.float32, 1)
    pixels = np.asarray(Image.open(tmp_path / "6_x" / "a.png"), dtype=np.float32) / 127.5 - 1
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    plain, mirrored = encode_latents(vae, image)[0], encode_latents(vae, torch.flip(image, dims=[3]))[0]
    kinds = set()
    for epoch in (1, 2):
        dataset.set_current_epoch(epoch)
        for batch in batches(dataset):
            latents = batch["latents"][0]
            if torch.allclose(latents, plain, atol=1e-5):
                kinds.add("plain")
            else:
                torch.testing.assert_close(latents, mirrored, atol=1e-5, rtol=1e-5)
                kinds.add("mirrored")
    assert kinds == {"plain", "mirrored"}


@pytest.mark.parametrize("option", ["color_aug", "random_crop"])
def test_caching_with_per_step_augmentation_is_an_error(image_dir, vae, option):
    dataset = make_dataset(image_dir, **{option: True})
    with pytest.raises(ValueError, match=r"cannot be used with color_aug or random_crop \(set for: .*2_x\)"):
        dataset.cache_latents(vae, False, "cpu", torch.float32, 1)
