"""Checksums of the engine-directory format: a file's sha256, and the fingerprint of the one folder
an engine directory may name outside itself (the external checkpoint, built by path, never copied).

The writer (`apet build`) fingerprints in strict mode: a checkpoint file it cannot read is an error.
The reader (the runtime, at load) fingerprints in lenient mode: such a file is recorded as
{"bytes": -1}, which differs from any fingerprint the writer made, so the comparison names it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from .schema import MAX_FILES, SMALL_FILE_BYTES, ManifestError

_CHUNK = 1 << 20


def sha256(path: Path, *, follow_links: bool = False) -> str:
    """The hex sha256 of a regular file; never through a symbolic link unless `follow_links` (a
    checkpoint in a Hugging Face cache is links), never a FIFO or device."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW)
    h = hashlib.sha256()
    with os.fdopen(os.open(path, flags), "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ManifestError(f"{path}: not a regular file")
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(folder: Path, *, strict: bool) -> dict[str, dict]:
    """relative path -> {"bytes", "sha256" (files up to SMALL_FILE_BYTES)} of every file under a
    checkpoint folder: configs, tokenizer and index hashed, weights sized; links to files followed,
    hidden names skipped, at most MAX_FILES entries. strict: an entry that is not a readable regular
    file raises ValueError (the writer); else it is recorded as {"bytes": -1} (the reader)."""
    folder = Path(folder)
    out: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            try:
                st = path.stat()
            except OSError as exc:  # a dangling link
                if strict:
                    raise ValueError(f"{path}: a checkpoint file that cannot be read ({exc.strerror})") from None
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                if strict:
                    raise ValueError(f"{path}: a checkpoint entry that is not a regular file")
                out[rel] = {"bytes": -1}
                continue
            entry = {"bytes": st.st_size}
            if st.st_size <= SMALL_FILE_BYTES:
                entry["sha256"] = sha256(path, follow_links=True)
            out[rel] = entry
        if len(out) > MAX_FILES:
            if strict:
                raise ValueError(f"{folder}: more than {MAX_FILES} files; not a model checkpoint")
            break
    return out
