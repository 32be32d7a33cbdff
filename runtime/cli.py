"""`apet run` and `apet inspect` (registered into the dispatcher scripts/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .choice import BACKENDS, DECODERS


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every option that has one (not of required ones, flags or None)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    run = subparsers.add_parser(
        "run",
        help="image (or video) + prompt through an engine directory",
        description="Run one image (or video) and prompt through an engine directory: prints the "
        "text, the tokens kept (N -> T) and per-stage timings.",
        formatter_class=_DefaultsFormatter,
    )
    run.add_argument("--engine", required=True, help="engine directory (built by `apet build`)")
    media = run.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="local image file (PNG, JPEG, WebP, TIFF, ...; up to 8192x8192)")
    media.add_argument(
        "--video",
        help="video file (families that take videos, e.g. video_llava: frames sampled uniformly with PyAV)",
    )
    run.add_argument("--prompt", required=True, help="question or instruction about the image or video")
    run.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate")
    run.add_argument(
        "--keep",
        type=int,
        default=None,
        metavar="T",
        help="the T you expect; refused if the engine was built for another T",
    )
    run.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="vision backend; auto: TensorRT where the plan, tensorrt and a GPU are present, else ONNX Runtime",
    )
    run.add_argument(
        "--decoder",
        default="auto",
        choices=DECODERS,
        help="decoder; auto: TensorRT-LLM where the engine has one and it imports, else Transformers",
    )
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    run.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (> 0 with --sample; unused when greedy)"
    )
    run.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    run.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of probability >= p")
    run.add_argument("--seed", type=int, default=None, help="random seed for --sample (default: a fresh one)")
    run.add_argument(
        "--overlay",
        default=None,
        metavar="OUT.png",
        help="write the kept patches over the image (a video: a contact sheet of the sampled frames) to this new "
        "file (never the input or the engine dir)",
    )
    run.add_argument("--force-overlay", action="store_true", help="let --overlay replace an existing file")
    run.add_argument("--grid", action="store_true", help="also print the patch grid, kept patches as '#'")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    run.set_defaults(func=run_command)

    inspect = subparsers.add_parser("inspect", help="print an engine directory's manifest and verify its files")
    inspect.add_argument("engine", help="engine directory")
    inspect.set_defaults(func=inspect_command)


def inspect_command(args: argparse.Namespace) -> int:
    from .manifest import read_manifest, verify_files

    manifest = read_manifest(args.engine)
    print(manifest.summary())
    verify_files(manifest, progress=sys.stderr.isatty())  # raises, naming the file at fault
    print("OK")
    return 0


def run_command(args: argparse.Namespace) -> int:
    from . import load
    from .decoders import SamplingConfig
    from .images import check_image_file
    from .manifest import describe_budget
    from .overlay import overlay_target
    from .videos import check_video_file

    # every argument checked before a model is loaded
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.image is not None:
        check_image_file(args.image, "--image")  # path, format and geometry, from the header
    else:
        check_video_file(args.video, "--video")  # path, size, container, stream and bounds, from the header
    media = {"images": args.image, "videos": args.video}
    if args.overlay:
        overlay_target(args.overlay, image=args.image or args.video, engine_dir=args.engine, force=args.force_overlay)
    pipe = load(args.engine, backend=args.backend, device=args.device, decoder=args.decoder, keep=args.keep)
    batch = pipe.preprocess(media["images"], videos=media["videos"])  # once: the engine's, --grid's, --overlay's
    [result] = pipe.generate(prompts=args.prompt, **media, sampling=sampling, batch=batch)
    overlay_path = None
    if args.overlay:
        overlay_path = write_overlay(pipe, batch, media, result.positions, args.overlay, force=args.force_overlay)
    if args.json:
        payload = {
            "text": result.text,
            "ids": result.ids,
            "positions": result.positions,
            "num_patches": result.num_patches,
            "num_kept": result.num_kept,
            "llm_positions": result.llm_positions,
            "timings": result.timings,
            "backend": pipe.backend,
            "decoder": pipe.decoder.name,
            "overlay": None if overlay_path is None else str(overlay_path),
        }
        print(json.dumps(payload))
        return 0
    t = result.timings
    apet = pipe.manifest.apet
    how = f"ApET {describe_budget(apet)} basis={apet['basis']} merge={apet['merge']}" if apet else "no compression"
    print(f"engine   {args.engine}  (vision: {pipe.backend} [{pipe.backend_reason}], decoder: {pipe.decoder.name})")
    print(f"tokens   {result.num_patches} -> {result.num_kept} visual tokens kept ({how})")
    print(f"kept     patches {', '.join(map(str, result.positions))}")
    if result.llm_positions is not None:
        stage = pipe.manifest.llm_stage
        print(
            f"llm      after decoder layer {stage['layer']}: {result.num_kept} -> {len(result.llm_positions)} rows, "
            f"patches {', '.join(map(str, result.llm_positions))}"
        )
    if args.grid:
        print(patch_grid(pipe, batch, result.positions))
    print(f"text     {result.text!r}")
    print(
        f"timings  preprocess {t['preprocess_ms']:.1f} ms | vision {t['vision_ms']:.1f} ms | "
        f"prefill/first token {t['first_token_ms']:.1f} ms | decode {t['decode_ms']:.1f} ms "
        f"({int(t['new_tokens'])} tokens) | total {t['total_ms']:.1f} ms"
    )
    if overlay_path:
        print(f"overlay  {overlay_path}")
    return 0


def patch_grid(pipe, batch, positions) -> str:
    """The image's (or each sampled frame's) patch grid(s) as text, '#' where a patch was kept;
    `batch`: the preprocessed image or video (pipe.preprocess)."""
    from .overlay import grid_text

    return grid_text(pipe.family.patch_map(batch, 0), positions)


def write_overlay(pipe, batch, media: dict, positions, out, *, force: bool = False) -> Path:
    """The kept patches over what the engine saw (`batch`), to `out`; `media`: {"images": path or None,
    "videos": path or None}, the source the target must not be."""
    from .overlay import draw_patch_map, overlay_target, save_overlay

    source = media["images"] or media["videos"]
    target = overlay_target(out, image=source, engine_dir=pipe.manifest.root, force=force)
    picture = draw_patch_map(pipe.family.patch_map(batch, 0), positions)
    return save_overlay(picture, target, force=force)
