"""Prompt assembly: the model's conversation format, with each image placeholder expanded to the
rows the vision engine made for that image (T for LLaVA-1.5; a number that depends on the image
for LLaVA-NeXT and Qwen2.5-VL).

A user prompt without the image token (e.g. "What is in the picture?") is wrapped in the
manifest's `prompt_template` ("USER: <image>\\n{prompt} ASSISTANT:" for LLaVA-1.5). A prompt that
already contains the image token is taken as the whole conversation text, as written. Either way
the text must then hold exactly one image slot per image of the request: none, or more slots than
images, is an error (each slot would otherwise read embeddings that do not exist).
The expanded text is tokenized in one piece (as the model's own HF processor does, so with no
compression the ids equal the processor's), and the slots are checked to have come out as exactly
R_i image-token ids in one contiguous run per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptFormat:
    template: str  # contains "{prompt}" and the image token once
    image_token: str  # "<image>"
    image_token_id: int  # its id in the tokenizer and the LLM's vocabulary


@dataclass(frozen=True)
class AssembledPrompt:
    input_ids: torch.Tensor  # [L] int64, sum(rows) entries equal to image_token_id
    image_slots: torch.Tensor  # [sum(rows)] int64 indices into input_ids, ascending
    text: str  # the conversation text, before expansion
    rows: tuple[int, ...] = ()  # visual rows per image, in slot order
    position_ids: torch.Tensor | None = None  # None: 0..L-1; else the family's [P, L] ids


class PromptAssembler:
    def __init__(self, fmt: PromptFormat, tokenizer):
        if "{prompt}" not in fmt.template:
            raise ValueError(f"prompt_template {fmt.template!r} has no '{{prompt}}' field")
        if fmt.template.count(fmt.image_token) != 1:
            raise ValueError(f"prompt_template {fmt.template!r} must contain {fmt.image_token!r} exactly once")
        self.fmt = fmt
        self.tokenizer = tokenizer

    def conversation(self, prompt: str, index: int = 0, num_images: int = 1) -> str:
        """The user's prompt in the model's conversation format, image token not yet expanded."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index}: expected a string, got {type(prompt).__name__}")
        tok = self.fmt.image_token
        text = prompt if tok in prompt else self.fmt.template.format(prompt=prompt)
        slots = text.count(tok)
        if slots == 0:  # only reachable through a template without the token (checked above)
            raise ValueError(f"prompt {index}: no image slot {tok!r} in {text!r}")
        if slots > num_images:
            raise ValueError(f"prompt {index}: {slots} image slots {tok!r} but {num_images} image(s) for it")
        if slots < num_images:
            raise ValueError(f"prompt {index}: {num_images} image(s) but only {slots} image slot(s) {tok!r}")
        return text

    def __call__(self, prompt: str, rows: int | Sequence[int], index: int = 0) -> AssembledPrompt:
        """`rows`: the visual rows of each image of this prompt, in order (an int: one image)."""
        fmt = self.fmt
        rows = (rows,) if isinstance(rows, int) else tuple(int(r) for r in rows)
        if not rows or any(r < 1 for r in rows):
            raise ValueError(f"prompt {index}: every image needs at least one visual row, got rows={rows}")
        text = self.conversation(prompt, index, len(rows))
        parts = text.split(fmt.image_token)
        expanded = parts[0] + "".join(fmt.image_token * r + part for r, part in zip(rows, parts[1:]))
        ids = self.tokenizer(expanded, add_special_tokens=True, return_attention_mask=False)["input_ids"]
        input_ids = torch.tensor(ids, dtype=torch.int64)
        slots = torch.nonzero(input_ids == fmt.image_token_id).flatten()
        total = sum(rows)
        runs = torch.split(slots, list(rows)) if slots.numel() == total else ()
        if slots.numel() != total or any(r.numel() > 1 and not bool((r.diff() == 1).all()) for r in runs):
            raise ValueError(
                f"prompt {index}: the tokenizer turned {total} x {fmt.image_token!r} into {slots.numel()} ids equal to "
                f"image_token_id={fmt.image_token_id} (expected {' + '.join(map(str, rows))} contiguous); the "
                f"tokenizer does not map {fmt.image_token!r} to a single special token, or the prompt text contains "
                "that id"
            )
        return AssembledPrompt(input_ids=input_ids, image_slots=slots, text=text, rows=rows)


def engine_prompting(manifest) -> tuple[object, PromptAssembler]:
    """An engine directory's tokenizer (its tokenizer/ folder) and the assembler for its
    conversation format: what runtime.load and the benchmark both build a pipeline from."""
    from transformers import AutoTokenizer

    tok_dir = manifest.root / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{tok_dir}: the tokenizer is missing from the engine directory")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    fmt = PromptFormat(
        template=manifest.prompt_template,
        image_token=manifest.image_token,
        image_token_id=int(manifest.llm["image_token_id"]),
    )
    return tokenizer, PromptAssembler(fmt, tokenizer)
