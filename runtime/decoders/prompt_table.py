"""The inputs TensorRT-LLM's prompt-tuning path needs, built exactly as docs/DESIGN.md says.

TensorRT-LLM embeds a token id >= vocab_size from the prompt table, at row
`(id - vocab_size) + task * task_vocab_size` (tensorrt_llm/layers/embedding.py,
PromptTuningEmbedding.forward). ModelRunnerCpp (tensorrt_llm/runtime/model_runner_cpp.py,
`_prepare_ptuning_executor`) indexes a 3-D table by task - request i gets
`prompt_table[task_indices[i]]` as its own PromptTuningConfig.embedding_table - so:

- request b's T visual slots in its input ids hold `vocab_size + i`, i = 0..T-1;
- its task id is b: prompt_tasks = "0,1,...,B-1"; the task vocab size is T;
- the table is the embeddings [B, T, H] in the LLM's dtype (flatten to [B*T, H] where an API
  wants 2-D: the row formula above then reads the same values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptTableInputs:
    batch_input_ids: list[torch.Tensor]  # per request, [L_b] int32 (ModelRunnerCpp takes a list)
    prompt_table: torch.Tensor  # [B, T, H] in the LLM dtype
    prompt_tasks: str  # "0,1,...,B-1"
    task_vocab_size: int  # T

    @property
    def tasks(self) -> list[int]:
        return [int(t) for t in self.prompt_tasks.split(",")]


def build_prompt_table_inputs(
    input_ids: Sequence[torch.Tensor],
    image_slots: Sequence[torch.Tensor],
    embeddings: torch.Tensor,
    *,
    vocab_size: int,
    dtype: torch.dtype,
) -> PromptTableInputs:
    """input_ids[b] [L_b] with T image slots at image_slots[b] (ascending), embeddings [B, T, H]
    -> ids with the slots rewritten to vocab_size + i, tasks 0..B-1, the table in `dtype`."""
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be [B, T, H], got shape {tuple(embeddings.shape)}")
    b, t, _ = embeddings.shape
    if len(input_ids) != b or len(image_slots) != b:
        raise ValueError(f"{len(input_ids)} prompts and {len(image_slots)} slot lists for {b} embedding rows")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    virtual = vocab_size + torch.arange(t, dtype=torch.int64)
    batch_ids = []
    for i, (ids, slots) in enumerate(zip(input_ids, image_slots)):
        if slots.numel() != t:
            raise ValueError(f"prompt {i}: {slots.numel()} image slots, the table has T={t} rows per request")
        if bool((ids >= vocab_size).any()):
            raise ValueError(f"prompt {i}: holds ids >= vocab_size={vocab_size} before the slots were rewritten")
        ids = ids.clone().to(torch.int64)
        ids[slots] = virtual
        batch_ids.append(ids.to(torch.int32))
    return PromptTableInputs(
        batch_input_ids=batch_ids,
        prompt_table=embeddings.detach().to(dtype).contiguous(),
        prompt_tasks=",".join(str(i) for i in range(b)),
        task_vocab_size=t,
    )
