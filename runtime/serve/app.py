"""The ASGI application (FastAPI): /v1/chat/completions, /v1/models, /health, /metrics.

    app = create_app(ServeConfig(engine="engines/tiny-llava-t64"))   # uvicorn.run(app) serves it

The pipeline loads when the app starts (lifespan), so the port opens only once the model can
answer; shutdown refuses new requests, answers the queued ones with 503 and stops the workers.
Every request carries an id (the client's X-Request-Id when it sends a sane one, else a new one),
echoed in the X-Request-Id header and the completion's id, and logged with its outcome.

A chat request meets, in order (docs/SERVING.md lists what each answers): the API key (401), its
Content-Type (JSON only: 415) and declared length (413), admission (a slot, or 503, before the
body is read), the body within its deadline (408) and size (413), JSON within a nesting depth
(400), the request's fields (400/404), its images and image_embeds within the request's decoding
budget (400), then the workers. A non-streaming request whose client hangs up stops being decoded
at the next step (499 in the log and the metrics).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, FastAPI, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..families import VisualRows
from ..manifest import describe_budget
from ..prompt import conversation
from . import protocol
from .access import ApiKeyMiddleware
from .batching import Batcher, Job, Slot
from .chat import image_parts, user_turn
from .config import ServeConfig, redact_url
from .errors import APIError, bad_request
from .limits import DecodeBudget, check_json
from .media import load_image_url
from .metrics import Metrics
from .payload import EmbedsLimits, decode_part, encode_part, handoff_fields, torch_dtype

log = logging.getLogger("apet.serve")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_JSON_TYPES = ("application/json",)
MIN_TEMPERATURE = 1e-2  # vLLM's floor (sampling_params._MAX_TEMP): below it, logits / T overflow


@dataclass
class ServerState:
    cfg: ServeConfig
    pipe: object
    batcher: Batcher
    metrics: Metrics
    model: str
    limits: EmbedsLimits
    upstream: object | None = None
    started: float = 0.0
    embedder: object | None = None  # the prompt-embeds route's embedding table (prompt_embeds.PromptEmbedder)

    @property
    def max_length(self) -> int:
        return int(self.pipe.decoder.max_length)


def load_pipeline(cfg: ServeConfig):
    """The runtime pipeline for the engine directory; in upstream mode without a decoder (only the
    vision backend and the family run here)."""
    from .. import load

    if cfg.upstream is None:
        return load(cfg.engine, backend=cfg.backend, device=cfg.device, decoder=cfg.decoder)
    from .vision_only import VisionOnlyDecoder

    pipe = load(cfg.engine, backend=cfg.backend, device=cfg.device, decoder=VisionOnlyDecoder.for_manifest)
    pipe.family.upstream_route(cfg.upstream_format, cfg.upstream_grid_positions)  # or refused here, one line
    if cfg.upstream_format == "vllm-apet" and not pipe.family.vllm_plugin:
        raise ValueError(
            "--upstream-format vllm-apet: apet-trt's vLLM plugin takes Qwen2.5-VL and Qwen3-VL rows with their "
            "M-RoPE ids; "
            f"the {pipe.family.name} family's positions are 1-D and survive vLLM's own path: use --upstream-format vllm"
        )
    return pipe


def describe(state: ServerState) -> str:
    """The startup line: what answers, and how."""
    pipe, cfg = state.pipe, state.cfg
    m = pipe.manifest
    apet = m.apet
    how = f"ApET {describe_budget(apet)} basis={apet['basis']}" if apet else "no ApET"
    t, n = pipe.num_visual_tokens, m.num_patches
    rows = (
        f"N={'per image' if n is None else n} -> "
        + (f"T={t} rows per image" if t is not None else "rows per image vary")
        + f" ({how})"
    )
    where = pipe.decoder.name
    if cfg.upstream:
        where = f"upstream {redact_url(cfg.upstream)} ({cfg.upstream_format} image_embeds)"
    return (
        f"model {state.model!r}: engine {m.root} (family {m.family}, {rows}); vision backend {pipe.backend} "
        f"[{pipe.backend_reason}]; decoder {where}; batch <= {state.batcher.max_batch} images, wait "
        f"{cfg.batch_wait_ms:g} ms, queue {cfg.max_queue}; " + ("API key required" if cfg.api_key else "no API key")
    )


def create_app(cfg: ServeConfig, pipe=None, on_ready=None) -> FastAPI:
    """`pipe`: a ready runtime.Pipeline (tests share one), else loaded at startup. `on_ready(state)`
    is called once the server can answer (the CLI prints its startup line there)."""
    cfg.validate()
    app = FastAPI(
        title="apet serve", lifespan=_lifespan(cfg, pipe, on_ready), docs_url=None, redoc_url=None, openapi_url=None
    )
    _add_access_control(app, cfg)
    _add_error_handlers(app)
    app.include_router(router)
    return app


# -- startup and shutdown -------------------------------------------------------------------------
def _lifespan(cfg: ServeConfig, pipe, on_ready):
    """The app's lifespan: start (the port opens once the model can answer), serve, stop."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = await _start(cfg, pipe)
        app.state.apet = state
        log.info("apet serve: %s", describe(state))
        if on_ready is not None:
            on_ready(state)
        try:
            yield
        finally:
            await _stop(state)

    return lifespan


async def _start(cfg: ServeConfig, pipe) -> ServerState:
    """The pipeline (loaded unless given), the batcher, the upstream (and its prompt embedder), the
    workers started."""
    p = pipe if pipe is not None else await anyio.to_thread.run_sync(load_pipeline, cfg)
    model = _model_name(cfg, p.manifest)
    metrics = Metrics(model)
    state = ServerState(
        cfg, p, _batcher(cfg, p, metrics), metrics, model, _embeds_limits(p), _upstream(cfg, p), time.time()
    )
    if state.upstream is not None and state.upstream.route == "prompt_embeds":
        from .prompt_embeds import PromptEmbedder

        state.embedder = await anyio.to_thread.run_sync(PromptEmbedder, p.manifest)
    state.batcher.start()
    return state


def _model_name(cfg: ServeConfig, manifest) -> str:
    """--served-model-name, else the checkpoint's id the engine was built from, else the directory's name."""
    return cfg.served_model_name or manifest.model.id or manifest.root.name


def _batcher(cfg: ServeConfig, pipe, metrics: Metrics) -> Batcher:
    return Batcher(
        pipe,
        max_batch=cfg.max_batch or int(pipe.manifest.batch_max),
        batch_wait_ms=cfg.batch_wait_ms,
        max_queue=cfg.max_queue,
        default_max_tokens=cfg.default_max_tokens,
        metrics=metrics,
        decode=cfg.upstream is None,
    )


def _embeds_limits(pipe) -> EmbedsLimits:
    return EmbedsLimits(pipe.family.row_width, int(pipe.manifest.llm["max_position_embeddings"]))


def _upstream(cfg: ServeConfig, pipe):
    """The upstream server's client (--upstream), else None."""
    if cfg.upstream is None:
        return None
    from .upstream import Upstream

    return Upstream(cfg, pipe.family.upstream_route(cfg.upstream_format, cfg.upstream_grid_positions))


async def _stop(state: ServerState) -> None:
    """Refuse new requests, answer the queued ones (503), stop the workers, close the upstream client."""
    log.info("apet serve: shutting down (%d request(s) inside)", state.batcher.inside)
    await anyio.to_thread.run_sync(state.batcher.close)
    if state.upstream is not None:
        await state.upstream.aclose()


# -- access and errors ----------------------------------------------------------------------------
def _add_access_control(app: FastAPI, cfg: ServeConfig) -> None:
    """--api-key: every path but /health needs it."""
    if cfg.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=cfg.api_key, open_paths=("/health",))


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's error shape; an unexpected one is logged with its traceback."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


async def _api_error(request: Request, exc: APIError):
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException):
    return APIError(exc.status_code, str(exc.detail)).response()


async def _internal_error(request: Request, exc: Exception):
    log.exception("unhandled error")
    return APIError(500, f"internal error ({type(exc).__name__}); see the server log").response()


# -- the routes -----------------------------------------------------------------------------------
router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.apet


@router.get("/health")
async def route_health(request: Request):
    """Ready: loaded, not shutting down, every worker running (not: has room; /metrics says that)."""
    state = getattr(request.app.state, "apet", None)
    if state is None or not state.batcher.alive:
        return APIError(503, "not ready").response()
    return {"status": "ok"}


@router.get("/v1/models")
async def route_models(request: Request):
    state = _state(request)
    return {
        "object": "list",
        "data": [
            {
                "id": state.model,
                "object": "model",
                "created": int(state.started),
                "owned_by": "apet-trt",
                "root": state.model,  # not the engine's path: clients need not know the server's files
                "max_model_len": state.max_length,
            }
        ],
    }


@router.get("/metrics")
async def route_metrics(request: Request):
    state = _state(request)
    return Response(state.metrics.exposition(), media_type=state.metrics.content_type)


@router.post("/v1/chat/completions")
async def route_chat_completions(request: Request):
    state = _state(request)
    given = request.headers.get("x-request-id", "")
    rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
    t0 = time.perf_counter()
    slot = None
    try:
        _check_headers(request, state.cfg)
        slot = state.batcher.admit()  # before a byte of the body is read
        body = await _read_json(request, state.cfg)
    except APIError as err:
        if slot is not None:
            slot.release()
        return _refused(state, err, rid, close=True)  # the body is not read: the connection ends
    try:
        response = await _chat(state, request, body, slot, rid, t0)
    except APIError as err:
        slot.release()
        return _refused(state, err, rid)
    except BaseException:
        slot.release()
        raise
    if not isinstance(response, SlotStream):  # a stream lets go of the slot when it ends
        slot.release()
    response.headers["X-Request-Id"] = rid
    return response


class SlotStream(StreamingResponse):
    """A streamed answer that holds its request's slot until the stream ends, however it ends
    (finished, failed, or cancelled by the client going away before the first chunk)."""

    def __init__(self, content, slot: Slot, **kwargs):
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


def _refused(state: ServerState, err: APIError, rid: str, close: bool = False) -> Response:
    _count(state, err.status, err)
    log.info("request %s -> %d %s", rid, err.status, err.message)
    headers = {"X-Request-Id": rid}
    if err.status == 503:
        headers["Retry-After"] = "1"
    if close:
        headers["Connection"] = "close"
    return err.response(headers)


def _check_headers(request: Request, cfg: ServeConfig) -> None:
    """What the headers alone decide: a JSON body (no form or text/plain posts a web page could
    send across origins), of a declared length within the limit."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _JSON_TYPES:
        raise APIError(
            415,
            f"the body must be JSON sent as Content-Type: application/json, not {media or 'no Content-Type'}",
            code="unsupported_media_type",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise APIError(413, f"the request body ({declared} bytes) exceeds the limit of {cfg.max_body_bytes} bytes")


def _count(state: ServerState, status: int, err: APIError | None = None) -> None:
    state.metrics.requests.labels(status=str(status)).inc()
    if err is not None:
        state.metrics.errors.labels(type=err.body()["error"]["type"]).inc()


async def _read_json(request: Request, cfg: ServeConfig) -> dict:
    """The body, read within body_timeout_s (408 for a slow client) and max_body_bytes (413), as a
    JSON object nested at most MAX_JSON_DEPTH deep (400)."""
    chunks, size = [], 0
    try:
        with anyio.fail_after(cfg.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise APIError(413, f"the request body exceeds the limit of {cfg.max_body_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise APIError(
            408, f"the request body did not arrive within {cfg.body_timeout_s:g} s", code="body_timeout"
        ) from exc
    except ClientDisconnect as exc:
        raise APIError(499, "the client went away while sending its body") from exc
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON ({exc})", code="invalid_json") from exc
    except RecursionError as exc:
        raise bad_request("the body is nested too deeply", code="invalid_json") from exc
    del chunks
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    check_json(body)
    return body


def _validated(body: dict) -> protocol.ChatCompletionRequest:
    try:
        req = protocol.ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where}: {first['msg']}", param=where or None) from exc
    req.check_supported()
    return req


async def _chat(state: ServerState, request: Request, body: dict, slot: Slot, rid: str, t0: float) -> Response:
    req = _validated(body)
    if req.model != state.model:
        raise APIError(
            404,
            f"the model {req.model!r} does not exist; this server serves {state.model!r}",
            param="model",
            code="model_not_found",
        )
    budget = DecodeBudget(state.cfg.max_decoded_bytes)
    if state.upstream is not None:
        return await _forward(state, request, body, req, slot, budget, rid, t0)
    job = await _local_job(state, body, req, rid, budget)
    job.slot = slot
    state.batcher.submit(job)
    if req.stream:
        return SlotStream(_stream(state, request, job, req, t0), slot, media_type="text/event-stream")
    result = await _wait(state, job, t0, request)
    _count(state, 200)
    _record(state, job, result, rid, t0)
    return JSONResponse(
        protocol.completion(
            f"chatcmpl-{rid}", state.model, result["text"], result["finish_reason"], _usage(job, result)
        )
    )


def _sampling(req: protocol.ChatCompletionRequest) -> dict:
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default samples
    greedy = temperature == 0.0
    if 0.0 < temperature < MIN_TEMPERATURE:  # as vLLM does: 1e-40 would make the logits inf / NaN
        temperature = MIN_TEMPERATURE
    return dict(
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_k=0 if req.top_k in (None, -1) else req.top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
    )


async def _image_url(state: ServerState, part, budget: DecodeBudget):
    spec = part.body.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    return await load_image_url(url, state.cfg, part.where, budget)


async def _embeds(state: ServerState, part, budget: DecodeBudget) -> VisualRows:
    """An image_embeds part -> the rows it carries, checked as this engine's own would be."""
    fields = await anyio.to_thread.run_sync(decode_part, part.body, state.limits, part.where, budget)
    try:
        return state.pipe.family.rows_from_handoff(fields)
    except ValueError as exc:
        raise bad_request(f"{part.where}: {exc}", code="invalid_image_embeds") from exc


async def _images(state: ServerState, parts, budget: DecodeBudget) -> tuple[list, list[VisualRows | None]]:
    """Each image part -> a PIL image to encode, or (image_embeds) the rows it carries; one after
    another, each charged to the request's budget before it is decoded."""
    images, rows = [], []
    for part in parts:
        if part.kind == "image_url":
            images.append(await _image_url(state, part, budget))
            rows.append(None)
            state.metrics.images.labels(source="image_url").inc()
        else:
            rows.append(await _embeds(state, part, budget))
            images.append(None)
            state.metrics.images.labels(source="image_embeds").inc()
    return images, rows


async def _local_job(
    state: ServerState, body: dict, req: protocol.ChatCompletionRequest, rid: str, budget: DecodeBudget
) -> Job:
    pipe = state.pipe
    turn = user_turn(body["messages"], state.cfg.max_images, pipe.manifest.image_token)
    images, rows = await _images(state, turn.images, budget)
    text = conversation(pipe.manifest.prompt_template, pipe.manifest.image_token, turn.text, ["image"] * len(images))
    fixed = pipe.family.fixed_rows
    counts = [r.num_rows if r is not None else fixed for r in rows]
    if all(c is not None for c in counts):  # the prompt's length is known now: refuse it before any heavy work

        def check():
            with state.batcher.tokenizer_lock:
                length = int(pipe.assembler(text, counts).input_ids.numel())
            state.batcher.plan_tokens(length, req.requested_max_tokens)

        try:
            await anyio.to_thread.run_sync(check)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc
    return Job(
        id=rid,
        images=images,
        rows=rows,
        loop=asyncio.get_running_loop(),
        conversation=text,
        max_tokens=req.requested_max_tokens,
        sampling=_sampling(req),
        stream=req.stream,
        given=any(r is not None for r in rows),
    )


async def _next_event(state: ServerState, job: Job, t0: float):
    left = state.cfg.request_timeout_s - (time.perf_counter() - t0)
    try:
        return await asyncio.wait_for(job.events.get(), timeout=max(left, 0.001))
    except asyncio.TimeoutError as exc:
        job.cancelled.set()
        raise APIError(504, f"the request took longer than {state.cfg.request_timeout_s:g} s") from exc


async def _until_disconnect(request: Request, job: Job) -> None:
    """Wait for the client to hang up (its body is read: what comes now is the disconnect), then
    stop the job: the decoder drops it at its next step."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            return


async def _unless_gone(request: Request, work):
    """Await `work`, unless the client hangs up first: then it is cancelled (an upstream call
    closes its connection, which vLLM takes as an abort) and the request ends as 499."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(request.receive())  # the body is read: what comes now is the disconnect
    try:
        done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        if job in done:
            return job.result()
        if gone.result()["type"] != "http.disconnect":  # cannot happen after the body; wait it out
            return await job
        job.cancel()
        raise APIError(499, "the client went away; the upstream call was cancelled")
    finally:
        for task in (job, gone):
            if not task.done():
                task.cancel()


async def _wait(state: ServerState, job: Job, t0: float, request: Request | None = None) -> dict:
    watch = asyncio.ensure_future(_until_disconnect(request, job)) if request is not None else None
    try:
        while True:
            kind, value = await _next_event(state, job, t0)
            if kind == "done":
                return value
            if kind == "error":
                raise value
    finally:
        if watch is not None:
            watch.cancel()


def _usage(job: Job, result: dict) -> dict:
    return protocol.usage(
        result["prompt_tokens"],
        len(result["ids"]),
        sum(r.num_rows for r in job.rows),
        sum(r.num_patches for r in job.rows),
    )


def _record(state: ServerState, job: Job, result: dict, rid: str, t0: float) -> None:
    m, elapsed = state.metrics, time.perf_counter() - t0
    m.observe_stage("request", elapsed)
    m.visual_rows.labels(kind="kept").inc(sum(r.num_rows for r in job.rows))
    m.visual_rows.labels(kind="uncompressed").inc(sum(r.num_patches for r in job.rows))
    if "ids" in result:
        m.tokens.labels(kind="prompt").inc(result["prompt_tokens"])
        m.tokens.labels(kind="completion").inc(len(result["ids"]))
    t = job.timings
    log.info(
        "request %s -> 200 rows %s/%s%s in %.1f ms (vision %.1f ms, batch %s%s)",
        rid,
        sum(r.num_rows for r in job.rows),
        sum(r.num_patches for r in job.rows),
        f", {result['prompt_tokens']}+{len(result['ids'])} tokens" if "ids" in result else "",
        elapsed * 1e3,
        t.get("vision_ms", 0.0),
        t.get("vision_batch", 0),
        f"; decoder batch {t['decoder_batch']}" if "decoder_batch" in t else "",
    )


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _stream(state: ServerState, request: Request, job: Job, req: protocol.ChatCompletionRequest, t0: float):
    """Server-sent events: a role chunk, text deltas, the finish chunk, the usage chunk when asked,
    [DONE]. An error after the first byte is sent as an error event. A client that goes away stops
    its decoding (its row leaves the decoder batch at the next step)."""
    cid, created, model = f"chatcmpl-{job.id}", int(time.time()), state.model
    done = False
    try:
        yield _sse(protocol.chunk(cid, model, created, {"role": "assistant", "content": ""}))
        while True:
            try:
                kind, value = await _next_event(state, job, t0)
            except APIError as err:
                kind, value = "error", err
            if await request.is_disconnected():
                break
            if kind == "delta":
                yield _sse(protocol.chunk(cid, model, created, {"content": value}))
            elif kind == "done":
                yield _sse(protocol.chunk(cid, model, created, {}, value["finish_reason"]))
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _sse(protocol.chunk(cid, model, created, None, usage_=_usage(job, value)))
                yield b"data: [DONE]\n\n"
                done = True
                _count(state, 200)
                _record(state, job, value, job.id, t0)
                return
            else:
                _count(state, value.status, value)
                log.info("request %s -> %d (streaming) %s", job.id, value.status, value.message)
                yield _sse(value.body())
                yield b"data: [DONE]\n\n"
                done = True
                return
    finally:
        if not done:  # the client went away (or the response was cancelled): stop its decoding
            job.cancelled.set()
            _count(state, 499, APIError(499, "client closed the stream"))
            log.info("request %s -> client went away mid-stream", job.id)


async def _check_given_embeds(state: ServerState, parts, budget: DecodeBudget) -> None:
    """Upstream mode: the client's own image_embeds parts go on only if this engine's local mode
    would take them (decoded and checked the same way, within the same budget): vLLM documents
    --enable-mm-embeds for trusted clients only, and this server is what its clients talk to."""
    for part in parts:
        if part.kind == "image_embeds":
            await _embeds(state, part, budget)


async def _forward(
    state: ServerState,
    request: Request,
    body: dict,
    req: protocol.ChatCompletionRequest,
    slot: Slot,
    budget: DecodeBudget,
    rid: str,
    t0: float,
):
    """Upstream mode, by the family's route: the image_url parts encoded here (batched with other
    requests) and put in as image_embeds parts, or the whole prompt as embeddings
    (runtime/serve/prompt_embeds.py); then the request goes to the upstream."""
    if state.upstream.route == "prompt_embeds":
        return await _forward_prompt_embeds(state, request, body, req, slot, budget, rid, t0)
    cfg, pipe = state.cfg, state.pipe
    every = image_parts(body["messages"], cfg.max_images)
    messages = sorted({p.message for p in every})
    if len(messages) > 1:  # vLLM takes a request's images from one message (and so does the engine's format)
        raise bad_request(
            f"image parts in messages {messages}: the upstream takes the images of one message only; put them in "
            "one user message",
            param="messages",
            code="images_in_several_messages",
        )
    await _check_given_embeds(state, every, budget)
    parts = [p for p in every if p.kind == "image_url"]
    if parts:
        images = [await _image_url(state, part, budget) for part in parts]
        job = Job(id=rid, images=images, rows=[None] * len(images), loop=asyncio.get_running_loop(), slot=slot)
        del images
        state.batcher.submit(job)
        rows = (await _wait(state, job, t0, request))["rows"]
        dtype = _embeds_dtype(state)
        fmt = cfg.upstream_format
        fields = [handoff_fields(pipe.family, r, fmt) for r in rows]
        _check_vllm_batch(cfg, fields)

        def encode_all():
            return [encode_part(f, fmt, dtype) for f in fields]

        for part, new in zip(parts, await anyio.to_thread.run_sync(encode_all)):
            body["messages"][part.message]["content"][part.part] = new
        _record(state, job, {}, rid, t0)
    t1 = time.perf_counter()
    response = await _unless_gone(request, state.upstream.forward(body, rid, req.stream))
    state.metrics.observe_stage("upstream", time.perf_counter() - t1)
    _count(state, response.status_code)
    return response


def _check_vllm_batch(cfg: ServeConfig, fields: list[dict]) -> None:
    """vLLM 0.32 stacks a request's bare image_embeds tensors: rows of different counts (LLaVA-NeXT's
    images of different aspect ratios) fail in its engine core ("data contains inconsistent shapes")
    and take the engine down, so they are refused here (the dict form, split by grid, is not stacked)."""
    counts = sorted({int(f["image_embeds"].shape[0]) for f in fields if set(f) == {"image_embeds"}})
    if cfg.upstream_format == "vllm" and len(counts) > 1:
        raise bad_request(
            f"images of {counts} rows in one request: vLLM takes several images' embeddings in one request only "
            "when they have the same number of rows; send one image per request",
            param="messages",
            code="images_of_different_sizes",
        )


def _embeds_dtype(state: ServerState):
    return torch_dtype(state.cfg.embeds_dtype or str(state.pipe.manifest.llm.get("dtype") or "float32"))


async def _forward_prompt_embeds(
    state: ServerState,
    request: Request,
    body: dict,
    req: protocol.ChatCompletionRequest,
    slot: Slot,
    budget: DecodeBudget,
    rid: str,
    t0: float,
):
    """The prompt-embeds route (Video-LLaVA): media encoded here, the prompt assembled and embedded as
    local decoding does it, sent to the upstream's /v1/completions."""
    from .payload import tensor_to_base64
    from .prompt_embeds import completion_body, load_video_url, media_turn

    cfg, pipe = state.cfg, state.pipe
    tokens = [tok for tok, _ in pipe.assembler.fmt.tokens().values()]
    turn = media_turn(body["messages"], cfg.max_images, tokens)
    media, kinds = [], []
    for kind, url, where in turn.urls:
        if kind == "video":
            frames = int(pipe.family.frames_per_video)
            media.append(await anyio.to_thread.run_sync(load_video_url, url, cfg, frames, where))
        else:
            media.append(await load_image_url(url, cfg, where, budget))
        kinds.append(kind)
    job = Job(id=rid, images=media, rows=[None] * len(media), loop=asyncio.get_running_loop(), slot=slot)
    del media
    state.batcher.submit(job)
    rows = (await _wait(state, job, t0, request))["rows"]
    dtype = _embeds_dtype(state)

    def embed():
        with state.batcher.tokenizer_lock:
            prompt = pipe.assembler(turn.text, [r.num_rows for r in rows], kinds=kinds)
        n = state.batcher.plan_tokens(int(prompt.input_ids.numel()), req.requested_max_tokens)
        return tensor_to_base64(state.embedder(prompt, rows, dtype)), n

    try:
        embeds, max_tokens = await anyio.to_thread.run_sync(embed)
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    _record(state, job, {}, rid, t0)
    t1 = time.perf_counter()
    upstream_body = {**completion_body(body, embeds, await state.upstream.model_name()), "max_tokens": max_tokens}
    response = await _unless_gone(request, state.upstream.complete(upstream_body, rid, req.stream))
    state.metrics.observe_stage("upstream", time.perf_counter() - t1)
    _count(state, response.status_code)
    return response
