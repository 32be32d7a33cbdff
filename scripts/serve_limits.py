"""What hostile load costs `apet serve`: peak memory under a burst of huge-image requests, memory for
one zip-bomb embeddings payload, and how fast a full server says 503.

One `apet serve` subprocess on 127.0.0.1 (a free port, `--max-queue 4` unless told), then three
bounded phases, each sampling the server's RSS (psutil, every `--sample-ms`):

    burst     `--burst` (16) concurrent requests of four `--side`^2-pixel PNGs each (36 MP, a smooth
              picture that compresses to well under 1 MB), max_tokens 4: the server's peak and final
              RSS over its idle RSS, and the statuses it answered
    zip bomb  one request whose image_embeds part is a torch.save'd 1 GiB zero tensor re-packed with
              deflate (about 1 MB of base64): the RSS it costs and its status
    full      `--trials` times: fill the server with max-queue streaming requests (small image, long
              answers) until its queue-depth gauge says full, then time one four-image request to
              its answer (503 expected), and the same request's headers alone (a raw socket that
              sends no body) to their answer (up to `--headers-wait-s`), then hang up the fillers

Nothing here changes the server's flags between a before and an after run, so the same command
measures any version of the code (run it with that version importable as `apet_trt`).

    python scripts/serve_limits.py --label after --out docs/results/serve
    python scripts/serve_limits.py --engine engines/tiny-llava-t64 --label before

Bounded: every loop has a count and every request a timeout; the server gets SIGTERM at the end
(killed if it does not stop).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

_READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")
MIB = 1 << 20


@dataclass
class LimitsConfig:
    engine: str | None = None  # an engine directory; None: tiny-llava --keep 64 built under cache_dir
    cache_dir: str = "bench_out/engines"
    label: str = "after"
    max_queue: int = 4
    burst: int = 16
    images: int = 4
    side: int = 6000
    bomb_gib: float = 1.0
    trials: int = 3
    fill_max_tokens: int = 1800
    headers_wait_s: float = 5.0
    sample_ms: float = 10.0
    timeout_s: float = 300.0
    extra: str = ""  # more `apet serve` flags, space-separated (e.g. for a version that has them)
    out: str | None = "docs/results/serve"


def log(msg: str) -> None:
    print(f"[serve-limits] {msg}", file=sys.stderr, flush=True)


def engine_dir(cfg: LimitsConfig) -> Path:
    if cfg.engine is not None:
        return Path(cfg.engine)
    out = Path(cfg.cache_dir) / "serve-limits-tiny-llava-t64"
    if not (out / "manifest.json").is_file():
        log(f"building tiny-llava --keep 64 into {out}")
        cmd = [sys.executable, "-m", "apet_trt.scripts.cli", "build", "--model", "tiny-llava", "--keep", "64"]
        subprocess.run([*cmd, "--out", str(out)], check=True, timeout=1800)
    return out


class Server:
    """`apet serve` in a subprocess; a thread reads its stderr (startup line) and one samples RSS."""

    def __init__(self, engine: Path, cfg: LimitsConfig):
        cmd = [sys.executable, "-m", "apet_trt.scripts.cli", "serve", "--engine", str(engine), "--port", "0"]
        cmd += ["--max-queue", str(cfg.max_queue), "--request-timeout", str(cfg.timeout_s), *cfg.extra.split()]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(600) or self.url is None:
            self.stop()
            raise RuntimeError("apet serve did not start:\n" + "".join(self.lines[-20:]))
        import psutil

        self.ps = psutil.Process(self.proc.pid)
        self.sample_s = cfg.sample_ms / 1e3

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = _READY.search(line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def peak_during(self, work):
        """(work's result, peak RSS while it ran, RSS after it) - sampled every sample_ms."""
        peak, stop = [self.rss()], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], self.rss())
                stop.wait(self.sample_s)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            result = work()
        finally:
            stop.set()
            t.join()
        time.sleep(0.5)
        return result, max(peak[0], self.rss()), self.rss()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode


# -- payloads --------------------------------------------------------------------------------------
def big_png(side: int) -> bytes:
    """A smooth side x side RGB picture (gradients): 36 MP that PNG stores in well under 1 MB."""
    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, side, dtype=np.float32)
    r = np.broadcast_to(x[None, :], (side, side))
    g = np.broadcast_to(x[:, None], (side, side))
    pixels = np.stack([r, g, (r + g) / 2], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", optimize=False)
    return buf.getvalue()


def small_png() -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def zip_bomb(gib: float) -> str:
    """base64 of a torch.save archive of a `gib` GiB zero float32 tensor, every member deflated
    (torch's own writer stores them; its reader inflates either)."""
    import torch

    numel = int(gib * (1 << 30)) // 4
    raw = io.BytesIO()
    torch.save(torch.zeros(numel), raw)  # calloc'd: the zero pages are never touched here
    src, out = zipfile.ZipFile(io.BytesIO(raw.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            with src.open(info) as fin, dst.open(info.filename, "w", force_zip64=True) as fout:
                while chunk := fin.read(16 * MIB):
                    fout.write(chunk)
    del raw
    return base64.b64encode(out.getvalue()).decode()


def body(model: str, images: list[bytes], max_tokens: int, stream: bool = False) -> dict:
    url = "data:image/png;base64,"
    parts = [{"type": "image_url", "image_url": {"url": url + base64.b64encode(b).decode()}} for b in images]
    content = [*parts, {"type": "text", "text": "What is in the picture?"}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


# -- phases ----------------------------------------------------------------------------------------
def post(url: str, payload: dict | bytes, timeout: float) -> tuple[int, float]:
    import httpx

    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    t0 = time.perf_counter()
    try:
        r = httpx.post(
            url + "/v1/chat/completions",
            content=content,
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )
        return r.status_code, time.perf_counter() - t0
    except Exception as exc:  # a dropped connection counts as what it is
        log(f"  request failed: {type(exc).__name__}: {exc}")
        return -1, time.perf_counter() - t0


def statuses(results) -> dict:
    out: dict[str, int] = {}
    for code, _ in results:
        out[str(code)] = out.get(str(code), 0) + 1
    return out


def phase_burst(server: Server, model: str, cfg: LimitsConfig, png: bytes) -> dict:
    payload = json.dumps(body(model, [png] * cfg.images, 4)).encode()
    idle = server.rss()

    def work():
        with ThreadPoolExecutor(cfg.burst) as pool:
            return list(pool.map(lambda _: post(server.url, payload, cfg.timeout_s), range(cfg.burst)))

    results, peak, after = server.peak_during(work)
    out = {
        "requests": cfg.burst,
        "images_per_request": cfg.images,
        "request_body_bytes": len(payload),
        "idle_rss_bytes": idle,
        "peak_rss_bytes": peak,
        "rss_after_bytes": after,
        "peak_over_idle_bytes": peak - idle,
        "statuses": statuses(results),
        "wall_s": max(t for _, t in results),
    }
    log(f"  burst: peak {peak / MIB:.0f} MiB (idle {idle / MIB:.0f}), after {after / MIB:.0f} MiB, {out['statuses']}")
    return out


def phase_bomb(server: Server, model: str, cfg: LimitsConfig) -> dict:
    b64 = zip_bomb(cfg.bomb_gib)
    payload = {
        "model": model,
        "messages": [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": b64}]}],
        "max_tokens": 4,
    }
    idle = server.rss()
    (code, seconds), peak, after = server.peak_during(lambda: post(server.url, payload, cfg.timeout_s))
    out = {
        "uncompressed_bytes": int(cfg.bomb_gib * (1 << 30)),
        "base64_chars": len(b64),
        "idle_rss_bytes": idle,
        "peak_rss_bytes": peak,
        "rss_after_bytes": after,
        "peak_over_idle_bytes": peak - idle,
        "status": code,
        "seconds": seconds,
    }
    log(f"  zip bomb: status {code}, peak +{(peak - idle) / MIB:.0f} MiB, after {after / MIB:.0f} MiB")
    return out


def queue_depth(url: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    m = re.search(r"^apet_queue_depth ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def headers_only(url: str, length: int, wait_s: float) -> tuple[int | None, float]:
    """POST headers declaring a `length`-byte JSON body, and no body: (status, seconds) of the
    answer, or (None, wait_s) when none came within wait_s."""
    import socket

    host, port = url.rsplit("/", 1)[-1].split(":")
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        t0 = time.perf_counter()
        sock.sendall(head)
        try:
            first = sock.recv(64)
        except TimeoutError:
            return None, wait_s
    m = re.match(rb"HTTP/1\.1 (\d{3})", first)
    return (int(m.group(1)) if m else None), time.perf_counter() - t0


def phase_full(server: Server, model: str, cfg: LimitsConfig, png: bytes) -> dict:
    import httpx

    fill = json.dumps(body(model, [small_png()], cfg.fill_max_tokens, stream=True)).encode()
    hostile = json.dumps(body(model, [png] * cfg.images, 4)).encode()
    trials = []
    for trial in range(cfg.trials):
        clients = [httpx.Client(timeout=cfg.timeout_s) for _ in range(cfg.max_queue)]
        streams = []
        try:
            for c in clients:
                s = c.stream(
                    "POST",
                    server.url + "/v1/chat/completions",
                    content=fill,
                    headers={"Content-Type": "application/json"},
                )
                streams.append(s)
                s.__enter__()
            full = False
            for _ in range(200):  # bounded: up to 20 s for the fillers to be inside
                if queue_depth(server.url) >= cfg.max_queue:
                    full = True
                    break
                time.sleep(0.1)
            code, seconds = post(server.url, hostile, cfg.timeout_s)
            still_full = queue_depth(server.url) >= cfg.max_queue  # the 503 was for a full server
            head_code, head_seconds = headers_only(server.url, len(hostile), cfg.headers_wait_s)
            trials.append(
                {
                    "status": code,
                    "seconds": seconds,
                    "headers_only_status": head_code,
                    "headers_only_seconds": head_seconds,
                    "full_before": full,
                    "full_after": still_full,
                }
            )
            log(
                f"  full trial {trial}: status {code} after {seconds * 1e3:.1f} ms; headers alone: {head_code} after "
                f"{head_seconds * 1e3:.1f} ms (full: {full}/{still_full})"
            )
        finally:
            for s in streams:
                s.__exit__(None, None, None)
            for c in clients:
                c.close()
        for _ in range(200):  # bounded: the fillers' slots come back
            if queue_depth(server.url) == 0:
                break
            time.sleep(0.1)
    valid = [t for t in trials if t["full_before"] and t["full_after"]]
    whole = sorted(t["seconds"] for t in valid if t["status"] == 503)
    heads = sorted(t["headers_only_seconds"] for t in valid if t["headers_only_status"] == 503)
    return {
        "trials": trials,
        "seconds_to_503": whole,
        "median_s": whole[len(whole) // 2] if whole else None,
        "headers_only_seconds_to_503": heads,
        "headers_only_median_s": heads[len(heads) // 2] if heads else None,
    }


def run(cfg: LimitsConfig) -> dict:
    import httpx

    engine = engine_dir(cfg)
    log("making payloads")
    png = big_png(cfg.side)
    server = Server(engine, cfg)
    try:
        model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
        warm = post(server.url, body(model, [small_png()], 4), cfg.timeout_s)
        log(f"serving {engine} at {server.url} as {model!r}; warm-up {warm[0]}; {len(png)} bytes per PNG")
        report = {
            "label": cfg.label,
            "config": asdict(cfg),
            "server_command": " ".join(server.cmd[1:]),
            "png_bytes": len(png),
            "png_pixels": cfg.side * cfg.side,
            "burst": phase_burst(server, model, cfg, png),
            "zip_bomb": phase_bomb(server, model, cfg),
            "full": phase_full(server, model, cfg, png),
            "health_after": httpx.get(server.url + "/health", timeout=30).status_code,
            "good_request_after": post(server.url, body(model, [small_png()], 4), cfg.timeout_s)[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(),
        }
    finally:
        report_exit = server.stop()
    report["server_exit_code"] = report_exit
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"serve_limits_{cfg.label}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = LimitsConfig()
    for name, value in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(value) if value is not None else str, default=value)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the server is stopped on the way out
    report = run(LimitsConfig(**vars(args)))
    print(json.dumps({k: report[k] for k in ("burst", "zip_bomb", "full")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
