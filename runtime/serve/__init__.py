"""`apet serve`: an OpenAI-compatible front over an engine directory (FastAPI + uvicorn).

    app.py        the routes: /v1/chat/completions (JSON and SSE), /v1/models, /health, /metrics
    batching.py   concurrent requests -> one vision-engine call and one decoder call per group
    chat.py       messages -> the user's text and its images, the conversation text
    media.py      image_url parts -> images (data:, allowed local files, opt-in remote), bounded
    payload.py    rows <-> `image_embeds` content parts (vLLM's and trtllm-serve's formats), bounded
    upstream.py   --upstream: vision here, the rows as image_embeds parts to vLLM / trtllm-serve
    metrics.py    Prometheus metrics
    server.py     uvicorn on a bound socket, graceful shutdown; cli.py: `apet serve`, `apet encode`

It reads engine directories through the runtime (runtime.load) and nothing else.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
