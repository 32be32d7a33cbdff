"""Read and verify an engine directory (docs/ENGINE_DIR.md, manifest_version 2).

The runtime trusts nothing in an engine directory that the manifest does not describe and
checksum, and follows no path out of it:

- `read_manifest` reads manifest.json (a regular file of at most MAX_MANIFEST_BYTES, JSON nested at
  most MAX_DEPTH deep, no duplicate keys, no NaN) and checks it with apet_trt.engine_format's
  `validate` (the common table, the family's own facts, the rules across fields) before anything
  else reads it. Every error is a ManifestError that names the field.
- `verify_files` walks the directory without following links: regular files and folders only (a
  symbolic link, a FIFO or a hard-linked file anywhere is refused), every file listed in `files`
  with its size and sha256, nothing unlisted, JSON files naming other files name them inside the
  directory, and the one reference outside, `external_checkpoint`, matches its fingerprint.
- `Manifest` hands out paths only through accessors that confine them (`file`, `folder`,
  `engine_path`, `transformers_checkpoint`, ...): no caller joins a manifest string to a path.

The schema lives in apet_trt.engine_format (the writer, `apet build`, validates with the same
before it commits a directory); a family's fields are its engine_format/families/<family>.py, read
here through `Manifest.section()` and the typed views. This module never imports `export`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apet_trt.engine_format import (
    FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    MAX_MANIFEST_BYTES,
    SCHEMA,
    Field,
    ManifestError,
    check_relative_path,
    family_facts,
    lists_folder,
    sha256,
    transformers_folders,
    validate,
)

from .engine_files import check_external_checkpoint, check_file_references, parse_json, read_regular, walk

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "Field",
    "Manifest",
    "ManifestError",
    "SCHEMA",
    "load_manifest",
    "read_manifest",
    "verify_files",
]


# --- reading --------------------------------------------------------------------------------------


def _interrupted_hint(root: Path) -> str:
    aside = root.parent / f".{root.name}.replaced"
    if aside.is_dir() and not aside.is_symlink():
        return (
            f"; an interrupted `apet build --force` left the previous engine at {aside}: run the same "
            "`apet build` again (it restores or finishes the replacement), or rename it back"
        )
    return ""


def read_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """Read `engine_dir/manifest.json` and check it against SCHEMA and RULES (files are not read
    here: see `verify_files`)."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"engine directory {root} does not exist or is not a directory{_interrupted_hint(root)}"
        )
    path = root / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path}: no manifest; this is not an engine directory built by `apet build`")
    data = parse_json(read_regular(path, MAX_MANIFEST_BYTES), path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an apet-trt manifest (format != {FORMAT!r})")
    version = data.get("manifest_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: manifest_version must be a positive integer, got {version!r}")
    if version > MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: manifest_version {version} is newer than this runtime supports "
            f"({MANIFEST_VERSION}); upgrade apet-trt or rebuild the engine directory"
        )
    if version < MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: manifest_version {version} is older than this runtime reads "
            f"({MANIFEST_VERSION}: paths confined, checkpoint fingerprinted); rebuild it with `apet build`"
        )
    try:
        validate(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    return Manifest(root=root, data=data)


# --- the parsed manifest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """The checked manifest.json of one engine directory, with typed accessors for what the runtime
    uses and confined paths for what it opens. `data` is the whole JSON object."""

    root: Path
    data: dict[str, Any] = field(repr=False)

    # -- the numbers every stage needs ----------------------------------------------------
    @property
    def num_patches(self) -> int | None:
        """N, the uncompressed rows of one engine item; None when it depends on the image."""
        n = self.data["vision"].get("num_patches")
        return None if n is None else int(n)

    @property
    def num_visual_tokens(self) -> int | None:
        """T, the rows per engine item; None when it depends on the image (dynamic resolution, a ratio)."""
        t = self.data["num_visual_tokens"]
        return None if t is None else int(t)

    @property
    def apet(self) -> dict | None:
        return self.data["apet"]

    @property
    def llm(self) -> dict:
        return self.data["llm"]

    @property
    def vision(self) -> dict:
        return self.data["vision"]

    @property
    def batch_max(self) -> int:
        return int(self.data["batch"]["max"])

    @property
    def image_token(self) -> str:
        return self.data["image_token"]

    @property
    def prompt_template(self) -> str:
        return self.data["prompt_template"]

    @property
    def family(self) -> str:
        return self.data["model"]["family"]

    # -- paper parity (docs/ENGINE_DIR.md; absent in directories built before them) ----------
    @property
    def llm_stage(self) -> dict | None:
        """ApET inside the LLM: {"layer": L, **ApetConfig fields}, or None."""
        return self.data.get("llm_stage")

    @property
    def random_start(self) -> dict | None:
        """{"seed": S} when every FPS start is drawn at run time, else None (fixed starts)."""
        return self.data.get("random_start")

    @property
    def image_aspect(self) -> str:
        """ "default" (the checkpoint processor's own) or "pad" (expand2square first)."""
        return self.data.get("image_aspect", "default")

    @property
    def parts(self) -> list[str]:
        """Names of the vision engines beside the main one (a family with two towers), in order."""
        return list(self.data.get("parts") or {})

    def part(self, name: str) -> Manifest:
        """The manifest as seen by engine part `name`: its own io and engine files, the rest shared."""
        entry = (self.data.get("parts") or {}).get(name)
        if not isinstance(entry, dict) or "io" not in entry or "engines" not in entry:
            raise ManifestError(f"{self.root / MANIFEST_NAME}: no engine part {name!r} with io and engines")
        return Manifest(root=self.root, data={**self.data, "io": entry["io"], "engines": entry["engines"]})

    def section(self) -> dict[str, Any]:
        """The family's own object (engine_format/families/<family>.py names it and its fields; read_manifest
        checked it against them)."""
        key = family_facts(self.family).section
        if key is None:
            raise ManifestError(f"{self.root / MANIFEST_NAME}: the {self.family} family has no section of its own")
        return self.data[key]

    # -- confined paths ----------------------------------------------------------------------
    def _inside(self, rel: str, what: str) -> Path:
        try:
            check_relative_path(rel, what)
        except ManifestError as exc:
            raise ManifestError(f"{self.root / MANIFEST_NAME}: {exc}") from None
        path = self.root / rel
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise ManifestError(f"{path}: resolves outside the engine directory {self.root}")
        return path

    def file(self, rel: str) -> Path:
        """A file of the engine directory that `files` lists."""
        if rel not in self.data["files"]:
            raise ManifestError(f"{self.root / MANIFEST_NAME}: {rel!r} is not listed in files")
        return self._inside(rel, rel)

    def folder(self, rel: str) -> Path:
        """A folder of the engine directory holding listed files."""
        if not lists_folder(self.data["files"], rel):
            raise ManifestError(f"{self.root / MANIFEST_NAME}: folder {rel!r} has no file listed in files")
        return self._inside(rel, rel)

    def path_of(self, rel: str) -> Path:
        """A listed file or folder of the engine directory (never a path outside it)."""
        return self.file(rel) if rel in self.data["files"] else self.folder(rel)

    def engine_path(self, kind: str) -> Path | None:
        name = self.data["engines"].get(kind)
        return None if name is None else self.file(name)

    @property
    def processor_dir(self) -> Path:
        return self.folder("processor")

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder("tokenizer")

    @property
    def external_checkpoint(self) -> Path | None:
        """The one folder outside the engine directory the manifest may name (fingerprinted)."""
        ext = self.data.get("external_checkpoint")
        return None if ext is None else Path(ext["path"])

    def transformers_checkpoint(self) -> Path:
        """The decoder's Transformers checkpoint: a folder of the engine directory, or the external
        checkpoint (verified by verify_files)."""
        entry = self.data["decoder"]["transformers"]
        if entry is None:
            raise RuntimeError(f"{self.root}: the manifest names no Transformers checkpoint (decoder.transformers)")
        if entry["checkpoint"] is None:
            return self.external_checkpoint
        return self.folder(entry["checkpoint"])

    def transformers_config(self) -> Path | None:
        """The config file of seeded random weights (decoder.transformers.config), if any."""
        entry = self.data["decoder"]["transformers"] or {}
        return self.file(entry["config"]) if entry.get("config") else None

    def tensorrt_llm_dir(self) -> Path | None:
        entry = self.data["decoder"]["tensorrt_llm"]
        return None if entry is None else self.folder(entry["engine_dir"])

    def summary(self) -> str:
        """A few human-readable lines (what `apet inspect` prints)."""
        d, v, llm = self.data, self.vision, self.llm
        apet = self.apet
        if apet:
            budget = f"keep={apet['keep']}" if apet.get("keep") is not None else f"keep_ratio={apet.get('keep_ratio')}"
            comp = f"ApET {budget} basis={apet['basis']} merge={apet['merge']} start={apet['start']}"
            if apet.get("seed_blend", 1.0) != 1.0:
                comp += f" seed_blend={apet['seed_blend']}"
        else:
            comp = "no compression"
        n = self.num_patches if self.num_patches is not None else f"{v.get('min_tokens')}..{v.get('max_tokens')}"
        t, per = self.num_visual_tokens, ""
        if t is None:  # N and T vary per image (dynamic resolution)
            t = f"floor({apet['keep_ratio']} N)" if apet and apet.get("keep_ratio") else "N"
            per = " per image"
        dec = d["decoder"]
        hf = dec["transformers"]
        hf_where = hf and (hf["checkpoint"] or "external checkpoint")
        ext = d["external_checkpoint"]
        outside = (
            f"{ext['path']} (outside the directory, never copied; {len(ext['fingerprint'])} files fingerprinted)"
            if ext
            else "none (everything is inside the directory)"
        )
        lines = [
            f"engine dir   {self.root}",
            f"model        {d['model']['id']} ({d['model']['source']}, family {self.family})",
            f"checkpoint   {outside}",
            f"vision       {', '.join(f'{k} {x}' for k, x in v.items() if x is not None)}",
            f"compression  {comp}: {n} -> {t} tokens{per}",
            *self._parity_lines(),
            f"llm          hidden {llm['hidden_size']}, vocab {llm['vocab_size']}, image token "
            f"{llm['image_token_id']}, dtype {llm['dtype']}",
            f"batch        {d['batch']['min']}..{d['batch']['max']} (opt {d['batch']['opt']})",
            f"engines      onnx={d['engines']['onnx']} tensorrt={d['engines']['tensorrt']}",
            *self._precision_lines(),
            f"decoder      transformers={hf_where} ({hf and hf['weights']}), "
            f"tensorrt_llm={(dec['tensorrt_llm'] or {}).get('engine_dir')}",
            f"files        {len(d['files'])} checksummed",
        ]
        return "\n".join(lines)

    def _precision_lines(self) -> list[str]:
        """What the graph computes in, and what built each TensorRT plan (the runtime refuses a plan
        of another TensorRT major.minor or compute capability)."""
        p = self.data.get("precision") or {}
        lines = [f"precision    vision {p.get('vision')}, compressor {p.get('compressor')}"] if p else []
        plans = self.data.get("plans") or {}
        if not plans:
            return [*lines, "plans        none (no TensorRT plan in this directory)"]
        for kind, r in sorted(plans.items()):
            typed = "strongly typed" if r.get("strongly_typed") else "weakly typed"
            lines.append(
                f"plans        {kind}: TensorRT {r.get('tensorrt')} on {r.get('gpu')} (compute capability "
                f"{r.get('compute_capability')}), {typed}"
            )
        return lines

    def _parity_lines(self) -> list[str]:
        stage, rs = self.llm_stage, self.random_start
        lines = []
        if stage:
            lines.append(
                f"llm stage    ApET after decoder layer {stage.get('layer')}: -> {stage.get('keep')} rows per image "
                f"(basis={stage.get('basis')}, seeds by {stage.get('seed_placement')}; Transformers decoder only)"
            )
        if rs:
            lines.append(f"fps start    random, drawn at run time (seed {rs.get('seed')})")
        if self.image_aspect != "default":
            lines.append(f"images       {self.image_aspect} to square before the processor")
        return lines


def check_tree(manifest: Manifest) -> dict[str, int]:
    """The directory holds exactly the listed files, as regular files (no link anywhere): cheap,
    no file is read. Returns relative path -> size."""
    root, listed = manifest.root, manifest.data["files"]
    on_disk = walk(root)
    unlisted = sorted(set(on_disk) - set(listed))
    if unlisted:
        raise ManifestError(
            f"{root / unlisted[0]}: file not listed in the manifest "
            f"({len(unlisted)} unlisted file(s)); the directory was changed after the build"
        )
    for rel in sorted(listed):
        if rel not in on_disk:
            raise ManifestError(f"{root / rel}: listed in the manifest but missing")
    return on_disk


def verify_files(manifest: Manifest, *, progress: bool = False) -> None:
    """check_tree, then every listed file's size and sha256, the files JSON configs name, and the
    external checkpoint's fingerprint. Raises ManifestError naming the first file at fault."""
    root = manifest.root
    on_disk = check_tree(manifest)
    items = sorted(manifest.data["files"].items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="verify", unit="file", leave=False, disable=None)  # None: off when not a TTY
    for rel, entry in items:
        path = root / rel
        if on_disk[rel] != entry["bytes"]:
            raise ManifestError(
                f"{path}: size {on_disk[rel]} bytes differs from the manifest's {entry['bytes']} "
                "(truncated or replaced)"
            )
        if sha256(path) != entry["sha256"]:
            raise ManifestError(f"{path}: sha256 differs from the manifest (corrupt or modified)")
    check_file_references(root, manifest.data["files"], transformers_folders(manifest.data))
    check_external_checkpoint(root, manifest.data["external_checkpoint"])


def load_manifest(engine_dir: str | os.PathLike, *, verify: bool = True, progress: bool = False) -> Manifest:
    """read_manifest, then verify_files (verify=False: only check_tree, which reads no file): what
    `runtime.load` and `apet inspect` call."""
    manifest = read_manifest(engine_dir)
    if verify:
        verify_files(manifest, progress=progress)
    else:
        check_tree(manifest)
    return manifest
