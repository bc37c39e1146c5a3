"""``--dataset_config`` and the other ways to describe training data, checked and resolved into settings.

Every dataset key is validated here: the schema (types, ranges, unknown keys), sd-scripts' keys this trainer
refuses or accepts without effect (taken from ``library.upstream_flags``), the DreamBooth / fine-tuning subset
rules, and the mask-image rules (``library.masks.check_dataset_config``). ``resolve_settings`` then applies
sd-scripts' precedence: each setting is taken from the subset, else its dataset, else ``[general]``, else the
command line, else the default. Settings that only a subset sets (``SUBSET_ONLY_SETTINGS``) never come from a
flag.

The sources, as in sd-scripts (``user_config_from_args`` picks one):

* ``--dataset_config`` TOML: ``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``. A subset with
  ``metadata_file`` is a fine-tuning subset (``library.finetune_dataset``); a dataset's subsets are all of one
  kind, and both kinds mix across datasets.
* ``--in_json`` (without ``--dataset_config``): one fine-tuning subset, its images in ``--train_data_dir``.
* otherwise ``--train_data_dir`` with ``<repeats>_<class tokens>`` folders (``10_sks dog``), and
  ``--reg_data_dir`` the same for regularization images, turned into the same config dictionary.

``library.dataset`` builds the images, captions and batches from the resolved settings; the one key check that
needs them, ``face_crop_aug_range`` without ``enable_bucket``, is ``BucketedDataset._check_subset`` there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import toml
import voluptuous as vol

from library import masks, upstream_flags
from library.config import parse_resolution
from library.resize import METHODS as RESIZE_METHODS

logger = logging.getLogger(__name__)

@dataclass
class SubsetSettings:
    """One folder of images and how its images and captions are treated (sd-scripts' subset options)."""

    image_dir: str | None
    num_repeats: int = 1
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | str | None = None  # accepted for compatibility; see _check_subset
    metadata_file: str | None = None  # a fine-tuning subset (library/finetune_dataset.py); image_dir may be None
    alpha_mask: bool = False  # the images' alpha channel is the loss mask (library.masks)
    conditioning_data_dir: str | None = None  # mask images for --masked_loss (library.masks)
    resize_interpolation: str | None = None  # None: area when shrinking, lanczos when enlarging (library.resize)


@dataclass
class DatasetSettings:
    """One ``[[datasets]]`` entry: resolution ``(w, h)``, batch size, bucketing, and its subsets."""

    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    subsets: list[SubsetSettings] = field(default_factory=list)


# Subset settings that only a subset sets: no command-line flag, [general] or [[datasets]] value gives them
# (sd-scripts' --conditioning_data_dir, for one, is not read by its train_network.py).
SUBSET_ONLY_SETTINGS = ("image_dir", "metadata_file", "is_reg", "conditioning_data_dir")
# Command-line attribute for a setting whose flag has another name than its config key.
# --dataset_repeats gives the repeats of subsets without num_repeats, as in sd-scripts.
_ARGPARSE_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}

_NUMBER = vol.Any(float, int, msg="expected a number")
_RATE = vol.All(_NUMBER, vol.Range(min=0, max=1))
_POSITIVE_INT = vol.All(int, vol.Range(min=1))
_NON_NEGATIVE_INT = vol.All(int, vol.Range(min=0))
_FLOAT_PAIR = vol.All(vol.ExactSequence([_NUMBER, _NUMBER], msg="expected two numbers [low, high]"), vol.Coerce(tuple))
_RESOLUTION = vol.Any(
    _POSITIVE_INT,
    vol.ExactSequence([_POSITIVE_INT, _POSITIVE_INT]),
    msg="expected an integer or [width, height]",
)

# Subset options that may also be given for a whole dataset or in [general].
_SUBSET_ASCENDABLE = {
    "num_repeats": _POSITIVE_INT,
    "class_tokens": str,
    "caption_extension": str,
    "shuffle_caption": bool,
    "caption_separator": str,
    "keep_tokens": _NON_NEGATIVE_INT,
    "keep_tokens_separator": str,
    "secondary_separator": str,
    "enable_wildcard": bool,
    "caption_prefix": str,
    "caption_suffix": str,
    "caption_dropout_rate": _RATE,
    "caption_dropout_every_n_epochs": _NON_NEGATIVE_INT,
    "caption_tag_dropout_rate": _RATE,
    "token_warmup_min": _NON_NEGATIVE_INT,
    "token_warmup_step": vol.All(_NUMBER, vol.Range(min=0)),
    "flip_aug": bool,
    "color_aug": bool,
    "random_crop": bool,
    "face_crop_aug_range": _FLOAT_PAIR,
    "resize_interpolation": vol.In(RESIZE_METHODS, msg="expected one of " + ", ".join(RESIZE_METHODS)),
}
_SUBSET_ONLY = {
    "image_dir": str, "is_reg": bool, "metadata_file": str, "alpha_mask": bool, "conditioning_data_dir": str,
}
_DATASET_ASCENDABLE = {
    "resolution": _RESOLUTION,
    "batch_size": _POSITIVE_INT,
    "enable_bucket": bool,
    "min_bucket_reso": _POSITIVE_INT,
    "max_bucket_reso": _POSITIVE_INT,
    "bucket_reso_steps": _POSITIVE_INT,
    "bucket_no_upscale": bool,
}
# sd-scripts options this trainer does not implement (library.upstream_flags): accepted by the schema, then refused
# with the registry's message, or warned about as without effect.
_UNSUPPORTED = tuple(upstream_flags.dataset_keys_with(upstream_flags.Status.REFUSED))
_IGNORED = tuple(key for key in upstream_flags.dataset_keys_with(upstream_flags.Status.NO_EFFECT)
                 if key not in _SUBSET_ASCENDABLE)  # face_crop_aug_range: BucketedDataset._check_subset
_ACCEPTED_LATER = {vol.Optional(key): object for key in _UNSUPPORTED + _IGNORED}

_SUBSET_SCHEMA = {**_SUBSET_ASCENDABLE, **_SUBSET_ONLY, **_ACCEPTED_LATER}
_DATASET_SCHEMA = {**_DATASET_ASCENDABLE, **_SUBSET_ASCENDABLE, **_ACCEPTED_LATER, "subsets": [_SUBSET_SCHEMA]}
_GENERAL_SCHEMA = {**_DATASET_ASCENDABLE, **_SUBSET_ASCENDABLE, **_ACCEPTED_LATER}
_USER_CONFIG_SCHEMA = vol.Schema({"general": _GENERAL_SCHEMA, "datasets": [_DATASET_SCHEMA]})


def _key_path(path: list[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _value_at(data: Any, path: list[Any]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _describe_invalid(error: vol.Invalid, data: dict, source: str) -> str:
    where = _key_path(error.path)
    if error.error_message == "extra keys not allowed":
        return f"{source}: unknown key '{where}'"
    if error.error_message == "required key not provided":
        return f"{source}: '{_key_path(error.path[:-1])}' has no '{error.path[-1]}' (required)"
    value = _value_at(data, error.path)
    return f"{source}: key '{where}': {error.error_message}, got {type(value).__name__} {value!r}"


def validate_dataset_config(config: dict, source: str) -> dict:
    """Check a ``--dataset_config`` dictionary against the schema; every problem found is listed in one error
    naming ``source`` (the file) and the key."""
    try:
        validated = _USER_CONFIG_SCHEMA(config)
    except vol.MultipleInvalid as err:
        problems = sorted({_describe_invalid(e, config, source) for e in err.errors})
        raise ValueError("invalid dataset config:\n  " + "\n  ".join(problems)) from None
    sections = [("general", validated.get("general", {}))]
    for i, dataset in enumerate(validated.get("datasets", [])):
        sections.append((f"datasets[{i}]", dataset))
        sections += [(f"datasets[{i}].subsets[{j}]", s) for j, s in enumerate(dataset.get("subsets", []))]
    for where, section in sections:
        for key in section:
            if key in _UNSUPPORTED:
                raise ValueError(f"{source}: '{where}.{key}' is an sd-scripts option this trainer does not support: "
                                 f"{upstream_flags.DATASET_KEYS[key].note}")
            if key in _IGNORED:
                logger.warning("%s: '%s.%s' has no effect here: %s", source, where, key,
                               upstream_flags.DATASET_KEYS[key].note)
    for i, dataset in enumerate(validated.get("datasets", [])):
        _check_subset_kinds(dataset.get("subsets", []), source, f"datasets[{i}]")
    return validated


# DreamBooth-only subset keys, an error in a fine-tuning (metadata_file) subset as in sd-scripts' schema.
_DREAMBOOTH_ONLY = ("is_reg", "class_tokens", "caption_extension")


def _check_subset_kinds(subsets: list[dict], source: str, where: str) -> None:
    """As in sd-scripts, a dataset's subsets are all DreamBooth (``image_dir``) or all fine-tuning
    (``metadata_file``, with an optional ``image_dir``)."""
    kinds = {"metadata_file" in subset for subset in subsets}
    if len(kinds) > 1:
        raise ValueError(f"{source}: {where} mixes subsets with and without metadata_file; put the fine-tuning "
                         "(metadata_file) subsets and the DreamBooth (image_dir) subsets in separate [[datasets]]")
    for j, subset in enumerate(subsets):
        if "metadata_file" in subset:
            wrong = [key for key in _DREAMBOOTH_ONLY if key in subset]
            if wrong:
                raise ValueError(f"{source}: '{where}.subsets[{j}]': {', '.join(wrong)} cannot be used with "
                                 "metadata_file (DreamBooth subsets only)")
        elif "image_dir" not in subset:
            raise ValueError(f"{source}: '{where}.subsets[{j}]' has no 'image_dir' (required) and no 'metadata_file'")


def load_dataset_config(path: str | os.PathLike) -> dict:
    """Read and validate a ``--dataset_config`` TOML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset config file not found: {path}")
    try:
        config = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"dataset config {path} is not valid TOML: {err}") from None
    return validate_dataset_config(config, str(path))


def _parse_dreambooth_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` → ``(10, "sks dog")``; ``None`` when the name has no numeric repeats prefix."""
    prefix, _, class_tokens = name.partition("_")
    try:
        repeats = int(prefix)
    except ValueError:
        return None
    return repeats, class_tokens


def dreambooth_subsets(base_dir: str | os.PathLike, is_reg: bool) -> list[dict]:
    """Subset configs for the ``<repeats>_<class tokens>`` folders in ``base_dir`` (sorted by name).

    Folders without a numeric prefix or with fewer than one repeat are skipped with a warning; a missing
    ``base_dir`` or one without any usable folder is an error naming it.
    """
    flag = "--reg_data_dir" if is_reg else "--train_data_dir"
    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"{flag} {base} does not exist or is not a directory")
    subsets = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        parsed = _parse_dreambooth_folder_name(folder.name)
        if parsed is None or parsed[0] < 1:
            logger.warning("%s: skipping folder '%s': its name does not start with '<repeats>_' (e.g. '10_sks dog')",
                           flag, folder)
            continue
        repeats, class_tokens = parsed
        subsets.append(
            {"image_dir": str(folder), "num_repeats": repeats, "class_tokens": class_tokens, "is_reg": is_reg}
        )
    if not subsets:
        raise ValueError(f"{flag} {base} contains no '<repeats>_<class tokens>' folders (e.g. '10_sks dog')")
    return subsets


def _resolution(value: Any, where: str) -> tuple[int, int]:
    """A resolution from the config (``512`` or ``[w, h]``, already validated) or the command line
    (``"512"`` / ``"512,768"``) as ``(width, height)``."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return parse_resolution(value, flag=where)


def _lookup(name: str, levels: list[dict], args: Any, default: Any) -> Any:
    """The first value set (not None): config levels in order, then the command line, then ``default``."""
    for level in levels:
        if level.get(name) is not None:
            return level[name]
    value = getattr(args, _ARGPARSE_NAMES.get(name, name), None)
    if name == "caption_extension" and getattr(args, "caption_extention", None) is not None:
        value = args.caption_extention  # sd-scripts' old misspelled flag wins when given
    return default if value is None else value


def resolve_settings(user_config: dict, args: Any, source: str) -> list[DatasetSettings]:
    """Apply the precedence subset → dataset → general → command line → default to a validated config."""
    general = user_config.get("general", {})
    datasets = user_config.get("datasets", [])
    if not datasets:
        raise ValueError(f"{source}: no [[datasets]] defined")
    resolved = []
    for i, dataset in enumerate(datasets):
        if not dataset.get("subsets"):
            raise ValueError(f"{source}: datasets[{i}] has no [[datasets.subsets]]")
        values = {
            f.name: _lookup(f.name, [dataset, general], args, f.default)
            for f in fields(DatasetSettings)
            if f.name not in ("resolution", "subsets")
        }
        resolution = _lookup("resolution", [dataset, general], args, None)
        if resolution is None:
            raise ValueError(f"{source}: datasets[{i}] has no resolution (set --resolution, or resolution in "
                             "[general] or [[datasets]])")
        settings = DatasetSettings(resolution=_resolution(resolution, f"{source}: datasets[{i}] resolution"), **values)
        for subset in dataset["subsets"]:
            subset_values = {
                f.name: _lookup(f.name, [subset, dataset, general], args, f.default)
                for f in fields(SubsetSettings)
                if f.name not in SUBSET_ONLY_SETTINGS
            }
            subset_values.update({name: subset.get(name) for name in SUBSET_ONLY_SETTINGS})
            subset_values["is_reg"] = bool(subset_values["is_reg"])
            settings.subsets.append(SubsetSettings(**subset_values))
        resolved.append(settings)
    return resolved


def subset_name(subset: SubsetSettings) -> str:
    """How ``ss_dataset_dirs`` / ``ss_tag_frequency`` and messages name a subset: its metadata file's or its
    folder's name."""
    return os.path.basename(subset.metadata_file or subset.image_dir)


def user_config_from_args(args: Any) -> tuple[dict, str]:
    """The validated dataset config the command line describes (``--dataset_config``, ``--in_json`` or
    DreamBooth folders), and how messages name its source."""
    if getattr(args, "dataset_config", None):
        source = str(args.dataset_config)
        user_config = load_dataset_config(args.dataset_config)
        masks.check_dataset_config(user_config, source, bool(getattr(args, "masked_loss", False)))
        ignored = [f"--{name}" for name in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, name, None)]
        if ignored:
            logger.warning("ignoring %s because --dataset_config is given", ", ".join(ignored))
    elif getattr(args, "in_json", None):  # sd-scripts' fine-tuning method: one metadata subset
        source = f"--in_json {args.in_json}"
        if getattr(args, "reg_data_dir", None):
            logger.warning("ignoring --reg_data_dir: --in_json datasets have no regularization images")
        image_dir = getattr(args, "train_data_dir", None)
        user_config = {"datasets": [{"subsets": [{"image_dir": image_dir, "metadata_file": args.in_json}]}]}
    else:
        if not getattr(args, "train_data_dir", None):
            raise ValueError("no training data: give --train_data_dir or --dataset_config")
        source = f"--train_data_dir {args.train_data_dir}"
        subsets = dreambooth_subsets(args.train_data_dir, is_reg=False)
        if getattr(args, "reg_data_dir", None):
            subsets += dreambooth_subsets(args.reg_data_dir, is_reg=True)
        user_config = {"datasets": [{"subsets": subsets}]}
    return user_config, source
