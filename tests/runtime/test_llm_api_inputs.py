"""What the TensorRT-LLM LLM API decoder hands TensorRT-LLM for Qwen2.5-VL's kept rows
(runtime/decoders/llm_api_inputs.py): the request, and the mrope_config that replaces the compact
grid TensorRT-LLM's input processor invents with the prompt's own gathered M-RoPE ids.

Here TensorRT-LLM's processor is stood in for by one that does what its source does
(Qwen2VLInputProcessorBase._attach_multimodal_embeddings_impl: expand each placeholder to the rows
given, infer the most square grid, get_rope_index on it); where tensorrt_llm imports, its real
processor is wrapped on the tiny Qwen2.5-VL checkpoint."""

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


def _compact_grid(rows: int) -> tuple[int, int, int]:
    """TensorRT-LLM's _infer_image_grid_thw: the most square h x w with h * w = rows (merge 2)."""
    h = int(rows**0.5)
    while h > 1 and rows % h:
        h -= 1
    return 1, 2 * h, 2 * (rows // h)


class StandInProcessor:
    """attach_multimodal_embeddings as TensorRT-LLM's Qwen2-VL input processor does it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.calls = 0

    def attach_multimodal_embeddings(self, inputs, multimodal_embedding, sampling_params):
        self.calls += 1
        ids, runs = [], []
        images = iter(multimodal_embedding["image"])
        for tok in self.tokenizer(inputs["prompt"])["input_ids"]:
            if tok == self.image_id:
                rows = next(images).shape[0]
                runs.append((len(ids), _compact_grid(rows), torch.arange(rows)))
                ids += [tok] * rows
            else:
                ids.append(tok)
        compact = mrope_position_ids(len(ids), runs, 2)
        config = {
            "mrope_position_ids": compact[:, None, :].to(torch.int32),
            "mrope_position_deltas": torch.tensor([[int(compact.max()) + 1 - len(ids)]], dtype=torch.int32),
        }
        data = {"multimodal_embedding": multimodal_embedding["image"], "mrope_config": config}
        return ids, {"multimodal_data": data}


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


def test_mrope_config_carries_the_prompts_own_ids_not_the_compact_grid(tokenizer, rng):
    prompt, rows = _kept_prompt(tokenizer, rng)
    processor = StandInProcessor(tokenizer)
    table = llm_api_inputs.OwnPositions()
    attach = llm_api_inputs.with_own_positions(processor.attach_multimodal_embeddings, table)
    req = llm_api_inputs.request(prompt, [r.embeddings for r in rows], device="cpu")
    table.register(req, prompt)

    compact_ids, compact = processor.attach_multimodal_embeddings(req, req["multi_modal_embeddings"], None)
    token_ids, extra = attach(req, req["multi_modal_embeddings"], None)
    assert token_ids == compact_ids == prompt.input_ids.tolist()
    config = extra["multimodal_data"]["mrope_config"]
    assert torch.equal(config["mrope_position_ids"][:, 0].long(), prompt.position_ids)
    assert config["mrope_position_ids"].dtype == torch.int32  # the processor's own dtype
    assert not torch.equal(
        compact["multimodal_data"]["mrope_config"]["mrope_position_ids"][:, 0].long(), prompt.position_ids
    )
    # decoding continues at max + 1 (TensorRT-LLM adds the delta to the sequence length)
    delta = int(config["mrope_position_deltas"])
    assert prompt.input_ids.numel() + delta == int(prompt.position_ids.max()) + 1
    # the request is consumed: a second call with the same tensors is left as TensorRT-LLM made it
    _, again = attach(req, req["multi_modal_embeddings"], None)
    assert torch.equal(
        again["multimodal_data"]["mrope_config"]["mrope_position_ids"],
        compact["multimodal_data"]["mrope_config"]["mrope_position_ids"],
    )


def test_a_prompt_that_does_not_line_up_or_no_mrope_config_is_refused(tokenizer, rng):
    prompt, rows = _kept_prompt(tokenizer, rng)
    processor = StandInProcessor(tokenizer)
    table = llm_api_inputs.OwnPositions()
    attach = llm_api_inputs.with_own_positions(processor.attach_multimodal_embeddings, table)
    req = llm_api_inputs.request(prompt, [r.embeddings for r in rows], device="cpu")
    table.register(req, prompt)
    other = dict(req, prompt=req["prompt"].replace("Compare", "Contrast"))
    with pytest.raises(RuntimeError, match="would not line up"):
        attach(other, req["multi_modal_embeddings"], None)

    def no_mrope(inputs, mm, params):
        ids, extra = processor.attach_multimodal_embeddings(inputs, mm, params)
        del extra["multimodal_data"]["mrope_config"]
        return ids, extra

    table.register(req, prompt)
    with pytest.raises(RuntimeError, match="no mrope_config"):
        llm_api_inputs.with_own_positions(no_mrope, table)(req, req["multi_modal_embeddings"], None)


def test_real_tensorrt_llm_processor_takes_the_own_ids(tmp_path, tokenizer, rng):
    pytest.importorskip(
        "tensorrt_llm",
        reason="TensorRT-LLM is not installable on this CPU-only machine (needs an NVIDIA GPU); "
        "this check runs wherever it imports",
    )
    from tensorrt_llm.inputs import create_input_processor

    loaded = load_preset("tiny-qwen2.5-vl")
    for part in (loaded.model, loaded.processor, loaded.tokenizer):
        part.save_pretrained(str(tmp_path))
    processor = create_input_processor(str(tmp_path), loaded.tokenizer)
    table = llm_api_inputs.OwnPositions()
    attach = llm_api_inputs.with_own_positions(processor.attach_multimodal_embeddings, table)
    prompt, rows = _kept_prompt(tokenizer, rng)
    req = llm_api_inputs.request(prompt, [r.embeddings for r in rows], device="cpu")
    table.register(req, prompt)
    _, extra = attach(req, req["multi_modal_embeddings"], None)
    config = extra["multimodal_data"]["mrope_config"]
    assert torch.equal(config["mrope_position_ids"][:, 0].long(), prompt.position_ids)
