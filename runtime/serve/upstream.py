"""`--upstream URL`: the chat request goes on to an OpenAI-compatible server (vLLM, trtllm-serve, or
another `apet serve`) by the family's route (`RuntimeFamily.upstream_route`):
- "image_embeds": each `image_url` part replaced by the image's ApET rows as an `image_embeds` part,
  POSTed to its /v1/chat/completions; the answer (streamed or not) comes back as it is;
- "prompt_embeds": the whole prompt as embeddings to its /v1/completions (prompt_embeds.py); the
  answer comes back as a chat completion (or chat.completion.chunk events).
A stream is relayed chunk by chunk, a non-streamed answer (or an error) read up to
`max_upstream_response_bytes` (502 past it), never buffered without bound. The upstream's URL is
logged without its credentials and not shown to clients."""

from __future__ import annotations

import json
import logging

import httpx
from starlette.responses import Response, StreamingResponse

from .config import ServeConfig, redact_url
from .errors import APIError

log = logging.getLogger("apet.serve")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "content-encoding"}


class Upstream:
    def __init__(self, cfg: ServeConfig, route: str = "image_embeds"):
        self.route = route
        base = cfg.upstream.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.model = cfg.upstream_model
        self.shown = redact_url(self.base)  # for the log
        self.max_bytes = cfg.max_upstream_response_bytes
        headers = {"Authorization": f"Bearer {cfg.upstream_api_key}"} if cfg.upstream_api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base, headers=headers, timeout=httpx.Timeout(cfg.request_timeout_s, connect=10.0)
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def model_name(self) -> str:
        """The upstream's model: --upstream-model, else the first of its /v1/models (asked once)."""
        if self.model is None:
            try:
                resp = await self.client.get("/v1/models")
                resp.raise_for_status()
                self.model = resp.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                raise APIError(502, f"the upstream did not list its model ({type(exc).__name__})") from exc
        return self.model

    async def forward(self, body: dict, request_id: str, stream: bool) -> Response:
        """The chat request (image_embeds route) to the upstream's /v1/chat/completions, its answer as it is."""
        return await self._post("/v1/chat/completions", {**body, "model": await self.model_name()}, request_id, stream)

    async def complete(self, body: dict, request_id: str, stream: bool) -> Response:
        """A /v1/completions request (prompt_embeds route); its answer as a chat completion."""
        from .prompt_embeds import ChunkTranslator, chat_completion

        return await self._post("/v1/completions", body, request_id, stream, chat_completion, ChunkTranslator())

    async def _post(self, path: str, body: dict, request_id: str, stream: bool, answer=None, chunks=None) -> Response:
        """POST to the upstream; `answer` rewrites a 200 non-streamed body, `chunks` the events of a stream."""
        headers = {"X-Request-Id": request_id}
        try:
            req = self.client.build_request("POST", path, json=body, headers=headers)
            resp = await self.client.send(req, stream=True)
            if not stream or resp.status_code != 200:
                try:
                    content = await self._read_capped(resp)
                finally:
                    await resp.aclose()
                if answer is None or resp.status_code != 200:
                    return Response(content, status_code=resp.status_code, headers=_passed(resp.headers))
                try:
                    content = json.dumps(answer(json.loads(content))).encode()
                except (ValueError, AttributeError, TypeError) as exc:
                    raise APIError(502, f"the upstream answered {path} with no completion") from exc
                return Response(content, status_code=200, media_type="application/json")
        except httpx.HTTPError as exc:
            log.warning("request %s: the upstream %s failed: %s", request_id, self.shown, type(exc).__name__)
            raise APIError(502, f"the upstream failed ({type(exc).__name__})") from exc

        async def relay():
            try:
                async for chunk in resp.aiter_raw() if chunks is None else resp.aiter_bytes():
                    for out in chunks.feed(chunk) if chunks is not None else [chunk]:
                        yield out
            finally:  # also when our client goes away mid-stream: the upstream connection is let go
                await resp.aclose()

        passed = _passed(resp.headers)
        if chunks is not None:
            passed.pop("content-type", None)
            return StreamingResponse(relay(), status_code=200, headers=passed, media_type="text/event-stream")
        return StreamingResponse(relay(), status_code=200, headers=passed)

    async def _read_capped(self, resp: httpx.Response) -> bytes:
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():  # decoded: a gzip bomb counts as what it inflates to
            size += len(chunk)
            if size > self.max_bytes:
                raise APIError(502, f"the upstream's answer exceeds {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def _passed(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
