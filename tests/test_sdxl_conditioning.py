"""SDXL conditioning on the embedded tiny SDXL model: context and pooled embedding against the encoders computed
directly, size/crop time ids against the bucket and crop of odd-aspect images, caching constraints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from library.architectures import CLIP_L_TEXT, OPENCLIP_BIGG_TEXT, SDXL_UNET
from library.config import parse_args
from library.dataset import build_dataset
from library.latents import LATENT_DOWNSCALE
from library.models import load_embedded
from library.sdxl import SdxlNetworkTrainer, encode_sdxl_text, fixed_captions, sdxl_conditioning, size_conditioning
from library.tiny_models import build_tokenizer
from library.trainer import latent_size_multiple
from networks.lora import create_network

CAPTIONS = ["a photo of sks shape, red", "a blue circle"]


@pytest.fixture(scope="module")
def trainer() -> Iterator[SdxlNetworkTrainer]:
    """A trainer holding the tiny SDXL model, as ``train`` sets it up before the loop."""
    trainer = SdxlNetworkTrainer()
    trainer.args = parse_args(["--pretrained_model_name_or_path", "tiny-sdxl", "--train_data_dir", "unused"], sdxl=True)
    trainer.models = load_embedded("tiny-sdxl")
    trainer.accelerator = Accelerator(cpu=True)
    yield trainer
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's state is process-global


def penultimate_layer_output(text_encoder: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The output of the encoder's second-to-last transformer layer, captured with a forward hook."""
    layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
    captured = []
    handle = layers[-2].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            text_encoder(input_ids)
    finally:
        handle.remove()
    output = captured[0]
    return output[0] if isinstance(output, tuple) else output


def projected_eos(text_encoder_2: torch.nn.Module, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """TE2's final hidden state at each caption's first EOS token, through the text projection."""
    with torch.no_grad():
        last = text_encoder_2(input_ids).last_hidden_state
        eos_positions = (input_ids == eos_token_id).int().argmax(dim=1)
        return text_encoder_2.text_projection(last[torch.arange(len(input_ids)), eos_positions])


def token_ids(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def test_context_and_pooled_match_the_encoders(trainer):
    models = trainer.models
    with torch.no_grad():
        conditioning = trainer.encode_text(CAPTIONS)
    context, pooled = conditioning["context"], conditioning["pooled"]
    widths = [encoder.config.hidden_size for encoder in models.text_encoders]
    assert context.shape == (2, 77, sum(widths)) == (2, 77, 64)

    ids1 = token_ids(models.tokenizers[0], CAPTIONS, 77)
    ids2 = token_ids(models.tokenizers[1], CAPTIONS, 77)
    hidden1 = penultimate_layer_output(models.text_encoders[0], ids1)
    hidden2 = penultimate_layer_output(models.text_encoders[1], ids2)
    expected_context = torch.cat([hidden1, hidden2], dim=2)
    torch.testing.assert_close(context, expected_context, rtol=1e-5, atol=1e-6)
    expected_pooled = projected_eos(models.text_encoders[1], ids2, models.tokenizers[1].eos_token_id)
    assert pooled.shape == (2, models.text_encoders[1].config.projection_dim)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-6)


def test_long_captions_use_75_token_windows_and_the_first_window_pool(trainer, monkeypatch):
    monkeypatch.setattr(trainer.args, "max_token_length", 150)
    long_caption = ", ".join(["red circle"] * 40)  # more than 75 tokens
    captions = [long_caption, "a blue circle"]
    with torch.no_grad():
        conditioning = trainer.encode_text(captions)
    assert conditioning["context"].shape == (2, 152, 64)

    tokenizer, text_encoder_2 = trainer.models.tokenizers[1], trainer.models.text_encoders[1]
    ids = token_ids(tokenizer, captions, 152)
    assert (ids[0, 76:151] != tokenizer.pad_token_id).any()  # the long caption reaches the second window
    first_window = torch.cat([ids[:, :76], torch.full((2, 1), tokenizer.eos_token_id)], dim=1)
    expected_pooled = projected_eos(text_encoder_2, first_window, tokenizer.eos_token_id)
    torch.testing.assert_close(conditioning["pooled"], expected_pooled, rtol=1e-5, atol=1e-6)
    # the first window's tokens get the same states as a caption cut at 75 tokens
    short = penultimate_layer_output(text_encoder_2, first_window)
    torch.testing.assert_close(conditioning["context"][:, 1:76, 32:], short[:, 1:76], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def odd_aspect_folder(tmp_path_factory) -> Path:
    """A wide (96×64) and a tall (64×80) image with pixel gradients; both go to the 64×64 bucket and are
    centre-cropped (16 px off the left, 8 px off the top)."""
    root = tmp_path_factory.mktemp("odd_aspect")
    folder = root / "1_sks shape"
    folder.mkdir()
    for name, (width, height) in {"wide": (96, 64), "tall": (64, 80)}.items():
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} shape", encoding="utf-8")
    return root


def dataset_args(folder: Path, *extra: str):
    return parse_args(
        [
            "--pretrained_model_name_or_path", "tiny-sdxl",
            "--train_data_dir", str(folder),
            "--caption_extension", ".txt",
            "--resolution", "64",
            "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
            "--seed", "3",
            *extra,
        ],
        sdxl=True,
    )


def test_time_ids_are_the_bucket_and_crop_of_each_image(odd_aspect_folder, trainer, monkeypatch):
    dataset = build_dataset(dataset_args(odd_aspect_folder))
    dataset.set_current_epoch(1)
    expected = {"wide.png": [64, 96, 0, 16, 64, 64], "tall.png": [80, 64, 8, 0, 64, 64]}  # h, w, top, left, h, w

    seen_by_unet = []
    unet = trainer.models.unet
    original_forward = unet.forward

    def spy(*args, **kwargs):
        seen_by_unet.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    for index in range(len(dataset)):
        batch = dataset[index]
        name = Path(batch["image_keys"][0]).name
        time_ids = size_conditioning(batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
        assert time_ids.dtype == torch.float32
        assert time_ids.tolist() == [expected[name]]

        # the training image is exactly the original's pixels at that crop (no resize: the short side is 64)
        top, left = expected[name][2], expected[name][3]
        original = np.asarray(Image.open(batch["image_keys"][0]).convert("RGB"), dtype=np.float32)
        crop = torch.from_numpy(original[top : top + 64, left : left + 64]).permute(2, 0, 1) / 127.5 - 1.0
        torch.testing.assert_close(batch["images"][0], crop, rtol=0, atol=1e-6)

        with torch.no_grad():
            conditioning = trainer.encode_text(batch["captions"])
            prediction = trainer.unet_forward(torch.randn(1, 4, 8, 8), torch.tensor([500]), conditioning, batch)
        assert prediction.shape == (1, 4, 8, 8)
        assert seen_by_unet[-1].tolist() == [expected[name]]


def test_caching_refuses_subsets_whose_captions_vary(odd_aspect_folder, tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text(
        f"""
[[datasets]]
resolution = 64
[[datasets.subsets]]
image_dir = "{(odd_aspect_folder / '1_sks shape').as_posix()}"
caption_extension = ".txt"
shuffle_caption = true
""",
        encoding="utf-8",
    )
    dataset = build_dataset(dataset_args(odd_aspect_folder, "--dataset_config", str(config)))
    with pytest.raises(ValueError, match=r"cannot be used with shuffle_caption \(set for the subset .*1_sks shape\)"):
        fixed_captions(dataset)


def test_fixed_captions_are_the_captions_the_loop_sees(odd_aspect_folder):
    dataset = build_dataset(dataset_args(odd_aspect_folder, "--caption_prefix", "photo of"))
    dataset.set_current_epoch(1)
    entries = {Path(entry.image_path).name: entry.caption for entry in fixed_captions(dataset)}
    for index in range(len(dataset)):
        batch = dataset[index]
        assert entries[Path(batch["image_keys"][0]).name] == batch["captions"][0]
    assert entries == {"wide.png": "photo of a wide shape", "tall.png": "photo of a tall shape"}


def test_two_text_encoder_lrs_go_to_a_network_that_takes_them(trainer):
    args = parse_args(["--pretrained_model_name_or_path", "tiny-sdxl", "--train_data_dir", "unused",
                       "--text_encoder_lr", "1e-4", "2e-4"], sdxl=True)
    models = trainer.models
    network = create_network(1.0, 2, 1.0, None, models.text_encoders, models.unet)
    assert trainer.text_encoder_lr(args, network) == [1e-4, 2e-4]
    groups, descriptions = network.prepare_optimizer_params(trainer.text_encoder_lr(args, network), 1e-3, 1e-3)
    assert [(d, g["lr"]) for d, g in zip(descriptions, groups)] == [
        ("textencoder1", 1e-4), ("textencoder2", 2e-4), ("unet", 1e-3)
    ]

    class SingleLrNetwork:  # e.g. LyCORIS: prepare_optimizer_params takes one text-encoder lr
        pass

    assert trainer.text_encoder_lr(args, SingleLrNetwork()) == 1e-4


@pytest.mark.slow
def test_real_sdxl_sizes_context_2048_pooled_1280_and_32_pixel_buckets():
    tokenizer = build_tokenizer()
    special = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **special)),
                    CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT, **special))]
        unet = UNet2DConditionModel(**SDXL_UNET)
    conditioning = sdxl_conditioning(encode_sdxl_text(encoders, [tokenizer, tokenizer], CAPTIONS, None))
    assert conditioning["context"].shape == (2, 77, 2048)
    assert conditioning["pooled"].shape == (2, 1280)

    time_ids = size_conditioning(torch.tensor([[1024, 768], [800, 1200]]), torch.tensor([[0, 32], [16, 0]]),
                                 torch.tensor([[1024, 1024], [832, 1216]]))
    with torch.device("meta"):
        added = {"text_embeds": conditioning["pooled"], "time_ids": time_ids.to("meta")}
        prediction = unet(torch.empty(2, 4, 128, 128), torch.tensor([10, 900]), conditioning["context"],
                          added_cond_kwargs=added).sample
    assert prediction.shape == (2, 4, 128, 128)
    assert latent_size_multiple(unet) * LATENT_DOWNSCALE == 32  # buckets may step by 32 pixels
