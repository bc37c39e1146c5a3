"""--weighted_captions on the tiny models: the weighted text conditioning of SD 1.x and SDXL against the unweighted
hidden states scaled token by token in a loop, sampling with a weighted prompt against the long-prompt pipeline's
weighting done by hand, and end-to-end runs (SD 1.x, SDXL with cached text-encoder outputs, a malformed weight)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library import sampling
from library.models import load_embedded
from library.sampling import SamplePrompt
from library.sdxl import encode_sdxl_text
from library.text_encoding import encode_sd_text, final_layer_norm, tokenize
from shape_images import write_shape_images  # tests/shape_images.py

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd1():
    return load_embedded("tiny-sd1")


@pytest.fixture(scope="module")
def sdxl():
    return load_embedded("tiny-sdxl")


def token_positions(tokenizer, plain: str, word: str, max_token_length: int | None) -> list[int]:
    """Positions of ``word``'s tokens in the unweighted ids of ``plain`` (found by scanning the ids)."""
    ids = tokenize(tokenizer, [plain], max_token_length)[0].tolist()
    word_ids = tokenizer(word).input_ids[1:-1]
    starts = [i for i in range(len(ids)) if ids[i : i + len(word_ids)] == word_ids]
    return [start + k for start in starts for k in range(len(word_ids))]


def scaled_by_loop(hidden: torch.Tensor, positions: list[int], factor: float) -> torch.Tensor:
    expected = hidden.clone()
    for position in positions:
        expected[0, position] = hidden[0, position] * factor
    return expected


@pytest.mark.parametrize(("max_token_length", "clip_skip"), [(None, None), (None, 2), (150, None)])
def test_sd_weighted_hidden_states_are_the_plain_ones_scaled_at_the_word(sd1, max_token_length, clip_skip):
    # with 150 tokens the weighted word sits in the second 75-token window
    filler = "dog " * 80 if max_token_length else "a photo of a "
    weighted, plain = filler + "(red:1.5) circle", filler + "red circle"
    encoder, tokenizer = sd1.text_encoders[0], sd1.tokenizers[0]
    with torch.no_grad():
        out = encode_sd_text(encoder, tokenizer, [weighted], max_token_length, clip_skip, "cpu", weighted=True)
        ref = encode_sd_text(encoder, tokenizer, [plain], max_token_length, clip_skip, "cpu")
        unweighted = encode_sd_text(encoder, tokenizer, [weighted], max_token_length, clip_skip, "cpu")
    positions = token_positions(tokenizer, plain, "red", max_token_length)
    assert positions and (max_token_length is None or positions[0] > 76)
    torch.testing.assert_close(out, scaled_by_loop(ref, positions, 1.5))
    assert not torch.allclose(out, unweighted)  # without the flag the brackets are text


def test_sdxl_weights_scale_both_encoders_and_leave_the_pooled_embedding(sdxl):
    weighted, plain = "a [[blue]] square", "a blue square"
    encoders, tokenizers = sdxl.text_encoders, sdxl.tokenizers
    with torch.no_grad():
        out = encode_sdxl_text(encoders, tokenizers, [weighted], None, weighted=True)
        ref = encode_sdxl_text(encoders, tokenizers, [plain], None)
    factor = (1 / 1.1) ** 2
    for key, tokenizer in (("hidden_state1", tokenizers[0]), ("hidden_state2", tokenizers[1])):
        positions = token_positions(tokenizer, plain, "blue", None)
        torch.testing.assert_close(out[key], scaled_by_loop(ref[key], positions, factor))
    torch.testing.assert_close(out["pool2"], ref["pool2"])


def long_prompt_reference(encoder, tokenizer, plain: str, word: str, factor: float, layer) -> torch.Tensor:
    """The long-prompt pipeline's weighting of one short prompt, by hand: the plain prompt's hidden states, the
    word's rows multiplied, then everything rescaled to the unweighted mean."""
    ids = tokenize(tokenizer, [plain], None)
    hidden = layer(encoder(ids, output_hidden_states=True))
    weighted = scaled_by_loop(hidden, token_positions(tokenizer, plain, word, None), factor)
    return weighted * (hidden.mean() / weighted.mean())


def test_sd_sample_prompt_weights_keep_the_mean(sd1):
    """The tiny encoder's final LayerNorm has zero bias, so its outputs average to ~0 and the mean ratio would be
    noise; a bias like a real CLIP's makes the mean well defined."""
    prompt = SamplePrompt("a (red:1.4) circle", negative_prompt="blurry")
    sd1 = copy.copy(sd1)
    sd1.text_encoders = [copy.deepcopy(sd1.text_encoders[0])]
    with torch.no_grad():
        final_layer_norm(sd1.text_encoders[0]).bias += 0.5
        inputs = sampling._prompt_inputs(sd1, prompt, torch.device("cpu"))
        expected = long_prompt_reference(
            sd1.text_encoders[0], sd1.tokenizers[0], "a red circle", "red", 1.4, lambda o: o.last_hidden_state
        )
        negative = sd1.text_encoders[0](tokenize(sd1.tokenizers[0], ["blurry"], None)).last_hidden_state
    torch.testing.assert_close(inputs["prompt_embeds"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inputs["negative_prompt_embeds"], negative)


def test_sdxl_sample_prompt_weights_each_encoder_on_its_own(sdxl):
    prompt = SamplePrompt("a (red:1.4) circle")
    with torch.no_grad():
        inputs = sampling._prompt_inputs(sdxl, prompt, torch.device("cpu"))
        parts = [
            long_prompt_reference(e, t, "a red circle", "red", 1.4, lambda o: o.hidden_states[-2])
            for e, t in zip(sdxl.text_encoders, sdxl.tokenizers)
        ]
        pooled = encode_sdxl_text(sdxl.text_encoders, sdxl.tokenizers, ["a red circle"], None)["pool2"]
    torch.testing.assert_close(inputs["prompt_embeds"], torch.cat(parts, dim=2), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inputs["pooled_prompt_embeds"], pooled)
    assert inputs["negative_prompt_embeds"].shape == inputs["prompt_embeds"].shape


def test_long_sample_prompts_use_77_token_windows_for_prompt_and_negative(sd1):
    prompt = SamplePrompt("a photo of " + "red " * 90, negative_prompt="blurry")
    with torch.no_grad():
        inputs = sampling._prompt_inputs(sd1, prompt, torch.device("cpu"))
    assert inputs["prompt_embeds"].shape == inputs["negative_prompt_embeds"].shape == (1, 2 * 77, 32)


def test_malformed_weight_in_a_prompt_file_names_the_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n(a dog:big) --n blurry\n", encoding="utf-8")
    with pytest.raises(sampling.PromptFileError, match=r"prompts\.txt:2: prompt '\(a dog:big\)': malformed weight"):
        sampling.load_prompts(path)


# --------------------------------------------------------------------------------------------- training runs


def write_workspace(root: Path, model: str, caption: str) -> Path:
    write_shape_images(root / "data" / "2_sks shape", ("red", "blue"), caption=caption)
    config = root / "config.toml"
    config.write_text(
        f"""
pretrained_model_name_or_path = "{model}"
train_data_dir = "{(root / 'data').as_posix()}"
caption_extension = ".txt"
resolution = "64"
max_data_loader_n_workers = 0
network_module = "networks.lora"
network_dim = 4
network_alpha = 4
optimizer_type = "AdamW"
learning_rate = 1e-2
max_train_steps = 3
seed = 7
output_dir = "{(root / 'out').as_posix()}"
""",
        encoding="utf-8",
    )
    return config


def train(config: Path, sdxl: bool, *extra: str):
    from library.config import parse_args
    from library.sdxl import SdxlNetworkTrainer
    from library.trainer import NetworkTrainer

    trainer = SdxlNetworkTrainer() if sdxl else NetworkTrainer()
    trainer.train(parse_args(["--config_file", str(config), *extra], sdxl=sdxl))
    return trainer


@pytest.mark.slow
def test_sd1_training_reads_caption_weights(tmp_path):
    weighted = train(write_workspace(tmp_path / "w", "tiny-sd1", "a photo of (sks:1.5) shape"), False,
                     "--weighted_captions", "--output_name", "w")  # fmt: skip
    plain = train(write_workspace(tmp_path / "p", "tiny-sd1", "a photo of sks shape"), False, "--output_name", "p")
    # (sks:1.0) is the plain caption: the same losses; (sks:1.5) changes them from the first step on
    same = train(write_workspace(tmp_path / "s", "tiny-sd1", "a photo of (sks:1.0) shape"), False,
                 "--weighted_captions", "--output_name", "s")  # fmt: skip
    assert same.loss_history == pytest.approx(plain.loss_history, rel=1e-6)
    assert weighted.loss_history[0] != pytest.approx(plain.loss_history[0], rel=1e-6)
    with safe_open(weighted.output_file, "pt") as file:
        metadata = file.metadata()
    assert not any("weighted" in key for key in metadata)  # sd-scripts records no key for it


@pytest.mark.slow
def test_sdxl_cached_weighted_outputs_give_the_same_losses(tmp_path):
    config = write_workspace(tmp_path, "tiny-sdxl", "a photo of (sks:1.5) [shape]")
    common = ("--weighted_captions", "--network_train_unet_only")
    uncached = train(config, True, *common, "--output_name", "uncached")
    cached = train(config, True, *common, "--cache_text_encoder_outputs_to_disk", "--output_name", "cached")
    assert cached.loss_history == pytest.approx(uncached.loss_history, rel=1e-5, abs=1e-6)
    unweighted = train(config, True, "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk",
                       "--output_name", "unweighted")  # fmt: skip
    # the disk cache of the weighted run is not reused without the flag (fingerprint), and vice versa
    assert unweighted.loss_history[0] != pytest.approx(cached.loss_history[0], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_network.py", "sdxl_train_network.py"])
def test_malformed_caption_weight_stops_before_training(tmp_path, script):
    model = "tiny-sdxl" if script.startswith("sdxl") else "tiny-sd1"
    config = write_workspace(tmp_path, model, "a photo of (sks:abc) shape")
    result = subprocess.run(
        [sys.executable, str(REPO / script), "--config_file", str(config), "--weighted_captions"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --weighted_captions: caption 'a photo of (sks:abc) shape, ")
    assert ".txt: malformed weight ':abc)'" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_a_weighted_sample_prompt_changes_the_image_and_weight_one_does_not(model, request, tmp_path):
    import numpy as np
    from PIL import Image

    bundle = request.getfixturevalue(model)
    small = dict(width=64, height=64, sample_steps=2, seed=3)

    def draw(text: str, folder: str) -> np.ndarray:
        path = sampling.sample_images(bundle, None, [SamplePrompt(text, **small)], tmp_path / folder, 1, None,
                                      "euler", "cpu")[0]  # fmt: skip
        return np.asarray(Image.open(path), dtype=np.int16)

    plain = draw("a red circle", "plain")
    assert np.array_equal(draw("a (red:1.0) circle", "one"), plain)
    assert np.abs(draw("a (red:1.8) circle", "weighted") - plain).max() > 0
