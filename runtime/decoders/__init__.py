"""Decoders behind one interface: the prompt (ids with T image slots) plus the visual embeddings
[B, T, H] in, generated ids out, with the time to the first token and the decode time.

    TransformersDecoder   the checkpoint's language model fed `inputs_embeds`, with a KV cache
    TensorRTLLMDecoder    TensorRT-LLM's ModelRunnerCpp fed the prompt table (docs/DESIGN.md)
    TensorRTLLMAPIDecoder TensorRT-LLM's LLM API fed `multi_modal_embeddings`
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..checks import sampling_values
from ..prompt import AssembledPrompt


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. Greedy unless do_sample (temperature 0 means greedy too); `seed` makes
    sampling reproducible."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:  # checked and normalised (numpy integers accepted) in one place
        for name, value in sampling_values(**{f: getattr(self, f) for f in self.__dataclass_fields__}).items():
            object.__setattr__(self, name, value)


@dataclass
class DecodeOutput:
    ids: list[list[int]]  # generated ids per request; ends with eos when one was produced
    first_token_ms: float  # prefill: the prompt (text + T visual slots) -> first token
    decode_ms: float  # every token after the first


class Decoder(ABC):
    """`generate(prompts, embeddings, sampling)`: prompts[b] holds T image slots that read
    embeddings[b] (float32 or the LLM dtype, [B, T, H])."""

    name: str = "decoder"
    max_length: int  # prompt + new tokens may not exceed this

    def check_lengths(self, prompts: Sequence[AssembledPrompt], max_new_tokens: int) -> None:
        for b, p in enumerate(prompts):
            total = int(p.input_ids.numel()) + max_new_tokens
            if total > self.max_length:
                raise ValueError(
                    f"prompt {b}: {p.input_ids.numel()} prompt tokens (with the visual slots) + "
                    f"max_new_tokens={max_new_tokens} = {total} exceeds the {self.name} decoder's maximum "
                    f"length {self.max_length}"
                )

    @staticmethod
    def check_batch(prompts: Sequence[AssembledPrompt], embeddings: torch.Tensor) -> None:
        if embeddings.ndim != 3 or embeddings.shape[0] != len(prompts):
            raise ValueError(f"embeddings must be [B={len(prompts)}, T, H], got {tuple(embeddings.shape)}")
        for b, p in enumerate(prompts):
            if p.image_slots.numel() != embeddings.shape[1]:
                raise ValueError(
                    f"prompt {b}: {p.image_slots.numel()} image slots for {embeddings.shape[1]} visual tokens"
                )

    @abstractmethod
    def generate(
        self, prompts: Sequence[AssembledPrompt], embeddings: torch.Tensor, sampling: SamplingConfig
    ) -> DecodeOutput: ...


from .tensorrt_llm import TensorRTLLMAPIDecoder, TensorRTLLMDecoder  # noqa: E402
from .transformers import TransformersDecoder  # noqa: E402

__all__ = [
    "Decoder",
    "DecodeOutput",
    "SamplingConfig",
    "TransformersDecoder",
    "TensorRTLLMDecoder",
    "TensorRTLLMAPIDecoder",
]
