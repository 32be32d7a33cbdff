"""Images in, pixel_values out: load and validate what users pass, then run the checkpoint's own
Hugging Face image processor (saved in the engine directory's processor/).

Accepted per image: a PIL image, a path (str / os.PathLike), or an array (numpy or torch) shaped
[H, W, 3], uint8 in 0..255 or floating point in [0, 1]. Everything else is a clear error that
names the image (its index in the batch, or its path).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from apet_trt.apet_ops.compat import load_image_processor

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | np.ndarray | torch.Tensor


def _from_path(path: str | os.PathLike, where: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{where}: image file {p} does not exist")
    try:
        with Image.open(p) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        raise ValueError(f"{where}: {p} is not an image PIL can read") from exc
    except OSError as exc:  # truncated or otherwise unreadable image data
        raise ValueError(f"{where}: {p} could not be read as an image ({exc})") from exc


def _from_array(array: Any, where: str) -> Image.Image:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"{where}: an image array must have rank 3 [H, W, 3], got shape {tuple(a.shape)}")
    if a.shape[-1] != 3:
        raise ValueError(f"{where}: an image array must have 3 channels last [H, W, 3], got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{where}: zero-size image, shape {tuple(a.shape)}")
    if a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: image array holds NaN or Inf values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(
                f"{where}: a floating-point image must lie in [0, 1], got range "
                f"[{float(a.min()):.4g}, {float(a.max()):.4g}]"
            )
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8))
    raise TypeError(f"{where}: image arrays must be uint8 or floating point, got dtype {a.dtype}")


def to_pil(image: ImageLike, index: int = 0) -> Image.Image:
    """One image of any accepted kind -> an RGB PIL image."""
    where = f"image {index}"
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where}: zero-size image ({image.width}x{image.height})")
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        return _from_path(image, where)
    if isinstance(image, (np.ndarray, torch.Tensor, list, tuple)):
        return _from_array(image, where)
    raise TypeError(f"{where}: expected a PIL image, a path or an [H, W, 3] array, got {type(image).__name__}")


def as_image_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """A single image or a sequence of images -> a non-empty list (not yet converted)."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [images] if images.ndim != 4 else list(images)
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("empty batch: pass at least one image")
        return list(images)
    raise TypeError(f"images: expected an image or a list of images, got {type(images).__name__}")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of its longer side, filled with `fill` (LLaVA-1.5's
    `expand2square`, MaQianKun0/ApET llava/mm_utils.py; the offset rounds down)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImagePreprocessor:
    """The checkpoint's own HF image processor (loaded from the engine dir's processor/),
    plus input validation. `__call__(images) -> pixel_values` float32 numpy [B, 3, S, S]."""

    def __init__(self, processor_dir: str | os.PathLike, image_size: int | None = None):
        processor_dir = Path(processor_dir)
        if not (processor_dir / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"{processor_dir}: no preprocessor_config.json (the image processor "
                "is missing from the engine directory)"
            )
        self.processor = load_image_processor(processor_dir)  # the PIL one: no torchvision needed
        self.image_size = None if image_size is None else int(image_size)

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(getattr(self.processor, "image_mean", [0.0, 0.0, 0.0]), dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(getattr(self.processor, "image_std", [1.0, 1.0, 1.0]), dtype=np.float32)

    def features(self, images: ImageLike | Sequence[ImageLike], **kwargs) -> dict[str, np.ndarray]:
        """Every output of the processor as numpy (pixel_values float32, checked finite); what
        shapes they must have is the model family's business (runtime/families/)."""
        pil = [to_pil(img, i) for i, img in enumerate(as_image_list(images))]
        out = {k: np.asarray(v) for k, v in self.processor(images=pil, return_tensors="np", **kwargs).items()}
        pixel_values = np.ascontiguousarray(out["pixel_values"], dtype=np.float32)
        if not np.isfinite(pixel_values).all():
            bad = int(np.argmax(~np.isfinite(pixel_values).reshape(pixel_values.shape[0], -1).all(axis=1)))
            raise ValueError(f"image {bad}: preprocessing produced NaN or Inf pixel values")
        out["pixel_values"] = pixel_values
        return out

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """pixel_values [B, 3, S, S] of a processor that makes one square crop per image."""
        pixel_values = self.features(images)["pixel_values"]
        b = len(as_image_list(images))
        s = self.image_size if self.image_size is not None else pixel_values.shape[-1]
        expected = (b, 3, s, s)
        if pixel_values.shape != expected:
            raise ValueError(
                f"the image processor produced pixel_values {pixel_values.shape}, the engine expects {expected}"
            )
        return pixel_values

    @property
    def mean_colour(self) -> tuple[int, int, int]:
        """The processor's mean as an RGB colour, truncated like the official code's
        `tuple(int(x * 255) for x in image_processor.image_mean)`."""
        return tuple(int(x * 255) for x in getattr(self.processor, "image_mean", [0.0, 0.0, 0.0]))

    def unnormalize(self, pixel_values: np.ndarray) -> np.ndarray:
        """[3, S, S] normalized -> [S, S, 3] uint8 (the crop the engine saw; for overlays)."""
        x = pixel_values.transpose(1, 2, 0) * self.std + self.mean
        return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
