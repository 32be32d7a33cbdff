"""The picture users want: which patches ApET kept, drawn over the crop the engine saw, and where it
may be written (`overlay_target`, `save_overlay`: never over the input image, an existing file
without --force-overlay, a symbolic link, or anything inside the engine directory)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

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
    """Check an --overlay path before any work: a file name with an image extension; never the input
    image, never inside the engine directory (its next verification would fail), never through a
    symbolic link; an existing file only with force. Nothing is written here."""
    given = os.fspath(path)
    out = Path(given)
    if out.name in ("", ".", "..") or given.endswith(os.sep):
        raise ValueError(f"--overlay {given!r}: name an image file, e.g. kept.png")
    suffix = out.suffix.lower()
    if suffix not in Image.registered_extensions():
        raise ValueError(f"--overlay {given}: unknown image type {suffix or '(no extension)'}; use .png or .jpg")
    real = os.path.realpath(out)
    real_engine = os.path.realpath(engine_dir)
    if os.path.commonpath([real, real_engine]) == real_engine:
        raise ValueError(
            f"--overlay {given} lies inside the engine directory {engine_dir} (it would no longer verify); "
            "write it elsewhere"
        )
    if image is not None and isinstance(image, (str, os.PathLike)):
        same = real == os.path.realpath(image)
        if not same and out.exists() and Path(image).exists():
            same = os.path.samefile(out, image)
        if same:
            raise ValueError(f"--overlay {given} is the input image; refusing to overwrite it")
    if out.is_symlink():
        raise FileExistsError(f"--overlay {given} is a symbolic link; refusing to write through it")
    if out.exists():
        if not out.is_file():
            raise FileExistsError(f"--overlay {given} exists and is not a regular file")
        if not force:
            raise FileExistsError(f"--overlay {given} exists; pass --force-overlay to replace it")
    ancestor = next(p for p in Path(os.path.abspath(out)).parents if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"--overlay {given}: cannot create it in {ancestor}")
    return out


def save_overlay(picture: Image.Image, target: Path, *, force: bool = False) -> Path:
    """Write the picture to a path checked by overlay_target: created exclusively (an existing file,
    or a link put there meanwhile, is an error), or with force written beside it and renamed over it
    (a link at the path is replaced, never followed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fmt = Image.registered_extensions()[target.suffix.lower()]
    if not force:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format=fmt)
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format=fmt)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
