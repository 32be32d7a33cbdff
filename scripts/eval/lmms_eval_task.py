"""lmms-eval task functions for a set in apet eval's JSONL format (docs/EVAL.md), so the same file
runs through lmms-eval's harness: images opened relative to the set's folder, the prompt built as
`apet eval` builds it, and `score` as `apet eval` scores an item (official VQA accuracy for an open
question, the letter's correctness for a multiple-choice one). No lmms-eval import here.

    doc_to_visual, doc_to_text, process_results = task_functions(Path("assets/eval"))
"""

from __future__ import annotations

from pathlib import Path

from . import scoring
from .config import CHOICE_SUFFIX, OPEN_SUFFIX


def task_functions(root: Path, open_suffix: str = OPEN_SUFFIX, choice_suffix: str = CHOICE_SUFFIX):
    root = Path(root)

    def doc_to_visual(doc: dict) -> list:
        from PIL import Image

        if doc.get("video"):
            return [str(root / doc["video"])]
        paths = doc.get("images") or [doc["image"]]
        return [Image.open(root / p).convert("RGB") for p in paths]

    def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
        choices = doc.get("choices")
        if choices:
            return "\n".join(s for s in (scoring.choice_prompt(doc["question"], choices), choice_suffix) if s)
        return "\n".join(s for s in (doc["question"], open_suffix) if s)

    def process_results(doc: dict, results: list) -> dict:
        answer = results[0]
        if doc.get("choices"):
            return {"score": scoring.mc_accuracy(answer, doc["answers"], doc["choices"])}
        return {"score": scoring.vqa_accuracy(answer, doc["answers"])}

    return doc_to_visual, doc_to_text, process_results
