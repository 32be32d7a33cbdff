"""Benchmark the ApET op alone: the oracle (literal, eager, per image - the shape of the authors'
code path) vs ApetCompressor eager vs ApetCompressor in ONNX Runtime, measured interleaved in one
process; where a GPU is present, also ApetCompressor eager on CUDA and ONNX Runtime's CUDA provider
(timed with CUDA events). Prints a table with ratios against the oracle and writes JSON.

    python scripts/bench_ops.py                       # N=576 D=1024 T=64 k=10, B in 1 4 8
    python scripts/bench_ops.py --batch 1 --repeats 5 --json bench_out/ops.json

Two more modes for the graph form alone:

    python scripts/bench_ops.py --mode memory   # peak RSS over the baseline, N=8192 D=3584 R=0.3
                                                # (Qwen2.5-VL-7B's merged width), eager and ORT
    python scripts/bench_ops.py --mode eager    # eager PyTorch time at N in 96 288 576 2880,
                                                # D=4096, T=N/3, error-rank seeds (stage 2 in the LLM)

Run the memory mode alone on a shared machine (`flock /tmp/apet-heavy.lock ...`): each
measurement is a fresh process, whose peak resident set (VmHWM, reset after the input is built
and a small warm-up call) is compared with its resident set just before the call.

JSON schema (op mode): {"config": {...}, "machine": {...}, "results": [{"batch": B, "timings": {name:
{"median_s", "p90_s", "min_s", "repeats"}}, "ratios_vs_oracle": {name: oracle_median /
median}, "unavailable": {name: reason}}], "agreement": [{"batch": B, "positions_equal_<name>": bool}]}.
Memory mode: {"config", "machine", "memory": [{"backend", "tokens", "dim", "keep", "baseline_mib",
"peak_mib", "extra_mib", "seconds"}]}. Eager mode: {"config", "machine", "eager": [{"tokens", "dim",
"keep", "dtype", "timing"}]}.
`apet bench` (scripts/bench/op.py) calls `measure_op` for its "op" section.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
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


# ----------------------------------------------------------------------------------------------
# Memory: peak resident set of one call, in a fresh process


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_child(config_dict: dict, tokens: int, dim: int, backend: str, onnx_path: str | None, queue) -> None:
    try:
        config = ApetConfig.from_dict(config_dict)
        x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(0))
        small = torch.randn(1, config.min_tokens + 8, dim)
        if backend == "eager":
            compressor = ApetCompressor(config).eval()

            def call(inp):
                with torch.inference_mode():
                    return compressor(inp)
        else:
            import onnxruntime as ort

            session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])

            def call(inp):
                return session.run(None, {"features": inp.numpy()})

        call(small)  # lazy initialisation is not the op's memory
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set (Linux >= 4.0)
        baseline = _proc_status_mib("VmRSS")
        t0 = time.perf_counter()
        call(x)
        seconds = time.perf_counter() - t0
        peak = _proc_status_mib("VmHWM")
        queue.put({"baseline_mib": baseline, "peak_mib": peak, "extra_mib": peak - baseline, "seconds": seconds})
    except Exception as exc:  # reported by the parent, one line
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_peak_memory(config: ApetConfig, *, tokens: int, dim: int, backend: str = "eager") -> dict:
    """Peak resident memory of the graph form on one image [1, tokens, dim], over the process's
    resident set just before the call (input, weights-free module and a warm-up call included in
    the baseline). backend "eager" (ApetCompressor) or "onnxruntime" (the exported graph, dynamic N).
    -> {"backend", "tokens", "dim", "keep", "baseline_mib", "peak_mib", "extra_mib", "seconds"}."""
    if backend not in ("eager", "onnxruntime"):
        raise ValueError(f"backend must be 'eager' or 'onnxruntime', got {backend!r}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = None
        if backend == "onnxruntime":
            onnx_path = str(
                export_compressor_onnx(
                    config, Path(tmp) / "apet.onnx", num_tokens=config.min_tokens + 8, dim=dim, dynamic_tokens=True
                )
            )
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_peak_child, args=(config.to_dict(), tokens, dim, backend, onnx_path, queue))
        child.start()
        result = queue.get()
        child.join()
    if "error" in result:
        raise RuntimeError(f"memory measurement ({backend}) failed: {result['error']}")
    return {"backend": backend, "tokens": tokens, "dim": dim, "keep": config.keep_for(tokens), **result}


# ----------------------------------------------------------------------------------------------
# Eager speed of the graph form (how a decoder calls it for stage 2)


def measure_eager(config: ApetConfig, *, tokens: int, dim: int, dtype: torch.dtype, repeats: int, warmup: int) -> dict:
    """Median time of ApetCompressor eager (inference mode) on one image [1, tokens, dim] of dtype,
    with a [1] start tensor as a decoder passes it. -> {"tokens", "dim", "keep", "dtype", "timing"}."""
    x = torch.randn(1, tokens, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    start = torch.tensor([tokens // 2])
    compressor = ApetCompressor(config).eval()

    def call():
        with torch.inference_mode():
            return compressor(x, start)

    timing = measure_interleaved({"eager": call}, repeats=repeats, warmup=warmup, desc=f"eager N={tokens}")["eager"]
    return {"tokens": tokens, "dim": dim, "keep": config.keep_for(tokens), "dtype": str(dtype), "timing": timing}


# ----------------------------------------------------------------------------------------------
# Command line

MODE_DEFAULTS = {  # mode -> defaults for the shape arguments left out
    "op": {"tokens": [576], "dim": 1024, "keep": 64},
    "memory": {"tokens": [8192], "dim": 3584, "keep_ratio": 0.3},
    "eager": {"tokens": [96, 288, 576, 2880], "dim": 4096},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=sorted(MODE_DEFAULTS), default="op", help="what to measure (see the module doc)")
    p.add_argument("--tokens", type=int, nargs="+", help="N (op mode: one value)")
    p.add_argument("--dim", type=int, help="D")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, help="T, fixed (eager mode default: N // 3)")
    budget.add_argument("--keep-ratio", type=float, help="R: T = floor(R * N)")
    p.add_argument("--basis", type=int, default=10, help="k")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="op mode")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", type=Path, help="default bench_out/bench_ops[_<mode>].json")
    args = p.parse_args(argv)
    defaults = MODE_DEFAULTS[args.mode]
    if args.keep is None and args.keep_ratio is None:
        args.keep, args.keep_ratio = defaults.get("keep"), defaults.get("keep_ratio")
    args.tokens = args.tokens or defaults["tokens"]
    args.dim = args.dim or defaults["dim"]
    if args.mode == "op" and len(args.tokens) != 1:
        p.error("--tokens takes one value in op mode")
    suffix = "" if args.mode == "op" else f"_{args.mode}"
    args.json = args.json or Path(f"bench_out/bench_ops{suffix}.json")
    return args


def _write(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


def main_memory(args) -> int:
    config = ApetConfig(keep=args.keep, keep_ratio=args.keep_ratio, basis=args.basis)
    rows = [
        measure_peak_memory(config, tokens=n, dim=args.dim, backend=backend)
        for n in args.tokens
        for backend in ("eager", "onnxruntime")
    ]
    print(f"ApET graph form, one image, {config.to_dict()}: peak resident memory over the baseline")
    print("| backend | N | D | T | extra MiB | baseline MiB | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['tokens']} | {r['dim']} | {r['keep']} | {r['extra_mib']:.0f} | "
            f"{r['baseline_mib']:.0f} | {r['seconds']:.1f} |"
        )
    _write(args.json, {"config": config.to_dict(), "machine": machine_info(), "memory": rows})
    return 0


def main_eager(args) -> int:
    rows = []
    for n in args.tokens:
        keep = args.keep if args.keep is not None or args.keep_ratio is not None else n // 3
        config = ApetConfig(keep=keep, keep_ratio=args.keep_ratio, basis=args.basis, seed_placement="error_rank")
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(
                measure_eager(config, tokens=n, dim=args.dim, dtype=dtype, repeats=args.repeats, warmup=args.warmup)
            )
    print(f"ApET graph form, eager PyTorch ({torch.get_num_threads()} threads), one image, error-rank seeds")
    print("| N | D | T | input dtype | median ms | p90 ms | min ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["timing"]
        print(
            f"| {r['tokens']} | {r['dim']} | {r['keep']} | {r['dtype'].removeprefix('torch.')} | "
            f"{1e3 * t['median_s']:.1f} | {1e3 * t['p90_s']:.1f} | {1e3 * t['min_s']:.1f} |"
        )
    _write(args.json, {"config": {"basis": args.basis}, "machine": machine_info(), "eager": rows})
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "memory":
        return main_memory(args)
    if args.mode == "eager":
        return main_eager(args)
    args.tokens = args.tokens[0]
    config = ApetConfig(keep=args.keep, keep_ratio=args.keep_ratio, basis=args.basis)
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
        f"ApET op, N={args.tokens} D={args.dim} T={config.keep_for(args.tokens)} k={args.basis}, "
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
    _write(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
