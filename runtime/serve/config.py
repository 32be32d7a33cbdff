"""What an operator sets on `apet serve` (one object; the CLI flags map onto it one to one)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

EMBED_FORMATS = ("vllm", "vllm-apet", "trtllm")
EMBED_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ServeConfig:
    engine: str  # engine directory
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the manifest's model id
    # -- batching ---------------------------------------------------------------------------
    max_batch: int | None = None  # images per vision-engine call / prompts per decoder call; None: the engine's
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests admitted at once (from their headers to their answer); beyond: 503
    request_timeout_s: float = 600.0  # a request not answered by then gets 504 (its decoding stops)
    header_timeout_s: float = 10.0  # a connection's request headers must arrive within this; else 408
    body_timeout_s: float = 30.0  # an admitted request's body must arrive within this; else 408
    # -- request limits ---------------------------------------------------------------------
    max_body_bytes: int = 32 << 20  # the whole JSON body
    max_images: int = 4  # image parts per request
    max_image_bytes: int = 20 << 20  # one encoded image (data: URL, file, download)
    max_image_pixels: int = 40_000_000  # width * height of one decoded image
    # decoded bytes one request may hold (its images as decoded pixels, its image_embeds tensors as
    # loaded), charged from headers and archive directories before anything is decoded
    max_decoded_bytes: int = 128 << 20
    default_max_tokens: int = 256  # when the request names none (capped by the context left)
    allowed_local_media_path: str | None = None  # file:// image URLs only below this directory
    allow_remote_images: bool = False  # http(s):// image URLs are refused unless this is set
    remote_image_timeout_s: float = 10.0  # for the whole fetch of one image, not per read
    # -- access ---------------------------------------------------------------------------------
    api_key: str | None = None  # when set, every route but /health wants "Authorization: Bearer <key>"
    # -- the runtime --------------------------------------------------------------------------
    backend: str = "auto"
    decoder: str = "auto"
    device: str | None = None
    # -- upstream mode: vision here, the LLM on an OpenAI-compatible server --------------------------
    upstream: str | None = None  # base URL, e.g. http://127.0.0.1:8001 (its /v1/chat/completions)
    upstream_model: str | None = None  # the model name upstream; None: the first of its /v1/models
    upstream_api_key: str | None = None
    # how image_embeds parts are written: "vllm" | "trtllm" | "vllm-apet" (vLLM with apet_trt.vllm_plugin:
    # Qwen2.5-VL and Qwen3-VL rows with their own M-RoPE ids, docs/VLLM_PLUGIN.md)
    upstream_format: str = "vllm"
    embeds_dtype: str | None = None  # dtype of the rows sent upstream; None: the manifest's llm.dtype
    upstream_grid_positions: bool = False  # Qwen2.5-VL: accept the upstream's grid M-RoPE positions (approximate)
    max_upstream_response_bytes: int = 16 << 20  # a non-streamed upstream answer (or error) larger: 502
    graceful_shutdown_s: float = 30.0  # in-flight requests get this long after SIGTERM

    def validate(self) -> None:
        def positive(name: str, value, kind=int) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
                raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")

        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_batch is not None:
            positive("max_batch", self.max_batch)
        if not 0 <= self.batch_wait_ms <= 10_000:
            raise ValueError(f"batch_wait_ms must be in [0, 10000], got {self.batch_wait_ms}")
        for name in (
            "max_queue",
            "max_body_bytes",
            "max_images",
            "max_image_bytes",
            "max_image_pixels",
            "max_decoded_bytes",
            "max_upstream_response_bytes",
        ):
            positive(name, getattr(self, name))
        positive("default_max_tokens", self.default_max_tokens)
        for name in (
            "request_timeout_s",
            "header_timeout_s",
            "body_timeout_s",
            "remote_image_timeout_s",
            "graceful_shutdown_s",
        ):
            positive(name, getattr(self, name), float)
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path}: not a directory")
        if self.upstream_format not in EMBED_FORMATS:
            raise ValueError(f"upstream_format must be one of {EMBED_FORMATS}, got {self.upstream_format!r}")
        if self.embeds_dtype is not None and self.embeds_dtype not in EMBED_DTYPES:
            raise ValueError(f"embeds_dtype must be one of {EMBED_DTYPES}, got {self.embeds_dtype!r}")
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"upstream must be an http(s):// base URL, got {redact_url(self.upstream)!r}")
        if self.api_key is not None and (not self.api_key or self.api_key != self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string without surrounding spaces")

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def redact_url(url: str) -> str:
    """A URL as it may be logged or shown: its user:password and its query (tokens) replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))
