"""Model families on the runtime side, found by the manifest's `model.family` through one table.

A family is one module here (and its export counterpart, export/models/<family>.py); adding one is
a line in FAMILIES. The modules are imported only when an engine directory of that family loads.
"""

from __future__ import annotations

import importlib

from ..manifest import Manifest, ManifestError
from .base import EngineBatch, PatchMap, RuntimeFamily, VisualRows

FAMILIES: dict[str, str] = {  # manifest model.family -> "module:class"
    "llava": "apet_trt.runtime.families.llava:LlavaFamily",
    "llava_next": "apet_trt.runtime.families.llava_next:LlavaNextFamily",
    "qwen2_5_vl": "apet_trt.runtime.families.qwen2_5_vl:Qwen25VLFamily",
    "qwen3_vl": "apet_trt.runtime.families.qwen3_vl:Qwen3VLFamily",
    "video_llava": "apet_trt.runtime.families.video_llava:VideoLlavaFamily",
}


def family_class(name: str) -> type[RuntimeFamily]:
    if name not in FAMILIES:
        raise ManifestError(
            f"model family {name!r} is not supported by this runtime (supported: "
            f"{', '.join(sorted(FAMILIES))}); upgrade apet-trt"
        )
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def family_for(manifest: Manifest) -> RuntimeFamily:
    """The runtime adapter of the engine directory's family."""
    return family_class(manifest.family)(manifest)


__all__ = ["FAMILIES", "EngineBatch", "PatchMap", "RuntimeFamily", "VisualRows", "family_class", "family_for"]
