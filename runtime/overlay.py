"""The picture users want: which patches ApET kept, drawn over the crop the engine saw, and where it
may be written (`overlay_target`, `save_overlay`: never over the input image, an existing file
without --force-overlay, a symbolic link, or anything inside the engine directory)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .output_files import OutputRules, output_target, write_output

OVERLAY = OutputRules(
    flag="--overlay",
    force_flag="--force-overlay",
    what="image",
    suffixes=frozenset(Image.registered_extensions()),
    suggest=".png or .jpg",
    example="kept.png",
)


def draw_kept_patches(
    crop: np.ndarray,
    positions: Sequence[int],
    *,
    patch_size: int,
    drop_cls: bool = True,
    scale: int = 2,
    dim: float = 0.7,
    color=(255, 64, 32),
) -> Image.Image:
    """crop [S, S, 3] uint8 (the preprocessed image), positions: kept token indices (ascending).
    Dropped patches are darkened by `dim`, kept ones outlined in `color`. With drop_cls=False a
    position 0 is the CLS token (not a patch) and is skipped."""
    if crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"crop must be [S, S, 3], got {crop.shape}")
    grid_h, grid_w = crop.shape[0] // patch_size, crop.shape[1] // patch_size
    patches = [int(p) - (0 if drop_cls else 1) for p in positions]
    patches = [p for p in patches if p >= 0]
    if any(p >= grid_h * grid_w for p in patches):
        raise ValueError(f"position {max(patches)} is outside the {grid_h}x{grid_w} patch grid")
    keep = np.zeros((grid_h, grid_w), dtype=bool)
    for p in patches:
        keep[p // grid_w, p % grid_w] = True
    mask = np.kron(keep, np.ones((patch_size, patch_size), dtype=bool))
    pad = np.zeros(crop.shape[:2], dtype=bool)
    pad[: mask.shape[0], : mask.shape[1]] = mask
    shaded = crop.astype(np.float32)
    shaded[~pad] *= 1.0 - dim
    image = Image.fromarray(shaded.round().astype(np.uint8)).resize(
        (crop.shape[1] * scale, crop.shape[0] * scale), Image.NEAREST
    )
    draw = ImageDraw.Draw(image)
    s = patch_size * scale
    for p in patches:
        r, c = divmod(p, grid_w)
        draw.rectangle([c * s, r * s, (c + 1) * s - 1, (r + 1) * s - 1], outline=color, width=max(1, scale))
    return image


def kept_boxes(patch_map, positions: Sequence[int]) -> list[list[int]]:
    """Per picture of `patch_map`, the row-major patch indices of the kept rows (rows that are no
    patch - CLS, newlines - are skipped)."""
    grids = patch_map.grids
    kept: list[list[int]] = [[] for _ in patch_map.crops]
    for p in positions:
        if not 0 <= int(p) < len(patch_map.boxes):
            raise ValueError(f"position {int(p)} is outside the image's {len(patch_map.boxes)} rows")
        box = patch_map.boxes[int(p)]
        if box is not None:
            crop, r, c = box
            kept[crop].append(r * grids[crop][1] + c)
    return kept


def draw_patch_map(patch_map, positions: Sequence[int], *, scale: int = 2, gap: int = 8) -> Image.Image:
    """Every crop the engine saw, side by side (`patch_map.columns` to a row, e.g. a video's frames
    as a contact sheet), dropped patches darkened and kept ones outlined."""
    pictures = [
        draw_kept_patches(crop, kept, patch_size=patch_map.patch_size, scale=scale)
        for crop, kept in zip(patch_map.crops, kept_boxes(patch_map, positions))
    ]
    per_row = getattr(patch_map, "columns", None) or len(pictures)
    rows = [pictures[i : i + per_row] for i in range(0, len(pictures), per_row)]
    width = max(sum(p.width for p in row) + gap * (len(row) - 1) for row in rows)
    height = sum(max(p.height for p in row) for row in rows) + gap * (len(rows) - 1)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for row in rows:
        x = 0
        for p in row:
            sheet.paste(p, (x, y))
            x += p.width + gap
        y += max(p.height for p in row) + gap
    return sheet


def grid_text(patch_map, positions: Sequence[int], indent: str = "         ") -> str:
    """Each picture's patch grid as text, '#' where a patch was kept (row-major); pictures one below
    the other, separated by a blank line."""
    blocks = []
    for (rows, cols), kept in zip(patch_map.grids, kept_boxes(patch_map, positions)):
        marks = set(kept)
        blocks.append(
            "\n".join(indent + "".join("#" if r * cols + c in marks else "." for c in range(cols)) for r in range(rows))
        )
    return "\n\n".join(blocks)


# --- where the picture goes ---------------------------------------------------------------------------


def overlay_target(
    path: str | os.PathLike, *, image: str | os.PathLike | None, engine_dir: str | os.PathLike, force: bool = False
) -> Path:
    """Check an --overlay path before any work (runtime/output_files.py: never the input image,
    inside the engine directory, through a link, or an existing file without --force-overlay)."""
    return output_target(path, OVERLAY, inputs={"input image": image}, engine_dir=engine_dir, force=force)


def save_overlay(picture: Image.Image, target: Path, *, force: bool = False) -> Path:
    """Write the picture to a path checked by overlay_target (runtime/output_files.write_output)."""
    fmt = Image.registered_extensions()[target.suffix.lower()]
    return write_output(target, lambda f: picture.save(f, format=fmt), force=force)
