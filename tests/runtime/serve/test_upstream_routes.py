"""`apet serve --upstream` routes without a vLLM (the real-vLLM tests are tests/upstream/): the chat
template `apet chat-template` writes renders what the engine's runtime tokenizes (rendered as
Transformers / vLLM render chat templates), each family's route or its one-line refusal, Qwen2.5-VL's
grid payload, and the completions -> chat translation of the prompt-embeds route."""

import json
import subprocess
import sys

import pytest
import torch

from apet_trt.runtime.prompt import conversation
from apet_trt.runtime.serve.chat_template import engine_chat_template, render_template
from apet_trt.runtime.serve.prompt_embeds import ChunkTranslator, chat_completion, completion_body
from helpers.engines import build_engine_dir


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("routes") / "llava", keep=12)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from apet_trt.export.build import BuildConfig, build

    out = tmp_path_factory.mktemp("routes") / "qwen"
    build(BuildConfig(model="tiny-qwen2.5-vl", out=str(out), keep=16), quiet=True)
    return out


def _parts(images: int, texts: list[str]) -> list[dict]:
    return [{"type": "image"}] * images + [{"type": "text", "text": t} for t in texts]


@pytest.mark.parametrize("engine_name", ["llava", "qwen"])
def test_chat_template_renders_the_engines_prompt_token_for_token(engine_name, request):
    """Rendered (Transformers' apply_chat_template, the sandboxed Jinja vLLM uses too) and tokenized
    without special tokens, as vLLM's chat path does = the runtime's conversation tokenized with them."""
    from transformers import AutoTokenizer

    from apet_trt.runtime.manifest import load_manifest

    engine = request.getfixturevalue(engine_name)
    m = load_manifest(engine)
    tok = AutoTokenizer.from_pretrained(str(m.tokenizer_dir))
    template = engine_chat_template(str(engine))
    for images, texts in [(1, ["What is in the picture?"]), (2, ["a", "b c"]), (3, [" spaced  text "]), (1, [])]:
        messages = [{"role": "user", "content": _parts(images, texts)}]
        rendered = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
        local = conversation(m.prompt_template, m.image_token, "\n".join(texts), ["image"] * images)
        assert tok(rendered, add_special_tokens=False)["input_ids"] == tok(local)["input_ids"]
    with pytest.raises(Exception, match="one user message"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, *messages], chat_template=template, tokenize=False)


def test_render_template_needs_the_image_slot_before_the_prompt():
    assert "USER: " in render_template("USER: <image>\n{prompt} ASSISTANT:", "<image>", "<s>")
    for bad in ("USER: {prompt} <image>", "USER: {prompt}", "<image><image>{prompt}"):
        with pytest.raises(ValueError, match="prompt_template"):
            render_template(bad, "<image>")


def _serve_refusal(engine, *flags) -> list[str]:
    cmd = [sys.executable, "-m", "apet_trt.scripts.cli", "serve", "--engine", str(engine), "--port", "0"]
    r = subprocess.run([*cmd, "--upstream", "http://127.0.0.1:9", *flags], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    return [line for line in r.stderr.splitlines() if line.startswith("apet serve: error")]


def test_qwen_upstream_without_the_opt_in_is_refused_in_one_line_naming_the_exact_route(qwen):
    [line] = _serve_refusal(qwen)
    assert "the apet-trt vLLM plugin (docs/VLLM_PLUGIN.md)" in line and "--upstream-grid-positions" in line
    assert _serve_refusal(qwen, "--upstream-format", "trtllm") == [line]  # trtllm-serve infers a grid too


def test_llava_upstream_in_trtllm_format_is_refused_in_one_line(llava):
    [line] = _serve_refusal(llava, "--upstream-format", "trtllm")
    assert "no LLaVA-1.5 model" in line


def test_qwen_grid_payload_holds_exactly_the_rows_sent(qwen, rng):
    from apet_trt.runtime import load
    from apet_trt.runtime.families import VisualRows

    family = load(qwen, backend="onnxruntime").family
    assert family.upstream_route("vllm", grid_positions=True) == "image_embeds"
    assert family.upstream_route("vllm-apet") == "image_embeds"  # the plugin: exact, no opt-in
    counts = [1, 2, 7, 16, 64, 97, 256, *torch.randint(1, 2000, (20,), generator=rng).tolist()]
    for r in counts:
        rows = VisualRows(torch.randn(r, 64, generator=rng), torch.arange(r), 4 * r, extras={"grid_thw": (1, 8, 8)})
        fields = family.handoff_fields(rows)
        grid = fields["image_grid_thw"]
        assert grid.dim() == 1 and grid.shape == (3,) and int(grid[0]) == 1
        assert int(grid.prod()) // family.merge**2 == r and int(grid[1]) % family.merge == 0
        assert set(family.handoff_fields(rows, "trtllm")) == {"image_embeds"}
        with pytest.raises(ValueError, match="no M-RoPE positions of their own"):  # the local decoder guesses none
            family.rows_from_handoff(fields)


def test_completions_answer_becomes_a_chat_completion():
    body = {"messages": [], "max_completion_tokens": 5, "temperature": 0, "tools": [], "stream": True}
    req = completion_body(body, "B64", "lm")
    assert req == {"temperature": 0, "stream": True, "max_tokens": 5, "model": "lm", "prompt_embeds": "B64"}
    done = {
        "id": "cmpl-7",
        "object": "text_completion",
        "created": 3,
        "model": "lm",
        "choices": [{"index": 0, "text": "hi", "finish_reason": "length", "logprobs": None, "token_ids": [1]}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
    chat = chat_completion(done)
    assert chat["object"] == "chat.completion" and chat["id"] == "chatcmpl-7"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert chat["choices"][0]["token_ids"] == [1] and chat["usage"] == done["usage"]


def test_completion_chunks_become_chat_chunks_however_the_bytes_are_split(rng):
    events = [
        {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "lm", "choices": [c]}
        for c in (
            {"index": 0, "text": "he", "finish_reason": None},
            {"index": 0, "text": "llo", "finish_reason": None},
            {"index": 0, "text": "", "finish_reason": "length"},
        )
    ]
    usage = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "lm", "choices": [], "usage": {"x": 1}}
    raw = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in [*events, usage]) + b"data: [DONE]\n\n"
    cuts = sorted(torch.randint(1, len(raw), (6,), generator=rng).tolist())
    translator, out = ChunkTranslator(), []
    for a, b in zip([0, *cuts], [*cuts, len(raw)]):
        out += translator.feed(raw[a:b])
    assert out[-1] == b"data: [DONE]\n\n"
    chunks = [json.loads(e[6:]) for e in out[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == {"x": 1}
