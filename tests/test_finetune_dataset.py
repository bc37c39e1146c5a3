"""Fine-tuning datasets (``--in_json``, ``metadata_file``): image keys, captions and tags, train_resolution buckets,
sd-scripts' .npz latents, DreamBooth and fine-tuning datasets in one config, and the ss_* metadata they give."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import parser_args  # tests/helpers.py
from library.dataset import build_dataset
from library.dataset_config import load_dataset_config
from library.metadata import bucket_info, dirs_info, tag_frequency
from library.finetune_dataset import caption_and_tags
from library.metadata import dataset_metadata

BASE_ARGS = dict(resolution="32", seed=42, caption_extension=".txt", min_bucket_reso=16, max_bucket_reso=64,
                 bucket_reso_steps=16, dataset_repeats=1)


def make_args(**overrides):
    """The parser's defaults (tests/helpers.py) with these tests' small images and buckets."""
    return parser_args(**{**BASE_ARGS, **overrides})


def write_image(path: Path, size=(32, 32), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_json(path: Path, metadata: dict) -> Path:
    path.write_text(json.dumps(metadata), encoding="utf-8")
    return path


def all_batches(dataset):
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture
def finetune_dir(tmp_path):
    """Images as merge_captions_to_metadata.py keys them: by stem in image_dir, one by full path, one by name."""
    images = tmp_path / "images"
    write_image(images / "a.png")
    write_image(images / "b.jpg")
    write_image(images / "c.png")
    absolute = write_image(tmp_path / "elsewhere" / "d.png")
    metadata = {
        "a": {"caption": "a photo of sks", "tags": "red, square"},
        "b": {"tags": "blue, Circle"},
        "c.png": {},
        str(absolute): {"caption": "the other one"},
    }
    return images, write_json(tmp_path / "meta_cap.json", metadata), absolute


def test_in_json_gives_captions_tags_and_paths_from_the_metadata(finetune_dir):
    images, metadata_file, absolute = finetune_dir
    dataset = build_dataset(make_args(in_json=str(metadata_file), train_data_dir=str(images), dataset_repeats=3))
    items = {item.path: item for item in dataset.datasets[0].items}
    assert items == {
        str(images / "a.png"): items[str(images / "a.png")],
        str(images / "b.jpg"): items[str(images / "b.jpg")],
        str(images / "c.png"): items[str(images / "c.png")],
        str(absolute): items[str(absolute)],
    }
    captions = {Path(path).name: item.caption for path, item in items.items()}
    # sd-scripts: caption + caption_separator + tags; tags alone without a caption; "" with neither
    assert captions == {"a.png": "a photo of sks,red, square", "b.jpg": "blue, Circle", "c.png": "",
                        "d.png": "the other one"}
    assert {item.num_repeats for item in items.values()} == {3}
    assert dataset.num_train_images == 12 and len(dataset) == 12
    assert dirs_info(dataset.datasets) == {"meta_cap.json": {"n_repeats": 3, "img_count": 4}}
    # only the tags of entries that also have a caption are counted, as sd-scripts does
    assert tag_frequency(dataset.datasets) == {"meta_cap.json": {"red": 1, "square": 1}}
    captions_in_batches = sorted(c for batch in all_batches(dataset) for c in batch["captions"])
    assert captions_in_batches == sorted(list(captions.values()) * 3)


def test_caption_and_tags_with_wildcards_add_the_tags_to_every_line():
    caption, counted = caption_and_tags({"caption": "one\ntwo\n", "tags": "x\ny"}, ",", enable_wildcard=True)
    assert caption == "one,x,y\ntwo,x,y" and counted is None


def test_train_resolution_is_the_bucket_and_turns_bucketing_on(tmp_path, caplog):
    images = tmp_path / "images"
    write_image(images / "wide.png", size=(60, 30))
    write_image(images / "tall.png", size=(30, 50))
    metadata_file = write_json(tmp_path / "meta.json", {
        "wide": {"caption": "wide", "train_resolution": [64, 32]},
        "tall": {"caption": "tall", "train_resolution": [32, 48]},
    })
    with caplog.at_level(logging.INFO):
        dataset = build_dataset(make_args(in_json=str(metadata_file), train_data_dir=str(images)))
    assert dataset.datasets[0].settings.enable_bucket
    shapes = {batch["captions"][0]: tuple(batch["images"].shape) for batch in all_batches(dataset)}
    assert shapes == {"wide": (1, 3, 32, 64), "tall": (1, 3, 48, 32)}
    sizes = {batch["captions"][0]: batch["original_sizes_hw"][0].tolist() for batch in all_batches(dataset)}
    assert sizes == {"wide": [30, 60], "tall": [50, 30]}
    assert bucket_info(dataset.datasets)["buckets"] == {"0": {"resolution": [32, 48], "count": 1},
                                               "1": {"resolution": [64, 32], "count": 1}}


def test_without_train_resolution_everywhere_the_usual_buckets_are_used(tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png", size=(64, 32))
    write_image(images / "b.png", size=(32, 32))
    metadata_file = write_json(tmp_path / "meta.json", {"a": {"train_resolution": [48, 48]}, "b": {}})
    dataset = build_dataset(make_args(in_json=str(metadata_file), train_data_dir=str(images)))
    assert {tuple(batch["images"].shape) for batch in all_batches(dataset)} == {(1, 3, 32, 32)}


def write_npz(path: Path, latents: np.ndarray, flipped: np.ndarray | None = None) -> None:
    arrays = {"latents": latents, "original_size": np.array([40, 24]), "crop_ltrb": np.array([0, 0, 32, 16])}
    if flipped is not None:
        arrays["latents_flipped"] = flipped
    np.savez(path, **arrays)


def test_npz_latents_of_prepare_buckets_latents_are_used_without_cache_latents(tmp_path):
    images = tmp_path / "images"
    write_image(images / "a.png", size=(40, 24))
    rng = np.random.default_rng(0)
    latents_a, flipped_a = rng.standard_normal((2, 4, 2, 4), dtype=np.float32)
    latents_b = rng.standard_normal((4, 2, 4), dtype=np.float32)
    write_npz(images / "a.npz", latents_a, flipped_a)
    write_npz(images / "b.npz", latents_b)  # latents only: the image is not there
    np.savez(images / "b_flip.npz", latents=latents_b[..., ::-1].copy())  # the older separate flipped file
    metadata_file = write_json(tmp_path / "meta.json", {
        "a": {"caption": "a", "train_resolution": [32, 16]},
        "b": {"caption": "b", "train_resolution": [32, 16]},
    })
    dataset = build_dataset(make_args(in_json=str(metadata_file), train_data_dir=str(images), flip_aug=True,
                                      dataset_repeats=8))
    seen = {"a": [], "b": []}
    for batch in all_batches(dataset):
        assert batch["images"] is None
        seen[batch["captions"][0]].append(batch["latents"][0])
    for name, plain, flipped in (("a", latents_a, flipped_a), ("b", latents_b, latents_b[..., ::-1])):
        kinds = {("plain" if torch.equal(t, torch.from_numpy(plain)) else
                  "flipped" if torch.equal(t, torch.from_numpy(flipped.copy())) else "other") for t in seen[name]}
        assert kinds == {"plain", "flipped"}, name  # 8 repeats: both occur (fixed seed)
    assert sorted(Path(item.path).name for item in dataset.datasets[0].items) == ["a.png", "b.npz"]


def test_npz_latents_that_do_not_fit_are_ignored_and_images_used(tmp_path, caplog):
    images = tmp_path / "images"
    write_image(images / "a.png", size=(32, 16))
    write_npz(images / "a.npz", np.zeros((4, 4, 4), dtype=np.float32))  # 32x32 latents for a 32x16 bucket
    metadata_file = write_json(tmp_path / "meta.json", {"a": {"caption": "a", "train_resolution": [32, 16]}})
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(make_args(in_json=str(metadata_file), train_data_dir=str(images)))
    assert "are not used" in caplog.text
    batch = dataset[0]
    assert batch["latents"] is None and tuple(batch["images"].shape) == (1, 3, 16, 32)


def test_dreambooth_and_finetuning_datasets_in_one_config(tmp_path):
    write_image(tmp_path / "db" / "x.png")
    (tmp_path / "db" / "x.txt").write_text("sks dog", encoding="utf-8")
    write_image(tmp_path / "ft" / "y.png")
    metadata_file = write_json(tmp_path / "ft_meta.json", {"y": {"caption": "fine", "tags": "tuned"}})
    config = tmp_path / "d.toml"
    config.write_text(
        "[general]\nshuffle_caption = false\n"
        f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'db'}'\nnum_repeats = 2\n"
        f"[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\nmetadata_file = '{metadata_file}'\n"
        f"image_dir = '{tmp_path / 'ft'}'\nnum_repeats = 3\n",
        encoding="utf-8",
    )
    args = make_args(dataset_config=str(config), train_batch_size=1, color_aug=False, flip_aug=False,
                     random_crop=False, shuffle_caption=False, keep_tokens=0)
    dataset = build_dataset(args)
    assert [len(d.items) for d in dataset.datasets] == [1, 1]
    captions = sorted(c for batch in all_batches(dataset) for c in batch["captions"])
    assert captions == ["fine,tuned"] * 3 + ["sks dog"] * 2
    meta = dataset_metadata(args, dataset, total_batch_size=1)
    described = json.loads(meta["ss_datasets"])
    assert [d["is_dreambooth"] for d in described] == [True, False]
    assert described[1]["subsets"][0]["metadata_file"] == "ft_meta.json"
    assert described[1]["subsets"][0]["image_dir"] == "ft"
    assert "class_tokens" not in described[1]["subsets"][0] and "is_reg" not in described[1]["subsets"][0]
    assert json.loads(meta["ss_dataset_dirs"]) == {"db": {"n_repeats": 2, "img_count": 1},
                                                   "ft_meta.json": {"n_repeats": 3, "img_count": 1}}
    assert json.loads(meta["ss_tag_frequency"]) == {"db": {"sks dog": 1}, "ft_meta.json": {"tuned": 1}}


def test_in_json_metadata_is_sd_scripts_flat_layout(finetune_dir):
    images, metadata_file, _ = finetune_dir
    args = make_args(in_json=str(metadata_file), train_data_dir=str(images), color_aug=False, flip_aug=False,
                     random_crop=False, shuffle_caption=False, keep_tokens=0)
    meta = dataset_metadata(args, build_dataset(args), total_batch_size=1)
    assert json.loads(meta["ss_dataset_dirs"]) == {"meta_cap.json": {"n_repeats": 1, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {}
    assert json.loads(meta["ss_tag_frequency"]) == {"meta_cap.json": {"red": 1, "square": 1}}


@pytest.mark.parametrize(
    ("subsets", "message"),
    [
        ("[[datasets.subsets]]\nimage_dir = 'x'\n[[datasets.subsets]]\nmetadata_file = 'm.json'\n",
         r"datasets\[0\] mixes subsets with and without metadata_file"),
        ("[[datasets.subsets]]\nmetadata_file = 'm.json'\nclass_tokens = 'sks'\n",
         r"'datasets\[0\]\.subsets\[0\]': class_tokens cannot be used with metadata_file"),
        ("[[datasets.subsets]]\nmetadata_file = 3\n", r"key 'datasets\[0\]\.subsets\[0\]\.metadata_file'"),
    ],
)
def test_dataset_config_errors_for_finetuning_subsets(tmp_path, subsets, message):
    config = tmp_path / "bad.toml"
    config.write_text("[[datasets]]\n" + subsets, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_dataset_config(config)
    assert str(config) in str(info.value)


@pytest.mark.parametrize(
    ("metadata", "error", "message"),
    [
        ({"missing": {"caption": "x"}}, FileNotFoundError, r"meta\.json: no image or \.npz latents for key 'missing'"),
        ({"a": "just a caption"}, ValueError, r"meta\.json: entry 'a' is str, expected an object"),
        ({"a": {"train_resolution": [32]}}, ValueError, r"meta\.json: 'a'\.train_resolution must be \[width, height\]"),
        ({"a": {"caption": ["x"]}}, ValueError, r"meta\.json: 'a'\.caption must be a string"),
        ([1, 2], ValueError, r"meta\.json: expected an object"),
    ],
)
def test_bad_metadata_is_an_error_naming_the_file_and_key(tmp_path, metadata, error, message):
    write_image(tmp_path / "images" / "a.png")
    metadata_file = write_json(tmp_path / "meta.json", metadata)
    with pytest.raises(error, match=message):
        build_dataset(make_args(in_json=str(metadata_file), train_data_dir=str(tmp_path / "images")))


def test_missing_metadata_file_and_bucket_no_upscale_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata file .*nope\.json not found"):
        build_dataset(make_args(in_json=str(tmp_path / "nope.json")))
    write_image(tmp_path / "images" / "a.png")
    metadata_file = write_json(tmp_path / "meta.json", {"a": {"train_resolution": [32, 32]}})
    with pytest.raises(ValueError, match="bucket_no_upscale cannot be used"):
        build_dataset(make_args(in_json=str(metadata_file), train_data_dir=str(tmp_path / "images"),
                                enable_bucket=True, bucket_no_upscale=True))
