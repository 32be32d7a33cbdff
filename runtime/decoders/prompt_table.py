"""The inputs TensorRT-LLM's prompt-tuning path needs, built exactly as docs/DESIGN.md says.

TensorRT-LLM embeds a token id >= vocab_size from the prompt table, at row
`(id - vocab_size) + task * task_vocab_size` (tensorrt_llm/layers/embedding.py,
PromptTuningEmbedding.forward). ModelRunnerCpp (tensorrt_llm/runtime/model_runner_cpp.py,
`_prepare_ptuning_executor`) indexes a 3-D table by task - request i gets
`prompt_table[task_indices[i]]` as its own PromptTuningConfig.embedding_table - so:

- request b's R_b visual slots (all its images' rows, in order) hold `vocab_size + i`,
  i = 0..R_b-1;
- its task id is b: prompt_tasks = "0,1,...,B-1"; the task vocab size is R = max_b R_b;
- the table is [B, R, H] in the LLM's dtype, request b's rows first in its task, zero rows after
  them that no id reads (flatten to [B*R, H] where an API wants 2-D: the row formula above then
  reads the same values). With one T for every image this is the embeddings [B, T, H] as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptTableInputs:
    batch_input_ids: list[torch.Tensor]  # per request, [L_b] int32 (ModelRunnerCpp takes a list)
    prompt_table: torch.Tensor  # [B, R, H] in the LLM dtype
    prompt_tasks: str  # "0,1,...,B-1"
    task_vocab_size: int  # R, the most rows of any request

    @property
    def tasks(self) -> list[int]:
        return [int(t) for t in self.prompt_tasks.split(",")]


def build_prompt_table_inputs(
    input_ids: Sequence[torch.Tensor],
    image_slots: Sequence[torch.Tensor],
    rows: Sequence[torch.Tensor],
    *,
    vocab_size: int,
    dtype: torch.dtype,
) -> PromptTableInputs:
    """input_ids[b] [L_b] with R_b image slots at image_slots[b] (ascending), rows[b] [R_b, H]
    (the request's images' rows, concatenated) -> ids with the slots rewritten to vocab_size + i,
    tasks 0..B-1, the table [B, max R_b, H] in `dtype`."""
    b = len(rows)
    if len(input_ids) != b or len(image_slots) != b:
        raise ValueError(f"{len(input_ids)} prompts and {len(image_slots)} slot lists for {b} requests' rows")
    if b == 0:
        raise ValueError("no requests")
    if any(r.ndim != 2 for r in rows) or len({int(r.shape[1]) for r in rows}) != 1:
        raise ValueError(f"rows must be [R_b, H] tensors of one width, got {[tuple(r.shape) for r in rows]}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    width = max(int(r.shape[0]) for r in rows)
    table = torch.zeros((b, width, int(rows[0].shape[1])), dtype=dtype)
    batch_ids = []
    for i, (ids, slots, r) in enumerate(zip(input_ids, image_slots, rows)):
        if slots.numel() != r.shape[0]:
            raise ValueError(f"prompt {i}: {slots.numel()} image slots for {r.shape[0]} visual rows")
        if bool((ids >= vocab_size).any()):
            raise ValueError(f"prompt {i}: holds ids >= vocab_size={vocab_size} before the slots were rewritten")
        ids = ids.clone().to(torch.int64)
        ids[slots] = vocab_size + torch.arange(slots.numel(), dtype=torch.int64)
        batch_ids.append(ids.to(torch.int32))
        table[i, : r.shape[0]] = r.detach().to(dtype)
    return PromptTableInputs(
        batch_input_ids=batch_ids,
        prompt_table=table,
        prompt_tasks=",".join(str(i) for i in range(b)),
        task_vocab_size=width,
    )
