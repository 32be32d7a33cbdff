"""Helpers (no tests here): proof that code under test neither read nor changed files it had no
business with.

    with untouched(outside) as seen:     # folders the code must leave alone
        run_the_code()
    # raises AssertionError if any file or folder under them was opened, listed, created, renamed
    # or removed (Python audit events: open, os.*, shutil.*), or if their contents changed

Audit hooks see every open() and os-level call Python code makes (ours, Transformers', Pillow's
file opening, tempfile); native libraries (ONNX Runtime, safetensors) bypass them, so the tests
also show that the error comes before any of those is reached, and `strace_paths` checks the
system calls of a whole process where strace is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

_active: list[tuple[tuple[str, ...], list]] = []


def _hook(event: str, args: tuple) -> None:
    if not _active or not (event == "open" or event.startswith(("os.", "shutil."))):
        return
    for arg in args:
        if isinstance(arg, (str, bytes, os.PathLike)):
            try:
                path = os.path.abspath(os.fsdecode(arg))
            except (TypeError, ValueError):
                continue
            for roots, seen in _active:
                if any(path == r or path.startswith(r + os.sep) for r in roots):
                    seen.append((event, path))


sys.addaudithook(_hook)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 (files), 'dir', 'special' or 'link -> target', following no link."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:  # a FIFO or socket: never opened (reading a FIFO blocks)
                out[rel] = "special"
    return out


@contextmanager
def untouched(*roots: Path):
    """Assert that nothing under `roots` is accessed (audit events) or changed (contents)."""
    real = tuple(os.path.abspath(r) for r in roots) + tuple(os.path.realpath(r) for r in roots)
    before = {r: snapshot(Path(r)) for r in roots}
    seen: list = []
    _active.append((real, seen))
    try:
        yield seen
    finally:
        _active.remove((real, seen))
    assert not seen, f"accessed outside: {seen[:5]}"
    for r in roots:
        assert snapshot(Path(r)) == before[r], f"{r} changed"


def strace_paths(argv: list[str], cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """Run argv under `strace -f -e trace=%file,%desc` -> (result, the trace); needs strace."""
    trace = Path(cwd or ".") / "strace.out"
    cmd = [shutil.which("strace"), "-f", "-qq", "-e", "trace=%file", "-o", str(trace), *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    return result, trace.read_text(errors="replace")
