"""Tests of library/config.py: flags and defaults, --config_file merging, --output_config, argument checks, configs/."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import toml

from library.config import (
    ConfigError,
    apply_config_file,
    build_parser,
    int_or_float,
    parse_args,
    parse_resolution,
    read_config_file,
    save_config_file,
    verify_args,
)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# Defaults as kohya-ss/sd-scripts' train_network.py defines them (library/train_util.py, train_network.py,
# library/custom_train_functions.py): the reference we must match, read from upstream, not from our parser.
SD_SCRIPTS_DEFAULTS = {
    "learning_rate": 2e-6,
    "max_train_steps": 1600,
    "max_train_epochs": None,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "mixed_precision": "no",
    "max_grad_norm": 1.0,
    "optimizer_type": "",
    "optimizer_args": None,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1,
    "network_dim": None,
    "network_alpha": 1,
    "network_args": None,
    "unet_lr": None,
    "text_encoder_lr": None,
    "save_model_as": "safetensors",
    "save_precision": None,
    "resolution": None,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "caption_extension": ".caption",
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": "",
    "prior_loss_weight": 1.0,
    "max_data_loader_n_workers": 8,
    "max_token_length": None,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "vae_batch_size": 1,
    "dataset_repeats": 1,
    "loss_type": "l2",
    "huber_c": 0.1,
    "huber_schedule": "snr",
    "multires_noise_discount": 0.3,
    "min_snr_gamma": None,
    "sample_sampler": "ddim",
    "validation_split": 0.0,
    "seed": None,
    "shuffle_caption": False,
    "cache_latents": False,
}


@pytest.mark.parametrize("sdxl", [False, True])
def test_defaults_match_sd_scripts(sdxl):
    args = vars(parse_args([], sdxl=sdxl))
    assert {key: args[key] for key in SD_SCRIPTS_DEFAULTS} == SD_SCRIPTS_DEFAULTS


def test_sdxl_flags_exist_only_in_the_sdxl_parser(capsys):
    args = parse_args(["--cache_text_encoder_outputs", "--network_train_unet_only"], sdxl=True)
    assert args.cache_text_encoder_outputs and not args.cache_text_encoder_outputs_to_disk
    assert args.disable_mmap_load_safetensors is False
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--cache_text_encoder_outputs"], sdxl=False)
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --cache_text_encoder_outputs" in capsys.readouterr().err


def test_every_flag_is_in_a_named_group():
    parser = build_parser(sdxl=True)
    grouped = {action.dest for group in parser._action_groups if group.title not in ("positional arguments", "options")
               for action in group._group_actions}
    ungrouped = {action.dest for action in parser._actions} - grouped - {"help"}
    assert ungrouped == set()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--sample_sampler", "k_dpmpp_2m"), ("--mixed_precision", "fp32"), ("--loss_type", "l3"), ("--log_with", "x")],
)
def test_choices_are_enforced_on_the_command_line(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag, value])
    assert f"argument {flag}: invalid choice" in capsys.readouterr().err


def test_command_line_types():
    args = parse_args(
        ["--text_encoder_lr", "1e-4", "5e-5", "--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99",
         "--lr_warmup_steps", "0.1", "--lr_decay_steps", "10%", "--network_alpha", "16", "--caption_extention", ".txt"]
    )
    assert args.text_encoder_lr == [1e-4, 5e-5]
    assert args.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert args.lr_warmup_steps == pytest.approx(0.1)
    assert args.lr_decay_steps == pytest.approx(0.1)
    assert args.network_alpha == 16.0 and isinstance(args.network_alpha, float)
    assert args.caption_extension == ".txt"  # the misspelled alias wins, as in sd-scripts


@pytest.mark.parametrize(
    ("text", "expected"), [("0", 0), ("250", 250), ("0.05", 0.05), ("5%", 0.05), ("1.0", 1.0), ("100%", 1.0)]
)
def test_int_or_float(text, expected):
    value = int_or_float(text)
    assert value == pytest.approx(expected) and type(value) is type(expected)


@pytest.mark.parametrize(("text", "message"), [("ten", "neither"), ("%", "neither"), ("2.5", "between 0 and 1"),
                                               ("150%", "between 0 and 1"), ("-0.5", "between 0 and 1")])
def test_int_or_float_rejects(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=f"{text!r}.*{message}"):
        int_or_float(text)


def test_step_fractions_keep_their_toml_type(tmp_path):
    """As in sd-scripts, a TOML float is a fraction of the training steps (1.0 = all) and an integer a step count."""
    config = write(tmp_path / "steps.toml", "lr_warmup_steps = 1.0\nlr_decay_steps = 100\n")
    args = parse_args(["--config_file", str(config)])
    assert args.lr_warmup_steps == 1.0 and isinstance(args.lr_warmup_steps, float)
    assert args.lr_decay_steps == 100 and isinstance(args.lr_decay_steps, int)


def test_config_file_precedence(tmp_path):
    config = write(
        tmp_path / "run.toml",
        """
learning_rate = 1e-3
network_dim = 8
shuffle_caption = true
optimizer_args = ["weight_decay=0.01", "normalize_frequency=2"]
network_args = ["conv_dim=4"]
""",
    )
    args = parse_args(["--config_file", str(config), "--learning_rate", "5e-4", "--network_args", "conv_dim=8"])
    assert args.learning_rate == 5e-4  # command line beats file
    assert args.network_args == ["conv_dim=8"]  # ... also for lists
    assert args.network_dim == 8  # file beats default
    assert args.shuffle_caption is True  # a store_true flag set by the file
    assert args.optimizer_args == ["weight_decay=0.01", "normalize_frequency=2"]
    assert args.max_train_steps == 1600  # default where neither says anything
    assert args.config_file == str(config)


def test_sections_are_flattened_one_level(tmp_path):
    config = write(
        tmp_path / "sectioned.toml",
        """
output_name = "top"

[model_arguments]
pretrained_model_name_or_path = "tiny-sd1"

[anything_at_all]
network_dim = 16
cache_latents = true
""",
    )
    path, flat = read_config_file(config)
    assert path == str(config)
    assert flat == {"output_name": "top", "pretrained_model_name_or_path": "tiny-sd1", "network_dim": 16,
                    "cache_latents": True}
    args = parse_args(["--config_file", str(config)])
    assert (args.output_name, args.pretrained_model_name_or_path, args.network_dim, args.cache_latents) == (
        "top", "tiny-sd1", 16, True)


def test_toml_suffix_is_appended(tmp_path):
    write(tmp_path / "my.toml", "network_dim = 12\n")
    args = parse_args(["--config_file", str(tmp_path / "my")])
    assert args.network_dim == 12
    assert args.config_file == str(tmp_path / "my.toml")


def test_unknown_keys_are_warned_by_name_and_ignored(tmp_path, caplog):
    config = write(tmp_path / "typo.toml", "learnig_rate = 1e-3\nepoch = 4\n")
    with caplog.at_level(logging.WARNING, logger="library.config"):
        args = parse_args(["--config_file", str(config)])
    assert "unknown key 'learnig_rate' ignored (did you mean 'learning_rate'?)" in caplog.text
    assert "'epoch' is ignored: the kohya_ss GUI's epoch count" in caplog.text
    assert str(config) in caplog.text
    assert args.learning_rate == 2e-6 and not hasattr(args, "learnig_rate")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('network_dim = "eight"', r"key 'network_dim' in .*bad\.toml: expected an integer, got 'eight'"),
        ("network_dim = 4.5", r"key 'network_dim' in .*bad\.toml: expected an integer, got 4\.5"),
        ("learning_rate = true", r"key 'learning_rate' in .*bad\.toml: expected a number, got True"),
        ('shuffle_caption = "yes"', r"key 'shuffle_caption' in .*bad\.toml: expected true or false, got 'yes'"),
        ('mixed_precision = "fp32"', r"key 'mixed_precision' in .*bad\.toml: expected one of 'no', 'fp16', 'bf16'"),
        ('optimizer_args = [["a"], ["b"]]', r"key 'optimizer_args' in .*bad\.toml: expected a string, got \['a'\]"),
        ('lr_warmup_steps = "many"', r"key 'lr_warmup_steps' in .*bad\.toml: expected an integer step count"),
        ("[a]\n[a.b]\nnetwork_dim = 4", r"bad\.toml: table \[a\.b\] is nested too deep"),
    ],
)
def test_bad_values_name_the_key_the_file_and_the_type(tmp_path, line, message):
    config = write(tmp_path / "bad.toml", line + "\n")
    with pytest.raises(ConfigError, match=message):
        apply_config_file(build_parser(), ["--config_file", str(config)], str(config))


def test_bad_config_ends_with_usage_error(tmp_path, capsys):
    config = write(tmp_path / "bad.toml", 'network_dim = "eight"\n')
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config_file", str(config)])
    assert exit_info.value.code == 2
    assert "key 'network_dim'" in capsys.readouterr().err


def test_numbers_given_as_strings_are_converted(tmp_path):
    config = write(tmp_path / "strings.toml", 'learning_rate = "1e-4"\nnetwork_dim = "16"\nresolution = 512\n')
    args = parse_args(["--config_file", str(config)])
    assert (args.learning_rate, args.network_dim, args.resolution) == (1e-4, 16, "512")


def test_missing_config_file_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match=f"--config_file: {missing}.toml not found"):
        read_config_file(missing)
    with pytest.raises(SystemExit):
        parse_args(["--config_file", str(missing)])
    assert f"{missing}.toml not found" in capsys.readouterr().err


def test_invalid_toml_names_the_file(tmp_path):
    config = write(tmp_path / "broken.toml", "network_dim = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML"):
        read_config_file(config)


def test_output_config_round_trip(tmp_path, capsys):
    argv = [
        "--pretrained_model_name_or_path", "tiny-sd1", "--network_dim", "8", "--network_alpha", "4",
        "--learning_rate", "3e-4", "--text_encoder_lr", "1e-5", "--optimizer_args", "weight_decay=0.01",
        "betas=(0.9,0.99)", "--lr_warmup_steps", "0.1", "--shuffle_caption", "--cache_latents",
        "--dataset_config", "data/set.toml", "--mixed_precision", "bf16", "--full_bf16", "--seed", "7",
        "--wandb_api_key", "secret", "--max_train_epochs", "3",
    ]
    expected = vars(parse_args(argv))
    out = tmp_path / "sub" / "saved"
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*argv, "--output_config", "--config_file", str(out)])
    assert exit_info.value.code == 0
    saved = tmp_path / "sub" / "saved.toml"
    assert capsys.readouterr().out == f"wrote the arguments to {saved} (train with: --config_file {saved})\n"

    written = toml.load(tmp_path / "sub" / "saved.toml")
    assert written["additional_network_arguments"] == {"network_dim": 8, "network_alpha": 4.0}
    assert written["optimizer_arguments"]["optimizer_args"] == ["weight_decay=0.01", "betas=(0.9,0.99)"]
    flat = {key: value for table in written.values() for key, value in table.items()}
    assert "wandb_api_key" not in flat and "max_train_steps" not in flat  # secrets and defaults are not written

    reread = vars(parse_args(["--config_file", str(out)]))
    for key in ("config_file", "wandb_api_key"):
        expected.pop(key), reread.pop(key)
    assert reread == expected
    assert isinstance(reread["dataset_config"], Path)


def test_output_config_never_overwrites(tmp_path):
    existing = write(tmp_path / "keep.toml", "network_dim = 4\n")
    parser = build_parser()
    with pytest.raises(ConfigError, match=r"keep\.toml already exists"):
        save_config_file(parser.parse_args(["--network_dim", "8"]), parser, existing)
    assert existing.read_text() == "network_dim = 4\n"


def test_output_config_needs_a_path(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--output_config"])
    assert exit_info.value.code == 2
    assert "--output_config needs --config_file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "sdxl", "message"),
    [
        (["--full_bf16"], False, r"--full_bf16 requires --mixed_precision bf16"),
        (["--full_fp16", "--mixed_precision", "bf16"], False, r"--full_fp16 requires --mixed_precision fp16"),
        (["--max_train_steps", "0"], False, r"--max_train_steps: expected 1 or more, got 0"),
        (["--max_train_epochs", "0"], False, r"--max_train_epochs: expected 1 or more, got 0"),
        (["--train_batch_size", "0"], False, r"--train_batch_size: expected 1 or more"),
        (["--resolution", "512x512"], False, r"--resolution: expected 'SIZE' or 'WIDTH,HEIGHT'.*'512x512'"),
        (["--network_train_unet_only", "--network_train_text_encoder_only"], False, r"exclude each other"),
        (["--enable_bucket", "--min_bucket_reso", "100"], False, r"--min_bucket_reso \(100\) must be divisible"),
        (["--enable_bucket", "--min_bucket_reso", "2048"], False, r"must not exceed --max_bucket_reso"),
        (["--caption_dropout_rate", "1.5"], False, r"--caption_dropout_rate: expected a value in \[0.0, 1.0\]"),
        (["--min_timestep", "500", "--max_timestep", "400"], False, r"must be smaller than --max_timestep"),
        (["--adaptive_noise_scale", "0.1"], False, r"--adaptive_noise_scale requires --noise_offset"),
        (["--nan_abort_steps", "-1"], False, r"--nan_abort_steps: expected 0 or more"),
        (["--lr_warmup_steps", "-3"], False, r"--lr_warmup_steps: expected 0 or more, got -3"),
        (["--v2"], True, r"--v2 cannot be used for SDXL"),
        (["--cache_text_encoder_outputs"], True, r"--cache_text_encoder_outputs requires --network_train_unet_only"),
        (["--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption",
          "--caption_tag_dropout_rate", "0.1"], True,
         r"cannot be used with --shuffle_caption, --caption_tag_dropout_rate"),
        (["--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--token_warmup_step", "10"], True,
         r"--cache_text_encoder_outputs cannot be used with --token_warmup_step"),
    ],
)
def test_verify_args_errors(argv, sdxl, message, capsys):
    args = build_parser(sdxl).parse_args(argv)
    args.cache_text_encoder_outputs = getattr(args, "cache_text_encoder_outputs", False) or getattr(
        args, "cache_text_encoder_outputs_to_disk", False)  # what parse_args' normalization does
    with pytest.raises(ConfigError, match=message):
        verify_args(args, sdxl)
    with pytest.raises(SystemExit):  # parse_args reports the same error as a usage error
        parse_args(argv, sdxl=sdxl)
    assert "error:" in capsys.readouterr().err


def test_verify_args_accepts_consistent_combinations():
    args = parse_args(["--mixed_precision", "bf16", "--full_bf16", "--enable_bucket", "--resolution", "640,512",
                       "--min_bucket_reso", "320", "--max_timestep", "1000"])
    verify_args(args, sdxl=False)
    args = parse_args(["--cache_text_encoder_outputs", "--network_train_unet_only", "--flip_aug"], sdxl=True)
    verify_args(args, sdxl=True)


@pytest.mark.parametrize(("text", "expected"), [("512", (512, 512)), ("512,768", (512, 768)), (" 64 , 32 ", (64, 32))])
def test_parse_resolution(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["", "512,", "a,b", "0", "512,768,1024", "-64"])
def test_parse_resolution_rejects(text):
    with pytest.raises(ConfigError, match=r"--size: expected 'SIZE' or 'WIDTH,HEIGHT'"):
        parse_resolution(text, flag="--size")


def test_compat_only_flags_are_accepted_and_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="library.config"):
        args = parse_args(["--torch_compile", "--dynamo_backend", "eager", "--xformers"])
    assert args.torch_compile and args.dynamo_backend == "eager"
    assert "--torch_compile is accepted for compatibility" in caplog.text
    assert "--dynamo_backend is accepted for compatibility" in caplog.text
    assert "xformers" not in caplog.text


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--dataset_class", "my.Dataset"], "--dataset_class"),
    ],
)
def test_unsupported_sd_scripts_flags_are_refused_by_name(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag} is an sd-scripts option this trainer does not support: " in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--min_snr_gamma", "-5"], "--min_snr_gamma: expected a value > 0, got -5.0"),
        (["--min_snr_gamma", "0"], "--min_snr_gamma: expected a value > 0, got 0.0"),
        (["--network_dropout", "1"], "--network_dropout: expected a value in [0, 1), got 1.0"),
        (["--network_dim", "0"], "--network_dim: expected a value >= 1, got 0"),
        (["--learning_rate=-1e-4"], "--learning_rate: expected a value >= 0, got -0.0001"),
        (["--text_encoder_lr", "1e-4", "-0.00001"], "--text_encoder_lr: expected values >= 0, got -1e-05"),
        (["--noise_offset", "-0.1"], "--noise_offset: expected a value >= 0, got -0.1"),
        (["--multires_noise_discount", "1.5"], "--multires_noise_discount: expected a value in [0, 1], got 1.5"),
        (["--huber_c", "0"], "--huber_c: expected a value > 0, got 0.0"),
        (["--dataset_repeats", "0"], "--dataset_repeats: expected a value >= 1, got 0"),
        (["--save_every_n_steps", "0"], "--save_every_n_steps: expected a value >= 1, got 0"),
        (["--clip_skip", "0"], "--clip_skip: expected a value >= 1, got 0"),
    ],
)
def test_values_out_of_their_range_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert f"error: {message}" in capsys.readouterr().err


def test_values_at_the_edge_of_their_range_pass():
    args = parse_args(["--min_snr_gamma", "0.001", "--network_dropout", "0", "--network_alpha", "0",
                       "--max_grad_norm", "0", "--multires_noise_discount", "1", "--text_encoder_lr", "0"])
    assert args.min_snr_gamma == 0.001 and args.network_alpha == 0


def test_normalization_of_implied_flags():
    args = parse_args(["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only",
                       "--max_token_length", "75", "--sample_every_n_steps", "0"], sdxl=True)
    assert args.cache_latents and args.cache_text_encoder_outputs
    assert args.max_token_length is None and args.sample_every_n_steps is None


EXAMPLES = sorted(path.name for path in CONFIGS.glob("*.toml") if path.name != "dataset_example.toml")


def test_examples_are_all_here():
    assert set(EXAMPLES) >= {"quickstart.toml", "sdxl_quickstart.toml", "sd15_lora_anlo.toml",
                             "sd15_lora_anlo_loraplus.toml", "sdxl_lora_anlo.toml"}


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_configs_parse_without_unknown_keys(name, caplog):
    sdxl = name.startswith("sdxl")
    with caplog.at_level(logging.WARNING, logger="library.config"):
        args = parse_args(["--config_file", str(CONFIGS / name)], sdxl=sdxl)
    assert caplog.text == ""
    assert args.optimizer_type == "ANLO" and args.network_module == "networks.lora"
    _, flat = read_config_file(CONFIGS / name)
    for key, value in flat.items():  # every value in the file reached args (converted, lists as lists)
        got = getattr(args, key)
        assert got == value or got == [value] or str(got) == str(value), key


def test_quickstart_settings():
    args = parse_args(["--config_file", str(CONFIGS / "quickstart.toml")])
    assert args.pretrained_model_name_or_path == "tiny-sd1" and args.train_data_dir == "data/demo/train"
    assert parse_resolution(args.resolution) == (64, 64)
    assert (args.output_dir, args.output_name, args.seed, args.max_data_loader_n_workers) == (
        "output/quickstart", "quickstart_lora", 42, 0)
    sdxl = parse_args(["--config_file", str(CONFIGS / "sdxl_quickstart.toml")], sdxl=True)
    assert sdxl.pretrained_model_name_or_path == "tiny-sdxl"
    assert sdxl.cache_text_encoder_outputs and sdxl.network_train_unet_only


def test_loraplus_example_passes_the_ratio():
    args = parse_args(["--config_file", str(CONFIGS / "sd15_lora_anlo_loraplus.toml")])
    assert args.network_args == ["loraplus_lr_ratio=16"]


def test_dataset_example_is_a_dataset_config():
    path = CONFIGS / "dataset_example.toml"
    data = toml.load(path)
    assert set(data) == {"general", "datasets"}
    subsets = [subset for dataset in data["datasets"] for subset in dataset["subsets"]]
    assert all("image_dir" in subset and subset["num_repeats"] >= 1 for subset in subsets)
    assert [subset.get("is_reg", False) for subset in subsets].count(True) == 1
    assert parse_args(["--dataset_config", str(path)]).dataset_config == path


# Flat, key-sorted, the way the kohya_ss GUI (kohya_gui/lora_gui.py) writes a --config_file: text-box arguments
# split on whitespace into lists, some flags as 0/1, max_token_length 75 for the default, GUI-only keys such as
# `epoch` and `noise_offset_type`, and empty/False/None values left out.
KOHYA_SS_GUI_TOML = """\
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_dropout_every_n_epochs = 0
caption_extension = ".txt"
clip_skip = 2
dynamo_backend = "no"
enable_bucket = true
epoch = 10
gradient_accumulation_steps = 1
huber_c = 0.1
huber_schedule = "snr"
keep_tokens = 0
learning_rate = 0.0001
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 10
lr_scheduler_power = 1
lr_warmup_steps = 120
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_token_length = 75
max_train_steps = 1200
min_bucket_reso = 256
mixed_precision = "fp16"
multires_noise_discount = 0.3
network_alpha = 1
network_args = []
network_dim = 8
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_args = [ "weight_decay=0.01", "normalize_frequency=2",]
optimizer_type = "library.hina_anlo.ANLO"
output_dir = "/train/model"
output_name = "last"
persistent_data_loader_workers = 1
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
prior_loss_weight = 1
resolution = "512,512"
sample_prompts = "/train/model/prompt.txt"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
sdpa = true
seed = 1234
text_encoder_lr = 5e-5
train_batch_size = 1
train_data_dir = "/train/img"
unet_lr = 0.0001
"""


def test_kohya_ss_gui_config(tmp_path, caplog):
    config = write(tmp_path / "config_lora-20250101-120000.toml", KOHYA_SS_GUI_TOML)
    with caplog.at_level(logging.WARNING, logger="library.config"):
        args = parse_args(["--config_file", str(config)])
    ignored = sorted(line.split("'")[1] for line in caplog.text.splitlines() if "ignored" in line)
    assert ignored == ["epoch", "noise_offset_type"]  # GUI bookkeeping keys, warned with the reason
    assert args.optimizer_type == "library.hina_anlo.ANLO"
    assert args.optimizer_args == ["weight_decay=0.01", "normalize_frequency=2"]
    assert args.network_args == [] and args.lr_scheduler_args == []
    assert args.persistent_data_loader_workers is True
    assert args.max_token_length is None
    assert args.text_encoder_lr == [5e-5] and args.unet_lr == 1e-4
    assert args.lr_warmup_steps == 120 and args.max_grad_norm == 1.0 and args.network_alpha == 1.0
    assert parse_resolution(args.resolution) == (512, 512)


def test_text_box_arguments_given_as_one_string(tmp_path):
    config = write(
        tmp_path / "textbox.toml",
        'optimizer_args = "weight_decay=0.01 betas=0.9,0.999"\nnetwork_args = "conv_dim=4  conv_alpha=1"\n'
        "base_weights_multiplier = 0.5\n",
    )
    args = parse_args(["--config_file", str(config)])
    assert args.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.base_weights_multiplier == [0.5]


def test_duplicate_keys_across_sections_warn_and_the_last_wins(tmp_path, caplog):
    config = write(tmp_path / "dup.toml", "[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 8\n")
    with caplog.at_level(logging.WARNING, logger="library.config"):
        args = parse_args(["--config_file", str(config)])
    assert args.network_dim == 8
    assert "'network_dim' is set in [a] and again in [b]" in caplog.text
