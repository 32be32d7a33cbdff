"""The engine directory on disk, read without trusting it: strict JSON from regular files only, a
walk that follows no link, the files Transformers configs name, and the one folder outside the
directory (the external checkpoint) checked against its fingerprint. Used by runtime/manifest.py;
the format's constants, sha256 and fingerprint are apet_trt.engine_format's."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from apet_trt.engine_format import (
    MANIFEST_NAME,
    MAX_DEPTH,
    MAX_FILES,
    ManifestError,
    check_relative_path,
    fingerprint,
)

# --- reading --------------------------------------------------------------------------------------


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ManifestError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str):
    raise ManifestError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return deepest


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file (never through a symbolic link, never a FIFO or device), at most
    `limit` of them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if os.path.islink(path):
            raise ManifestError(f"{path}: is a symbolic link; engine directories hold regular files only") from None
        raise ManifestError(f"{path}: cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise ManifestError(f"{path}: {st.st_size} bytes, over the limit of {limit}")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ManifestError(f"{path}: over the limit of {limit} bytes")
    return data


def parse_json(raw: bytes, path: Path | str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, nested at most MAX_DEPTH deep."""
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{path}: JSON nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if _depth(data) > MAX_DEPTH:
        raise ManifestError(f"{path}: JSON nested deeper than {MAX_DEPTH} levels")
    return data


# --- the directory on disk ------------------------------------------------------------------------------


def walk(root: Path) -> dict[str, int]:
    """relative path -> size of every regular file under root (manifest.json excluded), walking
    without following links. Symbolic links, FIFOs, sockets, devices and hard-linked files are
    refused, naming the first."""
    found: dict[str, int] = {}
    stack = [(root, "")]
    count = 0
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                count += 1
                if count > MAX_FILES:
                    raise ManifestError(f"{root}: more than {MAX_FILES} entries; not an engine directory")
                rel = prefix + entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise ManifestError(
                        f"{root / rel}: is a symbolic link (to {os.readlink(entry.path)!r}); engine directories "
                        "hold regular files and folders only"
                    )
                if stat.S_ISDIR(st.st_mode):
                    if rel.count("/") >= MAX_DEPTH:
                        raise ManifestError(f"{root / rel}: folders nested deeper than {MAX_DEPTH}")
                    stack.append((Path(entry.path), rel + "/"))
                elif not stat.S_ISREG(st.st_mode):
                    raise ManifestError(f"{root / rel}: not a regular file (a FIFO, socket or device)")
                elif rel != MANIFEST_NAME:
                    if st.st_nlink > 1:
                        raise ManifestError(
                            f"{root / rel}: has {st.st_nlink} hard links; engine files must not be shared with "
                            "files outside the directory (copy it with `cp -r`)"
                        )
                    found[rel] = st.st_size
    return found


# --- what files inside the directory name -----------------------------------------------------------

_REFERENCE_KEYS = re.compile(r".*_files?$")  # tokenizer_file, vocab_file, ...: file references in HF configs
_JSON_SCAN_BYTES = 8 << 20


def _references(node: Any, where: str) -> Iterator[tuple[str, str]]:
    stack = [(node, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, dict):
            for key, sub in value.items():
                if key == "weight_map" and isinstance(sub, dict):  # safetensors / bin shard index
                    yield from ((f"{at}.weight_map[{k!r}]", v) for k, v in sub.items())
                elif _REFERENCE_KEYS.fullmatch(str(key)):
                    items = sub if isinstance(sub, list) else [sub]
                    yield from ((f"{at}.{key}", v) for v in items if isinstance(v, str))
                else:
                    stack.append((sub, f"{at}.{key}"))
        elif isinstance(value, list):
            stack.extend((v, at) for v in value)


def check_file_references(root: Path, files: Mapping[str, dict], folders: list[str]) -> None:
    """JSON configs that Transformers reads (in `folders`: processor/, tokenizer/, the checkpoint
    folder) name other files only inside the directory: a shard index (`weight_map`) or a `*_file`
    entry naming '../x' or '/x' would make from_pretrained read outside it."""
    prefixes = tuple(folder.rstrip("/") + "/" for folder in folders)
    for rel, entry in files.items():
        if not rel.startswith(prefixes) or not rel.endswith(".json") or entry["bytes"] > _JSON_SCAN_BYTES:
            continue
        path = root / rel
        data = parse_json(read_regular(path, _JSON_SCAN_BYTES), path)
        for at, value in _references(data, rel):
            try:
                check_relative_path(value, at)
            except ManifestError as exc:
                raise ManifestError(f"{path}: {exc}") from None


# --- the external checkpoint --------------------------------------------------------------------------


def check_external_checkpoint(root: Path, ext: dict | None) -> None:
    """The external checkpoint (the manifest's `external_checkpoint`) is where the build found it,
    unchanged (config, tokenizer, index hashes; weight sizes). A missing or changed checkpoint is an
    error naming the file."""
    if ext is None:
        return
    folder = Path(ext["path"])
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(folder)]) == real_root:
        raise ManifestError(f"{folder}: external_checkpoint lies inside the engine directory; list its files instead")
    if not folder.is_dir():
        raise ManifestError(
            f"{root}: the checkpoint the engine was built from, {folder}, is missing "
            "(it is referenced, never copied); restore it there or rebuild the engine directory"
        )
    want, got = ext["fingerprint"], fingerprint(folder, strict=False)
    for rel in sorted(set(want) | set(got)):
        if rel not in got:
            problem = "is missing"
        elif rel not in want:
            problem = "was added after the build"
        elif got[rel] != want[rel]:
            problem = f"changed since the build ({want[rel].get('bytes')} -> {got[rel].get('bytes')} bytes)"
        else:
            continue
        raise ManifestError(
            f"{folder / rel}: {problem}; the engine directory {root} was built from another state of "
            "this checkpoint: rebuild it with `apet build`"
        )
