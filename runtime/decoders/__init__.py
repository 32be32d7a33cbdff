"""Decoders behind one interface: the prompts (ids with each image's slots) plus each prompt's
visual rows (one [R_i, H] tensor per image, R_i may differ between images) in, generated ids out,
with the time to the first token and the decode time.

    TransformersDecoder   the checkpoint's language model fed `inputs_embeds`, with a KV cache
    Stage2Decoder         the same, with ApET again on the image rows after decoder layer L (stage2.py)
    TensorRTLLMDecoder    TensorRT-LLM's ModelRunnerCpp fed the prompt table (docs/DESIGN.md)
    TensorRTLLMAPIDecoder TensorRT-LLM's LLM API fed `multi_modal_embeddings`
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
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
    # ApET inside the LLM (Stage2Decoder): per request, per image, the indices among that image's
    # rows still in the sequence after the stage (ascending); None for decoders without it
    llm_kept: list[list[torch.Tensor]] | None = None


Visual = Sequence[Sequence[torch.Tensor]]  # visual[b][i]: prompt b's image i, [R_i, H]
# on_step(tokens): tokens[b] is the id prompt b produced at this step, None once it has finished;
# returns the rows to stop now (a client that went away), or None
OnStep = Callable[[list[int | None]], Collection[int] | None]


class Decoder(ABC):
    """`generate(prompts, visual, sampling)`: prompts[b]'s image slots read visual[b]'s rows in
    order (float32 or the LLM dtype)."""

    name: str = "decoder"
    max_length: int  # prompt + new tokens may not exceed this
    llm_stage: bool = False  # runs ApET inside the LLM (an engine whose manifest has llm_stage needs it)

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
    def check_batch(prompts: Sequence[AssembledPrompt], visual: Visual) -> None:
        if len(visual) != len(prompts):
            raise ValueError(f"{len(visual)} sets of visual rows for {len(prompts)} prompts")
        for b, (p, images) in enumerate(zip(prompts, visual)):
            shapes = [tuple(x.shape) for x in images]
            if any(len(s) != 2 for s in shapes) or len({s[1] for s in shapes}) > 1:
                raise ValueError(f"prompt {b}: visual rows must be [R, H] tensors of one width, got {shapes}")
            if p.rows and tuple(s[0] for s in shapes) != tuple(p.rows):
                raise ValueError(
                    f"prompt {b}: its slots take {list(p.rows)} rows per image, given {[s[0] for s in shapes]}"
                )
            if p.image_slots.numel() != sum(s[0] for s in shapes):
                raise ValueError(
                    f"prompt {b}: {p.image_slots.numel()} image slots for {sum(s[0] for s in shapes)} visual rows"
                )

    @abstractmethod
    def generate(
        self, prompts: Sequence[AssembledPrompt], visual: Visual, sampling: SamplingConfig
    ) -> DecodeOutput: ...

    def generate_streaming(
        self, prompts: Sequence[AssembledPrompt], visual: Visual, sampling: SamplingConfig, on_step: OnStep
    ) -> DecodeOutput:
        """`generate`, calling `on_step` with each step's tokens. This default replays the finished
        ids once `generate` returns (a decoder that cannot yield tokens as it goes); a decoder that
        can overrides it and stops the rows `on_step` returns. The ids returned equal `generate`'s."""
        out = self.generate(prompts, visual, sampling)
        for step in range(max((len(ids) for ids in out.ids), default=0)):
            on_step([ids[step] if step < len(ids) else None for ids in out.ids])
        return out


from .stage2 import Stage2Decoder  # noqa: E402
from .tensorrt_llm import TensorRTLLMAPIDecoder, TensorRTLLMDecoder  # noqa: E402
from .transformers import TransformersDecoder  # noqa: E402

__all__ = [
    "Decoder",
    "Visual",
    "OnStep",
    "DecodeOutput",
    "SamplingConfig",
    "TransformersDecoder",
    "Stage2Decoder",
    "TensorRTLLMDecoder",
    "TensorRTLLMAPIDecoder",
]
