"""LLaVA-1.5 family (transformers LlavaForConditionalGeneration).

The vision engine: pixel_values [B, 3, S, S] -> CLIP vision tower -> hidden_states[feature_layer]
-> select strategy ("default" drops CLS) -> ApetCompressor (float32) -> multimodal projector on the
T kept tokens only -> embeddings [B, T, H_llm] (float32), positions [B, T] (int64). Without ApET the
same module emits all N tokens with positions 0..N-1: the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from apet_trt.apet_ops import ApetCompressor, ApetConfig


def _parts(model):
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


@dataclass(frozen=True)
class LlavaFacts:
    feature_layer: int
    select_strategy: str
    image_size: int
    patch_size: int
    num_patches: int
    feature_dim: int
    hidden_size: int
    vocab_size: int
    image_token_id: int
    max_position_embeddings: int


def facts(config) -> LlavaFacts:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: only a single feature layer is supported")
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'")
    v, t = config.vision_config, config.text_config
    n = (v.image_size // v.patch_size) ** 2 + (1 if strategy == "full" else 0)
    return LlavaFacts(
        layer,
        strategy,
        v.image_size,
        v.patch_size,
        n,
        v.hidden_size,
        t.hidden_size,
        t.vocab_size,
        config.image_token_id,
        t.max_position_embeddings,
    )


class LlavaVisionEngine(nn.Module):
    """pixel_values -> (embeddings [B, T, H] float32, positions [B, T] int64)."""

    def __init__(self, model, apet: ApetConfig | None):
        super().__init__()
        self.vision_tower, self.projector = _parts(model)
        f = facts(model.config)
        self.feature_layer, self.select_strategy, self.num_patches = f.feature_layer, f.select_strategy, f.num_patches
        if apet is not None:
            apet.validate_for(f.num_patches)
        self.compressor = ApetCompressor(apet) if apet is not None else None  # node names: /compressor/...

    def forward(self, pixel_values: torch.Tensor):
        dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
        features = hidden[self.feature_layer]
        if self.select_strategy == "default":
            features = features[:, 1:]
        if self.compressor is not None:
            tokens, positions = self.compressor(features)  # float32 inside, input dtype out
        else:
            tokens = features  # positions 0..N-1 with N a constant, so the exported T axis is static
            positions = torch.arange(self.num_patches, device=features.device).expand_as(features[:, :, 0])
        return self.projector(tokens).float(), positions


def checkpoint_config(path: str | Path):
    """A local LLaVA checkpoint's config (offline, no weights read)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if config.model_type != "llava":
        raise ValueError(f"{path}: model_type {config.model_type!r} is not supported yet (supported: llava)")
    return config


def load_checkpoint(path: str | Path):
    """A local LLaVA checkpoint (offline): -> (model, config, image processor, tokenizer)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    path = Path(path)
    config = checkpoint_config(path)
    try:
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True, use_fast=False)
    except Exception as exc:
        raise FileNotFoundError(f"{path}: no image processor config (preprocessor_config.json): {exc}") from exc
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(str(path), local_files_only=True).eval()
    return model, config, processor, tokenizer
