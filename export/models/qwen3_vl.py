"""Qwen3-VL family (Transformers `Qwen3VLForConditionalGeneration`), DeepStack levels included.

ApET on Qwen3-VL is this project's extension: the paper's authors evaluated LLaVA-1.5, LLaVA-NeXT,
Video-LLaVA and Qwen2.5-VL, not Qwen3-VL (docs/families/qwen3_vl.md).

Geometry: the processor resizes each image to multiples of 32 px within its min/max pixels and cuts
it into 16 px patches (3 channels x 2 temporal copies x 16 x 16 = 1536 values each), every 4
consecutive patches one 2 x 2 merge block; an image of h x w patches hands the LLM N = h * w / 4 rows.
Unlike Qwen2.5-VL the tower has no window attention (every block attends over the whole image) and
adds a learned position embedding, bilinearly resampled from a 48 x 48 table to each image's grid.

DeepStack: after the blocks `deepstack_visual_indexes` (8, 16, 24 in the 8B model) the hidden
states go through a merger of their own (LayerNorm after the 2 x 2 shuffle); the LLM adds level l's
row of a visual token to that token's hidden state after its decoder layer l. So each of the N
tokens has 1 + L rows of the LLM's width, and a compressor that keeps T tokens must keep the same T
at every level.

The engine's inputs, computed from each image's grid with numpy (engine_format/families/qwen3_vl.py,
which the runtime adapter feeds):

    pixel_values     [patches, 1536] float32  the processor's output, image after image
    patch_positions  [patches, 2]    int64    (row, column) of each patch in its image (rotary)
    interp_indices   [patches, 4]    int64    the 4 taps of the 48 x 48 position table per patch
    interp_weights   [patches, 4]    float32  and their bilinear weights (align_corners)
    image_gather     [images, image_patches] int64  attention segments (one per image), -1 padded,
    image_scatter    [patches]               int64  and each patch's padded slot

Then the main merger and the DeepStack mergers -> rows [N, H] and levels [L, N, H] in the
processor's order -> ApET (apet_ops.ApetCompressor.compress_with, float32): the selection is made on
the main rows and the same kept positions, seed slots and merge groups are applied to every level
-> embeddings [rows, H] float32, positions [rows] int64 (each row's index among the call's
uncompressed rows), deepstack [L, rows, H] float32. An ApET engine takes one image per call (ApET runs per image);
the --no-apet engine takes several.

Presets (export/presets.py) give `fields` = {"vision": Qwen3VLVisionConfig kwargs, "text":
Qwen3VLTextConfig kwargs, "processor": {"min_pixels", "max_pixels"}, "first_special_id": int | None}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apet_trt.apet_ops import ApetCompressor, ApetConfig
from apet_trt.engine_format.families.qwen3_vl import FACTS, engine_layout

from ..tokenizer import QWEN_IMAGE_TOKEN
from .qwen2_5_vl import Qwen25VLExport, parts, qwen_image_processor, segment_attention
from .qwen2_5_vl import VisionParts as Qwen25VisionParts

QWEN3_MEAN = [0.5, 0.5, 0.5]
QWEN3_STD = [0.5, 0.5, 0.5]
OUTPUTS = ("embeddings", "positions", "deepstack")  # the first two: what every family's engine returns
# Qwen3-VL's chat template (no default system prompt), one image
CHAT_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


class VisionParts(Qwen25VisionParts):
    """Only the vision tower (with its mergers): a 7B-class language model stays unbuilt."""

    tower = ("qwen3_vl", "Qwen3VLVisionModel")


# -- the index inputs of a batch of grids (example inputs): the format's numpy layout, which the runtime feeds
def layout(grids, *, merge: int, side: int) -> dict[str, torch.Tensor]:
    """The engine's index inputs for images of these (t, h, w) patch grids, in processor order."""
    return {k: torch.from_numpy(v) for k, v in engine_layout(grids, merge, side).items()}


# -- the engine -----------------------------------------------------------------------------------
class Qwen3VLTower(nn.Module):
    """The checkpoint's patch embedding, resampled position table and blocks, attention per image on
    padded segments: the engine's inputs -> (last hidden states [P, D], the hidden states after each
    DeepStack block [L x [P, D]]), patches in the processor's order."""

    def __init__(self, visual):
        super().__init__()
        cfg = visual.config
        self.patch_embed, self.pos_embed, self.blocks = visual.patch_embed, visual.pos_embed, visual.blocks
        self.num_heads = cfg.num_heads
        self.taps = {int(i): j for j, i in enumerate(cfg.deepstack_visual_indexes)}
        # a constant, not a buffer: --fp16 halves buffers, and the rotary angles stay float32
        self.inv_freq = tuple(float(f) for f in visual.rotary_pos_emb.inv_freq)

    def forward(self, pixel_values, patch_positions, interp_indices, interp_weights, image_gather, image_scatter):
        proj = self.patch_embed.proj  # Conv3d with stride = kernel: one matmul per patch
        x = F.linear(pixel_values.to(proj.weight.dtype), proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)
        x = x + (self.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1).to(x.dtype)
        freqs = patch_positions.unsqueeze(-1).float() * torch.tensor(self.inv_freq, dtype=torch.float32)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        taps: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x = x + segment_attention(block.attn, block.norm1(x), cos, sin, image_gather, image_scatter, self.num_heads)
            x = x + block.mlp(block.norm2(x))
            if i in self.taps:
                taps.append(x)
        return x, taps


class Qwen3VLMergers(nn.Module):
    """The main PatchMerger and the DeepStack mergers: hidden states -> rows [N, H], levels [L, N, H]."""

    def __init__(self, visual):
        super().__init__()
        self.merger, self.deepstack = visual.merger, visual.deepstack_merger_list

    def forward(self, x, taps):
        return self.merger(x), torch.stack([m(t) for m, t in zip(self.deepstack, taps)])


class Qwen3VLVisionEngine(nn.Module):
    """The engine's named inputs (module docstring) -> (embeddings [rows, H] float32, positions [rows]
    int64, deepstack [L, rows, H] float32). Submodules vision_tower / projector / compressor name the graph's
    node scopes (export/precision.py reads each part's dtype from them)."""

    def __init__(self, model, apet: ApetConfig | None):
        super().__init__()
        visual = parts(model)
        self.vision_tower = Qwen3VLTower(visual)
        self.projector = Qwen3VLMergers(visual)
        self.compressor = ApetCompressor(apet) if apet is not None else None

    def forward(self, pixel_values, patch_positions, interp_indices, interp_weights, image_gather, image_scatter):
        x, taps = self.vision_tower(
            pixel_values, patch_positions, interp_indices, interp_weights, image_gather, image_scatter
        )
        rows, levels = self.projector(x, taps)
        if self.compressor is None:
            return rows.float(), torch.arange(rows.shape[0], device=rows.device), levels.float()
        # the selection on the main rows; the same kept positions, seeds and merge groups on every level
        tokens, positions, kept = self.compressor(rows.unsqueeze(0), others=list(levels.unsqueeze(1).unbind(0)))
        return tokens[0].float(), positions[0], torch.stack([k[0] for k in kept]).float()


def image_processor(min_pixels: int, max_pixels: int):
    """Qwen3-VL's image processor (Qwen2-VL's class with 16 px patches and 0.5 mean/std), PIL backend."""
    return qwen_image_processor(min_pixels, max_pixels, patch_size=16, mean=QWEN3_MEAN, std=QWEN3_STD)


class Qwen3VLExport(Qwen25VLExport):
    """Qwen2.5-VL's adapter for what the two share (pixel range, token range, ratio budget, TensorRT's
    TopK limit, one image per ApET call); Qwen3-VL's own tower, engine io and DeepStack outputs."""

    name = "qwen3_vl"
    facts = FACTS
    model_types = ("qwen3_vl",)
    hf_model_class = "Qwen3VLForConditionalGeneration"
    prompt_template = CHAT_TEMPLATE
    image_token = QWEN_IMAGE_TOKEN
    trtllm_model_class = None
    # the official ApET Qwen2.5-VL rules (its qwen2_5_vl_custom.py), carried over: seeds blended 0.5 /
    # 0.5 into their slots; the budget is the build's (--keep-ratio 0.3 is the official one)
    apet_defaults = {"seed_blend": 0.5}
    supports_start_input = False  # no `start` input in this family's engine yet: --start random is refused
    hf_config_class = "Qwen3VLConfig"
    preset_processor = staticmethod(image_processor)
    default_pixels = (64 * 32 * 32, 16384 * 32 * 32)

    def read_vision(self, v) -> None:
        """Qwen3-VL's own geometry (no windows): the DeepStack levels and the position table's side."""
        self.levels = len(v.deepstack_visual_indexes)
        self.side = int(v.num_position_embeddings**0.5)
        # the engine attends over each image whole (not in query slices), so `apet build` estimates its
        # memory (check_memory) with the whole score matrix; the estimate's constants were fitted on
        # Qwen2.5-VL's tower (docs/LIMITS.md) and are not re-fitted for Qwen3-VL's
        self.attention_chunk = None

    # -- loading ------------------------------------------------------------------------------
    def vision_parts(self) -> nn.Module:
        return VisionParts.from_config(self.config)

    # -- the engine ---------------------------------------------------------------------------
    def profile_dims(self, opt_tokens: int, opt_batch: int, max_batch: int) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each dynamic axis of the engine's inputs (no windows)."""
        unit = self.merge**2
        return {
            "patches": (unit * self.min_tokens, unit * opt_tokens * opt_batch, unit * self.max_tokens * max_batch),
            "images": (1, opt_batch, max_batch),
            "image_patches": (unit * self.min_tokens, unit * opt_tokens, unit * self.max_tokens),
        }

    def vision_module(self, model: nn.Module, apet: ApetConfig | None) -> nn.Module:
        return Qwen3VLVisionEngine(model, apet)

    def example_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        grids = self.example_grids(batch, generator)
        patches = sum(t * h * w for t, h, w in grids)
        return {
            "pixel_values": torch.randn(patches, self.patch_dim, generator=generator),
            **layout(grids, merge=self.merge, side=self.side),
        }

    def io(self, apet: ApetConfig | None) -> dict:
        h = self.config.text_config.hidden_size
        rows = "rows" if apet is None or apet.keep is None else apet.keep
        images = "images" if apet is None else 1

        def tensor(name, dtype, *shape):
            return {"name": name, "dtype": dtype, "shape": list(shape)}

        return {
            "inputs": [
                tensor("pixel_values", "float32", "patches", self.patch_dim),
                tensor("patch_positions", "int64", "patches", 2),
                tensor("interp_indices", "int64", "patches", 4),
                tensor("interp_weights", "float32", "patches", 4),
                tensor("image_gather", "int64", images, "image_patches"),
                tensor("image_scatter", "int64", "patches"),
            ],
            "outputs": [
                tensor(OUTPUTS[0], "float32", rows, h),
                tensor(OUTPUTS[1], "int64", rows),
                tensor(OUTPUTS[2], "float32", self.levels, rows, h),
            ],
        }

    def reference_rows(self, model: nn.Module, processor, images: list) -> list[torch.Tensor]:
        """Transformers' own `get_image_features` (the vision model's forward for the vision parts
        alone), per image its main rows and each DeepStack level's side by side: [R, H * (1 + L)],
        vLLM's layout, what the runtime hands the decoder."""
        out = processor(images=images, return_tensors="pt")
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        sizes = (grid.prod(-1) // self.merge**2).tolist()
        inner = getattr(model, "model", model)
        get = getattr(inner, "get_image_features", None) or (lambda p, g: parts(model)(p, grid_thw=g))
        with torch.no_grad():
            features = get(pixel_values, grid)
        # Transformers 5: a model output (per-image splits); 4.57: a tuple (main, levels unsplit)
        main, levels = (
            features if isinstance(features, tuple) else (features.pooler_output, features.deepstack_features)
        )
        main = torch.split(main, sizes) if isinstance(main, torch.Tensor) else main
        levels = [torch.split(x, sizes) if isinstance(x, torch.Tensor) else x for x in levels]
        return [torch.cat([m, *(lvl[i] for lvl in levels)], dim=-1).float() for i, m in enumerate(main)]

    # -- the manifest -------------------------------------------------------------------------
    def manifest_fields(self, apet: ApetConfig | None) -> dict:
        v = self.config.vision_config
        return {
            "vision": self.vision_fields(),
            "num_visual_tokens": self.rows_per_item(apet),
            FACTS.section: {
                **self.section_fields(apet),
                # DeepStack: level l is added to the LLM's hidden states after decoder layer l
                "deepstack_visual_indexes": [int(i) for i in v.deepstack_visual_indexes],
                "num_position_embeddings": int(v.num_position_embeddings),
            },
        }
