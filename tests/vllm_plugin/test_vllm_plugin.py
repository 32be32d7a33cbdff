"""apet-trt's vLLM plugin against a real vLLM (one server with the plugin for this module, on 127.0.0.1):
Qwen2.5-VL's kept rows through `apet serve --upstream ... --upstream-format vllm-apet` reach vLLM with
their true M-RoPE ids, checked against an independent implementation, the Transformers decoder
(runtime/decoders/transformers.py: Transformers' own Qwen2.5-VL fed the rows and the uncompressed
prompt's ids gathered, runtime/families/qwen2_5_vl.py).

  apet rows   greedy ids through apet serve -> vLLM == the Transformers decoder's, for three images of
              different sizes and two images in one request, with --keep-ratio 0.3 and with --keep T;
              vLLM's prompt ids == the Transformers decoder's prompt ids (R placeholders per image)
  no ApET     the --no-apet engine through the plugin == vLLM's own grid path on the same rows
              (the plugin changes nothing where nothing was dropped) == the Transformers decoder
  grid        the same kept rows laid out on a grid (the route vLLM's own Qwen2.5-VL offers: R rows as
              a [1, 2, 2R] grid) answer differently on at least one image, in vLLM and in Transformers:
              the equality above would fail if the plugin put the rows on a grid
  refusals    a part missing a field, ids outside the grid, rows that do not add up: a 400 naming it

vLLM's own Qwen2.5-VL given this payload (no plugin): tests/vllm_plugin/test_vllm_without_plugin.py.
"""

from __future__ import annotations

import pytest
import torch

from apet_trt.export.build import BuildConfig, build
from apet_trt.runtime import load
from apet_trt.runtime.families import VisualRows
from apet_trt.runtime.serve import ServeConfig
from apet_trt.runtime.serve.payload import encode_part, handoff_fields
from helpers.servers import data_url, running_server
from helpers.vllm_plugin import (
    chat,
    grid_part,
    install_plugin,
    model_of,
    random_images,
    tiny_qwen_checkpoint,
    transformers_ids,
    vllm_ids,
    vllm_python,
    vllm_server,
)

pytestmark = pytest.mark.vllm

KEEP = 24
SIZES = [(300, 300), (420, 180), (160, 400)]  # (width, height): 121, 90, 84 rows uncompressed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen_checkpoint(tmp_path_factory.mktemp("qwen-vllm") / "checkpoint")


@pytest.fixture(scope="module")
def vllm(checkpoint):
    python = vllm_python()
    install_plugin(python)
    with vllm_server(python, checkpoint, plugin=True) as base:
        yield base


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-vllm-engines")
    options = {
        "full": dict(no_apet=True, max_batch=2),
        "keep": dict(keep=KEEP, basis=10),
        "ratio": dict(keep_ratio=0.3, basis=10),
    }
    for name, opts in options.items():
        build(BuildConfig(model=str(checkpoint), out=str(root / name), **opts), quiet=True)
    return {name: root / name for name in options}


@pytest.fixture(scope="module")
def pipes(engines):
    return {name: load(path, backend="onnxruntime", decoder="transformers") for name, path in engines.items()}


@pytest.fixture(scope="module")
def images():
    return random_images(SIZES, seed=24)


def compact_grid_rows(rows: VisualRows) -> VisualRows:
    """The rows as the grid route lays them out: R rows as a [1, 2, 2R] patch grid (one row of R merge
    blocks), for the Transformers decoder."""
    n = rows.num_rows
    return VisualRows(rows.embeddings, torch.arange(n), n, extras={"grid_thw": (1, 2, 2 * n)})


# -- the tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["ratio", "keep"])
def test_apet_rows_through_the_plugin_equal_the_transformers_decoder(vllm, engines, pipes, images, engine):
    pipe = pipes[engine]
    cfg = ServeConfig(engine=str(engines[engine]), upstream=vllm, upstream_format="vllm-apet")
    requests = [[im] for im in images] + [images[:2]]  # three sizes alone, then two images in one request
    with running_server(cfg) as (apet, _):
        for i, group in enumerate(requests):
            rows = pipe.encode(group)
            assert all(r.num_rows < r.num_patches for r in rows)
            text = f"Describe picture {i}."
            parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in group]
            got = vllm_ids(chat(apet, model_of(apet), parts, text), pipe)
            assert got == transformers_ids(pipe, rows, text), (engine, i, [im.size for im in group])


def test_no_apet_engine_through_the_plugin_equals_vllms_grid_path(vllm, engines, pipes, images):
    pipe = pipes["full"]
    model = model_of(vllm)
    cfg = ServeConfig(engine=str(engines["full"]), upstream=vllm, upstream_format="vllm-apet")
    with running_server(cfg) as (apet, _):
        for i, image in enumerate(images):
            [rows] = pipe.encode(image)
            text = f"What is in picture {i}?"
            part = {"type": "image_url", "image_url": {"url": data_url(image)}}
            through_plugin = vllm_ids(chat(apet, model_of(apet), [part], text), pipe)
            own = vllm_ids(chat(vllm, model, [grid_part(rows, rows.extras["grid_thw"])], text), pipe)
            assert through_plugin == own == transformers_ids(pipe, [rows], text), (i, image.size)


def test_the_grid_route_answers_differently_so_positions_are_checked(vllm, pipes, images):
    """On the same kept rows, a grid layout changes the greedy ids of at least one image (in vLLM and in
    Transformers alike), while the plugin's ids always give the Transformers decoder's answer."""
    pipe, model = pipes["ratio"], model_of(vllm)
    differs = []
    for i, image in enumerate(images):
        [rows] = pipe.encode(image)
        text = f"Describe picture {i}."
        exact = transformers_ids(pipe, [rows], text)
        on_grid = transformers_ids(pipe, [compact_grid_rows(rows)], text)
        assert vllm_ids(chat(vllm, model, [grid_part(rows, (1, 2, 2 * rows.num_rows))], text), pipe) == on_grid
        part = encode_part(handoff_fields(pipe.family, rows, "vllm-apet"), "vllm-apet")
        assert vllm_ids(chat(vllm, model, [part], text), pipe) == exact
        differs.append(exact[1] != on_grid[1])
    assert any(differs), "no image's answer depends on the positions: the equality tests could not catch a grid"


def test_malformed_apet_parts_are_refused_naming_the_field(vllm, pipes, images):
    pipe, model = pipes["keep"], model_of(vllm)
    [rows] = pipe.encode(images[0])
    fields = handoff_fields(pipe.family, rows, "vllm-apet")
    bad = {
        "apet_grid_thw": {k: v for k, v in fields.items() if k != "apet_grid_thw"},
        "outside the grid": {**fields, "apet_mrope_positions": fields["apet_mrope_positions"] + 100},
        "sum to": {**fields, "apet_num_rows": torch.tensor(rows.num_rows - 1)},
    }
    for needle, broken in bad.items():
        resp = chat(vllm, model, [encode_part(broken, "vllm-apet")], "hi")
        assert resp.status_code == 400 and needle in resp.json()["error"]["message"], (needle, resp.text)
    assert vllm_ids(chat(vllm, model, [encode_part(fields, "vllm-apet")], "hi"), pipe)  # the server still answers
