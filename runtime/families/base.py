"""What a model family tells the runtime: how images become the engine's named inputs, how the
engine's outputs become each image's visual rows, and how those rows sit in the prompt.

One family, one subclass, one file (runtime/families/<family>.py), listed by name in
runtime/families/__init__.py; its manifest fields are apet_trt.engine_format.families.<family>'s
FACTS, which the subclass names as `facts`. Everything else in the runtime - backends, prompt
assembly, decoders, the pipeline, the CLI - speaks only this interface:

    batch = family.preprocess(items)             # PIL images / Videos -> EngineBatch (named inputs, per-item facts)
    rows = family.encode(backend, batch)         # -> list[VisualRows], one per image
    family.position_ids(prompt_ids, slots, rows) # None (1-D positions) or the family's own ids
    family.patch_map(batch, index)               # where image index's uncompressed rows sit (overlays)
    family.upstream_route(fmt, grid_positions)   # how `apet serve --upstream` hands them on (or why not)
    family.handoff_fields(rows, fmt)             # the rows as an OpenAI-compatible upstream takes them
    family.rows_from_handoff(fields)             # and back (an `image_embeds` content part)
    family.vllm_plugin_fields(rows)              # the rows with their own positions, for apet_trt.vllm_plugin
    family.llm_stage_rows(num_rows)              # the rows ApET's stage inside the LLM prunes (llm_stage)

Rows are per image and their number may differ between images (LLaVA-NeXT's anyres layout,
Qwen2.5-VL's dynamic resolution), so nothing downstream assumes one T for a batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from apet_trt.engine_format import FamilyFacts

from ..manifest import Manifest

START = "start"  # the vision engine's per-item first FPS seed input (--start random)


@dataclass
class VisualRows:
    """One image's (or video's) rows for the LLM.

    embeddings  [R, W] float32, in the order the LLM reads them; W is the family's `row_width` (the
                LLM's hidden size H; Qwen3-VL: H * (1 + DeepStack levels), the levels side by side)
    positions   [R] int64: each row's index in the sequence of rows the uncompressed model would
                hand the LLM for this image (so with no compression, 0..R-1; with ApET, the kept ones)
    num_patches that uncompressed row count
    extras      family facts a decoder or an overlay may need (e.g. a crop layout, a grid)
    media       "image" or "video": which placeholder of the prompt reads these rows
    """

    embeddings: torch.Tensor
    positions: torch.Tensor
    num_patches: int
    extras: dict[str, Any] = field(default_factory=dict)
    media: str = "image"

    @property
    def num_rows(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass
class EngineBatch:
    """The vision engine's named inputs for a batch of images, and what the family needs to turn
    its outputs back into per-image rows (`items[i]` belongs to image i)."""

    feeds: dict[str, np.ndarray]
    items: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list, repr=False)  # the PIL images (and Videos), for overlays
    preprocess_ms: float = 0.0  # how long making it took (Pipeline.preprocess sets it)


@dataclass(frozen=True)
class PatchMap:
    """Where the uncompressed rows of one image lie in the pictures the engine saw: `boxes[r]` is
    (picture index, row, column) of row r in that picture's grid of patches, or None for a row that
    is no patch (a CLS or newline row). `crops` are [H, W, 3] uint8 pictures (an engine crop, or
    several crops stitched into one picture of the image), `patch_size` in pixels; `grid` is the
    patch grid of one engine crop, each picture's own grid is `grids[i]` (its size / patch_size)."""

    crops: list[np.ndarray]
    boxes: list[tuple[int, int, int] | None]
    grid: tuple[int, int]
    patch_size: int
    columns: int | None = None  # pictures per row of an overlay sheet (None: all in one row)

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [(c.shape[0] // self.patch_size, c.shape[1] // self.patch_size) for c in self.crops]


class RuntimeFamily(ABC):
    """The runtime side of one model family (the export side is export/models/<family>.py)."""

    name: str = ""
    facts: FamilyFacts  # the family's manifest fields (engine_format/families/<family>.py), checked at read
    hf_model_class: str = "AutoModelForImageTextToText"  # the Transformers class of the whole VLM
    llm_stage: bool = False  # ApET's stage inside the LLM can prune this family's rows (llm_stage_rows)
    # frames the family samples from a video (runtime/videos.py); None: it takes no videos
    frames_per_video: int | None = None
    frame_sampling: str = "transformers"  # which frames (runtime/videos.py, SAMPLINGS)
    # apet-trt's vLLM plugin (apet_trt.vllm_plugin) takes this family's rows with their own positions
    # (vllm_plugin_fields; apet serve --upstream-format vllm-apet), as the architecture named here
    # (vllm serve --hf-overrides '{"architectures": [...]}')
    vllm_plugin: bool = False
    vllm_plugin_architecture: str | None = None
    # TensorRT-LLM's LLM API (PyTorch backend) takes this family's rows as `multi_modal_embeddings`
    # (its input processor implements attach_multimodal_embeddings)
    tensorrt_llm_api: bool = False

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        seeded = manifest.random_start  # --start random: the vision stage's draws (the LLM stage's: seed + 1)
        self._starts = None if not seeded else torch.Generator().manual_seed(int(seeded["seed"]))
        # an engine built with --start random takes "start" [items] int64: one draw per engine item
        self.feeds_start = START in manifest.io.input_names

    def draw_starts(self, count: int, rows: int) -> np.ndarray:
        """`count` first-FPS-seed indices in 0..rows-1 (int64), for an engine built with --start random:
        drawn from a generator seeded with the manifest's random_start.seed when the family loads, so
        one seed and one sequence of requests give the same starts."""
        if self._starts is None:
            raise RuntimeError(f"{self.manifest.root}: the engine draws no random starts (manifest random_start)")
        return torch.randint(0, rows, (count,), generator=self._starts, dtype=torch.int64).numpy()

    @property
    def row_width(self) -> int:
        """The width of one visual row (what decoders and an upstream take per kept token): the LLM's
        hidden size, unless the family's rows carry more (Qwen3-VL: its DeepStack levels side by side)."""
        return int(self.manifest.llm["hidden_size"])

    def transformers_decoder(self, model, **common):
        """The Transformers decoder for this family's rows (`common`: TransformersDecoder's keyword
        arguments); a family whose rows need more than the input embeddings gives its own subclass."""
        from ..decoders.transformers import TransformersDecoder

        return TransformersDecoder(model, **common)

    @property
    def fixed_rows(self) -> int | None:
        """The rows every image gets, when the family knows it before the engine runs (LLaVA-1.5: T);
        None when it depends on the image or on what the engine kept."""
        return None

    # -- images -> engine inputs ----------------------------------------------------------------
    @abstractmethod
    def preprocess(self, images: Sequence[Any]) -> EngineBatch:
        """Media items -> the engine's named inputs (the checkpoint's own HF processor): RGB PIL
        images, and for a family with `frames_per_video`, `videos.Video`s of that many frames."""

    # -- engine outputs -> rows ---------------------------------------------------------------
    @abstractmethod
    def encode(
        self, run: Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]], batch: EngineBatch
    ) -> list[VisualRows]:
        """Run the engine (`run(feeds) -> outputs`, in chunks the engine's batch range allows) and
        split its outputs into one VisualRows per image."""

    # -- the prompt ---------------------------------------------------------------------------
    def position_ids(
        self, input_ids: torch.Tensor, image_slots: torch.Tensor, rows: Sequence[VisualRows]
    ) -> torch.Tensor | None:
        """Position ids for a prompt whose `image_slots` read `rows` in order: None for plain 1-D
        positions (0..L-1, what every decoder does by itself), else a family's own [P, L] ids."""
        return None

    # -- ApET inside the LLM (runtime/decoders/stage2.py) --------------------------------------
    def llm_stage_rows(self, num_rows: int) -> int:
        """How many of an image's rows (the first ones) ApET's stage inside the LLM prunes, for an
        image handing the LLM `num_rows` (families with `llm_stage`)."""
        raise NotImplementedError(f"the {self.name} family has no ApET stage inside the LLM")

    # -- the handoff to a serving engine ------------------------------------------------------
    def upstream_route(self, fmt: str, grid_positions: bool = False) -> str:
        """How `apet serve --upstream` hands this family's rows to an upstream speaking `fmt` ("vllm",
        "vllm-apet" or "trtllm" image_embeds parts): "image_embeds" (each image part of the chat request becomes
        an `image_embeds` part) or "prompt_embeds" (the whole prompt as embeddings to the upstream's
        /v1/completions). `grid_positions`: the operator accepts M-RoPE positions the upstream derives
        from a compact grid (--upstream-grid-positions). Raises ValueError, one line naming the route
        that works, when no exact route exists for this family and format."""
        return "image_embeds"

    def handoff_fields(self, rows: VisualRows, fmt: str = "vllm") -> dict[str, torch.Tensor]:
        """One image's rows as the tensors of an `image_embeds` content part: {"image_embeds": [R, H]}
        alone (sent as one tensor) for families whose upstream expands the image token to R
        placeholders (LLaVA-1.5, LLaVA-NeXT); a family whose upstream needs more (Qwen2.5-VL in vLLM:
        "image_grid_thw") adds its fields and is sent in vLLM's dict form."""
        return {"image_embeds": rows.embeddings}

    def rows_from_handoff(self, fields: dict[str, torch.Tensor]) -> VisualRows:
        """The inverse of `handoff_fields`, for a decoder fed `image_embeds` parts: `fields` holds
        decoded, shape-checked tensors ("image_embeds" [R, H] float32). The uncompressed count is
        not in the payload, so num_patches is R and positions are 0..R-1."""
        extra = sorted(set(fields) - {"image_embeds"})
        if extra:
            raise ValueError(f"the {self.name} family takes image_embeds alone, not {extra}")
        emb = fields["image_embeds"]
        return VisualRows(emb, torch.arange(emb.shape[0], dtype=torch.int64), int(emb.shape[0]))

    def vllm_plugin_fields(self, rows: VisualRows) -> dict[str, torch.Tensor]:
        """One image's rows as apet_trt.vllm_plugin takes them (families with `vllm_plugin`): the
        fields of vLLM's dict-form `image_embeds` part, the rows' positions among them."""
        raise ValueError(
            f"apet-trt's vLLM plugin takes Qwen2.5-VL and Qwen3-VL rows; the {self.name} family's rows go to vLLM "
            "as plain image_embeds parts (--upstream-format vllm)"
        )

    # -- pictures -----------------------------------------------------------------------------
    @abstractmethod
    def patch_map(self, batch: EngineBatch, index: int) -> PatchMap:
        """Where image `index`'s uncompressed rows lie in what the engine saw (for --grid/--overlay)."""

    # -- the Torch module (backend="torch") ---------------------------------------------------
    def torch_module(self, hf_model) -> torch.nn.Module:
        """The vision engine in PyTorch eager, from the checkpoint's own modules: named inputs in,
        named outputs out, the same contract as the exported graph."""
        raise NotImplementedError(f"family {self.name!r} has no PyTorch eager vision module")

    def summary(self) -> list[str]:
        """Family lines for `apet inspect`."""
        return []


def submodule(model: torch.nn.Module, name: str, family: str) -> torch.nn.Module:
    """A checkpoint model's part `name` (a tower, the projector) for a family's PyTorch module,
    wherever the Transformers version keeps it (>= 4.52 nests the parts under .model)."""
    inner = getattr(model, "model", None)
    for owner in (inner, model):
        if owner is not None and getattr(owner, name, None) is not None:
            return getattr(owner, name)
    raise RuntimeError(f"the checkpoint model has no {name!r}; not a {family} model")
