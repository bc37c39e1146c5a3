"""Loss masks (--masked_loss with mask images, --alpha_mask): the loss weighting, the mask following its image
through resize / crop / flip, the latent cache, and the errors for bad mask files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library import diffusion, masks
from helpers import parser_args  # tests/helpers.py
from library.dataset import build_dataset
from library.errors import UserInputError
from library.latents import latents_npz_path
from library.tiny_models import build_tiny

BASE_ARGS = dict(resolution="32", seed=5, caption_extension=".txt", min_bucket_reso=16, max_bucket_reso=64,
                 bucket_reso_steps=16)


def make_args(**overrides):
    """The parser's defaults (tests/helpers.py) with these tests' small images and buckets."""
    return parser_args(**{**BASE_ARGS, **overrides})


def all_batches(dataset, epochs=(1,)):
    out = []
    for epoch in epochs:
        dataset.set_current_epoch(epoch)
        out += [dataset[i] for i in range(len(dataset))]
    return out


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def position_pixels(width: int, height: int) -> np.ndarray:
    """RGB pixels that say where they are: R = 5·x, G = 7·y, B = 0."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([5 * x, 7 * y, np.zeros_like(x)], axis=-1).astype(np.uint8)


def position_mask(rgb: np.ndarray) -> np.ndarray:
    """The mask value a pixel must carry, computed from its colour: (R + G) mod 256."""
    return ((rgb[..., 0].astype(np.int64) + rgb[..., 1]) % 256).astype(np.uint8)


def served_rgb(image: torch.Tensor) -> np.ndarray:
    """A batch image (3, H, W in [-1, 1]) back to uint8 pixels (H, W, 3)."""
    return np.rint((image.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# The loss


def test_pixels_outside_the_mask_get_no_gradient():
    torch.manual_seed(0)
    pixel_masks = torch.ones(2, 32, 32)
    pixel_masks[0, :, :16] = 0.0  # left half of image 0 is ignored
    pixel_masks[1, 8:16, 8:24] = 0.0  # a 1 × 2 block of latent cells in image 1
    prediction = torch.randn(2, 4, 4, 4, requires_grad=True)
    target = torch.randn(2, 4, 4, 4)
    latent_mask = masks.latent_loss_mask(pixel_masks, prediction.shape[-2:])
    diffusion.per_sample_loss(prediction, target, "l2", None, latent_mask).sum().backward()
    grad = prediction.grad
    ignored = torch.zeros(2, 4, 4, 4, dtype=torch.bool)
    ignored[0, :, :, :2] = True
    ignored[1, :, 1, 1:3] = True
    assert torch.all(grad[ignored] == 0)
    assert torch.all(grad[~ignored] != 0)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber"])
def test_weighting_matches_a_hand_computed_reference(loss_type):
    rng = np.random.default_rng(1)
    pixel_masks = rng.uniform(0, 1, (2, 16, 24)).astype(np.float32)
    prediction = rng.normal(size=(2, 3, 2, 3))
    target = rng.normal(size=(2, 3, 2, 3))
    huber_c = np.array([0.3, 0.7])
    expected = []
    for b in range(2):
        total = 0.0
        for c in range(3):
            for i in range(2):
                for j in range(3):
                    weight = pixel_masks[b, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8].mean()  # the 8×8 block's mean
                    d = prediction[b, c, i, j] - target[b, c, i, j]
                    if loss_type == "l2":
                        element = d * d
                    elif loss_type == "l1":
                        element = abs(d)
                    else:
                        cb = huber_c[b]
                        element = 2 * cb * (np.sqrt(d * d + cb * cb) - cb)
                    total += element * weight
        expected.append(total / (3 * 2 * 3))  # the mean over every element, masked or not
    latent_mask = masks.latent_loss_mask(torch.from_numpy(pixel_masks), (2, 3))
    loss = diffusion.per_sample_loss(torch.from_numpy(prediction), torch.from_numpy(target), loss_type,
                                     torch.from_numpy(huber_c), latent_mask)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)


def test_without_masks_the_loss_is_unchanged():
    prediction, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert masks.latent_loss_mask(None, (4, 4)) is None
    torch.testing.assert_close(diffusion.per_sample_loss(prediction, target, "l2", None, None),
                               ((prediction - target) ** 2).mean(dim=(1, 2, 3)))


# ---------------------------------------------------------------------------------------------------------------
# The mask follows its image


def position_image_with_alpha(path: Path, width: int, height: int) -> None:
    rgb = position_pixels(width, height)
    save(path, np.concatenate([rgb, position_mask(rgb)[..., None]], axis=-1))


def assert_aligned(batches) -> set:
    """Every served mask value is the one its pixel's colour calls for; returns the (crop, flipped) seen."""
    seen = set()
    for batch in batches:
        assert batch["loss_masks"] is not None
        for image, mask, crop in zip(batch["images"], batch["loss_masks"], batch["crop_top_lefts"]):
            rgb = served_rgb(image)
            np.testing.assert_array_equal(np.rint(mask.numpy() * 255).astype(np.int64), position_mask(rgb))
            seen.add((tuple(crop.tolist()), bool(rgb[0, 0, 0] > rgb[0, -1, 0])))  # R falls left to right: flipped
    return seen


def test_alpha_mask_follows_random_crop_and_flip(tmp_path):
    position_image_with_alpha(tmp_path / "4_x" / "a.png", 48, 32)  # 32×32 crops out of 48 wide: no resize
    args = make_args(train_data_dir=str(tmp_path), alpha_mask=True, flip_aug=True, random_crop=True)
    seen = assert_aligned(all_batches(build_dataset(args), epochs=range(1, 6)))
    assert {flipped for _, flipped in seen} == {False, True}
    assert len({crop for crop, _ in seen}) > 3


def test_mask_image_follows_random_crop_and_flip(tmp_path):
    rgb = position_pixels(48, 32)
    save(tmp_path / "img" / "a.png", rgb)
    save(tmp_path / "mask" / "a.png", np.stack([position_mask(rgb)] + [np.full((32, 48), 9, np.uint8)] * 2, -1))
    (tmp_path / "data.toml").write_text(
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'img').as_posix()}'\nnum_repeats = 4\n"
        f"conditioning_data_dir = '{(tmp_path / 'mask').as_posix()}'\nflip_aug = true\nrandom_crop = true\n",
        encoding="utf-8")
    args = make_args(dataset_config=str(tmp_path / "data.toml"), masked_loss=True)
    seen = assert_aligned(all_batches(build_dataset(args), epochs=range(1, 6)))
    assert {flipped for _, flipped in seen} == {False, True}


def test_mask_is_resized_like_its_image_for_buckets(tmp_path):
    """An image whose alpha equals its red channel: after bucket resize, crop and flip the served mask still
    equals the served red channel (same filter, same box, same mirror)."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    save(tmp_path / "3_x" / "a.png", np.concatenate([rgb, rgb[..., :1]], axis=-1))
    args = make_args(train_data_dir=str(tmp_path), alpha_mask=True, flip_aug=True, enable_bucket=True,
                     resolution="48", min_bucket_reso=16, max_bucket_reso=96, bucket_reso_steps=16)
    for batch in all_batches(build_dataset(args), epochs=range(1, 4)):
        image, mask = batch["images"][0], batch["loss_masks"][0]
        assert mask.shape == image.shape[1:] and mask.shape != (50, 70)
        red = served_rgb(image)[..., 0]
        assert np.abs(np.rint(mask.numpy() * 255) - red).max() <= 1  # the tensor round trip may round by one


def test_image_without_alpha_has_an_all_ones_mask_and_mixed_batches_fill_ones(tmp_path):
    save(tmp_path / "a" / "0.png", position_pixels(32, 32))  # RGB: no alpha
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 51
    save(tmp_path / "b" / "0.png", rgba)
    save(tmp_path / "c" / "0.png", position_pixels(32, 32))
    (tmp_path / "data.toml").write_text(
        "[general]\nbatch_size = 3\n[[datasets]]\n"
        f"[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'a').as_posix()}'\nalpha_mask = true\n"
        f"[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'b').as_posix()}'\nalpha_mask = true\n"
        f"[[datasets.subsets]]\nimage_dir = '{(tmp_path / 'c').as_posix()}'\n",
        encoding="utf-8")
    batch = build_dataset(make_args(dataset_config=str(tmp_path / "data.toml")))[0]
    by_folder = {Path(key).parent.name: mask for key, mask in zip(batch["image_keys"], batch["loss_masks"])}
    assert torch.all(by_folder["a"] == 1.0)  # no alpha channel: opaque
    assert torch.all(by_folder["c"] == 1.0)  # no alpha_mask in a batch that has masks: ones
    torch.testing.assert_close(by_folder["b"], torch.full((32, 32), 51 / 255))


def test_alpha_mask_from_the_command_line_reaches_regularization_images(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 102
    save(tmp_path / "train" / "1_x" / "a.png", rgba)
    save(tmp_path / "reg" / "1_x" / "r.png", rgba)
    args = make_args(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), alpha_mask=True,
                     prior_loss_weight=0.5)
    batches = all_batches(build_dataset(args))
    assert sorted(b["loss_weights"].item() for b in batches) == [0.5, 1.0]
    for batch in batches:
        torch.testing.assert_close(batch["loss_masks"][0], torch.full((32, 32), 102 / 255))


def test_masked_loss_without_any_mask_warns(tmp_path, caplog):
    save(tmp_path / "1_x" / "a.png", position_pixels(32, 32))
    dataset = build_dataset(make_args(train_data_dir=str(tmp_path), masked_loss=True))
    assert dataset[0]["loss_masks"] is None
    assert "--masked_loss has no effect" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# The latent cache


@pytest.fixture(scope="module")
def vae():
    return build_tiny("tiny-sd1")["vae"].eval()


def test_cached_and_uncached_masks_agree(tmp_path, vae):
    rng = np.random.default_rng(3)
    for name, size in (("a", (32, 32)), ("b", (48, 32))):
        save(tmp_path / "2_x" / f"{name}.png", rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8))
    args = make_args(train_data_dir=str(tmp_path), alpha_mask=True, flip_aug=True, train_batch_size=2)
    uncached = all_batches(build_dataset(args), epochs=(1, 2))
    for to_disk in (False, True):
        dataset = build_dataset(args)
        dataset.cache_latents(vae, to_disk, "cpu", torch.float32, 2)
        cached = all_batches(dataset, epochs=(1, 2))
        for a, b in zip(uncached, cached):
            assert a["image_keys"] == b["image_keys"]
            torch.testing.assert_close(a["loss_masks"], b["loss_masks"], rtol=0, atol=0)
    with np.load(latents_npz_path(tmp_path / "2_x" / "b.png")) as data:
        assert data["alpha_mask"].shape == (32, 32) and data["alpha_mask"].dtype == np.float32


def test_switching_alpha_mask_recomputes_the_disk_cache(tmp_path, vae, monkeypatch):
    save(tmp_path / "1_x" / "a.png", np.random.default_rng(4).integers(0, 256, (32, 32, 4), dtype=np.uint8))
    npz = latents_npz_path(tmp_path / "1_x" / "a.png")
    build_dataset(make_args(train_data_dir=str(tmp_path))).cache_latents(vae, True, "cpu", torch.float32, 1)
    with np.load(npz) as data:
        assert "alpha_mask" not in data.files
    for skip_cache_check in (False, True):
        npz.unlink(missing_ok=skip_cache_check)
        if skip_cache_check:  # an old file without the mask is not trusted even with --skip_cache_check
            build_dataset(make_args(train_data_dir=str(tmp_path))).cache_latents(vae, True, "cpu", torch.float32, 1)
        dataset = build_dataset(make_args(train_data_dir=str(tmp_path), alpha_mask=True,
                                          skip_cache_check=skip_cache_check))
        dataset.cache_latents(vae, True, "cpu", torch.float32, 1)
        with np.load(npz) as data:
            assert "alpha_mask" in data.files
        assert dataset[0]["loss_masks"] is not None


# ---------------------------------------------------------------------------------------------------------------
# Errors


def mask_config(tmp_path: Path, subsets: str, general: str = "") -> str:
    path = tmp_path / "data.toml"
    path.write_text(f"{general}[[datasets]]\n{subsets}", encoding="utf-8")
    return str(path)


def mask_subset(image_dir: Path, mask_dir: Path, extra: str = "") -> str:
    return (f"[[datasets.subsets]]\nimage_dir = '{image_dir.as_posix()}'\n"
            f"conditioning_data_dir = '{mask_dir.as_posix()}'\n{extra}")


@pytest.fixture
def pair(tmp_path):
    """img/a.png, img/b.png (32×32) with masks mask/a.png, mask/b.png."""
    for name in ("a", "b"):
        save(tmp_path / "img" / f"{name}.png", position_pixels(32, 32))
        save(tmp_path / "mask" / f"{name}.png", np.full((32, 32), 255, np.uint8))
    return tmp_path


def build(pair, subsets, masked_loss=True, general=""):
    return build_dataset(make_args(dataset_config=mask_config(pair, subsets, general), masked_loss=masked_loss))


def test_a_good_pair_builds(pair):
    batch = build(pair, mask_subset(pair / "img", pair / "mask"))[0]
    assert torch.all(batch["loss_masks"] == 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: (p / "mask" / "b.png").unlink(), r"no mask image in .*mask for 1 image\(s\): .*img[/\\]b\.png"),
        (lambda p: save(p / "mask" / "c.png", np.zeros((32, 32), np.uint8)),
         r"without a training image of the same name: .*mask[/\\]c\.png"),
        (lambda p: save(p / "mask" / "b.png", np.zeros((16, 32), np.uint8)),
         r"mask image .*mask[/\\]b\.png is 32x16 but its image .*b\.png is 32x32"),
        (lambda p: (p / "mask" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"), r"cannot read mask image .*b\.png"),
        (lambda p: save(p / "mask" / "b.jpg", np.zeros((32, 32), np.uint8)),
         r"several mask images with the same name: .*b\.jpg, .*b\.png"),
    ],
)
def test_bad_mask_files_are_errors_naming_them(pair, change, message):
    change(pair)
    with pytest.raises(UserInputError, match=message):
        build(pair, mask_subset(pair / "img", pair / "mask"))


def test_mask_settings_errors(pair):
    subset = mask_subset(pair / "img", pair / "mask")
    with pytest.raises(UserInputError, match=r"conditioning_data_dir \(mask images\) needs --masked_loss"):
        build(pair, subset, masked_loss=False)
    plain = f"[[datasets.subsets]]\nimage_dir = '{(pair / 'img').as_posix()}'\n"
    with pytest.raises(UserInputError, match=r"not on subsets \[1\]"):
        build(pair, subset + plain)
    with pytest.raises(UserInputError, match=r"subsets\[0\]: is_reg cannot be used with conditioning_data_dir"):
        build(pair, mask_subset(pair / "img", pair / "mask", "is_reg = true\n"))
    with pytest.raises(UserInputError, match=r"subsets\[0\]: alpha_mask cannot be used with conditioning_data_dir"):
        build(pair, mask_subset(pair / "img", pair / "mask", "alpha_mask = true\n"))
    with pytest.raises(UserInputError, match=r"conditioning_data_dir .*nowhere \(subset .*img\) does not exist"):
        build(pair, mask_subset(pair / "img", pair / "nowhere"))


def test_mask_images_win_over_alpha_mask_from_the_command_line(pair):
    rgba = np.zeros((32, 32, 4), np.uint8)  # alpha 0 everywhere: would mask out everything
    for name in ("a", "b"):
        save(pair / "img" / f"{name}.png", rgba)
    args = make_args(dataset_config=mask_config(pair, mask_subset(pair / "img", pair / "mask")), masked_loss=True,
                     alpha_mask=True)
    assert torch.all(build_dataset(args)[0]["loss_masks"] == 1.0)


@pytest.mark.slow
def test_a_missing_mask_through_the_entry_point_is_one_error_line(pair, capsys):
    import train_network

    (pair / "mask" / "b.png").unlink()
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--dataset_config",
            mask_config(pair, mask_subset(pair / "img", pair / "mask")), "--masked_loss", "--resolution", "32",
            "--output_dir", str(pair / "out"), "--network_module", "networks.lora", "--max_train_steps", "1",
            "--max_data_loader_n_workers", "0"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train_network.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("error: conditioning_data_dir: no mask image in ") and "b.png" in lines[-1]
    assert not (pair / "out").exists() or not list((pair / "out").iterdir())


def test_a_kohya_gui_config_file_sets_the_mask_flags(tmp_path, caplog):
    from library.config import parse_args

    (tmp_path / "gui.toml").write_text(
        'pretrained_model_name_or_path = "tiny-sd1"\ntrain_data_dir = "data"\noutput_dir = "out"\n'
        "masked_loss = true\nalpha_mask = true\n",
        encoding="utf-8")
    args = parse_args(["--config_file", str(tmp_path / "gui.toml")])
    assert args.masked_loss is True and args.alpha_mask is True
    assert "unknown key" not in caplog.text
