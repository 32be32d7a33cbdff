"""`apet eval` on the command line: options -> EvalConfig -> run_eval; prints the table. Bad
arguments and bad data lines are one line with exit status 2 (scripts/cli.py)."""

from __future__ import annotations

import argparse

from .config import CHOICE_SUFFIX, OPEN_SUFFIX, EvalConfig


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="answers and scores per engine vs the uncompressed baseline on a JSONL set (JSON, markdown, plot)",
        description="Greedy answers from every --engine and the --baseline on a JSONL set of image / video "
        "questions, scored (VQA accuracy, exact match, multiple-choice letter accuracy, agreement with the "
        "baseline) beside the visual rows each engine hands its LLM and its TTFT and request time. Writes "
        "eval.json (schema: docs/EVAL.md), eval.md and eval.png under --out; answers are cached there "
        "(answers.jsonl), so an interrupted run resumes where it stopped.",
    )
    p.add_argument("--engine", action="append", required=True, help="engine directory to score (repeat for more)")
    p.add_argument("--baseline", required=True, help="the engine directory the others are compared with (--no-apet)")
    p.add_argument(
        "--data", required=True, help='JSONL: {"id", "image"|"images"|"video", "question", "answers"[, "choices"]}'
    )
    p.add_argument("--out", default="eval_out", help="output directory: eval.json, eval.md, eval.png, answers.jsonl")
    p.add_argument("--batch", type=int, default=4, help="prompts per generate call (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer at most (default 16)")
    p.add_argument(
        "--backend", default="auto", help="vision backend: auto, tensorrt, onnxruntime, torch (default auto)"
    )
    p.add_argument("--decoder", default="auto", help="decoder: auto, transformers, tensorrt_llm, tensorrt_llm_api")
    p.add_argument("--device", default=None, help="decoder device (default: cuda when there is one, else cpu)")
    p.add_argument("--limit", type=int, default=None, help="the first N items only")
    p.add_argument("--labels", default=None, help="comma-separated names: the baseline's, then each --engine's")
    p.add_argument("--open-suffix", default=OPEN_SUFFIX, help=f"instruction after an open question ({OPEN_SUFFIX!r})")
    p.add_argument(
        "--choice-suffix", default=CHOICE_SUFFIX, help=f"instruction after a question's options ({CHOICE_SUFFIX!r})"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        engines=list(args.engine),
        baseline=args.baseline,
        data=args.data,
        out=args.out,
        batch=args.batch,
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        decoder=args.decoder,
        device=args.device,
        open_suffix=args.open_suffix,
        choice_suffix=args.choice_suffix,
        limit=args.limit,
        progress=not args.no_progress,
        labels=[s.strip() for s in args.labels.split(",")] if args.labels else [],
    )


def run(args: argparse.Namespace) -> int:
    from .config import log
    from .report import render_table
    from .run import run_eval

    report = run_eval(config_from_args(args))
    print(render_table(report))
    log(f"wrote {', '.join(report['outputs'].values())}")
    return 0
