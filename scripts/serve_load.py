"""Bounded load test of `apet serve`: the ApET engine against the `--no-apet` baseline engine.

Each engine gets an `apet serve` subprocess on 127.0.0.1 (a free port) and the same request set:
first one request at a time (the serial answers), then `--rounds` rounds of all requests at
`--concurrency` through the official `openai` client (greedy, so answers are comparable), the two
engines' rounds interleaved (so other load on the machine slows both alike). Reported
per engine: every request succeeded, every concurrent answer equals its serial one, latency p50/p95,
requests/s, the server's RSS after each round (it must not grow across rounds); and the ratios
ApET / baseline. The JSON goes to --out (docs/results/serve/ for the README's numbers).

    python scripts/serve_load.py --model tiny-llava --requests 32 --concurrency 8 --rounds 3
    python scripts/serve_load.py --engine engines/x-t64 --baseline engines/x-full

Every loop here is bounded: requests x rounds, each request with a timeout; the servers are stopped
with SIGTERM (graceful shutdown) at the end, killed only if they do not stop.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

_READY = re.compile(r"ready on (http://127\.0\.0\.1:\d+)")
PROMPTS = ("What is in the picture?", "Describe the image in one sentence.", "What colours do you see?")


@dataclass
class LoadConfig:
    model: str | None = "tiny-llava"  # a preset or checkpoint built (or reused) under cache_dir
    engine: str | None = None  # or the two engine directories, given
    baseline: str | None = None
    cache_dir: str = "bench_out/engines"
    keep: int = 64
    basis: int = 10
    requests: int = 32
    concurrency: int = 8
    rounds: int = 3
    max_tokens: int = 16
    max_batch: int | None = None
    batch_wait_ms: float = 5.0
    seed: int = 0
    request_timeout_s: float = 300.0
    startup_timeout_s: float = 300.0
    out: str | None = "docs/results/serve"

    def validate(self) -> None:
        if (self.engine is None) != (self.baseline is None):
            raise ValueError("give both --engine and --baseline, or neither (then --model is built)")
        if self.engine is None and self.model is None:
            raise ValueError("give --model, or --engine and --baseline")
        for name in ("requests", "concurrency", "rounds", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def log(msg: str) -> None:
    print(f"[serve-load] {msg}", file=sys.stderr, flush=True)


def engines(cfg: LoadConfig) -> tuple[Path, Path]:
    if cfg.engine is not None:
        return Path(cfg.engine), Path(cfg.baseline)
    from apet_trt.scripts.bench.engines import build_pair

    pair = build_pair(cfg.model, Path(cfg.cache_dir), keep=cfg.keep, basis=cfg.basis, fp16=False)
    return pair.compressed.root, pair.baseline.root


def request_set(cfg: LoadConfig) -> list[tuple[str, str]]:
    """(data URL, prompt) per request: seeded random pictures of varied shapes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(cfg.seed)
    out = []
    for i in range(cfg.requests):
        h, w = int(rng.integers(200, 480)), int(rng.integers(200, 480))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append(("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), PROMPTS[i % len(PROMPTS)]))
    return out


class ServerProcess:
    """`apet serve` in a subprocess; its stderr is read by a thread (startup line, errors)."""

    def __init__(self, engine: Path, cfg: LoadConfig):
        cmd = [
            sys.executable,
            "-m",
            "apet_trt.scripts.cli",
            "serve",
            "--engine",
            str(engine),
            "--port",
            "0",
            "--batch-wait-ms",
            str(cfg.batch_wait_ms),
            "--max-queue",
            str(max(64, cfg.concurrency * 2)),
            "--request-timeout",
            str(cfg.request_timeout_s),
        ]
        if cfg.max_batch is not None:
            cmd += ["--max-batch", str(cfg.max_batch)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(cfg.startup_timeout_s) or self.url is None:
            self.stop()
            raise RuntimeError(f"apet serve did not start for {engine}:\n" + "".join(self.lines[-20:]))
        self.startup_line = next((ln.strip() for ln in self.lines if "apet serve: model" in ln), "")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = _READY.search(line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()  # ended without the line

    def rss(self) -> int:
        import psutil

        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(10)
        return self.proc.returncode


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _one(client, model: str, url: str, prompt: str, max_tokens: int) -> tuple[str | None, float, str | None, dict]:
    t0 = time.perf_counter()
    try:
        r = client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
                }
            ],
            temperature=0,
            max_tokens=max_tokens,
        )
        usage = {"prompt_tokens": r.usage.prompt_tokens, "visual_tokens": getattr(r.usage, "visual_tokens", None)}
        return r.choices[0].message.content, time.perf_counter() - t0, None, usage
    except Exception as exc:  # counted as a failure, reported
        return None, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}", {}


class EngineRun:
    """One engine's server, its serial answers and its rounds."""

    def __init__(self, engine: Path, cfg: LoadConfig, requests: list[tuple[str, str]]):
        import openai

        self.engine, self.cfg, self.requests = engine, cfg, requests
        self.server = ServerProcess(engine, cfg)
        self.client = openai.OpenAI(
            base_url=self.server.url + "/v1", api_key="unused", max_retries=0, timeout=cfg.request_timeout_s
        )
        self.model = self.client.models.list().data[0].id
        self.serial: list = []
        self.rounds: list[dict] = []
        log(f"{engine}: serving at {self.server.url} as {self.model!r}")

    def ask(self, rq):
        return _one(self.client, self.model, rq[0], rq[1], self.cfg.max_tokens)

    def run_serial(self) -> None:
        log(f"{self.engine}: {len(self.requests)} requests one at a time (after one to warm up)")
        self.ask(self.requests[0])
        self.serial = [self.ask(rq) for rq in self.requests]

    def run_round(self) -> None:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.cfg.concurrency) as pool:
            results = list(pool.map(self.ask, self.requests))
        wall = time.perf_counter() - t0
        lat = [r[1] for r in results]
        failures = [r[2] for r in results if r[2] is not None]
        equal = sum(1 for r, s in zip(results, self.serial) if r[2] is None and r[0] == s[0])
        r = {
            "round": len(self.rounds),
            "succeeded": len(results) - len(failures),
            "failures": failures[:5],
            "equal_to_serial": equal,
            "wall_s": wall,
            "requests_per_s": len(results) / wall,
            "latency_p50_s": _percentile(lat, 0.5),
            "latency_p95_s": _percentile(lat, 0.95),
            "latency_mean_s": statistics.fmean(lat),
            "server_rss_bytes": self.server.rss(),
        }
        self.rounds.append(r)
        log(
            f"  {self.engine.name} round {r['round']}: {r['succeeded']}/{len(results)} ok, {equal} equal to serial, "
            f"p50 {r['latency_p50_s'] * 1e3:.0f} ms, p95 {r['latency_p95_s'] * 1e3:.0f} ms, "
            f"{r['requests_per_s']:.2f} req/s, RSS {r['server_rss_bytes'] / 2**20:.0f} MiB"
        )

    def report(self) -> dict:
        from apet_trt.runtime.manifest import read_manifest

        metrics = _metrics(self.server.url)
        code = self.server.stop()
        m = read_manifest(self.engine)
        serial_lat = [s[1] for s in self.serial]
        rss = [r["server_rss_bytes"] for r in self.rounds]
        timed = self.rounds[1:] if len(self.rounds) > 1 else self.rounds  # round 0 warms the server up
        n = len(self.requests)
        return {
            "engine": str(self.engine),
            "startup_line": self.server.startup_line,
            "N": m.num_patches,
            "T": m.num_visual_tokens,
            "requests": n,
            "serial_failures": [s[2] for s in self.serial if s[2] is not None][:5],
            "serial_latency_p50_s": _percentile(serial_lat, 0.5),
            "serial_requests_per_s": n / sum(serial_lat),
            "prompt_tokens": self.serial[0][3].get("prompt_tokens"),
            "rounds": self.rounds,
            "all_succeeded": all(r["succeeded"] == n for r in self.rounds) and all(s[2] is None for s in self.serial),
            "all_equal_serial": all(r["equal_to_serial"] == n for r in self.rounds),
            "latency_p50_s": statistics.median(r["latency_p50_s"] for r in timed),
            "latency_p95_s": statistics.median(r["latency_p95_s"] for r in timed),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in timed),
            "rss_per_round_bytes": rss,
            "rss_growth_after_warmup_bytes": rss[-1] - rss[min(1, len(rss) - 1)],
            "rss_growth_second_half_bytes": rss[-1] - rss[len(rss) // 2],
            "vision_batches": metrics.get("vision_batches"),
            "decoder_batches": metrics.get("decoder_batches"),
            "exit_code": code,
        }


def _metrics(url: str) -> dict:
    """Mean batch sizes from the server's /metrics (what batching achieved)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text

    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    out = {}
    for key, metric in (
        ("vision_batches", "apet_vision_batch_images"),
        ("decoder_batches", "apet_decoder_batch_prompts"),
    ):
        count, total = value(f"{metric}_count"), value(f"{metric}_sum")
        out[key] = {"calls": int(count), "mean_size": (total / count) if count else None}
    return out


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def run_load(cfg: LoadConfig) -> dict:
    cfg.validate()
    comp, base = engines(cfg)
    requests = request_set(cfg)
    runs: dict[str, EngineRun] = {}
    try:
        for name, path in (("apet", comp), ("baseline", base)):
            runs[name] = EngineRun(path, cfg, requests)
        for run in runs.values():
            run.run_serial()
        for _ in range(cfg.rounds):  # interleaved, so a busy machine slows both alike
            for run in runs.values():
                run.run_round()
        results = {name: run.report() for name, run in runs.items()}
    finally:
        for run in runs.values():
            run.server.stop()
    a, b = results["apet"], results["baseline"]
    report = {
        "config": asdict(cfg),
        "command": "python scripts/serve_load.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "engines": results,
        "ratio_apet_over_baseline": {
            "latency_p50": a["latency_p50_s"] / b["latency_p50_s"],
            "latency_p95": a["latency_p95_s"] / b["latency_p95_s"],
            "requests_per_s": a["requests_per_s"] / b["requests_per_s"],
        },
        "ok": all(r["all_succeeded"] and r["all_equal_serial"] for r in results.values()),
    }
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        name = Path(cfg.model).name if cfg.model and cfg.engine is None else Path(comp).name
        path = out / f"serve_load_{name}.json"
        path.write_text(json.dumps(report, indent=2))
        report["path"] = str(path)
        log(f"wrote {path}")
    return report


def markdown(report: dict) -> str:
    rows = [
        "| engine | T | all ok | = serial | p50 ms | p95 ms | req/s | serial req/s | RSS per round MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["engines"].items():
        rows.append(
            f"| {name} | {r['T']} | {r['all_succeeded']} | {r['all_equal_serial']} | {r['latency_p50_s'] * 1e3:.0f} | "
            f"{r['latency_p95_s'] * 1e3:.0f} | {r['requests_per_s']:.2f} | {r['serial_requests_per_s']:.2f} | "
            f"{' -> '.join(f'{x / 2**20:.0f}' for x in r['rss_per_round_bytes'])} |"
        )
    q = report["ratio_apet_over_baseline"]
    rows.append(
        f"\nratio ApET / baseline: p50 {q['latency_p50']:.3f}, p95 {q['latency_p95']:.3f}, "
        f"requests/s {q['requests_per_s']:.3f}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = LoadConfig()
    p.add_argument("--model", default=d.model)
    p.add_argument("--engine", default=None)
    p.add_argument("--baseline", default=None)
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--keep", type=int, default=d.keep)
    p.add_argument("--basis", type=int, default=d.basis)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=d.out)
    args = p.parse_args(argv)
    cfg = LoadConfig(**{k: v for k, v in vars(args).items()})
    if cfg.engine is not None:
        cfg.model = None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped on the way out
    report = run_load(cfg)
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
