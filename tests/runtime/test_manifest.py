"""Engine-directory verification (docs/ENGINE_DIR.md): every way a directory can disagree with its
manifest is an error naming the file; a corrupt ONNX file is caught by its checksum, and with a
manifest rewritten to match it, ONNX Runtime's load failure is still a clear error."""

import json
import shutil

import pytest

from apet_trt import runtime
from apet_trt.runtime.manifest import ManifestError, load_manifest, read_manifest, verify_files
from helpers.engines import build_engine_dir, write_manifest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("eng") / "t8", keep=8)


@pytest.fixture
def engine(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "copy")


def test_valid_directory_verifies(engine):
    m = load_manifest(engine)
    assert m.num_visual_tokens == 8 and m.apet["keep"] == 8
    assert "8 tokens" in m.summary()


def test_summary_names_precision_and_what_built_each_plan(engine):
    """apet inspect says what the graph computes in and, per TensorRT plan, the TensorRT, GPU and
    compute capability it was built with (what the runtime checks before it loads one)."""
    m = load_manifest(engine)
    text = m.summary()
    assert "precision    vision fp32, compressor fp32" in text
    assert "plans        none (no TensorRT plan in this directory)" in text
    m.data["plans"] = {
        "tensorrt": {
            "tensorrt": "11.4.0.106", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
            "strongly_typed": True, "dtypes": {"vision_tower": "fp16", "compressor": "fp32", "projector": "fp16"},
        }
    }  # fmt: skip
    line = [x for x in m.summary().splitlines() if x.startswith("plans")]
    gpu = "NVIDIA H100 80GB HBM3 (compute capability 9.0)"
    assert line == [f"plans        tensorrt: TensorRT 11.4.0.106 on {gpu}, strongly typed"]


def test_missing_file_is_named(engine):
    (engine / "processor" / "preprocessor_config.json").unlink()
    with pytest.raises(ManifestError, match="preprocessor_config.json: listed in the manifest but missing"):
        load_manifest(engine)


def test_changed_file_same_size_is_named(engine):
    path = engine / "tokenizer" / "tokenizer_config.json"
    data = bytearray(path.read_bytes())
    data[-2] = ord(" ") if data[-2] != ord(" ") else ord("\t")
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="tokenizer_config.json: sha256 differs"):
        load_manifest(engine)


def test_unlisted_file_is_named(engine):
    (engine / "hf" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="extra.bin: file not listed"):
        load_manifest(engine)


def test_missing_manifest(engine):
    (engine / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        runtime.load(engine)


def test_newer_manifest_version_is_refused(engine):
    data = json.loads((engine / "manifest.json").read_text())
    data["manifest_version"] = 3
    (engine / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="manifest_version 3 is newer than this runtime supports \\(2\\)"):
        read_manifest(engine)


def test_truncated_onnx_is_caught_by_the_manifest(engine):
    path = engine / "vision.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ManifestError, match="vision.onnx: size .* differs"):
        runtime.load(engine, backend="onnxruntime")


def test_corrupt_onnx_with_matching_manifest_is_a_clear_error(engine):
    path = engine / "vision.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    write_manifest(engine, json.loads((engine / "manifest.json").read_text()))  # checksums now "match"
    verify_files(read_manifest(engine))
    with pytest.raises(RuntimeError, match="vision.onnx: ONNX Runtime could not load the vision model"):
        runtime.load(engine, backend="onnxruntime")


def test_torch_backend_refuses_random_seeded_weights(engine):
    data = json.loads((engine / "manifest.json").read_text())
    data["decoder"]["transformers"] = {
        "checkpoint": "hf",
        "weights": "random-seeded",
        "seed": 0,
        "config": "hf/config.json",
    }
    write_manifest(engine, data)
    with pytest.raises(RuntimeError, match="needs the checkpoint's saved weights"):
        runtime.load(engine, backend="torch")
