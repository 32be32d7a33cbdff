"""Helpers (no tests here): a real vLLM OpenAI server (the CPU build scripts/setup_vllm.sh makes) on
127.0.0.1, bounded in start-up time, stopped with its process group when the block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

VENV = Path(os.environ.get("APET_VLLM_VENV", Path.home() / ".cache" / "apet-trt" / "vllm-venv"))


def vllm_python() -> str | None:
    """The vLLM venv's python, or None when scripts/setup_vllm.sh has not built it here."""
    python = VENV / "bin" / "python"
    if not python.is_file():
        return None
    ok = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=120).returncode == 0
    return str(python) if ok else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_vllm(model: Path, *args: str, log: Path, startup_timeout: float = 600.0):
    """-> the base URL of `python -m vllm.entrypoints.openai.api_server --model MODEL ARGS` (CPU:
    1 GiB of KV cache, no thread binding), once /v1/models answers."""
    python = vllm_python()
    if python is None:
        raise RuntimeError(f"no vLLM venv at {VENV} (bash scripts/setup_vllm.sh)")
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not start in {startup_timeout:.0f} s: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            time.sleep(2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
