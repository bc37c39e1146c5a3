"""``--fp8_base`` / ``--fp8_base_unet``: the frozen base model's weights stored in ``torch.float8_e4m3fn``.

As in sd-scripts, ``--fp8_base_unet`` stores the U-Net in fp8 and ``--fp8_base`` the U-Net and the text encoders;
both need ``--mixed_precision fp16`` or ``bf16``. Only the weights of ``Linear`` and ``Conv`` layers are stored in
fp8 (99.9 % of the U-Net's parameters; 69 % of CLIP-L's, whose token embedding stays); biases, norms and
embeddings stay in the mixed-precision dtype. The computation is unchanged: under the loop's autocast (CUDA and
CPU alike) a linear or convolution casts its fp8 weight to the compute dtype for its call. The backward keeps
that copy until it has passed the layer: with ``--gradient_checkpointing`` only the copies of the block being
recomputed, without it those of every layer, which can cost more than fp8 saves (docs/benchmarks.md). The
LoRA modules are not children of the layers they wrap, so their weights,
their gradients and the optimizer state keep their own dtype.

Cost: e4m3 keeps 3 mantissa bits, so each frozen weight is rounded to a relative error of at most 1/17 (5.9 %),
2.7 % RMS; magnitudes below 2^-6 (e4m3's smallest normal number) keep fewer bits, below 2^-10 they become 0.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from library.errors import UserInputError

logger = logging.getLogger(__name__)

FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
# the layers whose weights autocast casts per call (F.linear, F.conv*)
FP8_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def unet_in_fp8(args: argparse.Namespace) -> bool:
    """Whether the U-Net is stored in fp8 (``--fp8_base`` or ``--fp8_base_unet``)."""
    return bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False))


def text_encoders_in_fp8(args: argparse.Namespace) -> bool:
    """Whether the text encoders are stored in fp8 too (``--fp8_base`` without ``--fp8_base_unet``)."""
    return bool(getattr(args, "fp8_base", False) and not getattr(args, "fp8_base_unet", False))


def fp8_argument_error(args: argparse.Namespace) -> str | None:
    """Why ``--fp8_base`` / ``--fp8_base_unet`` cannot be used with these arguments and this torch, or None."""
    if not unet_in_fp8(args):
        return None
    flag = "--fp8_base" if args.fp8_base else "--fp8_base_unet"
    if args.mixed_precision not in ("fp16", "bf16"):
        return (
            f"{flag} requires --mixed_precision fp16 or bf16 (the fp8 weights are computed in that dtype), "
            f"got --mixed_precision {args.mixed_precision}"
        )
    if FP8_DTYPE is None:
        return f"{flag} needs a torch with torch.float8_e4m3fn (2.1 or later), this is torch {torch.__version__}"
    return None


def check_fp8_run(args: argparse.Namespace, accelerator: Any) -> None:
    """Refuse fp8 storage where accelerate runs without autocast (``--mixed_precision fp16`` on the CPU: it
    computes in the weights' dtype there, and nothing would cast the fp8 weights). Warn without
    ``--gradient_checkpointing``: the backward then keeps every layer's half-precision copy of its weight until it
    reaches that layer, which can cost more than fp8 saves (measured in docs/benchmarks.md)."""
    if not unet_in_fp8(args):
        return
    flag = "--fp8_base" if args.fp8_base else "--fp8_base_unet"
    if not accelerator.native_amp:
        raise UserInputError(
            f"{flag} needs autocast, which accelerate does not use for --mixed_precision {args.mixed_precision} "
            f"on {accelerator.device.type}: use --mixed_precision bf16"
        )
    if not args.gradient_checkpointing:
        logger.warning(
            "%s without --gradient_checkpointing: the backward keeps a %s copy of every frozen weight it has not "
            "reached yet, so the peak memory can exceed that of a run without %s; add --gradient_checkpointing",
            flag, args.mixed_precision, flag,
        )


def store_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device | str) -> int:
    """Cast ``module`` to ``compute_dtype``, store its Linear/Conv weights in float8_e4m3fn, then move it to
    ``device``; the casts happen where the module is, so the device never holds a half-precision copy.

    Returns the number of weights stored in fp8. The module must run under autocast to ``compute_dtype``.
    """
    module.to(dtype=compute_dtype)
    stored = 0
    for layer in module.modules():
        if isinstance(layer, FP8_LAYERS):
            layer.weight.data = layer.weight.data.to(FP8_DTYPE)
            stored += 1
    module.to(device)
    return stored


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)
