"""Qwen2.5-VL family (Transformers `Qwen2_5_VLForConditionalGeneration`).

Dynamic resolution: the processor resizes each image to multiples of 28 px within its min/max
pixels and cuts it into 14 px patches (each patch flattened over 3 channels x 2 temporal copies x
14 x 14 = 1176 values), grouped so that every 4 consecutive patches are one 2 x 2 merge block. An
image of h x w patches becomes N = h * w / 4 rows for the LLM after the PatchMerger.

The vision engine takes the flattened patches of one or more images at once (the processor's
`pixel_values`, a dynamic patch axis) plus what the tower needs that is awkward to trace, computed
by the runtime adapter from each image's grid (runtime/families/qwen2_5_vl.py):

    pixel_values     [patches, 1176] float32   the processor's output, image after image
    patch_positions  [patches, 2]    int64     (row, column) of each patch in its image (rotary)
    window_index     [tokens]        int64     merge blocks in window order (HF's window_index)
    reverse_index    [tokens]        int64     its inverse (HF's argsort(window_index))
    image_gather     [images, image_patches]   int64  full-attention segments (one per image),
    image_scatter    [patches]                 int64  padded with -1, and each patch's padded slot
    window_gather    [windows, window_patches] int64  window-attention segments (<= 8 x 8 patches),
    window_scatter   [patches]                 int64  the same for the windows
    start            [1]                       int64  --start random only: the image's first FPS
                                                      seed, drawn by the runtime

Attention runs per segment on a padded [segments, longest, ...] block with the padding masked,
exactly HF's cu_seqlens split (window layers: the 8 x 8 patch windows; full layers: the whole
image), so the window layers cost O(patches x 64), not O(patches^2).

Then the PatchMerger -> rows in the processor's order -> ApET on one image's [1, N, H] in float32
(the compressor needs one image per engine call: the rows of several images cannot share one
static graph of per-image ApET; the --no-apet engine takes several images per call) ->
embeddings [rows, H] float32, positions [rows] int64 (each row's index among the call's
uncompressed rows).

Presets (export/presets.py) give `fields` = {"vision": Qwen2_5_VLVisionConfig kwargs, "text":
Qwen2_5_VLTextConfig kwargs, "processor": {"min_pixels", "max_pixels"}, "first_special_id": int |
None (where Qwen's special tokens start in the tokenizer: 151643 in the real vocabulary)}.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from apet_trt.apet_ops import ApetCompressor, ApetConfig
from apet_trt.apet_ops.compat import pil_image_processor_class
from apet_trt.engine_format.families.qwen2_5_vl import FACTS, engine_layout

from ..limits import MAX_TOKENS_PER_IMAGE
from ..tokenizer import QWEN_IMAGE_TOKEN, QWEN_SPECIALS, qwen_tokenizer
from .base import ExportFamily, Preset

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
OUTPUTS = ("embeddings", "positions")
START = "start"  # with --start random: [1] int64, the image's first FPS seed among its N rows
# queries per slice in the full-attention blocks (None: the whole [S, S] score matrix at once)
ATTENTION_CHUNK: int | None = 1024

# Memory model of one vision engine call on ONNX Runtime CPU (docs/LIMITS.md), in bytes:
#   MEMORY_FIXED + float32 weights + images * patches * (MEMORY_PER_PATCH + MEMORY_PER_PATCH_WIDTH * width)
#   + MEMORY_PER_SCORE * images * heads * queries * patches
# patches = 4 * tokens per image; queries = patches, or ATTENTION_CHUNK where smaller (the attention
# scores alive at once). Fitted by least squares (relative errors) to scripts/qwen_vision_memory.py's 19
# measurements (widths 32 / 128 / 512, 2 / 8 heads, 256..2,500 tokens, whole and sliced attention): within
# -22 % .. +6 % of each; the 7B tower's 11.6 GB at 1,591 tokens (README, not fitted) is estimated at 11.7 GB.
MEMORY_FIXED = 143_800_000  # the processor, tokenizer and ONNX Runtime session
MEMORY_PER_PATCH = 28_650  # the image, its pixel values [patches, 1176] and their copies
MEMORY_PER_PATCH_WIDTH = 75.5  # activations [patches, width], about 19 float32 copies
MEMORY_PER_SCORE = 12.39  # about 3 float32 copies of the scores (product, mask, softmax)
# Qwen2.5-VL's chat format (its processor's chat template with the default system prompt), one image
CHAT_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"
)


def parts(model):
    """The vision tower (`visual`: patch embed, blocks, merger) across Transformers versions (5.x and
    4.5x keep it on model.model, older 4.x on the outer model)."""
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None) or getattr(model, "visual", None)
    if visual is None:
        raise ValueError(f"{type(model).__name__} has no visual tower: not a Qwen2.5-VL model")
    return visual


class VisionParts(nn.Module):
    """Only the vision tower (with its merger, the projector): a 7B language model stays unbuilt."""

    # Transformers' vision tower class: transformers.models.<module>.modeling_<module>.<class>
    tower = ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel")

    def __init__(self, visual: nn.Module, config):
        super().__init__()
        self.visual = visual
        self.config = config

    @classmethod
    def from_config(cls, config) -> VisionParts:
        module, name = cls.tower
        tower = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        return cls(tower._from_config(config.vision_config), config).eval()


# -- the layout of a batch of grids (example inputs): the format's numpy layout, which the runtime feeds
def layout(grids: list[tuple[int, int, int]], *, merge: int, window_blocks: int) -> dict[str, torch.Tensor]:
    """The engine's index inputs for images of these (t, h, w) patch grids, in processor order."""
    return {k: torch.from_numpy(v) for k, v in engine_layout(grids, merge, window_blocks).items()}


def check_token_bound(max_tokens: int, max_pixels: int, factor: int) -> None:
    """--max-pixels whose images would exceed the engine format's tokens per image: refused before
    anything is built (the runtime's schema would refuse the engine)."""
    if max_tokens > MAX_TOKENS_PER_IMAGE:
        raise ValueError(
            f"--max-pixels {max_pixels}: images of up to {max_tokens:,} tokens, over the engine format's "
            f"{MAX_TOKENS_PER_IMAGE:,} tokens per image; build with --max-pixels <= {MAX_TOKENS_PER_IMAGE * factor**2}"
        )


# -- the engine -----------------------------------------------------------------------------------
def segment_attention(
    attn: nn.Module, x, cos, sin, gather, scatter, num_heads: int, chunks: tuple[int, int] | None = None
):
    """Qwen2.5-VL's vision attention (qkv, rotary, softmax per segment, proj) on a padded layout:
    x [P, D] -> [P, D]; `gather` [G, S] (-1 = padding), `scatter` [P] (engine_format's `segments`).
    chunks = (C, S_max): the queries in slices of C up to S_max (static slices of the dynamic S axis;
    those past S are empty), so that at most [G, heads, C, S] scores exist at once, not [G, heads, S, S]."""
    p, d = x.shape
    head_dim = d // num_heads
    q, k, v = attn.qkv(x).reshape(p, 3, num_heads, head_dim).permute(1, 0, 2, 3).unbind(0)  # [P, heads, hd]
    q, k = (_rotate(t.float(), cos, sin).to(x.dtype) for t in (q, k))
    padding = ~(gather >= 0)[:, None, None, :]
    index = gather.clamp(min=0)
    qs, ks, vs = (t[index].permute(0, 2, 1, 3) for t in (q, k, v))  # [G, heads, S, hd]
    if chunks is None or chunks[0] >= chunks[1]:
        out = _attend(qs, ks, vs, padding, head_dim)
    else:
        size, longest = chunks
        out = torch.cat(
            [_attend(qs[:, :, i : i + size], ks, vs, padding, head_dim) for i in range(0, longest, size)], 2
        )
    out = out.permute(0, 2, 1, 3).reshape(-1, d)[scatter]  # [P, D]
    return attn.proj(out)


def _attend(qs, ks, vs, padding, head_dim: int):
    """softmax(q k^T / sqrt(hd), keys' padding masked) v, the softmax in float32: [G, heads, Q, hd]."""
    scores = (qs @ ks.transpose(-1, -2)) * head_dim**-0.5
    scores = scores.masked_fill(padding, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(vs.dtype) @ vs


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Qwen25VLTower(nn.Module):
    """The checkpoint's patch embedding and blocks with window / full attention on padded segments:
    the engine's inputs -> hidden states [patches, D] in window order (the merger's input).
    `full_chunks` = (C, most patches of an image): the full-attention blocks' queries in slices of C."""

    def __init__(self, visual, full_chunks: tuple[int, int] | None = None):
        super().__init__()
        self.full_chunks = full_chunks
        cfg = visual.config
        self.patch_embed, self.blocks = visual.patch_embed, visual.blocks
        self.num_heads = cfg.num_heads
        self.unit = cfg.spatial_merge_size**2
        self.full_layers = set(cfg.fullatt_block_indexes)
        # a constant, not a buffer: --fp16 halves buffers, and the rotary angles stay float32
        self.inv_freq = tuple(float(f) for f in visual.rotary_pos_emb.inv_freq)

    def forward(
        self, pixel_values, patch_positions, window_index, image_gather, image_scatter, window_gather, window_scatter
    ):
        weight = self.patch_embed.proj.weight  # Conv3d with stride = kernel: one matmul per patch
        order = (window_index.unsqueeze(1) * self.unit + torch.arange(self.unit)).reshape(-1)  # window order
        x = F.linear(pixel_values[order].to(weight.dtype), weight.reshape(weight.shape[0], -1))
        inv_freq = torch.tensor(self.inv_freq, dtype=torch.float32)
        freqs = patch_positions[order].unsqueeze(-1).float() * inv_freq  # [P, 2, hd/4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        for i, block in enumerate(self.blocks):
            full = i in self.full_layers
            gather, scatter = (image_gather, image_scatter) if full else (window_gather, window_scatter)
            chunks = self.full_chunks if full else None
            x = x + segment_attention(block.attn, block.norm1(x), cos, sin, gather, scatter, self.num_heads, chunks)
            x = x + block.mlp(block.norm2(x))
        return x


class Qwen25VLVisionEngine(nn.Module):
    """The engine's named inputs (module docstring) -> (embeddings [rows, H] float32, positions [rows]
    int64). Submodules vision_tower / projector (the PatchMerger) / compressor name the graph's
    node scopes (export/precision.py reads each part's dtype from them)."""

    def __init__(self, model, apet: ApetConfig | None, full_chunks: tuple[int, int] | None = None):
        super().__init__()
        visual = parts(model)
        self.vision_tower = Qwen25VLTower(visual, full_chunks)
        self.projector = visual.merger
        self.compressor = ApetCompressor(apet) if apet is not None else None  # node names: /compressor/...

    def forward(
        self,
        pixel_values,
        patch_positions,
        window_index,
        reverse_index,
        image_gather,
        image_scatter,
        window_gather,
        window_scatter,
        start=None,
    ):
        x = self.vision_tower(
            pixel_values, patch_positions, window_index, image_gather, image_scatter, window_gather, window_scatter
        )
        rows = self.projector(x)[reverse_index]  # [N, H], the processor's order
        if self.compressor is None:
            return rows.float(), torch.arange(rows.shape[0], device=rows.device)
        tokens, positions = self.compressor(rows.unsqueeze(0), start)  # float32 inside, the input dtype out
        return tokens[0].float(), positions[0]


def _halvings(n: int) -> list[int]:
    """n, n // 2, n // 4, ..., 1."""
    out = []
    while n >= 1:
        out.append(n)
        n //= 2
    return out


def qwen_image_processor(min_pixels: int, max_pixels: int, *, patch_size: int, mean, std):
    """Qwen2-VL's image processor class (what Qwen2.5-VL and Qwen3-VL ship), PIL backend: no
    torchvision needed; the families differ in patch size and normalisation."""
    return pil_image_processor_class("Qwen2VLImageProcessor")(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=mean,
        image_std=std,
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        do_convert_rgb=True,
        resample=3,
    )


def image_processor(min_pixels: int, max_pixels: int):
    """Qwen2.5-VL's image processor: 14 px patches, CLIP's mean/std."""
    return qwen_image_processor(min_pixels, max_pixels, patch_size=14, mean=CLIP_MEAN, std=CLIP_STD)


def qwen_config(config_class, fields: dict, tokenizer):
    """A Qwen-VL config (`config_class`: Transformers' Qwen2_5_VLConfig or Qwen3VLConfig) from a
    preset's vision and text fields, its special token ids read from the tokenizer."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    tokens = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    text = {"vocab_size": len(tokenizer), **fields["text"], **tokens}
    config = config_class(
        vision_config=dict(fields["vision"]),
        text_config=text,
        image_token_id=ids[QWEN_IMAGE_TOKEN],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    for key, value in tokens.items():  # on the outer config too, whichever way its class takes them
        setattr(config, key, value)
    return config


def _with_pixels(processor, min_pixels: int, max_pixels: int):
    """A copy of a Qwen2-VL image processor with another pixel range."""
    config = processor.to_dict()
    for key in ("size", "min_pixels", "max_pixels", "image_processor_type", "processor_class"):
        config.pop(key, None)
    return type(processor)(**config, min_pixels=min_pixels, max_pixels=max_pixels)


def processor_pixels(processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a Qwen2-VL image processor of either Transformers major."""
    size = getattr(processor, "size", None) or {}
    lo = getattr(processor, "min_pixels", None) or size.get("shortest_edge") or size.get("min_pixels")
    hi = getattr(processor, "max_pixels", None) or size.get("longest_edge") or size.get("max_pixels")
    if lo is None or hi is None:
        raise ValueError(f"{type(processor).__name__}: no min_pixels / max_pixels: not a Qwen2-VL image processor")
    return int(lo), int(hi)


class Qwen25VLExport(ExportFamily):
    name = "qwen2_5_vl"
    facts = FACTS
    model_types = ("qwen2_5_vl",)
    hf_model_class = "Qwen2_5_VLForConditionalGeneration"
    prompt_template = CHAT_TEMPLATE
    image_token = QWEN_IMAGE_TOKEN
    trtllm_model_class = None  # TensorRT-LLM takes Qwen2.5-VL through its LLM API (PyTorch backend) only
    # the official ApET Qwen2.5-VL code blends each seed into its slot: 0.5 * seed + 0.5 * slot
    apet_defaults = {"seed_blend": 0.5}
    supports_start_input = True  # --start random: one start per image (one image per engine call)
    paper_budget = {"keep_ratio": 0.3}  # the official Qwen2.5-VL budget
    paper_budget_text = "T = floor(0.3 N) rows per image (ratio 0.3), seeds blended 0.5/0.5"
    hf_config_class = "Qwen2_5_VLConfig"  # Transformers' config class of the presets
    preset_processor = staticmethod(image_processor)
    default_pixels = (56 * 56, 28 * 28 * 1280)  # (min, max) pixels where no processor is given

    def __init__(self, config, processor=None):
        super().__init__(config, processor)
        v = config.vision_config
        self.patch_size, self.merge = v.patch_size, v.spatial_merge_size
        self.temporal_patch_size = v.temporal_patch_size
        self.feature_dim = v.out_hidden_size
        self.patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size
        self.factor = self.patch_size * self.merge
        # the token range of the processor the engine is built for (its min/max pixels): profiles,
        # example inputs and the `--keep` check
        lo, hi = processor_pixels(processor) if processor is not None else self.default_pixels
        self.min_tokens = max(1, math.ceil(lo / self.factor**2))
        self.max_tokens = max(self.min_tokens, hi // self.factor**2)
        self.max_pixels = hi
        check_token_bound(self.max_tokens, hi, self.factor)
        self.apet: ApetConfig | None = None  # the build's (check_apet): example images must meet it
        self.attention_chunk = ATTENTION_CHUNK
        self.read_vision(v)

    def read_vision(self, v) -> None:
        """The family's own vision geometry: Qwen2.5-VL's attention windows (in merge blocks)."""
        self.window_blocks = v.window_size // v.spatial_merge_size // v.patch_size

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def preset_config(cls, preset: Preset):
        import transformers

        f = preset.fields
        tokenizer = qwen_tokenizer(f.get("first_special_id"))
        config = qwen_config(getattr(transformers, cls.hf_config_class), f, tokenizer)
        return config, cls.preset_processor(**f["processor"]), tokenizer

    def vision_parts(self) -> nn.Module:
        return VisionParts.from_config(self.config)

    # -- the engine ---------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        """The largest N (rows of one image) the engine is built for; N varies with the image."""
        return self.max_tokens

    @classmethod
    def configure_processor(cls, processor, *, min_pixels: int | None = None, max_pixels: int | None = None):
        """The processor with --min-pixels / --max-pixels applied: they bound the visual tokens of
        an image (pixels / 28^2), and so the engine's token axis."""
        lo, hi = processor_pixels(processor)
        lo = lo if min_pixels is None else int(min_pixels)
        hi = hi if max_pixels is None else int(max_pixels)
        if not 0 < lo <= hi:
            raise ValueError(f"--min-pixels {lo} / --max-pixels {hi}: need 0 < min_pixels <= max_pixels")
        if (lo, hi) == processor_pixels(processor):
            return processor
        return _with_pixels(processor, lo, hi)

    def vision_memory(self, tokens: int, images: int = 1) -> float:
        """Estimated peak memory (bytes) of one vision engine call on ONNX Runtime CPU: `images` images
        of `tokens` tokens each (the memory model above, float32 weights)."""
        v = self.config.vision_config
        patches = self.merge**2 * tokens
        queries = patches if self.attention_chunk is None else min(patches, self.attention_chunk)
        return (
            MEMORY_FIXED
            + self.weight_bytes()
            + images * patches * (MEMORY_PER_PATCH + MEMORY_PER_PATCH_WIDTH * v.hidden_size)
            + MEMORY_PER_SCORE * images * v.num_heads * queries * patches
        )

    def weight_bytes(self) -> int:
        """The vision tower's and merger's float32 weights, counted on the meta device (nothing allocated)."""
        with torch.device("meta"):
            return 4 * sum(p.numel() for p in self.vision_parts().parameters())

    def check_memory(self, items: int, budget_bytes: float) -> str:
        """The estimate at the build's --max-pixels (`items` images of the most tokens per call), or a
        ValueError naming the --max-pixels that fits the budget."""
        peak = self.vision_memory(self.max_tokens, items)
        gib = 2.0**30
        calls = f"{items} image(s)" if items > 1 else "one image"
        line = (
            f"vision engine peak memory (estimated, ONNX Runtime CPU; docs/LIMITS.md): {peak / gib:.1f} GiB for "
            f"{calls} of {self.max_tokens:,} tokens (--max-pixels {self.max_pixels}) per call; budget "
            f"{budget_bytes / gib:g} GiB (--max-memory)"
        )
        if peak <= budget_bytes:
            return line
        fits = [t for t in _halvings(self.max_tokens) if self.vision_memory(t, items) <= budget_bytes]
        lo, hi = (max(fits), min(t for t in _halvings(self.max_tokens) if t > max(fits))) if fits else (0, 1)
        while hi - lo > 1:  # the most tokens within budget: the estimate grows with the tokens
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.vision_memory(mid, items) <= budget_bytes else (lo, mid)
        advice = (
            f"build with --max-pixels <= {lo * self.factor**2} ({lo:,} tokens)"
            if lo >= self.min_tokens
            else "no image of the --min-pixels range fits"
        )
        batches = [b for b in range(1, items) if self.vision_memory(self.max_tokens, b) <= budget_bytes]
        more = f" or --max-batch {max(batches)}" if batches else ""
        raise ValueError(
            f"{line}: over the budget; {advice}{more}, or raise --max-memory if the machine has the memory"
        )

    def check_apet(self, apet: ApetConfig | None) -> None:
        """Refuse a budget no image of the processor's range could meet (images below it are
        refused one by one at run time, with their size)."""
        if apet is not None:
            apet.validate_for(self.max_tokens)
        self.apet = apet

    def tensorrt_token_limit(self) -> int | None:
        """The most tokens per image a TensorRT plan of this engine takes: TensorRT's TopK takes K <=
        3840 even when K is computed at run time (the ratio budget's floor(R * N)); None: no limit."""
        if self.apet is None:
            return None
        from apet_trt.apet_ops.onnx_export import trt_token_limit

        return trt_token_limit(self.apet)

    def rows_per_item(self, apet: ApetConfig | None):
        """Rows per image: T with a fixed --keep, else None (it depends on the image)."""
        return apet.keep if apet is not None and apet.keep is not None else None

    def budget_text(self, apet: ApetConfig | None) -> str:
        n = f"N={self.min_tokens}..{self.max_tokens}"
        if apet is None:
            return f"{n} -> all N"
        return f"{n} -> T={apet.keep}" if apet.keep is not None else f"{n} -> T=floor({apet.keep_ratio} N)"

    def max_items(self, apet: ApetConfig | None, max_batch: int) -> int:
        """ApET runs on one image's rows: one image per call then; without it, --max-batch images."""
        return 1 if apet is not None else max_batch

    def tensorrt_profile(self, apet: ApetConfig | None, opt_batch: int, max_batch: int) -> dict:
        """min: one image of the fewest tokens; opt: opt_batch images of the geometric middle of the
        token range; max: max_batch images of the most tokens (profile_dims: each dynamic axis)."""
        limit = self.tensorrt_token_limit()
        if limit is not None and self.max_tokens > limit:
            raise ValueError(
                f"images of up to {self.max_tokens} tokens with {self.apet.to_dict()}: TensorRT's TopK takes "
                f"K <= 3840, so a TensorRT plan takes N <= {limit} tokens per image; build with --max-pixels <= "
                f"{limit * self.factor**2} (or --no-tensorrt for the ONNX engine alone)"
            )
        opt_tokens = min(self.max_tokens, max(self.min_tokens, round(math.sqrt(self.min_tokens * self.max_tokens))))
        dims = self.profile_dims(opt_tokens, opt_batch, max_batch)
        profile = {}
        for t in self.io(apet)["inputs"]:
            shape = [dims[d] if isinstance(d, str) else (d, d, d) for d in t["shape"]]
            profile[t["name"]] = tuple(tuple(s[i] for s in shape) for i in range(3))
        return profile

    def profile_dims(self, opt_tokens: int, opt_batch: int, max_batch: int) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of each dynamic axis of the engine's inputs (the windows: the most any
        image shape in range makes)."""
        unit, win = self.merge**2, self.window_blocks**2
        side = max(1, round(math.sqrt(opt_tokens)))
        opt_windows = math.ceil(side / self.window_blocks) ** 2
        return {
            "patches": (unit * self.min_tokens, unit * opt_tokens * opt_batch, unit * self.max_tokens * max_batch),
            "tokens": (self.min_tokens, opt_tokens * opt_batch, self.max_tokens * max_batch),
            "images": (1, opt_batch, max_batch),
            "image_patches": (unit * self.min_tokens, unit * opt_tokens, unit * self.max_tokens),
            "windows": (1, opt_windows * opt_batch, self.max_windows() * max_batch),
            "window_patches": (unit, unit * min(win, opt_tokens), unit * win),
        }

    def max_windows(self) -> int:
        """The most attention windows one image of at most max_tokens merge blocks can make (any
        grid shape: the processor's aspect limit is on pixels, not blocks)."""
        b = self.window_blocks
        return max(math.ceil(gh / b) * math.ceil(self.max_tokens // gh / b) for gh in range(1, self.max_tokens + 1))

    def vision_module(self, model: nn.Module, apet: ApetConfig | None) -> nn.Module:
        chunks = None if self.attention_chunk is None else (self.attention_chunk, self.merge**2 * self.max_tokens)
        return Qwen25VLVisionEngine(model, apet, chunks)

    def example_grids(self, batch: int, generator: torch.Generator) -> list[tuple[int, int, int]]:
        """`batch` random image grids (t=1, h and w in patches) inside the engine's token range and
        the build's ApET budget, as small as that allows (export and comparisons stay quick), no two
        alike where the range holds more than one."""
        lo = max(self.min_tokens, self.apet.min_tokens if self.apet is not None else 1)
        hi = min(self.max_tokens, max(192, lo))
        grids: list[tuple[int, int, int]] = []
        for attempt in range(1000):
            if len(grids) == batch:
                break
            gh = int(torch.randint(1, math.isqrt(hi) + 1, (1,), generator=generator))
            w_lo, w_hi = -(-lo // gh), hi // gh
            if w_lo > w_hi:
                continue
            gw = int(torch.randint(w_lo, w_hi + 1, (1,), generator=generator))
            grid = (1, self.merge * gh, self.merge * gw)
            if grid not in grids or attempt > 500:
                grids.append(grid)
        return grids

    def example_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        grids = self.example_grids(batch, generator)
        patches = sum(t * h * w for t, h, w in grids)
        inputs = {
            "pixel_values": torch.randn(patches, self.patch_dim, generator=generator),
            **layout(grids, merge=self.merge, window_blocks=self.window_blocks),
        }
        if self.start_input:  # an ApET engine: one image per call, its start among its N rows
            n = min(t * h * w for t, h, w in grids) // self.merge**2
            inputs[START] = torch.randint(0, n, (1,), generator=generator)
        return inputs

    def io(self, apet: ApetConfig | None) -> dict:
        h = self.config.text_config.hidden_size
        rows = "rows" if apet is None or apet.keep is None else apet.keep
        images = "images" if apet is None else 1

        def i64(name, *shape):
            return {"name": name, "dtype": "int64", "shape": list(shape)}

        return {
            "inputs": [
                {"name": "pixel_values", "dtype": "float32", "shape": ["patches", self.patch_dim]},
                i64("patch_positions", "patches", 2),
                i64("window_index", "tokens"),
                i64("reverse_index", "tokens"),
                i64("image_gather", images, "image_patches"),
                i64("image_scatter", "patches"),
                i64("window_gather", "windows", "window_patches"),
                i64("window_scatter", "patches"),
                *([i64(START, 1)] if self.start_input else []),  # --start random: the image's first FPS seed
            ],
            "outputs": [
                {"name": OUTPUTS[0], "dtype": "float32", "shape": [rows, h]},
                {"name": OUTPUTS[1], "dtype": "int64", "shape": [rows]},
            ],
        }

    def reference_rows(self, model: nn.Module, processor, images: list) -> list[torch.Tensor]:
        """`get_image_features` of the whole VLM, or for the vision parts alone (a 7B-shape preset)
        the tower's own forward, split per image as get_image_features splits it."""
        out = processor(images=images, return_tensors="pt")
        pixel_values, grid = out["pixel_values"], out["image_grid_thw"]
        inner = getattr(model, "model", model)
        get = getattr(inner, "get_image_features", None) or getattr(model, "get_image_features", None)
        with torch.no_grad():
            if get is not None:
                features = get(pixel_values, grid)
            else:
                merged = parts(model)(pixel_values, grid_thw=grid)
                merged = getattr(merged, "pooler_output", merged)
                features = torch.split(merged, (grid.prod(-1) // self.merge**2).tolist())
        features = getattr(features, "pooler_output", features)  # Transformers 5 wraps it in a model output
        return [x.float() for x in features]

    # -- the manifest -------------------------------------------------------------------------
    def manifest_fields(self, apet: ApetConfig | None) -> dict:
        v = self.config.vision_config
        return {
            "vision": self.vision_fields(
                window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes)
            ),
            "num_visual_tokens": self.rows_per_item(apet),
            FACTS.section: {**self.section_fields(apet), "tokens_per_second": getattr(v, "tokens_per_second", 2)},
        }

    def vision_fields(self, **own) -> dict:
        """The manifest's vision section: the geometry of every Qwen-VL engine, the family's `own` fields
        after the merge size."""
        return {
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "spatial_merge_size": self.merge,
            **own,
            "num_patches": None,  # rows per image depend on the image: min_tokens..max_tokens
            "min_tokens": self.min_tokens,
            "max_tokens": self.max_tokens,
            "feature_dim": self.feature_dim,
        }

    def section_fields(self, apet: ApetConfig | None) -> dict:
        """The family section's fields every Qwen-VL engine carries (each family adds its own)."""
        return {
            "images_per_call": 1 if apet is not None else None,
            # TensorRT: a ratio budget's TopK K is computed at run time from N (ITopKLayer input 1,
            # TensorRT >= 8.6) and must stay <= 3840; null: no limit
            "tensorrt_max_tokens": self.tensorrt_token_limit(),
            "image_token_id": self.config.image_token_id,
            "vision_start_token_id": self.config.vision_start_token_id,
        }
