"""Where a command may write a file it makes (`apet run --overlay`, `apet encode --out`), and how.

`output_target` checks the path before any work: a file name with one of the command's extensions;
never an input file, never inside the engine directory (its next verification would fail), never
through a symbolic link; an existing file only with the command's force flag. `write_output` then
creates it exclusively (an existing file, or a link put there meanwhile, is an error), or with
force writes beside it and renames over it (a link at the path is replaced, never followed).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class OutputRules:
    """A command's output option: its flag (`--overlay`), the flag that lets it replace an existing
    file (`--force-overlay`), what it writes ("image"), the extensions it takes (lower case, with the
    dot), the ones to suggest (".png or .jpg") and an example name."""

    flag: str
    force_flag: str
    what: str
    suffixes: Collection[str]
    suggest: str
    example: str


def output_target(
    path: str | os.PathLike,
    rules: OutputRules,
    *,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    engine_dir: str | os.PathLike,
    force: bool = False,
) -> Path:
    """Check an output path before any work (nothing is written here); `inputs`: the command's input
    files by what they are ({"input image": path}; values that are None or no path are skipped)."""
    given = os.fspath(path)
    flag = rules.flag
    out = Path(given)
    if out.name in ("", ".", "..") or given.endswith(os.sep):
        raise ValueError(f"{flag} {given!r}: name {_a(rules.what)} {rules.what} file, e.g. {rules.example}")
    suffix = out.suffix.lower()
    if suffix not in rules.suffixes:
        raise ValueError(f"{flag} {given}: unknown {rules.what} type {suffix or '(no extension)'}; use {rules.suggest}")
    real = os.path.realpath(out)
    real_engine = os.path.realpath(engine_dir)
    if os.path.commonpath([real, real_engine]) == real_engine:
        raise ValueError(
            f"{flag} {given} lies inside the engine directory {engine_dir} (it would no longer verify); "
            "write it elsewhere"
        )
    for label, source in (inputs or {}).items():
        if isinstance(source, (str, os.PathLike)) and _same_file(out, real, source):
            raise ValueError(f"{flag} {given} is the {label}; refusing to overwrite it")
    if out.is_symlink():
        raise FileExistsError(f"{flag} {given} is a symbolic link; refusing to write through it")
    if out.exists():
        if not out.is_file():
            raise FileExistsError(f"{flag} {given} exists and is not a regular file")
        if not force:
            raise FileExistsError(f"{flag} {given} exists; pass {rules.force_flag} to replace it")
    ancestor = next(p for p in Path(os.path.abspath(out)).parents if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {given}: cannot create it in {ancestor}")
    return out


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _same_file(out: Path, real: str, source: str | os.PathLike) -> bool:
    """The output path names the input file: the same resolved path, or the same inode (a hard link)."""
    if real == os.path.realpath(source):
        return True
    return out.exists() and Path(source).exists() and os.path.samefile(out, source)


def write_output(target: Path, write: Callable[[BinaryIO], None], *, force: bool = False) -> Path:
    """Write a path checked by output_target: `write(f)` fills a binary file opened for it, created
    exclusively (never following a link) or, with force, beside it and renamed over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not force:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)  # no half-written file left behind
            raise
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target
