"""`apet bench` on an engine with ApET inside the LLM (manifest llm_stage): its rows run through the
runtime's Stage2Decoder beside the vision-only T points (interleaved), and the point's numbers agree
with independent computations: the KV bytes the run's cache held (layers before the stage hold the
whole prompt, the others the pruned one), the full model's, the ratios from the recorded medians;
the stage's layer scaled to the layers run; --budget's checks. No wall-clock value is asserted."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from apet_trt.export.build import BuildConfig, build
from apet_trt.runtime.manifest import load_manifest
from apet_trt.scripts.bench import BenchConfig
from apet_trt.scripts.bench.decoder import LanguageModel, stage_layer
from apet_trt.scripts.cli import main
from helpers.presets import built_preset


def documented() -> dict:
    """docs/BENCH.md's schema block, comments stripped."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "BENCH.md").read_text()
    body = text.split("<!-- schema:begin -->", 1)[1].split("<!-- schema:end -->", 1)[0]
    body = body.split("```jsonc", 1)[1].rsplit("```", 1)[0]
    return json.loads("\n".join(re.sub(r"\s+//.*$", "", line) for line in body.splitlines()))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_stage")
    stage, full = root / "stage", root / "full"
    build(BuildConfig(model="tiny-llava", out=str(stage), keep=96, llm_stage="1:32"), quiet=True)
    built_preset(full, model="tiny-llava", no_apet=True)
    out = root / "out"
    argv = ["bench", "--engine", str(stage), "--baseline", str(full), "--quick", "--skip-vision", "--skip-op"]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main([*argv, "--out", str(out)])
    assert rc == 0, err.getvalue()
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text(), load_manifest(stage)


def test_the_stage_point_agrees_with_independent_counts(report):
    data, markdown, manifest = report
    dec = data["decoder"]
    assert dec["status"] == "ok" and data["engines"]["compressed"]["llm_stage"] == manifest.llm_stage
    s = dec["llm_stage"]
    assert (s["T_vision"], s["keep_llm"], s["layer_full_model"], s["layer_run"]) == (96, 32, 1, 1)
    assert s["context_after_stage"] == s["context"] - (96 - 32) and s["mean_rows_full_model"] == 64
    m = dec["model"]
    kv_dim = m["num_key_value_heads"] * m["head_dim"]
    # layer 0 holds the whole prompt, layer 1 the pruned one; float32 in the run, float16 for the model
    assert s["kv_cache_bytes_measured"] == 2 * kv_dim * 4 * (s["context"] + s["context_after_stage"])
    assert s["kv_cache_bytes_full_model"] == 2 * kv_dim * 2 * (s["context"] + s["context_after_stage"])
    points = {p["T"]: p for p in dec["points"]}
    assert set(s["prefill_ratio_vs_T"]) == {"64", "96"}
    for t, r in s["prefill_ratio_vs_T"].items():
        assert r == pytest.approx(s["prefill"]["median_s"] / points[int(t)]["prefill"]["median_s"])
    # the vision-only points ran the plain decoder: their measured cache holds every layer's whole prompt
    assert points[96]["kv_cache_bytes_measured"] == 2 * kv_dim * 4 * 2 * points[96]["context"]
    assert "ApET inside the LLM" in markdown and "96 -> 32 @ 1" in markdown
    assert set(s) == set(documented()["decoder"]["llm_stage"])  # docs/BENCH.md's keys
    assert data["schema_version"] == documented()["schema_version"]
    assert data["request"]["variants"]["compressed"]["T"] == 96


def test_stage_layer_scales_to_the_layers_run(report):
    _, _, manifest = report
    lm = LanguageModel.for_engine(manifest, layers=2, device="cpu")
    assert stage_layer(manifest, lm) == 1
    data = dict(manifest.data, llm_stage={**manifest.llm_stage, "layer": 16})
    config = lm.config
    config.num_hidden_layers = 32
    deep = LanguageModel(config, lm.source, "cpu", lm.dtype, 2)
    assert stage_layer(type(manifest)(manifest.root, data), deep) == 1  # 16 of 32 -> 1 of 2
    with pytest.raises(ValueError, match="at least 2 decoder layers"):
        stage_layer(manifest, LanguageModel(config, lm.source, "cpu", lm.dtype, 1))


def test_budget_options():
    with pytest.raises(ValueError, match="--budget builds the compressed engine"):
        BenchConfig(engine="x", budget=64).validate()
    with pytest.raises(ValueError, match="--budget must be one of"):
        BenchConfig(model="tiny-llava", budget=100).validate()
    BenchConfig(model="tiny-llava", budget=64).validate()  # the build itself refuses a model of 2 layers
