"""Hardening cases not covered beside their features (issue 6): an engine asked for another T,
engines whose static shapes disagree with their manifest, corrupt TensorRT plans, numerical edge
cases in float16 and at 1000x magnitudes, every user error as one CLI line, and determinism
across processes. The rest of the list lives with its feature:

    images (channels, rank, empty, zero-size, NaN/Inf, unreadable)  test_runtime_images.py
    config (keep > N, keep <= basis, basis < 1, start >= N)          test_apet_ops.py, test_export.py
    artifacts (truncated / corrupt ONNX, manifest, newer version)    test_runtime_manifest.py
    environment (tensorrt missing, auto fallback)                    test_runtime_pipeline.py
    requests (too long, images != prompts), 8 threads, backends      test_runtime_pipeline.py
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from matplotlib import cbook

from apet_trt import runtime
from apet_trt.apet_ops import ApetCompressor, ApetConfig, compress_reference
from apet_trt.runtime.backends import tensorrt_available
from apet_trt.runtime.families.llava import LlavaTorchVision
from apet_trt.runtime.manifest import ManifestError, load_manifest
from apet_trt.scripts.cli import main
from helpers.apet_cases import duplicated_tokens, few_huge_tokens, well_posed
from helpers.engines import IMAGE_SIZE, build_engine_dir, make_model, make_tokenizer, stack_rows, write_manifest

PHOTO = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
KEEP = 12


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("hard") / "t12", keep=KEEP)


def _copy(engine, tmp_path, name="copy"):
    return shutil.copytree(engine, tmp_path / name)


def _one_error_line(capsys) -> str:
    """The last command's error (call capsys.readouterr() before the command) is one line, with no
    traceback; library progress bars (Transformers' weight loading) may precede it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("apet ")]
    assert len(lines) == 1 and ": error: " in lines[0], f"expected one error line, got {err!r}"
    return lines[0]


# --- an engine built for T asked for another T ----------------------------------------------------


def test_engine_built_for_t_refuses_another_t(engine, capsys):
    assert runtime.load(engine, keep=KEEP).num_visual_tokens == KEEP
    with pytest.raises(ValueError, match=rf"built for T={KEEP} .* asked for T=20.*apet build --keep 20"):
        runtime.load(engine, keep=20)
    with pytest.raises(ValueError, match="keep must be a positive int"):
        runtime.load(engine, keep=0)
    capsys.readouterr()
    assert main(["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x", "--keep", "36"]) == 2
    line = _one_error_line(capsys)
    assert f"T={KEEP}" in line and "T=36" in line and "--no-apet" in line  # 36 = N: the baseline


def test_manifest_t_that_the_onnx_does_not_emit_is_refused(engine, tmp_path):
    """A manifest edited after the build (and re-checksummed) to promise another T."""
    root = _copy(engine, tmp_path)
    data = json.loads((root / "manifest.json").read_text())
    data["num_visual_tokens"] = 8
    data["apet"]["keep"] = 8
    for out in data["io"]["outputs"]:
        out["shape"][1] = 8
    write_manifest(root, data)
    with pytest.raises(
        RuntimeError,
        match=r"vision.onnx: the engine emits embeddings \[batch, 12, 64\], the manifest promises \[batch, 8, 64\]",
    ):
        runtime.load(root, backend="onnxruntime")


# --- corrupt TensorRT plans -------------------------------------------------------------------------


def _with_plan(engine, tmp_path, payload: bytes):
    root = _copy(engine, tmp_path, "with_plan")
    (root / "vision.plan").write_bytes(payload)
    data = json.loads((root / "manifest.json").read_text())
    data["engines"]["tensorrt"] = "vision.plan"
    write_manifest(root, data)
    return root


def test_truncated_plan_is_named_by_the_manifest(engine, tmp_path, capsys):
    root = _with_plan(engine, tmp_path, bytes(range(256)) * 64)
    load_manifest(root)  # intact: verifies
    capsys.readouterr()
    with open(root / "vision.plan", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ManifestError, match=r"vision.plan: size 1000 bytes differs .*truncated"):
        runtime.load(root, backend="tensorrt")
    assert main(["inspect", str(root)]) == 2
    assert "vision.plan" in _one_error_line(capsys)


def test_corrupt_plan_with_matching_manifest(engine, tmp_path):
    """Checksums match but the bytes are no TensorRT engine: TensorRT's deserializer returns None
    and the backend says so, naming the plan."""
    ok, why = tensorrt_available()
    if not ok:
        pytest.skip(f"deserializing a plan needs TensorRT and a GPU: {why}")
    root = _with_plan(engine, tmp_path, b"\x00garbage, not a serialized engine" * 100)
    with pytest.raises(RuntimeError, match=r"vision.plan: TensorRT could not deserialize"):
        runtime.load(root, backend="tensorrt")


# --- features: rank-deficient, all-zero and 1000x magnitudes, float32 and float16 -------------------

N, D = 144, 48
FEATURES = {
    "duplicated": lambda g: duplicated_tokens(g, 1, N, D)[0],
    "constant": lambda g: torch.randn(1, D, generator=g).expand(N, D).clone(),
    "all_zero": lambda g: torch.zeros(N, D),
    "x1000": lambda g: few_huge_tokens(g, 1, N, D, factor=1000.0)[0],
    "all_x1000": lambda g: torch.randn(N, D, generator=g) * 1000,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", sorted(FEATURES))
def test_feature_edge_cases_match_the_oracle(rng, kind, dtype):
    config = ApetConfig(keep=24, basis=10)
    # drawn in float32, rounded to the model dtype, then checked for well-posed decisions
    x = well_posed(lambda g: FEATURES[kind](g).to(dtype).float(), config, 2, rng).to(dtype)
    assert torch.isfinite(x).all()
    tokens, pos = ApetCompressor(config)(x)
    ref_tokens, ref_pos = compress_reference(x, config)
    assert tokens.dtype == dtype
    assert torch.isfinite(tokens).all() and torch.isfinite(ref_tokens).all()
    assert torch.equal(pos, ref_pos), f"{kind}/{dtype}: kept set differs from the oracle"
    if kind == "all_zero":
        assert torch.equal(pos[0], torch.arange(24)) and not tokens.any()


def test_fp16_model_keeps_the_oracles_set(rng):
    """The vision tower in float16 (features arrive in float16, squared norms beyond its range):
    the compressor computes in float32 and keeps what the oracle keeps on those same features."""
    model = make_model(make_tokenizer()).half()
    vision = LlavaTorchVision(
        model,
        feature_layer=-2,
        select_strategy="default",
        apet={"keep": KEEP, "basis": 4, "merge": True, "ridge": 1e-5, "start": 0},
    ).eval()
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=rng)
    with torch.no_grad():
        features = vision.tower(pixels.half(), output_hidden_states=True).hidden_states[-2][:, 1:]
        features = features * 100  # CLIP-like magnitudes: squared norms overflow float16
        assert features.dtype == torch.float16 and torch.isfinite(features).all()
        assert ((features.float() ** 2).sum(-1) > torch.finfo(torch.float16).max).any()
        tokens, pos = vision.compressor(features)
    _, ref_pos = compress_reference(features, ApetConfig(keep=KEEP, basis=4))
    assert torch.isfinite(tokens).all()
    assert torch.equal(pos, ref_pos)


# --- every user error is one line on the CLI ----------------------------------------------------------


def test_cli_errors_are_one_line(engine, tmp_path, capsys):
    capsys.readouterr()
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert main(["run", "--engine", str(engine), "--image", str(not_image), "--prompt", "x"]) == 2
    assert "notes.png is not an image" in _one_error_line(capsys)

    if not tensorrt_available()[0]:
        assert main(["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x", "--backend", "tensorrt"]) == 2
        assert "pip install apet-trt[tensorrt]" in _one_error_line(capsys)

    newer = _copy(engine, tmp_path, "newer")
    data = json.loads((newer / "manifest.json").read_text())
    data["manifest_version"] = 3
    (newer / "manifest.json").write_text(json.dumps(data))
    for argv in (["inspect", str(newer)], ["run", "--engine", str(newer), "--image", PHOTO, "--prompt", "x"]):
        assert main(argv) == 2
        assert "manifest_version 3 is newer" in _one_error_line(capsys)

    corrupt = _copy(engine, tmp_path, "corrupt")
    (corrupt / "vision.onnx").write_bytes(b"\x08\x07garbage" * 50)
    write_manifest(corrupt, json.loads((corrupt / "manifest.json").read_text()))
    assert main(["run", "--engine", str(corrupt), "--image", PHOTO, "--prompt", "x", "--backend", "onnxruntime"]) == 2
    assert "vision.onnx: ONNX Runtime could not load" in _one_error_line(capsys)

    assert main(["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x" * 300]) == 2
    assert "maximum length" in _one_error_line(capsys)


# --- determinism across processes and backends --------------------------------------------------------


def test_same_positions_in_another_process_and_backend(engine):
    """A fresh interpreter running `apet run --json` (ONNX Runtime) keeps what this process keeps
    with the torch backend, twice over."""
    torch_pipe = runtime.load(engine, backend="torch")
    _, here = stack_rows(torch_pipe.encode(PHOTO))
    cmd = [
        sys.executable,
        "-m",
        "apet_trt.scripts.cli",
        "run",
        "--engine",
        str(engine),
        "--image",
        PHOTO,
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        "2",
        "--backend",
        "onnxruntime",
        "--json",
    ]
    runs = [subprocess.run(cmd, capture_output=True, text=True, check=True) for _ in range(2)]
    positions = [json.loads(r.stdout.strip().splitlines()[-1])["positions"] for r in runs]
    assert positions[0] == positions[1] == here[0].tolist()
    assert len(positions[0]) == KEEP
