"""Read and verify an engine directory (docs/ENGINE_DIR.md, format version 1).

The runtime trusts nothing in an engine directory that the manifest does not describe and checksum:
`read_manifest` parses and checks the schema, `verify_files` compares every file on disk with the
`files` table (missing, changed size or sha256, unlisted -> an error naming the file).
This module never imports `export` (the writer); a test round-trips the two.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "apet-trt-engine"
SUPPORTED_MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
_REQUIRED = (
    "format",
    "manifest_version",
    "model",
    "vision",
    "num_visual_tokens",
    "llm",
    "prompt_template",
    "image_token",
    "io",
    "batch",
    "engines",
    "decoder",
    "files",
)
_HASH_CHUNK = 1 << 20


class ManifestError(ValueError):
    """An engine directory that does not match its manifest (or has none that we can read)."""


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest.json of one engine directory, with typed accessors for what the
    runtime uses. `data` is the whole JSON object."""

    root: Path
    data: dict[str, Any] = field(repr=False)

    # -- the numbers every stage needs ----------------------------------------------------
    @property
    def num_patches(self) -> int:
        return int(self.data["vision"]["num_patches"])

    @property
    def num_visual_tokens(self) -> int:
        return int(self.data["num_visual_tokens"])

    @property
    def apet(self) -> dict | None:
        return self.data.get("apet")

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
        return self.data["model"].get("family", "llava")

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

    def path_of(self, relative_or_absolute: str) -> Path:
        """A path named in the manifest: relative to the engine directory, or absolute."""
        p = Path(relative_or_absolute)
        return p if p.is_absolute() else self.root / p

    def engine_path(self, kind: str) -> Path | None:
        name = (self.data.get("engines") or {}).get(kind)
        return None if name is None else self.path_of(name)

    def summary(self) -> str:
        """A few human-readable lines (what `apet inspect` prints)."""
        d, v, llm = self.data, self.vision, self.llm
        apet = self.apet
        if apet:
            comp = f"ApET keep={apet['keep']} basis={apet['basis']} merge={apet['merge']} start={apet['start']}"
        else:
            comp = "no compression"
        trt_plan = d["engines"].get("tensorrt")
        dec = d["decoder"]
        hf = dec.get("transformers")
        lines = [
            f"engine dir   {self.root}",
            f"model        {d['model'].get('id')} ({d['model'].get('source')}, family {self.family})",
            f"vision       layer {v.get('feature_layer')} ({v.get('select_strategy')}), image {v.get('image_size')}px, "
            f"patch {v.get('patch_size')}, N={self.num_patches}, D={v.get('feature_dim')}",
            f"compression  {comp}: {self.num_patches} -> {self.num_visual_tokens} tokens",
            f"llm          hidden {llm.get('hidden_size')}, vocab {llm.get('vocab_size')}, image token "
            f"{llm.get('image_token_id')}, dtype {llm.get('dtype')}",
            f"batch        {d['batch'].get('min')}..{d['batch'].get('max')} (opt {d['batch'].get('opt')})",
            f"engines      onnx={d['engines'].get('onnx')} tensorrt={trt_plan}",
            f"decoder      transformers={hf and hf.get('checkpoint')} ({hf and hf.get('weights')}), "
            f"tensorrt_llm={(dec.get('tensorrt_llm') or {}).get('engine_dir')}",
            f"files        {len(d['files'])} checksummed",
        ]
        return "\n".join(lines)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(engine_dir: str | os.PathLike) -> Manifest:
    """Parse `engine_dir/manifest.json` and check its format and version (files are not
    hashed here: see `verify_files`)."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"engine directory {root} does not exist or is not a directory")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; this is not an engine directory built by `apet build`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an apet-trt manifest (format != {FORMAT!r})")
    version = data.get("manifest_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: manifest_version must be a positive integer, got {version!r}")
    if version > SUPPORTED_MANIFEST_VERSION:
        raise ManifestError(
            f"{path}: manifest_version {version} is newer than this runtime supports "
            f"({SUPPORTED_MANIFEST_VERSION}); upgrade apet-trt or rebuild the engine directory"
        )
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ManifestError(f"{path}: missing fields {missing}")
    if not isinstance(data["files"], dict):
        raise ManifestError(f"{path}: 'files' must be an object of path -> {{sha256, bytes}}")
    return Manifest(root=root, data=data)


def _files_on_disk(root: Path) -> list[str]:
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def verify_files(manifest: Manifest, *, progress: bool = False) -> None:
    """Every listed file exists with the listed size and sha256, and no other file is present.
    Raises ManifestError naming the first file at fault."""
    root = manifest.root
    listed: dict = manifest.data["files"]
    unlisted = sorted(set(_files_on_disk(root)) - set(listed))
    if unlisted:
        raise ManifestError(
            f"{root / unlisted[0]}: file not listed in the manifest "
            f"({len(unlisted)} unlisted file(s)); the directory was changed after the build"
        )
    items = sorted(listed.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc="verify", unit="file", leave=False, disable=None)  # None: off when not a TTY
    for rel, entry in items:
        path = root / rel
        if not path.is_file():
            raise ManifestError(f"{path}: listed in the manifest but missing")
        try:
            want_bytes, want_sha = int(entry["bytes"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{root / MANIFEST_NAME}: bad files entry for {rel!r}: {entry!r}") from exc
        size = path.stat().st_size
        if size != want_bytes:
            raise ManifestError(
                f"{path}: size {size} bytes differs from the manifest's {want_bytes} (truncated or replaced)"
            )
        if sha256_file(path) != want_sha:
            raise ManifestError(f"{path}: sha256 differs from the manifest (corrupt or modified)")


def load_manifest(engine_dir: str | os.PathLike, *, verify: bool = True, progress: bool = False) -> Manifest:
    """read_manifest + verify_files: what `runtime.load` and `apet inspect` call."""
    manifest = read_manifest(engine_dir)
    if verify:
        verify_files(manifest, progress=progress)
    return manifest
