"""The schema engine of the engine-directory format: Field (one manifest field: type, range,
choices, pattern, path kind), `check_fields` (an object against a table of Fields, naming the field
at fault: `io.outputs[1].shape: ...`), relative paths confined to the directory, and the format's
constants and limits. manifest.py holds the tables; export and runtime share both.

A table maps a dotted field name to a Field: `NAME.*` declares every value of an object, `NAME[]`
every item of a list; an object refuses keys the table does not declare unless it is `open`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

FORMAT = "apet-trt-engine"
MANIFEST_VERSION = 2  # what the writer writes and the reader accepts
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20  # the processor config and a few hundred file entries take < 100 KiB
MAX_FILES = 100_000  # entries in one engine directory (and files of an external checkpoint)
MAX_DEPTH = 16  # JSON nesting and folder nesting; the deepest manifest field is 5 levels down
MAX_PATH_CHARS = 1024
SMALL_FILE_BYTES = 16 << 20  # external checkpoint files up to this size are hashed, larger ones sized
NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}"  # tensor names and symbolic dimensions
SHA256_PATTERN = r"[0-9a-f]{64}"


class ManifestError(ValueError):
    """An engine directory that does not match its manifest (or has none that we can read)."""


@dataclass(frozen=True)
class Field:
    """One manifest field. kind: "int" | "number" | "bool" | "str" | "object" | "list" | "dim"
    (a positive int or a symbolic name). lo/hi bound numbers (inclusive), max_len bounds strings,
    lists and objects. An object refuses keys the schema does not declare unless `open`; `NAME.*`
    declares every value of an object, `NAME[]` every item of a list. path: "file" or "folder", a
    relative path inside the engine directory that `files` lists."""

    kind: str
    required: bool = True
    null: bool = False
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    pattern: str | None = None
    max_len: int | None = None
    open: bool = False
    path: str | None = None


def int_field(lo: int, hi: int, **kw) -> Field:
    return Field("int", lo=lo, hi=hi, **kw)


def str_field(**kw) -> Field:
    return Field("str", max_len=kw.pop("max_len", 4096), **kw)


class Invalid(ManifestError):
    """A schema or rule violation: the field (dotted, with list indices) and what is wrong."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _check_value(value: Any, where: str, f: Field) -> None:
    if value is None:
        if not f.null:
            raise Invalid(where, "must not be null")
        return
    kind = f.kind
    if kind == "dim":
        if isinstance(value, str):
            kind, f = "str", Field("str", pattern=NAME_PATTERN)
        else:
            kind, f = "int", int_field(1, 1 << 31)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "object": isinstance(value, dict),
        "list": isinstance(value, list),
    }[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise Invalid(where, f"must be {article} {kind}, got {_describe(value)}")
    if kind in ("int", "number"):
        if not math.isfinite(value) or (f.lo is not None and value < f.lo) or (f.hi is not None and value > f.hi):
            raise Invalid(where, f"must be in {f.lo:g}..{f.hi:g}, got {_describe(value)}")
    if f.choices and value not in f.choices:
        raise Invalid(where, f"must be one of {list(f.choices)}, got {_describe(value)}")
    if f.max_len is not None and len(value) > f.max_len:
        raise Invalid(where, f"longer than {f.max_len}")
    if kind == "str":
        if "\x00" in value:
            raise Invalid(where, "holds a NUL character")
        if f.pattern is not None and not re.fullmatch(f.pattern, value):
            raise Invalid(where, f"{_describe(value)} is not of the form {f.pattern}")
        if f.path is not None:
            check_relative_path(value, where)


def _members(schema: Mapping[str, Field], parent: str) -> dict[str, Field]:
    """The schema entries one level below `parent` ("" for the top), keyed by their last name."""
    out = {}
    for name, f in schema.items():
        if parent:
            if not name.startswith(parent + "."):
                continue
            rest = name[len(parent) + 1 :]
        else:
            rest = name
        if "." not in rest.replace("[]", "") and "[]" not in rest:
            out[rest] = f
    return out


def _check_tree(value: Any, where: str, name: str, schema: Mapping[str, Field], f: Field) -> None:
    _check_value(value, where, f)
    if isinstance(value, dict):
        members = _members(schema, name)
        wildcard = members.pop("*", None)
        for key, sub in members.items():
            if key not in value:
                if sub.required:
                    raise Invalid(_join(where, key), "missing")
                continue
            _check_tree(value[key], _join(where, key), _join(name, key), schema, sub)
        for key in value:
            if key in members:
                continue
            if wildcard is not None:
                _check_tree(value[key], _join(where, key), _join(name, "*"), schema, wildcard)
            elif not f.open:
                raise Invalid(_join(where, key), f"unknown field (not in manifest_version {MANIFEST_VERSION})")
    elif isinstance(value, list):
        item = schema.get(name + "[]")
        if item is not None:
            for i, v in enumerate(value):
                _check_tree(v, f"{where}[{i}]", name + "[]", schema, item)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_fields(data: Any, schema: Mapping[str, Field], where: str = "") -> None:
    """Check `data` against a table of the SCHEMA form (names relative to `data`); raises
    ManifestError naming the field (prefixed by `where`)."""
    _check_tree(data, where, "", schema, Field("object"))


def check_relative_path(value: str, where: str = "path") -> PurePosixPath:
    """A path inside the engine directory: relative, POSIX separators, no '.', '..' or empty parts,
    no backslash, colon or control character. Lexical only (the disk walk refuses links)."""
    problem = None
    if not isinstance(value, str) or not value:
        problem = "must be a non-empty relative path"
    elif len(value) > MAX_PATH_CHARS:
        problem = f"longer than {MAX_PATH_CHARS} characters"
    elif value.startswith("/") or value.startswith("~"):
        problem = f"{value!r} is absolute; paths in an engine directory are relative to it"
    elif "\\" in value or ":" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        problem = f"{value!r} holds a backslash, colon or control character"
    else:
        parts = value.split("/")
        if any(p in ("", ".", "..") for p in parts):
            problem = f"{value!r} has an empty, '.' or '..' part; paths must stay inside the engine directory"
    if problem:
        raise Invalid(where, problem)
    return PurePosixPath(value)


def lists_folder(files: Mapping[str, Any], folder: str) -> bool:
    """`files` (the manifest's table) lists some file under `folder`."""
    prefix = folder.rstrip("/") + "/"
    return any(rel.startswith(prefix) for rel in files)
