"""Prompt assembly: the model's conversation format, with the image placeholder expanded to the
T visual slots the vision engine fills.

A user prompt without the image token (e.g. "What is in the picture?") is wrapped in the
manifest's `prompt_template` ("USER: <image>\\n{prompt} ASSISTANT:" for LLaVA-1.5). A prompt that
already contains the image token is taken as the whole conversation text, as written. Either way
the text must then hold exactly one image slot per image of the request: none, or more slots than
images, is an error (each slot would otherwise read embeddings that do not exist).
The expanded text is tokenized in one piece (as the model's own HF processor does, so with no
compression the ids equal the processor's), and the slots are checked to have come out as exactly
T image-token ids in one contiguous run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptFormat:
    template: str  # contains "{prompt}" and the image token once
    image_token: str  # "<image>"
    image_token_id: int  # its id in the tokenizer and the LLM's vocabulary
    num_visual_tokens: int  # T


@dataclass(frozen=True)
class AssembledPrompt:
    input_ids: torch.Tensor  # [L] int64, T entries equal to image_token_id
    image_slots: torch.Tensor  # [T] int64 indices into input_ids, ascending
    text: str  # the conversation text, before expansion


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

    def __call__(self, prompt: str, index: int = 0) -> AssembledPrompt:
        fmt = self.fmt
        text = self.conversation(prompt, index)
        expanded = text.replace(fmt.image_token, fmt.image_token * fmt.num_visual_tokens)
        ids = self.tokenizer(expanded, add_special_tokens=True, return_attention_mask=False)["input_ids"]
        input_ids = torch.tensor(ids, dtype=torch.int64)
        slots = torch.nonzero(input_ids == fmt.image_token_id).flatten()
        t = fmt.num_visual_tokens
        if slots.numel() != t or (t > 1 and not bool((slots.diff() == 1).all())):
            raise ValueError(
                f"prompt {index}: the tokenizer turned {t} x {fmt.image_token!r} into {slots.numel()} ids equal to "
                f"image_token_id={fmt.image_token_id} (expected {t} contiguous); the tokenizer does not map "
                f"{fmt.image_token!r} to a single special token, or the prompt text contains that id"
            )
        return AssembledPrompt(input_ids=input_ids, image_slots=slots, text=text)


def engine_prompting(manifest) -> tuple[object, PromptAssembler]:
    """An engine directory's tokenizer (its tokenizer/ folder) and the assembler for its
    conversation format and T: what runtime.load and the benchmark both build a pipeline from."""
    from transformers import AutoTokenizer

    tok_dir = manifest.root / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{tok_dir}: the tokenizer is missing from the engine directory")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    fmt = PromptFormat(
        template=manifest.prompt_template,
        image_token=manifest.image_token,
        image_token_id=int(manifest.llm["image_token_id"]),
        num_visual_tokens=manifest.num_visual_tokens,
    )
    return tokenizer, PromptAssembler(fmt, tokenizer)
