"""The manifest of an engine directory (docs/ENGINE_DIR.md, manifest_version 2): the table of the
fields every family shares (SCHEMA), each family's own facts joined to it (`schema_for`), and the
rules across fields (RULES). `validate` is what the runtime checks before anything else reads a
manifest, and what `apet build` checks before it commits a directory. Errors name the field:
`io.outputs[1].shape: ...`.

A new common field is one line in SCHEMA; a family's fields live in families/<family>.py.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable
from typing import Any

from .families import family_facts
from .schema import (
    FORMAT,
    MANIFEST_NAME,
    MAX_BASIS,
    MAX_BATCH,
    MAX_FILES,
    NAME_PATTERN,
    SHA256_PATTERN,
    Field,
    Invalid,
    check_fields,
    check_relative_path,
    int_field,
    lists_folder,
    str_field,
)

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")

_ID = int_field(0, 1 << 24, null=True)  # token ids; < llm.vocab_size checked by a rule
_COUNT = int_field(1, 1 << 24)


def _io(prefix: str) -> dict[str, Field]:
    """An engine's named inputs and outputs: a string dim is dynamic (its name), a number static."""
    out = {prefix: Field("object")}
    for side in ("inputs", "outputs"):
        out.update(
            {
                f"{prefix}.{side}": Field("list", max_len=16),
                f"{prefix}.{side}[]": Field("object"),
                f"{prefix}.{side}[].name": str_field(pattern=NAME_PATTERN),
                f"{prefix}.{side}[].dtype": str_field(choices=DTYPES),
                f"{prefix}.{side}[].shape": Field("list", max_len=8),
                f"{prefix}.{side}[].shape[]": Field("dim"),
            }
        )
    return out


def _engines(prefix: str) -> dict[str, Field]:
    return {
        prefix: Field("object"),
        f"{prefix}.onnx": str_field(path="file"),
        f"{prefix}.tensorrt": str_field(null=True, path="file"),
    }


_PRECISION = r"fp32|fp16|bf16|mixed:[a-z0-9+]{1,32}"

SCHEMA: dict[str, Field] = {
    "format": str_field(choices=(FORMAT,)),
    "manifest_version": int_field(1, 1 << 16),
    "created_utc": str_field(required=False, max_len=64),
    "model": Field("object"),
    "model.id": str_field(),  # a label (preset name or the path as given): never opened
    "model.source": str_field(choices=("preset", "path")),
    "model.family": str_field(pattern=r"[a-z][a-z0-9_]{0,63}"),
    # the one reference outside the directory: a checkpoint built by path, never copied
    "external_checkpoint": Field("object", null=True),
    "external_checkpoint.path": str_field(),
    "external_checkpoint.fingerprint": Field("object", max_len=MAX_FILES),
    "external_checkpoint.fingerprint.*": Field("object"),
    "external_checkpoint.fingerprint.*.bytes": int_field(0, 1 << 50),
    "external_checkpoint.fingerprint.*.sha256": str_field(required=False, pattern=SHA256_PATTERN),
    # the family's facts: these three for every family; each adds its own (families/<family>.py)
    "vision": Field("object"),
    "vision.patch_size": int_field(1, 16384),
    "vision.num_patches": int_field(1, 1 << 20, null=True),  # null: N varies with the image
    "vision.feature_dim": int_field(1, 1 << 16),
    "apet": Field("object", null=True),  # its values: apet_ops.ApetConfig (checked by a rule)
    "apet.keep": int_field(1, 1 << 20, null=True),
    "apet.keep_ratio": Field("number", required=False, null=True, lo=0.0, hi=1.0),
    "apet.basis": int_field(1, MAX_BASIS),
    "apet.merge": Field("bool"),
    "apet.ridge": Field("number", lo=1e-30, hi=1e3),
    "apet.start": int_field(0, 1 << 20),
    "apet.seed_placement": str_field(required=False, max_len=32),
    "apet.seed_blend": Field("number", required=False, lo=0.0, hi=1.0),
    "apet.layout": str_field(required=False, max_len=32),
    "num_visual_tokens": int_field(1, 1 << 20, null=True),  # null: rows vary with the image
    # paper parity (export/parity.py): ApET inside the LLM, drawn FPS starts, pad to square
    "llm_stage": Field("object", required=False, null=True),  # {"layer", **ApetConfig} (checked by a rule)
    "llm_stage.layer": int_field(1, 4096),
    "llm_stage.keep": int_field(1, 1 << 20),
    "llm_stage.basis": int_field(1, MAX_BASIS),
    "llm_stage.merge": Field("bool"),
    "llm_stage.ridge": Field("number", lo=1e-30, hi=1e3),
    "llm_stage.start": int_field(0, 1 << 20),
    "llm_stage.seed_placement": str_field(required=False, max_len=32),
    "random_start": Field("object", required=False, null=True),
    "random_start.seed": int_field(0, (1 << 63) - 1),
    "image_aspect": str_field(required=False, choices=("default", "pad")),
    "video_token": str_field(required=False, max_len=64, pattern=r"[^{}\s]+"),
    "llm": Field("object"),
    "llm.hidden_size": int_field(1, 1 << 16),
    "llm.vocab_size": _COUNT,
    "llm.image_token_id": int_field(0, 1 << 24),
    "llm.video_token_id": int_field(0, 1 << 24, required=False),
    "llm.dtype": str_field(choices=("float32", "float16", "bfloat16")),
    "llm.max_position_embeddings": _COUNT,
    "llm.pad_token_id": _ID,
    "llm.eos_token_id": _ID,
    "llm.bos_token_id": _ID,
    "prompt_template": str_field(),
    "image_token": str_field(max_len=64, pattern=r"[^{}\s]+"),
    **_io("io"),
    "batch": Field("object"),
    "batch.min": int_field(1, MAX_BATCH),
    "batch.opt": int_field(1, MAX_BATCH),
    "batch.max": int_field(1, MAX_BATCH),
    "precision": Field("object"),
    "precision.vision": str_field(null=True, pattern=_PRECISION),
    "precision.compressor": str_field(null=True, choices=("fp32",)),  # null without ApET
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
    "plans.*.tensorrt": str_field(null=True, max_len=64),
    "plans.*.gpu": str_field(null=True, max_len=256),
    "plans.*.compute_capability": str_field(null=True, max_len=16),
    "plans.*.strongly_typed": Field("bool", null=True),
    "plans.*.dtypes": Field("object", max_len=16),
    "plans.*.dtypes.*": str_field(null=True, pattern=r"[a-z0-9:+]{1,32}"),  # fp16, float16, mixed:fp16+fp32
    "plans.*.tensorrt_llm": str_field(required=False, null=True, max_len=64),
    "decoder": Field("object"),
    "decoder.transformers": Field("object", null=True),
    "decoder.transformers.checkpoint": str_field(null=True, path="folder"),  # null: external_checkpoint
    "decoder.transformers.weights": str_field(choices=("saved", "random-seeded")),
    "decoder.transformers.seed": int_field(0, (1 << 63) - 1, required=False),
    "decoder.transformers.config": str_field(required=False, path="file"),
    "decoder.tensorrt_llm": Field("object", null=True),
    "decoder.tensorrt_llm.engine_dir": str_field(path="folder"),
    "decoder.tensorrt_llm.max_multimodal_len": _COUNT,
    "decoder.tensorrt_llm.max_batch_size": int_field(1, 4096),
    "decoder.tensorrt_llm.max_input_len": _COUNT,
    "decoder.tensorrt_llm.max_seq_len": _COUNT,
    "decoder.tensorrt_llm.dtype": str_field(choices=("float32", "float16", "bfloat16")),
    "versions": Field("object", open=True),
    "versions.*": str_field(null=True, max_len=256),
    "build": Field("object", required=False, open=True),  # the build options, informational
    "files": Field("object", max_len=MAX_FILES),
    "files.*": Field("object"),
    "files.*.sha256": str_field(pattern=SHA256_PATTERN),
    "files.*.bytes": int_field(0, 1 << 50),
}


# Folders the runtime reads by their fixed names (the checkpoint's processor and tokenizer).
FIXED_FOLDERS = ("processor", "tokenizer")


def schema_for(family: str) -> dict[str, Field]:
    """SCHEMA joined with family `family`'s facts (its vision fields and its own section)."""
    return {**SCHEMA, **family_facts(family).schema()}


def validate(data: Any) -> None:
    """The whole manifest against SCHEMA and its family's facts, then RULES; raises ManifestError
    naming the field."""
    model = data.get("model") if isinstance(data, dict) else None
    family = model.get("family") if isinstance(model, dict) else None
    # a malformed family name is reported by SCHEMA's pattern; a well-formed unknown one by family_facts
    known_form = isinstance(family, str) and re.fullmatch(SCHEMA["model.family"].pattern, family)
    schema = schema_for(family) if known_form else SCHEMA
    check_fields(data, schema)
    for rule in RULES:
        rule(data)
    _check_paths(data, schema)


# --- facts across fields ------------------------------------------------------------------------------


def _fail(where: str, message: str):
    raise Invalid(where, message)


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
    own = dict(family_facts(d["model"]["family"]).outputs)  # the family's outputs beside the two (main io)
    for prefix, io in [("io", d["io"]), *((f"parts.{k}.io", p["io"]) for k, p in (d.get("parts") or {}).items())]:
        for side in ("inputs", "outputs"):
            names = [x["name"] for x in io[side]]
            if not names or len(set(names)) != len(names):
                _fail(f"{prefix}.{side}", f"names must be present and unique, got {names}")
        outputs = {o["name"]: (i, o) for i, o in enumerate(io["outputs"])}
        extra = own if prefix == "io" else {}
        if set(outputs) != {"embeddings", "positions", *extra}:
            want = " and ".join(repr(n) for n in ("embeddings", "positions", *extra))
            _fail(f"{prefix}.outputs", f"must be {want}, got {sorted(outputs)}")
        for name, dtype in extra.items():
            i, o = outputs[name]
            if o["dtype"] != dtype:
                _fail(f"{prefix}.outputs[{i}].dtype", f"{name} must be {dtype}, got {o['dtype']!r}")
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


def _check_paths(d: dict, schema: dict[str, Field]) -> None:
    """Every path the runtime opens (a `path=` field of the schema) is listed in `files` (a folder:
    some file under it)."""
    files = d["files"]
    for rel in files:
        check_relative_path(rel, f"files[{rel!r}]")
        if rel == MANIFEST_NAME:
            _fail("files", "lists manifest.json itself")
    for name, f in schema.items():
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


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


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


RULES: list[Callable[[dict], None]] = [
    _rule_tokens,
    _rule_llm_stage,
    _rule_batch,
    _rule_io,
    _rule_template,
    _rule_token_ids,
    _rule_decoder,
    _rule_no_pickles,
]
