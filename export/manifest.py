"""Write manifest.json for an engine directory (format: docs/ENGINE_DIR.md, manifest_version 2).

Reading and verifying it is the runtime's business (runtime/manifest.py); this side only produces
what that side accepts (a test round-trips the two): every file of the directory listed with its
size and sha256, relative POSIX paths, no link or special file, and the one reference outside the
directory - a checkpoint built by path, never copied - in `external_checkpoint`, with the
fingerprint the runtime checks at load.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

from tqdm import tqdm

FORMAT = "apet-trt-engine"
MANIFEST_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20  # what the runtime reads at most
SMALL_FILE_BYTES = 16 << 20  # checkpoint files up to this size are hashed, larger ones (weights) sized


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _regular_files(root: Path) -> list[Path]:
    """Every file under root, walking without following links; a link or special file is an error
    (the runtime refuses them)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise ValueError(f"{path}: the build produced a symbolic link; engine directories hold regular files")
            if name in filenames:
                if not stat.S_ISREG(st.st_mode):
                    raise ValueError(f"{path}: the build produced a file that is not a regular file")
                out.append(path)
    return sorted(out)


def file_table(root: Path) -> dict:
    paths = [p for p in _regular_files(root) if p.relative_to(root).as_posix() != MANIFEST]
    total = sum(p.stat().st_size for p in paths)
    table = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="checksums", leave=False, disable=total < 1 << 26) as bar:
        for p in paths:
            table[p.relative_to(root).as_posix()] = {"sha256": sha256(p), "bytes": p.stat().st_size}
            bar.update(p.stat().st_size)
    return table


def fingerprint(folder: Path) -> dict[str, dict]:
    """relative path -> {"bytes", "sha256" (up to SMALL_FILE_BYTES)} for every file of a checkpoint
    folder: links to files followed (Hugging Face cache snapshots are links), hidden names skipped.
    The runtime recomputes exactly this at load."""
    out: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError as exc:
                raise ValueError(f"{path}: a checkpoint file that cannot be read ({exc.strerror})") from None
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{path}: a checkpoint entry that is not a regular file")
            entry = {"bytes": st.st_size}
            if st.st_size <= SMALL_FILE_BYTES:
                entry["sha256"] = sha256(path)
            out[path.relative_to(folder).as_posix()] = entry
    return out


def external_checkpoint(folder: str | os.PathLike) -> dict:
    """The manifest's `external_checkpoint` entry for a checkpoint built by path: its resolved
    absolute path and its fingerprint (configs, tokenizer and index hashed; weights sized)."""
    path = os.path.realpath(os.path.expanduser(folder))
    return {"path": path, "fingerprint": fingerprint(Path(path))}


def write_manifest(root: Path, fields: dict) -> dict:
    """fields: everything but format/version/created/files; returns the full manifest."""
    data = {
        "format": FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **fields,
    }
    data["files"] = file_table(root)
    text = json.dumps(data, indent=2, default=str, allow_nan=False) + "\n"
    if len(text.encode("utf-8")) > MAX_MANIFEST_BYTES:
        raise ValueError(f"manifest.json would be {len(text)} bytes, over the {MAX_MANIFEST_BYTES} the runtime reads")
    (root / MANIFEST).write_text(text, encoding="utf-8")
    return data
