"""The whole request, as a user runs it: `Pipeline.generate` (image or video file -> the family's preprocess ->
vision -> prompt assembly -> prefill -> new tokens) of the pipelines `runtime.load` makes from the
two engine directories with the benchmark's vision backend and decoder, compressed vs baseline,
interleaved. The per-stage medians are the pipeline's own timings of the timed calls."""

from __future__ import annotations

from .config import BenchConfig, log
from .measure import Memory, measure_stages


def bench_request(cfg: BenchConfig, pipes: dict, rows, model_info: dict, memory: Memory) -> dict:
    """pipes: {"compressed", "baseline"} Pipelines whose vision backend made `rows` (MediaRows)."""
    import torch

    if cfg.request_backend not in ("auto", rows.backend):
        raise RuntimeError(f"--request-backend {cfg.request_backend} could not be opened (see the vision section)")
    kind, path = cfg.media
    media, prompts = {f"{kind}s": [path] * cfg.batch}, [cfg.prompt] * cfg.batch  # images= or videos=
    kept: dict[str, int] = {}

    def call(variant):
        def run():
            [r, *_] = pipes[variant].generate(prompts=prompts, max_new_tokens=cfg.new_tokens, **media)
            kept[variant] = r.num_kept
            s = {k: r.timings[f"{k}_ms"] / 1e3 for k in ("preprocess", "vision", "first_token", "decode", "total")}
            return {**s, "ttft": s["preprocess"] + s["vision"] + s["first_token"]}

        return run

    on_cuda = rows.backend != "onnxruntime_cpu" or next(pipes["compressed"].decoder.model.parameters()).is_cuda
    sync = torch.cuda.synchronize if on_cuda and torch.cuda.is_available() else None
    log(f"request: {rows.backend} vision + decoder, T={rows.t} vs N={rows.n} rows, {cfg.new_tokens} new tokens")
    timed = measure_stages(
        {k: call(k) for k in pipes}, repeats=cfg.repeats, warmup=cfg.warmup, sync=sync, desc="request"
    )
    variants = {}
    for k, pipe in pipes.items():
        t = timed[k]
        variants[k] = {
            "engine": str(pipe.manifest.root),
            "T": kept[k],
            "prompt_tokens": int(pipe.assembler(cfg.prompt, [kept[k]], 0, [kind]).input_ids.numel()),
            "timing": t["call"],
            "stages_median_s": {
                "preprocess": t["preprocess"]["median_s"],
                "vision": t["vision"]["median_s"],
                "prefill": t["first_token"]["median_s"],
                "decode": t["decode"]["median_s"],
                "ttft": t["ttft"]["median_s"],
                "total": t["total"]["median_s"],
            },
            "memory": memory.measure(call(k), cuda=sync is not None),
        }
    c, b = variants["compressed"], variants["baseline"]
    return {
        "status": "ok",
        "vision_backend": rows.backend,
        "clock": "wall" + (" + cuda synchronize" if sync is not None else ""),
        "media": path,
        "prompt": cfg.prompt,
        "batch": cfg.batch,
        "new_tokens": cfg.new_tokens,
        "decoder_model": model_info,
        "variants": variants,
        "ratio_compressed_over_baseline": c["timing"]["median_s"] / b["timing"]["median_s"],
        "ttft_ratio_compressed_over_baseline": c["stages_median_s"]["ttft"] / b["stages_median_s"]["ttft"],
    }
