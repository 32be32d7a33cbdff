"""The batcher: requests that arrive together share one vision-engine call and, with the same
sampling settings, one decoder call.

Two worker threads, built on the runtime's own stages (runtime/pipeline.py) rather than copies:

    vision thread   takes the first waiting request, waits up to `batch_wait_ms` for more (up to
                    `max_batch` images), then `Pipeline.preprocess` + `family.encode` once for all
                    their images (the family splits into the engine's batch range) -> rows per image
    decoder thread  takes every request whose rows are ready (up to `max_batch`), `Pipeline.assemble`s
                    each, groups those with equal `SamplingConfig` (a seeded sampling request alone,
                    so its draw does not depend on its neighbours) and calls
                    `decoder.generate_streaming` once per group; each step's tokens go to the
                    streaming requests as text deltas, and the rows of requests whose client went
                    away or timed out are stopped

The two overlap (the next batch's vision runs while the current batch decodes). Requests whose
images all came as `image_embeds` skip the vision thread. In upstream mode the decoder thread is not
started: a request is done when its rows are. This object is the pipeline's only user while the
server runs (the stages are called without Pipeline's lock).

Admission is bounded and comes first: a request takes a `Slot` (`admit`) as soon as its headers are
in, before its body is read, and the next one past `max_queue` gets 503 at once. The slot is held by
the request's handler and, once submitted, by the job in the workers; it frees when both let go (a
request that timed out keeps its slot until the workers drop it).

The workers cannot die of a request: every exception fails the requests it concerns and the loop
goes on. A failed batch is retried one request at a time, so one bad request fails alone. What the
failure was decides the status: an image the family's preprocessing refuses (ValueError: too small
for T, an aspect it cannot take) or rows given as `image_embeds` the family cannot place are the
client's (400); the engine or decoder failing on good input is the server's (500, details in the
log, not in the answer).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..decoders import SamplingConfig
from ..families import VisualRows
from .errors import APIError, bad_request
from .metrics import Metrics

log = logging.getLogger("apet.serve")
_STOP = object()


@dataclass
class Job:
    """One request inside the batcher. Workers report through `post` (thread-safe) as events on
    `events`: ("delta", str) while streaming, then ("done", dict) or ("error", APIError)."""

    id: str
    images: list[Any]  # per image of the request: a PIL image to encode, or None where rows came given
    rows: list[VisualRows | None]  # given rows (image_embeds) or, once encoded, the engine's
    loop: asyncio.AbstractEventLoop
    slot: Slot | None = None  # the request's admission; the job holds a share of it while inside
    conversation: str | None = None  # None: vision only (upstream mode)
    max_tokens: int | None = None  # what the client asked for; None: the server's default
    sampling: dict = field(default_factory=dict)  # SamplingConfig fields except max_new_tokens
    stream: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    admitted: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    given: bool = False  # some rows came as image_embeds parts (the client's, not the engine's)
    streamed: bool = False  # a text delta went out (such a request cannot be decoded again)
    finished: bool = False

    @property
    def needs_vision(self) -> bool:
        return any(img is not None for img in self.images)

    def post(self, kind: str, value) -> None:
        if kind == "delta":
            self.streamed = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (the server stopped): nobody is waiting
            pass


class Slot:
    """One admitted request's place in the server; frees itself when every holder released it."""

    def __init__(self, free: Callable[[], None]):
        self._free, self._holders, self._lock = free, 1, threading.Lock()

    def share(self) -> None:
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._free()


class ClientFault(Exception):
    """A request the workers cannot serve through no fault of the server's (-> 400)."""


class Detokenizer:
    """Ids -> text deltas whose concatenation is the text of all ids: each step decodes the ids so
    far and sends what is new, holding back a tail that is an incomplete UTF-8 sequence (U+FFFD) or
    that changed what was already sent; `finish` sends the rest of the final text."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.sent = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final: str) -> str:
        if not final.startswith(self.sent):  # cannot happen with prefix-stable tokenizers; say so if it does
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent, final)
            return ""
        delta, self.sent = final[len(self.sent) :], final
        return delta


class Batcher:
    def __init__(
        self,
        pipe,
        *,
        max_batch: int,
        batch_wait_ms: float,
        max_queue: int,
        default_max_tokens: int,
        metrics: Metrics,
        decode: bool = True,
    ):
        self.pipe = pipe
        self.max_batch, self.wait_s = int(max_batch), float(batch_wait_ms) / 1e3
        self.max_queue, self.default_max_tokens = int(max_queue), int(default_max_tokens)
        self.metrics, self.decode = metrics, decode
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe to share between threads
        llm = pipe.manifest.llm
        eos = llm.get("eos_token_id")
        self.eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
        self._vision_q: queue.Queue = queue.Queue()
        self._decoder_q: queue.Queue = queue.Queue()
        self._inside = 0
        self._count_lock = threading.Lock()
        self._closing = False
        vision = self._guarded(self._vision_loop, "vision", [self._vision_q])
        self._threads = [threading.Thread(target=vision, name="apet-vision", daemon=True)]
        if decode:  # without a decoder, what vision hands on waits for nobody: both queues go
            decoder = self._guarded(self._decoder_loop, "decoder", [self._vision_q, self._decoder_q])
            self._threads.append(threading.Thread(target=decoder, name="apet-decoder", daemon=True))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        for t in self._threads:
            t.start()

    @property
    def alive(self) -> bool:
        """Ready to serve: started, not shutting down, every worker running."""
        return not self._closing and all(t.is_alive() for t in self._threads)

    @property
    def inside(self) -> int:
        return self._inside

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new requests, fail the queued ones (503), let the running batch finish, stop."""
        self._closing = True
        self._drain(APIError(503, "the server is shutting down"))
        self._vision_q.put(_STOP)
        for t in self._threads:
            if t.ident is not None:  # started
                t.join(timeout)

    # -- admission ----------------------------------------------------------------------------
    def admit(self) -> Slot:
        """A place for one request, taken before its body is read; 503 when there is none."""
        with self._count_lock:
            if self._closing:
                raise APIError(503, "the server is shutting down")
            if any(t.ident is not None and not t.is_alive() for t in self._threads):
                raise APIError(503, "the server is not ready")
            if self._inside >= self.max_queue:
                raise APIError(
                    503,
                    f"the server is at capacity ({self.max_queue} requests inside); retry shortly",
                    code="overloaded",
                )
            self._inside += 1
            self.metrics.queue_depth.set(self._inside)
        return Slot(self._free)

    def _free(self) -> None:
        with self._count_lock:
            self._inside -= 1
            self.metrics.queue_depth.set(self._inside)

    def submit(self, job: Job) -> None:
        """Hand an admitted request (job.slot) to the workers; they hold a share of its slot."""
        if self._closing:
            raise APIError(503, "the server is shutting down")
        if job.slot is not None:
            job.slot.share()
        (self._vision_q if job.needs_vision else self._decoder_q).put(job)

    def _finish(self, job: Job, kind: str, value) -> None:
        if job.finished:  # answered already (a failure path met a job twice)
            return
        job.finished = True
        if job.slot is not None:
            job.slot.release()
        job.post(kind, value)

    def _fail(self, job: Job, error: APIError) -> None:
        self._finish(job, "error", error)

    def _take(self, q: queue.Queue, count: Callable[[Job], int]) -> list[Job] | None:
        """The first job (blocking), then whatever else arrives within the wait, up to max_batch."""
        first = q.get()
        if first is _STOP:
            return None
        jobs, n = [first], count(first)
        deadline = time.perf_counter() + self.wait_s
        while n < self.max_batch:
            try:
                nxt = q.get(timeout=max(0.0, deadline - time.perf_counter())) if self.wait_s else q.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                q.put(_STOP)  # seen again after this batch
                break
            jobs.append(nxt)
            n += count(nxt)
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                self.metrics.cancelled.inc()
                self._fail(job, APIError(499, "the client went away"))
            else:
                live.append(job)
        return live

    def _guarded(self, loop: Callable[[], None], name: str, queues: list[queue.Queue]) -> Callable[[], None]:
        """A worker's loop that outlives its requests' failures; should it end anyway, what waits
        for it in `queues` is answered (503) rather than left waiting, admission refuses new
        requests and /health says not ready."""

        def run() -> None:
            try:
                loop()
            finally:
                if not self._closing:
                    log.critical("the %s worker stopped; the server is not ready", name)
                    self._drain(APIError(503, "the server is not ready"), queues)

        return run

    def _drain(self, error: APIError, queues: list[queue.Queue] | None = None) -> None:
        for q in queues or (self._vision_q, self._decoder_q):
            while True:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if job is not _STOP:
                    self._fail(job, error)

    def _fail_all(self, jobs: list[Job], exc: BaseException, stage: str) -> None:
        """The last resort of a loop: a failure outside the per-request handling (a bug) fails
        the requests in hand and the loop goes on."""
        log.error("%s worker: unexpected failure; failing %d request(s)", stage, len(jobs), exc_info=exc)
        for job in jobs:
            self._fail(job, APIError(500, f"the {stage} stage failed ({type(exc).__name__}); see the server log"))

    # -- vision -------------------------------------------------------------------------------
    def _vision_loop(self) -> None:
        while True:
            jobs = self._take(self._vision_q, lambda j: sum(img is not None for img in j.images))
            if jobs is None:
                if self.decode:
                    self._decoder_q.put(_STOP)
                return
            try:
                self._vision_batch(jobs)
            except Exception as exc:  # those already handed on are the decoder's
                self._fail_all([j for j in jobs if j.needs_vision], exc, "vision")

    def _vision_batch(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:
            self._encode(jobs)
        except Exception as exc:  # a batch that fails: each request alone, so one bad one fails alone
            if len(jobs) == 1:
                self._encode_failed(jobs[0], exc)
                return
            log.warning("vision batch of %d failed (%s); retrying one by one", len(jobs), type(exc).__name__)
            for job in jobs:
                if not job.needs_vision:  # encoded and handed on before the failure
                    continue
                try:
                    self._encode([job])
                except Exception as exc1:
                    self._encode_failed(job, exc1)

    def _encode_failed(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, ClientFault):
            log.info("request %s: its images were refused: %s", job.id, exc)
            self._fail(job, bad_request(str(exc), code="invalid_image"))
            return
        log.error("request %s: vision failed", job.id, exc_info=exc)
        self._fail(job, APIError(500, f"the vision engine failed ({type(exc).__name__}); see the server log"))

    def _encode(self, jobs: list[Job]) -> None:
        pipe, t0 = self.pipe, time.perf_counter()
        for job in jobs:
            self.metrics.observe_stage("queue", t0 - job.admitted)
        images = [img for job in jobs for img in job.images if img is not None]
        try:
            batch = pipe.preprocess(images)
        except (ValueError, TypeError) as exc:  # the family's checks on what the client sent
            raise ClientFault(str(exc)) from exc
        t1 = time.perf_counter()
        rows = pipe.family.encode(pipe.vision, batch)
        t2 = time.perf_counter()
        self.metrics.observe_stage("preprocess", t1 - t0)
        self.metrics.observe_stage("vision", t2 - t1)
        self.metrics.vision_batch.observe(len(images))
        it = iter(rows)
        for job in jobs:
            job.rows = [next(it) if img is not None else given for img, given in zip(job.images, job.rows)]
            job.images = [None] * len(job.images)  # the pixels are no longer needed
            job.timings.update(preprocess_ms=(t1 - t0) * 1e3, vision_ms=(t2 - t1) * 1e3, vision_batch=len(images))
            if self.decode:
                self._decoder_q.put(job)
            else:
                self._finish(job, "done", {"rows": job.rows})

    # -- decoding -----------------------------------------------------------------------------
    def plan_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        """New tokens for a prompt of `prompt_tokens`: the request's, or the default capped by the
        context left. A prompt that leaves no room, or a request for more than there is: 400."""
        room = int(self.pipe.decoder.max_length) - prompt_tokens
        n = requested if requested is not None else min(self.default_max_tokens, room)
        if n < 1 or n > room:
            raise bad_request(
                f"the prompt is {prompt_tokens} tokens with its visual rows"
                + (f" and max_tokens={requested} asks for {requested} more;" if requested is not None else ";")
                + f" this model's context is {self.pipe.decoder.max_length} tokens",
                param="max_tokens" if requested is not None else "messages",
                code="context_length_exceeded",
            )
        return n

    def _decoder_loop(self) -> None:
        while True:
            jobs = self._take(self._decoder_q, lambda j: 1)
            if jobs is None:
                return
            try:
                self._decode_batch(jobs)
            except Exception as exc:
                self._fail_all(jobs, exc, "decoder")

    def _prepare(self, job: Job):
        """(prompt, sampling) of one job, or None when it failed (answered here)."""
        try:
            with self.tokenizer_lock:
                prompt = self.pipe.assemble(job.conversation, job.rows)
            n = self.plan_tokens(int(prompt.input_ids.numel()), job.max_tokens)
            return prompt, SamplingConfig(max_new_tokens=n, **job.sampling)
        except APIError as err:
            self._fail(job, err)
        except ValueError as exc:
            self._fail(job, bad_request(str(exc)))
        except Exception as exc:
            if job.given:  # rows the client sent that this family cannot place (e.g. without their grid)
                log.info("request %s: its image_embeds cannot be used: %s: %s", job.id, type(exc).__name__, exc)
                self._fail(
                    job,
                    bad_request(
                        f"this model cannot use the image_embeds parts sent ({type(exc).__name__}: {exc}); "
                        "send the images as image_url parts",
                        code="invalid_image_embeds",
                    ),
                )
            else:
                log.error("request %s: its prompt could not be assembled", job.id, exc_info=exc)
                self._fail(job, APIError(500, f"the prompt could not be assembled ({type(exc).__name__})"))
        return None

    def _decode_batch(self, jobs: list[Job]) -> None:
        groups: dict[Any, list] = {}
        for job in jobs:
            prepared = self._prepare(job)
            if prepared is None:
                continue
            prompt, sampling = prepared
            alone = sampling.do_sample and sampling.seed is not None
            groups.setdefault(id(job) if alone else sampling, []).append((job, prompt, sampling))
        for group in groups.values():
            try:
                self._generate(group)
            except Exception as exc:  # a group that fails: each request alone, so one bad one fails alone
                if len(group) == 1:
                    self._decode_failed(group[0][0], exc)
                    continue
                log.warning("decoder batch of %d failed (%s); retrying one by one", len(group), type(exc).__name__)
                for item in group:
                    job = item[0]
                    if job.finished:
                        continue
                    if job.streamed:  # its client has part of an answer: it cannot start again
                        self._decode_failed(job, exc)
                        continue
                    try:
                        self._generate([item])
                    except Exception as exc1:
                        self._decode_failed(job, exc1)

    def _decode_failed(self, job: Job, exc: Exception) -> None:
        log.error("request %s: decoding failed", job.id, exc_info=exc)
        self._fail(job, APIError(500, f"the decoder failed ({type(exc).__name__}); see the server log"))

    def _text(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.pipe.tokenizer.decode(ids, skip_special_tokens=True)

    def _generate(self, group: list) -> None:
        jobs = [job for job, _, _ in group]
        prompts = [prompt for _, prompt, _ in group]
        sampling = group[0][2]
        streams = [Detokenizer(self._text) if job.stream else None for job in jobs]

        def on_step(tokens: list[int | None]):
            for job, detok, tok in zip(jobs, streams, tokens):
                if detok is not None and tok is not None and not job.cancelled.is_set():
                    delta = detok.push(tok)
                    if delta:
                        job.post("delta", delta)
            return [i for i, job in enumerate(jobs) if job.cancelled.is_set()]

        t0 = time.perf_counter()
        out = self.pipe.decoder.generate_streaming(
            prompts, [[r.embeddings for r in job.rows] for job in jobs], sampling, on_step
        )
        self.metrics.decoder_batch.observe(len(jobs))
        self.metrics.observe_stage("prefill", out.first_token_ms / 1e3)
        self.metrics.observe_stage("decode", out.decode_ms / 1e3)
        for job, prompt, detok, ids in zip(jobs, prompts, streams, out.ids):
            if job.cancelled.is_set():
                self.metrics.cancelled.inc()
                log.info("request %s: decoding stopped after %d tokens (client gone or timed out)", job.id, len(ids))
                self._fail(job, APIError(499, "the client went away"))
                continue
            text = self._text(ids)
            if detok is not None:
                rest = detok.finish(text)
                if rest:
                    job.post("delta", rest)
            finish = "stop" if ids and ids[-1] in self.eos else "length"
            job.timings.update(
                first_token_ms=out.first_token_ms,
                decode_ms=out.decode_ms,
                decoder_batch=len(jobs),
                generate_ms=(time.perf_counter() - t0) * 1e3,
            )
            self._finish(
                job,
                "done",
                {"text": text, "ids": ids, "finish_reason": finish, "prompt_tokens": int(prompt.input_ids.numel())},
            )
