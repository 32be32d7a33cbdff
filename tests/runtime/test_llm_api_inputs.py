"""What the TensorRT-LLM LLM API decoder hands TensorRT-LLM (runtime/decoders/llm_api_inputs.py): the
conversation text with one placeholder per image and each image's rows. (Prompts that carry their
own M-RoPE ids - Qwen2.5-VL's kept rows - are not offered to that route: TensorRT-LLM infers a grid
for them; the pipeline refuses decoder='tensorrt_llm_api' for that family.)"""

from __future__ import annotations

import pytest
import torch

from apet_trt.export.presets import load_preset
from apet_trt.runtime.decoders import llm_api_inputs
from apet_trt.runtime.families.base import VisualRows
from apet_trt.runtime.families.qwen2_5_vl import mrope_position_ids
from apet_trt.runtime.prompt import AssembledPrompt, PromptAssembler, PromptFormat

TEMPLATE = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return load_preset("tiny-qwen2.5-vl").tokenizer


def _kept_prompt(tokenizer, rng, grids=((1, 16, 12), (1, 8, 20)), keep=10):
    """A prompt with images of these grids, `keep` random rows kept of each, and its gathered ids."""
    fmt = PromptFormat(TEMPLATE, "<|image_pad|>", tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    text = TEMPLATE.format(prompt="Compare <|vision_start|><|image_pad|><|vision_end|> with it.")
    rows = [
        VisualRows(
            torch.randn(keep, 8, generator=rng),
            torch.randperm(g[1] * g[2] // 4, generator=rng)[:keep].sort().values,
            g[1] * g[2] // 4,
            extras={"grid_thw": g},
        )
        for g in grids
    ]
    a = PromptAssembler(fmt, tokenizer)(text, [r.num_rows for r in rows])
    runs, offset = [], 0
    for r in rows:
        runs.append((int(a.image_slots[offset]), r.extras["grid_thw"], r.positions))
        offset += r.num_rows
    ids = mrope_position_ids(a.input_ids.numel(), runs, 2)
    return AssembledPrompt(a.input_ids, a.image_slots, a.text, a.rows, ids), rows


def test_request_is_the_text_and_each_images_rows(tokenizer, rng):
    prompt, rows = _kept_prompt(tokenizer, rng)
    req = llm_api_inputs.request(prompt, [r.embeddings for r in rows], device="cpu")
    assert req["prompt"] == prompt.text and prompt.text.count("<|image_pad|>") == 2
    assert [tuple(x.shape) for x in req["multi_modal_embeddings"]["image"]] == [(10, 8), (10, 8)]
