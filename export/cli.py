"""`apet build`: see export/build.py."""

from __future__ import annotations

import argparse

from .presets import preset_names


def register(sub) -> None:
    p = sub.add_parser(
        "build",
        help="checkpoint or preset -> engine directory (ONNX, TensorRT, manifest)",
        description="Export vision tower + ApET + projector to ONNX, build TensorRT / TensorRT-LLM "
        "engines where installed, and write one engine directory with a manifest.",
    )
    p.add_argument(
        "--model", required=True, help=f"local checkpoint directory or a preset: {', '.join(preset_names())}"
    )
    p.add_argument("--out", required=True, help="engine directory to write, e.g. engines/NAME")
    p.add_argument("--keep", type=int, default=None, help="T, visual tokens kept per image (omit: no compression)")
    p.add_argument("--basis", type=int, default=10, help="k, FPS basis tokens (default 10)")
    p.add_argument("--no-merge", action="store_true", help="drop tokens instead of merging them")
    p.add_argument("--start", type=int, default=0, help="index of the first FPS seed (default 0)")
    p.add_argument("--no-apet", action="store_true", help="build the uncompressed baseline (all N tokens)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines take (default 8)")
    p.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT optimises for (default 1)")
    p.add_argument(
        "--fp16",
        action="store_true",
        help="export tower and projector in float16 (the ONNX and so the TensorRT plan); ApET computes in float32",
    )
    p.add_argument("--no-tensorrt", action="store_true", help="skip the TensorRT plan even where tensorrt imports")
    p.add_argument("--no-tensorrt-llm", action="store_true", help="skip the TensorRT-LLM decoder engine")
    p.add_argument("--force", action="store_true", help="replace an existing engine directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build

    build(
        BuildConfig(
            model=args.model,
            out=args.out,
            keep=args.keep,
            basis=args.basis,
            merge=not args.no_merge,
            start=args.start,
            no_apet=args.no_apet,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            fp16=args.fp16,
            force=args.force,
            tensorrt=not args.no_tensorrt,
            tensorrt_llm=not args.no_tensorrt_llm,
        )
    )
    return 0
