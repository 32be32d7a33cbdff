"""Helpers (no tests here) for the tests against a real vLLM with apet-trt's plugin (apet_trt.vllm_plugin):
find the vLLM venv (scripts/setup_vllm.sh), install this clone's apet-trt into it (the one place that
does), save a tiny Qwen2.5-VL or Qwen3-VL checkpoint vLLM loads, and run `vllm serve` on 127.0.0.1.

The vLLM venv lives outside the clone (~/.cache/apet-trt/vllm-venv, or $APET_VLLM_VENV); a machine
without it skips these tests with the command that builds it."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_VERSION = "0.32.0"
ARCHITECTURE = "ApetQwen2_5_VLForConditionalGeneration"  # apet_trt.vllm_plugin.ARCHITECTURE
QWEN3_VL_ARCHITECTURE = "ApetQwen3VLForConditionalGeneration"  # apet_trt.vllm_plugin.QWEN3_VL_ARCHITECTURE

# Qwen2.5-VL's conversation format (system turn, then each content part in order: an image as
# <|vision_start|><|image_pad|><|vision_end|>, text as written), what the real checkpoints carry.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'image_embeds') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vllm_python() -> Path:
    """The vLLM venv's python (helpers.vllm: $APET_VLLM_PYTHON, else scripts/setup_vllm.sh's venv; none:
    skip, or fail under CI=true), checked to be the pinned vLLM (VLLM_VERSION)."""
    from helpers.vllm import vllm_python as found

    python = Path(found())
    check = f"import vllm, sys; sys.exit(vllm.__version__ != {VLLM_VERSION!r})"
    if subprocess.run([str(python), "-c", check], capture_output=True).returncode != 0:
        reason = f"{python} is not vLLM {VLLM_VERSION}: rebuild it with `bash scripts/setup_vllm.sh`"
        pytest.fail(reason) if os.environ.get("CI") == "true" else pytest.skip(reason)
    return python


def install_plugin(python: Path) -> None:
    """This clone's apet-trt, editable and without dependencies, into the vLLM venv (its entry point
    `vllm.general_plugins` is what vLLM loads); a no-op when that venv already resolves the plugin here."""
    where = "import apet_trt.vllm_plugin as p; print(p.__file__)"
    done = subprocess.run([str(python), "-c", where], capture_output=True, text=True)
    if done.returncode == 0 and Path(done.stdout.strip()).resolve().is_relative_to(ROOT):
        return
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
        check=True,
        capture_output=True,
    )


def save_vllm_checkpoint(loaded, path: Path) -> Path:
    """A preset's model (export.presets.load_preset) as a checkpoint vLLM loads: the weights, the image
    processor, the tokenizer and Qwen2.5-VL's chat template (vLLM's Transformers builds the whole
    Qwen2.5-VL processor from these, its video processor from defaults)."""
    loaded.model.save_pretrained(str(path))
    loaded.processor.save_pretrained(str(path))
    loaded.tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    loaded.tokenizer.save_pretrained(str(path))
    (path / "chat_template.jinja").write_text(QWEN_CHAT_TEMPLATE)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(
    python: Path,
    checkpoint: Path,
    *,
    plugin: bool = True,
    architecture: str = ARCHITECTURE,
    limits: str = '{"image": 0, "video": 0}',  # rows arrive as embeddings only; no tower to profile
    startup_timeout: float = 600.0,
):
    """`vllm serve CHECKPOINT` (the OpenAI server) on 127.0.0.1 for precomputed image embeddings, with
    apet-trt's `architecture` (plugin=True) or vLLM's own (the checkpoint's), `limits` its
    --limit-mm-per-prompt; -> its base URL. Stopped at exit."""
    port = _free_port()
    cmd = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "4",
        "--enable-mm-embeds",
        "--limit-mm-per-prompt",
        limits,
        "--seed",
        "0",
    ]
    if plugin:
        cmd += ["--hf-overrides", f'{{"architectures": ["{architecture}"]}}']
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "2",
    }
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log", delete=False)
    # cwd outside the clone: an apet_trt.egg-info there would shadow the installed entry points
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tempfile.gettempdir(), start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{_tail(log.name)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not answer /health in {startup_timeout:g} s:\n{_tail(log.name)}")
            time.sleep(1.0)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(30)
        log.close()
        print(f"vLLM log: {log.name}", file=sys.stderr)


def _tail(path: str, lines: int = 60) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


# -- a tiny Qwen2.5-VL and the two sides of a comparison -------------------------------------------
MAX_TOKENS = 12
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def tiny_qwen_checkpoint(path: Path) -> Path:
    """The tiny-qwen2.5-vl preset (LLM head size 32, which vLLM's CPU attention takes), its language
    model's attention sharpened (q and k x 6: at random init attention is near uniform and positions
    would hardly change the greedy ids), saved as vLLM loads it."""
    import torch

    from apet_trt.export.presets import load_preset

    loaded = load_preset("tiny-qwen2.5-vl")
    with torch.no_grad():
        for layer in loaded.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return save_vllm_checkpoint(loaded, path)


def tiny_qwen3_checkpoint(path: Path) -> Path:
    """The tiny-qwen3-vl preset (LLM head size 32, 3 DeepStack levels), its language model's attention
    sharpened (Qwen3 normalises q and k per head, so the norms' weights x 2.5: logits x ~6), saved as
    vLLM loads it."""
    import torch

    from apet_trt.export.presets import load_preset

    loaded = load_preset("tiny-qwen3-vl")
    with torch.no_grad():
        for layer in loaded.model.model.language_model.layers:
            layer.self_attn.q_norm.weight.mul_(2.5)
            layer.self_attn.k_norm.weight.mul_(2.5)
    return save_vllm_checkpoint(loaded, path)


def random_images(sizes, seed: int) -> list:
    """RGB noise images of these (width, height) sizes."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in sizes]


def conversation(text: str, images: int) -> str:
    """The text QWEN_CHAT_TEMPLATE renders for one user turn of `images` images then `text`."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + QWEN_IMAGE * images
        + f"{text}<|im_end|>\n<|im_start|>assistant\n"
    )


def transformers_ids(pipe, rows: list, text: str) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids up to the first end of turn) of the pipeline's Transformers decoder fed
    `rows` (VisualRows) in one user turn, with the family's position ids (Qwen2.5-VL: the uncompressed
    prompt's ids gathered at the kept rows)."""
    from apet_trt.runtime.decoders import SamplingConfig

    prompt = pipe.assemble(conversation(text, len(rows)), rows)
    visual = [[rows[i].embeddings for i in prompt.items]]
    out = pipe.decoder.generate([prompt], visual, SamplingConfig(max_new_tokens=MAX_TOKENS))
    return prompt.input_ids.tolist(), _until_eos(list(out.ids[0]), pipe)


def _until_eos(ids: list[int], pipe) -> list[int]:
    eos = pipe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def chat(base: str, model: str, parts: list[dict], text: str) -> httpx.Response:
    """One greedy chat request of `parts` then `text` to an OpenAI-compatible server."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_token_ids": True,  # vLLM's extension: the prompt's and the answer's token ids
    }
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)


def vllm_ids(resp: httpx.Response, pipe) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids up to the first end of turn) of vLLM's answer."""
    assert resp.status_code == 200, resp.text
    data = resp.json()
    return data["prompt_token_ids"], _until_eos(data["choices"][0]["token_ids"], pipe)


def model_of(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]


def grid_part(rows, grid: tuple[int, int, int]) -> dict:
    """vLLM's own Qwen2.5-VL payload: the rows and a patch grid they fill."""
    import torch

    from apet_trt.runtime.serve.payload import encode_part

    return encode_part({"image_embeds": rows.embeddings, "image_grid_thw": torch.tensor(grid)}, "vllm")
