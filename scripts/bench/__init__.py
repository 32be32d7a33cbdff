"""`apet bench`: what ApET buys, stage by stage, the compressed engine (ApET) against the
uncompressed one of the same model, in one process.

    apet bench --model llava-1.5-7b-arch --keep 64             # builds (or reuses) both engine dirs
    apet bench --engine engines/e7b-t64 --baseline engines/e7b-full
    apet bench --engine engines/tiny-t64 --baseline engines/tiny-full --quick

Every engine runs through its model family's adapter (runtime/families/), so the benchmark works for
any family in the table. T and N are the rows the bench medium (--image, or --video for a family
that takes videos) hands the LLM with and without ApET. Every comparison is interleaved; warm-up,
repeats, median and p90. Method and JSON schema: docs/BENCH.md. The modules, in the order a run
uses them:

    config.py   BenchConfig: options, defaults, the checks that need no engine
    engines.py  the two engine directories: given, or built / reused in the cache
    measure.py  interleaved timing (CUDA events on a GPU), the per-call memory sampler, machine facts
    vision.py   vision backends in pairs, the bench medium's rows, the vision section
    op.py       the ApET op alone (scripts/bench_ops.py's candidates)
    decoder.py  the engine's own language model through the runtime's TransformersDecoder, per T
    request.py  whole requests through the pipelines runtime.load makes
    report.py   headline ratios, markdown, plot (`python -m apet_trt.scripts.bench.report bench.json`)
    run.py      the driver: engines -> rows -> sections -> bench.json / .md / .png
    cli.py      the `apet bench` subcommand
"""

from .cli import register
from .config import SCHEMA_VERSION, SECTIONS, VISION_BACKENDS, BenchConfig

__all__ = ["SCHEMA_VERSION", "SECTIONS", "VISION_BACKENDS", "BenchConfig", "register"]
