"""Model families on the export side, found through one table: by name (a preset's family, the
manifest's model.family) or by a checkpoint's Hugging Face model_type.

A family is one module here (and its runtime counterpart, runtime/families/<family>.py); adding one
is a line in FAMILIES. The modules are imported only when a model of that family is built.
"""

from __future__ import annotations

import importlib

from .base import EnginePart, ExportFamily, LoadedModel, Preset

FAMILIES: dict[str, str] = {  # family name -> "module:class"
    "llava": "apet_trt.export.models.llava:LlavaExport",
    "llava_next": "apet_trt.export.models.llava_next:LlavaNextExport",
    "qwen2_5_vl": "apet_trt.export.models.qwen2_5_vl:Qwen25VLExport",
    "qwen3_vl": "apet_trt.export.models.qwen3_vl:Qwen3VLExport",
    "video_llava": "apet_trt.export.models.video_llava:VideoLlavaExport",
}


def family_class(name: str) -> type[ExportFamily]:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (supported: {', '.join(sorted(FAMILIES))})")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def family_for_model_type(model_type: str) -> type[ExportFamily]:
    """The family of a checkpoint whose config.json says `model_type`."""
    for name in FAMILIES:
        cls = family_class(name)
        if model_type in cls.model_types:
            return cls
    supported = sorted(t for name in FAMILIES for t in family_class(name).model_types)
    raise ValueError(f"model_type {model_type!r} is not supported yet (supported: {', '.join(supported)})")


__all__ = ["FAMILIES", "EnginePart", "ExportFamily", "LoadedModel", "Preset", "family_class", "family_for_model_type"]
