"""Peak memory of a Qwen2.5-VL vision engine on ONNX Runtime CPU, against the image's tokens: the
measurements behind export/models/qwen2_5_vl.py's memory model (docs/LIMITS.md).

    python scripts/qwen_vision_memory.py --tokens 256 625 1296 2500 [--chunk 1024]
        [--width 32 --heads 2] [--out bench_out/qwen_memory.json]
    python scripts/qwen_vision_memory.py --fit A.json B.json ...   # the model's constants
    python scripts/qwen_vision_memory.py --compare-times --tokens 625 1296 2500 [--repeat 5]

Builds the tiny-qwen2.5-vl preset (or the same with another vision width / head count) as a
--no-apet engine whose --max-pixels holds the largest token count, then per token count N runs one
square image of N tokens (side 28 * sqrt(N) px, random pixels) through `apet encode`'s path
(runtime.load with the vision-only decoder, the ONNX Runtime backend) in a fresh process, and records
that process's RSS after imports (base), after loading (loaded), its peak during the calls (VmHWM,
reset after loading through /proc/self/clear_refs, so the loading's own transient is not counted) and the
fastest of --repeat calls (2). The engine's own peak is peak - base. Nothing here is a test; it prints JSON.

--compare-times: both engines (whole and sliced attention) loaded in one process, their calls
alternating per token count (--repeat rounds), the fastest of each: on a shared machine the two
see the same load.

--fit: least squares (of relative errors) of the engine peaks less the float32 weights over
[1, patches, patches * width, heads * queries * patches] (one image per call; queries = patches or the
chunk where smaller) -> MEMORY_FIXED, MEMORY_PER_PATCH, MEMORY_PER_PATCH_WIDTH, MEMORY_PER_SCORE of
export/models/qwen2_5_vl.py, and each measurement against the fitted model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, sys, time
import numpy as np
from PIL import Image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

from apet_trt import runtime
from apet_trt.runtime.serve.vision_only import VisionOnlyDecoder
engine, side, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28 * side, 28 * side, 3), dtype=np.uint8))
base = status("VmRSS")
pipe = runtime.load(engine, backend="onnxruntime", decoder=VisionOnlyDecoder.for_manifest)
loaded = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: the calls' own peak from here
times = []
for _ in range(repeat):
    t = time.perf_counter()
    [rows] = pipe.encode(image)
    times.append(time.perf_counter() - t)
peak = status("VmHWM")
print(json.dumps({"tokens": rows.num_patches, "base": base, "loaded": loaded, "peak": peak, "seconds": min(times)}))
"""


def build_engine(out: Path, max_tokens: int, width: int, heads: int, chunk: int | None) -> dict:
    from apet_trt.export import presets
    from apet_trt.export.build import BuildConfig, build
    from apet_trt.export.models import qwen2_5_vl

    base = presets.get_preset("tiny-qwen2.5-vl")
    name = f"measure-qwen-{width}x{heads}"
    vision = {**base.fields["vision"], "hidden_size": width, "num_heads": heads, "intermediate_size": 2 * width}
    presets.PRESETS[name] = dataclasses.replace(base, name=name, fields={**base.fields, "vision": vision})
    qwen2_5_vl.ATTENTION_CHUNK = chunk
    build(
        BuildConfig(
            model=name,
            out=str(out),
            no_apet=True,
            max_batch=1,
            min_pixels=28 * 28,
            max_pixels=28 * 28 * max_tokens,
            max_memory_gib=1e9,  # measuring: no budget
            tensorrt=False,
            tensorrt_llm=False,
        ),
        quiet=True,
    )
    return vision


def weight_bytes(vision: dict) -> int:
    import torch
    from transformers import Qwen2_5_VLConfig

    from apet_trt.export.models.qwen2_5_vl import VisionParts

    with torch.device("meta"):
        parts = VisionParts.from_config(Qwen2_5_VLConfig(vision_config=vision))
    return 4 * sum(p.numel() for p in parts.parameters())


def fit(paths: list[str]) -> dict:
    import numpy as np

    rows, ys, names = [], [], []
    for path in paths:
        data = json.loads(Path(path).read_text())
        v, chunk, weights = data["vision"], data["chunk"], weight_bytes(data["vision"])
        for r in data["rows"]:
            patches = 4 * r["tokens"]
            queries = patches if chunk is None else min(chunk, patches)
            rows.append([1.0, patches, patches * v["hidden_size"], v["num_heads"] * queries * patches])
            ys.append(r["engine_peak"] - weights)
            names.append((Path(path).stem, r["tokens"], r["engine_peak"]))
    a, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    scale = a.max(axis=0)
    # relative errors: each measurement's row and target divided by its target, so a 0.2 GiB point
    # counts as much as a 3 GiB one
    coef = np.linalg.lstsq(a / scale / y[:, None], np.ones_like(y), rcond=None)[0] / scale
    keys = ["MEMORY_FIXED", "MEMORY_PER_PATCH", "MEMORY_PER_PATCH_WIDTH", "MEMORY_PER_SCORE"]
    constants = dict(zip(keys, (float(c) for c in coef)))
    for (name, tokens, peak), row, target in zip(names, a, y):
        model = float(row @ coef) + (peak - target)
        print(
            f"{name:>12} N={tokens:>5}  measured {peak / 2**30:6.3f} GiB  model {model / 2**30:6.3f} GiB  "
            f"measured/model {peak / model:.2f}",
            file=sys.stderr,
        )
    return constants


def compare_times(tokens: list[int], repeat: int, width: int, heads: int, chunk: int) -> dict:
    import time

    import numpy as np
    from PIL import Image

    from apet_trt import runtime
    from apet_trt.runtime.serve.vision_only import VisionOnlyDecoder

    sides = [math.isqrt(n) for n in tokens]
    out = {"chunk": chunk, "rows": []}
    with tempfile.TemporaryDirectory(prefix="qwen-times-") as tmp:
        pipes = {}
        for name, c in (("whole", None), ("sliced", chunk)):
            build_engine(Path(tmp) / name, max(s * s for s in sides), width, heads, c)
            pipes[name] = runtime.load(Path(tmp) / name, backend="onnxruntime", decoder=VisionOnlyDecoder.for_manifest)
        for side in sides:
            pixels = np.random.default_rng(0).integers(0, 256, (28 * side, 28 * side, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            times = {name: [] for name in pipes}
            rows = {}
            for _ in range(repeat):
                for name, pipe in pipes.items():
                    t = time.perf_counter()
                    [rows[name]] = pipe.encode(image)
                    times[name].append(time.perf_counter() - t)
            diff = float((rows["whole"].embeddings - rows["sliced"].embeddings).abs().max())
            row = {"tokens": side * side, **{k: min(v) for k, v in times.items()}, "max_abs_diff": diff}
            out["rows"].append(row)
            print(
                f"N={side * side:>5}  whole {row['whole']:.2f} s  sliced {row['sliced']:.2f} s  |diff| {diff:.1e}",
                file=sys.stderr,
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 625, 1296, 2500])
    p.add_argument("--width", type=int, default=32, help="vision hidden size (tiny preset: 32)")
    p.add_argument("--heads", type=int, default=2, help="vision heads (tiny preset: 2)")
    p.add_argument("--chunk", type=int, default=None, help="queries per slice in full attention (default: none)")
    p.add_argument("--repeat", type=int, default=2, help="calls per image; the fastest is reported")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--compare-times", action="store_true", help="time whole against sliced attention instead")
    p.add_argument("--fit", nargs="+", metavar="JSON", help="fit the memory model to these measurements instead")
    args = p.parse_args()
    if args.fit:
        print(json.dumps(fit(args.fit), indent=1))
        return 0
    if args.compare_times:
        print(json.dumps(compare_times(args.tokens, args.repeat, args.width, args.heads, args.chunk or 1024), indent=1))
        return 0
    sides = [math.isqrt(n) for n in args.tokens]
    with tempfile.TemporaryDirectory(prefix="qwen-memory-") as tmp:
        engine = Path(tmp) / "engine"
        vision = build_engine(engine, max(s * s for s in sides), args.width, args.heads, args.chunk)
        rows = []
        for side in sides:
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(engine), str(side), str(args.repeat)],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-2000:])
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["engine_peak"] = row["peak"] - row["base"]
            rows.append(row)
            print(
                f"N={row['tokens']:>5}  engine peak {row['engine_peak'] / 2**30:6.3f} GiB  "
                f"(process {row['peak'] / 2**30:.3f})  {row['seconds']:.2f} s",
                file=sys.stderr,
            )
    result = {"vision": vision, "chunk": args.chunk, "rows": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
