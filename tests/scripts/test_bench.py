"""`apet bench` (scripts/bench/): a --quick smoke run on tiny-llava engine directories through the
real dispatcher, checked against the schema documented in docs/BENCH.md; the decoder section
against the runtime's own decoder (the bench measures what users run); its language model for a
text config with 3-D positions (Qwen2.5-VL's) against Transformers' own VLM. No wall-clock value is
asserted anywhere: only structure, consistency (ratios recomputed from the recorded medians),
agreement with independent computations, and the outputs' validity."""

import contextlib
import io
import json
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import ImageOps

from apet_trt import runtime
from apet_trt.export.build import BuildConfig, build
from apet_trt.runtime.decoders import SamplingConfig
from apet_trt.runtime.families import family_for
from apet_trt.runtime.images import to_pil
from apet_trt.runtime.manifest import load_manifest
from apet_trt.runtime.prompt import AssembledPrompt
from apet_trt.scripts import bench
from apet_trt.scripts.bench import decoder as bench_decoder
from apet_trt.scripts.bench import report as bench_report
from apet_trt.scripts.bench.engines import EnginePair
from apet_trt.scripts.bench.vision import VisionPairs, media_rows, open_vision_pair, torch_vision_pair
from apet_trt.scripts.cli import main
from helpers.presets import built_preset

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "BENCH.md"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_engines")
    comp, base = root / "tiny-t64", root / "tiny-full"
    built_preset(comp, model="tiny-llava", keep=64, basis=10)
    built_preset(base, model="tiny-llava", no_apet=True)
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


OPEN_OBJECTS = ("apet",)  # ApetConfig.to_dict(): options set beyond the documented ones appear too


def assert_matches(doc, real, path="$"):
    """Same keys in every object (at least the documented ones in OPEN_OBJECTS; a skipped section only
    its status), same JSON kinds; null on either side is accepted (nullable fields); every element of
    a list of objects against the documented first element."""
    if doc is None or real is None:
        return
    if isinstance(real, dict) and set(real) == {"status"} and str(real["status"]).startswith("skipped: --skip-"):
        return  # a skipped section is only its status (documented)
    if isinstance(doc, dict) and path.rsplit(".", 1)[-1] in OPEN_OBJECTS:
        real = {k: v for k, v in real.items() if k in doc}
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
    # T and N are the rows the bench image got from each engine (LLaVA-1.5: the manifest's T and N)
    assert report["rows"] == {
        "media": report["config"]["image"],
        "kind": "image",
        "backend": "onnxruntime_cpu",
        "T": 64,
        "N": 576,
    }
    assert [p["rows"] for p in report["decoder"]["points"]] == [
        bench_decoder.UNCOMPRESSED_ROWS,
        bench_decoder.SPACED_ROWS,
        bench_decoder.COMPRESSED_ROWS,
    ]
    m = report["decoder"]["model"]  # the engine's own text config, not a hard-coded model
    assert m["class"] == "LlamaForCausalLM" and m["config"].endswith("hf/config.json")
    assert (m["hidden_size"], m["num_attention_heads"], m["vocab_size"]) == (128, 4, 261)
    assert report["decoder"]["position_ids"].startswith("1-D")
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


def test_saved_json_re_renders_to_the_same_markdown(quick, tmp_path):
    report, _, out = quick
    copy = tmp_path / "bench.json"
    copy.write_text((out / "bench.json").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench_report.main([str(copy)]) == 0
    assert (tmp_path / "bench.md").read_text() == (out / "bench.md").read_text()


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
    """The code behind the torch_cuda backend (each engine's family.torch_module), run on the CPU in
    float32, gives the rows ONNX Runtime gives, through the family's own preprocess and encode."""
    comp, base = engines
    pair = EnginePair(load_manifest(comp), load_manifest(base))
    t_comp, t_base = torch_vision_pair(pair, "cpu", torch.float32)
    o_comp, o_base, device, clock = open_vision_pair("onnxruntime_cpu", pair)
    assert (device, clock) == ("cpu", "wall")
    image = to_pil(str(ROOT / "assets" / "grace_hopper.jpg"))
    for manifest, torch_backend, ort_backend, t in (
        (pair.compressed, t_comp, o_comp, 64),
        (pair.baseline, t_base, o_base, 576),
    ):
        family = family_for(manifest)
        batch = family.preprocess([image, ImageOps.mirror(image)])  # two images: the mirror keeps other patches
        rows_t, rows_o = family.encode(torch_backend, batch), family.encode(ort_backend, batch)
        assert [r.num_rows for r in rows_t] == [t, t]
        assert not torch.equal(rows_o[0].embeddings, rows_o[1].embeddings)
        for a, b in zip(rows_t, rows_o):
            assert torch.equal(a.positions, b.positions)
            torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def bench_parts(engines):
    """What a bench run makes before its decoder section: the engine pair, the bench image's rows,
    the language model from the engine's config, and the pipelines runtime.load makes with them."""
    from apet_trt.scripts.bench.run import load_pipelines

    comp, base = engines
    cfg = bench.BenchConfig(engine=str(comp), baseline=str(base), quick=True)
    pair = EnginePair(load_manifest(comp), load_manifest(base))
    pairs = VisionPairs(pair)
    rows = media_rows(cfg, pair, pairs)
    lm = bench_decoder.LanguageModel.for_engine(pair.compressed, device="cpu")
    model = lm.build()
    pipes = load_pipelines(pair, pairs, rows, bench_decoder.runtime_decoder(model, pair.compressed, lm))
    return cfg, pair, rows, lm, model, pipes


def _prefill_logits(decoder, prompts, visual) -> torch.Tensor:
    """The logits of a TransformersDecoder's prefill forward (one new token), seen by a forward hook."""
    seen = []
    handle = decoder.model.register_forward_hook(lambda module, args, out: seen.append(out.logits[:, -1].float()))
    try:
        decoder.generate(prompts, visual, SamplingConfig(max_new_tokens=1))
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_decoder_section_prefill_equals_the_runtime_decoder(engines, bench_parts):
    """The bench's language model (built from the engine's text config, here given the checkpoint's
    language-model weights) fed the bench's prompts and rows at each T gives the prefill logits of the
    decoder runtime.load builds for the engine (the saved LlavaForConditionalGeneration), and at the
    engine's T those inputs are the ones Pipeline.encode / Pipeline.assemble make for the image."""
    cfg, pair, rows, lm, model, pipes = bench_parts
    assert lm.layers == lm.full_layers == 2  # tiny-llava: all layers run, so the logits can agree
    user = runtime.load(engines[0], backend="onnxruntime", decoder="transformers")
    vlm = user.decoder.model
    bench_lm = bench_decoder.LanguageModel.for_engine(pair.compressed, device="cpu").build()
    assert not torch.equal(bench_lm.lm_head.weight, vlm.lm_head.weight)  # seeded random, until given the weights
    bench_lm.get_decoder().load_state_dict(vlm.get_decoder().state_dict())  # strict: the same architecture
    bench_lm.get_output_embeddings().load_state_dict(vlm.get_output_embeddings().state_dict())
    decoder = bench_decoder.runtime_decoder(bench_lm, pair.compressed, lm)

    [user_rows] = user.encode(cfg.image)
    assert torch.equal(user_rows.positions, rows.comp_rows[0].positions)
    torch.testing.assert_close(user_rows.embeddings, rows.comp_rows[0].embeddings)
    cases = bench_decoder.decoder_cases(cfg, pipes, rows, [576, 200, 64])
    assert torch.equal(cases[64].prompts[0].input_ids, user.assemble(cfg.prompt, [user_rows]).input_ids)
    for t, case in cases.items():
        assert case.context == cases[64].context - 64 + t
        observed = bench_decoder.observe_prefill(decoder, case.prompts, case.visual)
        expected = _prefill_logits(user.decoder, case.prompts, case.visual)
        torch.testing.assert_close(observed.logits, expected, rtol=1e-5, atol=1e-5)
        # the bench run's own cache after prefill: 2 layers x (k, v) x 4 kv heads x 32 x context, float32
        assert observed.cache_bytes == 2 * 2 * 4 * 32 * case.context * 4


def test_rows_at_other_T_are_evenly_spaced_uncompressed_rows(bench_parts):
    _, _, rows, _, _, _ = bench_parts
    base = rows.base_rows[0]
    for t in (1, 100, 575):
        r, source = bench_decoder.rows_at(t, rows)
        assert source == bench_decoder.SPACED_ROWS and r.num_rows == t and r.num_patches == base.num_rows
        assert bool((r.positions.diff() > 0).all()) and int(r.positions[0]) == 0
        torch.testing.assert_close(r.embeddings, base.embeddings[r.positions])
    assert bench_decoder.rows_at(64, rows)[0] is rows.comp_rows[0]
    assert bench_decoder.rows_at(576, rows)[0] is rows.base_rows[0]


@pytest.mark.parametrize("k", [0, 5, 49, 120])
def test_text_tokens_sets_the_text_count_and_keeps_the_media_rows(bench_parts, k):
    cfg, _, rows, _, _, pipes = bench_parts
    r = rows.comp_rows[0]
    a = bench_decoder.assemble(pipes["compressed"], cfg.prompt, r, k)
    natural = pipes["compressed"].assemble(cfg.prompt, [r])
    image_id = int(pipes["compressed"].manifest.llm["image_token_id"])
    assert a.input_ids.numel() == k + 64 and a.image_slots.numel() == 64
    assert bool((a.input_ids[a.image_slots] == image_id).all()) and int((a.input_ids == image_id).sum()) == 64
    text = a.input_ids[a.input_ids != image_id]
    first = int(natural.image_slots[0])
    assert torch.equal(text[: min(k, first)], natural.input_ids[: min(k, first)])  # the template's start kept


def test_language_model_of_a_text_config_with_3d_positions_matches_the_vlm():
    """A family with its own position ids (Qwen2.5-VL's 3-D M-RoPE) is benchable: its text config maps
    to no causal-LM class, so the bench builds AutoModel + an LM head, and through the runtime's
    TransformersDecoder with [3, L] ids it gives Transformers' own VLM's prefill logits."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    text.update(num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    lm = bench_decoder.LanguageModel.for_config(config.get_text_config(), "qwen", layers=3, device="cpu")
    assert lm.info()["class"] == "Qwen2_5_VLTextModel + linear LM head" and lm.info()["num_key_value_heads"] == 2
    model = lm.build()
    torch.manual_seed(1)
    vlm = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.get_decoder().load_state_dict(vlm.get_decoder().state_dict())
    model.get_output_embeddings().load_state_dict(vlm.get_output_embeddings().state_dict())

    from apet_trt.runtime.decoders import TransformersDecoder

    image_id, (h, w) = 299, (3, 4)  # one image of 3 x 4 rows between 5 and 7 text tokens
    ids = torch.cat([torch.randint(3, 290, (5,)), torch.full((h * w,), image_id), torch.randint(3, 290, (7,))])
    slots = torch.arange(5, 5 + h * w)
    grid = torch.stack(
        [torch.zeros(h * w, dtype=torch.int64), torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)]
    )
    positions = torch.cat([torch.arange(5).expand(3, 5), 5 + grid, 5 + max(h, w) + torch.arange(7).expand(3, 7)], dim=1)
    rows = [torch.randn(h * w, 64)]
    logits = {}
    for name, m in (("bench", model), ("vlm", vlm)):
        decoder = TransformersDecoder(m, image_token_id=image_id, pad_token_id=0, eos_token_id=None, max_length=512)
        for kind, own in (("3d", positions), ("1d", None)):
            prompt = AssembledPrompt(ids, slots, "", (h * w,), own)
            logits[name, kind] = _prefill_logits(decoder, [prompt], [rows])
    torch.testing.assert_close(logits["bench", "3d"], logits["vlm", "3d"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["bench", "1d"], logits["vlm", "1d"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["bench", "3d"], logits["bench", "1d"], atol=1e-4)  # the ids reach the model


def test_report_renders_the_committed_results(tmp_path):
    """docs/results/bench.json (the README cites it) re-renders with the current renderer (it reads
    schema 1, which the committed run used, and the current one); another schema is refused with
    one line."""
    src = ROOT / "docs" / "results" / "bench.json"
    report = json.loads(src.read_text())
    assert report["schema_version"] in bench_report.READABLE_SCHEMAS
    if report["schema_version"] == bench.SCHEMA_VERSION:
        assert_matches(documented_example(), report)
    md = bench_report.render_markdown(report)
    for key in ("vision_apet_over_no_apet", "ttft_T_over_N", "request_compressed_over_baseline"):
        assert f"**{report['headline'][key]['value']:.3f}**" in md
    copy = tmp_path / "bench.json"
    copy.write_text(json.dumps(report))
    with contextlib.redirect_stdout(io.StringIO()):
        assert bench_report.main([str(copy)]) == 0
    assert (tmp_path / "bench.md").read_text() == md and (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    copy.write_text(json.dumps({**report, "schema_version": 99}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert bench_report.main([str(copy)]) == 2
    assert len(err.getvalue().strip().splitlines()) == 1 and "schema_version 99" in err.getvalue()


@pytest.mark.parametrize(
    "src",
    sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs" / "results").glob("*/**/bench.json")),
)
def test_every_committed_family_run_re_renders_to_its_markdown(src, tmp_path):
    """Each committed run beside the README's (docs/results/<family>/...: schema 3, engines whose
    N and T may vary per image) matches the documented schema and re-renders, through `python -m
    apet_trt.scripts.bench.report` as docs/BENCH.md tells users, to exactly its committed bench.md."""
    import shutil
    import subprocess
    import sys

    report = json.loads((ROOT / src).read_text())
    assert report["schema_version"] == bench.SCHEMA_VERSION
    assert_matches(documented_example(), report)
    copy = tmp_path / "bench.json"
    shutil.copy(ROOT / src, copy)
    done = subprocess.run(
        [sys.executable, "-m", "apet_trt.scripts.bench.report", str(copy)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = (ROOT / src).with_name("bench.md").read_text()
    assert (tmp_path / "bench.md").read_text() == expected
    assert "None" not in expected.split("## Headline")[0]  # N and T are said, fixed or per image


def _other_families() -> list:
    """(family, its tiny preset) for every family in the runtime's table but LLaVA-1.5 (the runs
    above): each must bench with nothing but its presets."""
    from apet_trt.export.presets import PRESETS
    from apet_trt.runtime.families import FAMILIES

    tiny = {p.family: p.name for p in sorted(PRESETS.values(), key=lambda p: p.name) if p.name.startswith("tiny-")}
    return [pytest.param(f, tiny.get(f), id=f) for f in sorted(FAMILIES) if f != "llava"]


@pytest.mark.parametrize("family, preset", _other_families())
def test_every_family_benches_through_its_adapter(family, preset, tmp_path):
    """A --quick run on the family's tiny engines (a video for a family that takes videos): every
    section runs, and T and N are the rows runtime.load's pipelines give that medium."""
    from apet_trt.scripts.bench.config import _preset_patches

    assert preset is not None, f"family {family} has no tiny-* preset"
    comp, base, out = tmp_path / "t", tmp_path / "full", tmp_path / "out"
    keep = _preset_patches(preset) // 4
    build(BuildConfig(model=preset, out=str(comp), keep=keep, basis=min(10, keep - 1)), quiet=True)
    build(BuildConfig(model=preset, out=str(base), no_apet=True), quiet=True)
    video = family_for(load_manifest(comp)).frames_per_video is not None
    medium = ["--video", str(ROOT / "assets" / "big_buck_bunny.mp4")] if video else []
    argv = ["bench", "--engine", str(comp), "--baseline", str(base), "--quick", "--repeats", "1", "--skip-op"]
    rc, _, stderr = _cli([*argv, "--warmup", "0", "--tokens", "16", *medium, "--out", str(out)])
    assert rc == 0, stderr
    report = json.loads((out / "bench.json").read_text())
    assert_matches(documented_example(), report)
    assert all(report[s]["status"] == "ok" for s in ("vision", "decoder", "request"))
    kind = "video" if video else "image"
    media = {f"{kind}s": str(ROOT / "assets" / ("big_buck_bunny.mp4" if video else "grace_hopper.jpg"))}
    t, n = (runtime.load(d, backend="onnxruntime").encode(**media)[0].num_rows for d in (comp, base))
    assert t < n and (report["rows"]["kind"], report["rows"]["T"], report["rows"]["N"]) == (kind, t, n)
    assert [p["T"] for p in report["decoder"]["points"]] == sorted({n, t, 16}, reverse=True)
    assert (report["request"]["variants"]["compressed"]["T"], report["request"]["variants"]["baseline"]["T"]) == (t, n)


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
        (["--engine", "{comp}", "--baseline", "{base}", "--decoder-layers", "3"], "must be in 1..2"),
        (["--engine", "{comp}", "--baseline", "{base}", "--image", "{missing}"], "no such file"),
        (["--model", "tiny-llava", "--keep", "576"], "must be < N=576"),
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
