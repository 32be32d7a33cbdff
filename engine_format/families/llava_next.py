"""LLaVA-NeXT's manifest facts: the CLIP geometry and the anyres layout in its own `llava_next`
object (export/models/llava_next.py writes it, runtime/families/llava_next.py reads it)."""

from ..schema import Field, int_field, str_field
from . import FamilyFacts
from .llava import CLIP_VISION

SECTION = "llava_next"
NEWLINE_FILE = "image_newline.safetensors"  # {"image_newline": float32 [hidden]}

FACTS = FamilyFacts(
    vision=CLIP_VISION,
    section=SECTION,
    fields={
        "image_grid_pinpoints": Field("list", max_len=64),  # [[height, width], ...]
        "image_grid_pinpoints[]": Field("list", max_len=2),
        "image_grid_pinpoints[][]": int_field(1, 16384),
        "image_newline": str_field(path="file"),
        "max_rows_per_image": int_field(1, 1 << 24),
    },
)
