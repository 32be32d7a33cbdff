"""Write manifest.json for an engine directory (format: apet_trt.engine_format, docs/ENGINE_DIR.md).

Every file of the directory listed with its size and sha256, relative POSIX paths, no link or
special file, and the one reference outside the directory - a checkpoint built by path, never
copied - in `external_checkpoint`, with its fingerprint. The manifest is checked with the format's
own `validate` (what the runtime checks at load) before it is written, so a build never commits a
directory the runtime would refuse.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from tqdm import tqdm

from apet_trt.engine_format import (
    FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_MANIFEST_BYTES,
    ManifestError,
    fingerprint,
    sha256,
    validate,
)


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
    paths = [p for p in _regular_files(root) if p.relative_to(root).as_posix() != MANIFEST_NAME]
    total = sum(p.stat().st_size for p in paths)
    table = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="checksums", leave=False, disable=total < 1 << 26) as bar:
        for p in paths:
            table[p.relative_to(root).as_posix()] = {"sha256": sha256(p), "bytes": p.stat().st_size}
            bar.update(p.stat().st_size)
    return table


def external_checkpoint(folder: str | os.PathLike) -> dict:
    """The manifest's `external_checkpoint` entry for a checkpoint built by path: its resolved
    absolute path and its fingerprint (configs, tokenizer and index hashed; weights sized; a file
    that cannot be read is an error)."""
    path = os.path.realpath(os.path.expanduser(folder))
    return {"path": path, "fingerprint": fingerprint(Path(path), strict=True)}


def write_manifest(root: Path, fields: dict) -> dict:
    """fields: everything but format/version/created/files; checks the whole manifest against the
    format and writes it; returns it."""
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
    try:
        validate(json.loads(text))  # as the runtime will read it
    except ManifestError as exc:
        raise RuntimeError(f"the manifest this build made does not match the engine-directory format: {exc}") from None
    (root / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return data
