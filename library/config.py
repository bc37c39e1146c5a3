"""Every command-line flag of ``train_network.py`` / ``sdxl_train_network.py``; ``--config_file``, ``--output_config``.

This is the one place where flags are defined. Names, types, choices and defaults follow kohya-ss/sd-scripts so that
existing command lines and TOML files keep working; the few flags of our own are marked "(ours)" in their help.

``--config_file X`` reads ``X`` (``.toml`` appended when missing). Top-level keys are used as they are; the keys of
every top-level table are merged in with the table's name ignored (one level deep), so both the flat files the kohya_ss
GUI writes and the sectioned ``[model_arguments]`` / ``[training_arguments]`` layout work. The command line beats the
file, the file beats the defaults. Unlike sd-scripts, file values are checked against the flag's type and choices
(a wrong type is an error naming the key and the file), and unknown keys are warned about by name.

``--output_config --config_file X`` writes the arguments that differ from the defaults to ``X`` and exits.

What each sd-scripts flag does here is decided in ``library/upstream_flags.py``: implemented, accepted without effect
(help starts with ``COMPAT_ONLY``; warned about when set) or refused (help starts with ``NOT_SUPPORTED``; an error
when set, on the command line or in a config file), so that a run never silently differs from what its config asks
for. Upstream flags no group below defines are added from there, in their own group. Keys the kohya_ss GUI writes
that are no flag (``epoch``, ...) are warned about with the reason; other unknown keys are warned about by name.

Public API::

    build_parser(sdxl=False) -> argparse.ArgumentParser
    parse_args(argv=None, sdxl=False) -> argparse.Namespace     # parse, merge --config_file, normalize, verify
    read_config_file(path) -> (resolved_path, flat_dict)
    config_file_values(parser, path) -> {dest: converted value}
    apply_config_file(parser, argv, config_file) -> argparse.Namespace
    save_config_file(args, parser, config_file) -> resolved_path
    verify_args(args, sdxl) -> None                             # raises ConfigError
    parse_resolution(text, flag="--resolution") -> (width, height)
    int_or_float(text) -> int | float                           # type of --lr_warmup_steps / --lr_decay_steps
    toml_path(config_file) -> str                               # ".toml" appended when missing
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import toml

from library import upstream_flags
from library.atomic import atomic_output
from library.errors import UserInputError
from library.fp8 import fp8_argument_error

logger = logging.getLogger(__name__)

# Title of the group that holds the upstream flags defined only so that they are warned about or refused.
UNUSED_GROUP = "sd-scripts flags not implemented here (see docs/COMPATIBILITY.md)"

# Argument groups: help title -> the table name used when --output_config writes a sectioned file.
SECTIONS: dict[str, str] = {
    "model": "model_arguments",
    "dataset": "dataset_arguments",
    "network": "additional_network_arguments",
    "optimizer": "optimizer_arguments",
    "training loop": "training_arguments",
    "saving": "saving_arguments",
    "resume": "resume_arguments",
    "logging": "logging_arguments",
    "sampling": "sample_prompt_arguments",
    "validation": "validation_arguments",
    "SDXL": "sdxl_arguments",
    "config file": "config_arguments",
    UNUSED_GROUP: "unused_arguments",
}

SAMPLERS = [
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
]  # fmt: skip

COMPAT_ONLY = "Accepted for compatibility with sd-scripts, not used."
NOT_SUPPORTED = "Not supported by this trainer (an error when set):"


def _compat_only(why: str) -> str:
    return f"{COMPAT_ONLY} {why}"


def _not_supported(what: str) -> str:
    return f"{NOT_SUPPORTED} {what}"


# Never read from a config file, never written by --output_config.
_CONFIG_CONTROL_KEYS = ("config_file", "output_config")
_NOT_SAVED = (*_CONFIG_CONTROL_KEYS, "wandb_api_key")


class ConfigError(UserInputError):
    """A command-line argument or config-file value is invalid; the message names the flag/key and what was expected."""


def int_or_float(text: str) -> int | float:
    """Parse a step count: an integer is a number of steps; a decimal (``0.05``, ``1.0``) or a percentage (``"5%"``)
    is a fraction of the training steps, between 0 and 1. A TOML integer/float keeps that meaning."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        fraction = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a step count (integer) nor a fraction (0 to 1, or a percentage)"
        ) from None
    if not 0.0 <= fraction <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction of the training steps must be between 0 and 1")
    return fraction


# What each `type=` expects, for error messages.
_TYPE_NAMES: dict[Callable[..., Any], str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    Path: "a path (string)",
    int_or_float: "an integer step count, or a fraction of the steps from 0 to 1 (or a percentage such as \"10%\")",
}


# region parser


def _add_model_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="base model: diffusers folder, .safetensors/.ckpt file, or an embedded tiny model name "
                            "(tiny-sd1, tiny-sdxl)")
    group.add_argument("--pretrained_model_config", type=str, default=None,
                       help="(ours) local diffusers folder holding the component configs of a single-file model; "
                            "nothing is ever downloaded")
    group.add_argument("--v2", action="store_true", help="the base model is Stable Diffusion 2.x")
    group.add_argument("--v_parameterization", action="store_true", help="train with v-prediction targets")
    group.add_argument("--vae", type=str, default=None, help="replace the model's VAE with this checkpoint or folder")
    group.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 under mixed precision")
    group.add_argument("--tokenizer_cache_dir", type=str, default=None,
                       help="folder caching the tokenizers")
    group.add_argument("--clip_skip", type=int, default=None,
                       help="use the output of the n-th last text-encoder layer (n >= 1)")
    group.add_argument("--max_token_length", type=int, default=None, choices=[None, 75, 150, 225],
                       help="text-encoder token length: 75 (default, also written as None), 150 or 225")
    group.add_argument("--xformers", action="store_true", help="use xformers attention")
    group.add_argument("--sdpa", action="store_true", help="use PyTorch scaled-dot-product attention")
    group.add_argument("--mem_eff_attn", action="store_true",
                       help="memory-efficient attention")
    group.add_argument("--lowram", action="store_true", help="load models straight to the accelerator (low host RAM)")
    group.add_argument("--highvram", action="store_true",
                       help="skip clearing caches (plenty of VRAM)")
    group.add_argument("--fp8_base", action="store_true",
                       help="store the frozen U-Net and text encoders in float8 (e4m3fn), computed in the "
                            "--mixed_precision dtype; needs fp16 or bf16")
    group.add_argument("--fp8_base_unet", action="store_true",
                       help="store only the frozen U-Net in float8 (e4m3fn), the text encoders in the "
                            "--mixed_precision dtype; needs fp16 or bf16")
    group.add_argument("--torch_compile", action="store_true", help="compile the model with torch.compile")
    group.add_argument("--dynamo_backend", type=str, default="inductor",
                       help="backend of --torch_compile")


def _add_dataset_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="folder of '<repeats>_<class tokens>' image folders (DreamBooth layout)")
    group.add_argument("--reg_data_dir", type=str, default=None, help="folder of regularization image folders")
    group.add_argument("--dataset_config", type=Path, default=None,
                       help="dataset TOML with [general], [[datasets]], [[datasets.subsets]]")
    group.add_argument("--in_json", type=str, default=None,
                       help="metadata JSON of a fine-tuning dataset (sd-scripts' finetune/ tools), images in "
                            "--train_data_dir")
    group.add_argument("--dataset_repeats", type=int, default=1,
                       help="repeats of an --in_json dataset (and of --dataset_config subsets without num_repeats)")
    group.add_argument("--resolution", type=str, default=None, help="training resolution: 'SIZE' or 'WIDTH,HEIGHT'")
    group.add_argument("--enable_bucket", action="store_true", help="aspect-ratio buckets")
    group.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    group.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    group.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket side step (a multiple of 8)")
    group.add_argument("--bucket_no_upscale", action="store_true", help="never upscale an image to fill a bucket")
    group.add_argument("--resize_interpolation", type=str, default=None,
                       choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"],
                       help="interpolation used when resizing images (default: area when shrinking, lanczos when "
                            "enlarging, as sd-scripts)")
    group.add_argument("--caption_extension", type=str, default=".caption", help="extension of caption files")
    group.add_argument("--caption_extention", type=str, default=None,
                       help="old misspelled alias of --caption_extension; overrides it when given")
    group.add_argument("--shuffle_caption", action="store_true", help="shuffle the separated parts of each caption")
    group.add_argument("--caption_separator", type=str, default=",", help="separator of caption parts")
    group.add_argument("--keep_tokens", type=int, default=0, help="keep the first N caption parts in place")
    group.add_argument("--keep_tokens_separator", type=str, default="",
                       help="caption parts before this separator stay in place")
    group.add_argument("--secondary_separator", type=str, default=None,
                       help="separator replaced by --caption_separator after shuffling/dropout")
    group.add_argument("--enable_wildcard", action="store_true", help="expand '{a|b|c}' wildcards in captions")
    group.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    group.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0, help="probability of an empty caption")
    group.add_argument("--caption_dropout_every_n_epochs", type=int, default=0,
                       help="drop all captions every N epochs")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                       help="probability of dropping each caption part")
    group.add_argument("--token_warmup_min", type=int, default=1, help="caption parts used at the first step")
    group.add_argument("--token_warmup_step", type=float, default=0,
                       help="step at which all caption parts are used (N < 1: fraction of max_train_steps)")
    group.add_argument("--weighted_captions", action="store_true",
                       help="read '(word:1.2)', '(word)', '[word]' weights in captions (sd-scripts' syntax)")
    group.add_argument("--color_aug", action="store_true", help="weak colour augmentation")
    group.add_argument("--flip_aug", action="store_true", help="horizontal flip augmentation")
    group.add_argument("--face_crop_aug_range", type=str, default=None,
                       help="face-centred crop augmentation range, e.g. '2.0,4.0'")
    group.add_argument("--random_crop", action="store_true", help="random instead of centre crop")
    group.add_argument("--alpha_mask", action="store_true",
                       help="the images' alpha channel is the loss mask, for every subset that does not set "
                            "alpha_mask itself (see --masked_loss)")
    group.add_argument("--masked_loss", action="store_true",
                       help="weight the loss per pixel by a mask: the red channel of the image with the same name "
                            "in each --dataset_config subset's conditioning_data_dir (alpha masks apply with or "
                            "without this flag)")
    group.add_argument("--conditioning_data_dir", type=str, default=None,
                       help=_compat_only("sd-scripts' train_network.py reads mask images only from "
                                         "conditioning_data_dir in --dataset_config subsets."))
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    group.add_argument("--debug_dataset", action="store_true",
                       help="show the dataset instead of training")
    group.add_argument("--cache_latents", action="store_true", help="encode every image once and keep the latents")
    group.add_argument("--cache_latents_to_disk", action="store_true",
                       help="cache latents in .npz files next to the images (implies --cache_latents)")
    group.add_argument("--vae_batch_size", type=int, default=1, help="batch size when caching latents")
    group.add_argument("--skip_cache_check", action="store_true", help="trust existing cache files without checking")
    group.add_argument("--max_data_loader_n_workers", type=int, default=8, help="most DataLoader worker processes")
    group.add_argument("--persistent_data_loader_workers", action="store_true",
                       help="keep DataLoader workers alive between epochs")
    group.add_argument("--cache_info", action="store_true", help="cache image sizes and captions in a file")
    group.add_argument("--dataset_class", type=str, default=None, help="user-defined dataset class (dotted path)")


def _add_network_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--network_module", type=str, default=None,
                       help="module that builds the network, e.g. networks.lora or lycoris.kohya")
    group.add_argument("--network_dim", type=int, default=None,
                       help="rank; None lets the network module choose (networks.lora: 4)")
    group.add_argument("--network_alpha", type=float, default=1, help="alpha; the LoRA scale is alpha / rank")
    group.add_argument("--network_dropout", type=float, default=None, help="neuron dropout of the network")
    group.add_argument("--network_args", type=str, default=None, nargs="*",
                       help="extra key=value arguments for the network module, e.g. conv_dim=4 loraplus_lr_ratio=16")
    group.add_argument("--network_weights", type=str, default=None, help="initial network weights to load")
    group.add_argument("--dim_from_weights", action="store_true", help="take the rank from --network_weights")
    group.add_argument("--network_train_unet_only", action="store_true", help="train only the U-Net part")
    group.add_argument("--network_train_text_encoder_only", action="store_true",
                       help="train only the text-encoder part")
    group.add_argument("--scale_weight_norms", type=float, default=None,
                       help="rescale each module whose weight norm exceeds this (max-norm regularization)")
    group.add_argument("--base_weights", type=str, default=None, nargs="*",
                       help="LoRA files (kohya LoRA, LyCORIS LoCon/LoHa) merged into the model before training")
    group.add_argument("--base_weights_multiplier", type=float, default=None, nargs="*",
                       help="multiplier of each --base_weights file (1.0 for files without one)")


def _add_optimizer_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--optimizer_type", type=str, default="",
                       help="optimizer: ANLO, AdamW (default), AdamW8bit, Lion, Prodigy, DAdaptAdam, Adafactor, ..., "
                            "a torch.optim class name or a dotted path such as library.hina_anlo.ANLO")
    group.add_argument("--optimizer_args", type=str, default=None, nargs="*",
                       help="extra key=value optimizer arguments, values as Python literals, "
                            "e.g. weight_decay=0.01 betas=0.9,0.999")
    group.add_argument("--use_8bit_adam", action="store_true", help="old spelling of --optimizer_type AdamW8bit")
    group.add_argument("--use_lion_optimizer", action="store_true", help="old spelling of --optimizer_type Lion")
    group.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate of groups without their own")
    group.add_argument("--unet_lr", type=float, default=None, help="learning rate of the U-Net modules")
    group.add_argument("--text_encoder_lr", type=float, default=None, nargs="*",
                       help="learning rate of the text-encoder modules; one value, or one per text encoder")
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm; 0 disables")
    group.add_argument("--lr_scheduler", type=str, default="constant",
                       help="constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, "
                            "adafactor, ...")
    group.add_argument("--lr_scheduler_type", type=str, default="", help="custom scheduler class (dotted path)")
    group.add_argument("--lr_scheduler_args", type=str, default=None, nargs="*",
                       help="extra key=value arguments of --lr_scheduler_type")
    group.add_argument("--lr_warmup_steps", type=int_or_float, default=0,
                       help="warm-up steps (integer), or a fraction of the training steps (0.05, 1.0, '5%%')")
    group.add_argument("--lr_decay_steps", type=int_or_float, default=0,
                       help="decay steps (integer), or a fraction of the training steps (0.05, 1.0, '5%%')")
    group.add_argument("--lr_scheduler_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    group.add_argument("--lr_scheduler_power", type=float, default=1, help="power of the polynomial scheduler")
    group.add_argument("--lr_scheduler_timescale", type=int, default=None,
                       help="timescale of the inverse-sqrt scheduler (default: warm-up steps)")
    group.add_argument("--lr_scheduler_min_lr_ratio", type=float, default=None,
                       help="final learning rate as a fraction of the initial one")
    group.add_argument("--fused_backward_pass", action="store_true",
                       help="fuse the optimizer step into the backward pass")


def _add_training_loop_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--max_train_steps", type=int, default=1600, help="training steps")
    group.add_argument("--max_train_epochs", type=int, default=None, help="training epochs (overrides steps)")
    group.add_argument("--train_batch_size", type=int, default=1, help="batch size")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="batches accumulated per optimizer step")
    group.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    group.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"],
                       help="mixed precision")
    group.add_argument("--full_fp16", action="store_true", help="fp16 weights and gradients (needs fp16)")
    group.add_argument("--full_bf16", action="store_true", help="bf16 weights and gradients (needs bf16)")
    group.add_argument("--seed", type=int, default=None, help="random seed")
    group.add_argument("--min_timestep", type=int, default=None, help="smallest timestep sampled (0-999, default 0)")
    group.add_argument("--max_timestep", type=int, default=None,
                       help="timesteps are sampled below this (1-1000, default 1000)")
    group.add_argument("--noise_offset", type=float, default=None, help="noise offset (around 0.1 when used)")
    group.add_argument("--noise_offset_random_strength", action="store_true",
                       help="noise offset strength uniform in [0, noise_offset]")
    group.add_argument("--adaptive_noise_scale", type=float, default=None,
                       help="add |latent mean| * this to the noise offset (needs --noise_offset)")
    group.add_argument("--multires_noise_iterations", type=int, default=None, help="multi-resolution noise iterations")
    group.add_argument("--multires_noise_discount", type=float, default=0.3, help="multi-resolution noise discount")
    group.add_argument("--ip_noise_gamma", type=float, default=None, help="input perturbation noise (around 0.1)")
    group.add_argument("--ip_noise_gamma_random_strength", action="store_true",
                       help="input perturbation strength uniform in [0, ip_noise_gamma]")
    group.add_argument("--min_snr_gamma", type=float, default=None, help="min-SNR loss weighting gamma (5 is common)")
    group.add_argument("--scale_v_pred_loss_like_noise_pred", action="store_true",
                       help="scale the v-prediction loss like the noise-prediction loss")
    group.add_argument("--v_pred_like_loss", type=float, default=None, help="add a v-prediction-like loss times this")
    group.add_argument("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    group.add_argument("--zero_terminal_snr", action="store_true", help="rescale betas to zero terminal SNR")
    group.add_argument("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"],
                       help="loss function")
    group.add_argument("--huber_schedule", type=str, default="snr", choices=["constant", "exponential", "snr"],
                       help="schedule of the Huber parameter")
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber parameter")
    group.add_argument("--huber_scale", type=float, default=1.0, help="Huber loss scale")
    group.add_argument("--nan_abort_steps", type=int, default=10,
                       help="(ours) stop with an error after this many consecutive non-finite losses; 0 never stops")
    group.add_argument("--ddp_timeout", type=int, default=None, help="DDP timeout in minutes")
    group.add_argument("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    group.add_argument("--ddp_static_graph", action="store_true", help="DDP static_graph")


def _add_saving_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--output_dir", type=str, default=None, help="folder for the trained network")
    group.add_argument("--output_name", type=str, default=None, help="file name of the trained network, no extension")
    group.add_argument("--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"],
                       help="file format")
    group.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                       help="dtype of the saved weights")
    group.add_argument("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    group.add_argument("--save_every_n_steps", type=int, default=None, help="save every N steps")
    group.add_argument("--save_n_epoch_ratio", type=int, default=None, help="save at least N times over the run")
    group.add_argument("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    group.add_argument("--save_last_n_steps", type=int, default=None, help="remove step saves older than N steps")
    group.add_argument("--no_metadata", action="store_true", help="write no ss_* metadata into the file")
    group.add_argument("--training_comment", type=str, default=None, help="comment stored in the metadata")
    group.add_argument("--metadata_title", type=str, default=None, help="modelspec title (default: output_name)")
    group.add_argument("--metadata_author", type=str, default=None, help="modelspec author")
    group.add_argument("--metadata_description", type=str, default=None, help="modelspec description")
    group.add_argument("--metadata_license", type=str, default=None, help="modelspec license")
    group.add_argument("--metadata_tags", type=str, default=None, help="modelspec tags, comma separated")


def _add_resume_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--save_state", action="store_true",
                       help="also save the training state (optimizer, scheduler, step) with each save")
    group.add_argument("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    group.add_argument("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    group.add_argument("--save_last_n_steps_state", type=int, default=None,
                       help="remove states older than N steps")
    group.add_argument("--resume", type=str, default=None, help="state folder to resume from")


def _add_logging_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--logging_dir", type=str, default=None, help="write TensorBoard logs to this folder")
    group.add_argument("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"],
                       help="logging back end")
    group.add_argument("--log_prefix", type=str, default=None, help="prefix of the log folder name")
    group.add_argument("--log_tracker_name", type=str, default=None, help="tracker (project) name")
    group.add_argument("--log_tracker_config", type=str, default=None,
                       help="TOML file of tracker settings")
    group.add_argument("--log_config", action="store_true", help="log the training arguments")
    group.add_argument("--wandb_run_name", type=str, default=None, help="wandb run name")
    group.add_argument("--wandb_api_key", type=str, default=None, help="wandb API key (never written to configs)")
    group.add_argument("--console_log_level", type=str, default=None,
                       choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="console log level")
    group.add_argument("--console_log_file", type=str, default=None, help="also write the console log to this file")
    group.add_argument("--console_log_simple", action="store_true",
                       help="plain console log")


def _add_sampling_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--sample_every_n_steps", type=int, default=None, help="sample images every N steps")
    group.add_argument("--sample_every_n_epochs", type=int, default=None,
                       help="sample images every N epochs (overrides steps)")
    group.add_argument("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    group.add_argument("--sample_sampler", type=str, default="ddim", choices=SAMPLERS, help="sampler")
    group.add_argument("--sample_at_first", action="store_true", help="sample before training")


def _add_validation_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--validation_split", type=float, default=0.0, help="fraction of images held out")
    group.add_argument("--validation_seed", type=int, default=None, help="seed of the split (default: --seed)")
    group.add_argument("--validate_every_n_steps", type=int, default=None, help="validate every N steps")
    group.add_argument("--validate_every_n_epochs", type=int, default=None, help="validate every N epochs")
    group.add_argument("--max_validation_steps", type=int, default=None, help="most validation batches per run")


def _add_sdxl_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--cache_text_encoder_outputs", action="store_true",
                       help="encode every caption once (needs --network_train_unet_only)")
    group.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                       help="cache text-encoder outputs in .npz files (implies --cache_text_encoder_outputs)")
    group.add_argument("--disable_mmap_load_safetensors", action="store_true",
                       help="read safetensors files without memory-mapping")


def _add_config_file_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--config_file", type=str, default=None,
                       help="TOML file of arguments ('.toml' appended when missing); the command line wins")
    group.add_argument("--output_config", action="store_true",
                       help="write the non-default arguments to --config_file and exit")


def build_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    """The parser of ``train_network.py`` (``sdxl=False``) or ``sdxl_train_network.py`` (``sdxl=True``)."""
    parser = argparse.ArgumentParser(
        prog="sdxl_train_network.py" if sdxl else "train_network.py",
        description="Train a LoRA network for Stable Diffusion " + ("XL" if sdxl else "1.x/2.x"),
        usage="%(prog)s [--config_file FILE] [options]   (every option: --help)",
    )
    builders = {
        "model": _add_model_arguments,
        "dataset": _add_dataset_arguments,
        "network": _add_network_arguments,
        "optimizer": _add_optimizer_arguments,
        "training loop": _add_training_loop_arguments,
        "saving": _add_saving_arguments,
        "resume": _add_resume_arguments,
        "logging": _add_logging_arguments,
        "sampling": _add_sampling_arguments,
        "validation": _add_validation_arguments,
        "SDXL": _add_sdxl_arguments,
        "config file": _add_config_file_arguments,
    }
    for title, add_arguments in builders.items():
        if title == "SDXL" and not sdxl:
            continue
        add_arguments(parser.add_argument_group(title))
    _add_registry_flags(parser)
    return parser


def _add_registry_flags(parser: argparse.ArgumentParser) -> None:
    """Define the upstream flags that no group defines (``upstream_flags.PARSER_SPECS``) and give every flag that
    is not implemented its help from ``library.upstream_flags``."""
    defined = _actions_by_dest(parser)
    group = parser.add_argument_group(UNUSED_GROUP)
    for name, spec in upstream_flags.PARSER_SPECS.items():
        if name not in defined:
            group.add_argument(f"--{name}", **spec)
    for action in parser._actions:
        entry = upstream_flags.FLAGS.get(action.dest)
        if entry is None or entry.status is upstream_flags.Status.IMPLEMENTED:
            continue
        action.help = (_compat_only if entry.status is upstream_flags.Status.NO_EFFECT else _not_supported)(
            entry.note.replace("%", "%%")
        )


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def _section_by_dest(parser: argparse.ArgumentParser) -> dict[str, str]:
    sections = {}
    for group in parser._action_groups:
        if group.title in SECTIONS:
            for action in group._group_actions:
                sections[action.dest] = SECTIONS[group.title]
    return sections


# endregion

# region config file


def toml_path(config_file: str | os.PathLike[str]) -> str:
    """``config_file`` with ``.toml`` appended when it does not already end with it (as sd-scripts does)."""
    path = os.fspath(config_file)
    return path if path.endswith(".toml") else path + ".toml"


def read_config_file(config_file: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Read a ``--config_file`` TOML and flatten it one level: returns ``(resolved path, {key: value})``.

    Top-level keys are kept; the keys of each top-level table are merged in, the table name ignored.
    """
    path = toml_path(config_file)
    if not os.path.isfile(path):
        raise ConfigError(f"--config_file: {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = toml.load(f)
    except (toml.TomlDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config_file: {path} is not valid TOML: {error}") from None

    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for name, value in data.items():
        entries = value.items() if isinstance(value, dict) else [(name, value)]
        where = f"[{name}]" if isinstance(value, dict) else "the top level"
        for key, item in entries:
            if isinstance(item, dict):
                raise ConfigError(
                    f"--config_file: {path}: table [{name}.{key}] is nested too deep; "
                    "only top-level keys and one level of [sections] are read"
                )
            if key in flat and flat[key] != item:
                logger.warning("%s: %r is set in %s and again in %s; using the value from %s",
                               path, key, origin[key], where, where)
            flat[key] = item
            origin[key] = where
    return path, flat


def _describe(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(repr(choice) for choice in action.choices if choice is not None)
    return _TYPE_NAMES.get(action.type or str, f"a value accepted by {getattr(action.type, '__name__', action.type)}")


def _coerce_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    """Convert one TOML value to what ``action`` would produce from the command line, or raise ConfigError."""
    kind = action.type or str
    expected = _describe(action)
    if isinstance(value, (bool, list, dict)) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    try:
        if kind is str:
            converted: Any = str(value)
        elif kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            converted = int(value)
        elif kind is float:
            converted = float(value)
        else:
            converted = kind(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    return converted


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """Convert a config-file value for ``action``: flags take true/false, list flags a list or a whitespace string."""
    if action.nargs == 0:  # store_true / store_false
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # the kohya_ss GUI writes some flags as 0/1
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if action.nargs in ("*", "+"):
        if isinstance(value, str):  # e.g. optimizer_args typed into a GUI text box
            value = value.split()
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(action, item, where) for item in items]
    return _coerce_scalar(action, value, where)


def config_file_values(parser: argparse.ArgumentParser, config_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The values of ``config_file`` converted for ``parser``'s flags; unknown keys are warned about and dropped."""
    path, raw = read_config_file(config_file)
    actions = _actions_by_dest(parser)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _CONFIG_CONTROL_KEYS:
            logger.warning("%s: %r is ignored inside a config file; give it on the command line", path, key)
            continue
        if key in upstream_flags.CONFIG_FILE_ONLY:
            logger.warning("%s: %r is ignored: %s", path, key, upstream_flags.CONFIG_FILE_ONLY[key])
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            if key == "datasets":
                hint = " ([[datasets]] belongs in a --dataset_config file)"
            logger.warning("%s: unknown key %r ignored%s", path, key, hint)
            continue
        values[key] = _coerce(actions[key], value, f"key {key!r} in {path}")
    return values


def apply_config_file(
    parser: argparse.ArgumentParser, argv: Sequence[str], config_file: str | os.PathLike[str]
) -> argparse.Namespace:
    """Parse ``argv`` with the values of ``config_file`` in place of the defaults (command line > file > default)."""
    values = config_file_values(parser, config_file)
    logger.info("loaded %d settings from %s", len(values), toml_path(config_file))
    args = parser.parse_args(list(argv), namespace=argparse.Namespace(**values))
    args.config_file = toml_path(config_file)
    return args


def save_config_file(
    args: argparse.Namespace, parser: argparse.ArgumentParser, config_file: str | os.PathLike[str]
) -> str:
    """Write the arguments that differ from ``parser``'s defaults to ``config_file`` (``.toml`` appended).

    Written as one table per argument group (``[model_arguments]``, ``[training_arguments]``, ...); never
    overwrites an existing file, never writes ``wandb_api_key``. Returns the path written.
    """
    path = toml_path(config_file)
    if os.path.exists(path):
        raise ConfigError(f"--output_config: {path} already exists; not overwriting it")
    defaults = vars(parser.parse_args([]))
    sections = _section_by_dest(parser)
    tables: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key in _NOT_SAVED or value is None or value == defaults.get(key):
            continue
        if isinstance(value, Path):
            value = str(value)
        tables.setdefault(sections[key], {})[key] = value
    with atomic_output(path, "w", encoding="utf-8") as file:
        file.write(toml.dumps(tables))
    return path


# endregion

# region checks


def parse_resolution(text: str, flag: str = "--resolution") -> tuple[int, int]:
    """``"512"`` -> ``(512, 512)``, ``"512,768"`` -> ``(512, 768)`` as (width, height); errors name ``flag``."""
    parts = [part.strip() for part in str(text).split(",")]
    if len(parts) == 1:
        parts = parts * 2
    try:
        width, height = (int(part) for part in parts)
    except ValueError:
        width = height = 0
    if len(parts) != 2 or width <= 0 or height <= 0:
        raise ConfigError(f"{flag}: expected 'SIZE' or 'WIDTH,HEIGHT' with positive integers, got {text!r}")
    return width, height


def _check_range(args: argparse.Namespace, name: str, low: float, high: float, high_inclusive: bool = True) -> None:
    value = getattr(args, name)
    if value is None:
        return
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not inside:
        bracket = "]" if high_inclusive else ")"
        raise ConfigError(f"--{name}: expected a value in [{low}, {high}{bracket}, got {value}")


# Flags with a meaningful range: name -> (low, high, low inclusive, high inclusive); None is no bound.
_VALUE_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "min_snr_gamma": (0, None, False, True),  # weights min(SNR, gamma) / SNR: gamma <= 0 gives zero/negative weights
    "network_dim": (1, None, True, True),
    "network_alpha": (0, None, True, True),  # 0 means alpha = rank in networks.lora, as upstream
    "network_dropout": (0, 1, True, False),
    "scale_weight_norms": (0, None, False, True),
    "learning_rate": (0, None, True, True),
    "unet_lr": (0, None, True, True),
    "max_grad_norm": (0, None, True, True),  # 0 disables clipping
    "lr_scheduler_num_cycles": (1, None, True, True),
    "lr_scheduler_timescale": (1, None, True, True),
    "lr_scheduler_min_lr_ratio": (0, 1, True, True),
    "prior_loss_weight": (0, None, True, True),
    "noise_offset": (0, None, True, True),
    "ip_noise_gamma": (0, None, True, True),
    "multires_noise_iterations": (0, None, True, True),
    "multires_noise_discount": (0, 1, True, True),
    "v_pred_like_loss": (0, None, True, True),
    "huber_c": (0, None, False, True),
    "huber_scale": (0, None, False, True),
    "clip_skip": (1, None, True, True),
    "keep_tokens": (0, None, True, True),
    "token_warmup_min": (0, None, True, True),
    "token_warmup_step": (0, None, True, True),
    "caption_dropout_every_n_epochs": (0, None, True, True),
    "dataset_repeats": (1, None, True, True),
    "min_bucket_reso": (1, None, True, True),
    "max_bucket_reso": (1, None, True, True),
    "save_every_n_epochs": (1, None, True, True),
    "save_every_n_steps": (1, None, True, True),
    "save_n_epoch_ratio": (1, None, True, True),
    "save_last_n_epochs": (1, None, True, True),
    "save_last_n_epochs_state": (1, None, True, True),
    "save_last_n_steps": (1, None, True, True),
    "save_last_n_steps_state": (1, None, True, True),
    "validate_every_n_steps": (1, None, True, True),
    "validate_every_n_epochs": (1, None, True, True),
    "max_validation_steps": (1, None, True, True),
    "ddp_timeout": (1, None, True, True),
}


def _check_value_ranges(args: argparse.Namespace) -> None:
    """Each flag of ``_VALUE_RANGES`` that is set lies in its range (``--text_encoder_lr``: every value >= 0)."""
    for name, (low, high, low_inclusive, high_inclusive) in _VALUE_RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high:
            lower = "" if low is None else ("[" if low_inclusive else "(") + f"{low}"
            upper = "" if high is None else f"{high}" + ("]" if high_inclusive else ")")
            expected = f"a value in {lower}, {upper}" if lower and upper else (
                f"a value {'>=' if low_inclusive else '>'} {low}" if lower else f"a value <= {high}")
            raise ConfigError(f"--{name}: expected {expected}, got {value}")
    for value in args.text_encoder_lr or []:
        if value < 0:
            raise ConfigError(f"--text_encoder_lr: expected values >= 0, got {value}")


def verify_args(args: argparse.Namespace, sdxl: bool) -> None:
    """Check the combinations of arguments that are wrong whatever the data and model; raise ConfigError if so.

    Checks only arguments: paths, models and datasets are checked by the modules that open them.
    """
    if args.full_fp16 and args.mixed_precision != "fp16":
        raise ConfigError("--full_fp16 requires --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        raise ConfigError("--full_bf16 requires --mixed_precision bf16")
    fp8_error = fp8_argument_error(args)
    if fp8_error:
        raise ConfigError(fp8_error)

    minimums = {
        # --max_train_epochs, when given, replaces --max_train_steps
        "max_train_epochs" if args.max_train_epochs is not None else "max_train_steps": 1,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "vae_batch_size": 1,
        "bucket_reso_steps": 1,
        "max_data_loader_n_workers": 0,
        "nan_abort_steps": 0,
        "lr_warmup_steps": 0,
        "lr_decay_steps": 0,
    }
    for name, low in minimums.items():
        if getattr(args, name) < low:
            raise ConfigError(f"--{name}: expected {low} or more, got {getattr(args, name)}")

    if args.resolution is not None:
        parse_resolution(args.resolution)
    if args.enable_bucket:
        if args.min_bucket_reso > args.max_bucket_reso:
            raise ConfigError(
                f"--min_bucket_reso ({args.min_bucket_reso}) must not exceed "
                f"--max_bucket_reso ({args.max_bucket_reso})"
            )
        for name in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(args, name) % args.bucket_reso_steps:
                raise ConfigError(
                    f"--{name} ({getattr(args, name)}) must be divisible by "
                    f"--bucket_reso_steps ({args.bucket_reso_steps})"
                )

    _check_range(args, "caption_dropout_rate", 0.0, 1.0)
    _check_range(args, "caption_tag_dropout_rate", 0.0, 1.0)
    _check_range(args, "validation_split", 0.0, 1.0, high_inclusive=False)
    _check_range(args, "min_timestep", 0, 999)
    _check_range(args, "max_timestep", 1, 1000)
    _check_value_ranges(args)
    if args.min_timestep is not None and args.max_timestep is not None and args.min_timestep >= args.max_timestep:
        raise ConfigError(
            f"--min_timestep ({args.min_timestep}) must be smaller than --max_timestep ({args.max_timestep})"
        )

    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise ConfigError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        raise ConfigError("--adaptive_noise_scale requires --noise_offset")
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise ConfigError("--scale_v_pred_loss_like_noise_pred requires --v_parameterization")
    if args.v_pred_like_loss and args.v_parameterization:
        raise ConfigError("--v_pred_like_loss cannot be used with --v_parameterization")

    if sdxl:
        if args.v2:
            raise ConfigError("--v2 cannot be used for SDXL training")
        if args.cache_text_encoder_outputs:
            if not args.network_train_unet_only:
                raise ConfigError(
                    "--cache_text_encoder_outputs requires --network_train_unet_only "
                    "(a text encoder whose outputs are cached cannot be trained)"
                )
            varying = [
                flag
                for flag, used in (
                    ("--shuffle_caption", args.shuffle_caption),
                    ("--caption_dropout_rate", args.caption_dropout_rate > 0),
                    ("--caption_tag_dropout_rate", args.caption_tag_dropout_rate > 0),
                    ("--token_warmup_step", args.token_warmup_step > 0),
                )
                if used
            ]
            if varying:
                raise ConfigError(
                    "--cache_text_encoder_outputs cannot be used with " + ", ".join(varying)
                    + " (they change the caption every step, so its encoding cannot be cached)"
                )


def _check_unused_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        command_line: argparse.Namespace | None = None) -> None:
    """Warn about set flags registered as no-effect; refuse set flags registered as refused
    (``library.upstream_flags``). A value that did not come from the command line is named as a config-file key."""
    for action in parser._actions:
        entry = upstream_flags.FLAGS.get(action.dest)
        value = getattr(args, action.dest, action.default)
        unset = value in (action.default, None, [], "")
        if entry is None or entry.status is upstream_flags.Status.IMPLEMENTED or unset:
            continue
        on_command_line = command_line is None or getattr(command_line, action.dest, action.default) == value
        name = f"--{action.dest}" if on_command_line else f"key {action.dest!r} in {args.config_file}"
        if entry.status is upstream_flags.Status.NO_EFFECT:
            logger.warning("%s is accepted for compatibility with sd-scripts but has no effect here: %s", name,
                           entry.note)
        else:
            raise ConfigError(f"{name} is an sd-scripts option this trainer does not support: {entry.note}")


def _normalize(args: argparse.Namespace) -> None:
    """Resolve aliases and implied flags in place, as sd-scripts does."""
    if args.caption_extention is not None:
        args.caption_extension = args.caption_extention
    if args.cache_latents_to_disk and not args.cache_latents:
        logger.info("--cache_latents_to_disk implies --cache_latents")
        args.cache_latents = True
    if getattr(args, "cache_text_encoder_outputs_to_disk", False) and not args.cache_text_encoder_outputs:
        logger.info("--cache_text_encoder_outputs_to_disk implies --cache_text_encoder_outputs")
        args.cache_text_encoder_outputs = True
    if args.max_token_length == 75:  # what the kohya_ss GUI writes for the default length
        args.max_token_length = None
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            logger.warning("--%s %s disables sampling", name, getattr(args, name))
            setattr(args, name, None)


# endregion


def parse_args(argv: Sequence[str] | None = None, sdxl: bool = False) -> argparse.Namespace:
    """Parse the command line, merge ``--config_file``, resolve aliases and run :func:`verify_args`.

    ``--output_config`` writes the given arguments to ``--config_file`` and exits with status 0. Any invalid
    argument or config value ends the program with argparse's usage message and status 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(sdxl)
    args = parser.parse_args(argv)
    try:
        if args.output_config:
            if not args.config_file:
                raise ConfigError("--output_config needs --config_file, the path to write")
            path = save_config_file(args, parser, args.config_file)
            print(f"wrote the arguments to {path} (train with: --config_file {path})")  # before logging is set up
            raise SystemExit(0)
        command_line = args
        if args.config_file:
            args = apply_config_file(parser, argv, args.config_file)
        _normalize(args)
        _check_unused_flags(parser, args, command_line)
        verify_args(args, sdxl)
    except ConfigError as error:
        parser.error(str(error))
    return args
