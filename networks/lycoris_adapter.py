"""``--network_module lycoris.kohya`` without LyCORIS 4.1's duplicate modules on diffusers U-Nets.

LyCORIS' ``full`` preset (its default) targets the ``TimestepEmbedding`` class *and* the names
``time_embedding.linear_1`` / ``linear_2``. On a diffusers U-Net both select the same two layers, so
``LycorisNetworkKohya`` stops with "duplicated lora name: lora_unet_time_embedding_linear_1" — in stock
sd-scripts too. :class:`LycorisKohya` wraps the imported ``lycoris.kohya`` module: before a network is built it
drops from the preset's target names those whose every match already lies inside a targeted class (the class
branch creates the same module under the same name), and hands LyCORIS that preset as a TOML file, the form
``preset=<file>`` takes. The modules created are the union LyCORIS means, each once; LyCORIS' files are not
touched. Everything else passes through to the module unchanged.

Cost: one walk over the model's module names per network built.
"""

from __future__ import annotations

import fnmatch
import re
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

LYCORIS_KOHYA = "lycoris.kohya"


def _matches(pattern: str, path: str, use_fnmatch: bool) -> bool:
    """LyCORIS' name test: ``re.match`` (or ``fnmatch`` with the preset's ``use_fnmatch``)."""
    return fnmatch.fnmatch(path, pattern) if use_fnmatch else re.match(pattern, path) is not None


def covered_names(
    roots: list[nn.Module], target_classes: list[str], target_names: list[str], use_fnmatch: bool = False
) -> list[str]:
    """The entries of ``target_names`` whose every matching module path (in any of ``roots``) lies strictly
    inside a module whose class is in ``target_classes`` — LyCORIS creates those modules twice."""
    covered = []
    for pattern in target_names:
        hits = [
            inside
            for root in roots
            for inside in _pattern_hits(root, pattern, target_classes, target_names, use_fnmatch)
        ]
        if hits and all(hits):
            covered.append(pattern)
    return covered


def _pattern_hits(
    root: nn.Module, pattern: str, target_classes: list[str], target_names: list[str], use_fnmatch: bool
) -> list[bool]:
    """For each module path of ``root`` that ``pattern`` matches: whether a class-targeted ancestor covers it."""
    classes = {path: type(module).__name__ for path, module in root.named_modules()}

    def class_targeted(path: str) -> bool:  # LyCORIS' class branch: the class is a target, the name is not
        return classes[path] in target_classes and not any(_matches(t, path, use_fnmatch) for t in target_names)

    hits = []
    for path in classes:
        if path and _matches(pattern, path, use_fnmatch):
            parts = path.split(".")
            ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
            hits.append(any(class_targeted(ancestor) for ancestor in ancestors))
    return hits


def _encoders(text_encoder: Any) -> list[nn.Module]:
    if text_encoder is None:
        return []
    return list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]


def deduplicated_preset(preset: dict[str, Any], text_encoder: Any, unet: nn.Module) -> dict[str, Any] | None:
    """``preset`` without its target names already covered by its target classes; ``None`` if it has none."""
    use_fnmatch = bool(preset.get("use_fnmatch", False))
    fixed = dict(preset)
    for part, roots in (("unet", [unet]), ("text_encoder", _encoders(text_encoder))):
        names = list(preset.get(f"{part}_target_name") or [])
        drop = covered_names(roots, list(preset.get(f"{part}_target_module") or []), names, use_fnmatch)
        if drop:
            fixed[f"{part}_target_name"] = [name for name in names if name not in drop]
    return None if fixed == preset else fixed


class LycorisKohya:
    """``lycoris.kohya`` with ``create_network`` / ``create_network_from_weights`` free of duplicate modules."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def _preset(self, name_or_file: str) -> dict[str, Any] | None:
        presets = self._module.PRESET
        if name_or_file in presets:
            return presets[name_or_file]
        from lycoris.utils.preset import read_preset

        return read_preset(name_or_file)

    def create_network(
        self,
        multiplier: float,
        network_dim: int | None,
        network_alpha: float | None,
        vae: Any,
        text_encoder: Any,
        unet: nn.Module,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """LyCORIS' ``create_network`` (every argument passed on as given) with the preset deduplicated."""
        preset = self._preset(kwargs.get("preset", "full"))
        fixed = None if preset is None else deduplicated_preset(preset, text_encoder, unet)
        if fixed is None:  # nothing to remove (or a preset LyCORIS itself will refuse)
            return self._module.create_network(
                multiplier, network_dim, network_alpha, vae, text_encoder, unet, *args, **kwargs
            )
        import toml

        with tempfile.TemporaryDirectory() as folder:
            file = Path(folder) / "preset.toml"
            file.write_text(toml.dumps(fixed), encoding="utf-8")
            return self._module.create_network(
                multiplier, network_dim, network_alpha, vae, text_encoder, unet, *args,
                **{**kwargs, "preset": str(file)},
            )  # fmt: skip

    def create_network_from_weights(
        self, multiplier: float, file: str | None, vae: Any, text_encoder: Any, unet: nn.Module, *args: Any, **kwargs: Any
    ) -> Any:
        """LyCORIS builds an empty network with the preset last applied (the class default: ``full``) before
        loading the file's modules, so that preset is deduplicated first."""
        network_class = self._module.LycorisNetworkKohya
        current = {
            "unet_target_module": network_class.UNET_TARGET_REPLACE_MODULE,
            "unet_target_name": network_class.UNET_TARGET_REPLACE_NAME,
            "text_encoder_target_module": network_class.TEXT_ENCODER_TARGET_REPLACE_MODULE,
            "text_encoder_target_name": network_class.TEXT_ENCODER_TARGET_REPLACE_NAME,
            "use_fnmatch": network_class.USE_FNMATCH,
        }
        fixed = deduplicated_preset(current, text_encoder, unet)
        if fixed is not None:
            network_class.apply_preset(fixed)
        return self._module.create_network_from_weights(multiplier, file, vae, text_encoder, unet, *args, **kwargs)


def adapted(name: str, module: ModuleType) -> Any:
    """The network module the trainer uses for ``--network_module name``: ``lycoris.kohya`` wrapped, others as is."""
    return LycorisKohya(module) if name == LYCORIS_KOHYA else module
