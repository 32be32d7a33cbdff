"""vLLM's own Qwen2.5-VL (no architecture override: what a server without apet-trt's plugin runs), one
server for this module on 127.0.0.1:

  refusal   the plugin's payload (`--upstream-format vllm-apet`, `apet encode --format vllm-apet`) is
            refused with a 400 naming the fields it found, directly and through `apet serve --upstream`:
            never read with grid positions
  own path  vLLM's own grid path on the --no-apet engine's rows == the Transformers decoder; the plugin
            gives the Transformers decoder's answer on the same rows (test_vllm_plugin.py), so the
            plugin equals vLLM's own model where nothing was dropped
"""

from __future__ import annotations

import pytest

from apet_trt.export.build import BuildConfig, build
from apet_trt.runtime import load
from apet_trt.runtime.serve import ServeConfig
from apet_trt.runtime.serve.payload import encode_part, handoff_fields
from helpers.servers import data_url, running_server
from helpers.vllm_plugin import (
    chat,
    grid_part,
    model_of,
    random_images,
    tiny_qwen_checkpoint,
    transformers_ids,
    vllm_ids,
    vllm_python,
    vllm_server,
)

pytestmark = pytest.mark.vllm

SIZES = [(300, 300), (160, 400)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-vllm-stock")
    checkpoint = tiny_qwen_checkpoint(root / "checkpoint")
    engines = {"full": root / "full", "ratio": root / "ratio"}
    build(BuildConfig(model=str(checkpoint), out=str(engines["full"]), no_apet=True, max_batch=2), quiet=True)
    build(BuildConfig(model=str(checkpoint), out=str(engines["ratio"]), keep_ratio=0.3, basis=10), quiet=True)
    pipes = {name: load(path, backend="onnxruntime", decoder="transformers") for name, path in engines.items()}
    python = vllm_python()
    with vllm_server(python, checkpoint, plugin=False) as base:
        yield base, engines, pipes


def test_vllm_without_the_plugin_refuses_the_payload_naming_its_fields(setup):
    base, engines, pipes = setup
    [image] = random_images(SIZES[:1], seed=7)
    [rows] = pipes["ratio"].encode(image)
    part = encode_part(handoff_fields(pipes["ratio"].family, rows, "vllm-apet"), "vllm-apet")
    resp = chat(base, model_of(base), [part], "hi")
    message = resp.json()["error"]["message"]
    assert resp.status_code == 400 and "image_grid_thw" in message and "apet_mrope_positions" in message, resp.text
    cfg = ServeConfig(engine=str(engines["ratio"]), upstream=base, upstream_format="vllm-apet")
    with running_server(cfg) as (apet, _):
        resp = chat(apet, model_of(apet), [{"type": "image_url", "image_url": {"url": data_url(image)}}], "hi")
    assert resp.status_code == 400 and "apet_mrope_positions" in resp.json()["error"]["message"], resp.text


def test_vllms_own_grid_path_equals_the_transformers_decoder_where_nothing_was_dropped(setup):
    base, _, pipes = setup
    pipe, model = pipes["full"], model_of(base)
    for i, image in enumerate(random_images(SIZES, seed=24)):
        [rows] = pipe.encode(image)
        text = f"What is in picture {i}?"
        got = vllm_ids(chat(base, model, [grid_part(rows, rows.extras["grid_thw"])], text), pipe)
        assert got == transformers_ids(pipe, [rows], text), (i, image.size)
