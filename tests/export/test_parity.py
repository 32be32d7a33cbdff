"""Paper parity through `apet build` and `runtime.load` (export/parity.py, runtime/decoders/stage2.py):

- `--budget 64` on a LLaVA checkpoint with enough decoder layers (CLIP-336 geometry, 18 tiny LLM
  layers) builds the official pair (vision keep 96, then 32 after layer 16); through the pipeline
  the rows kept after layer 16 equal `compress_reference` (seeds by error rank) on the hidden
  states Transformers' own language model computes for the same prompt and rows (hidden_states[16]);
- `--start random`: the vision engine takes a per-image start, its kept set equals the oracle's
  with that start, the runtime draws the starts from the seeded generator (the same sequence in a
  fresh pipeline); `--image-aspect pad`: pixel values equal the processor run on an independent
  numpy expand2square with the processor's mean colour;
- the decoders that cannot run the LLM stage refuse such an engine in one line; bad options are
  refused before any weights are built.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.apet_ops.compat import load_image_processor
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models.llava import CLIP_MEAN, parts
from apet_trt.export.presets import load_preset, preset_config
from apet_trt.runtime.decoders import Stage2Decoder, TransformersDecoder
from apet_trt.scripts.cli import main
from helpers.apet_cases import MARGIN, decision_margin
from helpers.stage2 import Request, embeddings, hidden_after

N = 576


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    """tiny-llava with 18 decoder layers, saved as a checkpoint (what --budget's layer 16 needs)."""
    from transformers import LlavaForConditionalGeneration

    config, processor, tokenizer, _ = preset_config("tiny-llava")
    config.text_config.num_hidden_layers = 18
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("deep") / "ckpt"
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def budget64(deep_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("b64") / "engine"
    data = build(BuildConfig(model=str(deep_checkpoint), out=str(out), budget=64, max_batch=2), quiet=True)
    return out, data


@pytest.fixture(scope="module")
def parity_engine(tmp_path_factory):
    """tiny-llava (2 LLM layers): keep 32, then 16 after layer 1, random starts (seed 3), pad."""
    out = tmp_path_factory.mktemp("par") / "engine"
    rc, stdout, stderr = cli(
        "build", "--model", "tiny-llava", "--keep", "32", "--llm-stage", "1:16", "--start", "random",
        "--start-seed", "3", "--image-aspect", "pad", "--max-batch", "2", "--out", str(out),
    )  # fmt: skip
    assert rc == 0, stderr
    return out, stdout


def _images(rng_np):
    shapes = [(300, 300), (420, 180), (160, 400)]  # (width, height): square, wide, tall
    return [Image.fromarray(rng_np.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]


def test_budget_64_is_the_official_pair(budget64):
    _, data = budget64
    assert data["apet"]["keep"] == 96 and data["num_visual_tokens"] == 96
    assert data["llm_stage"] == {
        "layer": 16, "keep": 32, "basis": 10, "merge": True, "ridge": 1e-5, "start": 0, "seed_placement": "error_rank",
    }  # fmt: skip
    assert data["random_start"] is None and data["image_aspect"] == "default"
    assert data["decoder"]["tensorrt_llm"] is None and data["build"]["budget"] == 64


def test_layer_16_kept_rows_equal_the_oracle_on_transformers_hidden_states(budget64, rng):
    engine, data = budget64
    pipe = runtime.load(engine, backend="onnxruntime")
    assert isinstance(pipe.decoder, Stage2Decoder) and pipe.decoder.layer == 16
    stage = ApetConfig.from_dict({k: v for k, v in data["llm_stage"].items() if k != "layer"})
    prompt = "What is in the picture?"
    for _ in range(10):  # an image whose layer-16 decisions have clear margins (no float32 near-ties)
        pixels = torch.randint(0, 256, (336, 336, 3), generator=rng, dtype=torch.uint8).numpy()
        [rows] = pipe.encode(pixels)
        a = pipe.assemble(prompt, [rows])
        request = Request(a.input_ids, [(a.image_slots, rows.embeddings)], [rows.num_rows], [0])
        hidden = hidden_after(pipe.decoder.model, embeddings(pipe.decoder.model, request), 16)[0]
        if decision_margin(hidden[a.image_slots], stage) >= MARGIN:
            break
    else:
        pytest.skip("no well-posed image in 10 draws")
    _, positions = compress_reference(hidden[a.image_slots].unsqueeze(0), stage)
    [result] = pipe.generate(pixels, prompt, max_new_tokens=2)
    assert result.num_kept == 96 and len(result.llm_positions) == 32
    assert result.llm_positions == rows.positions[positions[0]].tolist()
    assert set(result.llm_positions) <= set(result.positions)


def test_parity_engine_manifest_and_io(parity_engine):
    out, stdout = parity_engine
    data = json.loads((out / "manifest.json").read_text())
    assert data["llm_stage"]["layer"] == 1 and data["llm_stage"]["keep"] == 16
    assert data["random_start"] == {"seed": 3} and data["image_aspect"] == "pad"
    assert [i["name"] for i in data["io"]["inputs"]] == ["pixel_values", "start"]
    assert data["io"]["inputs"][1] == {"name": "start", "dtype": "int64", "shape": ["batch"]}
    assert "then ApET after LLM layer 1: -> 16 rows" in stdout
    rc, text, _ = cli("inspect", str(out))
    assert rc == 0 and "llm stage    ApET after decoder layer 1" in text and "random" in text and "pad" in text


def test_pad_equals_an_independent_expand2square(parity_engine):
    out, _ = parity_engine
    pipe = runtime.load(out, backend="onnxruntime")
    processor = load_image_processor(out / "processor")
    fill = np.array([int(x * 255) for x in CLIP_MEAN], dtype=np.uint8)  # the official colour: (122, 116, 104)
    for img in _images(np.random.default_rng(1)):
        a = np.asarray(img)
        h, w = a.shape[:2]
        side = max(h, w)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = fill
        top, left = (side - h) // 2, (side - w) // 2
        canvas[top : top + h, left : left + w] = a
        expected = processor(images=[Image.fromarray(canvas)], return_tensors="np")["pixel_values"]
        got = pipe.preprocess(img).feeds["pixel_values"]
        assert np.array_equal(got, expected), f"{w}x{h}"
        if h != w:  # not the processor's own centre crop
            assert not np.array_equal(got, processor(images=[img], return_tensors="np")["pixel_values"])


def test_random_starts_are_drawn_from_the_seed_and_reach_the_engine(parity_engine, rng):
    out, _ = parity_engine
    images = _images(np.random.default_rng(2))
    draws = torch.Generator().manual_seed(3)
    expected = [torch.randint(0, N, (3,), generator=draws, dtype=torch.int64) for _ in range(2)]
    first, second = runtime.load(out, backend="onnxruntime"), runtime.load(out, backend="onnxruntime")
    for call in range(2):  # the sequence continues from call to call, the same in a fresh pipeline
        starts = first.preprocess(images).feeds["start"]
        assert np.array_equal(starts, expected[call].numpy())
        assert np.array_equal(second.preprocess(images).feeds["start"], starts)
    # the engine compresses from the start it is fed: the oracle's kept set on the tower's features
    loaded = load_preset("tiny-llava")
    tower, _ = parts(loaded.model)
    apet = ApetConfig(keep=32, basis=10)
    for _ in range(10):
        pixels = torch.randn(2, 3, 336, 336, generator=rng)
        start = torch.randint(0, N, (2,), generator=rng)
        with torch.no_grad():
            features = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        if all(decision_margin(features[b], apet, int(start[b])) > MARGIN for b in range(2)):
            break
    else:
        pytest.skip("no well-posed pixels in 10 draws")
    _, positions = compress_reference(features, apet, start=start)
    for backend in ("onnxruntime", "torch"):
        vision = runtime.load(out, backend=backend).vision
        got = vision.run({"pixel_values": pixels.numpy(), "start": start.numpy()})["positions"]
        assert torch.equal(got, positions), backend


def test_llm_stage_decoders_and_run_json(parity_engine, tmp_path):
    out, _ = parity_engine
    pipe = runtime.load(out, backend="onnxruntime")
    assert isinstance(pipe.decoder, Stage2Decoder) and pipe.decoder.name == "transformers+llm-stage"
    for kind in ("tensorrt_llm", "tensorrt_llm_api"):
        with pytest.raises(RuntimeError, match=f"--llm-stage 1:16 .*which the {kind} decoder cannot run"):
            runtime.load(out, backend="onnxruntime", decoder=kind)
    plain = TransformersDecoder(pipe.decoder.model, image_token_id=1, pad_token_id=0, eos_token_id=2, max_length=64)
    with pytest.raises(RuntimeError, match="which the transformers decoder cannot run"):
        runtime.load(out, backend="onnxruntime", decoder=plain)
    from apet_trt.runtime.serve.vision_only import VisionOnlyDecoder  # apet serve --upstream, apet encode

    with pytest.raises(RuntimeError, match="which the upstream decoder cannot run"):
        runtime.load(out, backend="onnxruntime", decoder=VisionOnlyDecoder.for_manifest)
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (200, 260, 3), dtype=np.uint8)).save(image)
    rc, text, err = cli(
        "run", "--engine", str(out), "--image", str(image), "--prompt", "Hi", "--max-new-tokens", "2", "--json"
    )
    assert rc == 0, err
    payload = json.loads(text)
    assert payload["decoder"] == "transformers+llm-stage" and len(payload["llm_positions"]) == 16
    assert set(payload["llm_positions"]) <= set(payload["positions"]) and payload["num_kept"] == 32


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(budget=64, keep=96), "--budget sets --keep and --llm-stage itself"),
        (dict(budget=100), "--budget must be one of"),
        (dict(budget=64), "the language model has 2 decoder layers; LAYER must be 1..1"),
        (dict(keep=32, llm_stage="1:32"), "KEEP must be below the 32 rows"),
        (dict(keep=32, llm_stage="1-16"), "--llm-stage must be LAYER:KEEP"),
        (dict(no_apet=True, start="random"), "nothing to draw starts for"),
        (dict(keep=32, start="first"), "--start must be an index or 'random'"),
        (dict(keep=32, image_aspect="stretch"), "--image-aspect must be one of"),
    ],
)
def test_bad_options_are_refused_before_any_weights(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        build(BuildConfig(model="tiny-llava", out=str(tmp_path / "e"), **options), quiet=True)
    assert not (tmp_path / "e").exists()


def test_cli_rejects_bad_values():
    for option, value, message in (
        ("--budget", "100", "invalid choice"),
        ("--start", "first", "expected an index or 'random'"),
    ):
        err = io.StringIO()
        with pytest.raises(SystemExit) as exc, redirect_stderr(err):
            main(["build", "--model", "tiny-llava", option, value, "--out", "x"])
        assert exc.value.code == 2 and message in err.getvalue()


def test_no_tensorrt_llm_engine_for_an_llm_stage_build(tmp_path, monkeypatch):
    """Where tensorrt_llm imports (emulated), an --llm-stage build still writes no TensorRT-LLM engine
    (it could not prune inside the LLM) and says why."""
    from apet_trt.export import build as build_module

    def no_engine(*args, **kwargs):
        raise AssertionError("build_trtllm called for an --llm-stage build")

    monkeypatch.setattr(build_module, "tensorrt_llm_version", lambda: "0.0.emulated")
    monkeypatch.setattr(build_module, "build_trtllm", no_engine)
    out = io.StringIO()
    with redirect_stdout(out):
        data = build(
            BuildConfig(model="tiny-llava", out=str(tmp_path / "e"), keep=32, llm_stage="1:16", tensorrt=False)
        )
    assert data["decoder"]["tensorrt_llm"] is None and "tensorrt_llm" not in data["plans"]
    assert "--llm-stage runs in the Transformers decoder only" in out.getvalue()
