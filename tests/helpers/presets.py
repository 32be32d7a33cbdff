"""Helpers (no tests here): engine directories of the embedded presets, built with `apet build` once
per test run for a given set of options and copied for each test module that asks (building a tiny
preset exports and checks an ONNX graph; copying is cheap)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_BUILT: dict[tuple, Path] = {}


def built_preset(root: Path, **options) -> Path:
    """`build(BuildConfig(out=root, **options))` for a preset, from this run's cache when built already."""
    from apet_trt.export.build import BuildConfig, build

    key = tuple(sorted(options.items()))
    if key not in _BUILT:
        cache = Path(tempfile.mkdtemp(prefix="apet-test-preset-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        build(BuildConfig(out=str(cache / "engine"), **options), quiet=True)
        _BUILT[key] = cache / "engine"
    shutil.copytree(_BUILT[key], root, dirs_exist_ok=True)
    return Path(root)
