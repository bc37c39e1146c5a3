"""The small DreamBooth folders the end-to-end tests train on: one 64×64 ellipse per colour, with a caption."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def write_shape_images(folder: Path, colors: tuple[str, ...], caption: str = "sks shape") -> Path:
    """Write ``<i>.png`` (a differently shaped ellipse in each colour) and ``<i>.txt`` (``"<caption>, <colour>"``)
    into ``folder`` (created); returns ``folder``."""
    folder.mkdir(parents=True)
    for i, color in enumerate(colors):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 8, 56, 56 - 4 * i), fill=color)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"{caption}, {color}", encoding="utf-8")
    return folder
