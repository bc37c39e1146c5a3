"""Dataset: DreamBooth folders, --dataset_config, captions, augmentation, batches, epochs."""

import logging
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import parser_args  # tests/helpers.py
from library.dataset import build_dataset, process_caption
from library.dataset_config import SubsetSettings, load_dataset_config, resolve_settings
from library.metadata import dirs_info, tag_frequency

BASE_ARGS = dict(resolution="32", seed=42, caption_extension=".txt", min_bucket_reso=16, max_bucket_reso=64,
                 bucket_reso_steps=16)


def make_args(**overrides):
    """The parser's defaults (tests/helpers.py) with these tests' small images and buckets."""
    return parser_args(**{**BASE_ARGS, **overrides})


def write_image(path: Path, size=(32, 32), color=(200, 30, 30), split_color=None) -> np.ndarray:
    """Write a PNG (left half ``color``, right half ``split_color`` if given) and return its pixels (H, W, 3)."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:] = color
    if split_color is not None:
        array[:, size[0] // 2 :] = split_color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def write_dataset_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def one_subset_config(image_dir: Path) -> str:
    return f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{image_dir}'\n"


def all_batches(dataset):
    return [dataset[i] for i in range(len(dataset))]


# ---------------------------------------------------------------------------------------------- DreamBooth folders


@pytest.fixture
def dreambooth_dir(tmp_path):
    root = tmp_path / "train"
    write_image(root / "3_sks dog" / "a.png")
    (root / "3_sks dog" / "a.txt").write_text("sks dog, sitting\nsecond line ignored\n", encoding="utf-8")
    write_image(root / "3_sks dog" / "b.PNG")  # extension case does not matter; no caption -> class tokens
    write_image(root / "3_sks dog" / "c.JpG")
    Image.new("RGB", (32, 32)).save(root / "3_sks dog" / "d.gif")  # not an sd-scripts image extension
    write_image(root / "notrepeats" / "x.png")
    return root


def test_dreambooth_folders_give_repeats_class_tokens_and_captions(dreambooth_dir, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(make_args(train_data_dir=str(dreambooth_dir)))
    assert "notrepeats" in caplog.text and "does not start with '<repeats>_'" in caplog.text
    items = {Path(item.path).name: item for item in dataset.datasets[0].items}
    assert sorted(items) == ["a.png", "b.PNG", "c.JpG"]
    assert items["a.png"].caption == "sks dog, sitting"
    assert items["b.PNG"].caption == "sks dog" and items["c.JpG"].caption == "sks dog"
    assert {item.num_repeats for item in items.values()} == {3}
    assert dataset.num_train_images == 9 and dataset.num_reg_images == 0
    assert len(dataset) == 9  # batch size 1, every image 3 times
    assert dirs_info(dataset.datasets) == {"3_sks dog": {"n_repeats": 3, "img_count": 3}}
    assert tag_frequency(dataset.datasets) == {"3_sks dog": {"sks dog": 3, "sitting": 1}}


def test_misspelled_caption_extention_is_honoured(dreambooth_dir):
    (dreambooth_dir / "3_sks dog" / "b.cap").write_text("from cap file", encoding="utf-8")
    dataset = build_dataset(make_args(train_data_dir=str(dreambooth_dir), caption_extention=".cap"))
    captions = {Path(item.path).name: item.caption for item in dataset.datasets[0].items}
    assert captions == {"a.png": "sks dog", "b.PNG": "from cap file", "c.JpG": "sks dog"}


def test_missing_or_empty_train_data_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"--train_data_dir {tmp_path / 'nope'} does not exist"):
        build_dataset(make_args(train_data_dir=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"--train_data_dir {tmp_path / 'empty'} contains no"):
        build_dataset(make_args(train_data_dir=str(tmp_path / "empty")))


def test_empty_caption_file_is_an_error_naming_the_file(dreambooth_dir):
    (dreambooth_dir / "3_sks dog" / "a.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"caption file .*a\.txt is empty"):
        build_dataset(make_args(train_data_dir=str(dreambooth_dir)))


def test_non_utf8_caption_is_an_error_naming_the_file(dreambooth_dir):
    (dreambooth_dir / "3_sks dog" / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption file .*a\.txt is not UTF-8"):
        build_dataset(make_args(train_data_dir=str(dreambooth_dir)))


def test_regularization_images_are_balanced_to_the_training_images(tmp_path):
    # 2 training images x 3 repeats = 6; 4 regularization images x 1 repeat: all four are taken (4), then one more
    # repeat each for the first two (6) -> repeats [2, 2, 1, 1].
    for name in ("t0", "t1"):
        write_image(tmp_path / "train" / "3_sks" / f"{name}.png")
    for i in range(4):
        write_image(tmp_path / "reg" / "1_dog" / f"r{i}.png")
    dataset = build_dataset(make_args(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"),
                                      prior_loss_weight=0.25))
    reg_repeats = [item.num_repeats for item in dataset.datasets[0].items if item.subset.is_reg]
    assert reg_repeats == [2, 2, 1, 1]
    assert dirs_info(dataset.datasets) == {"3_sks": {"n_repeats": 3, "img_count": 2}}
    assert dirs_info(dataset.datasets, is_reg=True) == {"1_dog": {"n_repeats": 1, "img_count": 4}}
    assert dataset.num_train_images == 6 and dataset.num_reg_images == 4
    weights = Counter()
    for batch in all_batches(dataset):
        for key, weight in zip(batch["image_keys"], batch["loss_weights"].tolist()):
            weights[(Path(key).parent.name, weight)] += 1
    assert weights == {("3_sks", 1.0): 6, ("1_dog", 0.25): 6}


def test_more_regularization_images_than_needed_are_cut(tmp_path):
    write_image(tmp_path / "train" / "2_sks" / "t.png")
    for i in range(5):
        write_image(tmp_path / "reg" / "1_dog" / f"r{i}.png")
    dataset = build_dataset(make_args(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg")))
    reg = [Path(item.path).name for item in dataset.datasets[0].items if item.subset.is_reg]
    assert reg == ["r0.png", "r1.png"]
    assert dataset.num_reg_images == 5  # counted before balancing, as sd-scripts' ss_num_reg_images


def test_corrupt_images_are_skipped_with_one_warning(tmp_path, caplog):
    folder = tmp_path / "1_x"
    write_image(folder / "good.png")
    (folder / "garbage.png").write_bytes(b"not an image at all")
    write_image(folder / "cut.png", size=(32, 32), color=(1, 2, 3), split_color=(250, 0, 90))
    data = (folder / "cut.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(make_args(train_data_dir=str(tmp_path)))
    assert [Path(item.path).name for item in dataset.datasets[0].items] == ["good.png"]
    warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "garbage.png" in warnings[0] and "cut.png" in warnings[0]


def test_all_images_corrupt_is_an_error(tmp_path):
    (tmp_path / "1_x").mkdir()
    (tmp_path / "1_x" / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(ValueError, match=r"no readable images found in .*1_x"):
        build_dataset(make_args(train_data_dir=str(tmp_path)))


# ------------------------------------------------------------------------------------------------- dataset_config


def test_dataset_config_precedence(tmp_path):
    write_image(tmp_path / "a" / "0.png")
    write_image(tmp_path / "b" / "0.png")
    config = write_dataset_config(tmp_path / "data.toml", f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".general"

[[datasets]]
resolution = [32, 48]
batch_size = 2
keep_tokens = 3

  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  keep_tokens = 2
  num_repeats = 4

  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  is_reg = true
""")
    args = make_args(dataset_config=str(config), keep_tokens=9, train_batch_size=7, caption_separator=";")
    [settings] = resolve_settings(load_dataset_config(config), args, str(config))
    assert settings.resolution == (32, 48)  # dataset beats the command line ("32")
    assert settings.batch_size == 2  # dataset beats --train_batch_size
    assert settings.min_bucket_reso == 16  # command line beats the default (256)
    first, second = settings.subsets
    assert first.keep_tokens == 2 and second.keep_tokens == 3  # subset beats dataset beats general and the CLI
    assert first.shuffle_caption and first.caption_extension == ".general"  # general beats the CLI (".txt")
    assert first.caption_separator == ";"  # the command line fills what the file does not set
    assert first.caption_dropout_rate == 0.0 and first.caption_prefix is None  # defaults
    assert (first.num_repeats, first.is_reg, second.num_repeats, second.is_reg) == (4, False, 1, True)


def test_several_datasets_keep_their_own_resolution_and_batch_size(tmp_path):
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.png")
        write_image(tmp_path / "b" / f"{i}.png")
    config = write_dataset_config(tmp_path / "two.toml", f"""
[[datasets]]
batch_size = 3
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
[[datasets]]
resolution = 16
  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  num_repeats = 2
""")
    dataset = build_dataset(make_args(dataset_config=str(config)))
    assert len(dataset) == 1 + 6  # 3 images in one batch of 3; 3 images x 2 repeats in batches of 1
    shapes = Counter(tuple(b["images"].shape) for b in all_batches(dataset))
    assert shapes == {(3, 3, 32, 32): 1, (1, 3, 16, 16): 6}
    assert dirs_info(dataset.datasets) == {"a": {"n_repeats": 1, "img_count": 3}, "b": {"n_repeats": 2, "img_count": 3}}


def test_dataset_config_overrides_train_data_dir(tmp_path, caplog):
    write_image(tmp_path / "imgs" / "0.png")
    config = write_dataset_config(tmp_path / "d.toml", one_subset_config(tmp_path / "imgs"))
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(make_args(dataset_config=str(config), train_data_dir=str(tmp_path / "elsewhere")))
    assert "ignoring --train_data_dir" in caplog.text
    assert [Path(i.path).name for i in dataset.datasets[0].items] == ["0.png"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nflip_augg = true\n",
         r"unknown key 'datasets\[0\]\.subsets\[0\]\.flip_augg'"),
        ("[general]\nbatch_size = 2\nsubsets = 3\n", r"unknown key 'general\.subsets'"),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n",
         r"'datasets\[0\]\.subsets\[0\]' has no 'image_dir' \(required\)"),
        ("[[datasets]]\nbatch_size = '2'\n[[datasets.subsets]]\nimage_dir = 'x'\n",
         r"key 'datasets\[0\]\.batch_size': expected int, got str '2'"),
        ("[general]\nflip_aug = 1\n", r"key 'general\.flip_aug': expected bool, got int 1"),
        ("[general]\ncaption_dropout_rate = 1.5\n", r"key 'general\.caption_dropout_rate'"),
        ("[general]\nresolution = [1, 2, 3]\n", r"key 'general\.resolution': expected an integer or \[width, height\]"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nsystem_prompt = 'y'\n",
         r"'datasets\[0\]\.subsets\[0\]\.system_prompt' is an sd-scripts option this trainer does not support"),
        # alpha_mask and conditioning_data_dir are subset-only keys, as in sd-scripts
        ("[[datasets]]\nalpha_mask = true\n[[datasets.subsets]]\nimage_dir = 'x'\n",
         r"unknown key 'datasets\[0\]\.alpha_mask'"),
        ("[general]\nconditioning_data_dir = 'm'\n", r"unknown key 'general\.conditioning_data_dir'"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nalpha_mask = 1\n",
         r"key 'datasets\[0\]\.subsets\[0\]\.alpha_mask': expected bool, got int 1"),
    ],
)
def test_dataset_config_errors_name_the_file_and_key(tmp_path, body, message):
    config = write_dataset_config(tmp_path / "bad.toml", body)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset_config(config)
    assert str(config) in str(info.value)


def test_dataset_config_without_resolution_is_an_error(tmp_path):
    write_image(tmp_path / "imgs" / "0.png")
    config = write_dataset_config(tmp_path / "d.toml", one_subset_config(tmp_path / "imgs"))
    with pytest.raises(ValueError, match=r"d\.toml: datasets\[0\] has no resolution"):
        build_dataset(make_args(dataset_config=str(config), resolution=None))


def test_dataset_config_missing_image_dir_names_it(tmp_path):
    config = write_dataset_config(tmp_path / "d.toml", one_subset_config(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=r"image_dir .*gone does not exist"):
        build_dataset(make_args(dataset_config=str(config)))


# --------------------------------------------------------------------------------------------- buckets and batches


@pytest.fixture
def mixed_aspect_dir(tmp_path):
    root = tmp_path / "train"
    sizes = [(32, 32)] * 3 + [(64, 32)] * 3 + [(32, 64)] * 2
    for i, size in enumerate(sizes):
        write_image(root / "2_thing" / f"{i}.png", size=size, color=(10 * i, 100, 200))
    return root


def bucket_args(root, **overrides):
    return make_args(train_data_dir=str(root), resolution="48", enable_bucket=True, min_bucket_reso=16,
                     max_bucket_reso=64, bucket_reso_steps=16, train_batch_size=2, **overrides)


def test_batches_come_from_one_bucket(mixed_aspect_dir):
    dataset = build_dataset(bucket_args(mixed_aspect_dir))
    buckets = {Path(item.path).name: item.bucket.bucket for item in dataset.datasets[0].items}
    # Resolution 48 (area 2304), sides 16..64 step 16 -> buckets 16x64, 32x64, 48x48, 64x16, 64x32 (w x h):
    # the square images are upscaled to 48x48, 64x32 and 32x64 have buckets of their own size.
    assert buckets == {"0.png": (48, 48), "1.png": (48, 48), "2.png": (48, 48), "3.png": (64, 32),
                       "4.png": (64, 32), "5.png": (64, 32), "6.png": (32, 64), "7.png": (32, 64)}
    # per bucket: 6, 6 and 4 images x repeats -> ceil(n/2) batches each
    assert len(dataset) == 3 + 3 + 2
    for batch in all_batches(dataset):
        keys = [Path(k).name for k in batch["image_keys"]]
        assert len({buckets[k] for k in keys}) == 1
        w, h = buckets[keys[0]]
        assert batch["images"].shape == (len(keys), 3, h, w)
        assert batch["target_sizes_hw"].tolist() == [[h, w]] * len(keys)


def test_epoch_order_is_deterministic_and_changes_per_epoch(mixed_aspect_dir):
    def order(seed, epoch):
        dataset = build_dataset(bucket_args(mixed_aspect_dir, seed=seed))
        dataset.set_current_epoch(epoch)
        return [tuple(b["image_keys"]) for b in all_batches(dataset)]

    first = order(1, 1)
    assert first == order(1, 1)
    assert first != order(1, 2)
    assert first != order(2, 1)
    expected = Counter({str(p): 2 for p in (mixed_aspect_dir / "2_thing").glob("*.png")})
    for keys in (first, order(1, 2)):
        assert Counter(k for batch in keys for k in batch) == expected  # every image x repeats, once per epoch


def test_persistent_workers_follow_set_current_epoch(mixed_aspect_dir):
    dataset = build_dataset(bucket_args(mixed_aspect_dir))
    expected = {}
    for epoch in (1, 2):
        dataset.set_current_epoch(epoch)
        expected[epoch] = [b["image_keys"] for b in all_batches(dataset)]
    dataset.set_current_epoch(1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=lambda b: b[0],
                                         num_workers=1, persistent_workers=True, multiprocessing_context="fork")
    seen = {}
    for epoch in (1, 2):
        dataset.set_current_epoch(epoch)
        seen[epoch] = [b["image_keys"] for b in loader]
    assert seen == expected


def test_batch_contract(tmp_path):
    write_image(tmp_path / "1_x" / "a.png", size=(48, 32))
    write_image(tmp_path / "1_x" / "b.png", size=(48, 32))
    dataset = build_dataset(make_args(train_data_dir=str(tmp_path), train_batch_size=2))
    batch = dataset[0]
    assert set(batch) == {"latents", "images", "captions", "loss_weights", "original_sizes_hw", "crop_top_lefts",
                          "target_sizes_hw", "image_keys", "loss_masks"}
    assert batch["latents"] is None and batch["loss_masks"] is None
    assert batch["images"].shape == (2, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert batch["captions"] == ["x", "x"]
    assert batch["loss_weights"].dtype == torch.float32 and batch["loss_weights"].tolist() == [1.0, 1.0]
    for key in ("original_sizes_hw", "crop_top_lefts", "target_sizes_hw"):
        assert batch[key].dtype == torch.long and batch[key].shape == (2, 2)
    assert sorted(Path(k).name for k in batch["image_keys"]) == ["a.png", "b.png"]
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]


@pytest.mark.parametrize("interpolation", [None, "lanczos"])
def test_sizes_and_pixels_of_a_resized_and_cropped_image(tmp_path, interpolation):
    # 96x64 (w x h) into a single 32x32 bucket: scale 0.5 -> 48x32, centre crop left (48 - 32) // 2 = 8.
    pixels = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    (tmp_path / "1_x").mkdir()
    Image.fromarray(pixels).save(tmp_path / "1_x" / "a.png")
    batch = build_dataset(make_args(train_data_dir=str(tmp_path), resize_interpolation=interpolation))[0]
    assert batch["original_sizes_hw"].tolist() == [[64, 96]]
    assert batch["crop_top_lefts"].tolist() == [[0, 8]]
    assert batch["target_sizes_hw"].tolist() == [[32, 32]]
    if interpolation is None:  # sd-scripts' default when shrinking: area, here the mean of each 2x2 block
        block_sums = pixels.astype(np.int64).reshape(32, 2, 48, 2, 3).sum(axis=(1, 3))
        reference = np.floor(block_sums / 4 + 0.5).astype(np.float32)
    else:
        reference = np.asarray(Image.fromarray(pixels).resize((48, 32), Image.Resampling.LANCZOS), dtype=np.float32)
    reference = torch.from_numpy(reference[:, 8:40] / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(batch["images"][0], reference)


def test_flip_aug_mirrors_some_images(tmp_path):
    pixels = write_image(tmp_path / "4_x" / "a.png", size=(32, 32), color=(255, 0, 0), split_color=(0, 0, 255))
    original = torch.from_numpy(pixels / 127.5 - 1).float().permute(2, 0, 1)
    dataset = build_dataset(make_args(train_data_dir=str(tmp_path), flip_aug=True))
    flips = []
    for epoch in range(1, 4):
        dataset.set_current_epoch(epoch)
        for batch in all_batches(dataset):
            image = batch["images"][0]
            is_flipped = torch.equal(image, torch.flip(original, dims=[2]))
            assert is_flipped or torch.equal(image, original)
            flips.append(is_flipped)
    assert any(flips) and not all(flips)


def test_random_crop_uses_varying_offsets(tmp_path):
    write_image(tmp_path / "4_x" / "a.png", size=(64, 32))
    dataset = build_dataset(make_args(train_data_dir=str(tmp_path), random_crop=True))
    lefts = {b["crop_top_lefts"][0, 1].item() for b in all_batches(dataset)}
    assert len(lefts) > 1 and all(0 <= left <= 32 for left in lefts)
    assert not dataset.is_latent_cacheable()


def test_verify_bucket_reso_steps(mixed_aspect_dir):
    dataset = build_dataset(bucket_args(mixed_aspect_dir))
    dataset.verify_bucket_reso_steps(16)
    with pytest.raises(ValueError, match="bucket_reso_steps is 16; it must be divisible by 64"):
        dataset.verify_bucket_reso_steps(64)


# ------------------------------------------------------------------------------------------------------- captions


def subset(**options):
    return SubsetSettings(image_dir="x", **options)


def test_shuffle_keeps_the_first_keep_tokens_in_place():
    caption = "sks, dog, red, sitting, grass"
    outputs = {process_caption(caption, subset(shuffle_caption=True, keep_tokens=1), random.Random(s), 1)
               for s in range(30)}
    assert len(outputs) > 5
    for output in outputs:
        tags = output.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(caption.split(", "))


def test_keep_tokens_separator_fixes_prefix_and_suffix():
    caption = "sks, dog ||| red, sitting, grass ||| best quality, masterpiece"
    options = subset(shuffle_caption=True, keep_tokens=3, keep_tokens_separator="|||")
    for seed in range(10):
        tags = process_caption(caption, options, random.Random(seed), 1).split(", ")
        assert tags[:2] == ["sks", "dog"] and tags[-2:] == ["best quality", "masterpiece"]
        assert sorted(tags[2:-2]) == ["grass", "red", "sitting"]


def test_caption_without_shuffle_is_unchanged_but_prefixed():
    options = subset(caption_prefix="photo of", caption_suffix="hd", secondary_separator=";;;")
    assert process_caption("a;;;b, c", options, random.Random(0), 1) == "photo of a,b, c hd"


def test_caption_dropout_rate_and_every_n_epochs():
    assert process_caption("a, b", subset(caption_dropout_rate=1.0), random.Random(0), 1) == ""
    every_2 = subset(caption_dropout_every_n_epochs=2)
    assert [process_caption("a, b", every_2, random.Random(0), e) for e in (1, 2, 3, 4)] == ["a, b", "", "a, b", ""]
    kept = sum(process_caption("a", subset(caption_dropout_rate=0.3), random.Random(s), 1) == "a" for s in range(2000))
    assert abs(kept / 2000 - 0.7) < 0.05


def test_tag_dropout_drops_only_flexible_tags():
    options = subset(caption_tag_dropout_rate=1.0, keep_tokens=1)
    assert process_caption("sks, a, b, c", options, random.Random(0), 1) == "sks"
    half = subset(caption_tag_dropout_rate=0.5)
    lengths = [len(process_caption("a, b, c, d", half, random.Random(s), 1).split(", ")) for s in range(1000)]
    assert abs(np.mean(lengths) - 2.0) < 0.15  # an empty caption splits to one "" entry; rare (1/16)


def test_token_warmup_starts_with_min_tokens():
    options = subset(token_warmup_min=1, token_warmup_step=10)
    assert process_caption("a, b, c, d, e", options, random.Random(0), 1, step=0) == "a"
    # step 5 of 10: floor(5 * (5 - 1) / 10) + 1 = 3 tags
    assert process_caption("a, b, c, d, e", options, random.Random(0), 1, step=5) == "a, b, c"
    fraction = subset(token_warmup_min=2, token_warmup_step=0.5)  # half of 20 steps = 10
    assert process_caption("a, b, c, d", fraction, random.Random(0), 1, step=0, max_train_steps=20) == "a, b"
    assert process_caption("a, b, c, d", fraction, random.Random(0), 1, step=10, max_train_steps=20) == "a, b, c, d"


def test_wildcards_pick_one_option_and_one_line():
    options = subset(enable_wildcard=True)
    outputs = {process_caption("a {red|blue} {{x}}\nb", options, random.Random(s), 1) for s in range(40)}
    assert outputs == {"a red {x}", "a blue {x}", "b"}


def test_shuffled_captions_reach_the_batches(tmp_path):
    write_image(tmp_path / "8_x" / "a.png")
    (tmp_path / "8_x" / "a.txt").write_text("sks, one, two, three", encoding="utf-8")
    dataset = build_dataset(make_args(train_data_dir=str(tmp_path), shuffle_caption=True, keep_tokens=1))
    captions = [b["captions"][0] for b in all_batches(dataset)]
    assert len(set(captions)) > 1 and all(c.startswith("sks, ") for c in captions)
    dataset.set_current_epoch(1)
    assert captions == [b["captions"][0] for b in all_batches(dataset)]  # same seed and epoch -> same captions


def test_dataset_repeats_fills_subsets_without_num_repeats(tmp_path):
    """sd-scripts maps --dataset_repeats to num_repeats for --dataset_config subsets that do not set it."""
    config = write_dataset_config(tmp_path / "repeats.toml", f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'

  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
  num_repeats = 2
""")
    [settings] = resolve_settings(load_dataset_config(config), make_args(dataset_repeats=5), str(config))
    assert [subset.num_repeats for subset in settings.subsets] == [5, 2]
    [settings] = resolve_settings(load_dataset_config(config), make_args(), str(config))  # no --dataset_repeats
    assert [subset.num_repeats for subset in settings.subsets] == [1, 2]


def test_dataset_repeats_counts_images_and_leaves_dreambooth_folders_alone(tmp_path):
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.png")
        write_image(tmp_path / "db" / "2_x" / f"{i}.png")
    config = write_dataset_config(tmp_path / "one.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = "
                                                         f"'{tmp_path / 'a'}'\n")
    assert build_dataset(make_args(dataset_config=str(config), dataset_repeats=4)).num_train_images == 12
    # DreamBooth folders carry their repeats in the name, as in sd-scripts
    assert build_dataset(make_args(train_data_dir=str(tmp_path / "db"), dataset_repeats=4)).num_train_images == 6


def test_face_crop_aug_range_and_resize_interpolation_from_toml(tmp_path):
    config = write_dataset_config(tmp_path / "keys.toml", f"""
[general]
resize_interpolation = "box"
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  face_crop_aug_range = [2.0, 4.0]
  resize_interpolation = "lanczos"

  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
""")
    [settings] = resolve_settings(load_dataset_config(config), make_args(), str(config))
    first, second = settings.subsets
    assert first.face_crop_aug_range == (2.0, 4.0) and second.face_crop_aug_range is None
    assert (first.resize_interpolation, second.resize_interpolation) == ("lanczos", "box")
    bad = write_dataset_config(tmp_path / "bad.toml", f"[general]\nresize_interpolation = 'sinc'\n[[datasets]]\n"
                                                     f"[[datasets.subsets]]\nimage_dir = '{tmp_path}'\n")
    with pytest.raises(ValueError, match=r"key 'general.resize_interpolation': expected one of lanczos, .*'sinc'"):
        load_dataset_config(bad)


@pytest.mark.parametrize("enable_bucket", [False, True])
def test_face_crop_aug_range_is_an_error_without_buckets_and_warned_with_them(tmp_path, caplog, enable_bucket):
    write_image(tmp_path / "a" / "0.png")
    config = write_dataset_config(tmp_path / "face.toml", f"[[datasets]]\nenable_bucket = {str(enable_bucket).lower()}"
                                                          f"\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\n"
                                                          "face_crop_aug_range = [2.0, 4.0]\n")
    if not enable_bucket:
        with pytest.raises(ValueError, match="face_crop_aug_range .*: face-centred crops are not implemented"):
            build_dataset(make_args(dataset_config=str(config)))
        return
    with caplog.at_level(logging.WARNING):
        build_dataset(make_args(dataset_config=str(config)))
    assert "face_crop_aug_range (subset" in caplog.text and "has no effect with enable_bucket" in caplog.text
