"""What TensorRT-LLM's LLM API (PyTorch backend) is given for precomputed visual rows, built here so
it can be checked without TensorRT-LLM.

A request is `{"prompt": text, "multi_modal_embeddings": {"image": [rows_i [R_i, H], ...]}}`: the
conversation text with one image placeholder per image. TensorRT-LLM's input processor
(`attach_multimodal_embeddings`, called by `LLM.generate_async` for a request with
"multi_modal_embeddings") tokenizes the text, expands each placeholder to the R_i rows given and
puts the rows there. Only for families whose rows need nothing but that (LLaVA-NeXT): for M-RoPE
models (Qwen2-VL, Qwen2.5-VL) TensorRT-LLM infers a compact grid for the rows
(`_infer_image_grid_thw`), so ApET's kept rows would lose their own positions; that route is not
offered (docs/UPSTREAM.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..prompt import AssembledPrompt


def request(prompt: AssembledPrompt, rows: Sequence[torch.Tensor], device: str | torch.device = "cuda") -> dict:
    """One LLM API request: the conversation text and each image's rows."""
    return {"prompt": prompt.text, "multi_modal_embeddings": {"image": [r.to(device).contiguous() for r in rows]}}
