"""Presets: models that need no checkpoint and no network, built from a config with seeded random
weights. Each names its family (export/models/); the family turns the preset's fields into its
config, image processor and tokenizer.

    tiny-llava         LLaVA-1.5 architecture with CLIP-336 geometry (576 patches) but tiny widths,
                       seeded random weights; for tests and the quick start. Saved whole (hf/).
    llava-1.5-7b-arch  the exact llava-hf/llava-1.5-7b-hf configuration (CLIP ViT-L/14-336 +
                       LLaMA-7B), random weights; for benchmarks. Only the vision tower and the
                       projector are materialised; the 7B language model is recorded as a config
                       with a seed, never built here.
    tiny-video-llava   Video-LLaVA architecture with its real geometry (8 frames of 224 px, patch 14:
                       257 rows a frame, 2,056 a video; 256 a still image), tiny widths, seeded
                       random weights, a tokenizer with <image> and <video>. Saved whole (hf/).
    video-llava-7b-arch  the exact LanguageBind/Video-LLaVA-7B-hf configuration (two CLIP ViT-L/14-224
                       towers + LLaMA-7B), random weights, vision parts only; for benchmarks.
    tiny-llava-next    LLaVA-NeXT (anyres) architecture: CLIP-336 geometry per crop (576 patches), LLaVA-NeXT's
                       grid pinpoints (a base crop and 2 to 4 tiles), tiny widths, seeded random weights;
                       saved whole (hf/).
    llava-v1.6-vicuna-7b-arch
                       the exact llava-hf/llava-v1.6-vicuna-7b-hf configuration (CLIP ViT-L/14-336, the
                       five grid pinpoints, Vicuna-7B), random weights, vision parts only; for benchmarks.
    tiny-qwen2.5-vl    Qwen2.5-VL architecture with its real geometry (14 px patches, 2 x 2 merge,
                       temporal patch 2, 112 px attention windows, full attention every other
                       block) but tiny widths, seeded random weights; 4..256 visual tokens per
                       image. For tests. Saved whole (hf/).
    qwen2.5-vl-7b-arch the exact Qwen/Qwen2.5-VL-7B-Instruct configuration, random weights, the
                       vision tower only; the processor sized as ApET's Qwen evaluation sized it
                       (min/max pixels for 256..2048 visual tokens per image). For benchmarks.

Random weights make the generated text noise; real checkpoints go in by path.
"""

from __future__ import annotations

import torch

from .models import LoadedModel, Preset, family_class

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny-llava",
            family="llava",
            description="LLaVA-1.5 architecture, CLIP-336 geometry (576 patches), tiny widths",
            fields=dict(
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
                image_token_id=None,  # right after the byte-level tokenizer's base tokens
            ),
            materialise_language_model=True,
        ),
        Preset(
            name="llava-1.5-7b-arch",
            family="llava",
            description="the exact llava-hf/llava-1.5-7b-hf configuration, vision parts only",
            fields=dict(
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
            ),
            materialise_language_model=False,
        ),
        Preset(
            name="tiny-video-llava",
            family="video_llava",
            description="Video-LLaVA architecture, real geometry (8 frames, 224 px, patch 14), tiny widths",
            fields=dict(
                vision=dict(
                    image_size=224,
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
                    max_position_embeddings=4096,  # a video is 2,056 rows without ApET
                ),
                image_token_id=None,  # right after the byte-level tokenizer's base tokens
                num_frames=8,
            ),
            materialise_language_model=True,
        ),
        Preset(
            name="video-llava-7b-arch",
            family="video_llava",
            description="the exact LanguageBind/Video-LLaVA-7B-hf configuration, vision parts only",
            fields=dict(
                vision=dict(
                    image_size=224,
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
                image_token_id=32000,  # <video> 32001
                num_frames=8,
            ),
            materialise_language_model=False,
        ),
        Preset(
            name="tiny-llava-next",
            family="llava_next",
            description="LLaVA-NeXT (anyres) architecture, CLIP-336 crops, LLaVA-NeXT's grid pinpoints, tiny widths",
            fields=dict(
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
                    max_position_embeddings=4096,  # up to 2,928 visual rows per image without ApET
                ),
                image_token_id=None,
                image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            ),
            materialise_language_model=True,
        ),
        Preset(
            name="llava-v1.6-vicuna-7b-arch",
            family="llava_next",
            description="the exact llava-hf/llava-v1.6-vicuna-7b-hf configuration, vision parts only",
            fields=dict(
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
                image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
            ),
            materialise_language_model=False,
        ),
        Preset(
            name="tiny-qwen2.5-vl",
            family="qwen2_5_vl",
            description="Qwen2.5-VL architecture and patch/merge/window geometry, tiny widths, 4..256 tokens per image",
            fields=dict(
                vision=dict(
                    depth=4,
                    hidden_size=32,
                    intermediate_size=64,
                    num_heads=2,
                    out_hidden_size=64,
                    fullatt_block_indexes=[1, 3],
                    window_size=112,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                    in_channels=3,
                    tokens_per_second=2,
                    hidden_act="silu",
                ),
                # head size 32 (hidden 64 in 2 heads; one KV head): vLLM's CPU attention takes 32 or 64, not 16
                text=dict(
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=1,
                    max_position_embeddings=2048,
                    rope_theta=1000000.0,
                    rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                ),
                processor=dict(min_pixels=56 * 56, max_pixels=28 * 28 * 256),
                first_special_id=None,  # right after the byte-level tokenizer's 256 tokens
            ),
            materialise_language_model=True,
        ),
        Preset(
            name="qwen2.5-vl-7b-arch",
            family="qwen2_5_vl",
            description="the exact Qwen/Qwen2.5-VL-7B-Instruct configuration, vision tower only",
            fields=dict(
                vision=dict(
                    depth=32,
                    hidden_size=1280,
                    intermediate_size=3420,
                    num_heads=16,
                    out_hidden_size=3584,
                    fullatt_block_indexes=[7, 15, 23, 31],
                    window_size=112,
                    patch_size=14,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                    in_channels=3,
                    tokens_per_second=2,
                    hidden_act="silu",
                ),
                text=dict(
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_hidden_layers=28,
                    num_attention_heads=28,
                    num_key_value_heads=4,
                    max_position_embeddings=128000,
                    rms_norm_eps=1e-6,
                    rope_theta=1000000.0,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    sliding_window=32768,
                    max_window_layers=28,
                    use_sliding_window=False,
                    vocab_size=152064,
                    hidden_act="silu",
                ),
                # ApET's Qwen evaluation scripts: 256..2048 visual tokens per image
                processor=dict(min_pixels=256 * 28 * 28, max_pixels=2048 * 28 * 28),
                first_special_id=151643,  # Qwen2's <|endoftext|>; <|image_pad|> is then 151655
            ),
            materialise_language_model=False,
        ),
    )
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(preset_names())} (or give a checkpoint path)")
    return PRESETS[name]


def preset_config(name: str):
    """-> (config, image processor, tokenizer, preset), no weights: cheap, so a build can check its
    options against N before it materialises anything."""
    preset = get_preset(name)
    config, processor, tokenizer = family_class(preset.family).preset_config(preset)
    return config, processor, tokenizer, preset


def load_preset(name: str) -> LoadedModel:
    """The preset's model: the whole VLM when it is materialised, else only its vision parts. The
    weights depend only on the preset's seed: the global torch RNG is used under fork_rng, so
    callers' random state is left as it was."""
    config, processor, tokenizer, preset = preset_config(name)
    family = family_class(preset.family)(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        model = family.preset_model(preset)
    return LoadedModel(
        model.eval(), config, processor, tokenizer, language_model_saved=preset.materialise_language_model
    )


def build_preset(name: str):
    """-> (model-like parts, config, image processor, tokenizer, preset): load_preset as a tuple."""
    loaded = load_preset(name)
    return loaded.model, loaded.config, loaded.processor, loaded.tokenizer, get_preset(name)
