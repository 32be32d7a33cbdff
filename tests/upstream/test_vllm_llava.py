"""LLaVA-1.5 through a real vLLM: `apet serve --upstream` (vision here) in front of vLLM serving the
engine's own checkpoint (hf/) with `--enable-mm-embeds --limit-mm-per-prompt '{"image": 0}'` and the
chat template `apet chat-template` writes, talked to with the `openai` client. Against local decoding
(`Pipeline.generate`, Transformers): the same greedy ids and text, the same prompt ids; streaming
equal; 16 requests at concurrency 4 equal the serial answers; a client hanging up mid-stream leaves
both servers serving. One vLLM for the module (about a minute to start on 2 cores)."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.export.build import BuildConfig, build
from apet_trt.runtime.prompt import conversation
from helpers.servers import data_url, image_message
from helpers.vllm import (
    alive,
    ask,
    chat_template_file,
    client,
    hang_up_mid_stream,
    same_text,
    streamed,
    upstream_stack,
    vllm_python,
)

pytestmark = pytest.mark.vllm
PHOTO = Image.open(__import__("pathlib").Path(__file__).parents[2] / "assets" / "grace_hopper.jpg").convert("RGB")
PROMPTS = ["What is in the picture?", "Describe it.", "Colours?", "Tell me more, please."]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    vllm_python()  # skip (or fail under CI) before building anything
    root = tmp_path_factory.mktemp("vllm-llava")
    engine = root / "engine"
    build(BuildConfig(model="tiny-llava", out=str(engine), keep=64), quiet=True)
    template = chat_template_file(engine, root / "chat.jinja")
    args = ["--enable-mm-embeds", "--limit-mm-per-prompt", '{"image": 0}', "--chat-template", str(template)]
    with upstream_stack(engine, engine / "hf", args, serve={"batch_wait_ms": 20}) as (url, state, vllm_url):
        yield {"url": url, "model": state.model, "vllm": vllm_url, "pipe": runtime.load(engine, backend="onnxruntime")}


def _images(rng, n: int) -> list[Image.Image]:
    shapes = [(300, 420), (500, 260), (336, 336)]
    out = [PHOTO]
    for i in range(n - 1):
        h, w = shapes[i % len(shapes)]
        out.append(Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()))
    return out


def _local(pipe, image, prompt, max_tokens=16):
    [ref] = pipe.generate(image, prompt, max_new_tokens=max_tokens)
    [rows] = pipe.encode(image)
    return ref, pipe.assemble(prompt, [rows]).input_ids.tolist()


def test_greedy_ids_text_and_prompt_equal_local_decoding(stack, rng):
    c = client(stack["url"])
    for i, image in enumerate(_images(rng, 3)):
        prompt = PROMPTS[i % len(PROMPTS)]
        ref, prompt_ids = _local(stack["pipe"], image, prompt)
        answer = ask(c, stack["model"], image_message(prompt, data_url(image)))
        choice = answer.choices[0]
        assert choice.token_ids == ref.ids
        assert answer.prompt_token_ids == prompt_ids  # the same prompt, token for token: template and rows
        assert answer.usage.prompt_tokens == len(prompt_ids)
        assert prompt_ids.count(stack["pipe"].manifest.llm["image_token_id"]) == 64  # T kept rows for the <image>
        assert same_text(ref.text, choice.message.content)


def test_streaming_equals_the_answer(stack, rng):
    c = client(stack["url"])
    [_, image] = _images(rng, 2)
    messages = image_message("Describe it.", data_url(image))
    answer = ask(c, stack["model"], messages)
    text, usage = streamed(c, stack["model"], messages)
    assert text == answer.choices[0].message.content
    assert usage.prompt_tokens == answer.usage.prompt_tokens and usage.completion_tokens == 16


def test_16_requests_at_concurrency_4_equal_the_serial_answers(stack, rng):
    c = client(stack["url"])
    images = _images(rng, 4)
    jobs = [(images[i % 4], PROMPTS[(i // 4) % 4]) for i in range(16)]

    def one(job):
        return ask(c, stack["model"], image_message(job[1], data_url(job[0])), max_tokens=8)

    serial = [one(job) for job in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(one, jobs))
    for s, p in zip(serial, parallel):
        assert p.choices[0].token_ids == s.choices[0].token_ids
        assert p.choices[0].message.content == s.choices[0].message.content
        assert p.usage.prompt_tokens == s.usage.prompt_tokens


def test_a_client_hanging_up_mid_stream_leaves_both_servers_serving(stack, rng):
    c = client(stack["url"])
    [_, image] = _images(rng, 2)
    messages = image_message("Tell me more, please.", data_url(image))
    before = ask(c, stack["model"], messages)
    for _ in range(3):
        assert hang_up_mid_stream(stack["url"], stack["model"], messages)
    assert alive(stack["url"]) and alive(stack["vllm"])
    after = ask(c, stack["model"], messages)
    assert after.choices[0].token_ids == before.choices[0].token_ids


def test_several_images(stack, rng):
    """Two images in one message: vLLM takes them (equal rows), the prompt equals the local one.
    Images in two messages: a 400 naming the limit, and the servers still serve."""
    c = client(stack["url"])
    a, b = _images(rng, 2)
    pipe = stack["pipe"]
    answer = ask(c, stack["model"], image_message("Compare.", data_url(a), data_url(b)))
    text = conversation(pipe.manifest.prompt_template, pipe.manifest.image_token, "Compare.", ["image"] * 2)
    assert answer.prompt_token_ids == pipe.assemble(text, pipe.encode([a, b])).input_ids.tolist()
    turn = {"role": "assistant", "content": "ok"}
    messages = [*image_message("A", data_url(a)), turn, *image_message("B", data_url(b))]
    resp = httpx.post(
        stack["url"] + "/v1/chat/completions", json={"model": stack["model"], "messages": messages}, timeout=60
    )
    assert resp.status_code == 400
    assert "the upstream takes the images of one message only" in resp.json()["error"]["message"]
    # a turn the engine's format does not hold: the chat template refuses it, vLLM answers 400
    system = [{"role": "system", "content": "Be brief."}, *image_message("A", data_url(a))]
    resp = httpx.post(
        stack["url"] + "/v1/chat/completions", json={"model": stack["model"], "messages": system}, timeout=60
    )
    assert resp.status_code == 400 and "one user message" in resp.text
    assert alive(stack["vllm"])
