"""Video-LLaVA through a real vLLM: vLLM registers no Video-LLaVA, so `apet serve --upstream` sends the
whole prompt as embeddings (`prompt_embeds`, /v1/completions) to a vLLM serving the engine's saved
LLaMA language model (`save_language_model`) with --enable-prompt-embeds. The shipped clip: the same
greedy ids and text as local decoding, prompt tokens equal, streaming equal; a client hanging up
mid-stream leaves both servers serving."""

import base64
from pathlib import Path

import pytest

from apet_trt import runtime
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models.video_llava import save_language_model
from helpers.vllm import alive, ask, client, hang_up_mid_stream, same_text, streamed, upstream_stack, vllm_python

pytestmark = pytest.mark.vllm
CLIP = Path(__file__).parents[2] / "assets" / "big_buck_bunny.mp4"
PROMPT = "What happens in the video?"


def _messages(url: str, prompt: str = PROMPT) -> list[dict]:
    parts = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": prompt}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    vllm_python()
    root = tmp_path_factory.mktemp("vllm-video")
    engine = root / "engine"
    build(BuildConfig(model="tiny-video-llava", out=str(engine), keep=22, basis=10), quiet=True)
    lm = save_language_model(engine / "hf", root / "lm")
    serve = {"allowed_local_media_path": str(CLIP.parent)}
    with upstream_stack(engine, lm, ["--enable-prompt-embeds"], serve=serve, max_model_len=4096) as (url, state, v):
        yield {"url": url, "model": state.model, "vllm": v, "pipe": runtime.load(engine, backend="onnxruntime")}


def test_the_clip_equals_local_decoding_streamed_too(stack):
    pipe = stack["pipe"]
    [ref] = pipe.generate(prompts=PROMPT, videos=str(CLIP), max_new_tokens=16)
    [rows] = pipe.encode(videos=str(CLIP))
    c = client(stack["url"])
    data = "data:video/mp4;base64," + base64.b64encode(CLIP.read_bytes()).decode()
    answer = ask(c, stack["model"], _messages(data))
    assert answer.choices[0].token_ids == ref.ids
    assert same_text(ref.text, answer.choices[0].message.content)
    assert rows.num_rows == 8 * 33
    local_prompt = pipe.assembler(PROMPT, [rows.num_rows], kinds=["video"])
    assert answer.usage.prompt_tokens == local_prompt.input_ids.numel()
    # the same through a file:// URL, and streamed
    text, usage = streamed(c, stack["model"], _messages(CLIP.as_uri()))
    assert text == answer.choices[0].message.content
    assert usage.prompt_tokens == answer.usage.prompt_tokens and usage.completion_tokens == 16


def test_a_client_hanging_up_mid_stream_leaves_both_servers_serving(stack):
    c = client(stack["url"])
    before = ask(c, stack["model"], _messages(CLIP.as_uri(), "Describe it."), max_tokens=8)
    for _ in range(2):
        assert hang_up_mid_stream(stack["url"], stack["model"], _messages(CLIP.as_uri(), "Describe it."))
    assert alive(stack["url"]) and alive(stack["vllm"])
    after = ask(c, stack["model"], _messages(CLIP.as_uri(), "Describe it."), max_tokens=8)
    assert after.choices[0].token_ids == before.choices[0].token_ids


def test_16_requests_at_concurrency_4_equal_the_serial_answers(stack):
    """The prompt-embeds route under load: encoding batched across requests, embedding in threads,
    the completions translated back; every answer as when asked alone."""
    from concurrent.futures import ThreadPoolExecutor

    c = client(stack["url"])
    prompts = ["What happens?", "Who is there?", "Describe it.", "Colours?"]

    def one(i: int):
        return ask(c, stack["model"], _messages(CLIP.as_uri(), prompts[i % 4]), max_tokens=6)

    serial = [one(i) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(one, range(16)))
    for s, p in zip(serial, parallel):
        assert p.choices[0].token_ids == s.choices[0].token_ids
        assert p.choices[0].message.content == s.choices[0].message.content
        assert p.usage.prompt_tokens == s.usage.prompt_tokens
