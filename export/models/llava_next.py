"""LLaVA-NeXT family (Transformers `LlavaNextForConditionalGeneration`, "anyres").

LLaVA-NeXT cuts each image into crops of the CLIP tower's size (336 px): the whole image resized to
one crop (the base) and the tiles of the image resized and padded to the best of the
`image_grid_pinpoints` (2 to 4 tiles). The official ApET code (MaQianKun0/ApET, llava/model/
llava_arch.py, `encode_images` on all crops, then `prepare_inputs_labels_for_multimodal`) runs ApET
on every crop with the same T; the anyres arrangement, the unpadding and the `image_newline` rows
are applied afterwards to the kept set.

So the vision engine here is per crop, exactly LLaVA-1.5's engine with a crop for an image:
pixel_values [crops, 3, 336, 336] (all crops of a batch of images, dynamic first axis) -> CLIP
tower -> hidden_states[feature_layer] -> CLS dropped -> ApetCompressor (float32) -> projector on
the T kept tokens -> embeddings [crops, T, H] float32, positions [crops, T] int64 (ascending patch
indices within the crop). The runtime adapter (runtime/families/llava_next.py) groups crops per
image and lays the kept rows out as the model does, with the `image_newline` embedding this
adapter saves in the engine directory (image_newline.safetensors, listed and hashed like every file).

Presets (export/presets.py) give `fields` = {"vision": CLIPVisionConfig kwargs, "text": LlamaConfig
kwargs, "image_token_id": int | None, "image_grid_pinpoints": [[h, w], ...]}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from apet_trt.apet_ops import ApetConfig
from apet_trt.apet_ops.compat import pil_image_processor_class

from ..tokenizer import byte_level_tokenizer
from .base import Preset
from .llava import CLIP_MEAN, CLIP_STD, LlavaExport, llama_text_config

NEWLINE_FILE = "image_newline.safetensors"  # {"image_newline": float32 [H]}
SECTION = "llava_next"  # the manifest's object for this family (runtime/families/llava_next.py reads it)
# LLaVA-NeXT's grid pinpoints (llava-hf/llava-v1.6-*): [height, width] of the tile canvases
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def image_newline(model: nn.Module) -> torch.Tensor:
    """The `image_newline` parameter across Transformers versions (5.x: model.model, 4.x: both) and
    the vision-only parts of a preset."""
    for owner in (getattr(model, "model", None), model):
        value = getattr(owner, "image_newline", None) if owner is not None else None
        if isinstance(value, torch.Tensor):
            return value
    raise ValueError(f"{type(model).__name__} has no image_newline: not a LLaVA-NeXT model")


class VisionParts(nn.Module):
    """Only what the engine and the runtime need: the tower, the projector and the newline embedding
    (the 7B language model of a benchmark preset stays unbuilt)."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPVisionModel
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        self.config = config
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        hidden = config.text_config.hidden_size
        self.image_newline = nn.Parameter(torch.randn(hidden) / hidden**0.5)  # what LlavaNextModel draws


def image_processor(image_size: int, pinpoints: list[list[int]]):
    """LLaVA-NeXT's processor settings (what llava-hf/llava-v1.6-* ship), PIL backend."""
    return pil_image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
        do_pad=True,
        resample=3,
    )


class LlavaNextExport(LlavaExport):
    """LLaVA-1.5's engine per crop; what differs is the model, the unit (a crop), the per-image row
    bound for TensorRT-LLM and the newline embedding the runtime needs."""

    name = "llava_next"
    model_types = ("llava_next",)
    hf_model_class = "LlavaNextForConditionalGeneration"
    # llava-v1.6-vicuna's conversation format (its chat template renders "USER: <image>\n... ASSISTANT:");
    # other LLaVA-NeXT variants (Mistral, Yi-34B) take a prompt holding "<image>" as the whole text
    prompt_template = "USER: <image>\n{prompt} ASSISTANT:"
    image_token = "<image>"
    item = "crop"
    trtllm_model_class = "LLaMAForCausalLM"  # examples/multimodal: the LLaMA converter reads text_config
    # Paper parity: stage 2 inside the LLM prunes the base crop's rows only (the official llava_arch.py
    # prunes the base image's span for anyres); --start random draws one start per crop;
    # expand2square is LLaVA-1.5's preprocessing, not anyres's
    llm_stage = True
    supports_start_input = True
    image_aspects = ("default",)
    paper_budget = {"keep": 64}  # the official code's T per crop (base and every tile alike)
    paper_budget_text = "T=64 rows per crop (base and tiles; LLaVA-NeXT-7B: 576 -> 64 each), vision stage only"

    def __init__(self, config, processor=None):
        super().__init__(config, processor)
        if self.select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={self.select_strategy!r}: LLaVA-NeXT's anyres layout needs "
                "'default' (the CLS row dropped)"
            )
        pinpoints = getattr(config, "image_grid_pinpoints", None)
        if not pinpoints or any(len(p) != 2 or p[0] % self.image_size or p[1] % self.image_size for p in pinpoints):
            raise ValueError(
                f"image_grid_pinpoints={pinpoints!r}: expected [[height, width], ...] in multiples of "
                f"image_size={self.image_size}"
            )
        self.pinpoints = [[int(h), int(w)] for h, w in pinpoints]

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def preset_config(cls, preset: Preset):
        from transformers import CLIPVisionConfig, LlavaNextConfig

        f = preset.fields
        tokenizer = byte_level_tokenizer(f.get("image_token_id"))
        text_config = llama_text_config(f["text"], tokenizer)
        pinpoints = f.get("image_grid_pinpoints", GRID_PINPOINTS)
        config = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**f["vision"]),
            text_config=text_config,
            image_token_id=tokenizer.convert_tokens_to_ids(cls.image_token),
            image_grid_pinpoints=pinpoints,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
        return config, image_processor(f["vision"]["image_size"], pinpoints), tokenizer

    def vision_parts(self) -> nn.Module:
        return VisionParts(self.config).eval()

    @classmethod
    def load_checkpoint(cls, path: Path):
        loaded = super().load_checkpoint(path)
        cls(loaded.config).check_processor(loaded.processor)
        return loaded

    def check_processor(self, processor) -> None:
        """The processor must cut the crops the model's config lays out."""
        pinpoints = getattr(processor, "image_grid_pinpoints", None)
        if pinpoints is not None and [list(p) for p in pinpoints] != self.pinpoints:
            raise ValueError(
                f"the image processor's image_grid_pinpoints {pinpoints} differ from the model config's "
                f"{self.pinpoints}: the crops would not match the layout"
            )

    # -- the engine ---------------------------------------------------------------------------
    def io(self, apet: ApetConfig | None) -> dict:
        io = super().io(apet)
        for tensor in [*io["inputs"], *io["outputs"]]:
            tensor["shape"][0] = "crops"  # all crops of a batch of images
        return io

    def max_rows_per_image(self, apet: ApetConfig | None) -> int:
        """The most rows one image hands the LLM: base and tiles at T each (fewer survive unpadding)
        plus one newline per row of the tile grid, over every pinpoint."""
        t, side = self.rows_per_item(apet), self.image_size // self.patch_size
        return max(
            (1 + (h // self.image_size) * (w // self.image_size)) * t + (h // self.image_size) * side
            for h, w in self.pinpoints
        )

    def reference_rows(self, model: nn.Module, processor, images: list) -> list[torch.Tensor]:
        """Transformers' own packed features: get_image_features (tower, feature layer, projector,
        then pack_image_features: anyres layout, unpadding, newlines, base first)."""
        features = processor(images=images, return_tensors="np")
        pixel_values = torch.from_numpy(np.asarray(features["pixel_values"]))
        image_sizes = torch.from_numpy(np.asarray(features["image_sizes"]))
        with torch.no_grad():
            out = model.get_image_features(
                pixel_values=pixel_values,
                image_sizes=image_sizes,
                vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=self.select_strategy,
            )
            out = getattr(out, "pooler_output", out)  # Transformers 5 wraps it in a model output
            if isinstance(out, (list, tuple)) and out and out[0].dim() == 3:  # per-image crops, not packed yet
                out, _ = model.pack_image_features(
                    out, image_sizes, self.select_strategy, image_newline=image_newline(model)
                )
        return [x.float() for x in out]

    def save_files(self, model: nn.Module, out_dir: Path) -> None:
        from safetensors.numpy import save_file

        newline = image_newline(model).detach().float().cpu().numpy()
        save_file({"image_newline": np.ascontiguousarray(newline)}, str(Path(out_dir) / NEWLINE_FILE))

    # -- the manifest -------------------------------------------------------------------------
    def manifest_fields(self, apet: ApetConfig | None) -> dict:
        return {
            **super().manifest_fields(apet),
            SECTION: {
                "image_grid_pinpoints": self.pinpoints,
                "image_newline": NEWLINE_FILE,
                "max_rows_per_image": self.max_rows_per_image(apet),
            },
        }
