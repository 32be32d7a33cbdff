"""Benchmark the ApET op alone: the oracle (literal, eager, per image - the shape of the authors'
code path) vs ApetCompressor eager vs ApetCompressor in ONNX Runtime, measured interleaved in one
process; where a GPU is present, also ApetCompressor eager on CUDA and ONNX Runtime's CUDA provider
(timed with CUDA events). Prints a table with ratios against the oracle and writes JSON.

    python scripts/bench_ops.py                       # N=576 D=1024 T=64 k=10, B in 1 4 8
    python scripts/bench_ops.py --batch 1 --repeats 5 --json bench_out/ops.json

JSON schema: {"config": {...}, "machine": {...}, "results": [{"batch": B, "timings": {name:
{"median_s", "p90_s", "min_s", "repeats"}}, "ratios_vs_oracle": {name: oracle_median /
median}, "unavailable": {name: reason}}], "agreement": [{"batch": B, "positions_equal_<name>": bool}]}.
`apet bench` (scripts/bench/op.py) calls `measure_op` for its "op" section.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from apet_trt.apet_ops import ApetCompressor, ApetConfig, compress_reference, export_compressor_onnx
from apet_trt.scripts.bench.measure import machine_info, measure_interleaved

# (name, device) in the order they are reported; the first is the reference for ratios
OP_CANDIDATES = (
    ("oracle_eager", "cpu"),
    ("graph_eager", "cpu"),
    ("graph_onnxruntime", "cpu"),
    ("graph_eager_cuda", "cuda"),
    ("graph_onnxruntime_cuda", "cuda"),
)


def _ort_session(path: Path, cuda: bool):
    """-> (session, None) or (None, why not)."""
    import onnxruntime as ort

    if not cuda:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, (
            f"ONNX Runtime offers no CUDAExecutionProvider (providers: {ort.get_available_providers()}; "
            "pip install apet-trt[gpu])"
        )
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return None, f"ONNX Runtime could not start the CUDA provider (session providers: {session.get_providers()})"
    return session, None


def measure_op(
    config: ApetConfig,
    *,
    tokens: int,
    dim: int,
    batch: int,
    repeats: int,
    warmup: int,
    onnx_path: Path,
    seed: int = 0,
    desc: str | None = None,
) -> list[dict]:
    """Time every candidate of OP_CANDIDATES on one random batch [batch, tokens, dim], interleaved.
    -> one entry per candidate: {"name", "device", "available", "reason", "clock", "timing",
    "ratio_vs_oracle", "positions_equal_oracle"}; unavailable ones have a reason and null numbers."""
    x = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(seed))
    feed = {"features": x.numpy()}
    ref_pos = compress_reference(x, config)[1]
    compressor = ApetCompressor(config).eval()
    calls, positions, reasons = {}, {}, {}

    def eager(module, inp):
        def call():
            with torch.inference_mode():
                return module(inp)[1]

        return call

    calls["oracle_eager"] = lambda: compress_reference(x, config)[1]
    calls["graph_eager"] = eager(compressor, x)
    session, _ = _ort_session(onnx_path, cuda=False)
    calls["graph_onnxruntime"] = lambda: session.run(None, feed)[1]
    if torch.cuda.is_available():
        x_cuda, comp_cuda = x.cuda(), ApetCompressor(config).eval().cuda()
        calls["graph_eager_cuda"] = eager(comp_cuda, x_cuda)
        cuda_session, why = _ort_session(onnx_path, cuda=True)
        if cuda_session is None:
            reasons["graph_onnxruntime_cuda"] = why
        else:
            calls["graph_onnxruntime_cuda"] = lambda: cuda_session.run(None, feed)[1]
    else:
        reasons["graph_eager_cuda"] = reasons["graph_onnxruntime_cuda"] = "no CUDA GPU is visible to torch"
    for name, call in calls.items():
        pos = call()
        positions[name] = torch.as_tensor(pos).cpu().to(torch.int64)
    cuda_names = [n for n, dev in OP_CANDIDATES if dev == "cuda" and n in calls]
    timings = measure_interleaved(
        calls, repeats=repeats, warmup=warmup, cuda_events=cuda_names, desc=desc or f"op B={batch}"
    )
    base = timings["oracle_eager"]["median_s"]
    out = []
    for name, device in OP_CANDIDATES:
        available = name in calls
        out.append(
            {
                "name": name,
                "device": device,
                "available": available,
                "reason": None if available else f"not available: {reasons[name]}",
                "clock": ("cuda_events" if name in cuda_names else "wall") if available else None,
                "timing": timings.get(name),
                "ratio_vs_oracle": base / timings[name]["median_s"] if available else None,
                "positions_equal_oracle": bool(torch.equal(positions[name], ref_pos)) if available else None,
            }
        )
    return out


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
    args = parse_args(argv)
    config = ApetConfig(keep=args.keep, basis=args.basis)
    results, agreement = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = export_compressor_onnx(
            config, Path(tmp) / "apet.onnx", num_tokens=args.tokens, dim=args.dim, max_batch=max(args.batch)
        )
        for batch in args.batch:
            entries = measure_op(
                config,
                tokens=args.tokens,
                dim=args.dim,
                batch=batch,
                repeats=args.repeats,
                warmup=args.warmup,
                onnx_path=path,
                desc=f"B={batch}",
            )
            ok = [e for e in entries if e["available"]]
            results.append(
                {
                    "batch": batch,
                    "timings": {e["name"]: e["timing"] for e in ok},
                    "ratios_vs_oracle": {e["name"]: e["ratio_vs_oracle"] for e in ok},
                    "unavailable": {e["name"]: e["reason"] for e in entries if not e["available"]},
                }
            )
            agreement.append(
                {
                    "batch": batch,
                    **{
                        f"positions_equal_{e['name'].removeprefix('graph_')}": e["positions_equal_oracle"]
                        for e in ok
                        if e["name"] != "oracle_eager"
                    },
                }
            )

    names = [n for n, _ in OP_CANDIDATES if n in results[0]["timings"]]
    print(
        f"ApET op, N={args.tokens} D={args.dim} T={args.keep} k={args.basis}, "
        f"median of {args.repeats} interleaved runs (ms); speed-up = oracle / candidate"
    )
    print(
        "| B | "
        + " | ".join(n.replace("_", " ") for n in names)
        + " | "
        + " | ".join(f"{n.replace('_', ' ')} speed-up" for n in names[1:])
        + " |"
    )
    print("|---" * (2 * len(names)) + "|")
    for r in results:
        t, q = r["timings"], r["ratios_vs_oracle"]
        print(
            f"| {r['batch']} | "
            + " | ".join(f"{1e3 * t[n]['median_s']:.1f}" for n in names)
            + " | "
            + " | ".join(f"{q[n]:.1f}x" for n in names[1:])
            + " |"
        )
    for a in agreement:
        print(
            f"B={a['batch']}: kept positions equal to the oracle's - "
            + ", ".join(f"{k.removeprefix('positions_equal_')} {v}" for k, v in a.items() if k != "batch")
        )
    for name, why in results[0]["unavailable"].items():
        print(f"{name}: {why}")
    out = {
        "config": {"tokens": args.tokens, "dim": args.dim, **config.to_dict()},
        "machine": machine_info(),
        "results": results,
        "agreement": agreement,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
