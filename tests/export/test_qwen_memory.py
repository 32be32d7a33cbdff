"""Qwen2.5-VL's vision memory at build time (export/models/qwen2_5_vl.py, export/limits.py):

chunks    the full-attention blocks' queries in slices (never the whole [S, S] score matrix): rows
          of images of different sizes in one call equal Transformers' get_image_features (1e-5)
          with slices that divide nothing, and the graph holds one softmax per slice
limits    --max-pixels over the engine format's tokens per image is refused before anything is
          built, naming the largest --max-pixels; export's bound equals the runtime schema's
budget    the estimate is printed; over --max-memory the build is refused naming the --max-pixels
          that fits, and that one builds; the estimate scales with the checkpoint's config (the 7B
          tower's measured 11.6 GB at 1,591 tokens, README) and bounds a measured peak
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models import qwen2_5_vl
from apet_trt.export.models.qwen2_5_vl import Qwen25VLExport
from apet_trt.export.presets import load_preset, preset_config
from apet_trt.scripts.cli import main

PRESET = "tiny-qwen2.5-vl"
SIZES = [(300, 300), (420, 180), (160, 400)]  # (width, height): 121, 90, 84 tokens; 484, 360, 336 patches
CHUNK = 96  # divides none of them


def _build(out: Path, **options) -> Path:
    build(BuildConfig(model=PRESET, out=str(out), tensorrt=False, tensorrt_llm=False, **options), quiet=True)
    return out


def test_chunked_full_attention_equals_transformers(tmp_path, monkeypatch, rng):
    monkeypatch.setattr(qwen2_5_vl, "ATTENTION_CHUNK", CHUNK)
    engine = _build(tmp_path / "full", no_apet=True, max_batch=3)
    graph = onnx.load(str(engine / "vision.onnx"), load_external_data=False).graph
    family = Qwen25VLExport(*preset_config(PRESET)[:2])
    v = family.config.vision_config
    slices = -(-4 * family.max_tokens // CHUNK)  # ceil(most patches of an image / CHUNK)
    full = len(v.fullatt_block_indexes)
    assert sum(n.op_type == "Softmax" for n in graph.node) == (v.depth - full) + full * slices
    pipe = runtime.load(engine, backend="onnxruntime")
    images = [
        Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()) for w, h in SIZES
    ]
    batch = pipe.preprocess(images)
    out = pipe.vision.run(pipe.family.call_feeds(batch, [0, 1, 2]))  # one call, three sizes
    loaded = load_preset(PRESET)
    reference = torch.cat(family.reference_rows(loaded.model, pipe.family.preprocessor.processor, images))
    assert out["embeddings"].shape == reference.shape
    assert float((out["embeddings"] - reference).abs().max()) <= 1e-5


def test_export_bounds_equal_the_runtime_schema_s():
    from apet_trt.engine_format import MAX_BASIS, MAX_BATCH, MAX_TOKENS, schema_for
    from apet_trt.export import limits

    schema = schema_for("qwen2_5_vl")
    assert limits.MAX_TOKENS_PER_IMAGE == MAX_TOKENS == schema["vision.max_tokens"].hi
    assert limits.MAX_BATCH == MAX_BATCH == schema["batch.max"].hi
    assert limits.MAX_BASIS == MAX_BASIS == schema["apet.basis"].hi == schema["llm_stage.basis"].hi


@pytest.mark.parametrize(
    "options, pattern",
    [
        (["--max-batch", "4097"], r"--max-batch must be an integer in 1\.\.4096 \(the engine format's\)"),
        (["--keep-ratio", "0.3", "--basis", "4097"], r"--basis 4097: the engine format takes at most 4096"),
    ],
)
def test_batch_and_basis_over_the_engine_format_are_refused(tmp_path, capsys, options, pattern):
    out = tmp_path / "e"
    assert main(["build", "--model", PRESET, "--out", str(out), "--no-tensorrt", *options]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert re.search(pattern, line), line
    assert not out.exists()


def test_max_pixels_over_the_engine_format_is_refused_before_the_build(tmp_path, capsys):
    from apet_trt.engine_format import MAX_TOKENS

    out = tmp_path / "e"
    argv = ["build", "--model", PRESET, "--out", str(out), "--max-pixels", str(10**12), "--no-tensorrt"]
    assert main(argv) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"over the engine format's {MAX_TOKENS:,} tokens per image" in line
    assert f"--max-pixels <= {MAX_TOKENS * 28 * 28}" in line
    assert not out.exists()
    config, processor, *_ = preset_config(PRESET)
    wide = Qwen25VLExport.configure_processor(processor, max_pixels=MAX_TOKENS * 28 * 28)
    assert Qwen25VLExport(config, wide).max_tokens == MAX_TOKENS  # the bound itself is taken


def test_over_the_memory_budget_the_build_is_refused_naming_what_fits(tmp_path, capsys):
    out = tmp_path / "e"
    argv = ["build", "--model", PRESET, "--out", str(out), "--no-apet", "--max-batch", "1", "--no-tensorrt"]
    assert main([*argv, "--max-pixels", str(28 * 28 * 16384), "--max-memory", "1"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "GiB for one image of 16,384 tokens (--max-pixels 12845056)" in line and "over the budget" in line
    fits = int(line.split("--max-pixels <= ")[1].split()[0])
    assert not out.exists()
    config, processor, *_ = preset_config(PRESET)
    family = Qwen25VLExport(config, Qwen25VLExport.configure_processor(processor, max_pixels=fits))
    assert family.vision_memory(family.max_tokens) <= 2**30 < family.vision_memory(family.max_tokens + 1)
    assert main([*argv, "--max-pixels", str(fits), "--max-memory", "1"]) == 0
    printed = capsys.readouterr().out
    assert "vision engine peak memory (estimated" in printed and "budget 1 GiB" in printed
    assert json.loads((out / "manifest.json").read_text())["vision"]["max_tokens"] == fits // (28 * 28)


def test_the_estimate_scales_to_the_7b_tower(monkeypatch):
    """Unchunked, the 7B configuration at 1,591 tokens: the README measured an 11.6 GB peak (ONNX
    Runtime CPU, 2026-11); the model fitted on the tiny preset alone is within 15 % of it."""
    config, processor, *_ = preset_config("qwen2.5-vl-7b-arch")
    family = Qwen25VLExport(config, processor)
    monkeypatch.setattr(family, "attention_chunk", None)
    assert family.vision_memory(1591) == pytest.approx(11.6e9, rel=0.15)
    family.attention_chunk = qwen2_5_vl.ATTENTION_CHUNK
    assert family.vision_memory(1591) < 0.5 * 11.6e9  # slices of 1024 queries


CHILD = r"""
import json, sys
import numpy as np
from PIL import Image
from apet_trt import runtime
from apet_trt.runtime.serve.vision_only import VisionOnlyDecoder
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
side = int(sys.argv[2])
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28 * side, 28 * side, 3), dtype=np.uint8))
base = status("VmRSS")
pipe = runtime.load(sys.argv[1], backend="onnxruntime", decoder=VisionOnlyDecoder.for_manifest)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak from here on: the call's
[rows] = pipe.encode(image)
print(json.dumps({"tokens": rows.num_patches, "peak": status("VmHWM") - base}))
"""


@pytest.mark.parametrize("chunk", [None, qwen2_5_vl.ATTENTION_CHUNK])
def test_the_estimate_bounds_a_measured_peak(tmp_path, monkeypatch, chunk):
    """One 1,296-token image (5,184 patches) in a fresh process: the call's peak RSS over the
    process's RSS before loading is within [0.7, 1.15] of the estimate."""
    monkeypatch.setattr(qwen2_5_vl, "ATTENTION_CHUNK", chunk)
    engine = _build(tmp_path / "e", no_apet=True, max_batch=1, max_pixels=28 * 28 * 1296)
    done = subprocess.run([sys.executable, "-c", CHILD, str(engine), "36"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["tokens"] == 1296
    config, processor, *_ = preset_config(PRESET)
    family = Qwen25VLExport(config, processor)
    family.attention_chunk = chunk
    assert 0.7 <= measured["peak"] / family.vision_memory(1296) <= 1.15
