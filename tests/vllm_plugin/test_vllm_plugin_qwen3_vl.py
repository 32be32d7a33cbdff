"""apet-trt's vLLM plugin for Qwen3-VL against a real vLLM (one server with the plugin's
ApetQwen3VLForConditionalGeneration for this module, on 127.0.0.1): the kept rows [R, H * (1 + 3
DeepStack levels)] through `apet serve --upstream ... --upstream-format vllm-apet` reach vLLM with their
true M-RoPE ids and their own DeepStack levels, checked against an independent implementation, the
Transformers DeepStack decoder (runtime/families/qwen3_vl.py: Transformers' own Qwen3-VL fed the rows,
the levels at the image slots and the uncompressed prompt's ids gathered).

  apet rows   greedy ids through apet serve -> vLLM == the DeepStack decoder's, two image sizes, with
              --keep-ratio 0.3; vLLM's prompt ids == the decoder's (R placeholders per image)
  no ApET     the --no-apet engine through the plugin == vLLM's own grid path on the same rows
              == the DeepStack decoder
  grid        the same kept rows on a grid (vLLM's own route: R rows as a [1, 2, 2R] grid) answer
              differently on at least one image, in vLLM and in Transformers alike, while the plugin's
              part answers as the decoder with the gathered ids: the equality above would fail if the
              plugin put the rows on a grid; the levels zeroed, both sides change alike
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
    QWEN3_VL_ARCHITECTURE,
    chat,
    grid_part,
    install_plugin,
    model_of,
    random_images,
    tiny_qwen3_checkpoint,
    transformers_ids,
    vllm_ids,
    vllm_python,
    vllm_server,
)

pytestmark = pytest.mark.vllm

SIZES = [(300, 300), (420, 180)]  # (width, height)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("qwen3-vllm") / "checkpoint")


@pytest.fixture(scope="module")
def vllm(checkpoint):
    python = vllm_python()
    install_plugin(python)
    # vLLM 0.32 runs Qwen3-VL's DeepStack only with the vision tower loaded: one image allowed
    limits = '{"image": 1, "video": 0}'
    with vllm_server(python, checkpoint, plugin=True, architecture=QWEN3_VL_ARCHITECTURE, limits=limits) as base:
        yield base


@pytest.fixture(scope="module")
def engines(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3-vllm-engines")
    options = {"full": dict(no_apet=True), "ratio": dict(keep_ratio=0.3, basis=10)}
    for name, opts in options.items():
        build(BuildConfig(model=str(checkpoint), out=str(root / name), **opts), quiet=True)
    return {name: root / name for name in options}


@pytest.fixture(scope="module")
def pipes(engines):
    return {name: load(path, backend="onnxruntime", decoder="transformers") for name, path in engines.items()}


@pytest.fixture(scope="module")
def images():
    return random_images(SIZES, seed=26)


def on_grid(rows: VisualRows, embeddings: torch.Tensor | None = None) -> VisualRows:
    """The rows as vLLM's own route lays them out: R rows as a [1, 2, 2R] patch grid."""
    n = rows.num_rows
    emb = rows.embeddings if embeddings is None else embeddings
    return VisualRows(emb, torch.arange(n), n, extras={"grid_thw": (1, 2, 2 * n)})


def test_apet_rows_through_the_plugin_equal_the_deepstack_decoder(vllm, engines, pipes, images):
    pipe = pipes["ratio"]
    cfg = ServeConfig(engine=str(engines["ratio"]), upstream=vllm, upstream_format="vllm-apet")
    with running_server(cfg) as (apet, _):
        for i, image in enumerate(images):
            [rows] = pipe.encode(image)
            assert rows.num_rows < rows.num_patches
            text = f"Describe picture {i}."
            part = {"type": "image_url", "image_url": {"url": data_url(image)}}
            got = vllm_ids(chat(apet, model_of(apet), [part], text), pipe)
            assert got == transformers_ids(pipe, [rows], text), (i, image.size)


def test_no_apet_engine_through_the_plugin_equals_vllms_grid_path(vllm, engines, pipes, images):
    pipe, model = pipes["full"], model_of(vllm)
    cfg = ServeConfig(engine=str(engines["full"]), upstream=vllm, upstream_format="vllm-apet")
    with running_server(cfg) as (apet, _):
        for i, image in enumerate(images):
            [rows] = pipe.encode(image)
            text = f"What is in picture {i}?"
            part = {"type": "image_url", "image_url": {"url": data_url(image)}}
            through_plugin = vllm_ids(chat(apet, model_of(apet), [part], text), pipe)
            own = vllm_ids(chat(vllm, model, [grid_part(rows, rows.extras["grid_thw"])], text), pipe)
            assert through_plugin == own == transformers_ids(pipe, [rows], text), (i, image.size)


def test_the_grid_route_answers_differently_so_positions_and_levels_are_checked(vllm, pipes, images):
    """On the same kept rows a grid layout changes the greedy ids of at least one image (in vLLM and in
    Transformers alike) while the plugin's part always gives the DeepStack decoder's answer; with the
    DeepStack levels zeroed too, so the levels reach vLLM's layers at the kept tokens' slots."""
    pipe, model, hidden = pipes["ratio"], model_of(vllm), pipes["ratio"].family.hidden
    differs, answers = [], []
    for i, image in enumerate(images):
        [rows] = pipe.encode(image)
        flat = rows.embeddings.clone()
        flat[:, hidden:] = 0
        text = f"Describe picture {i}."
        for emb in (rows.embeddings, flat):
            kept = VisualRows(emb, rows.positions, rows.num_patches, extras=rows.extras)
            exact, grid = transformers_ids(pipe, [kept], text), transformers_ids(pipe, [on_grid(rows, emb)], text)
            assert vllm_ids(chat(vllm, model, [grid_part(kept, (1, 2, 2 * rows.num_rows))], text), pipe) == grid
            part = encode_part(handoff_fields(pipe.family, kept, "vllm-apet"), "vllm-apet")
            assert vllm_ids(chat(vllm, model, [part], text), pipe) == exact
            differs.append(exact[1] != grid[1])
            answers.append(exact[1])
    assert any(differs), "no image's answer depends on the positions: the equality tests could not catch a grid"
    assert answers[0::2] != answers[1::2], "no answer depends on the DeepStack levels: the test could not miss them"
