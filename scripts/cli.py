"""The `apet` command: one dispatcher, each stage registers its own subcommands.

    apet build    (export/cli.py)   checkpoint or preset -> engine directory
    apet inspect  (runtime/cli.py)  print a manifest and verify the files against it
    apet run      (runtime/cli.py)  image + prompt through an engine directory
    apet serve    (runtime/serve/cli.py) OpenAI-compatible server (or a vision front for vLLM)
    apet encode   (runtime/serve/cli.py) image -> its rows as an image_embeds payload
    apet bench    (scripts/bench/) latency per stage, compressed vs uncompressed
    apet eval     (scripts/eval/)  answers and scores per engine vs the uncompressed one, on a JSONL set

Errors the user can act on are printed as one line (no traceback) and exit with status 2;
set APET_DEBUG=1 to see the traceback. An unknown option is reported by the subcommand's own
parser (with its usage), and Pillow's decompression-bomb warning is an error here (the image
reader turns it into one line).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

# (module, description) - imported lazily so `apet --help` stays fast and a missing optional
# dependency only affects the subcommand that needs it.
_STAGES = (
    "apet_trt.export.cli",
    "apet_trt.runtime.cli",
    "apet_trt.runtime.serve.cli",
    "apet_trt.scripts.bench",
    "apet_trt.scripts.eval",
)


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("apet-trt")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="apet", description="ApET visual-token compression in exported VLM engines")
    parser.add_argument("--version", action="version", version=f"apet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _STAGES:
        importlib.import_module(name).register(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but an option the subcommand does not know is reported by its own parser."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)  # the process is ours
    parser = build_parser()
    args = _parse(parser, argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("apet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; the traceback on request
        if os.environ.get("APET_DEBUG"):
            raise
        msg = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"apet {args.command}: error: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
