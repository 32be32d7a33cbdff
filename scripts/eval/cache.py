"""The answer cache: one JSONL file under --out, a record per (engine, item) answered, appended and
flushed after every batch, so an interrupted run (Ctrl-C, a crash, a killed job) loses at most the
batch in flight and the next run asks only what is missing.

A record's key is sha256 over the engine's manifest.json bytes, the item id and the request (the
prompt text as sent, the media files' sha256, max_new_tokens, the backend and decoder asked for, and
run.ANSWER_FORMAT, which changes when the code asks differently):
change any of them and the item is asked again; move or copy an engine directory and its answers
still count. A line cut short by the interruption is skipped (with a warning) and asked again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import log


def digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


class AnswerCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        self.loaded = 0
        if self.path.is_file():
            self._read()

    def _read(self) -> None:
        bad = []
        with self.path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    rec = json.loads(raw)
                    self.records[rec["key"]] = rec
                except (ValueError, KeyError, TypeError):
                    bad.append(n)
        self.loaded = len(self.records)
        if bad:
            log(f"{self.path}: skipped {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}); asked again")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict:
        return self.records[key]

    def add(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            if f.tell() and not self._ends_with_newline():
                f.write("\n")  # a line cut short before: the next record starts on its own line
            for rec in records:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
        for rec in records:
            self.records[rec["key"]] = rec

    def _ends_with_newline(self) -> bool:
        with self.path.open("rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"
