"""`apet serve` and `apet encode` (registered into the dispatcher scripts/cli.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..choice import BACKENDS, DECODERS


def register(subparsers) -> None:
    s = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible server over an engine directory (or a vision front for vLLM/trtllm-serve)",
        description="Serve /v1/chat/completions (streaming and not), /v1/models, /health and /metrics for an "
        "engine directory. Concurrent requests share vision-engine and decoder calls. With --upstream, only "
        "the vision engine runs here and each request goes on to that OpenAI-compatible server with its "
        "images replaced by their ApET rows (image_embeds parts).",
    )
    s.add_argument("--engine", required=True, help="engine directory (built by `apet build`)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: the engine's)")
    g = s.add_argument_group("batching")
    g.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="images per vision call, prompts per decoder call (default: the engine's max batch)",
    )
    g.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others (5)")
    g.add_argument("--max-queue", type=int, default=64, help="requests inside at once; more get 503 (64)")
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 504 (600)")
    g.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive; else 408 (10)"
    )
    g.add_argument(
        "--body-timeout", type=float, default=30.0, help="seconds for an admitted body to arrive; else 408 (30)"
    )
    g = s.add_argument_group("request limits")
    g.add_argument("--max-body-bytes", type=int, default=32 << 20, help="JSON body size cap (32 MiB)")
    g.add_argument("--max-images", type=int, default=4, help="images per request (4)")
    g.add_argument("--max-image-bytes", type=int, default=20 << 20, help="one encoded image (20 MiB)")
    g.add_argument("--max-image-pixels", type=int, default=40_000_000, help="one image's width x height (40 M)")
    g.add_argument(
        "--max-decoded-bytes",
        type=int,
        default=128 << 20,
        help="decoded images and image_embeds one request may hold, checked before decoding (128 MiB)",
    )
    g.add_argument("--max-tokens-default", type=int, default=256, help="max_tokens when a request names none")
    g.add_argument("--allowed-local-media-path", default=None, metavar="DIR", help="accept file:// images below DIR")
    g.add_argument("--allow-remote-images", action="store_true", help="fetch http(s):// image URLs (off by default)")
    g.add_argument(
        "--remote-image-timeout", type=float, default=10.0, help="seconds for the whole fetch of one remote image (10)"
    )
    g = s.add_argument_group("access")
    g.add_argument(
        "--api-key",
        default=os.environ.get("APET_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: $APET_API_KEY; unset: none)",
    )
    g = s.add_argument_group("runtime")
    g.add_argument("--backend", default="auto", choices=BACKENDS)
    g.add_argument("--decoder", default="auto", choices=DECODERS)
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    g = s.add_argument_group("upstream mode")
    g.add_argument(
        "--upstream",
        default=None,
        metavar="URL",
        help="OpenAI-compatible server that decodes (e.g. vllm serve ... --enable-mm-embeds), base URL",
    )
    g.add_argument("--upstream-model", default=None, help="its model name (default: the first of its /v1/models)")
    g.add_argument("--upstream-api-key", default=None, help="bearer token for the upstream")
    g.add_argument(
        "--upstream-format",
        default="vllm",
        choices=["vllm", "vllm-apet", "trtllm"],
        help="image_embeds part format: vllm (tested: vLLM 0.32; docs/UPSTREAM.md), vllm-apet (vLLM with apet-trt's "
        "plugin, Qwen2.5-VL's and Qwen3-VL's rows with their true M-RoPE ids, docs/VLLM_PLUGIN.md), "
        "trtllm (trtllm-serve of a "
        "TensorRT-LLM that has NVIDIA/TensorRT-LLM PR #9715, Dec 2025; LLaVA-1.5 refused)",
    )
    g.add_argument(
        "--embeds-dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the rows sent upstream (default: the engine's llm.dtype)",
    )
    g.add_argument(
        "--upstream-grid-positions",
        action="store_true",
        help="Qwen2.5-VL: send each image's rows with a compact image_grid_thw and accept the M-RoPE positions the "
        "upstream derives from it (approximate; the exact route is the apet-trt vLLM plugin, docs/VLLM_PLUGIN.md)",
    )
    g.add_argument(
        "--max-upstream-response-bytes",
        type=int,
        default=16 << 20,
        help="a non-streamed upstream answer larger than this gets 502 (16 MiB)",
    )
    s.add_argument("--graceful-shutdown", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    s.set_defaults(func=serve_command)

    e = subparsers.add_parser(
        "encode",
        help="image -> its ApET rows as an image_embeds payload (for vLLM / trtllm-serve)",
        description="Run one image through the engine's vision stage and write the `image_embeds` chat content "
        "part `apet serve --upstream` would send (OUT.json), or the tensor itself (OUT.pt, torch.save).",
    )
    e.add_argument("--engine", required=True, help="engine directory")
    e.add_argument("--image", required=True, help="image file")
    e.add_argument(
        "--out",
        required=True,
        help="OUT.json (the content part) or OUT.pt (the tensor / dict): a new file, never the image or inside the "
        "engine directory",
    )
    e.add_argument("--force", action="store_true", help="let --out replace an existing file")
    e.add_argument(
        "--format",
        default="vllm",
        choices=["vllm", "vllm-apet", "trtllm"],
        help="content part format (vllm); vllm-apet: for vLLM with apet-trt's plugin "
        "(Qwen2.5-VL, Qwen3-VL; docs/VLLM_PLUGIN.md)",
    )
    e.add_argument(
        "--embeds-dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the rows (default: the engine's llm.dtype)",
    )
    e.add_argument("--backend", default="auto", choices=BACKENDS)
    e.add_argument("--device", default=None)
    e.set_defaults(func=encode_command)

    c = subparsers.add_parser(
        "chat-template",
        help="the engine's conversation format as a Jinja chat template (vllm serve --chat-template)",
        description="Print (or write to --out) a Jinja chat template that renders exactly the prompt this "
        "engine builds for a chat request (its prompt_template, one image token per image, the tokenizer's BOS), "
        "for an upstream that renders chats itself: `vllm serve HF_DIR --chat-template t.jinja`.",
    )
    c.add_argument("--engine", required=True, help="engine directory")
    c.add_argument(
        "--out", default=None, help="write the template to this .jinja file (default: print it); never in the engine"
    )
    c.add_argument("--force", action="store_true", help="let --out replace an existing file")
    c.set_defaults(func=chat_template_command)


def serve_command(args: argparse.Namespace) -> int:
    from .config import ServeConfig
    from .server import serve

    cfg = ServeConfig(
        engine=args.engine,
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_body_bytes=args.max_body_bytes,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_decoded_bytes=args.max_decoded_bytes,
        default_max_tokens=args.max_tokens_default,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_remote_images=args.allow_remote_images,
        remote_image_timeout_s=args.remote_image_timeout,
        api_key=args.api_key or None,
        backend=args.backend,
        decoder=args.decoder,
        device=args.device,
        upstream=args.upstream,
        upstream_model=args.upstream_model,
        upstream_api_key=args.upstream_api_key,
        upstream_format=args.upstream_format,
        embeds_dtype=args.embeds_dtype,
        upstream_grid_positions=args.upstream_grid_positions,
        max_upstream_response_bytes=args.max_upstream_response_bytes,
        graceful_shutdown_s=args.graceful_shutdown,
    )
    return serve(cfg)


def chat_template_command(args: argparse.Namespace) -> int:
    from ..output_files import OutputRules, output_target, write_output
    from .chat_template import engine_chat_template

    # --out: --overlay's rules (runtime/output_files.py): never inside the engine directory (its
    # manifest lists every file), never a link, an existing file only with --force
    rules = OutputRules("--out", "--force", "chat template", (".jinja", ".j2"), ".jinja", "template.jinja")
    out = None if args.out is None else output_target(args.out, rules, engine_dir=args.engine, force=args.force)
    text = engine_chat_template(args.engine)
    if out is None:
        sys.stdout.write(text)
    else:
        write_output(out, lambda f: f.write(text.encode("utf-8")), force=args.force)
        print(f"{out}: the chat template of {args.engine}", file=sys.stderr)
    return 0


def encode_command(args: argparse.Namespace) -> int:
    import torch

    from .. import load
    from ..images import check_image_file
    from ..output_files import OutputRules, output_target, write_output
    from .payload import encode_part, handoff_fields, torch_dtype
    from .vision_only import VisionOnlyDecoder

    # every argument checked before a model is loaded (--out: --overlay's rules, runtime/output_files.py)
    rules = OutputRules("--out", "--force", "payload", (".json", ".pt"), ".json or .pt", "rows.json")
    out = output_target(args.out, rules, inputs={"input image": args.image}, engine_dir=args.engine, force=args.force)
    check_image_file(args.image, "--image")
    pipe = load(args.engine, backend=args.backend, device=args.device, decoder=VisionOnlyDecoder.for_manifest)
    [rows] = pipe.encode(args.image)
    dtype = torch_dtype(args.embeds_dtype or str(pipe.manifest.llm.get("dtype") or "float32"))
    fields = handoff_fields(pipe.family, rows, args.format)
    out = output_target(out, rules, inputs={"input image": args.image}, engine_dir=pipe.manifest.root, force=args.force)
    if out.suffix.lower() == ".json":
        text = json.dumps(encode_part(fields, args.format, dtype)).encode("utf-8")
        write_output(out, lambda f: f.write(text), force=args.force)
    else:
        cast = {k: (v.to(dtype) if k == "image_embeds" else v) for k, v in fields.items()}
        write_output(out, lambda f: torch.save(cast["image_embeds"] if len(cast) == 1 else cast, f), force=args.force)
    emb = fields["image_embeds"]
    print(
        f"{out}: {rows.num_patches} -> {rows.num_rows} rows x {emb.shape[1]} ({str(dtype).replace('torch.', '')}, "
        f"{args.format} image_embeds), {out.stat().st_size} bytes",
        file=sys.stdout,
    )
    return 0
