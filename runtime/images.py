"""Images in, pixel_values out: read what users pass as people see it, with bounded work, then run
the checkpoint's own Hugging Face image processor (saved in the engine directory's processor/).

Accepted per image: a PIL image, a path (str / os.PathLike) to a local image file, or an array (numpy
or torch) shaped [H, W, 3]: uint8 in 0..255, uint16 in 0..65535, or floating point in [0, 1].
Everything else is a clear error that names the image (its index in the batch, or its path).

As people see it - what `transformers.image_utils.load_image` and the processors' `convert_to_rgb`
do, plus what they leave out:
- EXIF orientation applied (`PIL.ImageOps.exif_transpose`, as load_image does);
- transparency composited onto white (`transformers.image_transforms.convert_to_rgb`), so invisible
  pixels cannot change what ApET keeps;
- 16-bit images (I;16, and I holding 0..65535) scaled by 255/65535 and float images (F, in [0, 1])
  by 255, instead of clamped to white; 1, L, P, LA, PA, CMYK, YCbCr, ... converted by Pillow.
Bounded work, checked from the header before a pixel is decoded:
- at most MAX_PIXELS pixels (8192 x 8192); Pillow's decompression-bomb limits surface as this one
  error (`apet` turns Pillow's warning into it too);
- an aspect ratio of at most MAX_ASPECT:1 (Qwen2-VL's processor refuses more too), and no resize by
  the processor to more than MAX_PIXELS, so a thin image cannot make the shortest-edge resize huge;
- only the raster formats in FORMATS (EPS and PS would be handed to Ghostscript).
Paths that are not local image files are refused as what they are: URLs, '-' (standard input),
directories, FIFOs and devices, missing files.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from apet_trt.apet_ops.compat import convert_to_rgb, load_image_processor

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | np.ndarray | torch.Tensor

MAX_SIDE = 8192
MAX_PIXELS = MAX_SIDE * MAX_SIDE
MAX_ASPECT = 200
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://|data:)")
_ROWS = 1024  # rows per chunk when scaling high-bit-depth images (bounded temporaries)
_BAND_PIXELS = 1 << 18  # pixels per band when compositing transparency (float64 temporaries)
_ORIENTATION = 0x0112  # the EXIF orientation tag
# processors whose work starts with a shortest-edge resize of the whole image (so doing it first is
# exact; LLaVA-NeXT's anyres, for one, needs the full image)
SHRINKABLE = ("CLIPImageProcessor", "CLIPImageProcessorPil")


# --- paths ----------------------------------------------------------------------------------------


def check_local_file(path: str | os.PathLike, where: str = "image", kind: str = "image") -> Path:
    """A local, regular `kind` file (image, video), or an error saying what the path is instead: a
    URL, '-' (standard input), a directory, a FIFO or device, nothing."""
    text = os.fsdecode(os.fspath(path))
    if text == "-":
        raise ValueError(f"{where}: '-' (standard input) is not supported; save the {kind} to a file and pass its path")
    if _URL.match(text):
        raise ValueError(f"{where}: {text} is a URL; apet reads local {kind} files only (download it first)")
    p = Path(text)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: {kind} file {p} does not exist") from None
    except OSError as exc:
        raise ValueError(f"{where}: {p} cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{where}: {p} is a directory, not {'an' if kind[0] in 'aeiou' else 'a'} {kind} file")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{where}: {p} is not a regular file (a FIFO, socket or device)")
    return p


def check_image_path(path: str | os.PathLike, where: str = "image") -> Path:
    return check_local_file(path, where, "image")


# --- geometry -------------------------------------------------------------------------------------


def check_geometry(width: int, height: int, where: str) -> None:
    """Bounded work for any geometry: no empty image, at most MAX_PIXELS, aspect at most MAX_ASPECT."""
    if width == 0 or height == 0:
        raise ValueError(f"{where}: zero-size image ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{where}: {width}x{height} = {width * height:,} pixels, over the limit of {MAX_PIXELS:,} "
            f"({MAX_SIDE}x{MAX_SIDE}); downscale it first"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        raise ValueError(
            f"{where}: {width}x{height} has an aspect ratio of {ratio:.0f}:1, over the limit of {MAX_ASPECT}:1 "
            "(resizing its short side would blow it up); crop or pad it first"
        )


def _size_fields(size: Any) -> dict:
    """A processor's size / crop_size (a dict in Transformers 4, a SizeDict in 5) as a dict."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size}
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {k: v for k, v in items if v is not None}


def resized_size(size: Any, width: int, height: int) -> tuple[int, int] | None:
    """(width, height) the processor's resize gives an image, where `size` says (shortest_edge,
    optionally capped by longest_edge; or height and width), else None."""
    s = _size_fields(size)
    if s.get("shortest_edge"):
        scale = s["shortest_edge"] / min(width, height)
        if s.get("longest_edge"):
            scale = min(scale, s["longest_edge"] / max(width, height))
        return round(width * scale), round(height * scale)
    if s.get("height") and s.get("width"):
        return int(s["width"]), int(s["height"])
    return None


# --- decoding -------------------------------------------------------------------------------------


def _scale_16bit(a: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded (v * 255 / 65535), in row chunks to bound the temporaries."""
    out = np.empty(a.shape, dtype=np.uint8)
    for r in range(0, a.shape[0], _ROWS):
        block = a[r : r + _ROWS].astype(np.uint32)
        out[r : r + _ROWS] = (block * 255 + 32767) // 65535
    return out


def _to_8bit(image: Image.Image, where: str) -> Image.Image:
    """High-bit-depth modes scaled to 8 bits by their range (Pillow's convert clamps them)."""
    mode = image.mode
    if mode.startswith("I;16"):
        return Image.fromarray(_scale_16bit(np.asarray(image).astype(np.uint16, copy=False)), mode="L")
    if mode == "I":
        a = np.asarray(image)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{where}: a 32-bit integer image with values {lo}..{hi}; only 0..65535 (16 bits) has a known scale"
            )
        return Image.fromarray(_scale_16bit(a), mode="L")
    if mode == "F":
        a = np.asarray(image)
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: the floating-point image holds NaN or Inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{where}: a floating-point image must lie in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8), mode="L")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.getbands() or "a" in image.mode or "transparency" in image.info


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Transformers' convert_to_rgb - transparency composited onto white - applied to bands of rows
    (it is per pixel, so the result is the same) to keep its temporaries small for large images."""
    out = Image.new("RGB", image.size)
    rows = max(1, _BAND_PIXELS // image.width)
    for top in range(0, image.height, rows):
        band = image.crop((0, top, image.width, min(image.height, top + rows)))
        out.paste(convert_to_rgb(band), (0, top))
    return out


def as_displayed(image: Image.Image, where: str, *, own: bool = False) -> Image.Image:
    """An RGB image as a viewer shows it: EXIF orientation applied, high bit depths scaled,
    transparency composited onto white. `own`: the image may be changed in place (opened here)."""
    check_geometry(image.width, image.height, where)
    if image.getexif().get(_ORIENTATION, 1) not in (None, 1):  # Pillow copies even when nothing turns
        if own:
            ImageOps.exif_transpose(image, in_place=True)
        else:
            image = ImageOps.exif_transpose(image)
    image = _to_8bit(image, where)
    if image.mode == "RGB":
        return image
    return _composite_on_white(image) if _has_alpha(image) else image.convert("RGB")


def _open_checked(path: str | os.PathLike, where: str) -> tuple[Image.Image, str]:
    """Open a local image file lazily (header only) in an accepted format and check its geometry;
    -> (the unloaded image, where, naming the path)."""
    p = check_image_path(path, where)
    try:
        img = Image.open(p, formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels than Pillow allows"
        raise ValueError(
            f"{where}: {p} has {size}, over the limit of {MAX_PIXELS:,} ({MAX_SIDE}x{MAX_SIDE}); downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise ValueError(f"{where}: {p} is not an image PIL can read (formats read: {', '.join(FORMATS)})") from None
    except OSError as exc:
        raise ValueError(f"{where}: {p} could not be read as an image ({exc})") from None
    try:
        check_geometry(img.width, img.height, f"{where}: {p}")  # from the header: nothing decoded yet
    except BaseException:
        img.close()
        raise
    return img, f"{where}: {p}"


def check_image_file(path: str | os.PathLike, where: str = "image") -> None:
    """Everything about an image file that its header tells (path, format, geometry), without
    decoding it: what `apet run` checks before it loads a model."""
    img, _ = _open_checked(path, where)
    img.close()


def _from_path(path: str | os.PathLike, where: str) -> Image.Image:
    img, where = _open_checked(path, where)
    with img:
        try:
            img.load()
        except OSError as exc:  # truncated or otherwise unreadable image data
            raise ValueError(f"{where} could not be read as an image ({exc})") from None
        return as_displayed(img, where, own=True)


def _from_array(array: Any, where: str) -> Image.Image:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"{where}: an image array must have rank 3 [H, W, 3], got shape {tuple(a.shape)}")
    if a.shape[-1] != 3:
        raise ValueError(f"{where}: an image array must have 3 channels last [H, W, 3], got shape {tuple(a.shape)}")
    check_geometry(a.shape[1], a.shape[0], where)
    if a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a))
    if a.dtype == np.uint16:
        return Image.fromarray(_scale_16bit(a))
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError(f"{where}: image array holds NaN or Inf values")
        if a.min() < 0.0 or a.max() > 1.0:
            raise ValueError(
                f"{where}: a floating-point image must lie in [0, 1], got range "
                f"[{float(a.min()):.4g}, {float(a.max()):.4g}]"
            )
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8))
    raise TypeError(f"{where}: image arrays must be uint8, uint16 or floating point, got dtype {a.dtype}")


def to_pil(image: ImageLike, index: int = 0) -> Image.Image:
    """One image of any accepted kind -> an RGB PIL image, as displayed."""
    where = f"image {index}"
    if isinstance(image, Image.Image):
        return as_displayed(image, where)
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

    def __init__(self, processor_dir: str | os.PathLike, image_size: int | None = None, *, size_in_pixels=False):
        """`size_in_pixels`: the processor's size holds pixel counts, not sides (Qwen2-VL's
        shortest_edge / longest_edge are its min / max pixels: it resizes within that area)."""
        processor_dir = Path(processor_dir)
        if not (processor_dir / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"{processor_dir}: no preprocessor_config.json (the image processor "
                "is missing from the engine directory)"
            )
        self.processor = load_image_processor(processor_dir)  # the PIL one: no torchvision needed
        self.image_size = None if image_size is None else int(image_size)
        self.size_in_pixels = bool(size_in_pixels)
        limit, unit = (MAX_PIXELS, "pixels") if size_in_pixels else (MAX_SIDE, "px a side")
        for attr in ("size", "crop_size"):
            for key, value in _size_fields(getattr(self.processor, attr, None)).items():
                if isinstance(value, (int, float)) and value > limit:
                    raise ValueError(
                        f"{processor_dir / 'preprocessor_config.json'}: {attr}.{key}={value} exceeds {limit} {unit}"
                    )

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(getattr(self.processor, "image_mean", [0.0, 0.0, 0.0]), dtype=np.float32)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(getattr(self.processor, "image_std", [1.0, 1.0, 1.0]), dtype=np.float32)

    def _check_resize(self, image: Image.Image, index: int) -> None:
        if not getattr(self.processor, "do_resize", True) or self.size_in_pixels:  # area <= longest_edge: checked
            return
        size = resized_size(getattr(self.processor, "size", None), image.width, image.height)
        if size is not None and size[0] * size[1] > MAX_PIXELS:
            raise ValueError(
                f"image {index}: {image.width}x{image.height} would be resized to {size[0]}x{size[1]} by the "
                f"processor, over the limit of {MAX_PIXELS:,} pixels; crop or pad it first"
            )

    def _shrink(self, image: Image.Image) -> Image.Image:
        """The processor's own shortest-edge resize done first, on the PIL image (Transformers'
        size rule, the processor's filter, Pillow's resize as the processor calls it): the processor
        then resizes to the same size, which Pillow does as a copy, so pixel_values are unchanged
        while the processor never copies a large decoded image whole."""
        p = self.processor
        size = _size_fields(getattr(p, "size", None))
        if type(p).__name__ not in SHRINKABLE or not getattr(p, "do_resize", True) or set(size) != {"shortest_edge"}:
            return image
        from transformers.image_transforms import get_resize_output_image_size
        from transformers.image_utils import ChannelDimension

        shape = np.broadcast_to(np.uint8(0), (image.height, image.width, 3))  # the geometry, no pixels
        h, w = get_resize_output_image_size(
            shape, size=size["shortest_edge"], default_to_square=False, input_data_format=ChannelDimension.LAST
        )
        if w * h >= image.width * image.height:
            return image  # enlarging: left to the processor
        return image.resize((w, h), resample=Image.Resampling(int(getattr(p, "resample", Image.Resampling.BICUBIC))))

    def features(self, images: ImageLike | Sequence[ImageLike], **kwargs) -> dict[str, np.ndarray]:
        """Every output of the processor as numpy (pixel_values float32, checked finite); what
        shapes they must have is the model family's business (runtime/families/)."""
        pil = []
        for i, img in enumerate(as_image_list(images)):  # each decoded image shrunk before the next is read
            picture = to_pil(img, i)
            self._check_resize(picture, i)
            pil.append(self._shrink(picture))
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
