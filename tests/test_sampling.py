"""Sample images during training (library/sampling.py): prompt files, sampler names, the sampling schedule,
images drawn from the tiny SD 1.x / SDXL models, and a training run that samples without changing its losses."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

import networks.lora
from helpers import parser_args  # tests/helpers.py
from library import config, sampling
from library.diffusion import make_noise_scheduler
from library.models import load_embedded
from library.sampling import (
    PromptFileError,
    SamplePrompt,
    get_sampler,
    load_prompts,
    sample_during_training,
    sample_image_name,
    sample_images,
    should_sample,
)

SMALL = dict(width=64, height=64, sample_steps=2)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- prompt files


def test_txt_prompts_with_every_option(tmp_path):
    path = write(
        tmp_path / "prompts.txt",
        "# a comment\n"
        "\n"
        "a red circle --n blurry, low quality --w 320 --h 256 --s 12 --l 5.5 --d 42 --ss euler_a\n"
        "  # indented comment\n"
        "a blue square\n"
        "upper case options --W 128 --H 96 --D 7 --SS K_EULER\n",
    )
    prompts = load_prompts(path)
    assert prompts == [
        SamplePrompt("a red circle", "blurry, low quality", 320, 256, 12, 5.5, 42, "euler_a", index=0),
        SamplePrompt("a blue square", index=1),
        SamplePrompt("upper case options", width=128, height=96, seed=7, sample_sampler="K_EULER", index=2),
    ]
    default = prompts[1]  # sd-scripts' defaults
    assert (default.width, default.height, default.sample_steps) == (512, 512, 30)
    assert (default.scale, default.seed) == (7.5, None)


def test_txt_steps_are_clamped_like_sd_scripts(tmp_path):
    path = write(tmp_path / "p.txt", "few --s 0\nmany --s 5000\n")
    assert [p.sample_steps for p in load_prompts(path)] == [1, 1000]


def test_txt_options_of_other_model_families_are_ignored(tmp_path, caplog):
    path = write(tmp_path / "p.txt", "a cat --g 3.5 --cn control.png --w 128\n")
    (prompt,) = load_prompts(path)
    assert (prompt.prompt, prompt.width) == ("a cat", 128)
    assert "--g is not used" in caplog.text and "--cn is not used" in caplog.text


@pytest.mark.parametrize(
    "line, message",
    [
        ("a cat --w wide", r"p\.txt:2: option --w expects int, got 'wide'"),
        ("a cat --l high", r"p\.txt:2: option --l expects float"),
        ("a cat --x 3", r"p\.txt:2: unknown option --x"),
        ("a cat --ss k_dpmpp_2m", r"p\.txt:2: unknown sampler 'k_dpmpp_2m'"),
        ("a cat --h 0", r"p\.txt:2: height must be positive"),
        ("a cat --n", r"p\.txt:2: option --n needs a value"),
    ],
)
def test_txt_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "p.txt", f"first prompt\n{line}\n")
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)


def test_toml_prompt_table_gives_defaults_to_each_subset(tmp_path):
    path = write(
        tmp_path / "prompts.toml",
        """
[prompt]
negative_prompt = "lowres"
width = 128
height = 128
scale = 6
sample_steps = 20

[[prompt.subset]]
prompt = "a red circle"
seed = 1

[[prompt.subset]]
prompt = "a blue square"
width = 256
sample_sampler = "dpmsolver++"
""",
    )
    assert load_prompts(path) == [
        SamplePrompt("a red circle", "lowres", 128, 128, 20, 6.0, 1, None, index=0),
        SamplePrompt("a blue square", "lowres", 256, 128, 20, 6.0, None, "dpmsolver++", index=1),
    ]


def test_json_objects_and_prompt_lines(tmp_path):
    entries = [
        {"prompt": "a red circle", "negative_prompt": "blurry", "width": 96, "height": 64, "sample_steps": 3,
         "scale": 4, "seed": 9, "sample_sampler": "ddim"},
        "a blue square --w 64 --d 3",
    ]  # fmt: skip
    path = write(tmp_path / "prompts.json", json.dumps(entries))
    assert load_prompts(path) == [
        SamplePrompt("a red circle", "blurry", 96, 64, 3, 4.0, 9, "ddim", index=0),
        SamplePrompt("a blue square", width=64, seed=3, index=1),
    ]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.json", '[{"prompt": "a", "width": "big"}]', r"p\.json: prompt #1: width must be int, got 'big'"),
        ("p.json", '[{"prompt": "a"}, {"prompt": "b", "steps": 3}]', r"p\.json: prompt #2: unknown key 'steps'"),
        ("p.json", '[{"prompt": "a", "seed": true}]', r"p\.json: prompt #1: seed must be int"),
        ("p.json", '{"prompt": "a"}', r"p\.json: expected a JSON list"),
        ("p.json", '[\n{"prompt": "a",}\n]', r"p\.json:2: invalid JSON"),
        ("p.json", '[{"negative_prompt": "x"}]', r"p\.json: prompt #1: the prompt text is empty"),
        ("p.toml", 'prompt = "a cat"\n', r"p\.toml: expected a \[prompt\] table"),
        ("p.toml", '[prompt]\nwidth = = 3\n', r"p\.toml:2: invalid TOML"),
        ("p.yaml", "a cat\n", r"p\.yaml: sample prompt file must end in \.txt, \.toml or \.json"),
    ],
)
def test_structured_file_errors_name_file_and_entry(tmp_path, name, text, message):
    with pytest.raises(PromptFileError, match=message):
        load_prompts(write(tmp_path / name, text))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(PromptFileError, match=r"missing\.txt: cannot read sample prompt file"):
        load_prompts(tmp_path / "missing.txt")


def test_image_size_rounds_down_to_multiple_of_8_at_least_64():
    assert SamplePrompt("a", width=100, height=30).image_size == (96, 64)
    assert SamplePrompt("a", width=64, height=519).image_size == (64, 512)


# --------------------------------------------------------------------------------------------- samplers

EXPECTED_SAMPLERS = {
    "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler, "lms": LMSDiscreteScheduler,
    "k_lms": LMSDiscreteScheduler, "euler": EulerDiscreteScheduler, "k_euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler, "k_euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler, "dpm_2": KDPM2DiscreteScheduler, "k_dpm_2": KDPM2DiscreteScheduler,
    "dpm_2_a": KDPM2AncestralDiscreteScheduler, "k_dpm_2_a": KDPM2AncestralDiscreteScheduler,
    "dpmsolver": DPMSolverMultistepScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
    "dpmsingle": DPMSolverSinglestepScheduler,
}  # fmt: skip


def test_every_command_line_sampler_is_mapped():
    assert set(config.SAMPLERS) <= set(EXPECTED_SAMPLERS)


@pytest.mark.parametrize("name", sorted(EXPECTED_SAMPLERS))
@pytest.mark.parametrize("v_parameterization", [False, True])
def test_sampler_builds_from_training_config(name, v_parameterization):
    training = make_noise_scheduler(v_parameterization)
    sampler = get_sampler(name, training.config)
    assert type(sampler) is EXPECTED_SAMPLERS[name]
    assert sampler.config.prediction_type == ("v_prediction" if v_parameterization else "epsilon")
    assert (sampler.config.beta_start, sampler.config.beta_end) == (0.00085, 0.012)
    assert sampler.config.num_train_timesteps == 1000
    if isinstance(sampler, DPMSolverMultistepScheduler):
        assert sampler.config.algorithm_type == name
    sampler.set_timesteps(4)  # usable as built
    assert len(sampler.timesteps) >= 4


def test_unknown_sampler_is_an_error():
    with pytest.raises(ValueError, match=r"unknown sampler 'dpmpp_2m'; expected one of ddim"):
        get_sampler("dpmpp_2m", make_noise_scheduler().config)


# --------------------------------------------------------------------------------------------- schedule


def schedule_args(**overrides) -> argparse.Namespace:
    """The parser's defaults (tests/helpers.py) with a prompt file."""
    return parser_args(**{"sample_prompts": "p.txt", **overrides})


def sampled_points(args: argparse.Namespace, epochs: int = 4, steps_per_epoch: int = 5) -> list[tuple]:
    """Walk a run the way the trainer calls should_sample; returns ("first"|"step"|"epoch", step, epoch) points."""
    points = [("first", 0, 0)] if should_sample(args, 0, 0, False) else []
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            if should_sample(args, step, epoch, False):
                points.append(("step", step, epoch))
        if should_sample(args, step, epoch, True):
            points.append(("epoch", step, epoch))
    return points


def test_schedule_every_n_steps():
    assert sampled_points(schedule_args(sample_every_n_steps=7)) == [("step", 7, 2), ("step", 14, 3)]


def test_schedule_every_n_epochs_wins_over_steps():
    args = schedule_args(sample_every_n_epochs=2, sample_every_n_steps=1)
    assert sampled_points(args) == [("epoch", 10, 2), ("epoch", 20, 4)]


def test_schedule_at_first_only():
    assert sampled_points(schedule_args(sample_at_first=True)) == [("first", 0, 0)]


def test_schedule_needs_a_prompt_file():
    args = schedule_args(sample_prompts=None, sample_at_first=True, sample_every_n_steps=1, sample_every_n_epochs=1)
    assert sampled_points(args) == []


def test_image_names_follow_sd_scripts():
    name = sample_image_name("mylora", 42, None, 3, 1234, "20240102030405")
    assert name == "mylora_000042_03_20240102030405_1234.png"
    assert sample_image_name(None, 42, 2, 0, None, "20240102030405") == "e000002_00_20240102030405.png"


# --------------------------------------------------------------------------------------------- drawing


@pytest.fixture(scope="module")
def sd1():
    return load_embedded("tiny-sd1")


@pytest.fixture(scope="module")
def sd1_with_lora():
    """A second tiny SD 1.x with a LoRA on U-Net and text encoder whose up weights are random (not zero)."""
    bundle = load_embedded("tiny-sd1")
    network = networks.lora.create_network(1.0, 4, 4, bundle.vae, bundle.text_encoders[0], bundle.unet)
    network.apply_to(bundle.text_encoders[0], bundle.unet, True, True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_up" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return bundle, network


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sd1_images_have_requested_size_and_sd_scripts_names(sd1, tmp_path):
    prompts = [SamplePrompt("a red circle", seed=5, index=0, **SMALL),
               SamplePrompt("a blue square", width=96, height=72, sample_steps=2, seed=6, index=1)]  # fmt: skip
    paths = sample_images(sd1, None, prompts, tmp_path, 12, None, "euler_a", "cpu", output_name="run")
    assert [Path(p).parent for p in paths] == [tmp_path / "sample"] * 2
    assert re.fullmatch(r"run_000012_00_\d{14}_5\.png", Path(paths[0]).name)
    assert re.fullmatch(r"run_000012_01_\d{14}_6\.png", Path(paths[1]).name)
    assert [Image.open(p).size for p in paths] == [(64, 64), (96, 72)]
    written = sorted(p.name for p in (tmp_path / "sample").iterdir())
    assert written == sorted(Path(p).name for p in paths)  # no temporary files left


def test_same_seed_same_image_and_rng_restored(sd1, tmp_path):
    prompt = SamplePrompt("a red circle", seed=11, **SMALL)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = sample_images(sd1, None, [prompt], tmp_path / "a", 1, None, "euler_a", "cpu")
    assert torch.equal(torch.get_rng_state(), before)
    second = sample_images(sd1, None, [prompt], tmp_path / "b", 1, None, "euler_a", "cpu")
    other_seed = sample_images(sd1, None, [SamplePrompt("a red circle", seed=12, **SMALL)], tmp_path / "c", 1, None,
                               "euler_a", "cpu")  # fmt: skip
    assert np.array_equal(pixels(first[0]), pixels(second[0]))
    assert not np.array_equal(pixels(first[0]), pixels(other_seed[0]))


def test_global_rng_restored_even_when_sampling_draws_from_it(sd1, tmp_path, monkeypatch):
    real_get_sampler = sampling.get_sampler

    def get_sampler_drawing_from_global_rng(*args, **kwargs):
        torch.rand(16)
        return real_get_sampler(*args, **kwargs)

    monkeypatch.setattr(sampling, "get_sampler", get_sampler_drawing_from_global_rng)
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    sample_images(sd1, None, [SamplePrompt("a", seed=1, **SMALL)], tmp_path, 1, None, "ddim", "cpu")
    assert torch.equal(torch.rand(4), expected)


def test_training_flags_restored(sd1_with_lora, tmp_path):
    bundle, network = sd1_with_lora
    network.train()
    bundle.unet.train()
    bundle.unet.down_blocks[0].eval()  # a mixed state must come back as it was
    before = {name: m.training for name, m in [*bundle.unet.named_modules(), *network.named_modules()]}
    sample_images(bundle, network, [SamplePrompt("a", seed=1, **SMALL)], tmp_path, 1, None, "ddim", "cpu")
    after = {name: m.training for name, m in [*bundle.unet.named_modules(), *network.named_modules()]}
    assert after == before
    bundle.unet.eval()
    network.eval()


def test_lora_is_applied(sd1, sd1_with_lora, tmp_path):
    """Multiplier 0 draws exactly the base model's image; multiplier 1 draws a different one."""
    bundle, network = sd1_with_lora
    prompt = [SamplePrompt("a red circle", seed=3, **SMALL)]
    base = sample_images(sd1, None, prompt, tmp_path / "base", 1, None, "euler", "cpu")
    network.set_multiplier(0.0)
    off = sample_images(bundle, network, prompt, tmp_path / "off", 1, None, "euler", "cpu")
    network.set_multiplier(1.0)
    on = sample_images(bundle, network, prompt, tmp_path / "on", 1, None, "euler", "cpu")
    assert np.array_equal(pixels(base[0]), pixels(off[0]))
    assert np.abs(pixels(on[0]) - pixels(off[0])).max() > 0


def test_sdxl_images_have_requested_size(tmp_path):
    bundle = load_embedded("tiny-sdxl")
    prompts = [SamplePrompt("a red circle", negative_prompt="blurry", seed=2, **SMALL)]
    (path,) = sample_images(bundle, None, prompts, tmp_path, 0, 0, "dpmsolver++", "cpu")
    assert re.fullmatch(r"e000000_00_\d{14}_2\.png", Path(path).name)
    assert Image.open(path).size == (64, 64)


class RecordingOptimizer:
    """Stands in for a schedule-free optimizer: records train() / eval() calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def train(self) -> None:
        self.calls.append("train")

    def eval(self) -> None:
        self.calls.append("eval")


class SingleProcess:
    is_main_process = True
    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model


def test_sample_during_training_puts_schedulefree_optimizer_in_eval_mode(sd1, tmp_path, monkeypatch):
    prompt_file = write(tmp_path / "p.txt", "a red circle --w 64 --h 64 --s 1 --d 1\n")
    args = schedule_args(sample_prompts=str(prompt_file), sample_every_n_steps=2, sample_sampler="ddim",
                         output_dir=str(tmp_path / "out"), output_name=None)  # fmt: skip
    optimizer = RecordingOptimizer()
    modes_while_sampling = []
    real_sample_images = sampling.sample_images

    def recording_sample_images(*a, **k):
        modes_while_sampling.append(list(optimizer.calls))
        return real_sample_images(*a, **k)

    monkeypatch.setattr(sampling, "sample_images", recording_sample_images)
    network = torch.nn.Linear(1, 1)
    assert sample_during_training(SingleProcess, args, sd1, network, optimizer, 1, 1, False, torch.float32) == []
    paths = sample_during_training(SingleProcess, args, sd1, network, optimizer, 2, 1, False, torch.float32)
    assert modes_while_sampling == [["eval"]] and optimizer.calls == ["eval", "train"]
    assert [Path(p).name[:10] for p in paths] == ["000002_00_"]


def test_sample_during_training_checks_prompt_file_before_training(sd1, tmp_path):
    args = schedule_args(sample_prompts=str(write(tmp_path / "p.txt", "a cat --q 1\n")), sample_every_n_steps=1)
    with pytest.raises(PromptFileError, match=r"p\.txt:1: unknown option --q"):
        sample_during_training(SingleProcess, args, sd1, None, None, 0, 0, False, torch.float32)


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_sd_prompt_conditioning_matches_training(sd1, clip_skip):
    """Samples are conditioned like training captions (same tokenization, same --clip_skip layer)."""
    from library.text_encoding import encode_with_clip_skip, tokenize

    sd1.clip_skip = clip_skip
    try:
        with torch.no_grad():
            inputs = sampling._prompt_inputs(sd1, SamplePrompt("a red circle"), torch.device("cpu"))
            drawn = inputs["prompt_embeds"]
            ids = tokenize(sd1.tokenizers[0], ["a red circle"], None)
            trained = encode_with_clip_skip(sd1.text_encoders[0], ids, clip_skip)
    finally:
        sd1.clip_skip = None
    torch.testing.assert_close(drawn, trained)
    if clip_skip:
        assert not torch.allclose(drawn, sd1.text_encoders[0](ids).last_hidden_state)


# --------------------------------------------------------------------------------------------- in training


@pytest.fixture(scope="module")
def training_workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sampling_run")
    images = root / "data" / "1_sks shape"
    images.mkdir(parents=True)
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), color).save(images / f"{i}.png")
    write(root / "prompts.txt", "sks shape --w 64 --h 64 --s 2 --d 5\n")
    return root


def train_losses(root: Path, name: str, *extra: str, sdxl: bool = False) -> list[float]:
    from library.config import parse_args
    from library.sdxl import SdxlNetworkTrainer
    from library.trainer import NetworkTrainer

    model = "tiny-sdxl" if sdxl else "tiny-sd1"
    argv = ["--pretrained_model_name_or_path", model, "--train_data_dir", str(root / "data"),
            "--resolution", "64", "--max_data_loader_n_workers", "0", "--network_module", "networks.lora",
            "--network_dim", "4", "--network_dropout", "0.1", "--learning_rate", "1e-3", "--max_train_steps", "3",
            "--seed", "3", "--output_dir", str(root / name), "--output_name", name, *extra]  # fmt: skip
    trainer = SdxlNetworkTrainer() if sdxl else NetworkTrainer()
    trainer.train(parse_args(argv, sdxl=sdxl))
    return trainer.loss_history


@pytest.mark.slow
def test_training_run_samples_without_changing_its_losses(training_workspace):
    """Dropout and noise draw from torch's global generator: sampling in between must leave it untouched."""
    root = training_workspace
    plain = train_losses(root, "plain")
    sampled = train_losses(root, "sampled", "--sample_prompts", str(root / "prompts.txt"), "--sample_at_first",
                           "--sample_every_n_steps", "2", "--sample_sampler", "euler_a")  # fmt: skip
    assert sampled == plain
    names = sorted(path.name for path in (root / "sampled" / "sample").iterdir())
    assert len(names) == 2
    assert re.fullmatch(r"sampled_000002_00_\d{14}_5\.png", names[0])  # after step 2
    assert re.fullmatch(r"sampled_e000000_00_\d{14}_5\.png", names[1])  # before training
    assert not (root / "plain" / "sample").exists()


@pytest.mark.slow
def test_sdxl_training_run_samples_at_epoch_ends_with_cached_text_outputs(training_workspace):
    """The text-encoder output cache parks the encoders on the CPU; sampling still draws with them."""
    root = training_workspace
    train_losses(root, "xl", "--sample_prompts", str(root / "prompts.txt"), "--sample_every_n_epochs", "1",
                 "--cache_text_encoder_outputs", "--network_train_unet_only", sdxl=True)  # fmt: skip
    names = sorted(path.name for path in (root / "xl" / "sample").iterdir())
    assert [name[: len("xl_e000001")] for name in names] == ["xl_e000001", "xl_e000002"]  # 3 steps: epochs 1, 2
    assert all(Image.open(root / "xl" / "sample" / name).size == (64, 64) for name in names)
