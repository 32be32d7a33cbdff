"""One engine answering items: greedy generation through the runtime's Pipeline, the visual rows each
answer was given and the request's timings.

Items of one kind (one image, or one video) go through `Pipeline.generate` in batches; an item with
several images goes alone through the pipeline's own steps (encode -> assemble -> decoder), with the
template's image slot repeated once per image (`several_images`). Timings (ms) are the call's:
TTFT = preprocess + vision + the decoder's first token, total = the whole call, shared by the items
of a batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence


def _record(text: str, num_kept: int, num_patches: int, timings: dict, batch: int, after: int | None) -> dict:
    return {
        "answer": text.strip(),
        "num_kept": int(num_kept),
        "num_patches": int(num_patches),
        "num_after_llm_stage": after,  # rows left after ApET inside the LLM (manifest llm_stage); else None
        "ttft_ms": float(timings["preprocess_ms"] + timings["vision_ms"] + timings["first_token_ms"]),
        "total_ms": float(timings["total_ms"]),
        "batch": batch,
    }


def answer_batch(pipe, kind: str, media: Sequence, prompts: Sequence[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers for prompts about one medium each (kind "image" or "video"), one generate call."""
    if kind not in ("image", "video"):
        raise ValueError(f"answer_batch: kind must be 'image' or 'video' (one per prompt), got {kind!r}")
    results = pipe.generate(
        prompts=list(prompts), max_new_tokens=max_new_tokens, do_sample=False, **{f"{kind}s": list(media)}
    )
    return [
        _record(r.text, r.num_kept, r.num_patches, r.timings, len(prompts), _count(r.llm_positions)) for r in results
    ]


def _count(positions) -> int | None:
    return None if positions is None else len(positions)


def several_images(template: str, image_token: str, count: int) -> str:
    """The conversation template with its image slot once per image. The slot is the image token
    with the markers glued to it (Qwen2.5-VL: "<|vision_start|><|image_pad|><|vision_end|>"), repeated
    back to back as that model's chat template writes several images; a bare token (LLaVA: "<image>")
    repeats one a line, as `apet serve` does."""
    i = template.index(image_token)
    start, end = i, i + len(image_token)
    while start > 0 and not template[start - 1].isspace() and template[start - 1] != "}":
        start -= 1
    while end < len(template) and not template[end].isspace() and template[end] != "{":
        end += 1
    slot = template[start:end]
    return template[:start] + ("\n" if slot == image_token else "").join([slot] * count) + template[end:]


def answer_images(pipe, images: Sequence, prompt: str, max_new_tokens: int) -> dict:
    """Greedy answer for one prompt about several images (paths or PIL images)."""
    from apet_trt.runtime.decoders import SamplingConfig

    m = pipe.manifest
    text = several_images(m.prompt_template, m.image_token, len(images)).format(prompt=prompt)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, do_sample=False)
    t0 = time.perf_counter()
    rows = pipe.encode(list(images))
    t1 = time.perf_counter()
    assembled = pipe.assemble(text, rows)
    pipe.decoder.check_lengths([assembled], max_new_tokens)
    out = pipe.decoder.generate([assembled], [[rows[i].embeddings for i in assembled.items]], sampling)
    t2 = time.perf_counter()
    [ids] = out.ids
    timings = {
        "preprocess_ms": 0.0,  # inside encode
        "vision_ms": (t1 - t0) * 1e3,
        "first_token_ms": out.first_token_ms,
        "total_ms": (t2 - t0) * 1e3,
    }
    answer = pipe.tokenizer.decode(ids, skip_special_tokens=True)
    after = None if out.llm_kept is None else sum(int(k.numel()) for k in out.llm_kept[0])
    return _record(answer, sum(r.num_rows for r in rows), sum(r.num_patches for r in rows), timings, 1, after)
