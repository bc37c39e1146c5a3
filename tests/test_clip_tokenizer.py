"""CLIP's tokenizer built from the bundled BPE merges gives ``openai/clip-vit-large-patch14``'s ids.

The pinned ids were computed with OpenAI's own reference tokenizer (``clip/simple_tokenizer.py`` of the CLIP
release, with ftfy) on the unmodified ``bpe_simple_vocab_16e6.txt.gz``; "a photo of a cat" is the example the
model card and the issue quote.
"""

from __future__ import annotations

import pytest

from library import clip_tokenizer

BOS, EOS = 49406, 49407

PINNED = {
    "a photo of a cat": [320, 1125, 539, 320, 2368],
    "A Photo of a CAT!!": [320, 1125, 539, 320, 2368, 748],
    "1girl, solo, 2024 masterpiece": [272, 1611, 267, 5797, 267, 273, 271, 273, 275, 12066],
    "café naïve résumé": [15304, 1097, 35689, 563, 29106, 7054, 4166],
    "sks dog, (best quality:1.2)": [48136, 1929, 267, 263, 949, 3027, 281, 272, 269, 273, 264],
    "東京の夜景 🌃 night": [48338, 21078, 105, 21575, 23170, 250, 48132, 363, 1576, 481, 930],
    "don't stop, it's 3.14": [847, 713, 1691, 267, 585, 568, 274, 269, 272, 275],
    "hello   world\tnew\nline": [3306, 1002, 686, 1148],
    "a_b-c/d:e;f": [320, 318, 321, 268, 322, 270, 323, 281, 324, 282, 325],
}


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer.build_clip_tokenizer()


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return clip_tokenizer.build_open_clip_tokenizer()


@pytest.mark.parametrize("text", sorted(PINNED))
def test_ids_match_openai_clip(tokenizer, text: str) -> None:
    assert tokenizer(text).input_ids == [BOS, *PINNED[text], EOS]


def test_vocabulary_layout(tokenizer) -> None:
    assert len(tokenizer) == clip_tokenizer.VOCAB_SIZE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert tokenizer.convert_ids_to_tokens([0, 255, 256, 320, 49405]) == ["!", "Ń", "!</w>", "a</w>", "jekyll</w>"]
    assert tokenizer.model_max_length == 77


def test_sd_padding_and_truncation(tokenizer) -> None:
    """How the trainer calls it (``library.text_encoding.tokenize``): 77 ids, EOS padding, EOS kept at the end."""
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == [BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71
    long_text = " ".join(["cat"] * 100)
    ids = tokenizer(long_text, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == BOS and ids[-1] == EOS and ids[1:-1] == [2368] * 75


def test_open_clip_pads_with_exclamation_mark(open_clip_tokenizer) -> None:
    """SD 2.x's tokenizer and SDXL's second pad with "!" (id 0) after the EOS, as sd-scripts' do."""
    assert open_clip_tokenizer.pad_token == "!" and open_clip_tokenizer.pad_token_id == 0
    ids = open_clip_tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids == [BOS, 320, 1125, 539, 320, 2368, EOS] + [0] * 70
    # "!" is then a special token, so a "!" in a caption is id 0 rather than CLIP's 256 ("!</w>"): what
    # transformers does with these tokenizers' "!" pad token, in sd-scripts too.
    assert open_clip_tokenizer("a cat!").input_ids == [BOS, 320, 2368, 0, EOS]


def test_decode_round_trip(tokenizer) -> None:
    ids = tokenizer("a photo of a cat, 2 dogs").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat , 2 dogs"
