"""Presets: models that need no checkpoint and no network.

    tiny-llava         LLaVA-1.5 architecture with CLIP-336 geometry (576 patches) but tiny widths,
                       seeded random weights; for tests and the quick start. Saved whole (hf/).
    llava-1.5-7b-arch  the exact llava-hf/llava-1.5-7b-hf configuration (CLIP ViT-L/14-336 +
                       LLaMA-7B), random weights; for benchmarks. Only the vision tower and the
                       projector are materialised; the 7B language model is recorded as a config
                       with a seed, never built here.

Random weights make the generated text noise; real checkpoints go in by path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tokenizer import byte_level_tokenizer

PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"  # LLaVA-1.5's conversation format
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Preset:
    name: str
    vision: dict
    text: dict
    image_token_id: int | None  # None: right after the tokenizer's base tokens
    materialise_language_model: bool
    seed: int = 0


PRESETS = {
    "tiny-llava": Preset(
        name="tiny-llava",
        vision=dict(
            image_size=336,
            patch_size=14,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=64,
        ),
        text=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        image_token_id=None,
        materialise_language_model=True,
    ),
    "llava-1.5-7b-arch": Preset(
        name="llava-1.5-7b-arch",
        vision=dict(
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            projection_dim=768,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            vocab_size=32064,
        ),
        image_token_id=32000,
        materialise_language_model=False,
    ),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def image_processor(image_size: int = 336):
    """CLIP's processor settings (what llava-1.5 ships), PIL backend: no torchvision needed
    (CLIPImageProcessorPil in Transformers 5; CLIPImageProcessor is the PIL/numpy one in 4.x)."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
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


def llava_config(preset: Preset, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = dict(preset.text)
    text.setdefault("vocab_size", len(tokenizer))
    text_config = LlamaConfig(
        **text,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**preset.vision),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(preset_names())} (or give a checkpoint path)")
    return PRESETS[name]


def preset_config(name: str):
    """-> (config, image processor, tokenizer, preset), no weights: cheap, so a build can check its
    options against N before it materialises anything."""
    preset = _preset(name)
    tokenizer = byte_level_tokenizer(preset.image_token_id)
    return llava_config(preset, tokenizer), image_processor(preset.vision["image_size"]), tokenizer, preset


def build_preset(name: str):
    """-> (model-like parts, config, image processor, tokenizer, preset).

    For a materialised preset the parts are the whole LlavaForConditionalGeneration; otherwise a
    VisionParts holding only the CLIP tower and the projector. The weights depend only on the
    preset's seed: the global torch RNG is used under fork_rng, so callers' random state is left
    as it was."""
    config, processor, tokenizer, preset = preset_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        if preset.materialise_language_model:
            from transformers import LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration(config).eval()
            with torch.no_grad():  # random init gives near-uniform logits; widen them so greedy ids are stable
                model.lm_head.weight.mul_(8.0)
        else:
            from .models.llava import VisionParts

            model = VisionParts.from_config(config)
    return model, config, processor, tokenizer, preset
