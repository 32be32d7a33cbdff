"""`apet build` (export/): issue 3, checked against independent paths.

What each group shows:
  builds        the CLI builds tiny-llava offline (T=64, the --no-apet baseline, a --force rebuild
                with --no-merge --start); the summary names N -> T and the file sizes
  ORT == torch  vision.onnx in ONNX Runtime equals the PyTorch wrapper rebuilt from the (seeded,
                verified-deterministic) preset, at batch 1 and 3, on fresh random pixels
  oracle        positions equal apet_ops.compress_reference on the HF tower's own features
                (hidden_states[-2][:, 1:]); embeddings = projector(reference tokens)
  graph         onnx.checker, strict shape inference, TensorRT op allowlist, and the /compressor/
                name scope by which export/precision.py reads the compressor's dtypes holds
                exactly the compressor
  manifest      every field docs/ENGINE_DIR.md lists (parsed from the doc), checksums of every file,
                accepted by runtime.manifest.load_manifest; a flipped byte fails `apet inspect`
  errors        bad options: a clear message naming the value, one CLI line, nothing left behind;
                a build failing mid-way leaves an existing engine directory untouched
  TensorRT      real builds where tensorrt / tensorrt_llm import; without them the notes, the null
                manifest entries, the TensorRT-LLM sizing and command (tensorrt_llm emulated)
(--fp16, strongly typed plans and their records: tests/export/test_fp16.py)
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import re
import shutil
import sys
import types
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from apet_trt.apet_ops import ApetConfig, compress_reference, export_compressor_onnx
from apet_trt.apet_ops.reference import decide
from apet_trt.apet_ops.trt_ops import check_restrictions, unsupported_ops
from apet_trt.export import build as build_module
from apet_trt.export import tensorrt_build, trtllm_build
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models.llava import LlavaVisionEngine
from apet_trt.export.presets import build_preset
from apet_trt.runtime.manifest import load_manifest
from apet_trt.scripts.cli import main
from helpers.apet_cases import MARGIN, decision_margin
from helpers.engines import stack_rows

ROOT = Path(__file__).resolve().parents[2]
N, T, K = 576, 64, 10
PRESET = "tiny-llava"


def cli(*args: str) -> tuple[int, str, str]:
    """Run `apet ARGS` in-process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def build_cli(out: Path, *extra: str) -> tuple[Path, str]:
    rc, stdout, stderr = cli("build", "--model", PRESET, *extra, "--out", str(out))
    assert rc == 0, f"apet build failed: {stderr}"
    return out, stdout


def leftovers(parent: Path) -> list[str]:
    """The build's hidden work / backup directories, which must never outlive a build."""
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".building", ".replaced")))


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def manifest_of(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


# --- engine directories, built once per module ------------------------------------------------


@pytest.fixture(scope="module")
def t64(tmp_path_factory):
    """(dir, summary printed) for `apet build --model tiny-llava --keep 64 --basis 10 --out DIR`."""
    return build_cli(tmp_path_factory.mktemp("t64") / "tiny-t64", "--keep", str(T), "--basis", str(K))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uncompressed baseline: --no-apet (and no --keep)."""
    return build_cli(tmp_path_factory.mktemp("full") / "tiny-full", "--no-apet")[0]


@pytest.fixture(scope="module")
def forced(t64, tmp_path_factory):
    """An existing engine directory (a copy of t64) replaced by --force with --no-merge --start 100."""
    engine = tmp_path_factory.mktemp("forced") / "tiny-variant"
    shutil.copytree(t64[0], engine)
    (engine / "vision.onnx.data").write_bytes(b"stale file of the old build")  # must not survive
    manifest = manifest_of(engine)
    manifest["files"]["vision.onnx.data"] = {
        "sha256": hashlib.sha256(b"stale file of the old build").hexdigest(),
        "bytes": 27,
    }
    (engine / "manifest.json").write_text(json.dumps(manifest))
    before = tree(engine)
    build_cli(engine, "--keep", str(T), "--basis", str(K), "--no-merge", "--start", "100", "--force")
    return engine, before


# --- the PyTorch side, independent of the engine dir ------------------------------------------


@pytest.fixture(scope="module")
def preset():
    model, config, *_ = build_preset(PRESET)
    return model, config


def hf_parts(model):
    """The HF model's own vision tower and projector (transformers 4.x and 5.x layouts)."""
    inner = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model
    return inner.vision_tower, inner.multi_modal_projector


def tower_features(model, config, pixels: torch.Tensor) -> torch.Tensor:
    """hidden_states[vision_feature_layer] with CLS dropped: the features ApET sees, straight from
    the HF CLIPVisionModel."""
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    tower, _ = hf_parts(model)
    with torch.no_grad():
        return tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


def hf_image_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """Transformers' get_image_features: tower -> layer -2 -> drop CLS -> projector, all N tokens."""
    with torch.no_grad():
        out = model.get_image_features(
            pixel_values=pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
        )
    out = getattr(out, "pooler_output", out)
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


def well_posed_pixels(model, config, apet: ApetConfig, batch: int, rng: torch.Generator) -> torch.Tensor:
    """Random pixels whose tower features give the oracle clear margins (no float32 near-ties),
    so 'positions equal' is a fair demand on every implementation."""
    images = []
    for _ in range(batch):
        for _ in range(30):
            px = torch.randn(1, 3, 336, 336, generator=rng)
            if decision_margin(tower_features(model, config, px)[0], apet) > MARGIN:
                images.append(px)
                break
        else:
            raise RuntimeError("no well-posed pixels drawn")
    return torch.cat(images)


def ort_run(engine: Path, pixels: torch.Tensor):
    import onnxruntime as ort

    session = ort.InferenceSession(str(engine / "vision.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["embeddings", "positions"]
    emb, pos = session.run(None, {"pixel_values": pixels.numpy()})
    return torch.from_numpy(emb), torch.from_numpy(pos)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# --- 1. the build and ORT == PyTorch ----------------------------------------------------------


def test_preset_weights_are_deterministic_and_are_what_was_built(preset, t64):
    """The assumption the PyTorch comparisons rest on: build_preset is seeded, so a rebuild gives
    the same weights, and those are the weights saved into the engine directory."""
    from transformers import LlavaForConditionalGeneration

    model, _ = preset
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    again = build_preset(PRESET)[0].state_dict()
    state = model.state_dict()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    saved = LlavaForConditionalGeneration.from_pretrained(str(t64[0] / "hf"), local_files_only=True).state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)


def test_build_preset_leaves_the_global_rng_alone():
    torch.manual_seed(777)
    expected = torch.rand(3)
    torch.manual_seed(777)
    build_preset(PRESET)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_equals_pytorch_wrapper(t64, preset, rng, batch):
    model, config = preset
    apet = ApetConfig(keep=T, basis=K)
    wrapper = LlavaVisionEngine(model, apet).float().eval()
    pixels = well_posed_pixels(model, config, apet, batch, rng)
    emb, pos = ort_run(t64[0], pixels)
    with torch.no_grad():
        ref_emb, ref_pos = wrapper(pixels)
    assert emb.shape == (batch, T, config.text_config.hidden_size) and emb.dtype == torch.float32
    assert pos.shape == (batch, T) and pos.dtype == torch.int64
    assert torch.equal(pos, ref_pos)
    diff = float((emb - ref_emb).abs().max())
    print(f"batch {batch}: ORT vs torch max|diff| {diff:.2e}, relative {rel_err(emb, ref_emb):.2e}")
    assert rel_err(emb, ref_emb) < 1e-4


# --- 2. against the oracle, from the HF tower's own features ----------------------------------


def test_positions_and_embeddings_match_the_oracle(t64, preset, rng):
    model, config = preset
    apet = ApetConfig(keep=T, basis=K)
    pixels = well_posed_pixels(model, config, apet, 2, rng)
    emb, pos = ort_run(t64[0], pixels)
    features = tower_features(model, config, pixels)
    assert features.shape == (2, N, config.vision_config.hidden_size)
    tokens, positions = compress_reference(features, apet)
    assert torch.equal(pos, positions)
    assert bool((pos[:, 1:] > pos[:, :-1]).all()), "positions must ascend"
    _, projector = hf_parts(model)
    with torch.no_grad():
        expected = projector(tokens.float())
    print(f"ORT embeddings vs projector(oracle tokens): relative {rel_err(emb, expected):.2e}")
    assert rel_err(emb, expected) < 1e-4


# --- 3. the baseline ----------------------------------------------------------------------------


def test_no_apet_baseline_emits_all_tokens(full, preset, rng):
    model, config = preset
    data = manifest_of(full)
    assert data["apet"] is None
    assert data["num_visual_tokens"] == N == data["vision"]["num_patches"]
    assert data["io"]["outputs"][0]["shape"] == ["batch", N, config.text_config.hidden_size]
    assert data["io"]["outputs"][1]["shape"] == ["batch", N]
    pixels = torch.randn(2, 3, 336, 336, generator=rng)
    emb, pos = ort_run(full, pixels)
    assert torch.equal(pos, torch.arange(N).expand(2, N))
    assert rel_err(emb, hf_image_features(model, pixels)) < 1e-4
    assert manifest_of(full)["build"]["keep"] is None and manifest_of(full)["build"]["no_apet"] is True


@pytest.mark.parametrize(
    "fields, keep",
    [(dict(), 64), (dict(basis=8, start=3), 64), (dict(no_apet=True), None), (dict(keep=32), 32)],
)
def test_omitting_every_budget_builds_the_paper_setting(tmp_path, monkeypatch, fields, keep):
    """No --keep / --keep-ratio / --budget / --llm-stage: the family's paper budget (LLaVA-1.5: T=64),
    with the other options as given; --no-apet is the only way to the uncompressed baseline."""
    captured = {}

    def stop(engine, path, **kw):  # capture the module being exported, then stop the build
        captured["compressor"] = engine.compressor
        raise RuntimeError("stop here")

    monkeypatch.setattr(build_module, "export_vision_onnx", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        build(BuildConfig(model=PRESET, out=str(tmp_path / "e"), **fields), quiet=True)
    compressor = captured["compressor"]
    assert (compressor.config.keep if compressor is not None else None) == keep
    if compressor is not None:
        assert (compressor.config.basis, compressor.config.start) == (fields.get("basis", K), fields.get("start", 0))
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []


# --- 4. the graph -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["t64", "full"])
def test_graph_is_valid_and_tensorrt_parsable(which, t64, full):
    path = (t64[0] if which == "t64" else full) / "vision.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    t = T if which == "t64" else N

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    for graph in (model.graph, inferred.graph):  # declared in the file, and inferred
        outs = {o.name: o for o in graph.output}
        assert dims(graph.input[0]) == ["batch", 3, 336, 336]
        assert dims(outs["embeddings"]) == ["batch", t, 128]
        assert dims(outs["positions"]) == ["batch", t]
        assert outs["embeddings"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert outs["positions"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert unsupported_ops(path) == []
    assert check_restrictions(path) == []


def test_compressor_name_scope_holds_exactly_the_compressor(t64, tmp_path):
    """export/precision.py reads the compressor's dtypes by the ONNX node-name scope /compressor/
    (and the build refuses a compressor that is not float32 by it): every compute node between the
    tower's selected features and the projector must carry it, and nothing else may."""
    model = onnx.load(str(t64[0] / "vision.onnx"))
    nodes = list(model.graph.node)
    scoped = [n for n in nodes if "/compressor/" in n.name]
    produced = {o for n in scoped for o in n.output}
    initializers = {i.name for i in model.graph.initializer}
    # the one non-constant tensor entering the scope: the features; the ones leaving it: tokens, positions
    constant_outputs = {o for n in nodes if n.op_type == "Constant" for o in n.output}
    entering = {
        i
        for n in scoped
        for i in n.input
        if i and i not in produced and i not in initializers and i not in constant_outputs
    }
    assert len(entering) == 1
    [features] = entering
    producer = {o: n for n in nodes for o in n.output}
    assert producer[features].op_type == "Slice"  # hidden_states[-2][:, 1:]
    assert "/vision_tower/" in producer[producer[features].input[0]].name
    scoped_names = {n.name for n in scoped}
    leaving = {i for n in nodes if n.name not in scoped_names for i in n.input if i in produced}
    leaving |= produced & {o.name for o in model.graph.output}
    outside = {n.name for n in nodes if n.name not in scoped_names and set(n.input) & leaving}
    assert outside and all(c.startswith("/projector/") for c in outside), outside
    assert "positions" in leaving

    # structurally: descendants of the features that are ancestors of what leaves = the scope
    consumers = collections.defaultdict(list)
    for n in nodes:
        for i in n.input:
            consumers[i].append(n)
    down, todo = set(), [features]
    while todo:
        for n in consumers[todo.pop()]:
            if n.name not in down:
                down.add(n.name)
                todo.extend(n.output)
    up, todo = set(), list(leaving)
    while todo:
        tensor = todo.pop()
        if tensor in producer and producer[tensor].name not in up:
            up.add(producer[tensor].name)
            todo.extend(producer[tensor].input)
    region = down & up
    assert region == {n.name for n in scoped if n.op_type != "Constant"}
    assert not [n.name for n in nodes if n.name not in region and n.op_type != "Constant" and "/compressor/" in n.name]

    # and the scope is the whole compressor: the same ops as ApetCompressor exported on its own
    alone = onnx.load(
        str(export_compressor_onnx(ApetConfig(keep=T, basis=K), tmp_path / "c.onnx", num_tokens=N, dim=64))
    )
    count = lambda ns: collections.Counter(n.op_type for n in ns if n.op_type != "Constant")  # noqa: E731
    assert count(scoped) == count(alone.graph.node)


# --- 5. the manifest ----------------------------------------------------------------------------


def documented_manifest() -> dict:
    """The example manifest of docs/ENGINE_DIR.md, comments stripped."""
    text = (ROOT / "docs" / "ENGINE_DIR.md").read_text()
    block = re.search(r"## manifest\.json\s+```jsonc\n(.*?)```", text, re.S).group(1)
    return json.loads(re.sub(r"//[^\n]*", "", block).replace("{ ... }", "{}"))


def documented_trtllm_keys() -> set[str]:
    """The keys of decoder.tensorrt_llm, given in the doc's comment after `"tensorrt_llm": null`."""
    text = (ROOT / "docs" / "ENGINE_DIR.md").read_text()
    lines = text[text.index('"tensorrt_llm": null') :].splitlines()
    comment = [lines[0]] + [ln for ln in lines[1:4] if ln.strip().startswith("//")]
    return set(re.findall(r'"(\w+)":', " ".join(comment))) - {"tensorrt_llm"}


def missing_keys(doc: dict, got: dict, where: str = "") -> list[str]:
    missing = []
    for key, value in doc.items():
        if key not in got:
            missing.append(where + key)
        elif isinstance(value, dict) and key not in ("files", "processor") and isinstance(got[key], dict):
            missing += missing_keys(value, got[key], f"{where}{key}.")
    return missing


def test_manifest_has_every_documented_field(t64, preset):
    _, config = preset
    doc, data = documented_manifest(), manifest_of(t64[0])
    assert len(doc) > 15 and "files" in doc  # the doc parsed
    assert missing_keys(doc, data) == []
    assert (data["format"], data["manifest_version"]) == ("apet-trt-engine", 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["created_utc"])
    assert data["model"] == {"id": PRESET, "source": "preset", "family": "llava"}
    assert data["external_checkpoint"] is None  # a preset: everything is inside the directory
    assert data["vision"] == {
        "feature_layer": -2,
        "select_strategy": "default",
        "image_size": 336,
        "patch_size": 14,
        "num_patches": N,
        "feature_dim": 64,
    }
    assert data["apet"] == {"keep": T, "basis": K, "merge": True, "ridge": 1e-5, "start": 0}
    assert data["num_visual_tokens"] == T
    text = config.text_config
    assert data["llm"]["hidden_size"] == text.hidden_size and data["llm"]["vocab_size"] == text.vocab_size
    assert data["llm"]["image_token_id"] == config.image_token_id
    assert data["io"] == {
        "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 336, 336]}],
        "outputs": [
            {"name": "embeddings", "dtype": "float32", "shape": ["batch", T, text.hidden_size]},
            {"name": "positions", "dtype": "int64", "shape": ["batch", T]},
        ],
    }
    assert data["batch"] == {"min": 1, "opt": 1, "max": 8}
    assert data["precision"] == {"vision": "fp32", "compressor": "fp32"}
    assert data["processor"]["crop_size"] == {"height": 336, "width": 336}
    assert data["engines"]["onnx"] == "vision.onnx"
    assert data["decoder"]["transformers"] == {"checkpoint": "hf", "weights": "saved"}
    assert set(doc["versions"]) <= set(data["versions"])
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["onnx"] == onnx.__version__


def test_manifest_checksums_every_file_and_the_runtime_accepts_it(t64):
    engine = t64[0]
    data = manifest_of(engine)
    on_disk = {p.relative_to(engine).as_posix(): p for p in engine.rglob("*") if p.is_file()}
    del on_disk["manifest.json"]
    assert list(data["files"]) == sorted(on_disk)  # every file, sorted, POSIX, relative
    for rel, entry in data["files"].items():
        blob = on_disk[rel].read_bytes()
        assert entry == {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}, rel
    assert {
        "vision.onnx",
        "processor/preprocessor_config.json",
        "tokenizer/tokenizer_config.json",
        "hf/config.json",
    } <= set(data["files"])
    manifest = load_manifest(engine, verify=True)  # the reader accepts what the writer wrote
    assert manifest.data == data
    assert manifest.num_visual_tokens == T and manifest.num_patches == N


@pytest.mark.parametrize("victim", ["processor/preprocessor_config.json", "vision.onnx"])
def test_a_file_changed_after_the_build_fails_inspect(t64, tmp_path, victim):
    engine = tmp_path / "engine"
    shutil.copytree(t64[0], engine)
    rc, _, err = cli("inspect", str(engine))
    assert rc == 0, err
    path = engine / victim
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # same size, one byte flipped
    path.write_bytes(bytes(blob))
    rc, _, err = cli("inspect", str(engine))
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert victim in lines[0] and lines[0].startswith("apet inspect: error:")


# --- 7. configuration errors --------------------------------------------------------------------

BAD_OPTIONS = [
    # (CLI options, BuildConfig fields, exception, what the message must name)
    (["--keep", "577"], dict(keep=577), ValueError, r"keep=577"),
    (["--keep", "10", "--basis", "10"], dict(keep=10, basis=10), ValueError, r"keep=10, basis=10"),
    (["--keep", "8", "--basis", "10"], dict(keep=8, basis=10), ValueError, r"keep=8"),
    (["--keep", "64", "--basis", "0"], dict(keep=64, basis=0), ValueError, r"basis=0"),
    (["--keep", "64", "--start", "576"], dict(keep=64, start=576), ValueError, r"start=576"),
    (["--keep", "64", "--start", "-1"], dict(keep=64, start=-1), ValueError, r"start=-1"),
    (["--keep", "64", "--max-batch", "0"], dict(keep=64, max_batch=0), ValueError, r"max_batch=0"),
    (["--keep", "64", "--opt-batch", "9"], dict(keep=64, opt_batch=9), ValueError, r"opt_batch=9"),
]


@pytest.mark.parametrize(
    "options, fields, exc, pattern", BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_options_are_rejected_before_anything_is_written(tmp_path, capsys, options, fields, exc, pattern):
    out = tmp_path / "deep" / "engine"
    with pytest.raises(exc, match=pattern):
        build(BuildConfig(model=PRESET, out=str(out), **fields), quiet=True)
    assert main(["build", "--model", PRESET, *options, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("apet build: error:") and re.search(pattern, lines[0])
    assert list(tmp_path.iterdir()) == []  # no directory, not even the parent or the work dir


@pytest.mark.parametrize(
    "model, pattern",
    [("tiny-lava", r"tiny-lava.*neither a preset"), ("/nonexistent/llava-ckpt", r"/nonexistent/llava-ckpt")],
)
def test_unknown_model_is_rejected(tmp_path, capsys, model, pattern):
    out = tmp_path / "engine"
    with pytest.raises(FileNotFoundError, match=pattern):
        build(BuildConfig(model=model, out=str(out), keep=64), quiet=True)
    assert main(["build", "--model", model, "--keep", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(pattern, err)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_that_is_not_a_checkpoint_is_rejected(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    assert main(["build", "--model", str(tmp_path / "ckpt"), "--keep", "64", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and str(tmp_path / "ckpt") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_existing_output_is_not_replaced_without_force(tmp_path, capsys):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["build", "--model", PRESET, "--keep", "64", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err and len(err.strip().splitlines()) == 1
    # --force replaces engine directories only
    assert main(["build", "--model", PRESET, "--keep", "64", "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not an engine directory" in err
    assert tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    assert leftovers(tmp_path) == []
    # a regular file in the way is refused too, --force or not
    target = tmp_path / "file"
    target.write_text("x")
    for force in ([], ["--force"]):
        assert main(["build", "--model", PRESET, "--keep", "64", "--out", str(target), *force]) == 2
        assert "not a directory" in capsys.readouterr().err
    assert target.read_text() == "x"


def test_an_empty_existing_directory_is_used(tmp_path, monkeypatch):
    """An empty --out is not 'existing work': no --force needed (checked up to the export step)."""
    out = tmp_path / "engine"
    out.mkdir()
    monkeypatch.setattr(
        build_module, "export_vision_onnx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here"))
    )
    with pytest.raises(RuntimeError, match="stop here"):
        build(BuildConfig(model=PRESET, out=str(out), keep=64), quiet=True)
    assert out.is_dir() and list(out.iterdir()) == [] and leftovers(tmp_path) == []


def test_failure_mid_way_leaves_an_existing_engine_intact(t64, tmp_path, monkeypatch, capsys):
    engine = tmp_path / "engine"
    shutil.copytree(t64[0], engine)
    before = tree(engine)

    def fail(root, fields):  # the last step: everything else is already in the work dir
        assert (root / "vision.onnx").is_file() and root.name == ".engine.building"
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(build_module.manifest_writer, "write_manifest", fail)
    rc = main(["build", "--model", PRESET, "--keep", "32", "--basis", "8", "--out", str(engine), "--force"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.strip().splitlines()[-1] == "apet build: error: RuntimeError: disk full (simulated)"
    assert "Traceback" not in captured.err
    assert tree(engine) == before
    load_manifest(engine, verify=True)
    assert leftovers(tmp_path) == []


def test_failure_mid_way_leaves_no_partial_directory(tmp_path, monkeypatch, capsys):
    def fail(module, path, **kw):  # half an ONNX file, then an error
        Path(path).write_bytes(b"half")
        raise RuntimeError("export failed (simulated)")

    monkeypatch.setattr(build_module, "export_vision_onnx", fail)
    out = tmp_path / "new" / "sub" / "engine"
    assert main(["build", "--model", PRESET, "--keep", "64", "--out", str(out)]) == 2
    assert "export failed (simulated)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the engine nor the parents the build created


# --- 8. --force, --no-merge, --start ------------------------------------------------------------


def test_force_replaces_the_engine_directory(forced):
    engine, before = forced
    assert "vision.onnx.data" in before
    after = tree(engine)
    assert "vision.onnx.data" not in after  # nothing of the old build survives
    assert after["vision.onnx"] != before["vision.onnx"]
    load_manifest(engine, verify=True)
    assert leftovers(engine.parent) == []
    data = manifest_of(engine)
    assert data["apet"] == {"keep": T, "basis": K, "merge": False, "ridge": 1e-5, "start": 100}
    assert data["build"]["merge"] is False and data["build"]["start"] == 100


def test_no_merge_and_start_change_the_outcome(forced, t64, preset, rng):
    engine = forced[0]
    model, config = preset
    apet = ApetConfig(keep=T, basis=K, merge=False, start=100)
    pixels = well_posed_pixels(model, config, apet, 2, rng)
    emb, pos = ort_run(engine, pixels)
    features = tower_features(model, config, pixels)
    tokens, positions = compress_reference(features, apet)
    assert torch.equal(pos, positions)
    for b in range(2):  # the first FPS seed is token 100
        assert decide(features[b].double(), apet).seeds[0] == 100
    # start matters: the default engine (start 0) keeps another set on the same pixels
    _, pos_default = ort_run(t64[0], pixels)
    assert not torch.equal(pos, pos_default)
    assert torch.equal(pos_default, compress_reference(features, ApetConfig(keep=T, basis=K))[1])
    # no merge: every kept non-seed token is projected untouched, as Transformers projects it
    projected = hf_image_features(model, pixels)
    for b in range(2):
        slots = set(decide(features[b].double(), apet).seed_slots)
        plain = [i for i, p in enumerate(pos[b].tolist()) if p not in slots]
        assert len(plain) == T - K
        assert rel_err(emb[b, plain], projected[b, pos[b, plain]]) < 1e-4
    _, projector = hf_parts(model)
    with torch.no_grad():
        assert rel_err(emb, projector(tokens.float())) < 1e-4


# --- 9. TensorRT and TensorRT-LLM ---------------------------------------------------------------


def _has_cuda() -> bool:
    try:
        import tensorrt as trt

        return trt.Builder(trt.Logger(trt.Logger.ERROR)) is not None
    except Exception:
        return False


def test_tensorrt_engine_builds_and_matches_onnxruntime(t64, tmp_path, rng):
    pytest.importorskip(
        "tensorrt",
        reason="TensorRT is not installable on this CPU-only machine (needs an "
        "NVIDIA GPU and the tensorrt wheel); covered wherever it imports",
    )
    pytest.importorskip("polygraphy", reason="Polygraphy drives the TensorRT build")
    if not _has_cuda():
        pytest.skip("tensorrt imports but no CUDA device can create a builder")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    result = tensorrt_build.build_tensorrt(
        t64[0] / "vision.onnx",
        tmp_path / "vision.plan",
        input_name="pixel_values",
        image_size=336,
        max_batch=4,
    )
    assert result.plan.is_file() and result.timing_cache.is_file()
    assert result.agreement.passed(reduced_precision=True), result.agreement
    assert result.record["strongly_typed"] is True and result.record["dtypes"]["compressor"] == "fp32"
    pixels = torch.randn(3, 3, 336, 336, generator=rng)
    with TrtRunner(EngineFromBytes(BytesFromPath(str(result.plan)))) as runner:
        got = runner.infer({"pixel_values": pixels.numpy()})
    emb, pos = ort_run(t64[0], pixels)
    assert np.array_equal(np.asarray(got["positions"]), pos.numpy())


def test_tensorrt_llm_engine_builds(t64, tmp_path):
    pytest.importorskip(
        "tensorrt_llm",
        reason="TensorRT-LLM is not installable on this CPU-only machine (needs "
        "an NVIDIA GPU); covered wherever it imports",
    )
    entry = trtllm_build.build_trtllm(
        t64[0] / "hf",
        tmp_path / "llm",
        trtllm_build.TrtllmBuildConfig(max_batch_size=2, num_visual_tokens=T, dtype="float32"),
        tmp_path,
    )
    assert entry["max_multimodal_len"] == 2 * T
    assert (tmp_path / "llm" / "config.json").is_file()
    assert not (tmp_path / "trtllm_checkpoint").exists()


def test_without_tensorrt_the_build_says_so_and_records_null(t64):
    if tensorrt_build.tensorrt_version() is None:
        assert "TensorRT is not importable: wrote the ONNX engine only" in t64[1]
        assert manifest_of(t64[0])["engines"]["tensorrt"] is None
        assert manifest_of(t64[0])["versions"]["tensorrt"] is None
        assert manifest_of(t64[0])["plans"] == {}
    if trtllm_build.tensorrt_llm_version() is None:
        assert "tensorrt_llm is not importable" in t64[1]
        assert manifest_of(t64[0])["decoder"]["tensorrt_llm"] is None
    if tensorrt_build.tensorrt_version() and trtllm_build.tensorrt_llm_version():
        pytest.skip("both TensorRT and TensorRT-LLM import here: the real builds are tested instead")


@pytest.mark.parametrize("batch, t", [(8, 64), (1, 576), (3, 11)])
def test_trtllm_table_is_sized_max_batch_times_t(batch, t):
    cfg = trtllm_build.TrtllmBuildConfig(max_batch_size=batch, num_visual_tokens=t)
    assert cfg.max_multimodal_len == batch * t
    assert cfg.max_input_len == cfg.max_text_len + t


def test_trtllm_build_wiring_with_tensorrt_llm_emulated(tmp_path, monkeypatch):
    """The real build_trtllm and build.py around it, with the tensorrt_llm package and the
    trtllm-build command replaced by recorders: the converter gets the saved HF checkpoint in the
    LLM's dtype, trtllm-build gets --max_multimodal_len max_batch*T, and the manifest records the
    engine as docs/ENGINE_DIR.md describes."""
    calls = {}

    class FakeLlama:
        @classmethod
        def from_hugging_face(cls, path, dtype):
            calls["convert"] = (path, dtype)
            return cls()

        def save_checkpoint(self, path, save_config):
            Path(path).mkdir(parents=True)
            (Path(path) / "config.json").write_text("{}")

    def fake_run(cmd, check):
        calls["cmd"] = cmd
        out = Path(cmd[cmd.index("--output_dir") + 1])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "rank0.engine").write_bytes(b"engine")

    package = types.ModuleType("tensorrt_llm")
    package.__version__ = "0.0.emulated"
    models = types.ModuleType("tensorrt_llm.models")
    models.LLaMAForCausalLM = FakeLlama
    package.models = models
    monkeypatch.setitem(sys.modules, "tensorrt_llm", package)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.models", models)
    monkeypatch.setattr(trtllm_build.shutil, "which", lambda name: "/emulated/bin/" + name)
    monkeypatch.setattr(trtllm_build.subprocess, "run", fake_run)

    out = tmp_path / "engine"
    data = build(BuildConfig(model=PRESET, out=str(out), keep=32, basis=8, max_batch=2, tensorrt=False), quiet=True)
    path, dtype = calls["convert"]
    assert Path(path).name == "hf" and dtype == data["llm"]["dtype"]
    cmd = calls["cmd"]
    arg = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert arg("--max_multimodal_len") == str(2 * 32)
    assert arg("--max_batch_size") == "2" and arg("--max_input_len") == str(512 + 32)
    entry = data["decoder"]["tensorrt_llm"]
    assert documented_trtllm_keys() <= set(entry)
    assert entry["engine_dir"] == "llm" and entry["max_multimodal_len"] == 64 and entry["max_batch_size"] == 2
    assert entry["dtype"] == data["llm"]["dtype"]  # the prompt table's dtype is the engine's
    assert data["versions"]["tensorrt_llm"] == "0.0.emulated"
    assert "llm/rank0.engine" in data["files"] and not any(f.startswith("trtllm_checkpoint") for f in data["files"])
    load_manifest(out, verify=True)


# --- 10. the summary ----------------------------------------------------------------------------


def test_summary_names_n_to_t_and_file_sizes(t64):
    engine, stdout = t64
    assert re.search(
        rf"^engine directory {re.escape(str(engine))}\s+\(N={N} -> T={T} visual tokens per image\)$", stdout, re.M
    ), stdout
    data = manifest_of(engine)
    size = data["files"]["vision.onnx"]["bytes"] / 2**20
    assert re.search(rf"vision\.onnx\s+{size:.2f} MiB", stdout), stdout
    total = sum(e["bytes"] for e in data["files"].values()) / 2**20
    assert f"{len(data['files'])} files, {total:.1f} MiB in all" in stdout
    assert stdout.index("[1/7]") < stdout.index("[7/7]") < stdout.index("engine directory")


def test_weights_over_the_protobuf_limit_go_to_external_data(t64, tmp_path, monkeypatch):
    """Vision models over ~1.8 GB of weights (beyond LLaVA-1.5-7B's 1.2 GB tower) are written as
    vision.onnx + vision.onnx.data; the limit is lowered here so tiny-llava takes that path. The
    directory verifies, lists the data file, and the runtime keeps what the single-file engine keeps."""
    from apet_trt import runtime
    from apet_trt.export import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)
    export = torch.onnx.export

    def export_like_over_2gb(module, args, f, **kwargs):  # what torch does past 2 GB: a file per weight
        export(module, args, f, **kwargs)
        onnx.save_model(onnx.load(f), f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", export_like_over_2gb)
    engine, _ = build_cli(tmp_path / "external", "--keep", str(T), "--basis", str(K))
    files = manifest_of(engine)["files"]
    assert "vision.onnx.data" in files
    assert sorted(f for f in files if "/" not in f) == ["vision.onnx", "vision.onnx.data"]  # no file per weight
    assert files["vision.onnx"]["bytes"] < files["vision.onnx.data"]["bytes"]
    single = onnx.load(str(t64[0] / "vision.onnx"))
    large = sum(len(i.raw_data) for i in single.graph.initializer if len(i.raw_data) >= 1024)
    assert large > 0 and files["vision.onnx.data"]["bytes"] >= large  # every tensor of 1 KiB or more moved out
    photo = str(ROOT / "assets" / "grace_hopper.jpg")
    emb_ext, pos_ext = stack_rows(runtime.load(engine, backend="onnxruntime").encode(photo))
    emb, pos = stack_rows(runtime.load(t64[0], backend="onnxruntime").encode(photo))
    assert torch.equal(pos_ext, pos) and torch.equal(emb_ext, emb)
