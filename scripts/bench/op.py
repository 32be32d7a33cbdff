"""The ApET op alone, on random features [batch, N, D] of one engine item (N and D the compressed
engine's: the tokens that enter the compressor and their width), with the engine's ApET config:
the oracle vs ApetCompressor eager vs ONNX Runtime (and their CUDA forms on a GPU), interleaved.
The candidates and their timing are scripts/bench_ops.py's `measure_op`."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .config import BenchConfig, log
from .engines import EnginePair


def bench_op(cfg: BenchConfig, pair: EnginePair, out_dir: Path, medium_n: int | None = None) -> dict:
    """`medium_n`: N for an engine whose tokens per item vary (Qwen2.5-VL: the bench image's)."""
    from apet_trt.apet_ops import ApetConfig, export_compressor_onnx
    from apet_trt.scripts.bench_ops import measure_op

    apet = ApetConfig.from_dict(pair.compressed.apet)
    n, d = pair.compressed.num_patches, int(pair.compressed.vision["feature_dim"])
    if n is None or pair.compressed.num_visual_tokens is None:  # N varies per image: the medium's
        n = medium_n
    if n is None:
        raise ValueError("the engine's N varies per image and no bench medium was encoded (--skip-vision etc.)")
    log(f"op: N={n} D={d} T={apet.keep_for(n)} k={apet.basis}, batch {cfg.batch}")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        path = export_compressor_onnx(apet, Path(tmp) / "apet.onnx", num_tokens=n, dim=d, max_batch=max(8, cfg.batch))
        candidates = measure_op(
            apet, tokens=n, dim=d, batch=cfg.batch, repeats=cfg.repeats, warmup=cfg.warmup, onnx_path=path, desc="op"
        )
    return {
        "status": "ok",
        "batch": cfg.batch,
        "N": n,
        "D": d,
        "apet": apet.to_dict(),
        "input": "random normal features",
        "candidates": candidates,
    }
