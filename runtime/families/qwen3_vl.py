"""Qwen3-VL (Transformers `Qwen3VLForConditionalGeneration`): dynamic resolution, 3-D M-RoPE, DeepStack.

ApET on Qwen3-VL is this project's extension, not evaluated by the paper's authors
(docs/families/qwen3_vl.md says what was verified).

Images: the checkpoint's own Qwen2-VL-class image processor (16 px patches, 2 x 2 merge blocks of
32 px); an image of h x w patches hands the LLM N = h * w / 4 tokens. The engine's index inputs
(export/models/qwen3_vl.py documents the graph) are computed from each image's grid with numpy
(engine_format/families/qwen3_vl.py, shared with the export side's example inputs):
the rotary (row, column) of every patch, the four bilinear taps of the learned 48 x 48 position table
(Transformers' `get_vision_interpolation_indices_and_weights`, align_corners) and the per-image
attention segments. No windows: Qwen3-VL's blocks all attend over the whole image.

Rows: each kept token is one row [H * (1 + L)]: its main row, then its row of each DeepStack level,
side by side. That is vLLM's layout for precomputed Qwen3-VL embeddings (`image_embeds` [tokens,
hidden * (1 + levels)] with `image_grid_thw`), so `handoff_fields` sends the rows as they are. The
engine keeps the same tokens at every level (the selection and merge groups made on the main rows).

Positions (`position_ids`): Qwen3-VL's get_rope_index on the *uncompressed* prompt, the kept rows'
columns gathered. For images it is Qwen2.5-VL's rule (text counts up on all three components, an
image's tokens take (start, start + row, start + column), the text after it continues at start +
max(rows, columns)); what Qwen3-VL changes is videos (each frame its own t = 1 grid, timestamps as
text between frames), which this family does not take.

Decoding (`transformers_decoder`): `DeepStackDecoder` puts the main rows in the input embeddings and
hands level l to the language model's DeepStack input (`visual_pos_masks`, `deepstack_visual_embeds`
of Qwen3VLTextModel.forward), which adds it to the hidden states after decoder layer l at the image
slots: the kept tokens' own levels at the kept tokens' slots.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import numpy as np
import torch

from apet_trt.engine_format.families.qwen3_vl import FACTS, engine_layout

from ..decoders.transformers import TransformersDecoder
from ..manifest import ManifestError
from .base import VisualRows, submodule
from .qwen2_5_vl import Qwen25VLFamily, grids_from_inputs


def compact_grid(rows: int, merge: int) -> tuple[int, int, int]:
    """A (1, h, w) patch grid of exactly `rows` merge blocks, as square as `rows` allows (h <= w): the
    grid an upstream that derives positions from image_grid_thw (vLLM) is given for kept rows that
    are no grid of their own. Positions derived from it are approximate (docs/families/qwen3_vl.md)."""
    if rows < 1:
        raise ValueError(f"a grid needs at least one row, got {rows}")
    gh = max(d for d in range(1, int(rows**0.5) + 1) if rows % d == 0)
    return 1, gh * merge, rows // gh * merge


class Qwen3VLFamily(Qwen25VLFamily):
    """Qwen2.5-VL's runtime adapter for what the two share (the processor, the per-image budget
    checks, M-RoPE ids for images, the patch map); Qwen3-VL's engine inputs and DeepStack rows."""

    name = "qwen3_vl"
    facts = FACTS
    hf_model_class = "Qwen3VLForConditionalGeneration"
    # apet_trt.vllm_plugin's ApetQwen3VLForConditionalGeneration takes the rows [R, H * (1 + L)] with
    # their M-RoPE ids: Qwen2.5-VL's vllm_plugin_fields (the image rule of M-RoPE is the same)
    vllm_plugin_architecture = "ApetQwen3VLForConditionalGeneration"

    def read_geometry(self, manifest, section: dict) -> None:
        """Qwen2.5-VL's geometry without its windows, plus the DeepStack levels and position table."""
        v = manifest.vision
        try:
            self.patch_size, self.merge = int(v["patch_size"]), int(v["spatial_merge_size"])
            self.min_tokens, self.max_tokens = int(v["min_tokens"]), int(v["max_tokens"])
            self.hidden = int(manifest.llm["hidden_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(
                f"{manifest.root}: the qwen3_vl family needs vision.patch_size/spatial_merge_size/min_tokens/"
                f"max_tokens: {exc}"
            ) from exc
        self.levels = len(section["deepstack_visual_indexes"])
        self.side = int(round(int(section["num_position_embeddings"]) ** 0.5))
        if self.side**2 != int(section["num_position_embeddings"]):
            raise ManifestError(f"{manifest.root}: qwen3_vl.num_position_embeddings must be a square number")

    @property
    def row_width(self) -> int:
        """H * (1 + L): the main row and each DeepStack level's, side by side (vLLM's layout)."""
        return self.hidden * (1 + self.levels)

    # -- engine outputs -> rows ---------------------------------------------------------------
    def index_inputs(self, grids: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        """The engine's index inputs for these grids (no windows; the position table's taps)."""
        return engine_layout(grids, self.merge, self.side)

    def call_rows(
        self, out: dict[str, torch.Tensor], sizes: list[int], expected: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One engine call's main rows and DeepStack levels side by side: [rows, H * (1 + L)], and the positions."""
        emb, pos = out["embeddings"].float().cpu(), out["positions"].to(torch.int64).cpu()
        levels = out["deepstack"].float().cpu()
        total = sum(expected)
        if (
            tuple(emb.shape) != (total, self.hidden)
            or tuple(pos.shape) != (total,)
            or tuple(levels.shape) != (self.levels, total, self.hidden)
        ):
            raise RuntimeError(
                f"the vision engine returned embeddings {tuple(emb.shape)}, deepstack {tuple(levels.shape)} and "
                f"positions {tuple(pos.shape)} for images of {sizes} rows; "
                f"expected {expected} rows of width {self.hidden} and {self.levels} DeepStack levels"
            )
        return torch.cat([emb, *levels.unbind(0)], dim=-1), pos

    # -- the handoff to a serving engine ------------------------------------------------------
    def upstream_route(self, fmt: str, grid_positions: bool = False) -> str:
        """How `apet serve --upstream` hands the rows on (the interface of issue 22's routes): vLLM's
        `image_embeds` dict form. Exact with apet-trt's plugin (--upstream-format vllm-apet: the kept
        rows' own M-RoPE ids, `vllm_plugin_fields`, Qwen2.5-VL's); vLLM's own Qwen3-VL only with the
        operator's consent to approximate positions (--upstream-grid-positions): it derives the ids from
        the part's grid. trtllm-serve: not checked with DeepStack rows, refused."""
        if fmt not in ("vllm", "vllm-apet"):
            raise ValueError(
                f"--upstream-format {fmt}: Qwen3-VL's rows [T, hidden x (1 + DeepStack levels)] are checked against "
                "vLLM only; use --upstream-format vllm-apet (vLLM with apet-trt's plugin) or vllm"
            )
        if fmt == "vllm" and not grid_positions:
            raise ValueError(
                "--upstream: vLLM's own Qwen3-VL places image rows on a grid's M-RoPE positions, not the kept rows' "
                "own; the exact route is the apet-trt vLLM plugin (docs/VLLM_PLUGIN.md): --upstream-format vllm-apet; "
                "or pass --upstream-grid-positions to accept approximate positions (a compact grid of the kept rows; "
                "docs/families/qwen3_vl.md)"
            )
        return "image_embeds"

    def handoff_fields(self, rows: VisualRows, fmt: str = "vllm") -> dict[str, torch.Tensor]:
        """vLLM's Qwen3-VL `image_embeds` dict form: the rows [R, H * (1 + L)] as they are and the
        grid [3] = (1, h, w) of exactly R merge blocks (vLLM splits the rows by grid and derives the M-RoPE
        ids from it: approximate positions for ApET's kept rows, see docs/families/qwen3_vl.md)."""
        if fmt != "vllm":
            raise ValueError(f"the {self.name} family's rows go to vLLM's image_embeds dict form only, not {fmt!r}")
        grid = compact_grid(rows.num_rows, self.merge)  # one item's grid is [3]: vLLM batches the items
        return {"image_embeds": rows.embeddings, "image_grid_thw": torch.tensor(grid, dtype=torch.int64)}

    def rows_from_handoff(self, fields: dict[str, torch.Tensor]) -> VisualRows:
        """The inverse of `handoff_fields`: rows [R, H * (1 + L)] and a grid of R merge blocks; the
        uncompressed grid is not in the payload, so positions are 0..R-1 on the grid given."""
        extra = sorted(set(fields) - {"image_embeds", "image_grid_thw"})
        if extra or "image_grid_thw" not in fields:
            raise ValueError(f"the {self.name} family takes image_embeds with image_grid_thw, got {sorted(fields)}")
        emb, grid = fields["image_embeds"], fields["image_grid_thw"].reshape(-1)
        if grid.numel() != 3 or grid.is_floating_point():
            raise ValueError(f"image_grid_thw must be one integer (t, h, w), got {grid.tolist()}")
        t, h, w = (int(x) for x in grid)
        if t != 1 or h % self.merge or w % self.merge or h * w // self.merge**2 != emb.shape[0] or h < 1:
            raise ValueError(
                f"image_grid_thw {[t, h, w]} does not describe {emb.shape[0]} rows (t = 1, h and w multiples of "
                f"{self.merge}, h * w / {self.merge**2} rows)"
            )
        if emb.shape[1] != self.row_width:
            raise ValueError(f"image_embeds of width {emb.shape[1]}; this engine's rows are {self.row_width} wide")
        positions = torch.arange(emb.shape[0], dtype=torch.int64)
        return VisualRows(emb, positions, int(emb.shape[0]), {"grid_thw": (t, h, w)})

    # -- the decoder ---------------------------------------------------------------------------
    def transformers_decoder(self, model, **common) -> TransformersDecoder:
        return DeepStackDecoder(model, levels=self.levels, **common)

    # -- the Torch module ---------------------------------------------------------------------
    def torch_module(self, hf_model) -> torch.nn.Module:
        return Qwen3VLTorchVision(hf_model, apet=self.manifest.apet).eval()

    def summary(self) -> list[str]:
        v = self.manifest.vision
        return [
            f"vision       Qwen3-VL tower, patch {self.patch_size}, merge {self.merge}, "
            f"{self.min_tokens}..{self.max_tokens} tokens per image, D={v.get('feature_dim')}, "
            f"{self.levels} DeepStack levels (rows {self.row_width} wide), "
            f"{self.images_per_call} image(s) per engine call"
        ]


class DeepStackDecoder(TransformersDecoder):
    """The Transformers decoder for rows [R, H * (1 + L)]: the first H of each row go into the input
    embeddings at the image slots; level l (the next H, and so on) goes to the language model's
    DeepStack input for the prefill, which adds it to the hidden states after decoder layer l at those
    slots (Qwen3VLTextModel.forward's `visual_pos_masks` and `deepstack_visual_embeds`, handed over
    by a forward pre-hook on the language model, the route Transformers' own pixels take)."""

    def __init__(self, model, *, levels: int, **common):
        super().__init__(model, **common)
        self.levels = int(levels)
        self.hidden = int(self.embed.weight.shape[1])
        self.language_model = model.get_decoder()  # the VLM's language model (or a text model's own)
        accepted = inspect.signature(self.language_model.forward).parameters
        if self.levels and not {"visual_pos_masks", "deepstack_visual_embeds"} <= set(accepted):
            raise RuntimeError(
                f"{type(self.language_model).__name__} takes no DeepStack input (visual_pos_masks, "
                "deepstack_visual_embeds); this checkpoint is not a Qwen3-VL model or Transformers is too old (>= 4.57)"
            )

    def prefill(self, prompts, visual):
        width = self.hidden * (1 + self.levels)
        for b, images in enumerate(visual):
            for x in images:
                if x.dim() != 2 or x.shape[1] != width:
                    raise ValueError(
                        f"prompt {b}: visual rows of shape {tuple(x.shape)}; this decoder takes rows [R, {width}] "
                        f"(hidden {self.hidden} x (1 + {self.levels} DeepStack levels))"
                    )
        main = [[x[:, : self.hidden] for x in images] for images in visual]
        with self._deepstack(prompts, visual):
            return super().prefill(prompts, main)

    @contextmanager
    def _deepstack(self, prompts, visual):
        """The language model's DeepStack inputs for one forward: the slot mask of the left-padded
        batch (build_inputs_embeds' layout) and each level's rows in (batch, position) order."""
        if not self.levels:
            yield
            return
        length = max(int(p.input_ids.numel()) for p in prompts)
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for i, p in enumerate(prompts):
            mask[i, p.image_slots + (length - int(p.input_ids.numel()))] = True  # slots ascending: rows in order
        rows = torch.cat([torch.cat(list(images)) for images in visual]).to(self.device, self.dtype)
        levels = [rows[:, self.hidden * (1 + level) : self.hidden * (2 + level)] for level in range(self.levels)]
        mask = mask.to(self.device)

        def hook(module, args, kwargs):
            if kwargs.get("deepstack_visual_embeds") is not None:
                raise RuntimeError("the model computed DeepStack features of its own; it was given pixels")
            return args, {**kwargs, "visual_pos_masks": mask, "deepstack_visual_embeds": levels}

        handle = self.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


class Qwen3VLTorchVision(torch.nn.Module):
    """The vision engine in PyTorch eager, written independently of export's wrapper: the checkpoint's
    own vision model (`visual(pixel_values, grid_thw)`: patch embedding, position table, blocks, main
    and DeepStack mergers) -> apet_ops.ApetCompressor.compress_with on one image's rows. The grids are
    read back from the engine inputs (patch counts from image_gather, rows and columns from
    patch_positions)."""

    def __init__(self, model, *, apet: dict | None):
        super().__init__()
        from apet_trt.apet_ops import ApetCompressor, ApetConfig

        self.visual = submodule(model, "visual", "qwen3_vl")
        self.compressor = None if apet is None else ApetCompressor(ApetConfig.from_dict(apet))

    def forward(self, pixel_values, patch_positions, image_gather, **_) -> dict[str, torch.Tensor]:
        grids = grids_from_inputs(patch_positions, image_gather)
        dtype = next(self.visual.parameters()).dtype
        out = self.visual(pixel_values.to(dtype), grid_thw=torch.tensor(grids, device=pixel_values.device))
        rows, levels = out.pooler_output.float(), [x.float() for x in out.deepstack_features]
        if self.compressor is None:
            positions = torch.arange(rows.shape[0], device=rows.device)
            return {"embeddings": rows, "deepstack": torch.stack(levels), "positions": positions}
        if len(grids) != 1:
            raise ValueError(f"an ApET engine call takes one image, got {len(grids)}")
        tokens, positions, kept = self.compressor.compress_with(rows[None], [x[None] for x in levels])
        return {"embeddings": tokens[0], "deepstack": torch.stack([k[0] for k in kept]), "positions": positions[0]}
