"""The OpenAI chat-completions request as this server reads it, and the response shapes it writes
(https://platform.openai.com/docs/api-reference/chat). Fields the server cannot honour are refused
with a 400 naming them, never silently ignored; unknown extra fields are ignored as OpenAI's own API
and vLLM do."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import bad_request


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension; 0 or -1: off
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.n != 1:
            raise bad_request(f"n={self.n}: this server returns one choice per request (n=1)", param="n")
        if self.stop:
            raise bad_request("stop sequences are not supported by this server", param="stop")
        if self.logprobs:
            raise bad_request("logprobs are not supported by this server", param="logprobs")
        if self.tools:
            raise bad_request("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", param="stream_options")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def usage(prompt_tokens: int, completion_tokens: int, visual_rows: int, visual_rows_uncompressed: int) -> dict:
    """OpenAI's usage object; prompt_tokens counts the visual rows the LLM actually read (T per image
    with ApET), and the two extra fields say how many rows there were and would have been (N)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "visual_tokens": visual_rows,
        "visual_tokens_uncompressed": visual_rows_uncompressed,
    }


def completion(request_id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage_,
    }


def chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict | None,
    finish_reason: str | None = None,
    usage_: dict | None = None,
) -> dict:
    """One server-sent event of a streamed completion; delta None with usage: the final usage chunk
    (choices empty), as OpenAI sends it with stream_options.include_usage."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    out = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


FinishReason = Literal["stop", "length", "abort"]
