"""Write manifest.json for an engine directory (format: docs/ENGINE_DIR.md). Reading and
verifying it is the runtime's business (runtime/manifest.py); a test round-trips the two."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tqdm import tqdm

FORMAT = "apet-trt-engine"
MANIFEST_VERSION = 1
MANIFEST = "manifest.json"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict:
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    total = sum(p.stat().st_size for p in paths)
    table = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="checksums", leave=False, disable=total < 1 << 26) as bar:
        for p in paths:
            table[p.relative_to(root).as_posix()] = {"sha256": sha256(p), "bytes": p.stat().st_size}
            bar.update(p.stat().st_size)
    return table


def write_manifest(root: Path, fields: dict) -> dict:
    """fields: everything but format/version/created/files; returns the full manifest."""
    data = {
        "format": FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }
    data["files"] = file_table(root)
    (root / MANIFEST).write_text(json.dumps(data, indent=2, default=str) + "\n")
    return data
