"""`apet serve` end to end: real servers on 127.0.0.1 (free ports, in a thread of this process)
talked to with the official `openai` client. Answers against `runtime.Pipeline.generate` for the
same inputs (greedy), streaming against non-streaming, a vision-only server in front of a decoding
server against one server, `apet encode` payloads, and the errors."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch

from apet_trt import runtime
from apet_trt.runtime.serve import ServeConfig
from helpers.engines import IMAGE_SIZE, build_engine_dir
from helpers.servers import data_url, image_message, running_server

KEEP = 12


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("serve") / "t12", keep=KEEP)


@pytest.fixture(scope="module")
def pipe(engine):
    return runtime.load(engine, backend="onnxruntime")


@pytest.fixture(scope="module")
def server(engine, pipe):
    with running_server(ServeConfig(engine=str(engine), batch_wait_ms=20, max_images=2), pipe=pipe) as (url, state):
        yield url, state


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _images(rng, n: int) -> list[np.ndarray]:
    shapes = [(IMAGE_SIZE + 10, IMAGE_SIZE), (IMAGE_SIZE, 2 * IMAGE_SIZE), (3 * IMAGE_SIZE, IMAGE_SIZE)]
    return [torch.randint(0, 256, (*shapes[i % 3], 3), generator=rng, dtype=torch.uint8).numpy() for i in range(n)]


PROMPTS = ["What is in the picture?", "Describe it.", "Colours?", "Tell me more, please."]


def _ask(client, model, image, prompt, **kw):
    return client.chat.completions.create(
        model=model, messages=image_message(prompt, data_url(image)), temperature=0, **kw
    )


def test_models_health_and_metrics(server):
    url, state = server
    [model] = _client(url).models.list().data
    assert model.id == state.model == "test-llava"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    assert "apet_visual_rows_total" in text and "apet_stage_seconds" in text


def test_concurrent_answers_equal_pipeline_generate(server, pipe, rng):
    url, state = server
    client = _client(url)
    images = _images(rng, 6)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: _ask(client, state.model, images[i], prompts[i], max_tokens=8), range(6)))
    for image, prompt, answer in zip(images, prompts, answers):
        [ref] = pipe.generate(image, prompt, max_new_tokens=8)
        assert answer.choices[0].message.content == ref.text
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == len(ref.ids) == 8
        # usage counts the visual rows the LLM read: T, not N
        assert (
            answer.usage.visual_tokens == KEEP and answer.usage.visual_tokens_uncompressed == pipe.manifest.num_patches
        )
        length = int(pipe.assemble(pipe.assembler.conversation(prompt), pipe.encode(image)).input_ids.numel())
        assert answer.usage.prompt_tokens == length


def test_streaming_yields_the_same_text(server, pipe, rng):
    url, state = server
    client = _client(url)
    [image] = _images(rng, 1)
    plain = _ask(client, state.model, image, "Describe it.", max_tokens=12)
    stream = _ask(
        client, state.model, image, "Describe it.", max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [ref] = pipe.generate(image, "Describe it.", max_new_tokens=12)
    assert text == plain.choices[0].message.content == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_image_embeds_parts_decode_like_images(server, pipe, rng):
    """The decoder side takes vLLM's and trtllm-serve's image_embeds parts: the engine's own rows
    give the text the image gives."""
    from apet_trt.runtime.serve.payload import encode_part

    url, state = server
    client = _client(url)
    [image] = _images(rng, 1)
    [rows] = pipe.encode(image)
    [ref] = pipe.generate(image, "Colours?", max_new_tokens=8)
    for fmt in ("vllm", "trtllm"):
        part = encode_part(pipe.family.handoff_fields(rows), fmt)
        msg = [{"role": "user", "content": [part, {"type": "text", "text": "Colours?"}]}]
        r = client.chat.completions.create(model=state.model, messages=msg, temperature=0, max_tokens=8)
        assert r.choices[0].message.content == ref.text
        assert r.usage.visual_tokens == KEEP


def test_two_images_in_one_request(server, pipe, rng):
    url, state = server
    a, b = _images(rng, 2)
    r = _client(url).chat.completions.create(
        model=state.model, messages=image_message("Compare.", data_url(a), data_url(b)), temperature=0, max_tokens=6
    )
    rows = pipe.encode([a, b])
    text = "USER: <image>\n<image>\nCompare. ASSISTANT:"
    prompt = pipe.assemble(text, rows)
    out = pipe.decoder.generate([prompt], [[x.embeddings for x in rows]], runtime.pipeline.SamplingConfig(6))
    assert r.choices[0].message.content == pipe.tokenizer.decode(out.ids[0], skip_special_tokens=True)
    assert r.usage.visual_tokens == 2 * KEEP


def test_chain_vision_front_then_decoder_server(engine, server, pipe, rng):
    """apet serve --upstream (vision only) -> apet serve (decoder taking image_embeds) answers as
    one server does, streamed or not."""
    url, state = server
    front_cfg = ServeConfig(engine=str(engine), upstream=url, embeds_dtype="float32", batch_wait_ms=20)
    with running_server(front_cfg) as (front_url, front_state):
        assert front_state.pipe.decoder.name == "upstream"
        front, back = _client(front_url), _client(url)
        images = _images(rng, 3)
        with ThreadPoolExecutor(3) as pool:
            chained = list(pool.map(lambda im: _ask(front, front_state.model, im, "What is it?", max_tokens=8), images))
        for image, r in zip(images, chained):
            direct = _ask(back, state.model, image, "What is it?", max_tokens=8)
            assert r.choices[0].message.content == direct.choices[0].message.content
            assert r.usage.visual_tokens == KEEP
        stream = _ask(front, front_state.model, images[0], "What is it?", max_tokens=8, stream=True)
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            == chained[0].choices[0].message.content
        )
        # the front's own errors and the upstream's pass through as OpenAI errors
        with pytest.raises(openai.NotFoundError):
            front.chat.completions.create(model="nope", messages=image_message("x", data_url(images[0])))
        with pytest.raises(openai.BadRequestError, match="context"):
            _ask(front, front_state.model, images[0], "What is it?", max_tokens=10_000)
        metrics = httpx.get(front_url + "/metrics").text
        assert 'apet_visual_rows_total{kind="kept"} ' in metrics


def test_apet_encode_payload_feeds_the_server(engine, server, pipe, rng, tmp_path):
    from PIL import Image

    from apet_trt.scripts.cli import main

    url, state = server
    [image] = _images(rng, 1)
    Image.fromarray(image).save(tmp_path / "img.png")
    assert (
        main(
            [
                "encode",
                "--engine",
                str(engine),
                "--image",
                str(tmp_path / "img.png"),
                "--out",
                str(tmp_path / "part.json"),
            ]
        )
        == 0
    )
    part = json.loads((tmp_path / "part.json").read_text())
    assert part["type"] == "image_embeds"
    msg = [{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}]
    r = _client(url).chat.completions.create(model=state.model, messages=msg, temperature=0, max_tokens=8)
    [ref] = pipe.generate(str(tmp_path / "img.png"), "What is it?", max_new_tokens=8)
    assert r.choices[0].message.content == ref.text
    assert (
        main(
            [
                "encode",
                "--engine",
                str(engine),
                "--image",
                str(tmp_path / "img.png"),
                "--out",
                str(tmp_path / "rows.pt"),
            ]
        )
        == 0
    )
    assert torch.equal(torch.load(tmp_path / "rows.pt", weights_only=True), pipe.encode(image)[0].embeddings)


def _post(url, body, headers=None, **kw):
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(url + "/v1/chat/completions", content=body, headers=headers, **kw)


def _error(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, rng, tmp_path):
    url, state = server
    [image] = _images(rng, 1)
    good = {"model": state.model, "messages": image_message("Hi", data_url(image)), "max_tokens": 3, "temperature": 0}

    def with_(**kw):
        return json.dumps({**good, **kw})

    assert _error(_post(url, b"{not json"), 400)["code"] == "invalid_json"
    assert _error(_post(url, with_(model="gpt-4o")), 404)["code"] == "model_not_found"
    assert _error(_post(url, b"{" + b" " * (33 << 20) + b"}"), 413)
    three = image_message("Hi", *[data_url(image)] * 3)
    assert _error(_post(url, with_(messages=three)), 400)["code"] == "too_many_images"
    assert _error(_post(url, with_(max_tokens=100_000)), 400)["code"] == "context_length_exceeded"
    long_text = image_message("word " * 200, data_url(image))
    assert _error(_post(url, with_(messages=long_text, max_tokens=None)), 400)["code"] == "context_length_exceeded"
    bad_b64 = [{"role": "user", "content": [{"type": "image_embeds", "image_embeds": "!!!"}]}]
    assert "base64" in _error(_post(url, with_(messages=bad_b64)), 400)["message"]
    from apet_trt.runtime.serve.payload import tensor_to_base64

    wrong = [
        {"role": "user", "content": [{"type": "image_embeds", "image_embeds": tensor_to_base64(torch.zeros(12, 7))}]}
    ]
    assert _error(_post(url, with_(messages=wrong)), 400)["code"] == "invalid_image_embeds"
    remote = image_message("Hi", "http://127.0.0.1:9/x.png")
    assert "remote image URLs are not accepted" in _error(_post(url, with_(messages=remote)), 400)["message"]
    (tmp_path / "a.png").write_bytes(b"")
    local = image_message("Hi", (tmp_path / "a.png").as_uri())
    assert "local files are not accepted" in _error(_post(url, with_(messages=local)), 400)["message"]
    assert (
        "not an image"
        in _error(_post(url, with_(messages=image_message("Hi", "data:image/png;base64,AAAA"))), 400)["message"]
    )
    system = [{"role": "system", "content": "be brief"}, *good["messages"]]
    assert "one user turn" in _error(_post(url, with_(messages=system)), 400)["message"]
    assert _error(_post(url, with_(n=2)), 400)["param"] == "n"
    assert _error(_post(url, with_(temperature=-1)), 400)["param"] == "temperature"
    assert _error(_post(url, with_(messages=[])), 400)
    injected = image_message("a <image> b", data_url(image))
    assert "image token" in _error(_post(url, with_(messages=injected)), 400)["message"]
    assert _error(httpx.get(url + "/v1/nothing"), 404)
    ok = _post(url, with_())
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert ok.headers["x-request-id"] and ok.json()["id"] == f"chatcmpl-{ok.headers['x-request-id']}"
    mine = _post(url, with_(), headers={"X-Request-Id": "req-42"})
    assert mine.headers["x-request-id"] == "req-42" and mine.json()["id"] == "chatcmpl-req-42"


def test_client_disconnect_mid_stream_stops_its_decoding(server, rng):
    url, state = server
    [image] = _images(rng, 1)
    body = {
        "model": state.model,
        "messages": image_message("Hi", data_url(image)),
        "max_tokens": 100,
        "temperature": 0,
        "stream": True,
    }

    def cancelled() -> float:
        text = httpx.get(url + "/metrics").text
        return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("apet_cancelled_total")))

    before = cancelled()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk; then hang up
    for _ in range(200):  # bounded: the decoder drops the row at its next step
        if cancelled() > before:
            break
        time.sleep(0.05)
    assert cancelled() > before
    r = _post(url, json.dumps({**body, "stream": False, "max_tokens": 3}))
    assert r.status_code == 200


def test_local_files_only_below_the_allowed_directory(engine, pipe, rng, tmp_path):
    from PIL import Image

    allowed = tmp_path / "media"
    allowed.mkdir()
    [image] = _images(rng, 1)
    Image.fromarray(image).save(allowed / "in.png")
    Image.fromarray(image).save(tmp_path / "out.png")
    (allowed / "link.png").symlink_to(tmp_path / "out.png")
    cfg = ServeConfig(engine=str(engine), allowed_local_media_path=str(allowed))
    with running_server(cfg, pipe=pipe) as (url, state):
        client = _client(url)
        r = client.chat.completions.create(
            model=state.model, messages=image_message("Hi", (allowed / "in.png").as_uri()), temperature=0, max_tokens=5
        )
        [ref] = pipe.generate(image, "Hi", max_new_tokens=5)
        assert r.choices[0].message.content == ref.text
        for escape in (tmp_path / "out.png", allowed / "link.png", allowed / ".." / "out.png"):
            with pytest.raises(openai.BadRequestError, match="outside the allowed directory"):
                client.chat.completions.create(model=state.model, messages=image_message("Hi", "file://" + str(escape)))


def test_remote_images_when_enabled(engine, pipe, rng):
    """Fetched from a loopback HTTP server, only with allow_remote_images."""
    import http.server
    import io

    from PIL import Image

    [image] = _images(rng, 1)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    png = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            self.send_response(200 if self.path == "/img.png" else 404)
            self.end_headers()
            if self.path == "/img.png":
                self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        with running_server(ServeConfig(engine=str(engine), allow_remote_images=True), pipe=pipe) as (url, state):
            client = _client(url)
            r = client.chat.completions.create(
                model=state.model, messages=image_message("Hi", base + "/img.png"), temperature=0, max_tokens=5
            )
            [ref] = pipe.generate(image, "Hi", max_new_tokens=5)
            assert r.choices[0].message.content == ref.text
            with pytest.raises(openai.BadRequestError, match="HTTP 404"):
                client.chat.completions.create(model=state.model, messages=image_message("Hi", base + "/none.png"))
    finally:
        httpd.shutdown()


def test_timeout_gives_504_and_the_server_recovers(engine, pipe, rng):
    [image] = _images(rng, 1)
    with running_server(ServeConfig(engine=str(engine), request_timeout_s=0.001), pipe=pipe) as (url, state):
        with pytest.raises(openai.APIStatusError) as err:
            _ask(_client(url), state.model, image, "Hi", max_tokens=20)
        assert err.value.status_code == 504
        for _ in range(200):  # bounded: the batcher lets go of the abandoned request
            if state.batcher.inside == 0:
                break
            time.sleep(0.05)
        assert state.batcher.inside == 0
