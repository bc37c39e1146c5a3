"""Prompt-weight syntax (library/prompt_weights.py): the parser against weights worked out by hand from the rules,
the token layouts, and the two ways of applying weights against direct loops over hidden states."""

from __future__ import annotations

import pytest
import torch

from library.dataset_config import SubsetSettings
from library.prompt_weights import (
    PromptWeightError,
    apply_token_weights,
    apply_weights_keep_mean,
    check_dataset_captions,
    check_prompt,
    long_prompt_ids_and_weights,
    long_prompt_windows,
    parse_prompt_weights,
    tokenize_with_weights,
)
from library.tiny_models import build_tokenizer

R = 1.1  # (x)
S = 1 / 1.1  # [x]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", [("plain text", 1.0)]),
        ("", [("", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
        ("a [small] dog", [("a ", 1.0), ("small", S), (" dog", 1.0)]),
        ("(red:1.5) ball", [("red", 1.5), (" ball", 1.0)]),
        ("(red:-0.5)", [("red", -0.5)]),
        ("(red:.5)", [("red", 0.5)]),
        # nesting multiplies: ((x)) = 1.1², ((x):2) = 1.1·2, [(x)] = 1.1/1.1
        ("((cat))", [("cat", R * R)]),
        ("((cat):2)", [("cat", R * 2)]),
        ("[[cat]]", [("cat", S * S)]),
        # an unclosed bracket reaches to the end; a stray closing bracket is text
        ("(unbalanced", [("unbalanced", R)]),
        ("[a b", [("a b", S)]),
        ("a) b]", [("a) b]", 1.0)]),
        # equal neighbouring weights are joined
        ("(a)(b)", [("ab", R)]),
        # escapes are literal characters; a backslash before anything else is dropped
        (r"\(literal\]", [("(literal]", 1.0)]),
        (r"a\\b", [("a\\b", 1.0)]),
        (r"a\b", [("ab", 1.0)]),
        (r"(x \(y\))", [("x (y)", R)]),
        # colons outside an open '(' are text, even when a weight follows
        ("score: 9, (good)", [("score: 9, ", 1.0), ("good", R)]),
        ("smile:1.2) face", [("smile:1.2) face", 1.0)]),
        # BREAK and [a:b:n] editing are plain text for sd-scripts' training
        ("a BREAK b", [("a BREAK b", 1.0)]),
        ("[cat:dog:5]", [("cat:dog:5", S)]),
        # the mixed example: house (((…:1.3)) keeps one '(' open to the end
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * R * R),
                (" ", R),
                ("on", S * R),
                (" a ", R),
                ("hill", 0.5 * R),
                (", sun, ", R),
                ("sky", R**4),
                (".", R),
            ],
        ),
    ],
)
def test_parser_weights_match_hand_computed_values(text, expected):
    runs = parse_prompt_weights(text, strict=True)
    assert [run for run, _ in runs] == [run for run, _ in expected]
    assert [weight for _, weight in runs] == pytest.approx([weight for _, weight in expected])


@pytest.mark.parametrize("weight", ["abc", "", " 1.2", "1.2.3", ".", "1,5"])
def test_malformed_weight_is_an_error_when_strict_and_text_otherwise(weight):
    text = f"(word:{weight}) end"
    with pytest.raises(ValueError, match=r"malformed weight ':" + weight.replace(".", r"\.") + r"\)'"):
        check_prompt(text)
    # lenient (training): sd-scripts reads it as text inside a ×1.1 bracket
    assert parse_prompt_weights(text) == [("word:" + weight, pytest.approx(R)), (" end", 1.0)]


def test_check_reads_the_caption_as_written():
    check_prompt("(a:abc")  # no closing bracket: no weight at all
    check_prompt("tag:abc), (other")  # no '(' open before ':abc)'
    with pytest.raises(ValueError, match="malformed weight"):
        check_prompt("x, ((tag:abc), (other:1.2))")


def test_training_layout_puts_bos_tokens_eos_pad_and_weights_in_place():
    tokenizer = build_tokenizer()
    ids, weights = tokenize_with_weights(tokenizer, ["a (red:1.5) [dog]", ""], None)
    assert ids.shape == weights.shape == (2, 77)
    red = tokenizer("red").input_ids[1:-1]
    dog = tokenizer("dog").input_ids[1:-1]
    a = tokenizer("a ").input_ids[1:-1]
    n = len(a) + len(red) + len(dog)
    assert ids[0, : n + 2].tolist() == [tokenizer.bos_token_id, *a, *red, *dog, tokenizer.eos_token_id]
    assert (ids[0, n + 2 :] == tokenizer.pad_token_id).all()
    expected = [1.0] + [1.0] * len(a) + [1.5] * len(red) + [S] * len(dog) + [1.0] * (77 - 1 - n)
    assert weights[0].tolist() == pytest.approx(expected)
    assert ids[1, :2].tolist() == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert (weights[1] == 1.0).all()


def test_training_layout_of_a_plain_caption_equals_the_unweighted_tokenization():
    from library.text_encoding import tokenize

    tokenizer = build_tokenizer()
    captions = ["a photo of a red dog", "sks " * 100]
    ids, weights = tokenize_with_weights(tokenizer, captions, 150)
    assert torch.equal(ids, tokenize(tokenizer, captions, 150))
    assert (weights == 1.0).all()


def test_token_weights_scale_each_hidden_state_and_nothing_else():
    hidden = torch.randn(2, 5, 3)
    weights = torch.tensor([[1.0, 2.0, 0.5, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 3.0]])
    out = apply_token_weights(hidden, weights)
    for b in range(2):
        for t in range(5):
            assert torch.allclose(out[b, t], hidden[b, t] * weights[b, t].item())


def test_keep_mean_weighting_matches_a_direct_loop():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 4) + 0.3
    weights = torch.tensor([[1.0, 1.2, 1.2, 0.8, 1.0, 1.0], [1.0] * 6])
    out = apply_weights_keep_mean(hidden, weights)
    for b in range(2):
        total_before = sum(hidden[b, t, d].item() for t in range(6) for d in range(4))
        scaled = [[hidden[b, t, d].item() * weights[b, t].item() for d in range(4)] for t in range(6)]
        total_after = sum(sum(row) for row in scaled)
        for t in range(6):
            for d in range(4):
                assert out[b, t, d].item() == pytest.approx(scaled[t][d] * total_before / total_after, rel=1e-5)
        assert out[b].mean().item() == pytest.approx(hidden[b].mean().item(), rel=1e-5)
    assert torch.equal(out[1], hidden[1])  # all weights 1: unchanged


def test_long_prompt_layout_gives_every_window_its_own_bos_and_eos_weight():
    tokenizer = build_tokenizer()
    long_text = "(" + "red " * 80 + ":2)"
    n_red = len(tokens := tokenizer("red " * 80).input_ids[1:-1])
    assert n_red > 75
    n = long_prompt_windows(tokenizer, [long_text, "blurry"])
    assert n == 2
    ids, weights = long_prompt_ids_and_weights(tokenizer, [long_text, "blurry"], n)
    assert ids.shape == (2, 152) and weights.shape == (2, 154)
    assert ids[0, 1 : 1 + n_red].tolist() == tokens
    expected = torch.ones(154)
    expected[1:76] = 2.0  # window 0: BOS, 75 weighted tokens, EOS
    expected[78 : 78 + n_red - 75] = 2.0  # window 1: BOS, the rest, EOS and padding
    assert torch.equal(weights[0], expected)
    assert (weights[1] == 1.0).all()
    assert long_prompt_windows(tokenizer, ["a", ""]) == 1
    assert long_prompt_windows(tokenizer, ["word " * 400]) == 3


def test_dataset_check_names_the_caption_file(tmp_path):
    from types import SimpleNamespace

    image = tmp_path / "img.png"
    image.write_bytes(b"")
    (tmp_path / "img.txt").write_text("a (dog:abc)", encoding="utf-8")
    subset = SubsetSettings(image_dir=str(tmp_path), caption_extension=".txt")
    item = SimpleNamespace(path=str(image), caption="a (dog:abc)", subset=subset)
    dataset = SimpleNamespace(datasets=[SimpleNamespace(subsets=[subset], items=[item])])
    with pytest.raises(PromptWeightError, match=r"caption 'a \(dog:abc\)' in .*img\.txt: malformed weight ':abc\)'"):
        check_dataset_captions(dataset)
    item.caption = "a (dog:1.3)"
    check_dataset_captions(dataset)
    subset.caption_suffix = "(style:x)"
    with pytest.raises(PromptWeightError, match="caption_suffix of"):
        check_dataset_captions(dataset)
