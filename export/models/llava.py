"""LLaVA-1.5 family (Transformers `LlavaForConditionalGeneration`).

The vision engine: pixel_values [B, 3, S, S] -> CLIP vision tower -> hidden_states[feature_layer]
-> select strategy ("default" drops CLS) -> ApetCompressor (float32) -> multimodal projector on the
T kept tokens only -> embeddings [B, T, H_llm] (float32), positions [B, T] (int64). Without ApET the
same module emits all N tokens with positions 0..N-1: the baseline.

Presets (export/presets.py) give `fields` = {"vision": CLIPVisionConfig kwargs, "text": LlamaConfig
kwargs, "image_token_id": int | None}.
"""

from __future__ import annotations

import torch
from torch import nn

from apet_trt.apet_ops import ApetCompressor, ApetConfig
from apet_trt.apet_ops.compat import pil_image_processor_class

from ..tokenizer import byte_level_tokenizer
from .base import ExportFamily, Preset

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
INPUT = "pixel_values"
START = "start"  # with --start random: [B] int64, each image's first FPS seed (drawn by the runtime)
OUTPUTS = ("embeddings", "positions")


def parts(model):
    """(vision_tower, multi_modal_projector) across transformers versions (4.x keeps them on the
    outer model, 5.x on model.model)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None) or getattr(model, "vision_tower", None)
    projector = getattr(inner, "multi_modal_projector", None) or getattr(model, "multi_modal_projector", None)
    if tower is None or projector is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower / multi_modal_projector: not a LLaVA model")
    return tower, projector


class VisionParts(nn.Module):
    """Only what the vision engine needs: the tower and the projector (a 7B language model stays
    unbuilt)."""

    def __init__(self, vision_tower: nn.Module, multi_modal_projector: nn.Module, config):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = multi_modal_projector
        self.config = config

    @classmethod
    def from_config(cls, config) -> VisionParts:
        from transformers import CLIPVisionModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        return cls(CLIPVisionModel(config.vision_config), LlavaMultiModalProjector(config), config).eval()


class LlavaVisionEngine(nn.Module):
    """pixel_values (+ start [B] int64, each image's first FPS seed, when the engine takes one) ->
    (embeddings [B, T, H] float32, positions [B, T] int64)."""

    def __init__(self, model, apet: ApetConfig | None, family: LlavaExport | None = None):
        super().__init__()
        self.vision_tower, self.projector = parts(model)
        family = family or LlavaExport(model.config)
        self.feature_layer, self.select_strategy = family.feature_layer, family.select_strategy
        self.num_patches = family.num_patches
        family.check_apet(apet)
        self.compressor = ApetCompressor(apet) if apet is not None else None  # node names: /compressor/...

    def forward(self, pixel_values: torch.Tensor, start: torch.Tensor | None = None):
        dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        features = hidden[self.feature_layer]
        if self.select_strategy == "default":
            features = features[:, 1:]
        if self.compressor is not None:
            tokens, positions = self.compressor(features, start)  # float32 inside, input dtype out
        else:
            tokens = features  # positions 0..N-1 with N a constant, so the exported T axis is static
            positions = torch.arange(self.num_patches, device=features.device).expand_as(features[:, :, 0])
        return self.projector(tokens).float(), positions


def llama_text_config(fields: dict, tokenizer):
    """A preset's LLaMA language-model config: its fields, the tokenizer's vocabulary size unless the
    preset names one (the 7B shapes: 32064), and the tokenizer's special ids."""
    from transformers import LlamaConfig

    text = {"vocab_size": len(tokenizer), **fields}
    return LlamaConfig(
        **text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def image_processor(image_size: int = 336):
    """CLIP's processor settings (what llava-1.5 ships), PIL backend: no torchvision needed."""
    return pil_image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
        resample=3,
    )


class LlavaExport(ExportFamily):
    name = "llava"
    model_types = ("llava",)
    hf_model_class = "LlavaForConditionalGeneration"
    prompt_template = "USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5's conversation format
    image_token = "<image>"
    trtllm_model_class = "LLaMAForCausalLM"  # its converter reads a LLaVA checkpoint's text_config
    llm_stage = True  # stage 2 prunes all of an image's rows (the official layer_prune)
    supports_start_input = True
    image_aspects = ("default", "pad")  # pad: the official LLaVA-1.5 preprocessing (expand2square)
    # the paper's vision-stage budget (its "64" for LLaVA-1.5), which every decoder can take; the
    # two-stage official pair is --budget 64
    paper_budget = {"keep": 64}
    paper_budget_text = "T=64 rows per image (LLaVA-1.5-7B: 576 -> 64), vision stage only"

    def __init__(self, config, processor=None):
        super().__init__(config, processor)
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single feature layer is supported")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'")
        v = config.vision_config
        self.feature_layer, self.select_strategy = layer, strategy
        self.image_size, self.patch_size, self.feature_dim = v.image_size, v.patch_size, v.hidden_size
        self._n = (v.image_size // v.patch_size) ** 2 + (1 if strategy == "full" else 0)

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def preset_config(cls, preset: Preset):
        from transformers import CLIPVisionConfig, LlavaConfig

        f = preset.fields
        tokenizer = byte_level_tokenizer(f.get("image_token_id"))
        text_config = llama_text_config(f["text"], tokenizer)
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(**f["vision"]),
            text_config=text_config,
            image_token_id=tokenizer.convert_tokens_to_ids(cls.image_token),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        return config, image_processor(f["vision"]["image_size"]), tokenizer

    def vision_parts(self) -> nn.Module:
        return VisionParts.from_config(self.config)

    # -- the engine ---------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self._n

    def vision_module(self, model: nn.Module, apet: ApetConfig | None) -> nn.Module:
        return LlavaVisionEngine(model, apet, self)

    def example_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pixels = torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)
        if not self.start_input:
            return {INPUT: pixels}
        return {INPUT: pixels, START: torch.randint(0, self.num_patches, (batch,), generator=generator)}

    def io(self, apet: ApetConfig | None) -> dict:
        t, h = self.rows_per_item(apet), self.config.text_config.hidden_size
        start = [{"name": START, "dtype": "int64", "shape": ["batch"]}] if self.start_input else []
        return {
            "inputs": [
                {"name": INPUT, "dtype": "float32", "shape": ["batch", 3, self.image_size, self.image_size]},
                *start,
            ],
            "outputs": [
                {"name": OUTPUTS[0], "dtype": "float32", "shape": ["batch", t, h]},
                {"name": OUTPUTS[1], "dtype": "int64", "shape": ["batch", t]},
            ],
        }

    def reference_rows(self, model: nn.Module, processor, images: list) -> list[torch.Tensor]:
        pixel_values = torch.from_numpy(processor(images=images, return_tensors="np")["pixel_values"])
        with torch.no_grad():
            out = model.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=self.select_strategy,
            )
        out = getattr(out, "pooler_output", out)  # Transformers 5 wraps it in a model output
        return [x.float() for x in out]

    # -- the manifest -------------------------------------------------------------------------
    def manifest_fields(self, apet: ApetConfig | None) -> dict:
        return {
            "vision": {
                "feature_layer": self.feature_layer,
                "select_strategy": self.select_strategy,
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "num_patches": self.num_patches,
                "feature_dim": self.feature_dim,
            },
            "num_visual_tokens": self.rows_per_item(apet),
        }
