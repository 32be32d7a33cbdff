"""Benchmark the ApET op alone: the oracle (literal, eager, per image - the shape of the authors'
code path) vs ApetCompressor eager vs ApetCompressor in ONNX Runtime, measured interleaved in one
process. Prints a table with ratios against the oracle and writes JSON.

    python scripts/bench_ops.py                       # N=576 D=1024 T=64 k=10, B in 1 4 8
    python scripts/bench_ops.py --batch 1 --repeats 5 --json bench_out/ops.json

JSON schema: {"config": {...}, "machine": {...}, "results": [{"batch": B, "timings": {name:
{"median_s", "p90_s", "min_s", "repeats"}}, "ratios_vs_oracle": {name: oracle_median /
median}}], "agreement": {"batch": B, "positions_equal": bool}}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file: python scripts/bench_ops.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apet_ops import ApetCompressor, ApetConfig, compress_reference, export_compressor_onnx
from scripts.timing import machine_info, measure_interleaved


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=576, help="N")
    p.add_argument("--dim", type=int, default=1024, help="D")
    p.add_argument("--keep", type=int, default=64, help="T")
    p.add_argument("--basis", type=int, default=10, help="k")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path("bench_out/bench_ops.json"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    import onnxruntime as ort

    args = parse_args(argv)
    config = ApetConfig(keep=args.keep, basis=args.basis)
    compressor = ApetCompressor(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_compressor_onnx(config, Path(tmp) / "apet.onnx", num_tokens=args.tokens,
                                      dim=args.dim, max_batch=max(args.batch))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    results, agreement = [], []
    for batch in args.batch:
        x = torch.randn(batch, args.tokens, args.dim)
        feed = {"features": x.numpy()}
        ref_pos = compress_reference(x, config)[1]
        with torch.inference_mode():
            eager_pos = compressor(x)[1]
        agreement.append({"batch": batch,
                          "positions_equal_eager": bool(torch.equal(ref_pos, eager_pos)),
                          "positions_equal_onnxruntime": bool((session.run(None, feed)[1] == ref_pos.numpy()).all())})

        def run_eager():
            with torch.inference_mode():
                compressor(x)

        timings = measure_interleaved(
            {"oracle_eager": lambda: compress_reference(x, config),
             "graph_eager": run_eager,
             "graph_onnxruntime": lambda: session.run(None, feed)},
            repeats=args.repeats, warmup=args.warmup, desc=f"B={batch}")
        base = timings["oracle_eager"]["median_s"]
        ratios = {name: base / t["median_s"] for name, t in timings.items()}
        results.append({"batch": batch, "timings": timings, "ratios_vs_oracle": ratios})

    print(f"ApET op, N={args.tokens} D={args.dim} T={args.keep} k={args.basis}, "
          f"median of {args.repeats} interleaved runs (ms); speed-up = oracle / candidate")
    print("| B | oracle eager | graph eager | graph ONNX Runtime | eager speed-up | ORT speed-up |")
    print("|---|---|---|---|---|---|")
    for r in results:
        t, q = r["timings"], r["ratios_vs_oracle"]
        print(f"| {r['batch']} | {1e3 * t['oracle_eager']['median_s']:.1f} | {1e3 * t['graph_eager']['median_s']:.1f} "
              f"| {1e3 * t['graph_onnxruntime']['median_s']:.1f} | {q['graph_eager']:.1f}x | {q['graph_onnxruntime']:.1f}x |")
    for a in agreement:
        print(f"B={a['batch']}: kept positions equal to the oracle's - eager {a['positions_equal_eager']}, "
              f"ONNX Runtime {a['positions_equal_onnxruntime']}")
    out = {"config": {"tokens": args.tokens, "dim": args.dim, **config.to_dict()},
           "machine": machine_info(), "results": results, "agreement": agreement}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
