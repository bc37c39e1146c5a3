"""What every kohya-ss/sd-scripts flag and ``--dataset_config`` key does in this trainer, in one place.

Each upstream flag of ``train_network.py`` / ``sdxl_train_network.py`` and each upstream dataset-config key has one
entry with its class here:

* ``IMPLEMENTED``: same name, type, default and meaning as upstream (differences, if any, are in its note);
* ``NO_EFFECT``: accepted so that command lines and configs keep working; setting it logs a warning, and the note
  says why nothing is lost;
* ``REFUSED``: setting it is an error whose message is the note: what to do instead.

``library.config`` takes the parser help of non-implemented flags, the warnings and the refusals from here, and adds
to the parser the upstream flags it does not otherwise define (``PARSER_SPECS``), so that none of them is met by
argparse's bare "unrecognized arguments". ``library.dataset_config`` takes the refused and no-effect dataset keys
from here.
docs/COMPATIBILITY.md's flag table is generated from here (``python tools/compat_table.py``) and tested against it.

``CONFIG_FILE_ONLY`` lists keys that are no sd-scripts flag but that the kohya_ss GUI writes into the ``--config_file``
TOML it hands to sd-scripts (which ignores them): they are warned about, never an error, and the note says why.

"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class Status(str, Enum):
    IMPLEMENTED = "implemented"
    NO_EFFECT = "accepted, no effect"
    REFUSED = "refused"


@dataclass(frozen=True)
class Entry:
    status: Status
    note: str = ""  # NO_EFFECT: why nothing is lost; REFUSED: what to do instead; IMPLEMENTED: a difference, if any


# region flags

# Upstream flags this trainer implements (read by the code that uses them; tests/test_config.py checks it).
IMPLEMENTED_FLAGS: tuple[str, ...] = tuple("""
    console_log_level console_log_file v2 v_parameterization pretrained_model_name_or_path
    metadata_title metadata_author metadata_description metadata_license metadata_tags
    train_data_dir shuffle_caption caption_separator caption_extension caption_extention keep_tokens
    keep_tokens_separator secondary_separator enable_wildcard caption_prefix caption_suffix color_aug flip_aug
    random_crop resolution cache_latents vae_batch_size cache_latents_to_disk skip_cache_check
    enable_bucket min_bucket_reso max_bucket_reso bucket_reso_steps bucket_no_upscale resize_interpolation
    token_warmup_min token_warmup_step caption_dropout_rate caption_dropout_every_n_epochs caption_tag_dropout_rate
    reg_data_dir dataset_repeats output_dir output_name
    save_precision save_every_n_epochs save_every_n_steps save_n_epoch_ratio save_last_n_epochs
    save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_state save_state_on_train_end resume
    train_batch_size max_token_length xformers sdpa vae max_train_steps max_train_epochs max_data_loader_n_workers
    persistent_data_loader_workers seed gradient_checkpointing gradient_accumulation_steps mixed_precision full_fp16
    full_bf16 ddp_timeout clip_skip logging_dir log_with log_prefix log_tracker_name wandb_run_name wandb_api_key
    log_config noise_offset noise_offset_random_strength multires_noise_iterations ip_noise_gamma
    ip_noise_gamma_random_strength multires_noise_discount adaptive_noise_scale zero_terminal_snr min_timestep
    max_timestep loss_type huber_schedule huber_c huber_scale lowram sample_every_n_steps sample_at_first
    sample_every_n_epochs sample_prompts sample_sampler config_file output_config prior_loss_weight
    optimizer_type use_8bit_adam use_lion_optimizer learning_rate max_grad_norm optimizer_args lr_scheduler_type
    lr_scheduler_args lr_scheduler lr_warmup_steps lr_decay_steps lr_scheduler_num_cycles lr_scheduler_power
    lr_scheduler_timescale lr_scheduler_min_lr_ratio dataset_config min_snr_gamma scale_v_pred_loss_like_noise_pred
    v_pred_like_loss debiased_estimation_loss no_metadata save_model_as unet_lr text_encoder_lr network_weights
    network_module network_dim network_alpha network_dropout network_args network_train_unet_only
    network_train_text_encoder_only training_comment dim_from_weights scale_weight_norms no_half_vae
    validation_seed validation_split validate_every_n_steps validate_every_n_epochs max_validation_steps
    cache_text_encoder_outputs cache_text_encoder_outputs_to_disk
    masked_loss alpha_mask weighted_captions in_json base_weights base_weights_multiplier fp8_base fp8_base_unet
""".split())

IMPLEMENTED_NOTES: dict[str, str] = {
    "fp8_base": "the Linear and Conv weights go to float8; biases, norms and embeddings stay in the mixed-precision "
                "dtype (sd-scripts converts them too); combine it with --gradient_checkpointing (a warning says why)",
    "masked_loss": "mask images are resized and cropped like their image (sd-scripts stretches them to the bucket), "
                   "so random_crop works with them; a run with no mask anywhere warns",
    "weighted_captions": "a malformed weight in a caption file is an error naming the file",
    "base_weights": "a module that fits no layer of the model is an error naming the file (sd-scripts skips it); "
                    "merged right after the models load",
    "resume": "continues at the state's step and skips the batches already used (sd-scripts does that only with "
              "--skip_until_initial_step); a state saved at the last step trains no more steps and writes the "
              "LoRA of that state (sd-scripts stops with an assertion there)",
    "seed": "without it, the main process draws one seed for every process (sd-scripts draws one per process, so "
            "several GPUs shuffled the data each their own way and shared out an epoch's batches unevenly)",
}

FACE_CROP_NOTE = ("face-centred crops are not implemented: with --enable_bucket it has no effect, as in sd-scripts; "
                  "without buckets, where sd-scripts would use it, it is an error (remove it)")

# Flags whose effect is absent here, and why nothing is lost.
NO_EFFECT_FLAGS: dict[str, str] = {
    "torch_compile": "training runs eagerly",
    "dynamo_backend": "the backend of --torch_compile, which has no effect",
    "mem_eff_attn": "PyTorch's SDPA attention, memory-efficient, is the default",
    "highvram": "caches are cleared only where it matters",
    "tokenizer_cache_dir": "the tokenizers come with the model",
    "cache_info": "it only speeds up sd-scripts' start",
    "fused_backward_pass": "sd-scripts uses it for full fine-tuning only",
    "log_tracker_config": "tracker settings come from the logging flags",
    "ddp_gradient_as_bucket_view": "the LoRA never runs through DDP: its gradients are averaged directly",
    "ddp_static_graph": "the LoRA never runs through DDP: its gradients are averaged directly",
    "console_log_simple": "the console log is plain already",
    "disable_mmap_load_safetensors": "safetensors decides how to map the file",
    "skip_until_initial_step": "--resume always skips the batches the saved run already used",
    "face_crop_aug_range": FACE_CROP_NOTE,
    "conditioning_data_dir": "sd-scripts' train_network.py reads mask images only from a subset's "
                             "conditioning_data_dir in --dataset_config",
}

# Flags refused: setting one is an error with this message (what to do instead).
REFUSED_FLAGS: dict[str, str] = {
    "debug_dataset": "this trainer has no dataset viewer; the dataset summary is logged at the start of every run",
    "dataset_class": "user-defined dataset classes are not supported; use --dataset_config or --train_data_dir",
    "metadata_usage_hint": "modelspec.usage_hint is not written; add it to the file after training",
    "metadata_thumbnail": "modelspec.thumbnail is not written; add it to the file after training",
    "metadata_merged_from": "modelspec.merged_from is not written (it describes merged models)",
    "metadata_trigger_phrase": "modelspec.trigger_phrase is not written; put the phrase in --training_comment",
    "metadata_preprocessor": "modelspec.preprocessor is not written; add it to the file after training",
    "metadata_is_negative_embedding": "modelspec.is_negative_embedding is for embeddings, not LoRA files",
    "huggingface_repo_id": "nothing is uploaded from here; upload the output folder with `huggingface-cli upload`",
    "huggingface_repo_type": "nothing is uploaded from here; upload the output folder with `huggingface-cli upload`",
    "huggingface_path_in_repo": "nothing is uploaded from here; upload the output folder with `huggingface-cli upload`",
    "huggingface_token": "nothing is uploaded from here; upload the output folder with `huggingface-cli upload`",
    "huggingface_repo_visibility": "nothing is uploaded from here; upload the output folder with "
                                   "`huggingface-cli upload`",
    "save_state_to_huggingface": "states are saved locally only (--save_state); upload them yourself",
    "resume_from_huggingface": "download the state folder first and give its path to --resume",
    "async_upload": "nothing is uploaded from here",
    "deepspeed": "DeepSpeed is not supported; a LoRA fits without it (use --gradient_checkpointing, --cache_latents)",
    "zero_stage": "DeepSpeed is not supported (see --deepspeed)",
    "offload_optimizer_device": "DeepSpeed is not supported (see --deepspeed)",
    "offload_optimizer_nvme_path": "DeepSpeed is not supported (see --deepspeed)",
    "offload_param_device": "DeepSpeed is not supported (see --deepspeed)",
    "offload_param_nvme_path": "DeepSpeed is not supported (see --deepspeed)",
    "zero3_init_flag": "DeepSpeed is not supported (see --deepspeed)",
    "zero3_save_16bit_model": "DeepSpeed is not supported (see --deepspeed)",
    "fp16_master_weights_and_gradients": "use --mixed_precision fp16 (with --full_fp16 for fp16 LoRA weights)",
    "cpu_offload_checkpointing": "not implemented for LoRA training here; use --gradient_checkpointing",
    "initial_epoch": "start from a saved state with --save_state / --resume instead",
    "initial_step": "start from a saved state with --save_state / --resume instead",
}

# Argparse definitions of the upstream flags the parser does not otherwise define, as upstream defines them
# (name, type, default, choices); library.config adds those not already present.
PARSER_SPECS: dict[str, dict[str, Any]] = {
    **{name: {"action": "store_true"} for name in (
        "async_upload", "cpu_offload_checkpointing", "deepspeed", "fp16_master_weights_and_gradients",
        "resume_from_huggingface", "save_state_to_huggingface",
        "skip_until_initial_step", "zero3_init_flag", "zero3_save_16bit_model")},
    **{name: {"type": str, "default": None} for name in (
        "huggingface_path_in_repo", "huggingface_repo_id", "huggingface_repo_type",
        "huggingface_repo_visibility", "huggingface_token", "metadata_is_negative_embedding", "metadata_merged_from",
        "metadata_preprocessor", "metadata_thumbnail", "metadata_trigger_phrase", "metadata_usage_hint",
        "offload_optimizer_nvme_path", "offload_param_nvme_path")},
    "initial_epoch": {"type": int, "default": None},
    "initial_step": {"type": int, "default": None},
    "offload_optimizer_device": {"type": str, "default": None, "choices": [None, "cpu", "nvme"]},
    "offload_param_device": {"type": str, "default": None, "choices": [None, "cpu", "nvme"]},
    "zero_stage": {"type": int, "default": 2, "choices": [0, 1, 2, 3]},
}

# Flags of ours, not upstream's.
OWN_FLAGS: tuple[str, ...] = ("nan_abort_steps", "pretrained_model_config")
# Upstream defines these for sdxl_train_network.py only.
SDXL_ONLY_FLAGS: tuple[str, ...] = (
    "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "disable_mmap_load_safetensors",
)

# Keys the kohya_ss GUI writes into its --config_file TOML that are no sd-scripts flag (sd-scripts ignores them).
CONFIG_FILE_ONLY: dict[str, str] = {
    "epoch": "the kohya_ss GUI's epoch count, which the GUI itself turns into max_train_steps (sd-scripts ignores "
             "the key too; set max_train_epochs to train by epochs)",
    "noise_offset_type": "the kohya_ss GUI's choice between noise_offset and multires_noise_iterations, "
                         "which carry the setting themselves (sd-scripts ignores the key too)",
    "stop_text_encoder_training": "a DreamBooth option of the kohya_ss GUI; sd-scripts' train_network.py has no "
                                  "such flag either (use --network_train_unet_only to train the U-Net only)",
}

# endregion

# region dataset-config keys

# Upstream --dataset_config keys this trainer implements ([general], [[datasets]], [[datasets.subsets]]).
IMPLEMENTED_DATASET_KEYS: tuple[str, ...] = tuple("""
    resolution batch_size enable_bucket min_bucket_reso max_bucket_reso bucket_reso_steps bucket_no_upscale
    image_dir is_reg num_repeats class_tokens caption_extension shuffle_caption caption_separator keep_tokens
    keep_tokens_separator secondary_separator enable_wildcard caption_prefix caption_suffix caption_dropout_rate
    caption_dropout_every_n_epochs caption_tag_dropout_rate token_warmup_min token_warmup_step flip_aug color_aug
    random_crop resize_interpolation alpha_mask conditioning_data_dir metadata_file
""".split())

NO_EFFECT_DATASET_KEYS: dict[str, str] = {
    "cache_info": "it only speeds up sd-scripts' start",
    "face_crop_aug_range": FACE_CROP_NOTE,
}

REFUSED_DATASET_KEYS: dict[str, str] = {
    "custom_attributes": "custom attributes are read by no code here; remove them",
    "validation_split": "per-dataset validation is not supported; use the command-line --validation_split",
    "validation_seed": "per-dataset validation is not supported; use the command-line --validation_seed",
    "network_multiplier": "per-dataset network multipliers are not supported; remove it",
    "system_prompt": "system prompts are for LLM text encoders, which SD and SDXL do not have; remove it",
    "dataset_repeats": "no dataset-config key in sd-scripts either; use num_repeats (or --dataset_repeats)",
}

# endregion


def _entries(implemented: tuple[str, ...], notes: dict[str, str], no_effect: dict[str, str],
             *refused: dict[str, str]) -> dict[str, Entry]:
    entries = {name: Entry(Status.IMPLEMENTED, notes.get(name, "")) for name in implemented}
    entries.update({name: Entry(Status.NO_EFFECT, why) for name, why in no_effect.items()})
    for group in refused:
        entries.update({name: Entry(Status.REFUSED, what) for name, what in group.items()})
    return entries


FLAGS: dict[str, Entry] = _entries(IMPLEMENTED_FLAGS, IMPLEMENTED_NOTES, NO_EFFECT_FLAGS, REFUSED_FLAGS)
DATASET_KEYS: dict[str, Entry] = _entries(IMPLEMENTED_DATASET_KEYS, {}, NO_EFFECT_DATASET_KEYS, REFUSED_DATASET_KEYS)


def flags_with(status: Status) -> dict[str, Entry]:
    """The upstream flags of one class."""
    return {name: entry for name, entry in FLAGS.items() if entry.status is status}


def dataset_keys_with(status: Status) -> dict[str, Entry]:
    """The upstream dataset-config keys of one class."""
    return {name: entry for name, entry in DATASET_KEYS.items() if entry.status is status}


def markdown_tables() -> str:
    """The tables of docs/COMPATIBILITY.md: every upstream flag and dataset-config key once, with its class and note,
    and the kohya_ss GUI's config-file keys (what ``tools/compat_table.py`` writes)."""
    lines = ["| flag | here | note |", "|---|---|---|"]
    lines += [f"| `--{name}` | {entry.status.value} | {entry.note} |" for name, entry in sorted(FLAGS.items())]
    lines += ["", "| `--dataset_config` key | here | note |", "|---|---|---|"]
    lines += [f"| `{name}` | {entry.status.value} | {entry.note} |" for name, entry in sorted(DATASET_KEYS.items())]
    lines += ["", "| `--config_file` key of the kohya_ss GUI | here | note |", "|---|---|---|"]
    lines += [f"| `{name}` | warned, ignored | {note} |" for name, note in sorted(CONFIG_FILE_ONLY.items())]
    return "\n".join(lines) + "\n"
