"""Sample images during training, as sd-scripts does with ``--sample_prompts``.

* ``load_prompts(path)`` reads an sd-scripts prompt file:

  - ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped. Options follow the
    prompt, each introduced by `` --``: ``--n`` negative prompt, ``--w`` width, ``--h`` height, ``--s`` steps
    (clamped to 1..1000), ``--l`` guidance (CFG) scale, ``--d`` seed, ``--ss`` sampler. Option names are
    case-insensitive. ``--cn``, ``--g``, ``--f``, ``--ctr`` and ``--rcfg`` (ControlNet image, FLUX guidance,
    frame count, CFG truncation, renormalised CFG: other model families' options in sd-scripts) are accepted
    and ignored with a warning; any other option is an error.
  - ``.toml``: a ``[prompt]`` table of defaults and one ``[[prompt.subset]]`` table per prompt, with the keys
    ``prompt``, ``negative_prompt``, ``width``, ``height``, ``sample_steps``, ``scale``, ``seed``,
    ``sample_sampler`` (a subset's key wins over the default).
  - ``.json``: a list whose entries are such tables, or strings written like a ``.txt`` line.

  Defaults (sd-scripts'): 512×512, 30 steps, scale 7.5, a random seed, the ``--sample_sampler``. Width and
  height are rounded down to a multiple of 8, at least 64 (``SamplePrompt.image_size``).

* ``get_sampler(name, noise_scheduler_config)`` maps sd-scripts' sampler names to diffusers schedulers built
  from the training noise scheduler's config, so v-prediction (``prediction_type``) carries over.

* ``sample_images(...)`` draws every prompt with a diffusers ``StableDiffusionPipeline`` /
  ``StableDiffusionXLPipeline`` assembled from the live training modules (the LoRA network wraps their
  forwards, so it is applied) and writes ``<output_dir>/sample/<name>.png`` with sd-scripts' file names. The
  caller's torch random state, the modules' training flags and the devices of the VAE and text encoders are
  restored afterwards, so sampling never changes the training run.

* ``should_sample(args, step, epoch, is_epoch_end)`` is sd-scripts' schedule for ``--sample_at_first``,
  ``--sample_every_n_steps`` and ``--sample_every_n_epochs``; ``sample_during_training(...)`` is what the
  trainer calls at each point where sd-scripts may sample.

Differences from sd-scripts, each deliberate: a bad prompt file is an error naming the file and line (sd-scripts
logs and drops the option, or samples with DDIM for an unknown sampler name); DDIM/DDPM keep the training
config's ``clip_sample=False`` (diffusers' pipelines reset sd-scripts' ``clip_sample=True`` anyway); prompts
are read with the weight syntax and encoded as sd-scripts' long-prompt-weighting pipeline does (up to 225 tokens in
77-token windows, weights applied keeping the mean; see ``_prompt_inputs``), but a malformed weight is an error
naming the file and line; with several processes only the main process samples.

Attributes of ``args`` read: ``sample_prompts``, ``sample_sampler``, ``sample_every_n_steps``,
``sample_every_n_epochs``, ``sample_at_first``, ``output_dir``, ``output_name``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import toml
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
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from tqdm import tqdm

from library.atomic import atomic_output
from library.errors import UserInputError
from library.models import ModelBundle
from library.optimizers import is_schedulefree
from library.prompt_weights import (
    apply_weights_keep_mean,
    check_prompt,
    long_prompt_ids_and_weights,
    long_prompt_windows,
)
from library.text_encoding import final_layer_norm, split_into_chunks

logger = logging.getLogger(__name__)

SAMPLE_DIR_NAME = "sample"
DEFAULT_WIDTH = 512
DEFAULT_HEIGHT = 512
DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
MAX_STEPS = 1000
MIN_IMAGE_SIDE = 64
IMAGE_SIDE_MULTIPLE = 8

# sd-scripts' sampler names → diffusers scheduler classes ("ddpm" is left out of --sample_sampler's choices
# upstream but accepted per prompt). The k_* names are aliases.
SAMPLER_CLASSES: dict[str, type[SchedulerMixin]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm_2": KDPM2DiscreteScheduler,
    "dpm_2_a": KDPM2AncestralDiscreteScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "dpmsingle": DPMSolverSinglestepScheduler,
}
SAMPLER_ALIASES = {
    "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a",
}  # fmt: skip
SAMPLER_NAMES = tuple(SAMPLER_CLASSES) + tuple(SAMPLER_ALIASES)

# Options of a .txt prompt line → (SamplePrompt field, value type).
LINE_OPTIONS: dict[str, tuple[str, type]] = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "s": ("sample_steps", int),
    "l": ("scale", float),
    "d": ("seed", int),
    "ss": ("sample_sampler", str),
}
# Options / keys sd-scripts reads for other model families: accepted, ignored with a warning.
IGNORED_LINE_OPTIONS = {"cn": "controlnet_image", "g": "guidance_scale", "f": "frame_count",
                        "ctr": "cfg_trunc_ratio", "rcfg": "renorm_cfg"}  # fmt: skip
FIELD_TYPES: dict[str, type] = {field: kind for field, kind in LINE_OPTIONS.values()} | {"prompt": str}
IGNORED_FIELDS = frozenset(IGNORED_LINE_OPTIONS.values())


class PromptFileError(UserInputError):
    """A sample prompt file that cannot be read or holds a bad value; the message names the file and line."""


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt to draw. ``index`` is its position in the file (the ``_{index:02d}`` of the image name);
    ``seed`` None draws a random seed; ``sample_sampler`` None uses ``--sample_sampler``."""

    prompt: str
    negative_prompt: str | None = None
    width: int = DEFAULT_WIDTH
    height: int = DEFAULT_HEIGHT
    sample_steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: int | None = None
    sample_sampler: str | None = None
    index: int = 0

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) as drawn: rounded down to a multiple of 8, at least 64 (as sd-scripts does)."""
        return _round_side(self.width), _round_side(self.height)


def _round_side(side: int) -> int:
    return max(MIN_IMAGE_SIDE, side - side % IMAGE_SIDE_MULTIPLE)


# --------------------------------------------------------------------------------------------- prompt files


def load_prompts(path: str | os.PathLike) -> list[SamplePrompt]:
    """Read an sd-scripts sample prompt file (``.txt``, ``.toml`` or ``.json``; see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise PromptFileError(f"{path}: sample prompt file must end in .txt, .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"{path}: cannot read sample prompt file: {error}") from error

    if suffix == ".txt":
        prompts = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                fields = parse_prompt_line(line, f"{path}:{line_number}")
                prompts.append(_make_prompt(fields, len(prompts), f"{path}:{line_number}"))
        return prompts

    entries = _toml_entries(path, text) if suffix == ".toml" else _json_entries(path, text)
    prompts = []
    for index, entry in enumerate(entries):
        where = f"{path}: prompt #{index + 1}"
        fields = parse_prompt_line(entry, where) if isinstance(entry, str) else _fields_from_table(entry, where)
        prompts.append(_make_prompt(fields, index, where))
    return prompts


def parse_prompt_line(line: str, where: str) -> dict[str, Any]:
    """The fields of one ``.txt`` prompt line: the prompt, then `` --option value`` pairs. ``where`` (file and
    line) starts every error message."""
    prompt, *options = line.split(" --")
    fields: dict[str, Any] = {"prompt": prompt.strip()}
    for option in options:
        name, _, value = option.strip().partition(" ")
        name, value = name.lower(), value.strip()
        if name in IGNORED_LINE_OPTIONS:
            logger.warning("%s: option --%s is not used for SD / SDXL sample images; ignored", where, name)
            continue
        if name not in LINE_OPTIONS:
            known = ", ".join(f"--{key}" for key in LINE_OPTIONS)
            raise PromptFileError(f"{where}: unknown option --{name}; expected one of {known}")
        field, kind = LINE_OPTIONS[name]
        if not value:
            raise PromptFileError(f"{where}: option --{name} needs a value")
        try:
            fields[field] = kind(value)
        except ValueError:
            raise PromptFileError(f"{where}: option --{name} expects {kind.__name__}, got {value!r}") from None
    return fields


def _toml_entries(path: Path, text: str) -> list[Any]:
    """sd-scripts' TOML layout: ``[prompt]`` defaults merged under each ``[[prompt.subset]]``."""
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as error:
        raise PromptFileError(f"{path}:{error.lineno}: invalid TOML: {error.msg}") from error
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise PromptFileError(f"{path}: expected a [prompt] table with [[prompt.subset]] entries")
    defaults = {key: value for key, value in table.items() if key != "subset"}
    return [defaults | subset for subset in table["subset"]]


def _json_entries(path: Path, text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"{path}:{error.lineno}: invalid JSON: {error.msg}") from error
    if not isinstance(data, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompts (objects or strings)")
    for index, entry in enumerate(data):
        if not isinstance(entry, (str, dict)):
            raise PromptFileError(f"{path}: prompt #{index + 1}: expected an object or a string")
    return data


def _fields_from_table(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check the keys and value types of one TOML / JSON prompt table."""
    fields: dict[str, Any] = {}
    for key, value in table.items():
        if key in IGNORED_FIELDS:
            logger.warning("%s: key %r is not used for SD / SDXL sample images; ignored", where, key)
            continue
        if key not in FIELD_TYPES:
            raise PromptFileError(f"{where}: unknown key {key!r}; expected one of {', '.join(FIELD_TYPES)}")
        if value is None and key in ("negative_prompt", "seed", "sample_sampler"):
            continue
        kind = FIELD_TYPES[key]
        accepted = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise PromptFileError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
        fields[key] = kind(value)
    return fields


def _make_prompt(fields: dict[str, Any], index: int, where: str) -> SamplePrompt:
    """Validate the values (any source) and build the prompt; steps are clamped to 1..1000 like sd-scripts."""
    if not fields.get("prompt"):
        raise PromptFileError(f"{where}: the prompt text is empty")
    for name in ("width", "height"):
        if name in fields and fields[name] <= 0:
            raise PromptFileError(f"{where}: {name} must be positive, got {fields[name]}")
    for name in ("scale", "seed"):
        if fields.get(name) is not None and fields[name] < 0:
            raise PromptFileError(f"{where}: {name} must not be negative, got {fields[name]}")
    if "sample_steps" in fields:
        fields["sample_steps"] = max(1, min(MAX_STEPS, fields["sample_steps"]))
    for name in ("prompt", "negative_prompt"):
        try:
            check_prompt(fields.get(name) or "")
        except ValueError as error:
            raise PromptFileError(f"{where}: {name} {fields[name]!r}: {error}") from None
    sampler = fields.get("sample_sampler")
    if sampler is not None and sampler.lower() not in SAMPLER_NAMES:
        raise PromptFileError(f"{where}: unknown sampler {sampler!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    return SamplePrompt(**fields, index=index)


# --------------------------------------------------------------------------------------------- samplers


def get_sampler(name: str, noise_scheduler_config: Mapping[str, Any]) -> SchedulerMixin:
    """The diffusers scheduler for sd-scripts' sampler ``name`` (case-insensitive), built from the training
    noise scheduler's config: betas, number of timesteps and ``prediction_type`` (v-prediction) carry over."""
    key = SAMPLER_ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
    overrides: dict[str, Any] = {}
    if key in ("dpmsolver", "dpmsolver++"):
        overrides["algorithm_type"] = key
        if key == "dpmsolver":  # diffusers refuses its default final sigma of zero with first-order DPM-Solver
            overrides["final_sigmas_type"] = "sigma_min"
    return SAMPLER_CLASSES[key].from_config(noise_scheduler_config, **overrides)


# --------------------------------------------------------------------------------------------- schedule


def should_sample(args: argparse.Namespace, step: int, epoch: int, is_epoch_end: bool) -> bool:
    """Whether sd-scripts samples at this point of the run.

    ``epoch`` is 0 before the first step and the current 1-based epoch afterwards; ``is_epoch_end`` marks the
    call after an epoch's last step. Before training: ``--sample_at_first`` (sd-scripts keys this on step 0;
    after ``--resume`` we sample at the start too). After a step: every ``--sample_every_n_steps`` steps,
    unless ``--sample_every_n_epochs`` is given, which then wins and samples at the end of every N-th epoch.
    Nothing is sampled without ``--sample_prompts``.
    """
    if not args.sample_prompts:
        return False
    if epoch == 0:
        return bool(args.sample_at_first)
    if args.sample_every_n_epochs:
        return is_epoch_end and epoch % args.sample_every_n_epochs == 0
    if args.sample_every_n_steps:
        return not is_epoch_end and step % args.sample_every_n_steps == 0
    return False


# --------------------------------------------------------------------------------------------- drawing


def sample_image_name(output_name: str | None, step: int, epoch: int | None, index: int, seed: int | None,
                      timestamp: str) -> str:  # fmt: skip
    """sd-scripts' sample file name: ``[{output_name}_]{step:06d}|e{epoch:06d}_{index:02d}_{timestamp}[_{seed}].png``
    (the epoch form when ``epoch`` is given, i.e. at an epoch end or before training)."""
    prefix = f"{output_name}_" if output_name else ""
    position = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    seed_suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{position}_{index:02d}_{timestamp}{seed_suffix}.png"


def sample_images(
    bundle: ModelBundle,
    network: torch.nn.Module | None,
    prompts: list[SamplePrompt],
    output_dir: str | os.PathLike,
    step: int,
    epoch: int | None,
    sampler_name: str,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    output_name: str | None = None,
) -> list[str]:
    """Draw every prompt with the bundle's live modules and save ``<output_dir>/sample/*.png``; returns the paths.

    ``network`` (the unwrapped LoRA network, or None) is only switched to eval mode: its modules already wrap the
    base model's forwards. ``sampler_name`` is used for prompts without their own ``--ss``. Under ``dtype``
    float16 / bfloat16 the pipeline runs in autocast. Each prompt's noise comes from its own CPU generator
    seeded with its seed, so the same seed gives the same image on any device.
    """
    device = torch.device(device)
    sample_dir = Path(output_dir) / SAMPLE_DIR_NAME
    sample_dir.mkdir(parents=True, exist_ok=True)
    modules = [bundle.unet, bundle.vae, *bundle.text_encoders] + ([network] if network is not None else [])

    paths = []
    with _preserved_rng_state(), _eval_mode(modules), _on_device([bundle.vae, *bundle.text_encoders], device):
        pipeline = _build_pipeline(bundle)
        pipeline.set_progress_bar_config(disable=True)
        for prompt in tqdm(prompts, desc="sample images", leave=False):
            sampler = prompt.sample_sampler or sampler_name
            pipeline.scheduler = get_sampler(sampler, bundle.noise_scheduler.config)
            seed = prompt.seed if prompt.seed is not None else torch.Generator().seed()
            width, height = prompt.image_size
            logger.info("sample %d: %r, %dx%d, %d steps, scale %s, %s, seed %d", prompt.index, prompt.prompt,
                        width, height, prompt.sample_steps, prompt.scale, sampler, seed)  # fmt: skip
            autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
            with torch.no_grad(), autocast:
                image = pipeline(
                    width=width,
                    height=height,
                    num_inference_steps=prompt.sample_steps,
                    guidance_scale=prompt.scale,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    **_prompt_inputs(bundle, prompt, device),
                ).images[0]
            timestamp = time.strftime("%Y%m%d%H%M%S", time.localtime())
            name = sample_image_name(output_name, step, epoch, prompt.index, prompt.seed, timestamp)
            paths.append(_save_png(image, sample_dir / name))
    return paths


def sample_during_training(
    accelerator: Any,
    args: argparse.Namespace,
    bundle: ModelBundle,
    network: torch.nn.Module,
    optimizer: Any,
    step: int,
    epoch: int,
    is_epoch_end: bool,
    dtype: torch.dtype,
) -> list[str]:
    """The trainer's hook, called before the first step (``epoch`` 0), after every optimizer step and at every
    epoch end: samples when ``should_sample`` says so, on the main process only, with a schedule-free optimizer
    in eval mode. The call before training also reads the prompt file, so a bad file fails before training
    starts; later, an unreadable file (edited during the run) is logged and that sampling skipped."""
    if epoch == 0 and args.sample_prompts:
        load_prompts(args.sample_prompts)  # fail fast
    if not should_sample(args, step, epoch, is_epoch_end) or not accelerator.is_main_process:
        return []
    try:
        prompts = load_prompts(args.sample_prompts)
    except PromptFileError as error:
        logger.error("no sample images at step %d: %s", step, error)
        return []
    schedulefree = is_schedulefree(optimizer)
    if schedulefree:
        optimizer.eval()
    try:
        return sample_images(
            bundle,
            accelerator.unwrap_model(network),
            prompts,
            args.output_dir,
            step,
            epoch if epoch == 0 or is_epoch_end else None,
            args.sample_sampler,
            accelerator.device,
            dtype,
            args.output_name,
        )
    finally:
        if schedulefree:
            optimizer.train()


def _build_pipeline(bundle: ModelBundle) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A diffusers pipeline around the bundle's own modules (nothing is copied or loaded). The scheduler is set
    per prompt; leaving it out here also keeps diffusers from rewriting its config (``steps_offset``)."""
    if bundle.is_sdxl:
        return StableDiffusionXLPipeline(
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0],
            tokenizer_2=bundle.tokenizers[1],
            unet=bundle.unet,
            scheduler=None,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=bundle.vae,
        text_encoder=bundle.text_encoders[0],
        tokenizer=bundle.tokenizers[0],
        unet=bundle.unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _prompt_inputs(bundle: ModelBundle, prompt: SamplePrompt, device: torch.device) -> dict[str, Any]:
    """The pipeline's text inputs, computed as sd-scripts' long-prompt-weighting pipelines do: the prompt and the
    negative prompt (absent: the empty prompt, not SDXL's zeroed embedding) read with the weight syntax, encoded
    in as many 77-token windows as the longer needs (at most 3), and weighted keeping each one's mean.

    SD 1.x/2.x: the last layer, or ``--clip_skip``'s. SDXL: each encoder's penultimate layer, weighted on its own
    and concatenated; the pooled embedding is TE2's of the first window, unweighted."""
    texts = [prompt.prompt, prompt.negative_prompt or ""]
    if not bundle.is_sdxl:
        encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
        embeds, _ = _long_prompt_embeddings(encoder, tokenizer, texts, device, bundle.clip_skip)
        return {"prompt_embeds": embeds[:1], "negative_prompt_embeds": embeds[1:]}
    hidden = []
    for encoder, tokenizer in zip(bundle.text_encoders, bundle.tokenizers):
        states, output = _long_prompt_embeddings(encoder, tokenizer, texts, device, sdxl=True)
        hidden.append(states)
    pooled = output.text_embeds.reshape(len(texts), -1, output.text_embeds.shape[-1])[:, 0]
    embeds = torch.cat(hidden, dim=2)
    return {
        "prompt_embeds": embeds[:1],
        "negative_prompt_embeds": embeds[1:],
        "pooled_prompt_embeds": pooled[:1],
        "negative_pooled_prompt_embeds": pooled[1:],
    }


def _long_prompt_embeddings(
    encoder: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    device: torch.device,
    clip_skip: int | None = None,
    sdxl: bool = False,
) -> tuple[torch.Tensor, Any]:
    """Weighted hidden states (B, 77·n, D) of ``texts``, every window keeping its BOS and EOS states, and the
    encoder's raw output (one row per window). The layer: SDXL's penultimate as it is; SD 1.x/2.x the last, or
    with ``clip_skip`` k the k-th from the end through the final LayerNorm."""
    n_windows = long_prompt_windows(tokenizer, texts)
    ids, weights = long_prompt_ids_and_weights(tokenizer, texts, n_windows)
    output = encoder(split_into_chunks(ids, tokenizer).to(device), output_hidden_states=True)
    if sdxl:
        hidden = output.hidden_states[-2]
    elif clip_skip is None or clip_skip == 1:
        hidden = output.last_hidden_state
    else:
        hidden = final_layer_norm(encoder)(output.hidden_states[-clip_skip])
    return apply_weights_keep_mean(hidden.reshape(len(texts), -1, hidden.shape[-1]), weights), output


def _save_png(image: Image.Image, path: Path) -> str:
    """Write ``image`` to ``path`` as PNG, atomically."""
    with atomic_output(path) as file:
        image.save(file, format="PNG")
    return str(path)


@contextlib.contextmanager
def _preserved_rng_state() -> Iterator[None]:
    """Restore torch's CPU and CUDA random states on exit: sampling must not shift the training run's stream."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Eval mode inside; on exit every submodule gets back its own training flag (they may differ)."""
    flags = [(module, module.training) for root in modules for module in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _on_device(modules: list[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move modules (a VAE or text encoder parked on the CPU, e.g. after latent caching) to ``device`` and back."""
    original = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, module_device in zip(modules, original):
            module.to(module_device)
