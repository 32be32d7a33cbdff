"""Video-LLaVA (Transformers `VideoLlavaForConditionalGeneration`): videos through the video tower
with ApET per frame, still images through the image tower, uncompressed (export/models/video_llava.py).

A video: `frames_per_video` (8) frames sampled uniformly (runtime/videos.py), each preprocessed by
the checkpoint's image processor (as Transformers 4.x's VideoLlavaImageProcessor does for videos),
run through the main engine `pixel_values_videos [frames, 3, S, S] -> embeddings [frames, R, H],
positions [frames, R]` in chunks of the engine's batch range; the video's rows are its frames' rows
one frame after the other: 8 x 33 = 264 with ApET (each frame [CLS, 22 kept by descending error,
10 seeds], the official order), 8 x 257 = 2,056 without. A row's position is its index among the
video's 2,056 uncompressed rows (frame f, row r -> f * 257 + r).
A still image: the engine part "image", `pixel_values [images, 3, S, S] -> [images, 256, H]`.
Positions are plain 1-D (the LLM sees the rows in order): every decoder that takes rows is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from apet_trt.apet_ops.compat import accepted_kwargs
from apet_trt.engine_format.families.video_llava import FACTS

from ..images import ImagePreprocessor
from ..manifest import ManifestError
from ..videos import Video
from .base import START, EngineBatch, PatchMap, RuntimeFamily, VisualRows, submodule

VIDEO_INPUT, IMAGE_INPUT = "pixel_values_videos", "pixel_values"


def _new_key(processor) -> dict:
    return accepted_kwargs(processor.preprocess, return_legacy_image_output=False)


class VideoLlavaFamily(RuntimeFamily):
    name = "video_llava"
    facts = FACTS
    hf_model_class = "VideoLlavaForConditionalGeneration"

    def __init__(self, manifest):
        super().__init__(manifest)
        v = manifest.vision
        try:
            self.image_size, self.patch_size = int(v["image_size"]), int(v["patch_size"])
            self.frame_rows, self.rows = manifest.num_patches, manifest.num_visual_tokens  # 257, 33
            self.frames_per_video = int(v["num_frames"])
            self.image_rows = int(v["image_rows"])
            self.select_strategy = v.get("select_strategy", "default")
            self.frame_sampling = v.get("frame_sampling", "transformers")  # older manifests: Transformers'
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{manifest.root}: the video_llava family needs vision.image_size/patch_size/num_patches/"
                f"num_frames/image_rows and num_visual_tokens: {exc}"
            ) from exc
        if "image" not in manifest.parts:
            raise ManifestError(f"{manifest.root}: the video_llava family needs the engine part 'image' (image.onnx)")
        self.batch_max = manifest.batch_max
        self.preprocessor = ImagePreprocessor(manifest.processor_dir, image_size=self.image_size)

    # -- media -> engine inputs ---------------------------------------------------------------
    def _pixels(self, pictures: list, what: str) -> np.ndarray:
        """PIL images or [H, W, 3] frames -> [n, 3, S, S] float32, by the checkpoint's processor."""
        processor = self.preprocessor.processor  # 5.x: pixel_values without the legacy key's warning
        out = processor(images=pictures, return_tensors="np", **_new_key(processor))
        pv = np.ascontiguousarray(out["pixel_values" if "pixel_values" in out else "pixel_values_images"], np.float32)
        s = self.image_size
        if pv.shape != (len(pictures), 3, s, s):
            raise ValueError(
                f"the image processor made pixel_values {pv.shape} for {what}, the engine takes [n, 3, {s}, {s}]"
            )
        if not np.isfinite(pv).all():
            raise ValueError(f"{what}: preprocessing produced NaN or Inf pixel values")
        return pv

    def preprocess(self, images: Sequence) -> EngineBatch:
        items, stills, frames = [], [], []
        for i, item in enumerate(images):
            if isinstance(item, Video):
                if item.num_frames != self.frames_per_video:
                    raise ValueError(f"video {i}: {item.num_frames} frames, the model takes {self.frames_per_video}")
                items.append({"media": "video", "start": len(frames), "frame_indices": list(item.indices)})
                frames += list(item.frames)
            else:
                items.append({"media": "image", "start": len(stills)})
                stills.append(item)
        feeds = {}
        if frames:
            feeds[VIDEO_INPUT] = self._pixels(frames, f"{len(frames)} video frames")
            if self.feeds_start:  # --start random: one draw per frame among its patch rows (CLS excluded)
                feeds[START] = self.draw_starts(len(frames), self.frame_rows - 1)
        if stills:
            feeds[IMAGE_INPUT] = self._pixels(stills, f"{len(stills)} image(s)")
        return EngineBatch(feeds=feeds, items=items, images=list(images))

    # -- engine outputs -> rows ---------------------------------------------------------------
    def _run(
        self, run, name: str, pixels: np.ndarray, rows: int, starts: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All of `pixels` (and their `starts`, if any) through the engine taking `name`, in chunks of
        its batch range."""
        embs, poss = [], []
        for start in range(0, pixels.shape[0], self.batch_max):
            part = slice(start, start + self.batch_max)
            feeds = {name: np.ascontiguousarray(pixels[part])}
            if starts is not None:
                feeds[START] = np.ascontiguousarray(starts[part])
            out = run(feeds)
            emb, pos = out["embeddings"].float().cpu(), out["positions"].to(torch.int64).cpu()
            b = min(self.batch_max, pixels.shape[0] - start)
            if tuple(emb.shape[:2]) != (b, rows) or tuple(pos.shape) != (b, rows):
                raise RuntimeError(
                    f"the vision engine returned embeddings {tuple(emb.shape)} and positions {tuple(pos.shape)} "
                    f"for {b} item(s) of {name}; the manifest promises {rows} rows each"
                )
            embs.append(emb)
            poss.append(pos)
        return torch.cat(embs), torch.cat(poss)

    def encode(
        self, run: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]], batch: EngineBatch
    ) -> list[VisualRows]:
        out = {}
        if VIDEO_INPUT in batch.feeds:
            out["video"] = self._run(run, VIDEO_INPUT, batch.feeds[VIDEO_INPUT], self.rows, batch.feeds.get(START))
        if IMAGE_INPUT in batch.feeds:
            out["image"] = self._run(run, IMAGE_INPUT, batch.feeds[IMAGE_INPUT], self.image_rows)
        rows = []
        f = self.frames_per_video
        for item in batch.items:
            emb, pos = out[item["media"]]
            s = item["start"]
            if item["media"] == "image":
                rows.append(VisualRows(emb[s], pos[s], self.image_rows))
                continue
            offsets = (torch.arange(f) * self.frame_rows).unsqueeze(1)  # frame f's rows follow frame f-1's
            rows.append(
                VisualRows(
                    emb[s : s + f].flatten(0, 1),
                    (pos[s : s + f] + offsets).flatten(),
                    f * self.frame_rows,
                    extras={"frames": f, "rows_per_frame": self.rows, "frame_indices": item["frame_indices"]},
                    media="video",
                )
            )
        return rows

    # -- the handoff to a serving engine ------------------------------------------------------
    def upstream_route(self, fmt: str, grid_positions: bool = False) -> str:
        """vLLM registers no Video-LLaVA: the rows reach it as prompt embeddings of the language model
        alone (a vLLM serving the engine's saved LLaMA with --enable-prompt-embeds, docs/UPSTREAM.md)."""
        if fmt != "vllm":
            raise ValueError(
                f"--upstream-format {fmt}: Video-LLaVA's rows go upstream only as prompt embeddings to vLLM's "
                "/v1/completions (--upstream-format vllm; docs/UPSTREAM.md)"
            )
        return "prompt_embeds"

    # -- pictures -----------------------------------------------------------------------------
    def patch_map(self, batch: EngineBatch, index: int) -> PatchMap:
        """A still image: its crop and 16 x 16 grid. A video: a contact sheet, every sampled frame with
        its own grid (row 0 of each frame is CLS, no patch)."""
        item = batch.items[index]
        side = self.image_size // self.patch_size
        grid = [(p // side, p % side) for p in range(side * side)]
        if item["media"] == "image":
            crop = self.preprocessor.unnormalize(batch.feeds[IMAGE_INPUT][item["start"]])
            boxes = [(0, r, c) for r, c in grid]
            boxes = boxes if self.select_strategy == "default" else [None, *boxes]
            return PatchMap(crops=[crop], boxes=boxes, grid=(side, side), patch_size=self.patch_size)
        s, f = item["start"], self.frames_per_video
        crops = [self.preprocessor.unnormalize(x) for x in batch.feeds[VIDEO_INPUT][s : s + f]]
        boxes = [box for i in range(f) for box in [None, *((i, r, c) for r, c in grid)]]
        return PatchMap(crops=crops, boxes=boxes, grid=(side, side), patch_size=self.patch_size, columns=4)

    # -- the Torch module ---------------------------------------------------------------------
    def torch_module(self, hf_model) -> torch.nn.Module:
        return VideoLlavaTorchVision(
            hf_model,
            feature_layer=int(self.manifest.vision["feature_layer"]),
            select_strategy=self.select_strategy,
            apet=self.manifest.apet,
        ).eval()

    def summary(self) -> list[str]:
        v = self.manifest.vision
        return [
            f"vision       layer {v.get('feature_layer')}, {self.image_size}px, patch {self.patch_size}, "
            f"{self.frames_per_video} frames x {self.frame_rows} rows -> {self.rows} per frame; still images "
            f"{self.image_rows} rows, uncompressed; frames sampled as {self.frame_sampling}"
        ]


class VideoLlavaTorchVision(torch.nn.Module):
    """Both engines in PyTorch eager, written independently of export's wrappers, from the
    checkpoint's own towers and projector: called with pixel_values_videos (video tower -> layer ->
    projector -> apet_ops.ApetCompressor, video layout) or pixel_values (image tower -> layer, CLS
    dropped -> projector) -> {"embeddings", "positions"}."""

    def __init__(self, model, *, feature_layer: int, select_strategy: str, apet: dict | None):
        super().__init__()
        from apet_trt.apet_ops import ApetCompressor, ApetConfig

        self.video_tower = submodule(model, "video_tower", "Video-LLaVA")
        self.image_tower = submodule(model, "image_tower", "Video-LLaVA")
        self.projector = submodule(model, "multi_modal_projector", "Video-LLaVA")
        self.feature_layer = int(feature_layer)
        self.drop_cls = select_strategy == "default"
        self.compressor = None if apet is None else ApetCompressor(ApetConfig.from_dict(apet))

    def _rows(self, tower, pixels: torch.Tensor, drop_cls: bool) -> torch.Tensor:
        hidden = tower(pixels.to(next(tower.parameters()).dtype), output_hidden_states=True).hidden_states
        features = hidden[self.feature_layer][:, 1:] if drop_cls else hidden[self.feature_layer]
        return self.projector(features.to(next(self.projector.parameters()).dtype))

    @staticmethod
    def _all(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        positions = torch.arange(rows.shape[1], device=rows.device).expand(rows.shape[0], -1)
        return {"embeddings": rows.float(), "positions": positions}

    def forward(self, pixel_values_videos=None, pixel_values=None, start=None) -> dict[str, torch.Tensor]:
        if (pixel_values_videos is None) == (pixel_values is None):
            raise ValueError("pass pixel_values_videos (frames) or pixel_values (still images), one of them")
        if pixel_values is not None:
            return self._all(self._rows(self.image_tower, pixel_values, self.drop_cls))
        rows = self._rows(self.video_tower, pixel_values_videos, False)
        if self.compressor is None:
            return self._all(rows)
        tokens, positions = self.compressor(rows, start)
        return {"embeddings": tokens.float(), "positions": positions}
