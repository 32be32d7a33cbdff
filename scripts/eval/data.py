"""The evaluation set: a JSONL file, one item a line, media paths relative to the file.

    {"id": "cat-1", "image": "chelsea.jpg", "question": "What animal is this?", "answers": ["cat", ...]}
    {"id": "two", "images": ["a.jpg", "b.jpg"], "question": "...", "answers": [...]}
    {"id": "clip", "video": "clip.mp4", "question": "...", "answers": [...]}
    {"id": "mc", "image": "x.jpg", "question": "...", "choices": ["dog", "cat"], "answers": ["B"]}

`answers` are the human answers (VQA style: ten, repeats allowed); for a multiple-choice item each
answer is the correct option's letter or its text. The whole file is read and checked before any
engine runs: every bad line (bad JSON, a missing field, a missing media file, a repeated id) is
reported in one error naming its line, so a run never starts on a file it would stop half-way through.
Blank lines and lines starting with "#" are skipped.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .scoring import LETTERS, choice_prompt, gold_letter

MEDIA_KEYS = ("image", "images", "video")


class DataError(ValueError):
    """One or more bad lines in the evaluation file; the message names each (file:line)."""


@dataclass(frozen=True)
class Item:
    id: str
    kind: str  # "image" (one), "images" (several), "video"
    media: tuple[Path, ...]  # absolute paths
    question: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] | None
    line: int

    @property
    def multiple_choice(self) -> bool:
        return self.choices is not None

    def prompt(self, open_suffix: str, choice_suffix: str) -> str:
        """What the engine is asked: the question (with its options, one a line) and the instruction."""
        if self.choices is not None:
            return "\n".join(s for s in (choice_prompt(self.question, self.choices), choice_suffix) if s)
        return "\n".join(s for s in (self.question, open_suffix) if s)


def _item(obj, where: str, root: Path) -> Item:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "question", "answers", "choices", *MEDIA_KEYS}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} (id, image|images|video, question, answers, choices)")
    item_id = obj.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, str | int) or str(item_id) == "":
        raise ValueError(f'"id" must be a non-empty string or an integer, got {item_id!r}')
    kinds = [k for k in MEDIA_KEYS if k in obj]
    if len(kinds) != 1:
        raise ValueError(f'needs exactly one of "image", "images", "video"; got {kinds or "none"}')
    kind = kinds[0]
    paths = obj[kind] if kind == "images" else [obj[kind]]
    if kind == "images" and (not isinstance(paths, list) or not paths):
        raise ValueError('"images" must be a non-empty list of paths')
    media = []
    for p in paths:
        if not isinstance(p, str) or not p:
            raise ValueError(f'"{kind}": expected a path string, got {p!r}')
        path = (root / p).resolve()
        if not path.is_file():
            raise ValueError(f'"{kind}": {p} not found (looked for {path})')
        media.append(path)
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError('"question" must be a non-empty string')
    answers = obj.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError('"answers" must be a non-empty list of non-empty strings')
    choices = obj.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise ValueError(f'"choices" must be a list of 2..{len(LETTERS)} option texts')
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError('"choices": every option must be a non-empty string')
        gold_letter(answers, choices)  # raises when no answer names an option
        choices = tuple(choices)
    return Item(str(item_id), kind, tuple(media), question, tuple(answers), choices, int(where.rsplit(":", 1)[1]))


def read_items(path: str | Path, *, max_errors: int = 20) -> list[Item]:
    """Every item of the file, checked; DataError naming each bad line (up to max_errors) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: evaluation file not found")
    root = path.resolve().parent
    items, errors, seen = [], [], {}
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                errors.append(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not text or text.startswith("#"):
                continue
            try:
                item = _item(json.loads(text), where, root)
            except json.JSONDecodeError as exc:
                errors.append(f"{where}: bad JSON: {exc.msg} at column {exc.colno}")
                continue
            except ValueError as exc:
                errors.append(f"{where}: {exc}")
                continue
            if item.id in seen:
                errors.append(f"{where}: id {item.id!r} repeats line {seen[item.id]}")
                continue
            seen[item.id] = n
            items.append(item)
    if errors:
        more = f" (and {len(errors) - max_errors} more)" if len(errors) > max_errors else ""
        raise DataError(f"{len(errors)} bad line(s) in {path}: " + "; ".join(errors[:max_errors]) + more)
    if not items:
        raise DataError(f"{path}: no items (one JSON object a line)")
    return items


@functools.lru_cache(maxsize=4096)
def file_digest(path: Path) -> str:
    """sha256 of a media file's bytes (part of the answer cache's key: a replaced image is asked again)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
