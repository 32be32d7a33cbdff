"""LLaVA-1.5's manifest facts (export/models/llava.py writes them, runtime/families/llava.py reads them)."""

from ..schema import int_field, str_field
from . import FamilyFacts

# the CLIP tower's geometry and feature selection (also LLaVA-NeXT's and Video-LLaVA's)
CLIP_VISION = {
    "feature_layer": int_field(-1024, 1023),
    "select_strategy": str_field(choices=("default", "full")),
    "image_size": int_field(1, 16384),  # the fixed input size
}

FACTS = FamilyFacts(vision=CLIP_VISION)
