"""The benchmark's driver: resolve the two engine directories, find the rows the bench medium gets
from each, run every section that is not skipped (a failing section is recorded and the others
still run), then write bench.json, bench.md and bench.png under --out."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from .config import DEFAULT_TOKENS, SCHEMA_VERSION, SECTIONS, BenchConfig, log
from .engines import engine_info, resolve_engines
from .measure import Memory, machine_info, process_peak_rss
from .report import headline, plot, render_markdown
from .vision import VisionPairs, media_rows


def machine() -> dict:
    """The machine and the versions that ran the benchmark."""
    import onnxruntime as ort
    import torch

    from apet_trt.apet_ops.probes import distribution_version, tensorrt_available

    trt_ok, trt_why = tensorrt_available()
    info = machine_info()
    info.update(
        {
            "cuda_available": bool(torch.cuda.is_available()),
            "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(),
            "transformers": distribution_version("transformers"),
            "tensorrt": distribution_version("tensorrt"),
            "tensorrt_usable": trt_ok,
            "tensorrt_reason": None if trt_ok else trt_why,
            "load_average_start": list(os.getloadavg()),
            "load_average_end": None,
        }
    )
    return info


def check_arguments(cfg: BenchConfig, pair) -> None:
    """The arguments that need the engines' manifests but no weights or hashing: the decoder's layer
    count against the engine's language model, and --tokens against N where the family knows the
    rows an image gets before it runs (`fixed_rows`, for an image; otherwise once the medium is encoded)."""
    from apet_trt.runtime.families import family_for

    from .decoder import LanguageModel

    if cfg.needs_decoder:
        lm = LanguageModel.for_engine(pair.compressed, layers=cfg.decoder_layers, device=cfg.device)
        if pair.compressed.llm_stage:
            from .decoder import stage_layer

            stage_layer(pair.compressed, lm)  # at least 2 layers run
    n = family_for(pair.baseline).fixed_rows
    if cfg.needs_rows and cfg.media[0] == "image" and n is not None:
        cfg.check_tokens(n)


def load_pipelines(pair, pairs, rows, decoders) -> dict:
    """`runtime.load` of both engine directories (verified already) with the vision backends that
    made the bench medium's rows and the benchmark's decoder (one for both, or {"compressed",
    "baseline"}: the same model, the compressed engine's running its LLM stage when it has one): the
    pipelines users get, so the decoder section assembles prompts and the request section runs
    requests the way they do."""
    from apet_trt import runtime

    if not isinstance(decoders, dict):
        decoders = {"compressed": decoders, "baseline": decoders}
    comp, base, _, _ = pairs.get(rows.backend)
    return {
        "compressed": runtime.load(pair.compressed.root, backend=comp, decoder=decoders["compressed"], verify=False),
        "baseline": runtime.load(pair.baseline.root, backend=base, decoder=decoders["baseline"], verify=False),
    }


def run_bench(cfg: BenchConfig) -> dict:
    """-> the report (the JSON object), also written with its markdown and plot under cfg.out."""
    import torch

    from .decoder import LanguageModel, bench_decoder, runtime_decoder, stage_decoder
    from .op import bench_op
    from .request import bench_request
    from .vision import bench_vision

    cfg.validate()
    command = cfg.to_command()  # as given, before defaults are resolved
    out_dir = Path(cfg.out)
    cfg.cache_dir = cfg.cache_dir or str(out_dir / "engines")
    started = time.perf_counter()
    machine_facts = machine()
    pair = resolve_engines(cfg, lambda pair: check_arguments(cfg, pair))
    pairs = VisionPairs(pair)

    # everything that can fail on the arguments, before anything is measured
    rows = media_rows(cfg, pair, pairs) if cfg.needs_rows else None
    tokens = []
    if rows is not None:
        cfg.check_tokens(rows.n)
        tokens = sorted(set(cfg.tokens or (rows.n, *DEFAULT_TOKENS)) | {rows.n, rows.t}, reverse=True)
        cfg.tokens = tokens = [t for t in tokens if t <= rows.n]
    lm = None
    if cfg.needs_decoder:
        from apet_trt.runtime.prompt import engine_prompting

        lm = LanguageModel.for_engine(pair.compressed, layers=cfg.decoder_layers, device=cfg.device)
        # the tokenizer is there, and the prompt assembles around the medium
        engine_prompting(pair.compressed)[1](cfg.prompt, [rows.t], 0, [rows.kind])
    out_dir.mkdir(parents=True, exist_ok=True)

    report: dict = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "config": None,
        "machine": machine_facts,
        "engines": {
            "compressed": engine_info(pair.compressed, pair.built.get("compressed", False)),
            "baseline": engine_info(pair.baseline, pair.built.get("baseline", False)),
        },
        "rows": None
        if rows is None
        else {"media": cfg.media[1], "kind": rows.kind, "backend": rows.backend, "T": rows.t, "N": rows.n},
        "headline": None,
        **{s: {"status": f"skipped: --skip-{s}"} for s in SECTIONS},
        "memory": None,
        "duration_s": None,
        "outputs": {
            "json": str(out_dir / "bench.json"),
            "markdown": str(out_dir / "bench.md"),
            "plot": str(out_dir / "bench.png"),
        },
    }
    memory = Memory(cuda=torch.cuda.is_available())

    def section(name, fn):
        if cfg.skipped(name):
            return
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the other sections still report; the exit status says it failed
            if os.environ.get("APET_DEBUG"):
                raise
            report[name] = {"status": f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}"}
            log(f"{name}: {report[name]['status']}")

    section("vision", lambda: bench_vision(cfg, pair, pairs, rows, memory))
    section("op", lambda: bench_op(cfg, pair, out_dir, None if rows is None else rows.n))
    if cfg.needs_decoder:
        model_info = lm.info()
        log(
            f"decoder model: {model_info['class']} from {model_info['config']}, {lm.layers} of {lm.full_layers} "
            f"layers, {model_info['dtype']} on {lm.device} (seeded random weights)"
        )
        model = lm.build()
        plain = runtime_decoder(model, pair.compressed, lm)
        staged = stage_decoder(model, pair.compressed, lm) if pair.compressed.llm_stage else None
        pipes = load_pipelines(pair, pairs, rows, {"compressed": staged or plain, "baseline": plain})
        section("decoder", lambda: bench_decoder(cfg, lm, pipes, rows, tokens, memory))
        section("request", lambda: bench_request(cfg, pipes, rows, model_info, memory))

    report["config"] = asdict(cfg)
    report["headline"] = headline(report)
    report["memory"] = {
        "process_peak_rss_bytes": process_peak_rss(),
        "cuda_peak_allocated_bytes": (
            max(memory.cuda_peak, int(torch.cuda.max_memory_allocated())) if torch.cuda.is_available() else None
        ),
    }
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["duration_s"] = time.perf_counter() - started

    markdown = render_markdown(report)
    Path(report["outputs"]["json"]).write_text(json.dumps(report, indent=2) + "\n")
    Path(report["outputs"]["markdown"]).write_text(markdown)
    plot(report, Path(report["outputs"]["plot"]))
    print(markdown)
    return report
