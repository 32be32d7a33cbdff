"""`apet eval`: what a token budget costs in answers, each engine side by side with the uncompressed
baseline, on the user's own JSONL set. Method, data format and JSON schema: docs/EVAL.md.

    apet eval --engine engines/t64 --baseline engines/full --data assets/eval/sample.jsonl --out eval_out

The modules, in the order a run uses them:

    config.py    EvalConfig: options, defaults, the checks that need no engine
    data.py      the JSONL file -> Items, every line checked before anything runs
    scoring.py   VQA normalisation and accuracy, exact match, option letters, agreement
    cache.py     answers.jsonl: one record per (engine, item), appended per batch (resumable)
    answer.py    greedy answers through the runtime's Pipeline, with rows and timings
    run.py       the driver: data -> answers per engine -> report
    report.py    scores and ratios, markdown table, plot (re-renders a saved eval.json)
    cli.py       the `apet eval` subcommand
    lmms_eval_model.py  an lmms-eval model class over an engine directory (imported by lmms-eval only)
"""

from .cli import register
from .config import SCHEMA_VERSION, EvalConfig

__all__ = ["SCHEMA_VERSION", "EvalConfig", "register"]
