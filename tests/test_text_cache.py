"""Text-encoder output cache: captions encoded once, in memory or in ``<stem>_te_outputs.npz`` files reused only when
caption and settings match."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from library.text_cache import (
    FINGERPRINT_KEY,
    CacheEntry,
    build_text_cache,
    cache_fingerprint,
    te_outputs_npz_path,
)

KEYS = ("hidden_state1", "hidden_state2", "pool2")


class FakeEncoder:
    """Deterministic per-caption outputs (a function of the caption's characters); records every call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    @staticmethod
    def single(caption: str) -> dict[str, torch.Tensor]:
        codes = torch.tensor([float(ord(c)) for c in caption.ljust(6)[:6]])
        return {
            "hidden_state1": codes.reshape(2, 3),
            "hidden_state2": -codes.reshape(2, 3) / 7,
            "pool2": codes[:4] + len(caption),
        }

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls.append(list(captions))
        outputs = [self.single(c) for c in captions]
        return {key: torch.stack([o[key] for o in outputs]) for key in KEYS}


@pytest.fixture
def images(tmp_path) -> list[CacheEntry]:
    """Four images (only their paths matter), two sharing a caption."""
    captions = ["a red dog", "a blue cat", "a red dog", "sks shape"]
    entries = []
    for index, caption in enumerate(captions):
        path = tmp_path / f"img{index}.png"
        path.write_bytes(b"not read")
        entries.append(CacheEntry(str(path), caption))
    return entries


def test_memory_cache_encodes_each_caption_once_and_stacks_batches(images):
    encoder = FakeEncoder()
    cache = build_text_cache(images, encoder, KEYS, "settings", to_disk=False, batch_size=2)
    assert sorted(c for call in encoder.calls for c in call) == ["a blue cat", "a red dog", "sks shape"]
    assert [len(call) for call in encoder.calls] == [2, 1]
    batch = cache.lookup(["sks shape", "a red dog"], "cpu")
    for key in KEYS:
        expected = torch.stack([FakeEncoder.single("sks shape")[key], FakeEncoder.single("a red dog")[key]])
        torch.testing.assert_close(batch[key], expected, rtol=0, atol=0)
    assert not list(Path(images[0].image_path).parent.glob("*.npz"))


def test_unknown_caption_is_an_error_naming_it(images):
    cache = build_text_cache(images, FakeEncoder(), KEYS, "settings", to_disk=False)
    with pytest.raises(KeyError, match="'a green bird' has no cached text-encoder outputs"):
        cache.lookup(["a green bird"], "cpu")


def test_disk_cache_writes_sd_scripts_named_files(images):
    cache = build_text_cache(images, FakeEncoder(), KEYS, "settings", to_disk=True, batch_size=3)
    folder = Path(images[0].image_path).parent
    assert sorted(p.name for p in folder.glob("*.npz")) == [f"img{i}_te_outputs.npz" for i in range(4)]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left
    with np.load(te_outputs_npz_path(images[1].image_path)) as data:
        assert set(data.files) == set(KEYS) | {FINGERPRINT_KEY}
        np.testing.assert_array_equal(data["pool2"], FakeEncoder.single("a blue cat")["pool2"].numpy())
        assert str(data[FINGERPRINT_KEY]) == cache_fingerprint("a blue cat", "settings")
    assert not cache.in_memory  # only caption → file is kept
    torch.testing.assert_close(cache.lookup(["a blue cat"], "cpu")["hidden_state2"][0],
                               FakeEncoder.single("a blue cat")["hidden_state2"])


def test_disk_cache_is_reused_only_for_the_same_caption_and_settings(images):
    build_text_cache(images, FakeEncoder(), KEYS, "settings", to_disk=True)

    again = FakeEncoder()
    build_text_cache(images, again, KEYS, "settings", to_disk=True)
    assert again.calls == []

    changed = [CacheEntry(images[0].image_path, "a new caption")] + images[1:]
    recaptioned = FakeEncoder()
    cache = build_text_cache(changed, recaptioned, KEYS, "settings", to_disk=True)
    assert recaptioned.calls == [["a new caption"]]
    torch.testing.assert_close(cache.lookup(["a new caption"], "cpu")["pool2"][0],
                               FakeEncoder.single("a new caption")["pool2"])

    other_settings = FakeEncoder()
    build_text_cache(changed, other_settings, KEYS, "max_token_length=150", to_disk=True)
    assert sorted(c for call in other_settings.calls for c in call) == ["a blue cat", "a new caption", "a red dog",
                                                                         "sks shape"]


def test_sd_scripts_file_without_fingerprint_is_recomputed_unless_skip_cache_check(images):
    entry = images[:1]
    path = te_outputs_npz_path(entry[0].image_path)
    np.savez(path, **{key: np.zeros((1,), np.float32) for key in KEYS})

    trusted = FakeEncoder()
    build_text_cache(entry, trusted, KEYS, "settings", to_disk=True, skip_cache_check=True)
    assert trusted.calls == []

    checked = FakeEncoder()
    build_text_cache(entry, checked, KEYS, "settings", to_disk=True)
    assert checked.calls == [["a red dog"]]
    with np.load(path) as data:
        assert FINGERPRINT_KEY in data.files


def test_damaged_cache_file_is_an_error_naming_it(images):
    cache = build_text_cache(images[:1], FakeEncoder(), KEYS, "settings", to_disk=True)
    path = te_outputs_npz_path(images[0].image_path)
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=f"{path.name} is unreadable or incomplete"):
        cache.lookup(["a red dog"], "cpu")


def test_encoder_missing_a_key_and_bad_batch_size_are_errors(images):
    def no_pool(captions):
        return {key: value for key, value in FakeEncoder()(captions).items() if key != "pool2"}

    with pytest.raises(KeyError, match="gave no pool2"):
        build_text_cache(images, no_pool, KEYS, "settings", to_disk=False)
    with pytest.raises(ValueError, match="batch size must be >= 1, got 0"):
        build_text_cache(images, FakeEncoder(), KEYS, "settings", to_disk=False, batch_size=0)
