"""EvalConfig: what `apet eval` was asked, with the checks that need no engine."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

SCHEMA_VERSION = 1
# LLaVA-1.5's evaluation prompts (its VQAv2 / GQA and MMBench / ScienceQA instructions)
OPEN_SUFFIX = "Answer the question using a single word or phrase."
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."


def log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


@dataclass
class EvalConfig:
    engines: list[str]  # engine directories to score (ApET at some budget)
    baseline: str  # the engine directory the others are compared with (apet build --no-apet)
    data: str  # the JSONL file
    out: str = "eval_out"
    batch: int = 4  # prompts per Pipeline.generate call (items with several images go one at a time)
    max_new_tokens: int = 16
    backend: str = "auto"  # runtime.load's vision backend
    decoder: str = "auto"  # runtime.load's decoder
    device: str | None = None  # decoder device; None: cuda when there is one
    open_suffix: str = OPEN_SUFFIX  # appended (on a new line) to an open-ended question
    choice_suffix: str = CHOICE_SUFFIX  # appended after a multiple-choice question's options
    limit: int | None = None  # the first N items only
    progress: bool = True  # tqdm bars on stderr
    labels: list[str] = field(default_factory=list)  # names for the engines (default: directory names)

    def check(self) -> None:
        if not self.engines:
            raise ValueError("give at least one --engine to compare with --baseline")
        if self.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {self.batch}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.labels and len(self.labels) != len(self.engines) + 1:
            raise ValueError(
                f"--labels: {len(self.labels)} names for {len(self.engines) + 1} engines (the baseline's first)"
            )

    def to_dict(self) -> dict:
        return asdict(self)
