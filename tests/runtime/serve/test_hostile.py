"""`apet serve` under hostile input (issue 21): real servers on 127.0.0.1, short limits so every
failure comes fast, and after each bad request the server still answers a good one.

  workers      a request that makes the vision engine or the decoder fail fails alone (500, the
               others of its batch answered), an image the family refuses and rows it cannot place
               are 400 (Qwen2.5-VL: too small for T, an image_embeds part), /health stays ok
  admission    a slot is taken from the headers (503 before the body is sent), slow headers and
               slow bodies get 408, the decoding budget refuses big images and zip bombs unread
  client gone  a non-streaming client that hangs up stops its decoding (cancelled, 499)
  inputs       deep JSON, temperature 1e-40, file:// URLs with NUL, localhost, links; JSON only;
               the API key; no paths in answers
  remote       a host that drips its image is cut off at the fetch deadline
  upstream     client image_embeds checked before they go on; a huge upstream answer is capped;
               credentials in the upstream URL stay out of logs and answers
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import logging
import select
import socket
import threading
import time
import zipfile
from dataclasses import replace

import httpx
import numpy as np
import openai
import pytest
import torch

from apet_trt import runtime
from apet_trt.runtime.serve import ServeConfig
from apet_trt.runtime.serve.payload import encode_part, tensor_to_base64
from helpers.engines import IMAGE_SIZE, TEXT_HIDDEN, build_engine_dir
from helpers.servers import data_url, image_message, running_server

FAST = dict(header_timeout_s=1.0, body_timeout_s=1.0, request_timeout_s=60.0, remote_image_timeout_s=1.0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    # a long context (rotary positions: the tiny Llama takes it) so a long answer can be cut short
    return build_engine_dir(tmp_path_factory.mktemp("hostile") / "t12", keep=12, max_position_embeddings=4096)


@pytest.fixture(scope="module")
def pipe(engine):
    return runtime.load(engine, backend="onnxruntime")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(engine, pipe, media):
    cfg = ServeConfig(engine=str(engine), max_decoded_bytes=1 << 20, allowed_local_media_path=str(media), **FAST)
    with running_server(cfg, pipe=pipe) as (url, state):
        yield url, state


def _image(rng, h=IMAGE_SIZE + 5, w=IMAGE_SIZE) -> np.ndarray:
    return torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()


def _body(model: str, *urls: str, **kw) -> dict:
    return {"model": model, "messages": image_message("Hi", *urls), "max_tokens": 3, "temperature": 0, **kw}


def _post(url: str, body, content_type: str | None = "application/json", timeout=60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {} if content_type is None else {"Content-Type": content_type}
    return httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=timeout)


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def _serving(url: str, model: str, rng) -> None:
    """The server answers a good request, and says it is ready."""
    r = _post(url, _body(model, data_url(_image(rng))))
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


def _raw(url: str, data: bytes, wait_s: float = 15.0) -> bytes:
    """Send raw bytes on a fresh connection and read what comes back until it closes (bounded)."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        sock.sendall(data)
        out = b""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


def _head(length: int, content_type: str = "application/json") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _zip_bomb(numel: int) -> str:
    """torch.save of `numel` zeros, every member re-packed with deflate: small, unpacks to numel * 4."""
    raw = io.BytesIO()
    torch.save(torch.zeros(numel), raw)
    src, out = zipfile.ZipFile(io.BytesIO(raw.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return base64.b64encode(out.getvalue()).decode()


def _embeds(model: str, value) -> dict:
    part = {"type": "image_embeds", "image_embeds": value}
    return {"model": model, "messages": [{"role": "user", "content": [part]}], "max_tokens": 3, "temperature": 0}


# -- inputs that used to be 500s, and what a public endpoint must not show ---------------------------------
def test_client_errors_are_4xx_and_the_server_keeps_serving(server, media, rng, tmp_path):
    url, state = server
    model = state.model
    good = _body(model, data_url(_image(rng)))

    deep = b'{"model": "x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _error(_post(url, deep), 400)["code"] == "invalid_json"
    _serving(url, model, rng)
    nested = {**good, "extra": json.loads("[" * 200 + "]" * 200)}  # parses, but deeper than the limit
    assert "nested deeper" in _error(_post(url, nested), 400)["message"]

    surrogate = {**good, "messages": image_message("\ud800 hi", data_url(_image(rng)))}
    assert "not valid Unicode" in _error(_post(url, json.dumps(surrogate)), 400)["message"]
    pair = {**good, "messages": image_message("\U0001f600", data_url(_image(rng)))}  # escaped as a surrogate pair
    assert _post(url, json.dumps(pair)).status_code == 200
    sparse = io.BytesIO()  # 1 value standing for a 256 GB dense tensor
    torch.save(torch.sparse_coo_tensor(torch.tensor([[0], [0]]), torch.tensor([1.0]), (10**9, TEXT_HIDDEN)), sparse)
    err = _error(_post(url, _embeds(model, base64.b64encode(sparse.getvalue()).decode())), 400)
    assert "bytes dense" in err["message"]
    _serving(url, model, rng)

    tiny = _post(url, {**good, "temperature": 1e-40, "max_tokens": 4})  # vLLM's floor (0.01), not NaN
    assert tiny.status_code == 200 and 1 <= tiny.json()["usage"]["completion_tokens"] <= 4

    for bad in ("file:///etc%00/passwd", "file://localhost/a%00b.png"):
        assert "NUL" in _error(_post(url, _body(model, bad)), 400)["message"]
    _serving(url, model, rng)

    # file://localhost/p is /p (not ./p); another host is refused
    from PIL import Image

    Image.fromarray(_image(rng)).save(media / "in.png")
    assert _post(url, _body(model, "file://localhost" + str(media / "in.png"))).status_code == 200
    assert "file:///path" in _error(_post(url, _body(model, "file://example.com/in.png")), 400)["message"]
    # a link out of the directory: refused, and neither the link's target nor the directory is named
    secret = tmp_path / "secret-target.png"
    Image.fromarray(_image(rng)).save(secret)
    (media / "link.png").symlink_to(secret)
    msg = _error(_post(url, _body(model, (media / "link.png").as_uri())), 400)["message"]
    assert "outside the allowed directory" in msg and "link.png" in msg and "secret-target" not in msg

    # /v1/models names the model, not the engine's path
    listed = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
    assert str(state.pipe.manifest.root) not in json.dumps(listed) and listed["root"] == model
    _serving(url, model, rng)


def test_json_bodies_only(server, rng):
    url, state = server
    body = json.dumps(_body(state.model, data_url(_image(rng))))
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        assert _error(_post(url, body, content_type=content_type), 415)["code"] == "unsupported_media_type"
    assert _post(url, body, content_type="application/json; charset=utf-8").status_code == 200


# -- the decoding budget and archives --------------------------------------------------------------------
def test_decoding_budget_and_zip_bombs_refused_before_decoding(server, pipe, rng):
    url, state = server
    model = state.model
    big = _image(rng, 700, 700)  # 1.47 MB decoded, over the 1 MiB budget; a few hundred KB as PNG
    err = _error(_post(url, _body(model, data_url(big))), 400)
    assert err["code"] == "decoded_size_exceeded" and "700x700" in err["message"]
    two = _image(rng, 420, 420)  # 529 KB decoded each: one fits, two do not
    assert _post(url, _body(model, data_url(two))).status_code == 200
    assert _error(_post(url, _body(model, data_url(two), data_url(two))), 400)["code"] == "decoded_size_exceeded"

    bomb = _zip_bomb(16 << 20)  # 64 MiB of zeros in ~65 KB
    err = _error(_post(url, _embeds(model, bomb)), 400)
    assert "unpacks to 67,10" in err["message"]
    # a .npy header that declares a huge array over a few bytes
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, TEXT_HIDDEN), np.float32))
    header["shape"] = (1 << 24, TEXT_HIDDEN)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    npy = base64.b64encode(buf.getvalue() + b"\0" * 64).decode()
    assert "unpacks to" in _error(_post(url, _embeds(model, npy)), 400)["message"]
    legacy = io.BytesIO()
    torch.save(torch.zeros(12, TEXT_HIDDEN), legacy, _use_new_zipfile_serialization=False)
    assert (
        "zip archive"
        in _error(_post(url, _embeds(model, base64.b64encode(legacy.getvalue()).decode())), 400)["message"]
    )
    # a good payload still decodes
    [rows] = pipe.encode(_image(rng))
    ok = _post(url, _embeds(model, encode_part(pipe.family.handoff_fields(rows))["image_embeds"]))
    assert ok.status_code == 200
    _serving(url, model, rng)


# -- admission and deadlines -----------------------------------------------------------------------------
def test_admission_before_the_body_and_deadlines(engine, pipe, rng):
    cfg = ServeConfig(engine=str(engine), max_queue=1, **{**FAST, "body_timeout_s": 3.0})
    with running_server(cfg, pipe=pipe) as (url, state):
        body = json.dumps(_body(state.model, data_url(_image(rng)))).encode()
        host, port = url.rsplit("/", 1)[-1].split(":")
        holder = socket.create_connection((host, int(port)), timeout=15)
        try:
            holder.sendall(_head(len(body)) + body[:10])  # admitted, then stalls inside its body
            for _ in range(100):  # bounded: until the server counts it inside
                if state.batcher.inside == 1:
                    break
                time.sleep(0.02)
            assert state.batcher.inside == 1
            # full: a second request's headers alone get 503, its 30 MB body never sent
            answer = _raw(url, _head(30 << 20))
            assert answer.startswith(b"HTTP/1.1 503") and b"retry shortly" in answer
            # the stalled body runs out of time: 408, and its slot comes back
            answer = holder.recv(65536)
            assert answer.startswith(b"HTTP/1.1 408"), answer
        finally:
            holder.close()
        # a client that hangs up inside its body: 499 in the metrics, not a 500
        with socket.create_connection((host, int(port)), timeout=15) as quitter:
            quitter.sendall(_head(len(body)) + body[:10])
        for _ in range(100):
            if _metric(url, 'apet_requests_total{status="499"}') >= 1:
                break
            time.sleep(0.02)
        assert _metric(url, 'apet_requests_total{status="499"}') == 1
        assert _metric(url, 'apet_requests_total{status="500"}') == 0
        # headers that never finish: 408 and the connection closes
        assert _raw(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 408")
        assert _raw(url, b"").startswith(b"HTTP/1.1 408")  # a connection that says nothing
        for _ in range(100):
            if state.batcher.inside == 0:
                break
            time.sleep(0.02)
        assert state.batcher.inside == 0
        _serving(url, state.model, rng)


def test_a_non_streaming_client_that_hangs_up_stops_its_decoding(engine, pipe, rng):
    cfg = ServeConfig(engine=str(engine), **FAST)
    with running_server(cfg, pipe=pipe) as (url, state):
        before = _metric(url, "apet_cancelled_total")
        gave_up = False
        for _ in range(8):  # bounded: a random model may say EOS early; then another picture
            long = _body(state.model, data_url(_image(rng)), max_tokens=3900)
            try:  # the client gives up and closes the connection
                _post(url, long, timeout=httpx.Timeout(60, read=0.5))
            except httpx.ReadTimeout:
                gave_up = True
                break
        assert gave_up
        for _ in range(400):  # bounded: the decoder drops the row at its next step
            if _metric(url, "apet_cancelled_total") > before and state.batcher.inside == 0:
                break
            time.sleep(0.05)
        assert _metric(url, "apet_cancelled_total") > before and state.batcher.inside == 0
        assert _metric(url, 'apet_requests_total{status="499"}') >= 1
        # streamed: hung up after the first event, its slot comes back too
        with httpx.stream("POST", url + "/v1/chat/completions", json={**long, "stream": True}, timeout=60) as resp:
            assert resp.status_code == 200 and next(resp.iter_lines()).startswith("data: ")
        for _ in range(400):
            if state.batcher.inside == 0:
                break
            time.sleep(0.05)
        assert state.batcher.inside == 0
        _serving(url, state.model, rng)


# -- workers that cannot die -----------------------------------------------------------------------------
def test_a_failing_request_fails_alone(engine, rng):
    """The vision engine and the decoder fail on one request of a batch: that one gets 500 (no
    internals in the message), its batch-mates are answered, the workers live on."""
    pipe = runtime.load(engine, backend="onnxruntime")
    encode, generate = pipe.family.encode, pipe.decoder.generate_streaming
    poison_width = IMAGE_SIZE + 13

    def bad_encode(run, batch):
        if any(img.width == poison_width for img in batch.images):
            raise RuntimeError("/secret/engine/path exploded")
        return encode(run, batch)

    def bad_generate(prompts, visual, sampling, on_step):
        if any(p.input_ids.numel() > 60 for p in prompts):  # the long prompt below
            raise KeyError("grid_thw")
        return generate(prompts, visual, sampling, on_step)

    pipe.family.encode, pipe.decoder.generate_streaming = bad_encode, bad_generate
    cfg = ServeConfig(engine=str(engine), batch_wait_ms=300, **FAST)
    with running_server(cfg, pipe=pipe) as (url, state):
        model = state.model
        poison = _body(model, data_url(_image(rng, IMAGE_SIZE, poison_width)))
        long_prompt = {
            **_body(model, data_url(_image(rng))),
            "messages": image_message("x" * 50, data_url(_image(rng))),
        }
        requests = [_body(model, data_url(_image(rng))), poison, _body(model, data_url(_image(rng))), long_prompt]
        results: list = [None] * len(requests)

        def send(i):
            results[i] = _post(url, requests[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [r.status_code for r in results] == [200, 500, 200, 500]
        assert "/secret" not in results[1].text and "see the server log" in results[1].json()["error"]["message"]
        assert state.batcher.alive
        _serving(url, model, rng)


def test_health_and_admission_say_not_ready_if_a_worker_ends(engine, rng):
    """Should a worker end despite all (here: SystemExit from its queue), /health answers 503 and
    new requests get 503 at once instead of waiting for a thread that is gone."""
    pipe = runtime.load(engine, backend="onnxruntime")
    with running_server(ServeConfig(engine=str(engine), **FAST), pipe=pipe) as (url, state):
        _serving(url, state.model, rng)
        batcher, take = state.batcher, state.batcher._take

        def take_then_end(q, count):
            if q is batcher._vision_q:
                raise SystemExit("gone")
            return take(q, count)

        batcher._take = take_then_end  # the vision thread calls it after its current batch
        assert _post(url, _body(state.model, data_url(_image(rng)))).status_code == 200
        for _ in range(100):  # bounded: the thread ends once it asks for its next batch
            if not batcher.alive:
                break
            time.sleep(0.02)
        assert httpx.get(url + "/health", timeout=30).status_code == 503
        assert "not ready" in _error(_post(url, _body(state.model, data_url(_image(rng)))), 503)["message"]


@pytest.fixture(scope="module")
def qwen_engine(tmp_path_factory):
    from apet_trt.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("qwen") / "t16"
    build(BuildConfig(model="tiny-qwen2.5-vl", out=str(out), keep=16, basis=4), quiet=True)
    return out


def test_qwen_refusals_are_400_and_the_server_keeps_serving(qwen_engine, rng):
    """A Qwen2.5-VL server: an image too small for T=16, and an image_embeds part (what `apet
    encode` writes for this engine) whose rows it cannot place without their grid: 400, not a
    dead worker."""
    pipe = runtime.load(qwen_engine, backend="onnxruntime")
    with running_server(ServeConfig(engine=str(qwen_engine), **FAST), pipe=pipe) as (url, state):
        model = state.model
        small = _error(_post(url, _body(model, data_url(_image(rng, 56, 56)))), 400)
        assert "fewer than the T=16" in small["message"]
        [rows] = pipe.encode(_image(rng, 224, 224))
        part = encode_part(pipe.family.handoff_fields(rows))
        err = _error(_post(url, _embeds(model, part["image_embeds"])), 400)
        assert err["code"] == "invalid_image_embeds"
        for _ in range(2):
            r = _post(url, _body(model, data_url(_image(rng, 224, 224))))
            assert r.status_code == 200, r.text
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}


# -- access ----------------------------------------------------------------------------------------------
def test_api_key_on_every_route_but_health(engine, pipe, rng, monkeypatch):
    cfg = ServeConfig(engine=str(engine), api_key="s3cret-key", **FAST)
    with running_server(cfg, pipe=pipe) as (url, state):
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        for path in ("/v1/models", "/metrics", "/v1/nothing"):
            assert httpx.get(url + path, timeout=30).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        assert _error(_post(url, _body(state.model, data_url(_image(rng)))), 401)["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0, timeout=60)
        assert client.models.list().data[0].id == state.model
        r = client.chat.completions.create(
            model=state.model, messages=image_message("Hi", data_url(_image(rng))), max_tokens=3, temperature=0
        )
        assert r.choices[0].message.content is not None
    # the CLI takes the key from APET_API_KEY when --api-key is not given
    import argparse

    from apet_trt.runtime.serve.cli import register

    monkeypatch.setenv("APET_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["serve", "--engine", "e"]).api_key == "from-env"
    assert parser.parse_args(["serve", "--engine", "e", "--api-key", "flag"]).api_key == "flag"


# -- remote images ---------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /drip: a byte every 0.2 s (up to 100). A fake upstream: GET /v1/models; POST answers 3 MB
    of JSON, or (server.slow) nothing for up to 20 s, counting in server.aborted a caller that hangs up."""

    def do_GET(self):  # noqa: N802 - the stdlib's name
        if self.path == "/drip":
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.path == "/v1/models":
            self._json({"data": [{"id": "fake"}]})
        else:
            self.send_response(404)
            self.end_headers()

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts += 1
        if self.server.slow:
            for _ in range(200):  # bounded: 20 s
                readable, _, _ = select.select([self.connection], [], [], 0.1)
                if readable and self.connection.recv(1, socket.MSG_PEEK) == b"":
                    self.server.aborted += 1
                    return
            self._json({"late": True})
            return
        self._json({"junk": "x" * (3 << 20)})  # 3 MB answer

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def helper_http():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.posts, httpd.slow, httpd.aborted = 0, False, 0
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd, f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_dripping_image_host_is_cut_off_at_the_fetch_deadline(engine, pipe, rng, helper_http):
    _, where = helper_http
    cfg = ServeConfig(engine=str(engine), allow_remote_images=True, **FAST)
    with running_server(cfg, pipe=pipe) as (url, state):
        t0 = time.monotonic()
        err = _error(_post(url, _body(state.model, f"http://{where}/drip")), 400)
        assert err["code"] == "image_fetch_timeout" and time.monotonic() - t0 < 20  # the drip lasts 20 s
        _serving(url, state.model, rng)


# -- upstream mode ---------------------------------------------------------------------------------------
def test_upstream_checks_client_embeds_and_caps_answers(engine, pipe, rng, helper_http, caplog):
    httpd, where = helper_http
    cfg = ServeConfig(
        engine=str(engine), upstream=f"http://user:pa55word@{where}", max_upstream_response_bytes=1 << 20, **FAST
    )
    caplog.set_level(logging.INFO, logger="apet.serve")
    with running_server(cfg) as (url, state):
        model = state.model
        bad = [
            "!!!",  # not base64
            tensor_to_base64(torch.zeros(12, 7)),  # the wrong width
            base64.b64encode(b"\x80\x04K\x01.").decode(),  # a bare pickle
            _zip_bomb(16 << 20),
        ]
        for value in bad:
            assert _post(url, _embeds(model, value)).status_code == 400
        assert httpd.posts == 0  # none of them went on
        # a good part goes on; the upstream's 3 MB answer is over the 1 MiB cap: 502, not buffered
        [rows] = pipe.encode(_image(rng))
        good = encode_part(pipe.family.handoff_fields(rows))["image_embeds"]
        err = _error(_post(url, _embeds(model, good)), 502)
        assert httpd.posts == 1 and "exceeds" in err["message"] and "pa55word" not in json.dumps(err)
        # a client that hangs up while the upstream decodes: the upstream call is cancelled too
        httpd.slow = True
        with pytest.raises(httpx.ReadTimeout):
            _post(url, _embeds(model, good), timeout=httpx.Timeout(60, read=0.5))
        for _ in range(200):  # bounded: well before the 20 s the upstream would take
            if httpd.aborted:
                break
            time.sleep(0.05)
        assert httpd.aborted == 1 and _metric(url, 'apet_requests_total{status="499"}') == 1
    assert "pa55word" not in caplog.text and "***@" in caplog.text
    # an unreachable upstream: 502 without its address
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    with running_server(replace(cfg, upstream=f"http://u:pa55word@127.0.0.1:{port}", upstream_model="m")) as (url, _):
        err = _error(_post(url, _body(state.model, data_url(_image(rng)))), 502)
        assert "pa55word" not in json.dumps(err) and str(port) not in err["message"]
