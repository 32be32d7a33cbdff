"""Qwen2.5-VL's part of the engine-directory format: its manifest facts (the `vision.*` fields of
dynamic resolution and the `qwen2_5_vl` object) and the engine's index inputs for a list of image
grids (window order, its inverse, full- and window-attention segments), computed with numpy.
export/models/qwen2_5_vl.py wraps the layout with torch.from_numpy for its example inputs and
writes the facts; runtime/families/qwen2_5_vl.py feeds the layout to the engine and reads the facts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..schema import MAX_TOKENS, Field, int_field
from . import FamilyFacts

SECTION = "qwen2_5_vl"
# the section fields of every Qwen-VL family (Qwen3-VL's adds its own)
QWEN_SECTION_FIELDS = {
    "images_per_call": int_field(1, 4096, null=True),  # null: up to batch.max (no ApET)
    # TensorRT: a ratio budget's TopK K is computed at run time from N and must stay <= this
    "tensorrt_max_tokens": int_field(1, 1 << 24, null=True),
    "image_token_id": int_field(0, 1 << 24),
    "vision_start_token_id": int_field(0, 1 << 24),
}
FACTS = FamilyFacts(
    vision={
        "temporal_patch_size": int_field(1, 64),
        "spatial_merge_size": int_field(1, 64),
        "window_size": int_field(1, 16384),
        "fullatt_block_indexes": Field("list", max_len=1024),
        "fullatt_block_indexes[]": int_field(0, 1023),
        "min_tokens": int_field(1, MAX_TOKENS),  # rows of an image: the processor's range
        "max_tokens": int_field(1, MAX_TOKENS),
    },
    section=SECTION,
    fields={**QWEN_SECTION_FIELDS, "tokens_per_second": Field("number", lo=0, hi=1e6)},
)


# -- the engine's index inputs for a list of grids ------------------------------------------------
def segments(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous segments -> (gather [G, S], -1 past each segment's end; scatter [sum]: g * S + s)."""
    width = max(lengths)
    gather = np.full((len(lengths), width), -1, dtype=np.int64)
    scatter = np.empty(sum(lengths), dtype=np.int64)
    start = 0
    for g, n in enumerate(lengths):
        gather[g, :n] = np.arange(start, start + n)
        scatter[start : start + n] = g * width + np.arange(n)
        start += n
    return gather, scatter


def engine_layout(grids: Sequence[tuple[int, int, int]], merge: int, window_blocks: int) -> dict[str, np.ndarray]:
    """The engine's index inputs for images of these (t, h, w) patch grids (the processor's
    image_grid_thw), the images' patches concatenated in the processor's order."""
    positions, window_index, window_lengths, image_lengths = [], [], [], []
    offset = 0
    for t, h, w in grids:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)  # merge blocks row-major, 2 x 2 patches each
        pos = np.stack([a.reshape(block).transpose(0, 2, 1, 3).reshape(-1) for a in (rows, cols)], axis=-1)
        positions.append(np.tile(pos, (t, 1)))
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        for frame in range(t):
            image_lengths.append(h * w)
            for r in range(0, gh, window_blocks):  # windows of window_blocks^2 merge blocks, row-major
                for c in range(0, gw, window_blocks):
                    win = index[frame, r : r + window_blocks, c : c + window_blocks].reshape(-1)
                    window_index.append(win + offset)
                    window_lengths.append(win.size * merge * merge)
        offset += t * gh * gw
    window_index = np.concatenate(window_index).astype(np.int64)
    image_gather, image_scatter = segments(image_lengths)
    window_gather, window_scatter = segments(window_lengths)
    return {
        "patch_positions": np.concatenate(positions).astype(np.int64),
        "window_index": window_index,
        "reverse_index": np.argsort(window_index, kind="stable").astype(np.int64),
        "image_gather": image_gather,
        "image_scatter": image_scatter,
        "window_gather": window_gather,
        "window_scatter": window_scatter,
    }
