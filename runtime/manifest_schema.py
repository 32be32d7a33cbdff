"""The manifest schema (docs/ENGINE_DIR.md, manifest_version 2): one table of fields and a list of
rules across fields, checked by runtime/manifest.py before anything else reads a manifest.

SCHEMA maps a dotted field name to a Field (type, range, choices, pattern, path kind): `NAME.*`
declares every value of an object, `NAME[]` every item of a list; an object refuses keys the table
does not declare unless it is `open`. Adding a field is one line. A family adapter checks its own
object against a table of the same form with `check_fields` (through `Manifest.section`).
Errors name the field: `io.outputs[1].shape: ...`.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

FORMAT = "apet-trt-engine"
SUPPORTED_MANIFEST_VERSION = 2
MANIFEST_NAME = "manifest.json"
MAX_FILES = 100_000  # entries in one engine directory
MAX_PATH_CHARS = 1024
_SHA256 = r"[0-9a-f]{64}"
_NAME = r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}"  # tensor names and symbolic dimensions
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


class ManifestError(ValueError):
    """An engine directory that does not match its manifest (or has none that we can read)."""


# --- the schema -------------------------------------------------------------------------------------


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


def _int(lo: int, hi: int, **kw) -> Field:
    return Field("int", lo=lo, hi=hi, **kw)


def _str(**kw) -> Field:
    return Field("str", max_len=kw.pop("max_len", 4096), **kw)


_ID = _int(0, 1 << 24, null=True)  # token ids; < llm.vocab_size checked by a rule
_COUNT = _int(1, 1 << 24)


def _io(prefix: str) -> dict[str, Field]:
    """An engine's named inputs and outputs: a string dim is dynamic (its name), a number static."""
    out = {prefix: Field("object")}
    for side in ("inputs", "outputs"):
        out.update(
            {
                f"{prefix}.{side}": Field("list", max_len=16),
                f"{prefix}.{side}[]": Field("object"),
                f"{prefix}.{side}[].name": _str(pattern=_NAME),
                f"{prefix}.{side}[].dtype": _str(choices=DTYPES),
                f"{prefix}.{side}[].shape": Field("list", max_len=8),
                f"{prefix}.{side}[].shape[]": Field("dim"),
            }
        )
    return out


def _engines(prefix: str) -> dict[str, Field]:
    return {
        prefix: Field("object"),
        f"{prefix}.onnx": _str(path="file"),
        f"{prefix}.tensorrt": _str(null=True, path="file"),
    }


_PRECISION = r"fp32|fp16|bf16|mixed:[a-z0-9+]{1,32}"

SCHEMA: dict[str, Field] = {
    "format": _str(choices=(FORMAT,)),
    "manifest_version": _int(1, 1 << 16),
    "created_utc": _str(required=False, max_len=64),
    "model": Field("object"),
    "model.id": _str(),  # a label (preset name or the path as given): never opened
    "model.source": _str(choices=("preset", "path")),
    "model.family": _str(pattern=r"[a-z][a-z0-9_]{0,63}"),
    # the one reference outside the directory: a checkpoint built by path, never copied
    "external_checkpoint": Field("object", null=True),
    "external_checkpoint.path": _str(),
    "external_checkpoint.fingerprint": Field("object", max_len=MAX_FILES),
    "external_checkpoint.fingerprint.*": Field("object"),
    "external_checkpoint.fingerprint.*.bytes": _int(0, 1 << 50),
    "external_checkpoint.fingerprint.*.sha256": _str(required=False, pattern=_SHA256),
    # the family's facts (a family adds its own here, one line each)
    "vision": Field("object"),
    "vision.feature_layer": _int(-1024, 1023, required=False),  # llava, video_llava
    "vision.select_strategy": _str(required=False, choices=("default", "full")),
    "vision.image_size": _int(1, 16384, required=False),  # a fixed input size (not Qwen2.5-VL's)
    "vision.patch_size": _int(1, 16384),
    "vision.num_patches": _int(1, 1 << 20, null=True),  # null: N varies with the image
    "vision.feature_dim": _int(1, 1 << 16),
    "vision.num_frames": _int(1, 4096, required=False),  # video_llava: frames sampled per video
    "vision.image_rows": _int(1, 1 << 20, required=False),  # video_llava: rows of a still image
    "vision.frame_sampling": _str(required=False, choices=("transformers", "official")),  # video_llava
    "vision.temporal_patch_size": _int(1, 64, required=False),  # qwen2_5_vl: dynamic resolution
    "vision.spatial_merge_size": _int(1, 64, required=False),
    "vision.window_size": _int(1, 16384, required=False),
    "vision.fullatt_block_indexes": Field("list", required=False, max_len=1024),
    "vision.fullatt_block_indexes[]": _int(0, 1023),
    "vision.min_tokens": _int(1, 1 << 20, required=False),  # rows of an image: the processor's range
    "vision.max_tokens": _int(1, 1 << 20, required=False),
    "qwen2_5_vl": Field("object", required=False, open=True),  # the family's facts (its adapter checks them)
    # llava_next: the anyres layout (runtime/families/llava_next.py)
    "llava_next": Field("object", required=False),
    "llava_next.image_grid_pinpoints": Field("list", max_len=64),  # [[height, width], ...]
    "llava_next.image_grid_pinpoints[]": Field("list", max_len=2),
    "llava_next.image_grid_pinpoints[][]": _int(1, 16384),
    "llava_next.image_newline": _str(path="file"),  # safetensors {"image_newline": float32 [hidden]}
    "llava_next.max_rows_per_image": _int(1, 1 << 24),
    "apet": Field("object", null=True),  # its values: apet_ops.ApetConfig (checked by a rule)
    "apet.keep": _int(1, 1 << 20, null=True),
    "apet.keep_ratio": Field("number", required=False, null=True, lo=0.0, hi=1.0),
    "apet.basis": _int(1, 4096),
    "apet.merge": Field("bool"),
    "apet.ridge": Field("number", lo=1e-30, hi=1e3),
    "apet.start": _int(0, 1 << 20),
    "apet.seed_placement": _str(required=False, max_len=32),
    "apet.seed_blend": Field("number", required=False, lo=0.0, hi=1.0),
    "apet.layout": _str(required=False, max_len=32),
    "num_visual_tokens": _int(1, 1 << 20, null=True),  # null: rows vary with the image
    # paper parity (export/parity.py): ApET inside the LLM, drawn FPS starts, pad to square
    "llm_stage": Field("object", required=False, null=True),  # {"layer", **ApetConfig} (checked by a rule)
    "llm_stage.layer": _int(1, 4096),
    "llm_stage.keep": _int(1, 1 << 20),
    "llm_stage.basis": _int(1, 4096),
    "llm_stage.merge": Field("bool"),
    "llm_stage.ridge": Field("number", lo=1e-30, hi=1e3),
    "llm_stage.start": _int(0, 1 << 20),
    "llm_stage.seed_placement": _str(required=False, max_len=32),
    "random_start": Field("object", required=False, null=True),
    "random_start.seed": _int(0, (1 << 63) - 1),
    "image_aspect": _str(required=False, choices=("default", "pad")),
    "video_token": _str(required=False, max_len=64, pattern=r"[^{}\s]+"),
    "llm": Field("object"),
    "llm.hidden_size": _int(1, 1 << 16),
    "llm.vocab_size": _COUNT,
    "llm.image_token_id": _int(0, 1 << 24),
    "llm.video_token_id": _int(0, 1 << 24, required=False),
    "llm.dtype": _str(choices=("float32", "float16", "bfloat16")),
    "llm.max_position_embeddings": _COUNT,
    "llm.pad_token_id": _ID,
    "llm.eos_token_id": _ID,
    "llm.bos_token_id": _ID,
    "prompt_template": _str(),
    "image_token": _str(max_len=64, pattern=r"[^{}\s]+"),
    **_io("io"),
    "batch": Field("object"),
    "batch.min": _int(1, 4096),
    "batch.opt": _int(1, 4096),
    "batch.max": _int(1, 4096),
    "precision": Field("object"),
    "precision.vision": _str(null=True, pattern=_PRECISION),
    "precision.compressor": _str(null=True, choices=("fp32",)),  # null without ApET
    "processor": Field("object", open=True),  # the processor's to_dict(), informational
    **_engines("engines"),
    # a family's other vision engines (Video-LLaVA's image tower), each with its own io and files
    "parts": Field("object", required=False, max_len=16),
    "parts.*": Field("object"),
    **_io("parts.*.io"),
    **_engines("parts.*.engines"),
    # what built each TensorRT plan (runtime/plans.py)
    "plans": Field("object", required=False, max_len=16),
    "plans.*": Field("object"),
    "plans.*.tensorrt": _str(null=True, max_len=64),
    "plans.*.gpu": _str(null=True, max_len=256),
    "plans.*.compute_capability": _str(null=True, max_len=16),
    "plans.*.strongly_typed": Field("bool", null=True),
    "plans.*.dtypes": Field("object", max_len=16),
    "plans.*.dtypes.*": _str(null=True, pattern=r"[a-z0-9:+]{1,32}"),  # fp16, float16, mixed:fp16+fp32
    "plans.*.tensorrt_llm": _str(required=False, null=True, max_len=64),
    "decoder": Field("object"),
    "decoder.transformers": Field("object", null=True),
    "decoder.transformers.checkpoint": _str(null=True, path="folder"),  # null: external_checkpoint
    "decoder.transformers.weights": _str(choices=("saved", "random-seeded")),
    "decoder.transformers.seed": _int(0, (1 << 63) - 1, required=False),
    "decoder.transformers.config": _str(required=False, path="file"),
    "decoder.tensorrt_llm": Field("object", null=True),
    "decoder.tensorrt_llm.engine_dir": _str(path="folder"),
    "decoder.tensorrt_llm.max_multimodal_len": _COUNT,
    "decoder.tensorrt_llm.max_batch_size": _int(1, 4096),
    "decoder.tensorrt_llm.max_input_len": _COUNT,
    "decoder.tensorrt_llm.max_seq_len": _COUNT,
    "decoder.tensorrt_llm.dtype": _str(choices=("float32", "float16", "bfloat16")),
    "versions": Field("object", open=True),
    "versions.*": _str(null=True, max_len=256),
    "build": Field("object", required=False, open=True),  # the build options, informational
    "files": Field("object", max_len=MAX_FILES),
    "files.*": Field("object"),
    "files.*.sha256": _str(pattern=_SHA256),
    "files.*.bytes": _int(0, 1 << 50),
}

# Folders the runtime reads by their fixed names (the checkpoint's processor and tokenizer).
FIXED_FOLDERS = ("processor", "tokenizer")


class _Invalid(ManifestError):
    """A schema or rule violation: the field (dotted, with list indices) and what is wrong."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


def _describe(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _check_value(value: Any, where: str, f: Field) -> None:
    if value is None:
        if not f.null:
            raise _Invalid(where, "must not be null")
        return
    kind = f.kind
    if kind == "dim":
        if isinstance(value, str):
            kind, f = "str", Field("str", pattern=_NAME)
        else:
            kind, f = "int", _int(1, 1 << 31)
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
        raise _Invalid(where, f"must be {article} {kind}, got {_describe(value)}")
    if kind in ("int", "number"):
        if not math.isfinite(value) or (f.lo is not None and value < f.lo) or (f.hi is not None and value > f.hi):
            raise _Invalid(where, f"must be in {f.lo:g}..{f.hi:g}, got {_describe(value)}")
    if f.choices and value not in f.choices:
        raise _Invalid(where, f"must be one of {list(f.choices)}, got {_describe(value)}")
    if f.max_len is not None and len(value) > f.max_len:
        raise _Invalid(where, f"longer than {f.max_len}")
    if kind == "str":
        if "\x00" in value:
            raise _Invalid(where, "holds a NUL character")
        if f.pattern is not None and not re.fullmatch(f.pattern, value):
            raise _Invalid(where, f"{_describe(value)} is not of the form {f.pattern}")
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
                    raise _Invalid(_join(where, key), "missing")
                continue
            _check_tree(value[key], _join(where, key), _join(name, key), schema, sub)
        for key in value:
            if key in members:
                continue
            if wildcard is not None:
                _check_tree(value[key], _join(where, key), _join(name, "*"), schema, wildcard)
            elif not f.open:
                raise _Invalid(
                    _join(where, key), f"unknown field (not in manifest_version {SUPPORTED_MANIFEST_VERSION})"
                )
    elif isinstance(value, list):
        item = schema.get(name + "[]")
        if item is not None:
            for i, v in enumerate(value):
                _check_tree(v, f"{where}[{i}]", name + "[]", schema, item)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def check_fields(data: Any, schema: Mapping[str, Field], where: str = "") -> None:
    """Check `data` against a schema table of the SCHEMA form (names relative to `data`); raises
    ManifestError naming the field (prefixed by `where`). What a family adapter calls on its own
    object, through `Manifest.section`."""
    _check_tree(data, where, "", schema, Field("object"))


def validate(data: dict) -> None:
    """The whole manifest against SCHEMA, then RULES; raises ManifestError naming the field."""
    _check_tree(data, "", "", SCHEMA, Field("object"))
    for rule in RULES:
        rule(data)


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
        raise _Invalid(where, problem)
    return PurePosixPath(value)


# --- facts across fields ------------------------------------------------------------------------------


def _fail(where: str, message: str):
    raise _Invalid(where, message)


def _rule_tokens(d: dict) -> None:
    """apet is a valid apet_ops.ApetConfig for N, and T is the rows it gives (N without ApET)."""
    from apet_trt.apet_ops.config import ApetConfig

    n, t, apet = d["vision"]["num_patches"], d["num_visual_tokens"], d["apet"]
    if "image_size" in d["vision"] and d["vision"]["patch_size"] > d["vision"]["image_size"]:
        _fail("vision.patch_size", "larger than vision.image_size")
    if apet is None:
        if t != n:
            _fail("num_visual_tokens", f"must equal vision.num_patches={n} when apet is null, got {t}")
        return
    try:
        config = ApetConfig.from_dict(apet)
        if n is not None:
            config.validate_for(n)
    except (TypeError, ValueError) as exc:
        _fail("apet", str(exc).replace("ApetConfig.", "apet."))
    if n is not None and t is not None and config.output_rows(n) != t:
        _fail("num_visual_tokens", f"{t} differs from the {config.output_rows(n)} rows apet gives for N={n}")


def _rule_llm_stage(d: dict) -> None:
    """llm_stage is a valid image-layout apet_ops.ApetConfig with a fixed keep, below the rows the
    vision stage hands the LLM per engine item; a random start has something to draw for."""
    from apet_trt.apet_ops.config import ApetConfig

    stage = d.get("llm_stage")
    if stage is not None:
        try:
            config = ApetConfig.from_dict({k: v for k, v in stage.items() if k != "layer"})
        except (TypeError, ValueError) as exc:
            _fail("llm_stage", str(exc).replace("ApetConfig.", "llm_stage."))
        t = d["num_visual_tokens"]
        if t is not None and config.keep >= t:
            _fail("llm_stage.keep", f"must be below num_visual_tokens={t}, got {config.keep}")
    if d.get("random_start") is not None and d["apet"] is None and stage is None:
        _fail("random_start", "set, but neither apet nor llm_stage draws a start")


def _rule_batch(d: dict) -> None:
    b = d["batch"]
    if b["min"] != 1:
        _fail("batch.min", f"must be 1 (requests of one image are sent as a batch of 1), got {b['min']}")
    if not b["min"] <= b["opt"] <= b["max"]:
        _fail("batch.opt", f"must lie in batch.min..batch.max = {b['min']}..{b['max']}, got {b['opt']}")


def _rule_io(d: dict) -> None:
    for prefix, io in [("io", d["io"]), *((f"parts.{k}.io", p["io"]) for k, p in (d.get("parts") or {}).items())]:
        for side in ("inputs", "outputs"):
            names = [x["name"] for x in io[side]]
            if not names or len(set(names)) != len(names):
                _fail(f"{prefix}.{side}", f"names must be present and unique, got {names}")
        outputs = {o["name"]: (i, o) for i, o in enumerate(io["outputs"])}
        if set(outputs) != {"embeddings", "positions"}:
            _fail(f"{prefix}.outputs", f"must be 'embeddings' and 'positions', got {sorted(outputs)}")
        # [items, T, H] and [items, T]; or one call's rows, [rows, H] and [rows] (items of different
        # sizes, Qwen2.5-VL)
        lead = len(io["outputs"][outputs["positions"][0]]["shape"]) - 1
        for name, dtype, rank in (("embeddings", "float32", 2 + lead), ("positions", "int64", 1 + lead)):
            i, o = outputs[name]
            if o["dtype"] != dtype:
                _fail(f"{prefix}.outputs[{i}].dtype", f"{name} must be {dtype}, got {o['dtype']!r}")
            if len(o["shape"]) != rank or lead not in (0, 1):
                _fail(f"{prefix}.outputs[{i}].shape", f"{name} must have rank {rank}, got {o['shape']}")
    t, h = d["num_visual_tokens"], d["llm"]["hidden_size"]
    outputs = {o["name"]: (i, o) for i, o in enumerate(d["io"]["outputs"])}
    lead = len(outputs["positions"][1]["shape"]) - 1
    for name, dims in (("embeddings", [t, h]), ("positions", [t])):
        i, o = outputs[name]
        want = ["items"] * lead + [x if x is not None else "rows" for x in dims]
        if any(w is not None and isinstance(g, int) and g != w for g, w in zip(o["shape"][lead:], dims)):
            _fail(f"io.outputs[{i}].shape", f"{name} must be {want} (T and llm.hidden_size), got {o['shape']}")
    first = d["io"]["inputs"][0]
    size = d["vision"].get("image_size")
    if len(first["shape"]) == 4 and first["shape"][1:] != [3, size, size]:
        _fail("io.inputs[0].shape", f"an image input must be [items, 3, {size}, {size}], got {first['shape']}")


def _rule_template(d: dict) -> None:
    template, token = d["prompt_template"], d["image_token"]
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        _fail("prompt_template", f"not a valid format string ({exc})")
    if fields != [("prompt", "", None)]:
        _fail("prompt_template", f"must hold the field {{prompt}} exactly once and no other, got {template!r}")
    if template.count(token) != 1:
        _fail("prompt_template", f"must hold image_token {token!r} exactly once, got {template!r}")
    video = d.get("video_token")
    if (video is None) != ("video_token_id" not in d["llm"]):
        _fail("video_token", "and llm.video_token_id go together")
    if video is not None and (video in token or token in video):
        _fail("video_token", f"{video!r} overlaps image_token {token!r}")


def _rule_token_ids(d: dict) -> None:
    llm = d["llm"]
    for key in ("image_token_id", "video_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
        if llm.get(key) is not None and llm[key] >= llm["vocab_size"]:
            _fail(f"llm.{key}", f"{llm[key]} is not below llm.vocab_size={llm['vocab_size']}")


def _rule_decoder(d: dict) -> None:
    ext, source, hf = d["external_checkpoint"], d["model"]["source"], d["decoder"]["transformers"]
    if (source == "path") != (ext is not None):
        _fail("external_checkpoint", "must be set exactly when model.source is 'path'")
    if ext is not None:
        p = ext["path"]
        if not p.startswith("/") or os.path.normpath(p) != p or "\\" in p:
            _fail("external_checkpoint.path", f"must be an absolute, normalised path, got {p!r}")
    if hf is None:
        return
    if hf["checkpoint"] is None and ext is None:
        _fail("decoder.transformers.checkpoint", "null (the external checkpoint) but external_checkpoint is null")
    if hf["weights"] == "random-seeded" and ("seed" not in hf or "config" not in hf):
        _fail("decoder.transformers", "random-seeded weights need 'seed' and 'config'")


def _rule_paths(d: dict) -> None:
    """Every path the runtime opens is listed in `files` (a folder: some file under it)."""
    files = d["files"]
    for rel in files:
        check_relative_path(rel, f"files[{rel!r}]")
        if rel == MANIFEST_NAME:
            _fail("files", "lists manifest.json itself")
    for name, f in SCHEMA.items():
        if f.path is None:
            continue
        for where, value in _values(d, name):
            if value is None:
                continue
            if f.path == "file" and value not in files:
                _fail(where, f"{value!r} is not listed in files")
            if f.path == "folder" and not lists_folder(files, value):
                _fail(where, f"folder {value!r} has no file listed in files")
    for folder in FIXED_FOLDERS:
        if not lists_folder(files, folder):
            _fail("files", f"lists no file under {folder}/ (the checkpoint's {folder})")


def _values(d: dict, dotted: str) -> list[tuple[str, Any]]:
    """(field, value) for a dotted schema name, `*` expanded over an object's keys."""
    found = [("", d)]
    for key in dotted.split("."):
        step = []
        for where, node in found:
            if not isinstance(node, dict):
                continue
            keys = list(node) if key == "*" else [key] if key in node else []
            step += [(_join(where, k), node[k]) for k in keys]
        found = step
    return found


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def transformers_folders(d: dict) -> list[str]:
    """The folders of the directory that Transformers reads with from_pretrained."""
    hf = d["decoder"]["transformers"]
    return [*FIXED_FOLDERS, *([hf["checkpoint"]] if hf and hf["checkpoint"] else [])]


def _rule_no_pickles(d: dict) -> None:
    """No pickled weights where Transformers loads from: unpickling can run code."""
    prefixes = tuple(f.rstrip("/") + "/" for f in transformers_folders(d))
    for rel in d["files"]:
        if rel.startswith(prefixes) and rel.endswith(PICKLE_SUFFIXES):
            _fail(
                f"files[{rel!r}]",
                "a pickle file where Transformers loads from (unpickling can run code); save with safetensors",
            )


def lists_folder(files: Mapping[str, Any], folder: str) -> bool:
    prefix = folder.rstrip("/") + "/"
    return any(rel.startswith(prefix) for rel in files)


RULES: list[Callable[[dict], None]] = [
    _rule_tokens,
    _rule_llm_stage,
    _rule_batch,
    _rule_io,
    _rule_template,
    _rule_token_ids,
    _rule_decoder,
    _rule_paths,
    _rule_no_pickles,
]
