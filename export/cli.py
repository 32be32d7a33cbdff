"""`apet build`: see export/build.py."""

from __future__ import annotations

import argparse

from .models import FAMILIES, family_class
from .parity import IMAGE_ASPECTS, OFFICIAL_BUDGETS, RANDOM
from .presets import preset_names


def _start(text: str) -> int | str:
    if text == RANDOM:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an index or {RANDOM!r}, got {text!r}") from None


def _paper_budgets() -> str:
    """Each family's default budget, as its export adapter declares it (paper_budget_text)."""
    lines = [f"  {name:12s} {family_class(name).paper_budget_text}" for name in FAMILIES]
    return "with no budget option, each family's paper setting:\n" + "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser(
        "build",
        help="checkpoint or preset -> engine directory (ONNX, TensorRT, manifest)",
        description="Export vision tower + ApET + projector to ONNX, build TensorRT / TensorRT-LLM "
        "engines where installed, and write one engine directory with a manifest.",
        epilog=_paper_budgets() + "\n--no-apet builds the uncompressed baseline (docs/DEFAULTS.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help=f"local checkpoint directory or a preset: {', '.join(preset_names())}"
    )
    p.add_argument("--out", required=True, help="engine directory to write, e.g. engines/NAME")
    p.add_argument(
        "--keep",
        type=int,
        default=None,
        help="T, visual tokens kept per image (omit every budget option: the family's paper setting, below)",
    )
    p.add_argument(
        "--keep-ratio",
        type=float,
        default=None,
        metavar="R",
        help="instead of --keep: keep T = floor(R * N) of each image's N tokens (Qwen2.5-VL's official budget: 0.3)",
    )
    p.add_argument(
        "--seed-blend",
        type=float,
        default=None,
        metavar="W",
        help="a seed's weight in the slot it takes, W * seed + (1 - W) * slot (default: the family's; 1 overwrites)",
    )
    p.add_argument("--basis", type=int, default=10, help="k, FPS basis tokens (default 10)")
    p.add_argument("--no-merge", action="store_true", help="drop tokens instead of merging them")
    p.add_argument(
        "--start",
        type=_start,
        default=0,
        help="index of the first FPS seed (default 0), or 'random': drawn per engine item (image, crop or frame) "
        "at run time from --start-seed "
        "(the official code's choice; for parity runs)",
    )
    p.add_argument("--start-seed", type=int, default=0, help="seed of the run-time draws of --start random (default 0)")
    p.add_argument(
        "--budget",
        type=int,
        choices=sorted(OFFICIAL_BUDGETS),
        default=None,
        help="the paper's budgets: "
        + ", ".join(f"{b} = --keep {k} --llm-stage {layer}:{k2}" for b, (k, layer, k2) in OFFICIAL_BUDGETS.items()),
    )
    p.add_argument(
        "--llm-stage",
        default=None,
        metavar="LAYER:KEEP",
        help="ApET again on each image's rows of the hidden states after LAYER decoder layers, keeping KEEP "
        "(the paper's stage 2; run by the Transformers decoder only)",
    )
    p.add_argument(
        "--image-aspect",
        choices=IMAGE_ASPECTS,
        default="default",
        help="default: the checkpoint processor's own (llava-hf: resize + centre crop); pad: LLaVA-1.5's "
        "expand2square with the processor's mean colour first, as the official LLaVA code does",
    )
    p.add_argument("--no-apet", action="store_true", help="build the uncompressed baseline (all N tokens)")
    p.add_argument(
        "--frame-sampling",
        choices=("transformers", "official"),
        default=None,
        help="video families: which frames the runtime samples; transformers (default): Transformers' "
        "load_video, frame floor(i * n / 8); official: LanguageBind's np.linspace(0, n - 1, 8, dtype=int)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="largest batch the engines take (default 8)")
    p.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT optimises for (default 1)")
    p.add_argument(
        "--min-pixels",
        type=int,
        default=None,
        help="dynamic-resolution models (Qwen2.5-VL): smallest image area the processor resizes to (default: its own)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="dynamic-resolution models: largest image area, which bounds the engine's token axis (default: its own)",
    )
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
            keep_ratio=args.keep_ratio,
            seed_blend=args.seed_blend,
            basis=args.basis,
            merge=not args.no_merge,
            start=args.start,
            start_seed=args.start_seed,
            budget=args.budget,
            llm_stage=args.llm_stage,
            image_aspect=args.image_aspect,
            frame_sampling=args.frame_sampling,
            no_apet=args.no_apet,
            max_batch=args.max_batch,
            opt_batch=args.opt_batch,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            fp16=args.fp16,
            force=args.force,
            tensorrt=not args.no_tensorrt,
            tensorrt_llm=not args.no_tensorrt_llm,
        )
    )
    return 0
