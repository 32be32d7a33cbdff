"""Helpers (no tests here): a real vLLM (the CPU build scripts/setup_vllm.sh makes) as a subprocess
on 127.0.0.1, for the upstream-handoff tests (marker `vllm`).

Which vLLM: $APET_VLLM_PYTHON (the venv's python, as .ci/run passes it), else the default venv of
scripts/setup_vllm.sh (~/.cache/apet-trt/vllm-venv). None there: the tests skip with the reason, or
fail under CI=true (CI must run them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

DEFAULT_VENV = Path.home() / ".cache" / "apet-trt" / "vllm-venv"
STARTUP_TIMEOUT_S = 420.0  # a tiny model on 2 CPU cores takes about a minute


def vllm_python() -> str:
    """The vLLM venv's python, or skip (locally) / fail (CI=true) saying why there is none."""
    given = os.environ.get("APET_VLLM_PYTHON")
    python = Path(given) if given else DEFAULT_VENV / "bin" / "python"
    reason = None
    if not python.is_file():
        reason = f"no vLLM: {python} does not exist (bash scripts/setup_vllm.sh builds it; or set APET_VLLM_PYTHON)"
    else:
        probe = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
        if probe.returncode != 0:
            reason = f"no vLLM: {python} cannot import vllm ({probe.stderr.strip().splitlines()[-1:]})"
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI runs the vLLM tests: {reason}")
        pytest.skip(reason)
    return str(python)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_vllm(model: str | Path, *args: str, max_model_len: int = 2048):
    """`python -m vllm.entrypoints.openai.api_server --model MODEL ARGS` on 127.0.0.1 (float32, a
    1 GiB KV cache), until its /health answers; yields its base URL; stopped (SIGTERM, then SIGKILL)
    when the block ends. A server that exits or does not come up in time fails with its log's tail."""
    python, port = vllm_python(), _free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log", delete=False)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len), *args,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({proc.returncode}) while starting:\n{_tail(log.name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not answer /health within {STARTUP_TIMEOUT_S:g} s:\n{_tail(log.name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(1.0)
        yield url, proc
    finally:
        _stop(proc)
        log.close()
        os.unlink(log.name)


def alive(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/health", timeout=5).status_code == 200
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the engine-core process goes too
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _tail(path: str, lines: int = 40) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def same_text(local: str, upstream: str) -> bool:
    """The same generated text, allowing for one difference in detokenization: vLLM's incremental
    detokenizer (tokenizers' DecodeStream) never emits bytes that do not yet form a whole UTF-8
    character, where the Transformers decode of the same ids writes U+FFFD for each. A random-weight
    model's answer can end in such bytes; its token ids are compared exactly besides."""
    return local == upstream or (local.startswith(upstream) and set(local[len(upstream) :]) == {"\ufffd"})


@contextlib.contextmanager
def upstream_stack(engine: Path, model_dir: Path, vllm_args: list[str], serve: dict | None = None, **kw):
    """A real vLLM serving `model_dir` and `apet serve --engine ENGINE --upstream` in front of it:
    yields (front URL, the front's state, vLLM's URL)."""
    from apet_trt.runtime.serve import ServeConfig
    from helpers.servers import running_server

    with running_vllm(model_dir, *vllm_args, **kw) as (vllm_url, _):
        cfg = ServeConfig(engine=str(engine), upstream=vllm_url, backend="onnxruntime", **(serve or {}))
        with running_server(cfg) as (url, state):
            yield url, state, vllm_url


def chat_template_file(engine: Path, out: Path) -> Path:
    """`apet chat-template --engine ENGINE --out OUT`, through the CLI as a user runs it."""
    from apet_trt.scripts.cli import main

    assert main(["chat-template", "--engine", str(engine), "--out", str(out)]) == 0
    return out


def client(url: str):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def ask(c, model: str, messages: list[dict], max_tokens: int = 16, **kw):
    """A greedy chat completion, with vLLM's token ids (prompt and generated) in the answer."""
    return c.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"return_token_ids": True},
        **kw,
    )


def streamed(c, model: str, messages: list[dict], max_tokens: int = 16) -> tuple[str, object]:
    """The streamed answer's text (deltas joined) and its usage chunk."""
    events = c.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = [], None
    for ev in events:
        if ev.choices:
            text.append(ev.choices[0].delta.content or "")
        if ev.usage is not None:
            usage = ev.usage
    return "".join(text), usage


def hang_up_mid_stream(url: str, model: str, messages: list[dict]) -> bytes:
    """Start a long streamed answer, read its first bytes, and close the connection."""
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=120) as h, h.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_raw():
            return chunk
    return b""
