"""Time per request through apet-trt's vLLM plugin (the rows with their own M-RoPE ids) against vLLM's own
Qwen2.5-VL path (the same rows with a grid), on one vLLM server started with the plugin's architecture.

    python -m apet_trt.scripts.vllm_plugin_timing --engine engines/qwen-full --vllm http://127.0.0.1:8001

The engine (a Qwen2.5-VL engine directory) encodes the images once; each image's rows then go to the
server as two payloads, alternated request by request so other load slows both alike: the plugin's
(`--upstream-format vllm-apet`) and vLLM's own (`image_embeds` + `image_grid_thw`: the image's grid when
nothing was dropped, else R rows as a [1, 2, 2R] grid). Both decode `--max-tokens` tokens (ignore_eos),
greedy; with a --no-apet engine the two answers must be equal (the plugin changes nothing there). Start
vLLM with --no-enable-prefix-caching, or the repeated prompts come from its cache. The JSON (per-image
and overall medians, the ratio plugin / own) goes to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="a Qwen2.5-VL engine directory")
    p.add_argument("--vllm", required=True, help="base URL of vLLM started with the plugin's architecture")
    p.add_argument("--sizes", default="300x300,420x180,160x400", help="image sizes WxH, random pixels (seeded)")
    p.add_argument("--repeats", type=int, default=20, help="timed requests per image and payload (20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per image and payload first (2)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/vllm_plugin/timing.json", help="JSON file ('' for none)")
    return p


def main(argv: list[str] | None = None) -> int:
    import httpx
    import torch
    from PIL import Image

    from apet_trt.runtime import load
    from apet_trt.runtime.serve.payload import encode_part, handoff_fields
    from apet_trt.runtime.serve.vision_only import VisionOnlyDecoder

    args = _parser().parse_args(argv)
    if not 1 <= args.repeats <= 1000 or not 0 <= args.warmup <= 100:
        raise SystemExit("--repeats must be in 1..1000, --warmup in 0..100")
    pipe = load(args.engine, backend="onnxruntime", decoder=VisionOnlyDecoder.for_manifest)
    if not pipe.family.vllm_plugin:
        raise SystemExit(f"{args.engine}: a {pipe.family.name} engine; the plugin takes Qwen2.5-VL rows")
    rng = np.random.default_rng(args.seed)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    client = httpx.Client(base_url=args.vllm.rstrip("/"), timeout=600)
    model = client.get("/v1/models").json()["data"][0]["id"]
    version = client.get("/version").json().get("version")

    def ask(part: dict) -> tuple[float, list[int]]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Describe the picture."}]}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        t0 = time.perf_counter()
        resp = client.post("/v1/chat/completions", json=body)
        elapsed = (time.perf_counter() - t0) * 1e3
        if resp.status_code != 200:
            raise SystemExit(f"vLLM answered {resp.status_code}: {resp.text[:400]}")
        return elapsed, resp.json()["choices"][0]["token_ids"]

    per_image, all_plugin, all_own, all_paired = [], [], [], []
    for image in images:
        [rows] = pipe.encode(image)
        t, h, w = rows.extras["grid_thw"]
        whole = rows.num_rows == rows.num_patches
        grid = (t, h, w) if whole else (1, 2, 2 * rows.num_rows)
        plugin = encode_part(handoff_fields(pipe.family, rows, "vllm-apet"), "vllm-apet")
        own = encode_part({"image_embeds": rows.embeddings, "image_grid_thw": torch.tensor(grid)}, "vllm")
        for _ in range(args.warmup):
            ask(plugin), ask(own)
        times = {"plugin": [], "own": []}
        answers = {}
        for k in range(args.repeats):  # pairs, their order alternating: neither payload always goes first
            pair = (("plugin", plugin), ("own", own))
            for name, part in pair if k % 2 == 0 else pair[::-1]:
                ms, ids = ask(part)
                times[name].append(ms)
                answers[name] = ids
        if whole and answers["plugin"] != answers["own"]:
            raise SystemExit(f"image {image.size}: nothing dropped, yet the plugin answered differently from vLLM")
        all_plugin += times["plugin"]
        all_own += times["own"]
        paired = [a / b for a, b in zip(times["plugin"], times["own"])]
        all_paired += paired
        per_image.append(
            {
                "size": list(image.size),
                "rows": rows.num_rows,
                "rows_uncompressed": rows.num_patches,
                "own_grid": list(grid),
                "plugin_ms_median": statistics.median(times["plugin"]),
                "own_ms_median": statistics.median(times["own"]),
                "plugin_ms_quartiles": _quartiles(times["plugin"]),
                "own_ms_quartiles": _quartiles(times["own"]),
                "ratio": statistics.median(times["plugin"]) / statistics.median(times["own"]),
                "paired_ratio_median": statistics.median(paired),
                "same_answer": answers["plugin"] == answers["own"],
            }
        )
    result = {
        "what": "time per chat request, vLLM with apet_trt.vllm_plugin: the rows with their M-RoPE ids "
        "(plugin) vs the same rows with a grid (vLLM's own Qwen2.5-VL path), same server",
        "engine": str(args.engine),
        "apet": pipe.manifest.apet,
        "vllm_version": version,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0]},
        "images": per_image,
        "plugin_ms_median": statistics.median(all_plugin),
        "own_ms_median": statistics.median(all_own),
        "ratio": statistics.median(all_plugin) / statistics.median(all_own),
        # each request's time over its pair partner's (sent right before or after): robust to slow drift
        "paired_ratio_median": statistics.median(all_paired),
        "paired_ratio_quartiles": _quartiles(all_paired),
        "load_average_1min": _load(),
    }
    print(json.dumps(result, indent=2))
    print(
        f"plugin / vLLM's own path, time per request: ratio of medians {result['ratio']:.3f}, median of paired "
        f"ratios {result['paired_ratio_median']:.3f} (quartiles {result['paired_ratio_quartiles']})"
    )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _quartiles(values: list[float]) -> list[float]:
    return [round(float(q), 4) for q in np.quantile(values, [0.25, 0.5, 0.75])]


def _load() -> float | None:
    try:
        return round(float(Path("/proc/loadavg").read_text().split()[0]), 2)
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    sys.exit(main())
