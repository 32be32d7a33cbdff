"""Video-LLaVA's manifest facts (export/models/video_llava.py writes them, runtime/families/video_llava.py
reads them): the CLIP geometry of its two towers, frames per video and rows of a still image."""

from ..schema import int_field
from . import FamilyFacts
from .llava import CLIP_VISION

FACTS = FamilyFacts(
    vision={
        **CLIP_VISION,
        "num_frames": int_field(1, 4096),  # frames sampled per video
        "image_rows": int_field(1, 1 << 20),  # rows of a still image (uncompressed)
    }
)
