"""`apet bench` (scripts/bench.py): a --quick smoke run on tiny-llava engine directories through the
real dispatcher, checked against the schema documented in docs/BENCH.md. No wall-clock value is
asserted anywhere: only structure, consistency (ratios recomputed from the recorded medians) and
the outputs' validity."""

import contextlib
import io
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch

from apet_trt.export.build import BuildConfig, build
from apet_trt.scripts import bench
from apet_trt.scripts.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "BENCH.md"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_engines")
    comp, base = root / "tiny-t64", root / "tiny-full"
    build(BuildConfig(model="tiny-llava", out=str(comp), keep=64, basis=10), quiet=True)
    build(BuildConfig(model="tiny-llava", out=str(base), no_apet=True), quiet=True)
    return comp, base


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick(engines, tmp_path_factory):
    comp, base = engines
    out = tmp_path_factory.mktemp("bench_out")
    rc, stdout, stderr = _cli(
        [
            "bench",
            "--engine",
            str(comp),
            "--baseline",
            str(base),
            "--quick",
            "--decoder-layers",
            "1",
            "--tokens",
            "576,128,64",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, stderr
    return json.loads((out / "bench.json").read_text()), stdout, out


# -- the documented schema ---------------------------------------------------------------------


def documented_example() -> dict:
    text = DOC.read_text()
    block = text.split("<!-- schema:begin -->", 1)[1].split("<!-- schema:end -->", 1)[0]
    body = block.split("```jsonc", 1)[1].rsplit("```", 1)[0]
    body = "\n".join(re.sub(r"\s+//.*$", "", line) for line in body.splitlines())
    return json.loads(body)


def _kind(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def assert_matches(doc, real, path="$"):
    """Same keys in every object, same JSON kinds; null on either side is accepted (nullable
    fields); every element of a list of objects against the documented first element."""
    if doc is None or real is None:
        return
    if isinstance(doc, dict):
        assert isinstance(real, dict), f"{path}: expected an object, got {real!r}"
        assert set(real) == set(doc), (
            f"{path}: keys differ from docs/BENCH.md: extra {sorted(set(real) - set(doc))}, "
            f"missing {sorted(set(doc) - set(real))}"
        )
        for key in doc:
            assert_matches(doc[key], real[key], f"{path}.{key}")
    elif isinstance(doc, list):
        assert isinstance(real, list), f"{path}: expected a list, got {real!r}"
        if doc and isinstance(doc[0], (dict, list)):
            for i, item in enumerate(real):
                assert_matches(doc[0], item, f"{path}[{i}]")
        else:
            for i, item in enumerate(real):
                if doc:
                    assert _kind(item) == _kind(doc[0]), f"{path}[{i}]: {item!r}"
    else:
        assert _kind(real) == _kind(doc), f"{path}: {real!r} is a {_kind(real)}, documented as {_kind(doc)}"


def test_quick_run_json_matches_the_documented_schema(quick):
    report, _, _ = quick
    doc = documented_example()
    assert report["schema_version"] == doc["schema_version"] == bench.SCHEMA_VERSION
    assert_matches(doc, report)
    for section in bench.SECTIONS:
        assert report[section]["status"] == "ok", report[section]["status"]
    names = [e["name"] for e in report["vision"]["backends"]]
    assert names == list(bench.VISION_BACKENDS)
    for e in report["vision"]["backends"]:
        assert e["available"] or e["reason"].startswith("not available: ")
    cpu = next(e for e in report["vision"]["backends"] if e["name"] == "onnxruntime_cpu")
    assert cpu["available"] and cpu["positions_equal_onnxruntime_cpu"] is True
    assert [p["T"] for p in report["decoder"]["points"]] == [576, 128, 64]
    assert all(c["positions_equal_oracle"] for c in report["op"]["candidates"] if c["available"])
    assert report["config"]["repeats"] == 2 and report["config"]["quick"] is True
    for section in ("vision", "op", "decoder", "request"):  # every timing has the repeats asked for
        for timing in _timings(report[section]):
            assert timing["repeats"] == 2 and timing["min_s"] <= timing["median_s"] <= timing["p90_s"]


def _timings(obj):
    if isinstance(obj, dict):
        if set(obj) == {"median_s", "p90_s", "min_s", "repeats"}:
            yield obj
        for v in obj.values():
            yield from _timings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _timings(v)


def test_ratios_are_computed_from_the_recorded_medians(quick):
    report, _, _ = quick
    h = report["headline"]
    cpu = next(e for e in report["vision"]["backends"] if e["name"] == "onnxruntime_cpu")
    t = cpu["timings"]
    assert h["vision_apet_over_no_apet"]["backend"] == "onnxruntime_cpu"
    assert h["vision_apet_over_no_apet"]["value"] == pytest.approx(
        t["with_apet"]["median_s"] / t["without_apet"]["median_s"]
    )
    assert cpu["ratio_apet_over_no_apet"] == pytest.approx(h["vision_apet_over_no_apet"]["value"])

    points = {p["T"]: p for p in report["decoder"]["points"]}
    assert (h["ttft_T_over_N"]["T"], h["ttft_T_over_N"]["N"]) == (64, 576)
    assert h["ttft_T_over_N"]["value"] == pytest.approx(
        points[64]["prefill"]["median_s"] / points[576]["prefill"]["median_s"]
    )
    for p in points.values():
        assert p["prefill_ratio_vs_N"] == pytest.approx(p["prefill"]["median_s"] / points[576]["prefill"]["median_s"])
        assert p["decode_s_per_token"] == pytest.approx(p["decode"]["median_s"] / report["decoder"]["new_tokens"])
        assert p["context"] == report["decoder"]["text_tokens"] + p["T"]

    kv = h["kv_cache_bytes_T_over_N"]
    assert kv["value"] == pytest.approx(
        points[64]["kv_cache_bytes_full_model"] / points[576]["kv_cache_bytes_full_model"]
    )
    m = report["decoder"]["model"]  # tiny-llava: 2 layers, 4 heads of 32; fp16 for the full model
    assert points[64]["kv_cache_bytes_full_model"] == 2 * 2 * 4 * 32 * (report["decoder"]["text_tokens"] + 64) * 2
    # the run's own cache (1 layer, float32) was measured, not computed
    assert points[64]["kv_cache_bytes_measured"] == 2 * m["layers_run"] * 4 * 32 * points[64]["context"] * 4

    v = report["request"]["variants"]
    assert h["request_compressed_over_baseline"]["value"] == pytest.approx(
        v["compressed"]["timing"]["median_s"] / v["baseline"]["timing"]["median_s"]
    )
    assert report["request"]["ratio_compressed_over_baseline"] == pytest.approx(
        h["request_compressed_over_baseline"]["value"]
    )
    assert (v["compressed"]["T"], v["baseline"]["T"]) == (64, 576)
    assert v["baseline"]["prompt_tokens"] - v["compressed"]["prompt_tokens"] == 576 - 64


def test_markdown_states_the_layer_override_and_headline_first(quick):
    report, stdout, out = quick
    assert report["decoder"]["model"]["layer_override"] is True
    assert report["decoder"]["model"]["layers_run"] == 1 and report["decoder"]["model"]["layers_full_model"] == 2
    assert "layer override: 1 of 2 layers run" in stdout
    assert stdout.index("## Headline") < stdout.index("## Vision stage") < stdout.index("## Decoder")
    assert "not available: " in stdout  # the backends this machine lacks are named with the reason
    md = (out / "bench.md").read_text()
    assert md.strip() in stdout
    headline = stdout.split("## Headline", 1)[1].split("##", 1)[0]
    assert f"{report['headline']['ttft_T_over_N']['value']:.3f}" in headline


def test_plot_is_a_valid_png(quick):
    _, _, out = quick
    data = (out / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    from PIL import Image

    with Image.open(out / "bench.png") as img:
        img.verify()


def test_torch_vision_path_agrees_with_onnxruntime(engines):
    """The code behind the torch_cuda backend, run on the CPU in float32."""
    from apet_trt.runtime.images import ImagePreprocessor
    from apet_trt.runtime.manifest import load_manifest

    comp, base = engines
    pair = bench.EnginePair(load_manifest(comp), load_manifest(base))
    pre = ImagePreprocessor(comp / "processor", image_size=336)
    feeds = {"pixel_values": pre([str(ROOT / "assets" / "grace_hopper.jpg")])}
    t_comp, t_base = bench.torch_vision_pair(pair, "cpu", torch.float32)
    o_comp, o_base, device, clock = bench.open_vision_pair("onnxruntime_cpu", pair)
    assert (device, clock) == ("cpu", "wall")
    for torch_backend, ort_backend, t in ((t_comp, o_comp, 64), (t_base, o_base, 576)):
        emb_t, pos_t = torch_backend.run(feeds).values()
        emb_o, pos_o = ort_backend.run(feeds).values()
        assert pos_t.shape == (1, t) and torch.equal(pos_t, pos_o)
        torch.testing.assert_close(emb_t, emb_o, rtol=1e-3, atol=1e-4)


def test_missing_baseline_is_built_into_the_cache_then_reused(engines, tmp_path):
    comp, _ = engines
    argv = [
        "bench",
        "--engine",
        str(comp),
        "--quick",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--skip-vision",
        "--skip-decoder",
        "--skip-request",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    built = []
    for _ in range(2):
        rc, stdout, stderr = _cli(argv)
        assert rc == 0, stderr
        report = json.loads((tmp_path / "out" / "bench.json").read_text())
        assert report["engines"]["baseline"]["dir"] == str(tmp_path / "cache" / "tiny-llava-full")
        assert report["vision"] == {"status": "skipped: --skip-vision"}
        assert report["headline"]["vision_apet_over_no_apet"] is None and report["op"]["status"] == "ok"
        built.append(report["engines"]["baseline"]["built_by_bench"])
    assert built == [True, False]
    assert "reusing verified engine directory" in stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine", "{missing}"], "does not exist"),
        (["--engine", "{comp}", "--baseline", "{base}", "--tokens", "576,600,64"], "must be <= N=576"),
        (["--engine", "{comp}", "--baseline", "{base}", "--repeats", "0"], "--repeats must be an integer >= 1"),
        (["--engine", "{comp}", "--baseline", "{base}", "--tokens", "64,abc"], "comma-separated list of integers"),
        (["--engine", "{base}", "--baseline", "{comp}"], "has no ApET"),
        (["--engine", "{comp}", "--model", "tiny-llava"], "exactly one of --engine / --model"),
    ],
)
def test_bad_arguments_give_one_line_and_a_nonzero_exit(engines, tmp_path, extra, message):
    comp, base = engines
    fill = {"comp": str(comp), "base": str(base), "missing": str(tmp_path / "nope")}
    rc, stdout, stderr = _cli(["bench", *[a.format(**fill) for a in extra], "--out", str(tmp_path / "out")])
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apet bench: error: "), stderr
    assert message in lines[0]
    assert not (tmp_path / "out" / "bench.json").exists()
