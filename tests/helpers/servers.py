"""Helpers (no tests here): real `apet serve` servers on 127.0.0.1 in a thread of the test process,
on a free port, stopped (gracefully, as on SIGTERM) when the block ends."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time
from dataclasses import replace

import numpy as np
from PIL import Image

from apet_trt.runtime.serve import ServeConfig
from apet_trt.runtime.serve.server import bind, make_server


@contextlib.contextmanager
def running_server(cfg: ServeConfig, pipe=None, startup_timeout: float = 120.0):
    """-> (base URL "http://127.0.0.1:PORT", the server's state once ready)."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    ready: dict = {}
    server = make_server(
        replace(cfg, host="127.0.0.1", port=port),
        sock,
        pipe=pipe,
        on_ready=lambda s: ready.setdefault("state", s),
        log_level="warning",
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", ready["state"]
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def data_url(image: np.ndarray | Image.Image, fmt: str = "PNG") -> str:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    pil.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
