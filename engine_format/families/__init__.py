"""Each model family's manifest facts, one module per family (`<family>.py`, its `FACTS`), found by
the manifest's `model.family`: the family's `vision.*` fields and its own top-level section, path
fields included. The common fields are in ../manifest.py; `schema_for(family)` joins the two.

A new family adds its module here and names it from its two adapters (`facts = FACTS` on
export/models/<family>.py and runtime/families/<family>.py); no other file changes.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..schema import Field, ManifestError


@dataclass(frozen=True)
class FamilyFacts:
    """What one family adds to the manifest.

    vision   `vision.*` fields beyond the common ones (patch_size, num_patches, feature_dim), names
             relative to `vision`
    section  the name of the family's own top-level object, or None
    fields   that object's table, names relative to it (the SCHEMA form; `path=` fields are checked
             against `files` like every other path)
    outputs  the main engine's outputs beside `embeddings` and `positions`, name -> dtype (required
             when declared; e.g. Qwen3-VL's DeepStack levels), which the family's runtime adapter reads
    """

    vision: Mapping[str, Field] = field(default_factory=dict)
    section: str | None = None
    fields: Mapping[str, Field] = field(default_factory=dict)
    outputs: Mapping[str, str] = field(default_factory=dict)

    def schema(self) -> dict[str, Field]:
        """These facts as dotted names of the whole manifest."""
        out = {f"vision.{k}": f for k, f in self.vision.items()}
        if self.section is not None:
            out[self.section] = Field("object")
            out.update({f"{self.section}.{k}": f for k, f in self.fields.items()})
        return out


def known_families() -> list[str]:
    """The families this format knows (the modules of this package)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def family_facts(name: str) -> FamilyFacts:
    """The manifest facts of family `name`; a family this version does not know is a ManifestError."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name) or name not in known_families():
        raise ManifestError(
            f"model family {name!r} is not supported by this runtime (supported: "
            f"{', '.join(known_families())}); upgrade apet-trt"
        )
    return importlib.import_module(f"{__name__}.{name}").FACTS
