"""The picture users want: which patches ApET kept, drawn over the crop the engine saw."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


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
