"""What TensorRT-LLM's LLM API (PyTorch backend) is given for precomputed visual rows, built here so
it can be checked without TensorRT-LLM.

A request is `{"prompt": text, "multi_modal_embeddings": {"image": [rows_i [R_i, H], ...]}}`: the
conversation text with one image placeholder per image. TensorRT-LLM's input processor
(`BaseMultimodalInputProcessor.attach_multimodal_embeddings`, called by `LLM.generate_async` for a
request with "multi_modal_embeddings") tokenizes the text, expands each placeholder to the R_i rows
given and returns `(prompt_token_ids, {"multimodal_data": {"multimodal_embedding": ...,
"mrope_config": {...}}})`.

For M-RoPE models (Qwen2-VL, Qwen2.5-VL) it cannot know where the rows came from, so it invents a
grid: `Qwen2VLInputProcessorBase._infer_image_grid_thw` makes R_i rows into the most square h x w
with h * w = R_i (tensorrt_llm/_torch/models/modeling_qwen2vl.py) and runs its get_rope_index on
that. For ApET's kept rows that grid is wrong: they are a scattered subset of a larger grid and each
must keep its own (t, row, column) id. `with_own_positions` wraps the processor's method so that the
returned `mrope_config` carries the prompt's real ids instead:

    mrope_position_ids     [3, 1, L] the prompt's own ids (the family's `position_ids`)
    mrope_position_deltas  [1, 1] int32, max(ids) + 1 - L: decoding continues at max + 1, as
                           Qwen2.5-VL's own generate does (its rope_deltas)

The prompt token ids TensorRT-LLM built are checked against the assembled prompt's, so the ids line
up token by token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..prompt import AssembledPrompt


def request(prompt: AssembledPrompt, rows: Sequence[torch.Tensor], device: str | torch.device = "cuda") -> dict:
    """One LLM API request: the conversation text and each image's rows."""
    return {"prompt": prompt.text, "multi_modal_embeddings": {"image": [r.to(device) for r in rows]}}


def mrope_config(position_ids: torch.Tensor, like: dict | None = None) -> dict:
    """TensorRT-LLM's mrope_config for a prompt's own [3, L] ids (dtypes of `like`'s entries when given)."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 3:
        raise ValueError(f"M-RoPE position ids must be [3, L], got {tuple(position_ids.shape)}")
    like = like or {}
    ids_dtype = getattr(like.get("mrope_position_ids"), "dtype", torch.int64)
    deltas = torch.tensor([[int(position_ids.max()) + 1 - position_ids.shape[1]]], dtype=torch.int32)
    return {
        "mrope_position_ids": position_ids.to("cpu", ids_dtype)[:, None, :].clone(),
        "mrope_position_deltas": deltas,
    }


class OwnPositions:
    """The prompts' own position ids, found again by the request's first embedding tensor (the LLM
    API hands the processor the very tensors of the request)."""

    def __init__(self):
        self._by_rows: dict[int, AssembledPrompt] = {}

    def register(self, req: dict, prompt: AssembledPrompt) -> None:
        if prompt.position_ids is not None:
            self._by_rows[id(req["multi_modal_embeddings"]["image"][0])] = prompt

    def pop(self, multimodal_embedding: dict) -> AssembledPrompt | None:
        images = multimodal_embedding.get("image") or [None]
        return self._by_rows.pop(id(images[0]), None)


def with_own_positions(attach: Callable, table: OwnPositions) -> Callable:
    """Wrap an input processor's `attach_multimodal_embeddings` so that a registered prompt's
    mrope_config holds its own ids (module docstring)."""

    def attach_with_own_positions(inputs, multimodal_embedding, sampling_params):
        token_ids, extra = attach(inputs, multimodal_embedding, sampling_params)
        prompt = table.pop(multimodal_embedding)
        if prompt is None:
            return token_ids, extra
        data = (extra or {}).get("multimodal_data") or {}
        if "mrope_config" not in data:
            raise RuntimeError(
                "TensorRT-LLM's input processor returned no mrope_config for these embeddings: this model or "
                "version cannot take the prompt's own M-RoPE position ids"
            )
        if not _same_text(token_ids, prompt):
            raise RuntimeError(
                f"TensorRT-LLM tokenized the prompt into {len(token_ids)} ids, the runtime into "
                f"{prompt.input_ids.numel()}: their tokenizers or placeholder expansion differ, so the position "
                "ids would not line up"
            )
        data["mrope_config"] = mrope_config(prompt.position_ids, data["mrope_config"])
        return token_ids, extra

    return attach_with_own_positions


def _same_text(token_ids: Sequence[int], prompt: AssembledPrompt) -> bool:
    """Same length and the same ids outside the image slots (TensorRT-LLM may remap the slots' ids)."""
    ids = torch.as_tensor(list(token_ids), dtype=torch.int64)
    if ids.numel() != prompt.input_ids.numel():
        return False
    text = torch.ones_like(ids, dtype=torch.bool)
    text[prompt.image_slots] = False
    return bool(torch.equal(ids[text], prompt.input_ids[text]))
