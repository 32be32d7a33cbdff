"""Qwen3-VL's part of the engine-directory format: its manifest facts (the `vision.*` fields of dynamic
resolution, the `qwen3_vl` object and the engine's DeepStack output) and the engine's index inputs for
a list of image grids (rotary positions, the learned position table's bilinear taps, attention
segments), computed with numpy. export/models/qwen3_vl.py wraps the layout with torch.from_numpy for
its example inputs and writes the facts; runtime/families/qwen3_vl.py feeds the layout to the engine
and reads the facts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..schema import Field, int_field
from . import FamilyFacts
from .qwen2_5_vl import QWEN_SECTION_FIELDS, segments

SECTION = "qwen3_vl"
FACTS = FamilyFacts(
    vision={
        "temporal_patch_size": int_field(1, 64),
        "spatial_merge_size": int_field(1, 64),
        "min_tokens": int_field(1, 1 << 20),  # rows of an image: the processor's range
        "max_tokens": int_field(1, 1 << 20),
    },
    section=SECTION,
    fields={
        **QWEN_SECTION_FIELDS,
        # DeepStack: the blocks whose hidden states have their own merger; level l is added to the LLM's
        # hidden states after its decoder layer l
        "deepstack_visual_indexes": Field("list", max_len=64),
        "deepstack_visual_indexes[]": int_field(0, 4096),
        "num_position_embeddings": int_field(1, 1 << 24),  # the learned position table (side^2)
    },
    outputs={"deepstack": "float32"},  # [levels, rows, H]: each level's kept rows
)


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (align_corners) of `index` on an axis of `size` into a table of `side`."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    lo = np.floor(src)
    taps = np.clip(np.stack([lo, lo + 1], axis=-1).astype(np.int64), 0, side - 1)
    frac = src - lo
    return taps, np.stack([1 - frac, frac], axis=-1).astype(np.float32)


def engine_layout(grids: Sequence[tuple[int, int, int]], merge: int, side: int) -> dict[str, np.ndarray]:
    """The engine's index inputs for images of these (t, h, w) patch grids (the processor's
    image_grid_thw), the images' patches concatenated in the processor's order: each patch's rotary
    (row, column), its four taps into the side x side position table and their weights (Transformers'
    get_vision_interpolation_indices_and_weights, bilinear, align_corners), and one attention segment
    per image (no windows)."""
    positions, indices, weights, lengths = [], [], [], []
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)  # merge blocks row-major, 2 x 2 patches each
        r, c = (a.reshape(block).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols))
        positions.append(np.tile(np.stack([r, c], axis=-1), (t, 1)))
        (rt, rw), (ct, cw) = _axis_taps(r, h, side), _axis_taps(c, w, side)
        indices.append(np.tile((rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4), (t, 1)))
        weights.append(np.tile((rw[:, :, None] * cw[:, None, :]).reshape(-1, 4), (t, 1)))
        lengths += [h * w] * t
    gather, scatter = segments(lengths)
    return {
        "patch_positions": np.concatenate(positions).astype(np.int64),
        "interp_indices": np.concatenate(indices).astype(np.int64),
        "interp_weights": np.concatenate(weights).astype(np.float32),
        "image_gather": gather,
        "image_scatter": scatter,
    }
