"""`apet bench` on the command line: the subcommand's options -> BenchConfig -> run_bench; exit
status 1 when a section failed (its "status" says why), 2 for bad arguments (one line, scripts/cli.py)."""

from __future__ import annotations

import argparse

from .config import DEFAULT_IMAGE, DEFAULT_PROMPT, SECTIONS, VISION_BACKENDS, BenchConfig, int_list, log, name_list


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="latency per stage, compressed vs uncompressed (JSON, markdown, plot)",
        description="Measure, interleaved in one process, the vision stage with and without ApET per "
        "backend, the ApET op alone, the decoder's prefill/TTFT and decode at several T "
        "with the KV-cache bytes, and the whole request; writes bench.json (schema: "
        "docs/BENCH.md), bench.md and bench.png under --out.",
    )
    src = p.add_argument_group("engines (give --engine, or --model to build both)")
    src.add_argument("--engine", help="compressed engine directory (apet build --keep T)")
    src.add_argument(
        "--baseline",
        help="uncompressed engine directory (apet build --no-apet); built into the "
        "cache from the engine's model when omitted",
    )
    src.add_argument("--model", help="preset or checkpoint path: build (or reuse) both engine dirs in --cache-dir")
    src.add_argument("--keep", type=int, default=64, help="T for --model (default 64)")
    src.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        help="--model: T = floor(R * N) per image instead of --keep (Qwen2.5-VL's official budget: 0.3)",
    )
    src.add_argument("--basis", type=int, default=10, help="k for --model (default 10)")
    src.add_argument(
        "--budget",
        type=int,
        default=None,
        help="--model: build the compressed engine with apet build --budget B (the paper's 64|128|192: ApET in "
        "the vision stage and again inside the LLM); its LLM stage is measured beside the T points",
    )
    src.add_argument("--fp16", action="store_true", help="--model: tower and projector in fp16 (ONNX and plan)")
    src.add_argument("--cache-dir", default=None, help="where --model builds engine dirs (default OUT/engines)")
    m = p.add_argument_group("measurement")
    m.add_argument(
        "--tokens",
        default=None,
        help="decoder T values, comma-separated (default N,192,128,64; the medium's N and T are always included)",
    )
    m.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 10; --quick 2)")
    m.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick 1)")
    m.add_argument("--batch", type=int, default=1, help="images / videos (and requests) per call (default 1)")
    m.add_argument(
        "--decoder-layers",
        type=int,
        default=None,
        help="decoder layers to run (default: all on a GPU, 2 on a CPU; stated in the output)",
    )
    m.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated per request / decode run (default 16; --quick 2)"
    )
    m.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="non-visual prompt tokens for the decoder section (default: the prompt's own)",
    )
    m.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"request prompt (default {DEFAULT_PROMPT!r})")
    m.add_argument("--image", default=DEFAULT_IMAGE, help="the bench image (default assets/grace_hopper.jpg)")
    m.add_argument(
        "--video",
        default=None,
        help="a bench video instead of the image, for families that take videos (e.g. assets/big_buck_bunny.mp4)",
    )
    m.add_argument(
        "--backends",
        default=None,
        help=f"vision backends to try, comma-separated (default all: {','.join(VISION_BACKENDS)})",
    )
    m.add_argument(
        "--request-backend",
        default="auto",
        help="vision backend of the whole-request section (default auto: the first available of "
        f"{','.join(VISION_BACKENDS)})",
    )
    m.add_argument("--device", default="auto", help="decoder device: auto, cpu, cuda (default auto)")
    m.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 1 warm-up, 2 new tokens")
    for s in SECTIONS:
        m.add_argument(f"--skip-{s}", action="store_true", help=f"skip the {s} section")
    p.add_argument("--out", default="bench_out", help="output directory for bench.json, bench.md, bench.png")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        engine=args.engine,
        baseline=args.baseline,
        model=args.model,
        keep=args.keep,
        keep_ratio=args.keep_ratio,
        budget=args.budget,
        basis=args.basis,
        fp16=args.fp16,
        cache_dir=args.cache_dir,
        tokens=int_list(args.tokens, "--tokens"),
        repeats=args.repeats,
        warmup=args.warmup,
        batch=args.batch,
        decoder_layers=args.decoder_layers,
        new_tokens=args.new_tokens,
        text_tokens=args.text_tokens,
        prompt=args.prompt,
        image=args.image,
        video=args.video,
        backends=name_list(args.backends),
        request_backend=args.request_backend,
        device=args.device,
        out=args.out,
        skip_vision=args.skip_vision,
        skip_op=args.skip_op,
        skip_decoder=args.skip_decoder,
        skip_request=args.skip_request,
        quick=args.quick,
    )


def run(args: argparse.Namespace) -> int:
    from .run import run_bench

    report = run_bench(config_from_args(args))
    failed = [s for s in SECTIONS if str(report[s].get("status", "")).startswith("failed")]
    if failed:
        log(f"section(s) failed: {', '.join(failed)} (see 'status' in {report['outputs']['json']})")
        return 1
    return 0
