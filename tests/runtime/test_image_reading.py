"""Issue 11, class 6: images read as people see them, with bounded work for any geometry.

Checked against independent numpy statements of what a viewer shows: EXIF orientation applied
(rot90 / flips), transparency composited onto white (a * c + (1 - a) * 255), 16-bit and float
images scaled by their range (round(v * 255 / 65535)), palettes looked up. Geometry that would make
the work unbounded - more than 8192 x 8192 pixels (Pillow's bomb limits included), an aspect ratio
over 200:1, a processor resize beyond the pixel limit - is refused from the header, before any pixel
is decoded, in one line. Paths that are no local image file (URL, '-', folder, FIFO, EPS) say what
they are. The input files are never changed.
"""

from __future__ import annotations

import inspect
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt.runtime import images
from apet_trt.runtime.images import ImagePreprocessor, to_pil
from apet_trt.scripts.cli import main
from helpers.engines import clip_processor_class
from helpers.guard import snapshot


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    d = tmp_path_factory.mktemp("processor")
    clip_processor_class()(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(str(d))
    return ImagePreprocessor(d, image_size=56)


def _rgb(rng, h=30, w=50) -> np.ndarray:
    return torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width x height but holds no pixel data: opening reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


# --- EXIF orientation -----------------------------------------------------------------------------------

# orientation tag -> what a viewer does to the stored pixels (numpy, independent of Pillow)
ORIENTATIONS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    6: lambda a: np.rot90(a, k=-1),
    8: lambda a: np.rot90(a, k=1),
}


@pytest.mark.parametrize("tag", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(rng, tmp_path, tag):
    stored = _rgb(rng)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = tag
    path = tmp_path / "photo.png"
    image.save(path, exif=exif)
    before = snapshot(tmp_path)
    shown = np.ascontiguousarray(ORIENTATIONS[tag](stored))
    np.testing.assert_array_equal(np.asarray(to_pil(path)), shown)
    with Image.open(path) as opened:  # a PIL image the caller opened: same, and theirs is left as it was
        np.testing.assert_array_equal(np.asarray(to_pil(opened)), shown)
        assert opened.getexif().get(0x0112) == tag
    assert snapshot(tmp_path) == before


# --- transparency ------------------------------------------------------------------------------------------


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.round(a * rgb + (1.0 - a) * 255.0)


def test_alpha_is_composited_onto_white(rng, tmp_path):
    rgb = _rgb(rng)
    alpha = np.choose(torch.randint(0, 3, rgb.shape[:2], generator=rng).numpy(), [0, 128, 255]).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    rgba.save(tmp_path / "a.png")
    for source in (rgba, tmp_path / "a.png"):
        got = np.asarray(to_pil(source)).astype(np.float64)
        assert np.abs(got - _on_white(rgb, alpha)).max() <= 1.0
    la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), mode="LA")
    got = np.asarray(to_pil(la)).astype(np.float64)
    assert np.abs(got - _on_white(np.repeat(rgb[..., :1], 3, axis=2), alpha)).max() <= 1.0


def test_invisible_pixels_cannot_change_what_the_engine_sees(pre, rng):
    """Two images identical where visible, different (random) where alpha = 0: the same pixel_values,
    so the same kept set. A palette image's transparent index counts as invisible too."""
    rgb, other = _rgb(rng, 60, 60), _rgb(rng, 60, 60)
    alpha = np.full((60, 60), 255, np.uint8)
    alpha[10:40, 5:50] = 0
    a = Image.fromarray(np.dstack([rgb, alpha]))
    b = Image.fromarray(np.dstack([np.where(alpha[..., None] == 0, other, rgb), alpha]))
    np.testing.assert_array_equal(pre(a), pre(b))
    white = np.where(alpha[..., None] == 0, 255, rgb).astype(np.uint8)
    np.testing.assert_allclose(pre(a), pre(Image.fromarray(white)), atol=1e-6)
    indices = torch.randint(0, 4, (20, 20), generator=rng).numpy().astype(np.uint8)
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.info["transparency"] = 0
    expected = np.array([[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)[indices]
    np.testing.assert_array_equal(np.asarray(to_pil(palette)), expected)


# --- bit depths and modes ------------------------------------------------------------------------------


def _gray3(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=2)


def test_16_bit_images_are_scaled_not_clamped(rng, tmp_path):
    v = torch.randint(0, 65536, (40, 30), generator=rng).numpy().astype(np.uint16)
    v[0, 0], v[0, 1] = 0, 65535
    expected = _gray3(np.round(v.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8))
    Image.fromarray(v).save(tmp_path / "depth.png")  # a 16-bit grayscale PNG
    with Image.open(tmp_path / "depth.png") as check:
        assert check.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(to_pil(tmp_path / "depth.png")), expected)
    np.testing.assert_array_equal(np.asarray(to_pil(Image.fromarray(v.astype(np.int32), mode="I"))), expected)
    rgb16 = torch.randint(0, 65536, (40, 30, 3), generator=rng).numpy().astype(np.uint16)
    np.testing.assert_array_equal(
        np.asarray(to_pil(rgb16)), np.round(rgb16.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    )


def test_float_images_and_other_modes(rng):
    f = torch.rand(20, 20, generator=rng).numpy().astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(to_pil(Image.fromarray(f, mode="F"))), _gray3(np.round(f * 255.0).astype(np.uint8))
    )
    with pytest.raises(ValueError, match=r"image 0: a floating-point image must lie in \[0, 1\]"):
        to_pil(Image.fromarray(f * 3, mode="F"))
    with pytest.raises(ValueError, match=r"32-bit integer image with values 0\.\.70000"):
        to_pil(Image.fromarray(np.array([[0, 70000]], np.int32), mode="I"))
    bits = torch.randint(0, 2, (16, 16), generator=rng).numpy().astype(bool)
    np.testing.assert_array_equal(np.asarray(to_pil(Image.fromarray(bits))), _gray3(bits.astype(np.uint8) * 255))
    gray = _rgb(rng)[..., 0]
    np.testing.assert_array_equal(np.asarray(to_pil(Image.fromarray(gray))), _gray3(gray))
    cmyk = Image.fromarray(_rgb(rng)).convert("CMYK")
    np.testing.assert_array_equal(np.asarray(to_pil(cmyk)), np.asarray(cmyk.convert("RGB")))


# --- bounded work ---------------------------------------------------------------------------------------

GEOMETRY = {
    # (width, height) declared in the header: what the one line says
    "81 MP": ((9000, 9000), r"9000x9000 = 81,000,000 pixels, over the limit of 67,108,864 \(8192x8192\)"),
    "100 MP, Pillow warns": ((10000, 10000), r"100,000,000 pixels, over the limit of 67,108,864"),
    "400 MP, Pillow refuses": ((20000, 20000), r"has 400,000,000 pixels, over the limit of 67,108,864"),
    "just over": ((8193, 8192), r"8193x8192 = 67,117,056 pixels, over the limit of 67,108,864"),
    "1 x 100000": ((1, 100000), r"aspect ratio of 100000:1, over the limit of 200:1"),
    "300 x 1": ((300, 1), r"aspect ratio of 300:1"),
}


@pytest.mark.parametrize("case", sorted(GEOMETRY))
def test_geometry_is_refused_from_the_header(pre, tmp_path, case):
    (w, h), pattern = GEOMETRY[case]
    path = png_header(tmp_path / "big.png", w, h)
    with warnings.catch_warnings(record=True) as seen:  # a library leaves the warning filters to its caller
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=pattern):
            pre(path)
    # Pillow warns (89.5 to 179 MP) only where `apet` would have made the warning an error
    assert [type(m.message).__name__ for m in seen] == (["DecompressionBombWarning"] if w * h == 10**8 else [])


@pytest.mark.parametrize("case", ["100 MP, Pillow warns", "1 x 100000"])
def test_geometry_is_one_line_on_the_cli_before_the_model_loads(tmp_path, capsys, monkeypatch, case):
    (w, h), pattern = GEOMETRY[case]
    path = png_header(tmp_path / "big.png", w, h)
    engine = _unloadable_engine(tmp_path, monkeypatch)
    capsys.readouterr()
    rc = main(["run", "--engine", str(engine), "--image", str(path), "--prompt", "x"])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "Warning" not in captured.err and "warn(" not in captured.err
    import re

    assert re.search(pattern, captured.err), captured.err


def _unloadable_engine(tmp_path: Path, monkeypatch) -> Path:
    """An engine the image check must stop before: loading it fails loudly."""
    import apet_trt.runtime as rt

    def fail(*a, **k):
        raise AssertionError("the engine was loaded before the image was checked")

    monkeypatch.setattr(rt, "load", fail)
    return tmp_path


def test_thin_but_legal_images_and_big_resizes(pre, tmp_path, rng):
    """200:1 is accepted and processed; a processor whose resize would exceed the pixel limit is
    refused per image, and one configured beyond 8192 px at load."""
    thin = torch.randint(0, 256, (1, 200, 3), generator=rng, dtype=torch.uint8).numpy()
    assert pre(thin).shape == (1, 3, 56, 56)
    big = tmp_path / "big-processor"
    clip_processor_class()(size={"shortest_edge": 4096}, crop_size={"height": 56, "width": 56}).save_pretrained(
        str(big)
    )
    with pytest.raises(ValueError, match=r"image 0: 1x150 would be resized to 4096x614400 by the processor"):
        ImagePreprocessor(big, image_size=56)(np.zeros((150, 1, 3), np.uint8))
    huge = tmp_path / "huge-processor"
    clip_processor_class()(size={"shortest_edge": 100000}, crop_size={"height": 56, "width": 56}).save_pretrained(
        str(huge)
    )
    with pytest.raises(ValueError, match=r"preprocessor_config\.json: size\.shortest_edge=100000 exceeds 8192"):
        ImagePreprocessor(huge, image_size=56)


# --- paths that are not local image files ---------------------------------------------------------------


def _paths(tmp_path: Path) -> dict:
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "vector.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    return {
        "https URL": ("https://example.com/cat.png", r"https://example\.com/cat\.png is a URL"),
        "data URL": ("data:image/png;base64,iVBORw0KGgo=", r"is a URL; apet reads local image files only"),
        "stdin": ("-", r"'-' \(standard input\) is not supported"),
        "folder": (str(tmp_path / "folder.png"), r"folder\.png is a directory, not an image file"),
        "FIFO": (str(tmp_path / "pipe.png"), r"pipe\.png is not a regular file"),
        "EPS": (str(tmp_path / "vector.eps"), r"vector\.eps is not an image PIL can read"),
        "missing": (str(tmp_path / "nope.jpg"), r"image file .*nope\.jpg does not exist"),
    }


@pytest.mark.parametrize("case", ["https URL", "data URL", "stdin", "folder", "FIFO", "EPS", "missing"])
def test_paths_are_reported_as_what_they_are(pre, tmp_path, capsys, monkeypatch, case):
    path, pattern = _paths(tmp_path)[case]
    with pytest.raises((ValueError, OSError), match=pattern):
        pre(path)
    engine = _unloadable_engine(tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["run", "--engine", str(engine), "--image", path, "--prompt", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out == "", captured.err
    import re

    assert re.search(pattern, captured.err), captured.err
    assert snapshot(tmp_path) == before


def test_limits_are_stated_once(pre):
    """The documented numbers are the enforced ones (docs/LIMITS.md: 8192 x 8192, 200:1)."""
    assert images.MAX_PIXELS == 8192 * 8192 and images.MAX_ASPECT == 200
    limits = (Path(__file__).resolve().parents[2] / "docs" / "LIMITS.md").read_text()
    assert "8192 x 8192" in limits and "200:1" in limits


def test_shrinking_first_gives_exactly_the_processors_pixel_values(pre, rng):
    """The bounded path (the processor's own resize done first on the PIL image) equals the
    Transformers processor run on the whole image, bit for bit, on fresh random sizes and pixels."""
    for _ in range(6):
        h, w = (int(v) for v in torch.randint(20, 700, (2,), generator=rng))
        if max(h, w) / min(h, w) > 200:
            continue
        array = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()
        whole = pre.processor(images=[Image.fromarray(array)], return_tensors="np")["pixel_values"]
        np.testing.assert_array_equal(pre(array), whole)


def test_compositing_in_bands_equals_transformers_convert_to_rgb(rng, monkeypatch):
    """Large images are composited in bands of rows; the result is Transformers' convert_to_rgb on
    the whole image, exactly (bands of 7 rows here, so several bands and a short last one)."""
    from transformers.image_transforms import convert_to_rgb

    monkeypatch.setattr(images, "_BAND_PIXELS", 7 * 45)
    rgba = Image.fromarray(torch.randint(0, 256, (50, 45, 4), generator=rng, dtype=torch.uint8).numpy())
    numpy_flag = "return_numpy" in inspect.signature(convert_to_rgb).parameters  # Transformers 5; 4.x: PIL
    whole = np.asarray(convert_to_rgb(rgba.copy(), **({"return_numpy": True} if numpy_flag else {})))
    np.testing.assert_array_equal(np.asarray(to_pil(rgba)), whole)


def test_images_sent_to_apet_serve_are_read_the_same_way(rng, tmp_path):
    """`apet serve` decodes uploaded images with the same rules: alpha on white, EXIF applied, and
    no format outside the raster list (an EPS upload would be handed to Ghostscript)."""
    import io

    from apet_trt.runtime.serve.config import ServeConfig
    from apet_trt.runtime.serve.errors import APIError
    from apet_trt.runtime.serve.media import decode_image_bytes

    cfg = ServeConfig(engine=str(tmp_path))
    rgb = _rgb(rng)
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, :10] = 255
    buf = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha])).save(buf, format="PNG")
    got = np.asarray(decode_image_bytes(buf.getvalue(), cfg, "messages[0]"))
    np.testing.assert_array_equal(got, np.where(alpha[..., None] == 255, rgb, 255).astype(np.uint8))
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif)
    np.testing.assert_array_equal(np.asarray(decode_image_bytes(buf.getvalue(), cfg, "m")), np.rot90(rgb, k=-1))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(APIError, match="not an image this server can read"):
        decode_image_bytes(eps, cfg, "m")


PEAK = """
import sys, threading, time
import numpy as np, psutil
from apet_trt.runtime.images import ImagePreprocessor
pre = ImagePreprocessor(sys.argv[1], image_size=336)
pre(np.zeros((400, 300, 3), np.uint8))  # warm: the processor's own buffers
me, peak, done = psutil.Process(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], me.memory_info().rss)
        time.sleep(0.001)
before = me.memory_info().rss
watcher = threading.Thread(target=watch)
watcher.start()
pre(sys.argv[2])
done.set()
watcher.join()
print(max(peak[0], me.memory_info().rss) - before)
"""


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_peak_memory_grows_by_at_most_10_bytes_per_pixel(tmp_path, mode):
    """docs/LIMITS.md's bound, on a 16.8 MP image read in a fresh process: the resident memory grows by at
    most 10 bytes per pixel while it is read and processed (RSS sampled every millisecond)."""
    import subprocess
    import sys

    side = 4096
    processor = tmp_path / "processor"
    clip_processor_class()(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(
        str(processor)
    )
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    picture = np.empty((side, side, len(mode)), np.uint8)
    for c in range(len(mode)):
        picture[..., c] = (ramp[:, None] * (c + 1) + ramp[None, :]).astype(np.uint32) % 256
    Image.fromarray(picture, mode=mode).save(tmp_path / "big.png", compress_level=1)
    del picture
    r = subprocess.run(
        [sys.executable, "-c", PEAK, str(processor), str(tmp_path / "big.png")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.strip().splitlines()[-1])
    assert grown <= 10 * side * side, f"{grown / side / side:.1f} bytes per pixel"
