"""Qwen2.5-VL (Transformers `Qwen2_5_VLForConditionalGeneration`): dynamic resolution, 3-D M-RoPE.

Images: the checkpoint's own Qwen2-VL image processor resizes each image to multiples of 28 px within
its min/max pixels and flattens it into 14 px patches, four consecutive patches per 2 x 2 merge block;
an image of h x w patches hands the LLM N = h * w / 4 rows (one per merge block, row-major).

Engine inputs (export/models/qwen2_5_vl.py documents the graph): the patches of the images of one
call, and what the tower needs that is awkward to trace, computed here from each image's grid with
numpy (apet_trt.engine_format.families.qwen2_5_vl, which export shares) - the rotary (row, column)
of every patch, the window order of the merge blocks and its inverse (Transformers'
`get_vision_window_index`), and the full-attention (per image) and window-attention (112 px windows)
segments as padded gather / scatter indices. An ApET engine takes one image per call (its compressor
runs on one image's rows); the --no-apet engine takes up to batch.max images per call. Outputs:
embeddings [rows, H], positions [rows] (indices among the call's uncompressed rows), split here into
one VisualRows per image.

Positions for the LLM (`position_ids`): Qwen2.5-VL's 3-D M-RoPE ids of the *uncompressed* prompt
(Transformers' `get_rope_index`: text tokens count up on all three components; an image's rows take
(t, row, column) offset by the position where it starts; the text after it starts at that position +
max(rows, columns)), then each kept row takes its own column: ids are gathered, never renumbered, so
the kept tokens sit exactly where they sat in the uncompressed model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from apet_trt.engine_format.families.qwen2_5_vl import FACTS, engine_layout

from ..checks import check_ascending
from ..images import ImagePreprocessor
from ..manifest import ManifestError
from .base import START, EngineBatch, PatchMap, RuntimeFamily, VisualRows

INPUT = "pixel_values"


# -- 3-D M-RoPE ------------------------------------------------------------------------------------
def image_mrope_ids(grid: tuple[int, int, int], kept: torch.Tensor, merge: int) -> torch.Tensor:
    """The M-RoPE ids [3, R] of an image's rows `kept` (indices among its t*h*w/merge^2 uncompressed
    rows), relative to the image's start: (t, row, column) of each row's merge block, as Transformers'
    get_rope_index lays out the uncompressed image."""
    t, h, w = grid
    if t != 1:
        raise ValueError(f"an image grid has t={t}; images have one temporal patch (videos are not supported)")
    gw = w // merge
    kept = kept.to(torch.int64)
    return torch.stack([torch.zeros_like(kept), kept // gw, kept % gw])


def mrope_position_ids(
    length: int, image_runs: Sequence[tuple[int, tuple[int, int, int], torch.Tensor]], merge: int
) -> torch.Tensor:
    """Qwen2.5-VL's position ids [3, length] for a prompt whose image i occupies `runs[i] = (start,
    grid (t, h, w), kept)`: its slots input_ids[start : start + len(kept)] hold the rows `kept`
    (indices among the image's t*h*w/merge^2 uncompressed rows, ascending). The ids are those of the
    uncompressed prompt (Transformers' get_rope_index), the kept rows' columns gathered."""
    out = torch.empty((3, length), dtype=torch.int64)
    current = 0  # the next id, as get_rope_index counts on the uncompressed prompt
    done = 0  # prompt index up to which ids are written
    for start, (t, h, w), kept in image_runs:
        text = start - done
        out[:, done:start] = torch.arange(current, current + text)
        current += text
        out[:, start : start + kept.numel()] = image_mrope_ids((t, h, w), kept, merge) + current
        current += max(h // merge, w // merge)
        done = start + kept.numel()
    out[:, done:] = torch.arange(current, current + length - done)
    return out


class Qwen25VLFamily(RuntimeFamily):
    name = "qwen2_5_vl"
    facts = FACTS
    hf_model_class = "Qwen2_5_VLForConditionalGeneration"
    vllm_plugin = True  # apet_trt.vllm_plugin takes its rows with their M-RoPE ids (vllm_plugin_fields)
    vllm_plugin_architecture = "ApetQwen2_5_VLForConditionalGeneration"  # the --hf-overrides architecture

    def __init__(self, manifest):
        super().__init__(manifest)
        q = manifest.section()
        self.read_geometry(manifest, q)
        self.apet = None
        if manifest.apet is not None:
            from apet_trt.apet_ops import ApetConfig

            self.apet = ApetConfig.from_dict(manifest.apet)
        per_call = q.get("images_per_call")
        self.images_per_call = manifest.batch_max if per_call is None else int(per_call)
        self.preprocessor = ImagePreprocessor(manifest.root / "processor", size_in_pixels=True)

    def read_geometry(self, manifest, section: dict) -> None:
        """The family's geometry from the manifest: patch, merge, attention windows, token range."""
        v = manifest.vision
        try:
            self.patch_size, self.merge = int(v["patch_size"]), int(v["spatial_merge_size"])
            self.window_blocks = int(v["window_size"]) // self.merge // self.patch_size
            self.min_tokens, self.max_tokens = int(v["min_tokens"]), int(v["max_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{manifest.root}: the qwen2_5_vl family needs vision.patch_size/spatial_merge_size/window_size/"
                f"min_tokens/max_tokens: {exc}"
            ) from exc

    @property
    def fixed_rows(self) -> int | None:
        return self.apet.keep if self.apet is not None and self.apet.keep is not None else None

    def rows_for(self, n: int) -> int:
        """Rows the engine hands the LLM for an image of N uncompressed rows."""
        if self.apet is None:
            return n
        return self.apet.keep_for(n) if hasattr(self.apet, "keep_for") else self.apet.keep

    # -- images -> engine inputs ----------------------------------------------------------------
    def preprocess(self, images: Sequence) -> EngineBatch:
        out = self.preprocessor.features(images)
        pixel_values, grids = out[INPUT], [tuple(int(x) for x in g) for g in out["image_grid_thw"]]
        items, start = [], 0
        for i, ((t, h, w), image) in enumerate(zip(grids, images)):
            n = t * h * w // self.merge**2
            self._check_budget(i, image, n, (h // self.merge, w // self.merge))
            items.append({"grid": (t, h, w), "patch_start": start, "num_patches": t * h * w, "num_rows": n})
            if self.feeds_start:  # --start random: one draw per image, among its N rows
                items[-1]["start"] = self.draw_starts(1, n)
            start += t * h * w
        if start != pixel_values.shape[0]:
            raise ValueError(f"the image processor made {pixel_values.shape[0]} patches, its grids say {start}")
        return EngineBatch(feeds={INPUT: pixel_values}, items=items, images=list(images))

    def _check_budget(self, index: int, image, n: int, blocks: tuple[int, int]) -> None:
        if self.apet is None:
            return
        where = (
            f"image {index} ({image.width}x{image.height} px, resized to {blocks[0]}x{blocks[1]} blocks of "
            f"{self.patch_size * self.merge} px) has N={n} visual tokens"
        )
        if self.apet.keep is not None and n < self.apet.keep:
            raise ValueError(
                f"{where}, fewer than the T={self.apet.keep} this engine keeps per image; use a larger image, "
                f"or an engine built with a smaller --keep or with --keep-ratio"
            )
        try:
            self.apet.validate_for(n)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    # -- engine outputs -> rows ---------------------------------------------------------------
    def call_feeds(self, batch: EngineBatch, items: Sequence[int]) -> dict[str, np.ndarray]:
        """The engine's named inputs for the images `items` of the batch (one engine call)."""
        parts = [batch.items[i] for i in items]
        pixels = np.concatenate(
            [batch.feeds[INPUT][p["patch_start"] : p["patch_start"] + p["num_patches"]] for p in parts]
        )
        feeds = {INPUT: np.ascontiguousarray(pixels, dtype=np.float32), **self.index_inputs([p["grid"] for p in parts])}
        if self.feeds_start:  # an ApET engine: one image per call
            feeds[START] = np.concatenate([p["start"] for p in parts])
        return feeds

    def index_inputs(self, grids: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        """The engine's index inputs for these grids (the engine format's numpy layout)."""
        return engine_layout(grids, self.merge, self.window_blocks)

    def encode(
        self, run: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]], batch: EngineBatch
    ) -> list[VisualRows]:
        rows: list[VisualRows] = []
        count = len(batch.items)
        for first in range(0, count, self.images_per_call):
            items = list(range(first, min(count, first + self.images_per_call)))
            out = run(self.call_feeds(batch, items))
            expected = [self.rows_for(batch.items[i]["num_rows"]) for i in items]
            emb, pos = self.call_rows(out, [batch.items[i]["num_rows"] for i in items], expected)
            rows += self.split_per_image(batch, items, emb, pos, expected)
        check_ascending(self.manifest.root, rows)  # kept rows leave in position order (and so are unique)
        return rows

    def call_rows(
        self, out: dict[str, torch.Tensor], sizes: list[int], expected: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One engine call's outputs -> (rows [sum(expected), width], positions), checked against the
        rows `expected` of images of N = `sizes`."""
        emb, pos = out["embeddings"].float().cpu(), out["positions"].to(torch.int64).cpu()
        if tuple(emb.shape[:1]) != (sum(expected),) or tuple(pos.shape) != (sum(expected),):
            raise RuntimeError(
                f"the vision engine returned embeddings {tuple(emb.shape)} and positions {tuple(pos.shape)} "
                f"for images of {sizes} rows; expected {expected} rows"
            )
        return emb, pos

    def split_per_image(
        self, batch: EngineBatch, items: list[int], emb: torch.Tensor, pos: torch.Tensor, expected: list[int]
    ) -> list[VisualRows]:
        """One engine call's rows (`expected` per image) as each image's VisualRows: positions count
        over the call's uncompressed rows, so they are made per image and checked against its N."""
        rows, offset = [], 0
        for i, e, p in zip(items, emb.split(expected), pos.split(expected)):
            item = batch.items[i]
            p = p - offset
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= item["num_rows"]):
                raise RuntimeError(
                    f"{self.manifest.root}: image {i}: the vision engine returned positions outside its "
                    f"{item['num_rows']} rows; the engine does not match its manifest: rebuild it with `apet build`"
                )
            rows.append(VisualRows(e, p, item["num_rows"], extras={"grid_thw": item["grid"]}))
            offset += item["num_rows"]
        return rows

    # -- the prompt ---------------------------------------------------------------------------
    def position_ids(
        self, input_ids: torch.Tensor, image_slots: torch.Tensor, rows: Sequence[VisualRows]
    ) -> torch.Tensor:
        runs, offset = [], 0
        for r in rows:
            runs.append((int(image_slots[offset]), tuple(r.extras["grid_thw"]), r.positions))
            offset += r.num_rows
        return mrope_position_ids(int(input_ids.numel()), runs, self.merge)

    # -- the handoff to a serving engine ------------------------------------------------------
    def upstream_route(self, fmt: str, grid_positions: bool = False) -> str:
        """vLLM and trtllm-serve derive an image's M-RoPE ids from a grid (vLLM: the part's
        image_grid_thw; TensorRT-LLM: one it infers from R), so the kept rows' own ids cannot reach
        them: only with the operator's explicit consent to those approximate positions. The exact route
        is vLLM with apet-trt's plugin (--upstream-format vllm-apet, vllm_plugin_fields)."""
        if fmt != "vllm-apet" and not grid_positions:
            raise ValueError(
                "--upstream: vLLM and trtllm-serve place Qwen2.5-VL's image rows on a grid's M-RoPE positions, not "
                "the kept rows' own; the exact route is the apet-trt vLLM plugin (docs/VLLM_PLUGIN.md): "
                "--upstream-format vllm-apet; or pass --upstream-grid-positions to accept approximate positions "
                "(a compact grid of the kept rows)"
            )
        return "image_embeds"

    def handoff_fields(self, rows: VisualRows, fmt: str = "vllm") -> dict[str, torch.Tensor]:
        """The one place the Qwen2.5-VL payload is built. vLLM: the dict form, `image_embeds` [R, H] and
        a 1-D `image_grid_thw` [1, h, w] whose h * w / merge^2 = R (the most square compact grid of the
        R kept rows; vLLM's M-RoPE ids then come from it: approximate, docs/UPSTREAM.md).
        trtllm-serve: the rows alone (its processor infers such a grid itself)."""
        if fmt == "trtllm":
            return {"image_embeds": rows.embeddings}
        return {"image_embeds": rows.embeddings, "image_grid_thw": self.compact_grid(rows.num_rows)}

    def compact_grid(self, num_rows: int) -> torch.Tensor:
        """[1, h, w] patches, h * w / merge^2 = num_rows, h <= w as close to square as num_rows allows."""
        a = max(d for d in range(1, int(num_rows**0.5) + 1) if num_rows % d == 0)
        return torch.tensor([1, a * self.merge, num_rows // a * self.merge], dtype=torch.int64)

    def rows_from_handoff(self, fields: dict[str, torch.Tensor]) -> VisualRows:
        """Refused: an image_embeds part does not carry the kept rows' own M-RoPE ids (at most a compact
        grid), and this decoder places every row exactly or not at all; the image itself (image_url)
        gives them."""
        raise ValueError(
            "Qwen2.5-VL rows in an image_embeds part carry no M-RoPE positions of their own (at most a compact "
            "grid), which this decoder does not guess; send the image (image_url)"
        )

    # -- the handoff to vLLM with apet-trt's plugin ---------------------------------------------
    def vllm_plugin_fields(self, rows: VisualRows) -> dict[str, torch.Tensor]:
        """One image's rows as apet_trt.vllm_plugin takes them (`--upstream-format vllm-apet`): the
        rows, each row's M-RoPE id relative to the image's start [R, 3], the uncompressed patch grid
        and R. vLLM then places every kept row where it sat in the uncompressed prompt, as the
        Transformers decoder does (mrope_position_ids)."""
        from apet_trt.vllm_plugin import GRID, NUM_ROWS, POSITIONS  # the field names (standard library only)

        grid = tuple(int(x) for x in rows.extras["grid_thw"])
        return {
            "image_embeds": rows.embeddings,
            POSITIONS: image_mrope_ids(grid, rows.positions, self.merge).T.contiguous(),
            GRID: torch.tensor(grid, dtype=torch.int64),
            NUM_ROWS: torch.tensor(rows.num_rows, dtype=torch.int64),
        }

    # -- pictures -----------------------------------------------------------------------------
    def patch_map(self, batch: EngineBatch, index: int) -> PatchMap:
        """One box per merge block (28 x 28 px), over the resized image the engine saw."""
        item = batch.items[index]
        t, h, w = item["grid"]
        m, p = self.merge, self.patch_size
        patches = batch.feeds[INPUT][item["patch_start"] : item["patch_start"] + h * w]
        x = patches.reshape(h // m, w // m, m, m, 3, -1, p, p)[:, :, :, :, :, 0]  # first temporal copy
        image = x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)
        gh, gw = h // m, w // m
        boxes = [(0, r // gw, r % gw) for r in range(gh * gw)]
        return PatchMap(crops=[self.preprocessor.unnormalize(image)], boxes=boxes, grid=(gh, gw), patch_size=m * p)

    # -- the Torch module ---------------------------------------------------------------------
    def torch_module(self, hf_model) -> torch.nn.Module:
        return Qwen25VLTorchVision(hf_model, apet=self.manifest.apet).eval()

    def summary(self) -> list[str]:
        v = self.manifest.vision
        return [
            f"vision       Qwen2.5-VL tower, patch {self.patch_size}, merge {self.merge}, "
            f"{self.min_tokens}..{self.max_tokens} tokens per image, D={v.get('feature_dim')}, "
            f"{self.images_per_call} image(s) per engine call"
        ]


class Qwen25VLTorchVision(torch.nn.Module):
    """The vision engine in PyTorch eager, written independently of export's wrapper: the
    checkpoint's own vision tower (`visual(pixel_values, grid_thw)`, Transformers' window index,
    rotary and attention) -> apet_ops.ApetCompressor on one image's rows. The grids are read back
    from the engine inputs (each image's patch count from image_gather, its rows and columns from
    patch_positions)."""

    def __init__(self, model, *, apet: dict | None):
        super().__init__()
        from apet_trt.apet_ops import ApetCompressor, ApetConfig

        inner = getattr(model, "model", None)
        self.visual = getattr(inner, "visual", None) or getattr(model, "visual", None)
        if self.visual is None:
            raise RuntimeError("the checkpoint model has no 'visual' tower; not a Qwen2.5-VL model")
        self.compressor = None if apet is None else ApetCompressor(ApetConfig.from_dict(apet))

    def forward(self, pixel_values, patch_positions, image_gather, start=None, **_) -> dict[str, torch.Tensor]:
        grids = grids_from_inputs(patch_positions, image_gather)
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(pixel_values.to(dtype), grid_thw=torch.tensor(grids, device=pixel_values.device))
        rows = getattr(out, "pooler_output", out).float()  # Transformers 5 returns a model output
        if self.compressor is None:
            return {"embeddings": rows, "positions": torch.arange(rows.shape[0], device=rows.device)}
        if len(grids) != 1:
            raise ValueError(f"an ApET engine call takes one image, got {len(grids)}")
        tokens, positions = self.compressor(rows.unsqueeze(0), start)
        return {"embeddings": tokens[0].float(), "positions": positions[0]}


def grids_from_inputs(patch_positions: torch.Tensor, image_gather: torch.Tensor) -> list[list[int]]:
    """Each image's (1, h, w) patch grid, read back from the engine inputs: its patch count from
    image_gather, its rows and columns from patch_positions."""
    grids, first = [], 0
    for n in (image_gather >= 0).sum(dim=1).tolist():
        rc = patch_positions[first : first + n]
        grids.append([1, int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1])
        first += n
    return grids
