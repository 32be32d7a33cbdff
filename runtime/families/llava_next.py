"""LLaVA-NeXT (Transformers `LlavaNextForConditionalGeneration`, "anyres"): each image is a base crop
(the whole image resized to S x S) and 2 to 4 tiles of the image resized and padded to the best of
the grid pinpoints; the engine runs ApET on every crop alike (T rows per crop, positions within the
crop); this adapter lays each image's kept rows out the way the model lays out its features.

The layout (Transformers `LlavaNextModel.pack_image_features`; the official ApET code applies the
same steps to its keep mask, MaQianKun0/ApET llava/model/llava_arch.py):

    rows = [base crop's N rows] + [the tiles' patch grid, stitched (gh*s rows x gw*s columns),
            with the padding rows or columns removed ("unpadding"), read row by row, each grid row
            followed by one `image_newline` row]

so the uncompressed model hands the LLM N + h_u * (w_u + 1) rows for an image whose unpadded grid is
h_u x w_u patches. With ApET the kept rows are the base crop's kept rows, the tiles' kept patches
that survive unpadding, and every newline row, in that order; `VisualRows.positions` are their
indices in the uncompressed sequence, `num_patches` its length. The engine's own per-crop positions
stay in `extras["crop_positions"]` ([crops, T]).

The manifest's `llava_next` object (written by export/models/llava_next.py): image_grid_pinpoints
([[height, width], ...]), image_newline (the relative path of a safetensors file holding the
embedding, float32 [hidden]), max_rows_per_image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..images import ImagePreprocessor
from ..manifest import ManifestError
from .base import START, EngineBatch, PatchMap, RuntimeFamily, VisualRows

INPUT = "pixel_values"
SECTION = "llava_next"


@dataclass(frozen=True)
class AnyresLayout:
    """One image's row layout. `grid` (gh, gw) tiles; the unpadded patch window of the stitched tile
    grid is rows [r0, r1) x columns [c0, c1); `base` = N rows come first."""

    grid: tuple[int, int]
    side: int  # patches per crop side
    window: tuple[int, int, int, int]  # r0, r1, c0, c1
    base: int  # N

    @property
    def width(self) -> int:
        """Rows per line of the tile part: the unpadded columns and the newline."""
        return self.window[3] - self.window[2] + 1

    @property
    def num_rows(self) -> int:
        return self.base + (self.window[1] - self.window[0]) * self.width

    @property
    def num_crops(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    def newline_rows(self) -> torch.Tensor:
        lines = torch.arange(self.window[1] - self.window[0], dtype=torch.int64)
        return self.base + lines * self.width + (self.width - 1)

    def tile_rows(self, tile: int, positions: torch.Tensor) -> torch.Tensor:
        """Row indices of a tile's patch positions; -1 where the patch lies in the padding."""
        ti, tj = divmod(tile, self.grid[1])
        r = ti * self.side + positions // self.side
        c = tj * self.side + positions % self.side
        r0, r1, c0, c1 = self.window
        inside = (r >= r0) & (r < r1) & (c >= c0) & (c < c1)
        return torch.where(inside, self.base + (r - r0) * self.width + (c - c0), torch.full_like(r, -1))


def unpadded_window(image_size: tuple[int, int], grid: tuple[int, int], side: int) -> tuple[int, int, int, int]:
    """The patch rows/columns of the stitched tile grid that hold the image, not the padding: what
    Transformers' `unpad_image` keeps (its rounding: int(round(x, 7)); the official code's int(x)
    differs from it only where float round-off lands just under an integer)."""
    height, width = image_size
    rows, cols = grid[0] * side, grid[1] * side
    if width / height > cols / rows:  # wider than the canvas: padding above and below
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return pad, rows - pad, 0, cols
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return 0, rows, pad, cols - pad


class LlavaNextFamily(RuntimeFamily):
    name = "llava_next"
    hf_model_class = "LlavaNextForConditionalGeneration"
    tensorrt_llm_api = True  # LlavaNextInputProcessor.attach_multimodal_embeddings
    llm_stage = True  # ApET inside the LLM prunes the base crop's rows (llm_stage_rows)

    def __init__(self, manifest):
        super().__init__(manifest)
        v = manifest.vision
        try:
            self.image_size, self.patch_size = int(v["image_size"]), int(v["patch_size"])
            self.num_patches, self.rows = manifest.num_patches, manifest.num_visual_tokens
            strategy = v.get("select_strategy", "default")
            section = manifest.data[SECTION]
            self.pinpoints = [(int(h), int(w)) for h, w in section["image_grid_pinpoints"]]
            newline_file = section["image_newline"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{manifest.root}: the llava_next family needs vision.image_size/patch_size/num_patches, "
                f"num_visual_tokens and {SECTION}.image_grid_pinpoints/image_newline: {exc!r}"
            ) from exc
        self.side = self.image_size // self.patch_size
        if strategy != "default" or self.num_patches != self.side**2:
            raise ManifestError(
                f"{manifest.root}: llava_next needs vision.select_strategy 'default' and num_patches "
                f"{self.side**2}, got {strategy!r} and {self.num_patches}"
            )
        if not self.pinpoints or any(h % self.image_size or w % self.image_size for h, w in self.pinpoints):
            raise ManifestError(
                f"{manifest.root}: {SECTION}.image_grid_pinpoints must be [[height, width], ...] in multiples "
                f"of {self.image_size}, got {self.pinpoints}"
            )
        self.newline = self._read_newline(newline_file)
        self.batch_max = manifest.batch_max
        self.preprocessor = ImagePreprocessor(manifest.processor_dir)

    def _read_newline(self, rel) -> torch.Tensor:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        m = self.manifest
        path = m.file(rel)  # listed in the manifest and inside the engine directory, or ManifestError
        try:
            value = load_file(str(path)).get("image_newline")
        except (OSError, SafetensorError) as exc:
            raise ManifestError(f"{path}: not a readable safetensors file ({exc})") from exc
        hidden = int(m.llm["hidden_size"])
        if value is None or value.shape != (hidden,) or not np.isfinite(value).all():
            got = None if value is None else value.shape
            raise ManifestError(f"{path}: image_newline must be a finite [{hidden}] tensor, got {got}")
        return torch.from_numpy(value.astype(np.float32))

    # -- images -> engine inputs ----------------------------------------------------------------
    def layout(self, image_size: tuple[int, int]) -> AnyresLayout:
        """The layout of an image of (height, width) pixels: the grid is the best pinpoint's, chosen
        the way the processor and the model choose it."""
        from transformers.image_processing_utils import select_best_resolution

        h, w = select_best_resolution(tuple(image_size), [list(p) for p in self.pinpoints])
        grid = (h // self.image_size, w // self.image_size)
        return AnyresLayout(grid, self.side, unpadded_window(image_size, grid, self.side), self.num_patches)

    def preprocess(self, images: Sequence) -> EngineBatch:
        out = self.preprocessor.features(images)  # the checkpoint's own LlavaNextImageProcessor
        pixel_values, sizes = out["pixel_values"], np.asarray(out.get("image_sizes"))
        s = self.image_size
        if pixel_values.ndim != 5 or pixel_values.shape[2:] != (3, s, s) or sizes.shape != (len(images), 2):
            raise ValueError(
                f"the image processor produced pixel_values {pixel_values.shape} and image_sizes "
                f"{sizes.shape}; LLaVA-NeXT's engine takes crops [{len(images)}, crops, 3, {s}, {s}] and one "
                "(height, width) per image"
            )
        crops, items, start = [], [], 0
        for i, size in enumerate(sizes):
            layout = self.layout((int(size[0]), int(size[1])))
            n = layout.num_crops
            if n > pixel_values.shape[1]:
                raise ValueError(
                    f"image {i}: the processor made {pixel_values.shape[1]} crops, the {layout.grid} grid of "
                    f"image_grid_pinpoints needs {n}: processor and model disagree"
                )
            crops.append(pixel_values[i, :n])
            items.append({"layout": layout, "image_size": (int(size[0]), int(size[1])), "crops": (start, start + n)})
            start += n
        feeds = {INPUT: np.ascontiguousarray(np.concatenate(crops))}
        if self.feeds_start:  # --start random: one draw per crop, in crop order
            feeds[START] = self.draw_starts(start, self.num_patches)
        return EngineBatch(feeds=feeds, items=items, images=list(images))

    # -- engine outputs -> rows ---------------------------------------------------------------
    def encode(
        self, run: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]], batch: EngineBatch
    ) -> list[VisualRows]:
        pixel_values = batch.feeds[INPUT]
        embeddings, positions = [], []
        for start in range(0, pixel_values.shape[0], self.batch_max):  # at most batch.max crops a call
            part = slice(start, start + self.batch_max)
            chunk = np.ascontiguousarray(pixel_values[part])
            out = run({name: np.ascontiguousarray(value[part]) for name, value in batch.feeds.items()})
            emb, pos = out["embeddings"].float().cpu(), out["positions"].to(torch.int64).cpu()
            b = chunk.shape[0]
            if tuple(emb.shape[:2]) != (b, self.rows) or tuple(pos.shape) != (b, self.rows):
                raise RuntimeError(
                    f"the vision engine returned embeddings {tuple(emb.shape)} and positions {tuple(pos.shape)} "
                    f"for {b} crop(s); the manifest promises T={self.rows} rows per crop"
                )
            if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= self.num_patches):
                raise RuntimeError(f"the vision engine returned positions outside 0..{self.num_patches - 1}")
            if pos.shape[1] > 1 and not bool((pos[:, 1:] > pos[:, :-1]).all()):
                raise RuntimeError(
                    "the vision engine returned a crop's positions out of patch order; the engine does not match "
                    "its manifest: rebuild it with `apet build`"
                )
            embeddings.append(emb)
            positions.append(pos)
        emb, pos = torch.cat(embeddings), torch.cat(positions)
        return [self.arrange(emb[slice(*it["crops"])], pos[slice(*it["crops"])], it) for it in batch.items]

    def arrange(self, emb: torch.Tensor, pos: torch.Tensor, item: dict) -> VisualRows:
        """One image's crops ([crops, T, H], [crops, T]) -> its rows in the anyres layout."""
        layout: AnyresLayout = item["layout"]
        index = [pos[0]]  # the base crop: its patch indices are its rows
        rows = [emb[0]]
        for tile in range(1, pos.shape[0]):
            at = layout.tile_rows(tile - 1, pos[tile])
            inside = at >= 0  # kept patches in the padding are dropped, as unpadding drops them
            index.append(at[inside])
            rows.append(emb[tile][inside])
        newlines = layout.newline_rows()
        index.append(newlines)  # every newline row is kept
        rows.append(self.newline.expand(newlines.numel(), -1))
        index, rows = torch.cat(index), torch.cat(rows)
        order = torch.argsort(index)
        return VisualRows(
            embeddings=rows[order].contiguous(),
            positions=index[order],
            num_patches=layout.num_rows,
            extras={"crop_positions": pos, "grid": layout.grid, "image_size": item["image_size"]},
        )

    def llm_stage_rows(self, num_rows: int) -> int:
        return min(self.rows, num_rows)  # the base crop's rows, first in the layout (the official code)

    # -- pictures -----------------------------------------------------------------------------
    def patch_map(self, batch: EngineBatch, index: int) -> PatchMap:
        """Two pictures of the image: the base crop (the whole image at S x S) and the tiles stitched
        back into the image at its anyres resolution, padding cut off; every uncompressed row points
        at its patch in one of them (newline rows at none)."""
        item = batch.items[index]
        layout: AnyresLayout = item["layout"]
        start, stop = item["crops"]
        pictures = [self.preprocessor.unnormalize(batch.feeds[INPUT][i]) for i in range(start, stop)]
        s, p = self.image_size, self.patch_size
        gh, gw = layout.grid
        canvas = np.zeros((gh * s, gw * s, 3), dtype=np.uint8)
        for t, tile in enumerate(pictures[1:]):
            ti, tj = divmod(t, gw)
            canvas[ti * s : (ti + 1) * s, tj * s : (tj + 1) * s] = tile
        r0, r1, c0, c1 = layout.window
        boxes: list[tuple[int, int, int] | None] = [(0, r // self.side, r % self.side) for r in range(layout.base)]
        for line in range(r1 - r0):
            boxes += [(1, line, c) for c in range(c1 - c0)] + [None]
        image = np.ascontiguousarray(canvas[r0 * p : r1 * p, c0 * p : c1 * p])
        return PatchMap(crops=[pictures[0], image], boxes=boxes, grid=(self.side, self.side), patch_size=p)

    # -- the Torch module ---------------------------------------------------------------------
    def torch_module(self, hf_model) -> torch.nn.Module:
        from .llava import LlavaTorchVision  # the same per-crop engine: tower, ApET, projector

        return LlavaTorchVision(
            hf_model,
            feature_layer=int(self.manifest.vision["feature_layer"]),
            select_strategy="default",
            apet=self.manifest.apet,
        ).eval()

    def summary(self) -> list[str]:
        v = self.manifest.vision
        section = self.manifest.data[SECTION]
        return [
            f"vision       layer {v.get('feature_layer')} (default), crops {self.image_size}px, patch "
            f"{self.patch_size}, N={self.num_patches} per crop, D={v.get('feature_dim')}",
            f"anyres       grid pinpoints {[list(p) for p in self.pinpoints]}; a base crop and 2-4 tiles per "
            f"image, T={self.rows} per crop, up to {section.get('max_rows_per_image')} rows per image",
        ]
