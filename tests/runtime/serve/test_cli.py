"""`apet serve` as a process: the startup line, serving, graceful shutdown on SIGTERM (the request in
flight finishes, then exit 0), and one-line errors."""

import json
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from PIL import Image

from apet_trt.scripts.cli import main
from helpers.engines import build_engine_dir
from helpers.servers import data_url, image_message

CMD = [sys.executable, "-m", "apet_trt.scripts.cli"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("cli") / "t12", keep=12)


def test_serve_process_starts_serves_and_shuts_down_gracefully(engine, rng):
    import numpy as np

    proc = subprocess.Popen([*CMD, "serve", "--engine", str(engine), "--port", "0"], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if "ready on http://" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120) and proc.poll() is None, "".join(lines)
        url = re.search(r"ready on (http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        startup = next(ln for ln in lines if "apet serve: model" in ln)
        assert (
            "N=36 -> T=12" in startup and "vision backend onnxruntime" in startup and "decoder transformers" in startup
        )
        image = np.asarray(torch_image(rng))
        body = {
            "model": "test-llava",
            "messages": image_message("Hi", data_url(image)),
            "max_tokens": 60,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
            it = resp.iter_lines()
            assert next(it).startswith("data: ")
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream still finishes
            rest = [ln for ln in it if ln]
        assert rest[-1] == "data: [DONE]"
        finish = json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"]
        assert finish in ("stop", "length")
        assert proc.wait(60) == 0
        assert any("shutting down" in ln for ln in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def torch_image(rng):
    import torch

    return torch.randint(0, 256, (90, 84, 3), generator=rng, dtype=torch.uint8).numpy()


def test_one_line_errors(tmp_path, capsys):
    assert main(["serve", "--engine", str(tmp_path / "none"), "--port", "0"]) == 2
    assert main(["encode", "--engine", str(tmp_path), "--image", "x.png", "--out", str(tmp_path / "o.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("apet serve: error:") and "does not exist" in err[0]
    assert err[-1].startswith("apet encode: error:") and ".json" in err[-1]


def test_config_is_checked(engine):
    from apet_trt.runtime.serve import ServeConfig

    for bad in (
        dict(max_queue=0),
        dict(upstream="ftp://x"),
        dict(upstream_format="sglang"),
        dict(port=70000),
        dict(allowed_local_media_path="/no/such/dir"),
        dict(batch_wait_ms=-1),
    ):
        with pytest.raises(ValueError):
            ServeConfig(engine=str(engine), **bad).validate()


def test_serving_doc_lists_every_serve_flag():
    """docs/SERVING.md's flag table names exactly the flags `apet serve` takes."""
    import argparse
    from pathlib import Path

    from apet_trt.runtime.serve.cli import register

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    serve = sub.choices["serve"]
    flags = {o for a in serve._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    doc = (Path(__file__).parents[3] / "docs" / "SERVING.md").read_text()
    table = [ln for ln in doc.splitlines() if ln.startswith("| `--")]
    documented = {f for ln in table for f in re.findall(r"`(--[a-z-]+)", ln.split("|")[1])}
    assert documented == flags


def test_the_vllm_plugin_format_is_refused_for_families_it_does_not_take(engine, tmp_path, capsys):
    """--upstream-format vllm-apet / --format vllm-apet is Qwen2.5-VL's route (docs/VLLM_PLUGIN.md): a
    LLaVA engine is refused at start-up, before any port opens, naming the format that fits."""
    image = tmp_path / "x.png"
    Image.new("RGB", (64, 48)).save(image)
    serve = ["serve", "--engine", str(engine), "--port", "0", "--upstream", "http://127.0.0.1:9"]
    assert main([*serve, "--upstream-format", "vllm-apet"]) == 2
    out = tmp_path / "x.json"
    assert (
        main(["encode", "--engine", str(engine), "--image", str(image), "--out", str(out), "--format", "vllm-apet"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("apet serve: error:") and "vllm-apet:" in err[0] and "use --upstream-format vllm" in err[0]
    assert err[-1].startswith("apet encode: error:") and "Qwen2.5-VL" in err[-1] and not out.exists()


def test_chat_template_out_follows_the_overlay_rules(engine, tmp_path, capsys):
    """`apet chat-template --out` writes a new file outside the engine directory; inside it, over an
    existing file without --force, or through a link it refuses in one line and writes nothing."""
    assert main(["chat-template", "--engine", str(engine)]) == 0
    printed = capsys.readouterr().out
    assert "{" in printed and "messages" in printed  # a Jinja template, on stdout

    out = tmp_path / "t.jinja"
    assert main(["chat-template", "--engine", str(engine), "--out", str(out)]) == 0
    assert out.read_text() == printed
    before = sorted(p.name for p in engine.iterdir())
    assert main(["chat-template", "--engine", str(engine), "--out", str(engine / "t.jinja")]) == 2
    assert sorted(p.name for p in engine.iterdir()) == before
    out.write_text("mine")
    assert main(["chat-template", "--engine", str(engine), "--out", str(out)]) == 2
    assert out.read_text() == "mine"
    link = tmp_path / "link.jinja"
    link.symlink_to(tmp_path / "elsewhere.jinja")
    assert main(["chat-template", "--engine", str(engine), "--out", str(link)]) == 2
    assert not (tmp_path / "elsewhere.jinja").exists()
    assert main(["chat-template", "--engine", str(engine), "--out", str(out), "--force"]) == 0
    assert out.read_text() == printed
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("apet chat-template: error:")]
    assert len(errors) == 3
