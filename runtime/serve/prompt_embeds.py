"""`apet serve --upstream` for families no OpenAI-compatible server registers (Video-LLaVA): the whole
prompt goes upstream as embeddings of the language model alone, to a vLLM serving that model (the
engine's saved LLaMA, `save_language_model`) with `--enable-prompt-embeds`.

Per chat request (one user message: text, image_url and video_url parts):
1. the media is encoded here (batched with other requests), images and videos as the engine takes them;
2. the prompt is assembled exactly as local decoding assembles it (`pipe.assembler`: the engine's
   prompt_template, each media token expanded to its rows, tokenized with the engine's tokenizer);
3. its ids are embedded with the checkpoint's own `embed_tokens` (read from the engine's hf/ once)
   and each item's rows are written at its slots: the [L, H] tensor the LLM reads locally;
4. it is `torch.save`d, base64-encoded and POSTed as `prompt_embeds` to the upstream's
   /v1/completions (vLLM renders no chat template there), with the request's sampling fields;
5. the completion (or its stream) comes back as a chat completion (or chat.completion.chunk events).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

from ..families import VisualRows
from .config import ServeConfig
from .errors import bad_request
from .media import data_url_bytes

# the chat request's fields that mean the same on /v1/completions (others are not forwarded)
SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "stream",
    "stream_options",
    "user",
    "return_token_ids",
)


@dataclass
class MediaTurn:
    """One user turn of the prompt-embeds route: its text and its media in order."""

    text: str
    urls: list[tuple[str, str, str]] = field(default_factory=list)  # (kind "image" | "video", url, where)


def media_turn(messages: list[dict], max_items: int, media_tokens: list[str]) -> MediaTurn:
    """The request's one user message -> text parts (joined with "\\n") and its image_url / video_url parts."""
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        raise bad_request(
            f"messages with roles {roles}: this engine's conversation format holds one user turn; send one message "
            "with role 'user'",
            param="messages",
        )
    content = messages[0].get("content")
    texts, urls = [], []
    for p, part in enumerate([{"type": "text", "text": content}] if isinstance(content, str) else content or []):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages[0].content[{p}]"
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            spec = part.get(kind)
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise bad_request(f"{where}: {kind} needs a url string")
            urls.append((kind[:5], url, where))
        else:
            raise bad_request(
                f"{where}: content part type {kind!r} is not supported on this route (text, image_url, video_url)",
                param="messages[0].content",
            )
    if len(urls) > max_items:
        raise bad_request(f"{len(urls)} media items; this server takes at most {max_items}", code="too_many_images")
    if not urls:
        raise bad_request("this engine answers about images and videos: send an image_url or video_url part")
    text = "\n".join(texts)
    if any(tok in text for tok in media_tokens):
        raise bad_request(f"the text contains a media token ({', '.join(media_tokens)}); send media as parts")
    return MediaTurn(text, urls)


def load_video_url(url: str, cfg: ServeConfig, num_frames: int, where: str):
    """A video_url (base64 data: URL, or file:// under --allowed-local-media-path) -> runtime.videos.Video."""
    from ..videos import read_video

    if url.startswith("data:"):
        raw = data_url_bytes(url, cfg, where, kind="video", limit="media")
        with tempfile.NamedTemporaryFile(suffix=".video") as f:
            f.write(raw)
            f.flush()
            return _read(read_video, f.name, num_frames, where)
    if url.startswith("file://"):
        if cfg.allowed_local_media_path is None:
            raise bad_request(
                f"{where}: local files are not accepted (the server runs without --allowed-local-media-path)"
            )
        parsed = urlparse(url)
        root = Path(cfg.allowed_local_media_path).resolve()
        path = Path(unquote(parsed.netloc + parsed.path)).resolve()
        if root not in path.parents or not path.is_file():
            raise bad_request(f"{where}: {path} is not a file under the allowed directory {root}")
        return _read(read_video, str(path), num_frames, where)
    raise bad_request(f"{where}: video URLs must be data: or file:// URLs")


def _read(read_video, path: str, num_frames: int, where: str):
    try:
        return read_video(path, num_frames)
    except (ValueError, OSError) as exc:
        raise bad_request(f"{where}: {' '.join(str(exc).split())[:300]}") from exc


class PromptEmbedder:
    """The language model's input embedding table (the engine checkpoint's `embed_tokens`), and the
    prompt's [L, H] embeddings with each media item's rows at its slots."""

    def __init__(self, manifest):
        from safetensors import safe_open

        checkpoint = manifest.transformers_checkpoint()
        found = []
        for shard in sorted(Path(checkpoint).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                found += [(shard, k) for k in f.keys() if k.endswith("embed_tokens.weight")]  # noqa: SIM118
        if len(found) != 1:
            raise ValueError(
                f"{checkpoint}: expected one language-model embed_tokens.weight among the safetensors, found "
                f"{[k for _, k in found]}"
            )
        with safe_open(str(found[0][0]), framework="pt") as f:
            self.table = f.get_tensor(found[0][1])
        hidden = int(manifest.llm["hidden_size"])
        if self.table.dim() != 2 or self.table.shape[1] != hidden:
            raise ValueError(f"{checkpoint}: embed_tokens is {list(self.table.shape)}, the LLM's hidden size {hidden}")

    def __call__(self, prompt, rows: list[VisualRows], dtype: torch.dtype) -> torch.Tensor:
        """`prompt`: the AssembledPrompt of `rows` (its `items` say which item each run of slots reads)."""
        embeds = self.table[prompt.input_ids].to(torch.float32)
        ordered = torch.cat([rows[i].embeddings.to(torch.float32) for i in prompt.items])
        embeds[prompt.image_slots] = ordered
        return embeds.to(dtype)


def completion_body(body: dict, embeds_b64: str, model: str) -> dict:
    """The /v1/completions request for a chat request's sampling fields and the prompt's embeddings."""
    out = {k: body[k] for k in SAMPLING_FIELDS if k in body}
    if "max_tokens" not in out and body.get("max_completion_tokens") is not None:
        out["max_tokens"] = body["max_completion_tokens"]
    return {**out, "model": model, "prompt_embeds": embeds_b64}


def chat_completion(completion: dict) -> dict:
    """A /v1/completions answer -> the chat.completion it answers (vLLM's extra fields kept)."""
    choices = []
    for c in completion.get("choices", []):
        extra = {k: v for k, v in c.items() if k not in ("index", "text", "finish_reason", "logprobs")}
        choices.append(
            {
                "index": c.get("index", 0),
                "message": {"role": "assistant", "content": c.get("text", "")},
                "finish_reason": c.get("finish_reason"),
                "logprobs": None,
                **extra,
            }
        )
    rid = str(completion.get("id", "")).removeprefix("cmpl-")
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": completion.get("created", int(time.time())),
        "model": completion.get("model"),
        "choices": choices,
        "usage": completion.get("usage"),
    }


class ChunkTranslator:
    """Server-sent events of /v1/completions -> those of /v1/chat/completions: a role chunk first
    (per choice), then each text chunk as a content delta; usage chunks, error events and [DONE] as they come."""

    def __init__(self):
        self.buffer = b""
        self.started: set[int] = set()

    def feed(self, raw: bytes) -> list[bytes]:
        self.buffer += raw
        out = []
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            out += self._event(event)
        return out

    def _event(self, event: bytes) -> list[bytes]:
        line = event.strip()
        if not line.startswith(b"data:"):
            return [event + b"\n\n"] if line else []
        data = line[5:].strip()
        if data == b"[DONE]":
            return [b"data: [DONE]\n\n"]
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            return [event + b"\n\n"]
        if "error" in obj or obj.get("object") != "text_completion":
            return [event + b"\n\n"]
        base = {
            "id": f"chatcmpl-{str(obj.get('id', '')).removeprefix('cmpl-')}",
            "object": "chat.completion.chunk",
            "created": obj.get("created", int(time.time())),
            "model": obj.get("model"),
        }
        out = []
        for c in obj.get("choices", []):
            index = c.get("index", 0)
            extra = {k: v for k, v in c.items() if k not in ("index", "text", "finish_reason", "logprobs")}
            if index not in self.started:
                self.started.add(index)
                role = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                out.append(_sse({**base, "choices": [role]}))
            delta = {"content": c.get("text", "")} if c.get("text") else {}
            choice = {"index": index, "delta": delta, "finish_reason": c.get("finish_reason"), **extra}
            out.append(_sse({**base, "choices": [choice]}))
        if obj.get("usage") is not None and not obj.get("choices"):
            out.append(_sse({**base, "choices": [], "usage": obj["usage"]}))
        elif obj.get("usage") is not None and out:
            out[-1] = _sse({**base, "choices": json.loads(out[-1][6:])["choices"], "usage": obj["usage"]})
        return out


def _sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
