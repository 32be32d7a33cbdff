"""Qwen3-VL in vLLM, taking ApET's kept rows with their own M-RoPE ids (checked against vLLM 0.32.0:
vllm/model_executor/models/qwen3_vl.py).

vLLM's Qwen3-VL takes precomputed image rows as `image_embeds` [R, H * (1 + levels)] (the main row and
each DeepStack level side by side) with `image_grid_thw`, and, like Qwen2.5-VL, sizes the placeholder
run and lays out the ids from the grid. The mixins of apet_trt.vllm_plugin.mrope take an ApET image part
instead; the wide rows go on to vLLM's own `embed_input_ids` untouched, which puts the main H columns
into the input embeddings and each level's into the DeepStack buffer at the same R placeholders, the
kept tokens' own levels at the kept tokens' slots. For images Qwen3-VL's M-RoPE is Qwen2.5-VL's rule;
`grid_runs` lays out every other image and each video frame as vLLM's own `_iter_mm_grid_hw` does (a
frame's timestamps are text between frames).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalDataParser,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .mrope import ApetDataParserMixin, ApetModelMixin, ApetProcessingInfoMixin, ApetProcessorMixin, GridRun


class ApetQwen3VLDataParser(ApetDataParserMixin, Qwen3VLMultiModalDataParser):
    pass


class ApetQwen3VLProcessingInfo(ApetProcessingInfoMixin, Qwen3VLProcessingInfo):
    parser_class = ApetQwen3VLDataParser

    def apet_row_width(self) -> int | None:
        """H * (1 + DeepStack levels): the main row and each level's, side by side."""
        hidden = self._get_expected_hidden_size()
        levels = len(getattr(self.get_hf_config().vision_config, "deepstack_visual_indexes", None) or ())
        return None if hidden is None else hidden * (1 + levels)


class ApetQwen3VLMultiModalProcessor(ApetProcessorMixin, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ApetQwen3VLMultiModalProcessor,
    info=ApetQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class ApetQwen3VLForConditionalGeneration(ApetModelMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL, taking ApET image parts (apet_trt.vllm_plugin) with their own M-RoPE ids.

    vLLM 0.32 builds Qwen3-VL's DeepStack input only with the vision tower (`use_deepstack` is off when
    --limit-mm-per-prompt allows no image and no video): without it the levels of the rows could not
    reach the layers, so such a server is refused at start-up."""

    def __init__(self, *, vllm_config, prefix: str = "model"):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if getattr(self.config.vision_config, "deepstack_visual_indexes", None) and not self.use_deepstack:
            raise ValueError(
                "ApetQwen3VLForConditionalGeneration: vLLM takes Qwen3-VL's DeepStack rows only with the vision "
                "tower loaded; start it with --limit-mm-per-prompt '{\"image\": 1}' (or more), not 0"
            )

    def grid_runs(self, input_tokens, features) -> Iterator[GridRun]:
        c = self.config
        for offset, h, w, n in self._iter_mm_grid_hw(
            input_tokens,
            features,
            video_token_id=c.video_token_id,
            vision_start_token_id=c.vision_start_token_id,
            vision_end_token_id=c.vision_end_token_id,
            spatial_merge_size=c.vision_config.spatial_merge_size,
        ):
            if n == 0:  # a frame pruned away (vLLM skips it too)
                continue
            if n != h * w:
                raise ValueError(
                    "ApET image parts with pruned video frames in one request are not supported: serve them "
                    "without --video-pruning-rate"
                )
            yield offset, np.indices((1, h, w)).reshape(3, -1), max(h, w), n
