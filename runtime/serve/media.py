"""`image_url` content parts -> RGB PIL images, bounded.

- `data:image/...;base64,...`: always accepted (the usual way to send an image to a local server).
- `file:///abs/path` (or `file://localhost/abs/path`): only when the operator named a directory
  (`--allowed-local-media-path`, as vLLM calls it), and only for files whose resolved path lies below
  it (no `..` or symlink escape). Errors name the URL's path as sent, never where a link points or
  where the allowed directory is.
- `http(s)://...`: refused unless the operator enabled remote images; then fetched without
  redirects, within one deadline for the whole fetch (not per read) and the same byte cap.
Every image is capped in encoded bytes, in decoded pixels and against the request's decoding budget
(runtime/serve/limits.py; all checked from the header, before the pixels are decoded), so a small
upload cannot become a decompression bomb. Transformers' `load_image` takes the same inputs but
fetches and decodes without caps, hence this module.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageMode, UnidentifiedImageError

from ..images import FORMATS, as_displayed
from .config import ServeConfig
from .errors import bad_request
from .limits import DecodeBudget


def decoded_bytes(img: Image.Image) -> int:
    """What decoding `img` holds: its pixels in their own mode, plus the RGB copy when it is converted."""
    mode = ImageMode.getmode(img.mode)
    per_pixel = len(mode.bands) * max(1, int(mode.typestr[-1]) if mode.typestr[-1].isdigit() else 1)
    if img.mode != "RGB":
        per_pixel += 3
    return img.width * img.height * per_pixel


def decode_image_bytes(raw: bytes, cfg: ServeConfig, where: str, budget: DecodeBudget | None = None) -> Image.Image:
    if len(raw) > cfg.max_image_bytes:
        raise bad_request(f"{where}: {len(raw)} bytes exceed the {cfg.max_image_bytes}-byte image limit")
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as img:  # raster formats only (no EPS: Ghostscript)
            w, h = img.size
            if w < 1 or h < 1 or w * h > cfg.max_image_pixels:
                raise bad_request(f"{where}: a {w}x{h} image; at most {cfg.max_image_pixels} pixels are accepted")
            if budget is not None:
                budget.charge(decoded_bytes(img), f"{where}: a {w}x{h} {img.mode} image")
            img.load()
            return as_displayed(img, where, own=True)  # EXIF orientation, alpha on white, 16-bit scaled
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise bad_request(f"{where}: not an image this server can read ({type(exc).__name__})") from exc
    except OSError as exc:  # truncated or corrupt image data
        raise bad_request(f"{where}: the image data could not be decoded ({exc})") from exc
    except ValueError as exc:  # as_displayed: an aspect ratio or bit depth that cannot be read as shown
        raise bad_request(f"{where}: {exc}") from exc


def data_url_bytes(url: str, cfg: ServeConfig, where: str, kind: str = "image", limit: str = "image") -> bytes:
    """A base64 `data:` URL's bytes, its length checked against --max-image-bytes before decoding
    (`kind` names the media type in the message, `limit` the limit)."""
    spec, sep, data = url[5:].partition(",")
    if not sep or not spec.endswith(";base64"):
        raise bad_request(f"{where}: only base64 data URLs (data:{kind}/...;base64,...) are accepted")
    if len(data) > cfg.max_image_bytes * 4 // 3 + 4:
        raise bad_request(f"{where}: the data URL exceeds the {cfg.max_image_bytes}-byte {limit} limit")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"{where}: the data URL is not valid base64 ({exc})") from exc


def _data_url(url: str, cfg: ServeConfig, where: str, budget: DecodeBudget | None) -> Image.Image:
    return decode_image_bytes(data_url_bytes(url, cfg, where), cfg, where, budget)


def _file_url(url: str, cfg: ServeConfig, where: str, budget: DecodeBudget | None) -> Image.Image:
    if cfg.allowed_local_media_path is None:
        raise bad_request(f"{where}: local files are not accepted (the server runs without --allowed-local-media-path)")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise bad_request(f"{where}: a file URL names a path on this machine (file:///path), not on {parsed.netloc!r}")
    given = unquote(parsed.path)
    if "\x00" in given or not given.startswith("/"):
        raise bad_request(f"{where}: a file URL must hold an absolute path without NUL bytes")
    root = Path(cfg.allowed_local_media_path).resolve()
    try:
        path = Path(given).resolve()
        if root not in path.parents:
            raise bad_request(f"{where}: {given} is outside the allowed directory")
        if not path.is_file():
            raise bad_request(f"{where}: {given} does not exist or is not a regular file")
        if path.stat().st_size > cfg.max_image_bytes:
            raise bad_request(f"{where}: {given} exceeds the {cfg.max_image_bytes}-byte image limit")
        raw = path.read_bytes()
    except OSError as exc:  # unreadable, a loop of links, a name too long
        raise bad_request(f"{where}: {given} cannot be read ({exc.strerror or type(exc).__name__})") from exc
    return decode_image_bytes(raw, cfg, where, budget)


async def _remote(url: str, cfg: ServeConfig, where: str, budget: DecodeBudget | None) -> Image.Image:
    if not cfg.allow_remote_images:
        raise bad_request(
            f"{where}: remote image URLs are not accepted (the server runs without --allow-remote-images)"
        )
    import anyio
    import httpx

    chunks, size = [], 0
    limit = cfg.remote_image_timeout_s
    try:
        with anyio.fail_after(limit):  # the whole fetch: a host dripping a byte at a time is cut off too
            async with httpx.AsyncClient(timeout=limit, follow_redirects=False) as client:
                async with client.stream("GET", url) as resp:
                    if resp.status_code != 200:
                        raise bad_request(f"{where}: fetching the image gave HTTP {resp.status_code}")
                    async for chunk in resp.aiter_bytes():
                        size += len(chunk)
                        if size > cfg.max_image_bytes:
                            raise bad_request(f"{where}: the image exceeds the {cfg.max_image_bytes}-byte limit")
                        chunks.append(chunk)
    except TimeoutError as exc:
        raise bad_request(f"{where}: the image was not fetched within {limit:g} s", code="image_fetch_timeout") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise bad_request(f"{where}: the image could not be fetched ({type(exc).__name__})") from exc
    return await anyio.to_thread.run_sync(decode_image_bytes, b"".join(chunks), cfg, where, budget)


async def load_image_url(url, cfg: ServeConfig, where: str, budget: DecodeBudget | None = None) -> Image.Image:
    import anyio

    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: image_url.url must be a non-empty string")
    scheme = url[: url.find(":")].lower() if ":" in url else ""
    if scheme == "data":
        return await anyio.to_thread.run_sync(_data_url, url, cfg, where, budget)
    if scheme == "file":
        return await anyio.to_thread.run_sync(_file_url, url, cfg, where, budget)
    if scheme in ("http", "https"):
        return await _remote(url, cfg, where, budget)
    raise bad_request(f"{where}: image URLs must be data:, file: or http(s): URLs")
