"""Qwen2.5-VL in vLLM, taking ApET's kept rows with their own M-RoPE ids (checked against vLLM 0.32.0:
vllm/model_executor/models/qwen2_5_vl.py and qwen2_vl.py, vllm/multimodal/parse.py).

vLLM's Qwen2.5-VL sizes an image's placeholder run, splits the rows and lays out the positions from
`image_grid_thw` alone (R = t*h*w/4, ids the full grid). The mixins of apet_trt.vllm_plugin.mrope (the
code shared with Qwen3-VL) take an ApET image part instead; here they sit in front of vLLM's own
Qwen2.5-VL classes, and `grid_runs` lays out every other image and video as vLLM does
(`iter_mm_grid_thw`, its second-per-grid time factor included).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalDataParser
from vllm.multimodal import MULTIMODAL_REGISTRY

from .mrope import (  # noqa: F401  (check_request, is_apet: this module's public names before the split)
    ApetDataParserMixin,
    ApetModelMixin,
    ApetProcessingInfoMixin,
    ApetProcessorMixin,
    GridRun,
    check_request,
    is_apet,
)


class ApetDataParser(ApetDataParserMixin, Qwen2VLMultiModalDataParser):
    pass


class ApetProcessingInfo(ApetProcessingInfoMixin, Qwen2_5_VLProcessingInfo):
    parser_class = ApetDataParser


class ApetMultiModalProcessor(ApetProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    ApetMultiModalProcessor,
    info=ApetProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class ApetQwen2_5_VLForConditionalGeneration(ApetModelMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, taking ApET image parts (apet_trt.vllm_plugin) with their own M-RoPE ids."""

    def grid_runs(self, input_tokens, features) -> Iterator[GridRun]:
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(features):
            ids = np.indices((t, h, w)).reshape(3, -1)
            if t_factor != 1.0:
                ids[0] = (ids[0] * t_factor).astype(np.int64)
            yield offset, ids, int(ids.max()) + 1, t * h * w
