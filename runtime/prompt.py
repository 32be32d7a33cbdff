"""Prompt assembly: the model's conversation format, with each image placeholder expanded to the
rows the vision engine made for that image (T for LLaVA-1.5; a number that depends on the image
for LLaVA-NeXT and Qwen2.5-VL).

A user prompt without a media token (e.g. "What is in the picture?") is wrapped in the
manifest's `prompt_template` ("USER: <image>\\n{prompt} ASSISTANT:" for LLaVA-1.5; for a request
of one video the slot becomes the video token, "USER: <video>\\n...", for families that take videos). A prompt that
already contains the image token is taken as the whole conversation text, as written. Either way
the text must then hold exactly one image slot per image of the request: none, or more slots than
images, is an error (each slot would otherwise read embeddings that do not exist).
The expanded text is tokenized in one piece (as the model's own HF processor does, so with no
compression the ids equal the processor's), and the slots are checked to have come out as exactly
R_i image-token ids in one contiguous run per image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptFormat:
    template: str  # contains "{prompt}" and the image token once
    image_token: str  # "<image>"
    image_token_id: int  # its id in the tokenizer and the LLM's vocabulary
    video_token: str | None = None  # "<video>" for a family that takes videos
    video_token_id: int | None = None

    def tokens(self) -> dict[str, tuple[str, int]]:
        """Media kind -> (placeholder, id), for the kinds this model takes."""
        out = {"image": (self.image_token, self.image_token_id)}
        if self.video_token is not None and self.video_token_id is not None:
            out["video"] = (self.video_token, self.video_token_id)
        return out


@dataclass(frozen=True)
class AssembledPrompt:
    input_ids: torch.Tensor  # [L] int64, sum(rows) entries equal to a media token id
    image_slots: torch.Tensor  # [sum(rows)] int64 indices into input_ids, ascending (images' and videos')
    text: str  # the conversation text, before expansion
    rows: tuple[int, ...] = ()  # visual rows per media item, in slot order
    position_ids: torch.Tensor | None = None  # None: 0..L-1; else the family's [P, L] ids
    items: tuple[int, ...] = ()  # the media item (index into the rows given) of each run, in slot order


def conversation(template: str, image_token: str, prompt: str, media: Sequence[str], video_token: str = "") -> str:
    """The one conversation builder: `template`'s image slot holds one media token per item of `media`
    ("image" / "video", one a line) and `{prompt}` the user's text. Each token expands to its item's
    rows later (PromptAssembler)."""
    tokens = {"image": image_token, "video": video_token}
    return template.replace(image_token, "\n".join(tokens[kind] for kind in media)).format(prompt=prompt)


class PromptAssembler:
    def __init__(self, fmt: PromptFormat, tokenizer):
        if "{prompt}" not in fmt.template:
            raise ValueError(f"prompt_template {fmt.template!r} has no '{{prompt}}' field")
        if fmt.template.count(fmt.image_token) != 1:
            raise ValueError(f"prompt_template {fmt.template!r} must contain {fmt.image_token!r} exactly once")
        self.fmt = fmt
        self.tokenizer = tokenizer

    def conversation(self, prompt: str, index: int = 0, num_images: int = 1, num_videos: int = 0) -> str:
        """The user's prompt in the model's conversation format, media tokens not yet expanded. With
        videos, the template's image slot holds one token per item (images first, one a line)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index}: expected a string, got {type(prompt).__name__}")
        tokens = self.fmt.tokens()
        if num_videos and "video" not in tokens:
            raise ValueError(f"prompt {index}: this model takes no videos (no video token in its prompt format)")
        if any(tok in prompt for tok, _ in tokens.values()):
            text = prompt
        else:
            # one slot for images alone (more images than slots is an error); with videos, one each
            media = ["image"] * num_images + ["video"] * num_videos if num_videos else ["image"]
            video = tokens["video"][0] if num_videos else ""
            text = conversation(self.fmt.template, self.fmt.image_token, prompt, media, video)
        for kind, count in (("image", num_images), ("video", num_videos)):
            if kind not in tokens:
                continue
            tok, slots = tokens[kind][0], text.count(tokens[kind][0])
            if slots > count:
                raise ValueError(f"prompt {index}: {slots} {kind} slots {tok!r} but {count} {kind}(s) for it")
            if slots < count:
                raise ValueError(f"prompt {index}: {count} {kind}(s) but only {slots} {kind} slot(s) {tok!r}")
        return text

    def __call__(
        self, prompt: str, rows: int | Sequence[int], index: int = 0, kinds: Sequence[str] | None = None
    ) -> AssembledPrompt:
        """`rows`: the visual rows of each media item of this prompt, in order (an int: one image);
        `kinds`: each item's kind, "image" (the default) or "video". The i-th image token takes the
        i-th image item, the i-th video token the i-th video item."""
        fmt = self.fmt
        rows = (rows,) if isinstance(rows, int) else tuple(int(r) for r in rows)
        kinds = ("image",) * len(rows) if kinds is None else tuple(kinds)
        if not rows or any(r < 1 for r in rows):
            raise ValueError(f"prompt {index}: every image needs at least one visual row, got rows={rows}")
        if len(kinds) != len(rows) or set(kinds) - {"image", "video"}:
            raise ValueError(f"prompt {index}: kinds {kinds} for {len(rows)} media item(s)")
        text = self.conversation(prompt, index, kinds.count("image"), kinds.count("video"))
        tokens = fmt.tokens()
        by_token = {tokens[k][0]: k for k in set(kinds)}
        queues = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in set(kinds)}
        pattern = re.compile("|".join(re.escape(t) for t in by_token))
        order, pieces, last = [], [], 0
        for m in pattern.finditer(text):  # each media token, in text order -> its item's rows
            item = queues[by_token[m.group()]].pop(0)
            order.append(item)
            pieces += [text[last : m.start()], m.group() * rows[item]]
            last = m.end()
        expanded = "".join(pieces) + text[last:]
        ids = self.tokenizer(expanded, add_special_tokens=True, return_attention_mask=False)["input_ids"]
        input_ids = torch.tensor(ids, dtype=torch.int64)
        media_ids = torch.tensor([tokens[k][1] for k in tokens], dtype=torch.int64)
        slots = torch.nonzero(torch.isin(input_ids, media_ids)).flatten()
        slot_rows = tuple(rows[i] for i in order)
        total = sum(rows)
        runs = torch.split(slots, list(slot_rows)) if slots.numel() == total else ()
        if slots.numel() != total or any(
            (r.numel() > 1 and not bool((r.diff() == 1).all())) or bool((input_ids[r] != tokens[kinds[i]][1]).any())
            for r, i in zip(runs, order)
        ):
            names = " / ".join(f"{tok!r}={tid}" for tok, tid in tokens.values())
            raise ValueError(
                f"prompt {index}: the tokenizer turned {total} media tokens into {slots.numel()} ids equal to a media "
                f"token id ({names}; expected {' + '.join(map(str, slot_rows))} contiguous); the tokenizer does not "
                f"map {fmt.image_token!r} to a single special token, or the prompt text contains that id"
            )
        return AssembledPrompt(input_ids=input_ids, image_slots=slots, text=text, rows=slot_rows, items=tuple(order))


def engine_prompting(manifest) -> tuple[object, PromptAssembler]:
    """An engine directory's tokenizer (its tokenizer/ folder) and the assembler for its
    conversation format: what runtime.load and the benchmark both build a pipeline from."""
    from transformers import AutoTokenizer

    tok_dir = manifest.tokenizer_dir  # confined to the engine directory
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{tok_dir}: the tokenizer is missing from the engine directory")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    fmt = PromptFormat(
        template=manifest.prompt_template,
        image_token=manifest.image_token,
        image_token_id=int(manifest.llm["image_token_id"]),
        video_token=manifest.video_token,
        video_token_id=manifest.llm.get("video_token_id"),
    )
    return tokenizer, PromptAssembler(fmt, tokenizer)
