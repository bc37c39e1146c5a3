"""``NetworkTrainer``: the LoRA training loop, compatible with sd-scripts' ``train_network.py``.

``train(args)`` tells the run's story in a screenful: ``set_up`` (seed, accelerator, data, models, the latent
cache, network, optimizer and schedule — one :class:`TrainingRun` that holds them), then for each epoch
``train_epoch``: for each batch ``training_step`` (loss → backward → clip → ``optimizer.step`` → schedule),
``record_loss`` and, after each optimizer step, ``after_optimizer_step`` (samples, checkpoints, validation when
due); then ``end_epoch``; finally the last checkpoint. Outputs are named, saved and pruned by
``library/checkpoints.py``.

What differs between model families is behind a few small methods that a subclass (the SDXL trainer in
``library/sdxl.py``) overrides: ``load_models``, ``encode_text``, ``unet_forward``, ``latent_scale``,
``model_version``, ``model_spec`` and ``metadata_extras``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, broadcast_object_list, set_seed
from tqdm import tqdm

from library import base_weights, diffusion, fp8, masks, metadata as ss_metadata, preflight, resume
from library.checkpoints import Checkpoints
from library.dataset import build_dataset
from library.errors import (
    LossNotFinite,
    OutOfMemory,
    OutputWriteError,
    UserInputError,
    first_line,
    reported_as_user_input,
)
from library.latents import LATENT_DOWNSCALE, encode_latents
from library.lora_format import modelspec_metadata
from library.models import MIXED_PRECISION_DTYPES, ModelBundle, load_models
from library.optimizers import (
    get_optimizer,
    get_scheduler,
    is_schedulefree,
    optimizer_metadata_string,
    with_param_names,
)
from library.prompt_weights import check_dataset_captions
from library.sampling import sample_during_training
from library.text_encoding import encode_sd_text
from library.validation import (
    ValidationRecorder,
    is_validation_epoch,
    is_validation_step,
    split_dataset,
    validation_loss,
    validation_seed,
)
from networks import lycoris_adapter

DEFAULT_NETWORK_MODULE = "networks.lora"
logger = logging.getLogger(__name__)

# An optimizer's statistics (get_normalization_stats()) may synchronise with the device: read them this rarely.
OPTIMIZER_STATS_EVERY_N_STEPS = 10


class LossRecorder:
    """The moving average sd-scripts shows as ``avr_loss``: the mean of the most recent loss at each step
    position of an epoch (the first epoch fills the window, later epochs overwrite it in place)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.total = 0.0

    def add(self, epoch: int, step: int, loss: float) -> None:
        if epoch == 0 or step >= len(self.losses):
            self.losses.append(loss)
        else:
            self.total -= self.losses[step]
            self.losses[step] = loss
        self.total += loss

    @property
    def moving_average(self) -> float:
        return self.total / len(self.losses)


def parse_network_args(network_args: list[str] | None) -> dict[str, str]:
    """``--network_args key=value ...`` as a dict of strings, split on the first ``=`` (as sd-scripts does)."""
    kwargs: dict[str, str] = {}
    for item in network_args or []:
        if "=" not in item:
            raise UserInputError(f"--network_args: {item!r} is not key=value")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = value.strip()
    return kwargs


def import_network_module(name: str) -> Any:
    """The ``--network_module`` (``networks.lora``, ``lycoris.kohya``, ...); a name that does not exist is the
    user's error, while a module that exists but fails to import keeps its traceback. ``lycoris.kohya`` comes
    wrapped (``networks.lycoris_adapter``: its default preset creates duplicate modules on diffusers U-Nets)."""
    try:
        return lycoris_adapter.adapted(name, importlib.import_module(name))
    except ModuleNotFoundError as error:
        if error.name is None or not (name == error.name or name.startswith(error.name + ".")):
            raise
        raise UserInputError(f"--network_module {name}: no such module (e.g. {DEFAULT_NETWORK_MODULE})") from None


def first_text_encoder_lr(text_encoder_lr: float | list[float] | None) -> float | None:
    """``--text_encoder_lr`` takes several values on the command line (one per encoder) and one in a TOML file;
    the LoRA network takes one: the first."""
    if text_encoder_lr is None or isinstance(text_encoder_lr, (int, float)):
        return text_encoder_lr
    return text_encoder_lr[0] if len(text_encoder_lr) > 0 else None


class NetworkTrainer:
    """Trains a LoRA (or any sd-scripts-style network module) on an SD 1.x / 2.x model.

    After ``train(args)``, ``loss_history`` holds the loss of every micro-batch in order, ``skipped_steps`` the
    number of optimizer steps skipped for non-finite gradients and ``output_file`` the path of the final LoRA file.
    """

    is_sdxl = False

    def __init__(self) -> None:
        self.loss_history: list[float] = []
        self.skipped_steps = 0
        self.output_file: str | None = None
        self.args: argparse.Namespace | None = None
        self.accelerator: Accelerator | None = None
        self.models: ModelBundle | None = None

    # ------------------------------------------------------------------ what a model family changes

    def load_models(self, args: argparse.Namespace) -> ModelBundle:
        """The base model (U-Net, VAE, text encoders, tokenizers, noise scheduler)."""
        return load_models(args, sdxl=self.is_sdxl)

    @property
    def latent_scale(self) -> float:
        """Factor applied to VAE latents before they enter the U-Net (0.18215 for SD 1.x/2.x)."""
        return self.models.latent_scale

    @property
    def model_version(self) -> str:
        """``ss_base_model_version``: ``sd_v1``, ``sd_v2`` (or ``sdxl_base_v1-0`` in the SDXL trainer)."""
        return self.models.model_version

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Text conditioning for a batch of captions: the text encoder's hidden states (B, 77 or n·75 + 2, D)."""
        return encode_sd_text(
            self.models.text_encoders[0],
            self.models.tokenizers[0],
            captions,
            self.args.max_token_length,
            self.args.clip_skip,
            self.accelerator.device,
            weighted=self.args.weighted_captions,
        )

    def unet_forward(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor, batch: dict
    ) -> torch.Tensor:
        """The U-Net's prediction (noise, or velocity under v-parameterization)."""
        return self.models.unet(noisy_latents, timesteps, conditioning).sample

    def model_spec(self, args: argparse.Namespace, training_started_at: float) -> dict[str, str]:
        """The ``modelspec.*`` keys of a saved file (architecture, resolution, title, date, ...)."""
        return modelspec_metadata(
            sdxl=self.is_sdxl,
            v2=self.models.v2,
            v_parameterization=args.v_parameterization,
            timestamp=training_started_at,
            title=args.metadata_title if args.metadata_title is not None else args.output_name,
            resolution=args.resolution,
            author=args.metadata_author,
            description=args.metadata_description,
            license=args.metadata_license,
            tags=args.metadata_tags,
        )

    def text_encoder_lr(self, args: argparse.Namespace, network: Any) -> float | list[float] | None:
        """The text-encoder lr handed to ``network.prepare_optimizer_params`` (SD 1.x/2.x: the first value)."""
        return first_text_encoder_lr(args.text_encoder_lr)

    def prepare_text_encoders(self, dataset: Any, weight_dtype: torch.dtype) -> None:
        """Put the text encoders where the loop runs them (the device, in ``weight_dtype``). The SDXL trainer may
        instead encode every caption of ``dataset`` once here and keep the encoders off the device."""
        for encoder in self.models.text_encoders:
            encoder.to(self.accelerator.device, dtype=weight_dtype)

    def metadata_extras(self, args: argparse.Namespace) -> dict[str, str]:
        """Model-family ``ss_*`` keys added to the run's metadata (none for SD 1.x/2.x)."""
        return {}

    # ------------------------------------------------------------------ one training step

    def compute_loss(self, batch: dict, train_text_encoder: bool, weight_dtype: torch.dtype) -> torch.Tensor:
        """The loss of one batch: noise the latents, predict, compare with the target, weight, average."""
        args, accelerator, scheduler = self.args, self.accelerator, self.models.noise_scheduler
        device = accelerator.device

        with torch.no_grad():
            if batch["latents"] is not None:
                latents = batch["latents"].to(device, dtype=torch.float32)
            else:
                vae = self.models.vae
                latents = encode_latents(vae, batch["images"].to(device, dtype=vae.dtype)).float()
            latents = torch.nan_to_num(latents, 0.0) * self.latent_scale

        with torch.set_grad_enabled(train_text_encoder), accelerator.autocast():
            conditioning = self.encode_text(batch["captions"])
        if args.full_fp16 or args.full_bf16:
            conditioning = _to_dtype(conditioning, weight_dtype)

        noise = diffusion.sample_noise(
            latents,
            noise_offset=args.noise_offset,
            noise_offset_random_strength=args.noise_offset_random_strength,
            adaptive_noise_scale=args.adaptive_noise_scale,
            multires_noise_iterations=args.multires_noise_iterations,
            multires_noise_discount=args.multires_noise_discount,
        )
        min_timestep = 0 if args.min_timestep is None else args.min_timestep
        max_timestep = scheduler.config.num_train_timesteps if args.max_timestep is None else args.max_timestep
        timesteps = diffusion.sample_timesteps(latents.shape[0], min_timestep, max_timestep, device)
        model_input_noise = diffusion.input_perturbation(noise, args.ip_noise_gamma, args.ip_noise_gamma_random_strength)
        noisy_latents = scheduler.add_noise(latents, model_input_noise, timesteps)

        with accelerator.autocast():
            prediction = self.unet_forward(noisy_latents.to(weight_dtype), timesteps, conditioning, batch)

        if args.v_parameterization:
            target = diffusion.velocity_target(scheduler, latents, noise, timesteps)
        else:
            target = noise

        huber_c = None
        if args.loss_type in ("huber", "smooth_l1"):
            huber_c = diffusion.huber_threshold(args.huber_schedule, args.huber_c, args.huber_scale, scheduler, timesteps)
        loss_mask = masks.latent_loss_mask(batch.get("loss_masks"), prediction.shape[-2:], device)
        loss = diffusion.per_sample_loss(prediction, target, args.loss_type, huber_c, loss_mask)
        loss = loss * batch["loss_weights"].to(device)

        if args.min_snr_gamma or args.scale_v_pred_loss_like_noise_pred or args.v_pred_like_loss or args.debiased_estimation_loss:
            snr_t = diffusion.snr(scheduler, timesteps)
            if args.min_snr_gamma:
                loss = loss * diffusion.min_snr_weight(snr_t, args.min_snr_gamma, args.v_parameterization)
            if args.scale_v_pred_loss_like_noise_pred:
                loss = loss * diffusion.v_like_noise_scale(snr_t)
            if args.v_pred_like_loss:
                loss = diffusion.add_v_prediction_like_loss(loss, snr_t, args.v_pred_like_loss)
            if args.debiased_estimation_loss:
                loss = loss * diffusion.debiased_estimation_weight(snr_t, args.v_parameterization)
        return loss.mean()

    # ------------------------------------------------------------------ the run

    def train(self, args: argparse.Namespace) -> str:
        """Train the network described by ``args`` (see ``library/config.py``); returns the final LoRA's path."""
        try:
            run = self.set_up(args)
        except KeyboardInterrupt:
            raise resume.TrainingInterrupted(
                "interrupted before training started (while loading the models or caching latents); nothing was "
                "trained, and latents already cached to disk are complete"
            ) from None
        except OutputWriteError as error:  # a full disk while caching latents or text-encoder outputs
            raise OutputWriteError(f"{error}; nothing was trained") from error
        except torch.OutOfMemoryError as error:
            raise OutOfMemory(f"out of memory before training started ({first_line(error)}); {OOM_ADVICE}") from error
        self.print_summary(run)
        with run.checkpoints.naming_the_newest_on_failure():  # a full disk, no memory: say which LoRA is left
            interrupt = resume.InterruptRequest().install()  # first Ctrl-C: save after this step, then stop
            try:
                for epoch in range(run.first_epoch, run.num_epochs):
                    self.train_epoch(run, epoch, interrupt)
            except torch.OutOfMemoryError as error:
                raise OutOfMemory(
                    f"out of memory at step {run.global_step + 1} ({first_line(error)}); {OOM_ADVICE}"
                ) from error
            finally:
                interrupt.restore()
                run.progress_bar.close()
            self.output_file = run.checkpoints.at_end(run.num_epochs, run.global_step)
        if self.output_file is not None:
            print_how_to_use(run.accelerator, self.output_file)
        run.accelerator.end_training()  # closes the trackers and the process group, so it comes after the last save
        return self.output_file

    def set_up(self, args: argparse.Namespace) -> TrainingRun:
        """Everything before the first step, in sd-scripts' order but for the seed, which follows the accelerator
        (so that every process gets the same one): accelerator and seed, data, models, the latent cache, network,
        optimizer and schedule, accelerate's prepare, metadata, ``--resume``, trackers."""
        session_id = random.randint(0, 2**32)
        training_started_at = time.time()
        self.args = args
        preflight.check_before_models(args)  # seconds, not the minutes a model load and latent cache take

        accelerator = self.accelerator = make_accelerator(args)
        if args.seed is None:  # one seed for every process, as with --seed: they shuffle the data alike
            args.seed = broadcast_object_list([random.randint(0, 2**32)], from_process=0)[0]
        set_seed(args.seed)
        fp8.check_fp8_run(args, accelerator)
        check_output_dir(args.output_dir)
        weight_dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
        dataset, validation_dataset = self.read_data(args)  # before the models: a bad caption or mask fails now
        models = self.set_up_models(args)
        self.prepare_data(dataset, validation_dataset, weight_dtype)
        network, network_kwargs, train_text_encoder = self.set_up_network(args)

        with reported_as_user_input():  # learning rates, --optimizer_type, --optimizer_args
            text_encoder_lr = self.text_encoder_lr(args, network)
            param_groups, lr_descriptions = network.prepare_optimizer_params(
                text_encoder_lr, args.unet_lr, args.learning_rate
            )
            param_groups = with_param_names(param_groups, network.named_parameters())  # LyCORIS gives none
            optimizer_name, optimizer_args, optimizer = get_optimizer(args, param_groups)
        dataloader = make_dataloader(args, dataset)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * math.ceil(
                len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps
            )
            accelerator.print(f"--max_train_epochs {args.max_train_epochs}: {args.max_train_steps} steps")
        dataset.set_max_train_steps(args.max_train_steps)
        with reported_as_user_input():  # --lr_scheduler, --lr_scheduler_args, warm-up and decay steps
            lr_scheduler = get_scheduler(args, optimizer, accelerator.num_processes)

        if args.full_fp16 or args.full_bf16:
            network.to(weight_dtype)
        if fp8.unet_in_fp8(args):  # --fp8_base / --fp8_base_unet
            fp8.store_in_fp8(models.unet, weight_dtype, accelerator.device)
        else:
            models.unet.to(accelerator.device, dtype=weight_dtype)
        self.prepare_text_encoders(dataset, weight_dtype)
        if fp8.text_encoders_in_fp8(args):
            for encoder in models.text_encoders:
                fp8.store_in_fp8(encoder, weight_dtype, encoder.device)
        # Registered with accelerate (its weights go into the saved state, mixed precision applies) but not wrapped
        # in DDP: the LoRA's forward never runs through the wrapper (it patches the models' layers), and
        # _all_reduce_gradients averages the gradients. DDP would only add its gradient buckets and a reducer whose
        # teardown at exit can deadlock gloo (torch frees it holding the GIL that a gloo worker thread waits for).
        network = accelerator.prepare_model(network, evaluation_mode=True)
        if accelerator.num_processes > 1:
            _broadcast_from_main_process(network)
        optimizer, dataloader, lr_scheduler = accelerator.prepare(optimizer, dataloader, lr_scheduler)
        if args.full_fp16:
            _allow_fp16_gradient_unscaling(accelerator)
        # train mode only where it matters: gradient checkpointing is active in train mode only
        models.unet.train(args.gradient_checkpointing)
        for encoder in models.text_encoders:
            encoder.train(args.gradient_checkpointing and train_text_encoder)
        accelerator.unwrap_model(network).prepare_grad_etc(self.text_encoder_argument, models.unet)

        steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
        num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        if args.save_n_epoch_ratio:  # as sd-scripts: about that many epoch saves over the run
            args.save_every_n_epochs = math.floor(num_epochs / args.save_n_epoch_ratio) or 1

        run_metadata = ss_metadata.training_metadata(
            args,
            session_id=session_id,
            training_started_at=training_started_at,
            model_version=self.model_version,
            text_encoder_lr=text_encoder_lr,
            optimizer=optimizer_metadata_string(optimizer_name, optimizer_args),
            num_train_images=dataset.num_train_images,
            num_reg_images=dataset.num_reg_images,
            num_batches_per_epoch=len(dataloader),
            num_epochs=num_epochs,
            network_kwargs=network_kwargs,
        )
        total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        run_metadata.update(ss_metadata.dataset_metadata(args, dataset, total_batch_size))
        run_metadata.update(ss_metadata.base_model_metadata(args))
        run_metadata.update(self.metadata_extras(args))
        model_spec = self.model_spec(args, training_started_at)

        def file_metadata(steps: int, epoch: int) -> dict[str, str]:
            return ss_metadata.metadata_for_save(
                run_metadata, steps=steps, epoch=epoch, no_metadata=args.no_metadata, model_spec=model_spec
            )

        run_fingerprint = resume.fingerprint(args, accelerator.unwrap_model(network), optimizer)
        run = TrainingRun(
            accelerator=accelerator,
            dataset=dataset,
            validation_dataset=validation_dataset,
            network=network,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dataloader=dataloader,
            lr_descriptions=lr_descriptions,
            weight_dtype=weight_dtype,
            train_text_encoder=train_text_encoder,
            run_metadata=run_metadata,
            checkpoints=Checkpoints(
                args, accelerator, network, file_metadata, run_fingerprint, lambda: averaged_weights(optimizer)
            ),
            num_epochs=num_epochs,
            steps_per_epoch=steps_per_epoch,
        )
        if args.resume:
            state = resume.load_state(accelerator, args.resume, run_fingerprint)
            run.global_step = state.step
            run.first_epoch, run.batches_to_skip = resume.resume_position(
                state.step, steps_per_epoch, args.gradient_accumulation_steps
            )
            accelerator.print(f"resumed from {args.resume} at step {run.global_step} (epoch {run.first_epoch + 1})")
            if run.global_step >= args.max_train_steps:  # a finished run: no step left, the LoRA written is the state's
                accelerator.print(f"the state is at step {run.global_step} of {args.max_train_steps}: no step left")
                run.first_epoch = num_epochs

        accelerator.init_trackers(
            args.log_tracker_name or "network_train",
            config=_tracker_config(args) if args.log_config else None,
            init_kwargs={"wandb": {"name": args.wandb_run_name}} if args.wandb_run_name else {},
        )
        run.is_tracking = len(accelerator.trackers) > 0
        run.trainable_params = accelerator.unwrap_model(network).get_trainable_params()
        self.skipped_steps = 0  # optimizer steps not taken because a gradient was inf/NaN
        # before the progress bar: this call also reads --sample_prompts, so a bad file fails on a line of its own
        self.sample(run, epoch=0, is_epoch_end=False)
        run.progress_bar = tqdm(
            range(args.max_train_steps),
            initial=run.global_step,
            smoothing=0,
            disable=not accelerator.is_local_main_process,
            desc="steps",
        )
        return run

    def set_up_models(self, args: argparse.Namespace) -> ModelBundle:
        """The frozen base model, with ``--base_weights`` merged in; the network's own parameters are the only ones
        trained."""
        with reported_as_user_input():
            models = self.models = self.load_models(args)
        base_weights.merge_base_weights(args, models.text_encoders, models.unet)  # --base_weights
        for model in (models.unet, models.vae, *models.text_encoders):
            model.requires_grad_(False)
        if args.zero_terminal_snr:
            diffusion.fix_betas_for_zero_terminal_snr(models.noise_scheduler)
        return models

    def read_data(self, args: argparse.Namespace) -> tuple[Any, Any]:
        """The training dataset and the ``--validation_split`` part (or None): images, captions and masks found
        and checked, nothing encoded yet."""
        with reported_as_user_input():
            dataset = build_dataset(args)
            if args.weighted_captions:
                check_dataset_captions(dataset)
        validation_dataset = None
        if args.validation_split:
            dataset, validation_dataset = split_dataset(dataset, args.validation_split, validation_seed(args))
        return dataset, validation_dataset

    def prepare_data(self, dataset: Any, validation_dataset: Any, weight_dtype: torch.dtype) -> None:
        """Check the buckets against the U-Net; under ``--cache_latents`` encode every image once (and move the
        VAE off the device), else put the VAE where the loop encodes."""
        args, vae = self.args, self.models.vae
        with reported_as_user_input():
            dataset.verify_bucket_reso_steps(latent_size_multiple(self.models.unet) * LATENT_DOWNSCALE)
        vae_dtype = torch.float32 if args.no_half_vae else weight_dtype
        vae.eval()
        if args.cache_latents:
            for part in (dataset, validation_dataset):
                if part is not None:
                    part.cache_latents(
                        vae, args.cache_latents_to_disk, self.accelerator.device, vae_dtype, args.vae_batch_size
                    )
            vae.to("cpu")  # not needed any more
            self.accelerator.wait_for_everyone()
        else:
            vae.to(self.accelerator.device, dtype=vae_dtype)

    @property
    def text_encoder_argument(self) -> Any:
        """What sd-scripts' network interface takes as ``text_encoder``: the module, or a list of them (SDXL)."""
        text_encoders = self.models.text_encoders
        return text_encoders[0] if len(text_encoders) == 1 else text_encoders

    def set_up_network(self, args: argparse.Namespace) -> tuple[Any, dict[str, str], bool]:
        """The network from ``--network_module`` / ``--network_args``, applied to the model, with
        ``--network_weights`` loaded; returns it, its keyword arguments and whether the text encoders train."""
        unet, vae, text_encoder = self.models.unet, self.models.vae, self.text_encoder_argument
        args.network_module = args.network_module or DEFAULT_NETWORK_MODULE
        network_module = import_network_module(args.network_module)
        network_kwargs = parse_network_args(args.network_args)
        with reported_as_user_input():  # --network_args, --network_dim / --dim_from_weights
            if args.dim_from_weights:
                network, _ = network_module.create_network_from_weights(
                    1.0, args.network_weights, vae, text_encoder, unet, **network_kwargs
                )
            else:
                network_kwargs.setdefault("dropout", args.network_dropout)  # LyCORIS reads its dropout from here
                network = network_module.create_network(
                    1.0,
                    args.network_dim,
                    args.network_alpha,
                    vae,
                    text_encoder,
                    unet,
                    neuron_dropout=args.network_dropout,
                    **network_kwargs,
                )
        train_unet = not args.network_train_text_encoder_only
        train_text_encoder = not args.network_train_unet_only
        network.apply_to(text_encoder, unet, train_text_encoder, train_unet)
        if args.network_weights is not None and not args.dim_from_weights:
            with reported_as_user_input():  # a missing or unreadable file
                info = network.load_weights(args.network_weights)
            self.accelerator.print(f"loaded network weights from {args.network_weights}: {info}")

        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if train_text_encoder:
                for encoder in self.models.text_encoders:
                    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(network, "enable_gradient_checkpointing"):
                network.enable_gradient_checkpointing()
        return network, network_kwargs, train_text_encoder

    def print_summary(self, run: TrainingRun) -> None:
        """The run's size, as sd-scripts prints it before the first step."""
        print_ = run.accelerator.print
        print_("running training")
        print_(f"  num train images * repeats: {run.dataset.num_train_images}")
        print_(f"  num reg images: {run.dataset.num_reg_images}")
        print_(f"  num batches per epoch: {len(run.dataloader)}")
        print_(f"  num epochs: {run.num_epochs}")
        print_(f"  gradient accumulation steps: {self.args.gradient_accumulation_steps}")
        print_(f"  total optimization steps: {self.args.max_train_steps}")

    # ------------------------------------------------------------------ the loop

    def train_epoch(self, run: TrainingRun, epoch: int, interrupt: resume.InterruptRequest) -> None:
        """One epoch (0-based ``epoch``): every batch, then what is due at the epoch's end."""
        args, accelerator = self.args, run.accelerator
        accelerator.print(f"\nepoch {epoch + 1}/{run.num_epochs}")
        run.dataset.set_current_epoch(epoch + 1)
        run.run_metadata["ss_epoch"] = str(epoch + 1)
        accelerator.unwrap_model(run.network).on_epoch_start(self.text_encoder_argument, self.models.unet)
        schedulefree_train(run.optimizer)

        skip = run.batches_to_skip if epoch == run.first_epoch else 0
        batches = accelerator.skip_first_batches(run.dataloader, skip) if skip else run.dataloader
        for step, batch in enumerate(batches, start=skip):
            run.dataset.set_current_step(run.global_step)
            loss = self.training_step(run, batch)
            logs = self.record_loss(run, epoch, step, loss)
            if accelerator.sync_gradients:
                run.global_step += 1
                run.progress_bar.update(1)
                self.after_optimizer_step(run, epoch)
            if run.is_tracking:
                if self.skipped_steps:
                    logs["loss/skipped_steps"] = self.skipped_steps
                if run.global_step % OPTIMIZER_STATS_EVERY_N_STEPS == 0:
                    logs.update(optimizer_stats_logs(run.optimizer))
                accelerator.log(logs, step=run.global_step)
            if accelerator.sync_gradients and interrupt.requested_anywhere(accelerator):
                raise resume.TrainingInterrupted(run.checkpoints.on_interrupt(epoch + 1, run.global_step))
            if run.global_step >= args.max_train_steps:
                break
        self.end_epoch(run, epoch)

    def training_step(self, run: TrainingRun, batch: dict) -> torch.Tensor:
        """Forward and backward of one micro-batch; at the end of an accumulation: all-reduce, clip, skip a step
        whose gradients are not finite, ``optimizer.step()``, the schedule. Returns the loss."""
        args, accelerator = self.args, run.accelerator
        with accelerator.accumulate(run.network):
            loss = self.compute_loss(batch, run.train_text_encoder, run.weight_dtype)
            accelerator.backward(loss)
            gradients_finite = True
            if accelerator.sync_gradients:
                if accelerator.num_processes > 1:
                    _all_reduce_gradients(accelerator, run.trainable_params)
                grad_norm = None
                if args.max_grad_norm != 0.0:
                    grad_norm = accelerator.clip_grad_norm_(run.trainable_params, args.max_grad_norm)
                if accelerator.scaler is None:  # fp16's grad scaler skips non-finite steps itself
                    if grad_norm is None:
                        grad_norm = _gradient_norm(run.trainable_params)
                    gradients_finite = bool(torch.isfinite(grad_norm))
                if not gradients_finite:
                    self.skipped_steps += 1
                    logger.warning("step %d skipped: non-finite gradients (%d skipped so far)",
                                   run.global_step + 1, self.skipped_steps)  # fmt: skip
            if gradients_finite:
                run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        return loss

    def record_loss(self, run: TrainingRun, epoch: int, step: int, loss: torch.Tensor) -> dict[str, float]:
        """After each micro-batch: ``--scale_weight_norms``, the loss history and average, ``--nan_abort_steps``,
        the progress bar; returns the step's tracker values."""
        args = self.args
        logs: dict[str, float] = {}
        if args.scale_weight_norms:
            keys_scaled, mean_norm, max_norm = run.accelerator.unwrap_model(run.network).apply_max_norm_regularization(
                args.scale_weight_norms, run.accelerator.device
            )
            logs = {"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm,
                    "norm/avg_key_norm": mean_norm}  # fmt: skip

        current_loss = loss.detach().item()
        self.loss_history.append(current_loss)
        run.non_finite_losses = 0 if math.isfinite(current_loss) else run.non_finite_losses + 1
        if args.nan_abort_steps and run.non_finite_losses >= args.nan_abort_steps:
            raise LossNotFinite(
                f"the loss was not finite for {run.non_finite_losses} batches in a row (step {run.global_step}); "
                "stopping (--nan_abort_steps). Try a lower --learning_rate, --max_grad_norm 1.0, or "
                "--mixed_precision bf16 / --no_half_vae instead of fp16"
            )
        run.loss_recorder.add(epoch=epoch, step=step, loss=current_loss)
        average_loss = run.loss_recorder.moving_average
        postfix = {"loss": f"{current_loss:.4f}", "avr_loss": f"{average_loss:.4f}"}
        if run.validation_loss is not None:
            postfix["val_loss"] = f"{run.validation_loss:.4f}"
        run.progress_bar.set_postfix(postfix)
        return step_logs(current_loss, average_loss, run.lr_scheduler, run.lr_descriptions) | logs

    def after_optimizer_step(self, run: TrainingRun, epoch: int) -> None:
        """What may be due after an optimizer step: samples, checkpoints, a validation pass."""
        self.sample(run, epoch + 1, is_epoch_end=False)
        run.checkpoints.after_step(run.global_step, epoch + 1)
        if run.validation_dataset is not None and is_validation_step(self.args, run.global_step):
            self.log_validation(run, run.validation_recorder.step_logs(self.validate(run)))

    def end_epoch(self, run: TrainingRun, epoch: int) -> None:
        """At an epoch's end: its average loss, a validation pass, checkpoints and samples when due."""
        args, accelerator = self.args, run.accelerator
        if run.is_tracking:
            accelerator.log({"loss/epoch_average": run.loss_recorder.moving_average}, step=epoch + 1)
        if run.validation_dataset is not None and is_validation_epoch(args, epoch + 1):
            self.log_validation(run, run.validation_recorder.epoch_logs(self.validate(run)))
            accelerator.print(f"epoch {epoch + 1}: validation loss {run.validation_loss:.4f}")
        accelerator.wait_for_everyone()
        run.checkpoints.after_epoch(epoch + 1, run.num_epochs, run.global_step)
        self.sample(run, epoch + 1, is_epoch_end=True)

    def validate(self, run: TrainingRun) -> float:
        """The held-out loss at fixed noise and timesteps (``library/validation.py``)."""
        loader = torch.utils.data.DataLoader(run.validation_dataset, batch_size=1, collate_fn=_single_batch)
        run.validation_loss = validation_loss(
            run.accelerator,
            run.accelerator.unwrap_model(run.network),
            loader,
            lambda batch: self.compute_loss(batch, False, run.weight_dtype),
            validation_seed(self.args),
            self.args.max_validation_steps,
        )
        return run.validation_loss

    def log_validation(self, run: TrainingRun, logs: dict[str, float]) -> None:
        if run.is_tracking:
            run.accelerator.log(logs, step=run.global_step)

    def sample(self, run: TrainingRun, epoch: int, is_epoch_end: bool) -> None:
        """Sample images when ``--sample_every_n_*`` says so (``library/sampling.py``)."""
        sample_during_training(
            run.accelerator, self.args, self.models, run.network, run.optimizer, run.global_step, epoch,
            is_epoch_end, run.weight_dtype,
        )  # fmt: skip


@dataclass
class TrainingRun:
    """What a run holds between its steps: built by ``NetworkTrainer.set_up``, advanced by the loop."""

    accelerator: Accelerator
    dataset: Any
    validation_dataset: Any
    network: Any
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    lr_descriptions: list[str] | None
    weight_dtype: torch.dtype
    train_text_encoder: bool
    run_metadata: dict[str, str]
    checkpoints: Checkpoints
    num_epochs: int
    steps_per_epoch: int
    global_step: int = 0
    first_epoch: int = 0
    batches_to_skip: int = 0  # batches of the first epoch already trained (--resume)
    is_tracking: bool = False
    trainable_params: list[torch.nn.Parameter] = field(default_factory=list)
    loss_recorder: LossRecorder = field(default_factory=LossRecorder)
    validation_recorder: ValidationRecorder = field(default_factory=ValidationRecorder)
    validation_loss: float | None = None  # the latest held-out loss, shown on the progress bar
    non_finite_losses: int = 0  # in a row, for --nan_abort_steps
    progress_bar: Any = None


# What lowers the memory a LoRA run needs, most effective first.
OOM_ADVICE = (
    "try --gradient_checkpointing, --cache_latents, --fp8_base, --mixed_precision bf16, a smaller "
    "--train_batch_size or --resolution, or --network_train_unet_only with --cache_text_encoder_outputs (SDXL)"
)


def make_dataloader(args: argparse.Namespace, dataset: Any) -> torch.utils.data.DataLoader:
    """The loader over ``dataset``, whose items are whole batches from one bucket, shuffled by the dataset itself."""
    n_workers = min(args.max_data_loader_n_workers, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,  # the dataset shuffles its batches itself, per epoch, from --seed
        collate_fn=_single_batch,
        num_workers=n_workers,
        persistent_workers=args.persistent_data_loader_workers and n_workers > 0,
        # its own generator: starting an epoch's iterator then draws no number from the global RNG, so a run
        # resumed mid-epoch draws the same noise as the run it continues
        generator=torch.Generator().manual_seed(args.seed),
    )


def print_how_to_use(accelerator: Accelerator, path: str) -> None:
    """The run's last words: where the LoRA is and what to do with it."""
    path = os.path.abspath(path)
    accelerator.print(f"LoRA saved to {path}")
    accelerator.print(f"  continue training from it: --network_weights {path}")
    accelerator.print("  use it: ComfyUI (LoraLoader), A1111 (models/Lora) and diffusers (load_lora_weights) load it")


@contextmanager
def averaged_weights(optimizer: Any) -> Iterator[None]:
    """A schedule-free optimizer's averaged weights in the network for the block (what is saved or sampled)."""
    schedulefree_eval(optimizer)
    try:
        yield
    finally:
        schedulefree_train(optimizer)


def schedulefree_train(optimizer: Any) -> None:
    """Schedule-free optimizers (``AdamWScheduleFree`` ...) train at one point and save at another: train mode."""
    if is_schedulefree(optimizer):
        optimizer.train()


def schedulefree_eval(optimizer: Any) -> None:
    """Switch a schedule-free optimizer's weights to the averaged ones, which are the ones to save."""
    if is_schedulefree(optimizer):
        optimizer.eval()


def check_output_dir(output_dir: str | None) -> None:
    """Fail before any heavy work when ``--output_dir`` is not given, cannot be created or cannot be written to
    (a file in the folder is created and removed; permission bits alone do not tell, e.g. for root)."""
    if not output_dir:
        raise UserInputError("--output_dir is required: the folder the trained LoRA is written to")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserInputError(f"--output_dir {output_dir}: cannot create or write to this folder ({reason})") from None


def latent_size_multiple(unet: torch.nn.Module) -> int:
    """Latent sides must be divisible by this for the U-Net's down/up path (2 per downsampling level): 8 for
    SD 1.x/2.x, 4 for SDXL, so buckets must step by 64 / 32 pixels."""
    return 2 ** (len(unet.config.down_block_types) - 1)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The ``Accelerator`` for a run. As in sd-scripts, ``--logging_dir`` turns on TensorBoard unless ``--log_with``
    says otherwise, and each run logs into ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>``."""
    log_with = args.log_with
    logging_dir = None
    if args.logging_dir is not None:
        logging_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
        log_with = log_with or "tensorboard"
    if log_with in ("tensorboard", "all") and logging_dir is None:
        raise UserInputError(f"--log_with {log_with} needs --logging_dir (the folder the event files go to)")
    if log_with in ("wandb", "all"):
        _wandb_login(args.wandb_api_key)
    kwargs_handlers = []
    if args.ddp_timeout:
        kwargs_handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=log_with,
        project_dir=logging_dir,
        kwargs_handlers=kwargs_handlers,
    )


def _wandb_login(api_key: str | None) -> None:
    """``--log_with wandb``: the package must be installed; ``--wandb_api_key`` logs in (else wandb's own login)."""
    try:
        import wandb
    except ImportError:
        raise UserInputError("--log_with wandb needs the wandb package: pip install wandb") from None
    if api_key:
        wandb.login(key=api_key)


def step_logs(current_loss: float, average_loss: float, lr_scheduler: Any, lr_descriptions: list[str] | None) -> dict:
    """Per-step tracker values: ``loss/current``, ``loss/average`` and ``lr/<group description>``."""
    logs: dict[str, float] = {"loss/current": current_loss, "loss/average": average_loss}
    for index, lr in enumerate(lr_scheduler.get_last_lr()):
        description = lr_descriptions[index] if lr_descriptions else f"group{index}"
        logs[f"lr/{description}"] = float(lr)
    return logs


def optimizer_stats_logs(optimizer: Any) -> dict[str, float]:
    """The numeric top-level entries of an optimizer's ``get_normalization_stats()`` (if it has one) as
    ``optimizer/<key>``; booleans as 0 / 1, one-element tensors as numbers, anything else left out."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    if not hasattr(inner, "get_normalization_stats"):
        return {}
    logs: dict[str, float] = {}
    for key, value in inner.get_normalization_stats().items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float)):
            logs[f"optimizer/{key}"] = float(value)
    return logs


# Never sent to a tracker.
_SECRET_ARGUMENTS = ("wandb_api_key",)


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """``--log_config``: the run's arguments as tracker hyper-parameters, without secrets; only plain scalars
    (TensorBoard rejects the rest)."""
    return {
        key: value
        for key, value in vars(args).items()
        if isinstance(value, (bool, int, float, str)) and key not in _SECRET_ARGUMENTS
    }


def _single_batch(items: list[dict]) -> dict:
    """Collate for a dataset whose items are whole batches (the loader's batch size is 1)."""
    return items[0]


def _to_dtype(conditioning: Any, dtype: torch.dtype) -> Any:
    if isinstance(conditioning, torch.Tensor):
        return conditioning.to(dtype)
    if isinstance(conditioning, dict):
        return {key: _to_dtype(value, dtype) for key, value in conditioning.items()}
    return type(conditioning)(_to_dtype(value, dtype) for value in conditioning)


def _gradient_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The L2 norm over every gradient (what ``clip_grad_norm_`` returns); non-finite if any gradient is."""
    grads = [param.grad for param in params if param.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _all_reduce_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average the network's gradients over processes (the network is not wrapped in DDP)."""
    grads = [param.grad for param in params if param.grad is not None]
    _collective_in_place(grads, lambda flat: accelerator.reduce(flat, reduction="mean"))


@torch.no_grad()
def _broadcast_from_main_process(network: torch.nn.Module) -> None:
    """Give every process the main process's weights and buffers, as DDP does when it wraps a model: the ranks
    start alike whatever each drew before (a ``--seed`` of its own, random draws on one process only)."""
    _collective_in_place([*network.parameters(), *network.buffers()], lambda flat: broadcast(flat, from_process=0))


def _collective_in_place(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Apply ``collective`` (one flat tensor in, one out) to ``tensors`` laid end to end and copy the result back
    into them: one collective per dtype, not one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for group in by_dtype.values():
        flat = collective(torch.cat([tensor.reshape(-1) for tensor in group]))
        for tensor, value in zip(group, flat.split([tensor.numel() for tensor in group])):
            tensor.copy_(value.view_as(tensor))


def _allow_fp16_gradient_unscaling(accelerator: Accelerator) -> None:
    """``--full_fp16``: the network's weights and gradients are fp16, which torch's GradScaler refuses to unscale
    by default; let it (sd-scripts does the same)."""
    scaler = accelerator.scaler
    if scaler is None:
        return
    unscale = scaler._unscale_grads_

    def unscale_allowing_fp16(optimizer, inv_scale, found_inf, allow_fp16):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_allowing_fp16
