"""The ``ss_*`` training metadata written into every saved LoRA file, as sd-scripts' network trainer writes it.

Tools that read LoRA files (the A1111 / Forge additional-networks panels, ComfyUI metadata viewers, the
kohya_ss GUI, civitai) look for these keys, so the names and the value formatting follow sd-scripts: every
value is ``str(value)`` (so ``None`` is ``"None"`` and booleans are ``"True"``/``"False"``), nested
structures are JSON. The trainer builds the dict once when training starts (``training_metadata`` +
``dataset_metadata`` + ``base_model_metadata``) and stamps it at each save (``metadata_for_save``); the
``modelspec.*`` keys come from ``library.lora_format.modelspec_metadata`` and the ``sshs_*`` hashes are
computed when the file is written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from library.dataset_config import SubsetSettings, subset_name

if TYPE_CHECKING:  # library.dataset's classes, only read here
    from library.dataset import BucketedDataset, DatasetGroup

# What a file keeps under --no_metadata: enough for a loader to rebuild the network.
SS_METADATA_MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


def git_commit_hash() -> str:
    """The commit of this checkout (sd-scripts' ``ss_sd_scripts_commit_hash``), or "" outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _stringify(values: Mapping[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items()}


def training_metadata(
    args: argparse.Namespace,
    *,
    session_id: int,
    training_started_at: float,
    model_version: str,
    text_encoder_lr: float | None,
    optimizer: str,
    num_train_images: int,
    num_reg_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    network_kwargs: Mapping[str, str],
) -> dict[str, str]:
    """The run-level ``ss_*`` keys: hyper-parameters, network, optimizer and loss settings.

    ``optimizer`` is the ``ss_optimizer`` value, ``module.Class(k=v,...)`` (``optimizers.optimizer_metadata_string``).
    """
    metadata: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_v2": bool(args.v2) or model_version == "sd_v2",  # an SD 2.x model loaded without --v2 is inferred as v2
        "ss_base_model_version": model_version,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": git_commit_hash(),
        "ss_optimizer": optimizer,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": args.face_crop_aug_range,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_masked_loss": bool(getattr(args, "masked_loss", False)),  # not written by sd-scripts; viewers read it
        "ss_fp8_base": bool(args.fp8_base),
        "ss_fp8_base_unet": bool(args.fp8_base_unet),
    }
    if args.network_args:
        metadata["ss_network_args"] = json.dumps(dict(network_kwargs))
    return _stringify(metadata)


def base_model_metadata(args: argparse.Namespace) -> dict[str, str]:
    """``ss_sd_model_name`` / ``ss_vae_name``: the base model and VAE, by file name when they are local paths."""
    metadata = {}
    if args.pretrained_model_name_or_path is not None:
        metadata["ss_sd_model_name"] = _display_name(args.pretrained_model_name_or_path)
    if args.vae is not None:
        metadata["ss_vae_name"] = _display_name(args.vae)
    return metadata


def _display_name(name_or_path: str) -> str:
    return os.path.basename(os.path.normpath(name_or_path)) if os.path.exists(name_or_path) else name_or_path


def dirs_info(datasets: Sequence[BucketedDataset], is_reg: bool = False) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs`` (training folders) or, with ``is_reg``, ``ss_reg_dataset_dirs``:
    ``{folder name: {"n_repeats": r, "img_count": n}}`` (the folder's own repeats, before balancing); a name
    used twice gets a `` (2)`` suffix, as in sd-scripts."""
    info: dict[str, dict[str, int]] = {}
    for dataset in datasets:
        for subset, count in zip(dataset.subsets, dataset.subset_image_counts):
            if subset.is_reg != is_reg:
                continue
            name = base = subset_name(subset)
            suffix = 2
            while name in info:
                name, suffix = f"{base} ({suffix})", suffix + 1
            info[name] = {"n_repeats": subset.num_repeats, "img_count": count}
    return info


def tag_frequency(datasets: Sequence[BucketedDataset]) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: per image folder name, how many captions contain each comma-separated tag
    (lower-cased; one count per image, not per repeat)."""
    frequency: dict[str, Counter] = {}
    for dataset in datasets:
        for item in dataset.items:
            counter = frequency.setdefault(subset_name(item.subset), Counter())
            text = (item.tags or "") if item.subset.metadata_file else item.caption  # sd-scripts counts tags only
            counter.update(tag.strip().lower() for tag in text.split(",") if tag.strip())
    return {name: dict(counter) for name, counter in frequency.items()}


def bucket_info(datasets: Sequence[BucketedDataset]) -> dict[str, Any]:
    """``ss_bucket_info``: images × repeats per bucket resolution ``[w, h]``, and the mean aspect-ratio error."""
    counts: Counter = Counter()
    errors = []
    for dataset in datasets:
        for bucket, members in dataset.buckets.items():
            counts[bucket] += len(members)
        errors += [abs(item.bucket.aspect_ratio_error) for item in dataset.items]
    buckets = {str(i): {"resolution": list(b), "count": counts[b]} for i, b in enumerate(sorted(counts))}
    return {"buckets": buckets, "mean_img_ar_error": float(np.mean(errors)) if errors else 0.0}


def _describe_dataset(dataset: BucketedDataset) -> dict[str, Any]:
    """One ``ss_datasets`` entry: the dataset's settings and counts, and each subset's options."""
    settings = dataset.settings
    return {
        "is_dreambooth": not any(subset.metadata_file for subset in dataset.subsets),
        "batch_size_per_device": settings.batch_size,
        "num_train_images": dataset.num_train_images,
        "num_reg_images": dataset.num_reg_images,
        "resolution": list(settings.resolution),
        "enable_bucket": bool(settings.enable_bucket),
        "min_bucket_reso": settings.min_bucket_reso,
        "max_bucket_reso": settings.max_bucket_reso,
        "tag_frequency": tag_frequency([dataset]),
        "bucket_info": bucket_info([dataset]),
        "subsets": [
            _describe_subset(subset, count) for subset, count in zip(dataset.subsets, dataset.subset_image_counts)
        ],
    }


def _describe_subset(subset: SubsetSettings, count: int) -> dict[str, Any]:
    """One subset of an ``ss_datasets`` entry; sd-scripts adds ``image_dir`` when set, then ``class_tokens`` and
    ``is_reg`` (DreamBooth) or ``metadata_file`` (fine-tuning), names without their folders."""
    described = {
        "img_count": count,
        "num_repeats": subset.num_repeats,
        "color_aug": bool(subset.color_aug),
        "flip_aug": bool(subset.flip_aug),
        "random_crop": bool(subset.random_crop),
        "shuffle_caption": bool(subset.shuffle_caption),
        "keep_tokens": subset.keep_tokens,
        "keep_tokens_separator": subset.keep_tokens_separator,
        "secondary_separator": subset.secondary_separator,
        "enable_wildcard": bool(subset.enable_wildcard),
        "caption_prefix": subset.caption_prefix,
        "caption_suffix": subset.caption_suffix,
    }
    if subset.image_dir:
        described["image_dir"] = os.path.basename(subset.image_dir)
    if subset.metadata_file:
        described["metadata_file"] = os.path.basename(subset.metadata_file)
    else:
        described["class_tokens"] = subset.class_tokens
        described["is_reg"] = bool(subset.is_reg)
    return described


def dataset_metadata(args: argparse.Namespace, group: DatasetGroup, total_batch_size: int) -> dict[str, str]:
    """The dataset keys.

    With ``--dataset_config`` sd-scripts writes ``ss_datasets`` (one JSON entry per dataset, with its subsets)
    plus the merged ``ss_tag_frequency`` / ``ss_dataset_dirs``; without it (DreamBooth folders) it writes the
    flat keys of the single dataset: resolution, buckets, augmentation flags, training and reg folders.
    Regularization folders never count in ``ss_dataset_dirs`` / ``ss_tag_frequency``.
    """
    train_dirs = dirs_info(group.datasets, is_reg=False)
    train_tags = {name: tags for name, tags in tag_frequency(group.datasets).items() if name in train_dirs}
    if args.dataset_config is not None:
        return {
            "ss_datasets": json.dumps([_describe_dataset(dataset) for dataset in group.datasets]),
            "ss_tag_frequency": json.dumps(train_tags),
            "ss_dataset_dirs": json.dumps(train_dirs),
        }
    settings = group.datasets[0].settings
    return _stringify(
        {
            "ss_batch_size_per_device": args.train_batch_size,
            "ss_total_batch_size": total_batch_size,
            "ss_resolution": tuple(settings.resolution),
            "ss_color_aug": bool(args.color_aug),
            "ss_flip_aug": bool(args.flip_aug),
            "ss_random_crop": bool(args.random_crop),
            "ss_shuffle_caption": bool(args.shuffle_caption),
            "ss_enable_bucket": bool(settings.enable_bucket),
            "ss_bucket_no_upscale": bool(settings.bucket_no_upscale),
            "ss_min_bucket_reso": settings.min_bucket_reso,
            "ss_max_bucket_reso": settings.max_bucket_reso,
            "ss_keep_tokens": args.keep_tokens,
            "ss_dataset_dirs": json.dumps(train_dirs),
            "ss_reg_dataset_dirs": json.dumps(dirs_info(group.datasets, is_reg=True)),
            "ss_tag_frequency": json.dumps(train_tags),
            "ss_bucket_info": json.dumps(bucket_info(group.datasets)),
        }
    )


def metadata_for_save(
    metadata: Mapping[str, str],
    *,
    steps: int,
    epoch: int,
    no_metadata: bool,
    model_spec: Mapping[str, str],
) -> dict[str, str]:
    """The metadata of one saved file: the run's keys stamped with ``ss_steps``, ``ss_epoch`` and
    ``ss_training_finished_at`` (or, under ``--no_metadata``, only ``SS_METADATA_MINIMUM_KEYS``), plus the
    ``modelspec.*`` keys. The ``sshs_*`` hashes are added by the network's ``save_weights``."""
    stamped = dict(metadata)
    stamped["ss_training_finished_at"] = str(time.time())
    stamped["ss_steps"] = str(steps)
    stamped["ss_epoch"] = str(epoch)
    if no_metadata:
        stamped = {key: stamped[key] for key in SS_METADATA_MINIMUM_KEYS if key in stamped}
    stamped.update(model_spec)
    return stamped
