"""LoRA network for Stable Diffusion 1.x / 2.x / SDXL with sd-scripts' interface (``--network_module networks.lora``).

A trainer builds it with :func:`create_network` (or :func:`create_network_from_weights`), then calls
``apply_to``, ``prepare_optimizer_params``, ``prepare_grad_etc``, ``on_epoch_start`` and ``save_weights`` —
the same hooks LyCORIS' ``lycoris.kohya`` module offers, so either slots in.

Targets: every ``Linear`` / 1×1 ``Conv2d`` inside U-Net ``Transformer2DModel`` blocks and inside the text
encoders' ``CLIPAttention`` / ``CLIPSdpaAttention`` / ``CLIPMLP``; with ``conv_dim`` also every layer inside
``ResnetBlock2D`` / ``Downsample2D`` / ``Upsample2D`` (3×3 convs at ``conv_dim``/``conv_alpha``, their Linear
``time_emb_proj`` and 1×1 ``conv_shortcut`` at ``network_dim``/``network_alpha``).

Each :class:`LoRAModule` wraps its base layer's ``forward`` (the layer stays in place, so the base model's
state-dict keys are unchanged): ``out = org(x) + lora_up(lora_down(x)) · multiplier · alpha / rank``.
Key names and the file format live in ``library.lora_format``.

Block-wise settings (``block_dims``, ``down_lr_weight``, ...) index U-Net modules by their LDM block, with
sd-scripts' numbering (:data:`SD_BLOCKS`, :data:`SDXL_BLOCKS`):

- SD 1.x/2.x, 25 blocks: ``input_blocks.{i}`` → ``i`` (0–11), ``middle_block`` → 12, ``output_blocks.{i}`` →
  ``13 + i``; ``down_lr_weight`` / ``up_lr_weight`` take 12 values, ``mid_lr_weight`` 1.
- SDXL, 23 blocks: ``time_embed`` / ``label_emb`` → 0, ``input_blocks.{i}`` → ``1 + i`` (1–9),
  ``middle_block.{j}`` → ``10 + j``, ``output_blocks.{i}`` → ``13 + i`` (13–21), ``out`` → 22;
  ``down_lr_weight`` / ``up_lr_weight`` take 9 values, ``mid_lr_weight`` 3.

U-Net modules of a block whose lr weight is 0 are not created (no keys in the saved file), as in sd-scripts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from library import lora_format, sai_names
from library.errors import UserInputError

logger = logging.getLogger(__name__)

UNET_TARGET_MODULES = ("Transformer2DModel",)
UNET_CONV_TARGET_MODULES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")



@dataclass(frozen=True)
class BlockLayout:
    """sd-scripts' block numbering of a U-Net family: ``leading`` + ``side`` down + ``mid`` + ``side`` up +
    ``trailing`` blocks; the lr-weight lists cover the down, mid and up parts."""

    side: int
    mid: int
    leading: int
    trailing: int

    @property
    def total(self) -> int:
        return self.leading + 2 * self.side + self.mid + self.trailing


SD_BLOCKS = BlockLayout(side=12, mid=1, leading=0, trailing=0)  # 25 = 12 + 1 + 12
SDXL_BLOCKS = BlockLayout(side=9, mid=3, leading=1, trailing=1)  # 23 = 1 + 9 + 3 + 9 + 1

BLOCK_LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

KNOWN_NETWORK_ARGS = frozenset(
    {
        "conv_dim",
        "conv_alpha",
        "dropout",
        "rank_dropout",
        "module_dropout",
        "loraplus_lr_ratio",
        "loraplus_unet_lr_ratio",
        "loraplus_text_encoder_lr_ratio",
        "down_lr_weight",
        "mid_lr_weight",
        "up_lr_weight",
        "block_lr_zero_threshold",
        "block_dims",
        "block_alphas",
        "conv_block_dims",
        "conv_block_alphas",
    }
)


# --------------------------------------------------------------------------------------------- the module


class LoRAModule(nn.Module):
    """A low-rank update ``lora_up ∘ lora_down`` added to one ``Linear`` or ``Conv2d`` of the base model."""

    def __init__(
        self,
        lora_name: str,
        org_module: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = lora_dim
        self.block_index = -1  # LDM block of a U-Net module (set by LoRANetwork); -1 for text encoders
        if isinstance(org_module, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                org_module.in_channels,
                lora_dim,
                org_module.kernel_size,
                org_module.stride,
                org_module.padding,
                bias=False,
            )
            self.lora_up = nn.Conv2d(lora_dim, org_module.out_channels, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, nn.Linear):
            self.lora_down = nn.Linear(org_module.in_features, lora_dim, bias=False)
            self.lora_up = nn.Linear(lora_dim, org_module.out_features, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA needs a Linear or Conv2d module, got {type(org_module).__name__}")

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().cpu())
        alpha = float(lora_dim) if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = alpha / lora_dim

        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        # Plain attribute, not a submodule: the base layer stays owned (and saved) by the base model.
        object.__setattr__(self, "org_module", org_module)
        self.org_forward = None

    def apply_to(self) -> None:
        """Route the base layer's ``forward`` through this module."""
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001 (torch's hook)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.scale = float(self.alpha) / self.lora_dim  # a loaded alpha changes the scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        org_out = self.org_forward(x, *args, **kwargs)
        if self.module_dropout and self.training and torch.rand(1).item() < self.module_dropout:
            return org_out

        lx = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout and self.training:
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # Linear on (batch, tokens, rank)
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # Conv2d on (batch, rank, h, w)
                mask = mask[:, :, None, None]
            lx = lx * mask.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # keep the expected update unchanged
        return org_out + (self.lora_up(lx) * (self.multiplier * scale)).to(org_out.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lora_down, lora_up)`` weights as the file stores them."""
        return self.lora_down.weight, self.lora_up.weight

    def delta_weight(self, up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
        """``scale · up @ down`` shaped like the base layer's weight (Linear, 1×1 or k×k conv)."""
        up_2d = up.reshape(up.shape[0], up.shape[1])
        if down.dim() == 2:
            return scale * (up_2d @ down)
        return scale * torch.einsum("or,rihw->oihw", up_2d, down)

    @torch.no_grad()
    def merge_to(
        self, sd: dict[str, torch.Tensor], dtype: torch.dtype | None, device: torch.device | str | None
    ) -> None:
        """Add ``multiplier · scale · up @ down`` from ``sd`` (this module's own keys) into the base weight."""
        weight = self.org_module.weight
        dtype = dtype or weight.dtype
        device = device or weight.device
        down = sd["lora_down.weight"].to(device, torch.float32)
        up = sd["lora_up.weight"].to(device, torch.float32)
        rank = down.shape[0]
        alpha = float(sd["alpha"]) if "alpha" in sd else float(self.alpha)
        delta = self.delta_weight(up, down, alpha / rank) * self.multiplier
        self.org_module.weight.data = (weight.to(device, torch.float32) + delta).to(dtype)


# --------------------------------------------------------------------------------------------- the network


def _block_index(sai_path: str, is_sdxl: bool) -> int:
    """sd-scripts' block index of a U-Net module path in SAI layout (``-1`` outside the numbered blocks)."""
    parts = sai_path.split(".")
    if not is_sdxl:
        if parts[0] == "input_blocks":
            return int(parts[1])
        if parts[0] == "middle_block":
            return SD_BLOCKS.side
        if parts[0] == "output_blocks":
            return SD_BLOCKS.side + 1 + int(parts[1])
        return -1
    if parts[0] in ("time_embed", "label_emb"):
        return 0
    if parts[0] == "input_blocks":
        return SDXL_BLOCKS.leading + int(parts[1])
    if parts[0] == "middle_block":
        return SDXL_BLOCKS.leading + SDXL_BLOCKS.side + int(parts[1])
    if parts[0] == "output_blocks":
        return SDXL_BLOCKS.leading + SDXL_BLOCKS.side + SDXL_BLOCKS.mid + int(parts[1])
    if parts[0] == "out":
        return SDXL_BLOCKS.total - 1
    return -1


class LoRANetwork(nn.Module):
    """All LoRA modules of one model; a ``torch.nn.Module`` whose state dict is the LoRA file's content."""

    #: Parameter-name part of the up factor, which LoRA+ trains at ``lr × ratio``.
    UP_FACTOR = "lora_up"
    #: The class of each module (LoRA-FA and DyLoRA networks use their own).
    module_class: type[LoRAModule] = LoRAModule

    def __init__(
        self,
        text_encoders: Sequence[nn.Module],
        unet: nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        conv_lora_dim: int | None = None,
        conv_alpha: float | None = None,
        block_dims: Sequence[int] | None = None,
        block_alphas: Sequence[float] | None = None,
        conv_block_dims: Sequence[int] | None = None,
        conv_block_alphas: Sequence[float] | None = None,
        modules_dim: dict[str, int] | None = None,
        modules_alpha: dict[str, float] | None = None,
        block_lr_weight: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.block_dims = block_dims
        self.block_alphas = block_alphas
        self.conv_block_dims = conv_block_dims
        self.conv_block_alphas = conv_block_alphas
        self.modules_dim = modules_dim
        self.modules_alpha = modules_alpha
        self.is_sdxl = lora_format.is_sdxl_unet(unet)
        self.loraplus_lr_ratio: float | None = None
        self.loraplus_unet_lr_ratio: float | None = None
        self.loraplus_text_encoder_lr_ratio: float | None = None
        self.block_lr_weight: list[float] | None = None if block_lr_weight is None else list(block_lr_weight)

        self.num_text_encoders = len(text_encoders)
        self.text_encoder_loras: list[LoRAModule] = []
        prefixes = lora_format.text_encoder_prefixes(len(text_encoders)) if text_encoders else []
        for prefix, text_encoder in zip(prefixes, text_encoders):
            self.text_encoder_loras += self._create_modules(
                text_encoder,
                TEXT_ENCODER_TARGET_MODULES,
                lambda path, prefix=prefix: (lora_format.text_encoder_lora_name(prefix, path), -1),
            )

        sai_map = sai_names.diffusers_to_sai_module_map(unet)
        naming_map = sai_map if self.is_sdxl else None

        def unet_name(path: str) -> tuple[str, int]:
            return lora_format.unet_lora_name(path, naming_map), _block_index(
                sai_names.convert_module_path(path, sai_map), self.is_sdxl
            )

        unet_targets = UNET_TARGET_MODULES
        if modules_dim is not None or conv_lora_dim or conv_block_dims is not None:
            unet_targets += UNET_CONV_TARGET_MODULES
        self.unet_loras = self._create_modules(unet, unet_targets, unet_name)
        logger.info(
            "LoRA: %d text-encoder modules, %d U-Net modules", len(self.text_encoder_loras), len(self.unet_loras)
        )
        for lora in self.text_encoder_loras + self.unet_loras:
            self.add_module(lora.lora_name, lora)

    def _dim_and_alpha(self, lora_name: str, is_conv3x3: bool, block_index: int) -> tuple[int | None, float | None]:
        """Rank and alpha for one target layer (``None`` rank: no LoRA on it)."""
        if self.modules_dim is not None:
            if lora_name not in self.modules_dim:
                return None, None
            return self.modules_dim[lora_name], self.modules_alpha.get(lora_name)
        if block_index >= 0 and self.block_lr_weight is not None and self.block_lr_weight[block_index] == 0:
            return None, None  # sd-scripts creates no module where the block's lr weight is 0
        if block_index >= 0 and self.block_dims is not None and not is_conv3x3:
            return self.block_dims[block_index], self.block_alphas[block_index]
        if block_index >= 0 and is_conv3x3 and self.conv_block_dims is not None:
            return self.conv_block_dims[block_index], self.conv_block_alphas[block_index]
        if is_conv3x3:
            return self.conv_lora_dim, self.conv_alpha
        return self.lora_dim, self.alpha

    def _create_modules(
        self, root: nn.Module, target_classes: Iterable[str], name_of: Callable[[str], tuple[str, int]]
    ) -> list[LoRAModule]:
        """LoRA modules for every Linear / Conv2d inside ``root``'s modules whose class is a target."""
        loras: list[LoRAModule] = []
        seen: set[str] = set()
        for name, module in root.named_modules():
            if type(module).__name__ not in target_classes:
                continue
            for child_name, child in module.named_modules():
                if not isinstance(child, (nn.Linear, nn.Conv2d)):
                    continue
                lora_name, block_index = name_of(f"{name}.{child_name}" if name else child_name)
                if lora_name in seen:
                    continue
                seen.add(lora_name)
                is_conv3x3 = isinstance(child, nn.Conv2d) and tuple(child.kernel_size) != (1, 1)
                dim, alpha = self._dim_and_alpha(lora_name, is_conv3x3, block_index)
                if not dim:
                    continue
                lora = self._new_module(lora_name, child, dim, alpha)
                lora.block_index = block_index
                loras.append(lora)
        return loras

    def _new_module(self, lora_name: str, org_module: nn.Module, dim: int, alpha: float | None) -> LoRAModule:
        """One module of this network, of the class ``module_class`` (subclasses set their own)."""
        return self.module_class(
            lora_name,
            org_module,
            self.multiplier,
            dim,
            alpha,
            dropout=self.dropout,
            rank_dropout=self.rank_dropout,
            module_dropout=self.module_dropout,
        )

    # ----------------------------------------------------------------------------- trainer hooks

    def apply_to(
        self,
        text_encoder: Any = None,
        unet: Any = None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Hook the LoRA modules into the models they were created for; unapplied parts are dropped."""
        if not apply_text_encoder:
            self._drop(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet:
            self._drop(self.unet_loras)
            self.unet_loras = []
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.apply_to()
        logger.info(
            "LoRA applied: text encoder %s (%d modules), U-Net %s (%d modules)",
            apply_text_encoder,
            len(self.text_encoder_loras),
            apply_unet,
            len(self.unet_loras),
        )

    def _drop(self, loras: list[LoRAModule]) -> None:
        for lora in loras:
            delattr(self, lora.lora_name)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.text_encoder_loras + self.unet_loras:
            lora.multiplier = multiplier

    def set_loraplus_lr_ratio(
        self,
        loraplus_lr_ratio: float | None,
        loraplus_unet_lr_ratio: float | None,
        loraplus_text_encoder_lr_ratio: float | None,
    ) -> None:
        """LoRA+ ratios: ``lora_up`` weights train at ``lr × ratio`` (the specific ratios win over the common one)."""
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def set_block_lr_weight(self, block_lr_weight: Sequence[float] | None) -> None:
        """Per-block lr factors, one per block of the U-Net's layout (25 SD 1.x/2.x, 23 SDXL; ``None``: off)."""
        self.block_lr_weight = None if block_lr_weight is None else list(block_lr_weight)

    def get_lr_weight(self, lora: LoRAModule) -> float:
        """The block-wise lr factor of a U-Net LoRA module (1 where no weight is set)."""
        if self.block_lr_weight is None or lora.block_index < 0:
            return 1.0
        return self.block_lr_weight[lora.block_index]

    @property
    def block_lr(self) -> bool:
        return self.block_lr_weight is not None

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer parameter groups and their descriptions (for ``lr/<description>`` logs).

        Text-encoder group(s) first, then U-Net group(s). ``text_encoder_lr`` may hold one lr per encoder.
        With LoRA+ each part gets an extra ``"<part> plus"`` group of the ``lora_up`` weights at lr × ratio;
        with block-wise lrs the U-Net is split into ``unet_block{i}`` groups. Groups whose lr is 0 or ``None``
        are dropped. Each group carries ``param_names``, the parameters' state-dict keys.
        """
        self.requires_grad_(True)
        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []

        def add(loras: list[LoRAModule], lr: float | None, ratio: float | None, description: str) -> None:
            plain: dict[str, nn.Parameter] = {}
            plus: dict[str, nn.Parameter] = {}
            for lora in loras:
                for name, param in lora.named_parameters():
                    if not param.requires_grad:  # frozen by the network kind (LoRA-FA's lora_down)
                        continue
                    target = plus if ratio is not None and self.UP_FACTOR in name else plain
                    target[f"{lora.lora_name}.{name}"] = param
            plus_lr = None if lr is None or ratio is None else lr * ratio
            for params, group_lr, suffix in ((plain, lr, ""), (plus, plus_lr, " plus")):
                if not params:
                    continue
                if not group_lr:
                    logger.info("no learning rate for %s%s: its parameters are not trained", description, suffix)
                    continue
                groups.append({"params": list(params.values()), "lr": group_lr, "param_names": list(params)})
                descriptions.append(description + suffix)

        te_ratio = self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio
        unet_ratio = self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio
        if self.text_encoder_loras:
            if isinstance(text_encoder_lr, Sequence) and len(text_encoder_lr) > 1:
                if len(text_encoder_lr) != self.num_text_encoders:
                    raise ValueError(
                        f"text_encoder_lr has {len(text_encoder_lr)} values; expected 1 or {self.num_text_encoders}"
                    )
                for i, prefix in enumerate(lora_format.text_encoder_prefixes(self.num_text_encoders)):
                    loras = [lora for lora in self.text_encoder_loras if lora.lora_name.startswith(prefix + "_")]
                    add(loras, text_encoder_lr[i], te_ratio, f"textencoder{i + 1}")
            else:
                if isinstance(text_encoder_lr, Sequence):
                    text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
                te_lr = default_lr if text_encoder_lr is None else text_encoder_lr
                add(self.text_encoder_loras, te_lr, te_ratio, "textencoder")

        if self.unet_loras:
            lr = default_lr if unet_lr is None else unet_lr
            if self.block_lr:
                by_block: dict[int, list[LoRAModule]] = {}
                for lora in self.unet_loras:
                    by_block.setdefault(lora.block_index, []).append(lora)
                for index in sorted(by_block):
                    block_lr = None if lr is None else lr * self.get_lr_weight(by_block[index][0])
                    add(by_block[index], block_lr, unet_ratio, f"unet_block{index}")
            else:
                add(self.unet_loras, lr, unet_ratio, "unet")
        return groups, descriptions

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def prepare_grad_etc(self, text_encoder: Any, unet: Any) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder: Any, unet: Any) -> None:
        self.train()

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: LoRA modules hold no activations of their own worth checkpointing."""

    def is_mergeable(self) -> bool:
        return True

    # ----------------------------------------------------------------------------- weights

    def save_weights(
        self, file: str, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Save the LoRA state dict (cast to ``dtype`` if given); returns the metadata written."""
        state_dict = self.state_dict()
        if dtype is not None:
            state_dict = {key: value.detach().to("cpu", dtype) for key, value in state_dict.items()}
        return lora_format.save_lora_file(state_dict, file, metadata)

    def load_weights(self, file: str) -> Any:
        """Load a LoRA file into this network (non-strict; mismatching keys are reported by name)."""
        weights_sd, _ = lora_format.load_lora_file(file)
        check_weights_fit(file, weights_sd, self)
        info = self.load_state_dict(weights_sd, strict=False)
        if info.unexpected_keys:
            unexpected = info.unexpected_keys
            logger.warning("%s: %d keys match no LoRA module here, e.g. %s", file, len(unexpected), unexpected[:3])
        if info.missing_keys:
            missing = info.missing_keys
            logger.warning("%s: %d LoRA keys are missing from the file, e.g. %s", file, len(missing), missing[:3])
        return info

    def merge_to(
        self,
        text_encoder: Any,
        unet: Any,
        weights_sd: dict[str, torch.Tensor],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Bake ``weights_sd`` into the base weights of the modules this network was created for."""
        merged = 0
        for lora in self.text_encoder_loras + self.unet_loras:
            prefix = lora.lora_name + "."
            sd = {key[len(prefix) :]: value for key, value in weights_sd.items() if key.startswith(prefix)}
            if sd:
                lora.merge_to(sd, dtype, device)
                merged += 1
        logger.info("merged %d LoRA modules into the base model", merged)

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str
    ) -> tuple[int, float, float]:
        """Scale down modules whose ``scale · up @ down`` norm exceeds ``max_norm_value`` (``--scale_weight_norms``).

        Returns (number of modules scaled, mean norm, max norm) after scaling.
        """
        scaled = 0
        norms: list[float] = []
        for lora in self.text_encoder_loras + self.unet_loras:
            down, up = (weight.to(device, torch.float32) for weight in lora.factors())
            norm = lora.delta_weight(up, down, lora.scale).norm().clamp(min=max_norm_value / 2)
            ratio = float(norm.clamp(max=max_norm_value) / norm)
            if ratio != 1.0:
                scaled += 1
                for param in lora.parameters():  # the factors' tensors
                    param.mul_(math.sqrt(ratio))
            norms.append(float(norm) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return scaled, sum(norms) / len(norms), max(norms)


# --------------------------------------------------------------------------------------------- --network_args


def _optional(kwargs: dict[str, Any], key: str, kind: type) -> Any:
    """``kwargs[key]`` converted to ``kind`` (``None`` when absent, empty or ``"None"``)."""
    value = kwargs.get(key)
    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none")):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"network_args: {key} must be {expected}, got {value!r}") from None


def _number_list(key: str, value: Any, kind: type, expected_len: int | None = None) -> list | None:
    """A comma-separated string (or sequence) of numbers."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        numbers = [kind(item) for item in items]
    except (TypeError, ValueError):
        raise ValueError(f"network_args: {key} must be comma-separated numbers, got {value!r}") from None
    if expected_len is not None and len(numbers) != expected_len:
        raise ValueError(f"network_args: {key} needs {expected_len} values (one per block), got {len(numbers)}")
    return numbers


def _lr_weight_preset(key: str, value: str, count: int) -> list[float]:
    """sd-scripts' ``down_lr_weight`` / ``up_lr_weight`` presets over ``count`` blocks, ``name`` or ``name+base``."""
    name, plus, base = value.partition("+")
    name = name.strip()
    if name not in BLOCK_LR_PRESETS:
        raise ValueError(
            f"network_args: unknown {key} preset {name!r}; expected one of {', '.join(BLOCK_LR_PRESETS)} "
            f"(optionally +number) or {count} comma-separated numbers"
        )
    try:
        base_lr = float(base) if plus else 0.0
    except ValueError:
        raise ValueError(f"network_args: {key}={value!r}: expected a number after '+'") from None
    ramp = [i / (count - 1) for i in range(count)]
    weights = {
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * count,
    }[name]
    return [w + base_lr for w in weights]


def _lr_weight_list(key: str, value: Any, count: int, zero_threshold: float, presets: bool) -> list[float] | None:
    """One part of the block lr weights: a preset (``presets``; a value without a comma) or comma-separated
    numbers (empty items are 0), cut or filled with 1.0 to ``count`` values; weights up to ``zero_threshold``
    become 0."""
    if value is None:
        return None
    if presets and isinstance(value, str) and "," not in value:
        weights = _lr_weight_preset(key, value, count)
    else:
        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            weights = [float(item) if str(item).strip() else 0.0 for item in items]
        except ValueError:
            raise ValueError(f"network_args: {key} must be comma-separated numbers, got {value!r}") from None
    if len(weights) > count:
        logger.warning("network_args: %s has %d values; only the first %d are used", key, len(weights), count)
        weights = weights[:count]
    if len(weights) < count:
        logger.warning("network_args: %s has %d values; the remaining %d blocks get 1.0", key, len(weights), count)
        weights = weights + [1.0] * (count - len(weights))
    return [w if w > zero_threshold else 0.0 for w in weights]


def parse_block_lr_weight(kwargs: dict[str, Any], layout: BlockLayout) -> list[float] | None:
    """``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight`` as one factor per block of ``layout`` (blocks
    outside the three lists get 1.0); ``None`` when none of the three is given."""
    keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
    if all(kwargs.get(key) is None for key in keys):
        return None
    zero_threshold = _optional(kwargs, "block_lr_zero_threshold", float) or 0.0
    parts = []
    for key, count in zip(keys, (layout.side, layout.mid, layout.side)):
        weights = _lr_weight_list(key, kwargs.get(key), count, zero_threshold, presets=key != "mid_lr_weight")
        parts += [1.0] * count if weights is None else weights
    return [1.0] * layout.leading + parts + [1.0] * layout.trailing


def _text_encoder_list(text_encoder: Any) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return list(text_encoder)
    return [text_encoder]


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> LoRANetwork:
    """Build a LoRA network for ``text_encoder`` (one module or a list: SDXL has two) and ``unet``.

    ``kwargs`` are the ``--network_args`` (strings, or already-typed values): ``conv_dim``, ``conv_alpha``,
    ``dropout`` (overrides ``neuron_dropout``), ``rank_dropout``, ``module_dropout``, ``loraplus_lr_ratio``,
    ``loraplus_unet_lr_ratio``, ``loraplus_text_encoder_lr_ratio``, ``down_lr_weight`` / ``up_lr_weight``
    (presets cosine, sine, linear, reverse_linear, zeros — ``+number`` adds a constant — or comma-separated
    numbers: 12 per side for SD 1.x/2.x, 9 for SDXL), ``mid_lr_weight`` (1 number; SDXL 3),
    ``block_lr_zero_threshold``, ``block_dims`` / ``block_alphas`` / ``conv_block_dims`` / ``conv_block_alphas``
    (25 numbers each; SDXL 23). Unknown names are warned about and ignored.
    """
    return build_network(LoRANetwork, KNOWN_NETWORK_ARGS, multiplier, network_dim, network_alpha, text_encoder,
                         unet, neuron_dropout, kwargs)


def build_network(
    network_class: type[LoRANetwork],
    known_args: frozenset[str],
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoder: Any,
    unet: nn.Module,
    neuron_dropout: float | None,
    kwargs: dict[str, Any],
    **network_options: Any,
) -> LoRANetwork:
    """:func:`create_network` for ``network_class`` (a :class:`LoRANetwork` subclass) with ``known_args`` as
    its ``--network_args`` names; ``network_options`` go to its constructor as they are."""
    unknown = sorted(set(kwargs) - known_args)
    if unknown:
        logger.warning("%s ignores unknown network_args: %s", network_class.__module__, ", ".join(unknown))
    kwargs = {key: value for key, value in kwargs.items() if key in known_args}

    network_dim = 4 if network_dim is None else int(network_dim)
    network_alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_dim = _optional(kwargs, "conv_dim", int)
    conv_alpha = _optional(kwargs, "conv_alpha", float)
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    dropout = _optional(kwargs, "dropout", float)
    if dropout is None:
        dropout = None if neuron_dropout is None else float(neuron_dropout)

    layout = SDXL_BLOCKS if lora_format.is_sdxl_unet(unet) else SD_BLOCKS
    n = layout.total
    block_lr_weight = parse_block_lr_weight(kwargs, layout)
    block_dims = _number_list("block_dims", kwargs.get("block_dims"), int, n)
    block_alphas = _number_list("block_alphas", kwargs.get("block_alphas"), float, n)
    conv_block_dims = _number_list("conv_block_dims", kwargs.get("conv_block_dims"), int, n)
    conv_block_alphas = _number_list("conv_block_alphas", kwargs.get("conv_block_alphas"), float, n)
    if block_dims is not None or block_lr_weight is not None:  # block-wise ranks, as in sd-scripts
        block_dims = block_dims or [network_dim] * n
        block_alphas = block_alphas or [network_alpha] * n
        if conv_block_dims is not None:
            conv_block_alphas = conv_block_alphas or [conv_alpha or 1.0] * n
        elif conv_dim:
            conv_block_dims, conv_block_alphas = [conv_dim] * n, [conv_alpha] * n
    else:
        ignored = [
            key
            for key in ("block_alphas", "conv_block_dims", "conv_block_alphas", "block_lr_zero_threshold")
            if kwargs.get(key)
        ]
        if ignored:
            logger.warning(
                "network_args: %s have no effect without block_dims or a *_lr_weight (as in sd-scripts)",
                ", ".join(ignored),
            )
        block_alphas = conv_block_dims = conv_block_alphas = None

    network = network_class(
        _text_encoder_list(text_encoder),
        unet,
        multiplier=multiplier,
        lora_dim=network_dim,
        alpha=network_alpha,
        dropout=dropout,
        rank_dropout=_optional(kwargs, "rank_dropout", float),
        module_dropout=_optional(kwargs, "module_dropout", float),
        conv_lora_dim=conv_dim,
        conv_alpha=conv_alpha,
        block_dims=block_dims,
        block_alphas=block_alphas,
        conv_block_dims=conv_block_dims,
        conv_block_alphas=conv_block_alphas,
        block_lr_weight=block_lr_weight,
        **network_options,
    )
    network.set_loraplus_lr_ratio(
        _optional(kwargs, "loraplus_lr_ratio", float),
        _optional(kwargs, "loraplus_unet_lr_ratio", float),
        _optional(kwargs, "loraplus_text_encoder_lr_ratio", float),
    )
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae: Any,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: dict[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """A network shaped like a LoRA file (each module's rank and alpha read from it) with its weights loaded.

    Pass ``weights_sd`` to skip reading ``file``. Returns ``(network, weights_sd)``; the network is not
    applied yet (``apply_to`` for inference by hooking, or ``merge_to`` to bake the weights in).
    ``for_inference`` is accepted for sd-scripts compatibility (dropout is off outside training anyway).
    """
    return build_network_from_weights(LoRANetwork, multiplier, file, text_encoder, unet, weights_sd)


def build_network_from_weights(
    network_class: type[LoRANetwork],
    multiplier: float,
    file: str | None,
    text_encoder: Any,
    unet: nn.Module,
    weights_sd: dict[str, torch.Tensor] | None = None,
    **network_options: Any,
) -> tuple[LoRANetwork, dict[str, torch.Tensor]]:
    """:func:`create_network_from_weights` for ``network_class``; ``network_options`` go to its constructor."""
    if weights_sd is None:
        if file is None:
            raise ValueError("create_network_from_weights needs a file or a weights_sd state dict")
        weights_sd, _ = lora_format.load_lora_file(file)
    source = file or "weights_sd"

    modules_dim: dict[str, int] = {}
    modules_alpha: dict[str, float] = {}
    for key, value in weights_sd.items():
        if "." not in key:
            continue
        lora_name = key.split(".")[0]
        if key.endswith(".alpha"):
            modules_alpha[lora_name] = float(value)
        elif "lora_down" in key:
            modules_dim[lora_name] = value.shape[0]
    if not modules_dim:
        raise ValueError(f"{source}: no '<name>.lora_down.weight' keys; not a kohya LoRA file")
    for lora_name, dim in modules_dim.items():
        modules_alpha.setdefault(lora_name, float(dim))

    network = network_class(
        _text_encoder_list(text_encoder),
        unet,
        multiplier=multiplier,
        modules_dim=modules_dim,
        modules_alpha=modules_alpha,
        **network_options,
    )
    created = {lora.lora_name for lora in network.text_encoder_loras + network.unet_loras}
    unmatched = sorted(set(modules_dim) - created)
    if unmatched:
        logger.warning(
            "%s: %d LoRA modules have no target in this model (another base model?), e.g. %s",
            source,
            len(unmatched),
            unmatched[:3],
        )
    check_weights_fit(source, weights_sd, network)
    network.load_state_dict({k: v for k, v in weights_sd.items() if k.split(".")[0] in created}, strict=False)
    return network, weights_sd


def _model_family(num_text_encoders: int) -> str:
    return "SDXL" if num_text_encoders == 2 else "SD 1.x/2.x"


def _file_text_encoder_count(weights_sd: dict[str, torch.Tensor]) -> int:
    """How many text encoders a LoRA state dict was made for, from its key prefixes: 2 (``lora_te1_`` /
    ``lora_te2_``, SDXL), 1 (``lora_te_``, SD 1.x/2.x), or 0 when it has no text-encoder keys."""
    for count in (2, 1):
        prefixes = tuple(prefix + "_" for prefix in lora_format.text_encoder_prefixes(count))
        if any(key.startswith(prefixes) for key in weights_sd):
            return count
    return 0


def check_weights_fit(source: str, weights_sd: dict[str, torch.Tensor], network: LoRANetwork) -> None:
    """Refuse LoRA weights made for another model family or another rank, with a message naming ``source`` and
    what differs: an SDXL LoRA for an SD 1.x/2.x network (or the reverse), a file none of whose modules exist in
    the network, or a tensor whose shape differs from the network's (another ``network_dim``, another model)."""
    file_encoders = _file_text_encoder_count(weights_sd)
    if file_encoders and network.num_text_encoders and file_encoders != network.num_text_encoders:
        prefixes = "/".join(prefix + "_" for prefix in lora_format.text_encoder_prefixes(file_encoders))
        raise UserInputError(
            f"network_weights {source} is an {_model_family(file_encoders)} LoRA (text encoder keys {prefixes}) "
            f"but the model is {_model_family(network.num_text_encoders)}"
        )
    expected = network.state_dict()
    network_modules = {key.split(".")[0] for key in expected}
    file_modules = {key.split(".")[0] for key in weights_sd if "." in key}
    if network_modules and not file_modules & network_modules:
        raise UserInputError(
            f"network_weights {source}: none of its {len(file_modules)} LoRA modules (e.g. "
            f"{min(file_modules, default='none')}) exist in this network; is it a LoRA for another base model?"
        )
    for key in sorted(weights_sd.keys() & expected.keys()):
        have, want = tuple(weights_sd[key].shape), tuple(expected[key].shape)
        if have == want:
            continue
        hint = "a LoRA for another base model?"
        rank_axis = 0 if key.endswith("lora_down.weight") else 1 if key.endswith("lora_up.weight") else None
        if rank_axis is not None and have[rank_axis] != want[rank_axis] and have[1 - rank_axis] == want[1 - rank_axis]:
            hint = f"trained with network_dim {have[rank_axis]}? (set --network_dim {have[rank_axis]} or --dim_from_weights)"
        raise UserInputError(
            f"network_weights {source}: key {key} has shape {have} but the network expects {want} — {hint}"
        )
