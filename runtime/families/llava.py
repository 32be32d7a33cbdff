"""LLaVA-1.5 (Transformers `LlavaForConditionalGeneration`): one square crop per image, N patches
of the CLIP tower's feature layer (CLS dropped with the "default" strategy), T rows per image.

Engine: pixel_values [B, 3, S, S] -> embeddings [B, T, H], positions [B, T] (ascending patch
indices). Rows for the LLM: the T embeddings in position order, 1-D positions; the image token in
the prompt expands to T slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from apet_trt.engine_format.families.llava import FACTS

from ..checks import check_ascending
from ..images import ImagePreprocessor, expand_to_square
from ..manifest import ManifestError
from .base import START, EngineBatch, PatchMap, RuntimeFamily, VisualRows, submodule

INPUT = "pixel_values"


class LlavaFamily(RuntimeFamily):
    name = "llava"
    facts = FACTS
    hf_model_class = "LlavaForConditionalGeneration"
    llm_stage = True

    def __init__(self, manifest):
        super().__init__(manifest)
        v = manifest.vision
        try:
            self.image_size, self.patch_size = int(v["image_size"]), int(v["patch_size"])
            self.num_patches, self.rows = manifest.num_patches, manifest.num_visual_tokens
            self.select_strategy = v.get("select_strategy", "default")
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{manifest.root}: the llava family needs vision.image_size/patch_size/num_patches "
                f"and num_visual_tokens: {exc}"
            ) from exc
        self.batch_max = manifest.batch_max
        self.preprocessor = ImagePreprocessor(manifest.processor_dir, image_size=self.image_size)
        self.pad = manifest.image_aspect == "pad"

    @property
    def fixed_rows(self) -> int:
        return self.rows

    # -- images -> engine inputs ----------------------------------------------------------------
    def preprocess(self, images: Sequence) -> EngineBatch:
        if self.pad:  # --image-aspect pad: the official LLaVA-1.5 preprocessing
            fill = self.preprocessor.mean_colour
            images = [expand_to_square(img, fill) for img in images]
        feeds = {INPUT: self.preprocessor(images)}  # [B, 3, S, S], checked
        if self.feeds_start:
            feeds[START] = self.draw_starts(len(images), self.num_patches)
        return EngineBatch(feeds=feeds, items=[{} for _ in images], images=list(images))

    # -- engine outputs -> rows ---------------------------------------------------------------
    def encode(
        self, run: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]], batch: EngineBatch
    ) -> list[VisualRows]:
        pixel_values = batch.feeds[INPUT]
        rows: list[VisualRows] = []
        for start in range(0, pixel_values.shape[0], self.batch_max):  # the engine's batch range
            chunk = slice(start, start + self.batch_max)
            out = run({name: np.ascontiguousarray(value[chunk]) for name, value in batch.feeds.items()})
            emb, pos = out["embeddings"].float().cpu(), out["positions"].to(torch.int64).cpu()
            b = min(self.batch_max, pixel_values.shape[0] - start)
            if tuple(emb.shape[:2]) != (b, self.rows) or tuple(pos.shape) != (b, self.rows):
                raise RuntimeError(
                    f"the vision engine returned embeddings {tuple(emb.shape)} and positions "
                    f"{tuple(pos.shape)} for {b} image(s); the manifest promises T={self.rows} rows "
                    "per image"
                )
            rows += [VisualRows(emb[i], pos[i], self.num_patches) for i in range(b)]
        check_ascending("vision engine", rows)  # LLaVA-1.5's rows are in patch order
        return rows

    def llm_stage_rows(self, num_rows: int) -> int:
        return num_rows  # all of the image's rows (the official layer_prune)

    def upstream_route(self, fmt: str, grid_positions: bool = False) -> str:
        if fmt == "trtllm":  # its image_embeds part reaches models of the PyTorch backend only
            raise ValueError(
                "--upstream-format trtllm: TensorRT-LLM's PyTorch backend has no LLaVA-1.5 model, so trtllm-serve "
                "cannot take this engine's rows; use vLLM (--upstream-format vllm; docs/UPSTREAM.md)"
            )
        return "image_embeds"

    # -- pictures -----------------------------------------------------------------------------
    def patch_map(self, batch: EngineBatch, index: int) -> PatchMap:
        crop = self.preprocessor.unnormalize(batch.feeds[INPUT][index])
        side = self.image_size // self.patch_size
        grid = [(0, p // side, p % side) for p in range(side * side)]
        boxes = grid if self.select_strategy == "default" else [None, *grid]  # "full": row 0 is CLS
        return PatchMap(crops=[crop], boxes=boxes, grid=(side, side), patch_size=self.patch_size)

    # -- the Torch module ---------------------------------------------------------------------
    def torch_module(self, hf_model) -> torch.nn.Module:
        return LlavaTorchVision(
            hf_model,
            feature_layer=int(self.manifest.vision["feature_layer"]),
            select_strategy=self.select_strategy,
            apet=self.manifest.apet,
        ).eval()

    def summary(self) -> list[str]:
        v = self.manifest.vision
        return [
            f"vision       layer {v.get('feature_layer')} ({self.select_strategy}), image {self.image_size}px, "
            f"patch {self.patch_size}, N={self.num_patches}, D={v.get('feature_dim')}"
        ]


class LlavaTorchVision(torch.nn.Module):
    """The vision engine in PyTorch eager, written independently of export's wrapper: the
    checkpoint's vision tower -> hidden state of the feature layer -> CLS dropped ("default") ->
    apet_ops.ApetCompressor -> the projector on the kept tokens.
    pixel_values [B, 3, S, S] (+ start [B] int64) -> {"embeddings": [B, T, H] float32, "positions": [B, T] int64}."""

    def __init__(self, model, *, feature_layer: int, select_strategy: str, apet: dict | None):
        super().__init__()
        from apet_trt.apet_ops import ApetCompressor, ApetConfig

        self.tower = submodule(model, "vision_tower", "LLaVA")
        self.projector = submodule(model, "multi_modal_projector", "LLaVA")
        self.feature_layer = int(feature_layer)
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision.select_strategy must be 'default' or 'full', got {select_strategy!r}")
        self.drop_cls = select_strategy == "default"
        self.compressor = None if apet is None else ApetCompressor(ApetConfig.from_dict(apet))

    def forward(self, pixel_values: torch.Tensor, start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]
        if self.compressor is not None:
            tokens, positions = self.compressor(features, start)
        else:
            tokens = features
            positions = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
        proj_dtype = next(self.projector.parameters()).dtype
        return {"embeddings": self.projector(tokens.to(proj_dtype)).float(), "positions": positions}
