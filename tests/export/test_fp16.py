"""`apet build --fp16`: the precision is the graph's (issue 10, docs/ENGINE_DIR.md "Precision and plans").

What each group shows:
  graph      vision.onnx's tower and projector weights are float16, and every floating tensor a node
             under /compressor/ computes is float32 except the one cast out to the projector (an
             onnx shape-inference walk written here, independent of export/precision.py, which is
             then checked to read the same facts); the build refuses a compressor that is not float32
  oracle     kept positions equal apet_ops.compress_reference on the fp16 graph's own features (a
             copy of the graph with the compressor's input as an extra output, run by ONNX Runtime),
             embeddings equal the float16 projector applied to the oracle's tokens
  run        `apet run` on the fp16 engine directory (ONNX Runtime CPU)
  photo      the quick-start photo through the fp16 and the fp32 engines: kept positions and
             embeddings compared (numbers printed)
  plans      plan_record's fields are the documented ones; a build with TensorRT emulated records the
             plan in the manifest, and the runtime then judges it against the machine
"""

from __future__ import annotations

import copy
import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.export import build as build_module
from apet_trt.export import precision, tensorrt_build
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.presets import build_preset
from apet_trt.runtime import plans as runtime_plans
from apet_trt.runtime.backends import choose_backend
from apet_trt.runtime.manifest import load_manifest
from apet_trt.scripts.cli import main
from helpers.apet_cases import MARGIN, decision_margin
from helpers.engines import stack_rows

ROOT = Path(__file__).resolve().parents[2]
PHOTO = str(ROOT / "assets" / "grace_hopper.jpg")
T, K = 64, 10
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    """(dir, summary) of `apet build --model tiny-llava --keep 64 --fp16 --out DIR` (ONNX only here)."""
    out = tmp_path_factory.mktemp("fp16") / "tiny-t64-fp16"
    rc, stdout, stderr = cli("build", "--model", "tiny-llava", "--keep", str(T), "--fp16", "--out", str(out))
    assert rc == 0, stderr
    return out, stdout


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp32") / "tiny-t64"
    rc, _, stderr = cli("build", "--model", "tiny-llava", "--keep", str(T), "--out", str(out))
    assert rc == 0, stderr
    return out


@pytest.fixture(scope="module")
def preset():
    model, config, *_ = build_preset("tiny-llava")
    return model, config


def inferred(path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types |= {i.name: i.data_type for i in model.graph.initializer}
    return model, types


# --- the graph ----------------------------------------------------------------------------------


def test_tower_and_projector_weights_are_float16(fp16, fp32):
    model = onnx.load(str(fp16[0] / "vision.onnx"))
    floating = [i for i in model.graph.initializer if i.data_type in FLOATS]
    assert floating and {i.data_type for i in floating} == {TensorProto.FLOAT16}
    # read by the tower's and the projector's nodes (directly, or through the exporter's Identity
    # nodes that share a deduplicated weight)
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    dtype = {i.name: i.data_type for i in floating}
    for part in ("/vision_tower/", "/projector/"):
        read = {alias.get(i, i) for n in model.graph.node if n.name.startswith(part) for i in n.input}
        weights = read & set(dtype)
        assert len(weights) >= (2 if part == "/projector/" else 10), part
        assert {dtype[w] for w in weights} == {TensorProto.FLOAT16}
    # the same weights as the float32 build, half the bytes
    reference = onnx.load(str(fp32 / "vision.onnx"))
    size = lambda m: sum(np.prod(i.dims) for i in m.graph.initializer if i.data_type in FLOATS)  # noqa: E731
    assert size(model) == size(reference)
    assert {i.data_type for i in reference.graph.initializer if i.data_type in FLOATS} == {TensorProto.FLOAT}
    weight_bytes = lambda m: sum(len(i.raw_data) for i in m.graph.initializer if i.data_type in FLOATS)  # noqa: E731
    assert 2 * weight_bytes(model) == weight_bytes(reference)


def test_every_tensor_computed_under_the_compressor_is_float32(fp16):
    model, types = inferred(fp16[0] / "vision.onnx")
    nodes = list(model.graph.node)
    scoped = [n for n in nodes if n.name.startswith("/compressor/")]
    assert len(scoped) > 300
    produced = [(n, out) for n in scoped for out in n.output if types.get(out) in FLOATS]
    not_float = [(n, out) for n, out in produced if types[out] != TensorProto.FLOAT]
    assert len(produced) > 300
    # exactly one: the cast of the tokens back to the tower's dtype, read by the projector only
    assert len(not_float) == 1, [out for _, out in not_float]
    [(cast, out)] = not_float
    assert cast.op_type == "Cast" and types[out] == TensorProto.FLOAT16
    readers = [n for n in nodes if out in n.input]
    assert readers and all(n.name.startswith("/projector/") for n in readers)
    # what enters the compressor is the tower's float16 features, cast to float32 at once
    entering = {i for n in scoped for i in n.input if types.get(i) == TensorProto.FLOAT16}
    assert len(entering) == 1
    [features] = entering
    first = [n for n in scoped if features in n.input and types.get(n.output[0]) in FLOATS]  # not Shape
    assert first and all(n.op_type == "Cast" and types[n.output[0]] == TensorProto.FLOAT for n in first)
    # the outputs stay float32 embeddings and int64 positions
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"embeddings": TensorProto.FLOAT, "positions": TensorProto.INT64}


def test_export_precision_reads_the_same_facts(fp16, fp32):
    assert precision.part_dtypes(fp16[0] / "vision.onnx") == {
        "vision_tower": "fp16",
        "compressor": "fp32",
        "projector": "fp16",
    }
    assert precision.part_dtypes(fp32 / "vision.onnx") == dict.fromkeys(precision.PARTS, "fp32")
    assert precision.compressor_not_fp32(fp16[0] / "vision.onnx") == []
    data = json.loads((fp16[0] / "manifest.json").read_text())
    assert data["precision"] == {"vision": "fp16", "compressor": "fp32"} and data["build"]["fp16"] is True
    assert "dtypes: vision_tower fp16, compressor fp32, projector fp16" in fp16[1]


def test_a_compressor_computing_in_float16_is_caught():
    """A graph in which the compressor's arithmetic runs in float16 (no cast to float32)."""
    h = TensorProto.FLOAT16
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["f"], name="/vision_tower/MatMul"),
        helper.make_node("Mul", ["f", "f"], ["sq"], name="/compressor/Mul"),  # squared norms in fp16
        helper.make_node("ReduceSum", ["sq"], ["e"], name="/compressor/ReduceSum", keepdims=1),
        helper.make_node("Add", ["f", "e"], ["t"], name="/compressor/Add"),
        helper.make_node("MatMul", ["t", "w"], ["y"], name="/projector/MatMul"),
    ]
    w = helper.make_tensor("w", h, [4, 4], [0.5] * 16)
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", h, [2, 4])],
        [helper.make_tensor_value_info("y", h, [2, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert precision.compressor_not_fp32(model) == ["sq (fp16)", "e (fp16)", "t (fp16)"]
    assert precision.part_dtypes(model)["compressor"] == "fp16"


def test_the_build_refuses_a_compressor_outside_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(build_module, "compressor_not_fp32", lambda path: ["/compressor/Mul_output_0 (fp16)"])
    with pytest.raises(RuntimeError, match=r"compressor computes outside float32: /compressor/Mul_output_0 \(fp16\)"):
        build(BuildConfig(model="tiny-llava", out=str(tmp_path / "e"), keep=T, fp16=True), quiet=True)
    assert list(tmp_path.iterdir()) == []


# --- against the oracle, on the fp16 graph's own features --------------------------------------


def with_features_output(path: Path, out: Path) -> Path:
    """A copy of the graph that also returns the tensor entering the compressor (the tower's
    float16 features [B, N, D], CLS dropped)."""
    model, types = inferred(path)
    scoped = [n for n in model.graph.node if n.name.startswith("/compressor/")]
    produced = {o for n in scoped for o in n.output}
    [features] = {i for n in scoped for i in n.input if types.get(i) == TensorProto.FLOAT16 and i not in produced}
    model.graph.output.append(helper.make_tensor_value_info(features, TensorProto.FLOAT16, None))
    onnx.save(model, str(out))
    return out


def test_kept_positions_equal_the_oracle_on_the_fp16_graphs_own_features(fp16, preset, rng, tmp_path):
    import onnxruntime as ort

    model, _ = preset
    apet = ApetConfig(keep=T, basis=K)
    graph = with_features_output(fp16[0] / "vision.onnx", tmp_path / "with_features.onnx")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    emb, pos, feats = [], [], []
    for _ in range(40):  # images whose oracle decisions have clear margins on the graph's own features
        px = torch.randn(1, 3, 336, 336, generator=rng).numpy()
        e, p, f = session.run(None, {"pixel_values": px})
        if decision_margin(torch.from_numpy(f[0]).double(), apet) > MARGIN:
            emb.append(e), pos.append(p), feats.append(f)
        if len(emb) == 2:
            break
    assert len(emb) == 2, "no well-posed pixels drawn"
    emb, pos, feats = (torch.from_numpy(np.concatenate(a)) for a in (emb, pos, feats))
    assert feats.dtype == torch.float16 and feats.shape == (2, 576, 64)
    tokens, positions = compress_reference(feats.double(), apet)  # the oracle, float64
    assert torch.equal(pos, positions)
    inner = model.model if hasattr(getattr(model, "model", None), "vision_tower") else model  # 5.x / 4.x layout
    projector = copy.deepcopy(inner.multi_modal_projector)
    with torch.no_grad():
        expected = projector.half()(tokens.half()).float()
    rel = float((emb - expected).abs().max() / expected.abs().max())
    print(f"fp16 graph vs float16 projector(oracle tokens): relative {rel:.2e}")
    assert rel < 1e-2


# --- apet run, and the photo through fp16 and fp32 ---------------------------------------------


def test_apet_run_on_the_fp16_engine(fp16):
    rc, stdout, stderr = cli(
        "run", "--engine", str(fp16[0]), "--image", PHOTO, "--prompt", "What is shown?", "--max-new-tokens", "4"
    )
    assert rc == 0, stderr
    assert "vision: onnxruntime" in stdout
    assert re.search(r"576 -> 64 visual tokens kept", stdout), stdout


def test_fp16_and_fp32_engines_on_the_photo(fp16, fp32):
    """The kept set is decided in float32 on float16 features: on the photo it must stay (nearly)
    the fp32 engine's; merged rows may move more (a seed slot or a merge target can flip)."""
    e16, p16 = stack_rows(runtime.load(fp16[0], backend="onnxruntime").encode(PHOTO))
    e32, p32 = stack_rows(runtime.load(fp32, backend="onnxruntime").encode(PHOTO))
    differ = len(set(p32[0].tolist()) - set(p16[0].tolist()))
    rows = (e16 - e32).abs().amax(-1)[0]
    print(
        f"photo, fp16 vs fp32: kept positions differing {differ} of {T}; max |embedding diff| "
        f"{float(rows.max()):.3e} (max |embedding| {float(e32.abs().max()):.3e}); median row "
        f"{float(rows.median()):.2e}; rows over 1e-2 of max: {int((rows > 1e-2 * e32.abs().max()).sum())}"
    )
    assert differ <= T // 10
    assert float(rows.median()) < 1e-2 * float(e32.abs().max())


# --- comparing two runs: what reduced precision may change --------------------------------------


def test_agreement_matches_rows_by_position_and_counts_what_moved(rng):
    """A run in which one kept position was swapped for another and one row moved (a merge target
    flipped), against its reference: rows are compared at the positions both kept, not slot by slot."""
    b, t, h = 2, 16, 8
    ref_pos = torch.stack([torch.randperm(100, generator=rng)[:t].sort().values for _ in range(b)])
    ref_emb = torch.randn(b, t, h, generator=rng, dtype=torch.float64)
    pos, emb = ref_pos.clone(), ref_emb + 1e-6 * torch.randn(b, t, h, generator=rng, dtype=torch.float64)
    # image 0: ref_pos[0, 3] dropped, another position kept instead; every other row where it was
    spare = next(p for p in range(100) if p not in ref_pos[0])
    rows = {int(p): emb[0, i] for i, p in enumerate(ref_pos[0]) if i != 3}
    rows[spare] = torch.randn(h, generator=rng, dtype=torch.float64)
    pos[0] = torch.tensor(sorted(rows))
    emb[0] = torch.stack([rows[p] for p in sorted(rows)])
    emb[1, 5] += 0.5  # one merged row moved
    a = precision.agreement(emb, pos, ref_emb, ref_pos)
    assert (a.slots, a.positions_differ, a.rows) == (b * t, 1, b * t - 1)
    assert a.rows_off == 1 and a.max_abs_diff == pytest.approx(0.5, rel=1e-3)
    assert a.passed(reduced_precision=True) and not a.passed(reduced_precision=False)
    exact = precision.agreement(ref_emb, ref_pos, ref_emb, ref_pos)
    assert (exact.positions_differ, exact.rows_off, exact.max_abs_diff) == (0, 0, 0.0)
    assert exact.passed(reduced_precision=False)
    broken = precision.agreement(ref_emb, torch.flip(ref_pos, [0]), ref_emb, ref_pos)  # another image's set
    assert broken.positions_differ > b * t // 2 and not broken.passed(reduced_precision=True)
    with pytest.raises(ValueError, match="differ in shape"):
        precision.agreement(emb[:, :4], pos[:, :4], ref_emb, ref_pos)


# --- plan records -------------------------------------------------------------------------------


def documented_plan_keys() -> set[str]:
    """The keys of a plan record, given in docs/ENGINE_DIR.md's comment after `"plans": {}`."""
    text = (ROOT / "docs" / "ENGINE_DIR.md").read_text()
    lines = text[text.index('"plans": {}') :].splitlines()
    comment = [ln.split("//", 1)[1] for ln in lines[:8] if "//" in ln]
    record = " ".join(comment)
    record = record[record.index("Each record:") : record.index("}}") + 2]
    return set(re.findall(r'"(\w+)":', record)) - set(precision.PARTS)


@pytest.fixture
def gpu_machine(monkeypatch):
    monkeypatch.setattr(tensorrt_build, "tensorrt_version", lambda: "11.4.0.106")
    monkeypatch.setattr(tensorrt_build, "gpu_facts", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))


def test_plan_record_has_the_documented_fields(fp16, gpu_machine):
    record = tensorrt_build.plan_record(strongly_typed=True, dtypes=precision.part_dtypes(fp16[0] / "vision.onnx"))
    assert (
        set(record) == documented_plan_keys() == {"tensorrt", "gpu", "compute_capability", "strongly_typed", "dtypes"}
    )
    assert record["tensorrt"] == "11.4.0.106" and record["compute_capability"] == "9.0"
    assert record["dtypes"] == {"vision_tower": "fp16", "compressor": "fp32", "projector": "fp16"}


def test_a_build_with_tensorrt_emulated_records_its_plan(tmp_path, monkeypatch, gpu_machine):
    """build.py around a stand-in for build_tensorrt (which needs a GPU): the plan and its record
    land in the manifest, which verifies; the runtime then accepts the plan on the machine that
    built it and refuses it, falling back to ONNX Runtime, on another."""

    def fake_build_tensorrt(onnx_path, plan_path, **kw):
        plan_path.write_bytes(b"plan")
        plan_path.with_name("timing.cache").write_bytes(b"cache")
        record = tensorrt_build.plan_record(strongly_typed=True, dtypes=precision.part_dtypes(onnx_path))
        same = precision.agreement(
            np.ones((2, T, 8)), np.tile(np.arange(T), (2, 1)), np.ones((2, T, 8)), np.tile(np.arange(T), (2, 1))
        )
        return tensorrt_build.TensorRTBuild(plan_path, plan_path.with_name("timing.cache"), same, record)

    monkeypatch.setattr(build_module, "tensorrt_version", lambda: "11.4.0.106")
    monkeypatch.setattr(build_module, "build_tensorrt", fake_build_tensorrt)
    out = tmp_path / "engine"
    data = build(BuildConfig(model="tiny-llava", out=str(out), keep=T, fp16=True, tensorrt_llm=False), quiet=True)
    assert data["engines"]["tensorrt"] == "vision.plan" and "vision.plan" in data["files"]
    assert data["plans"]["tensorrt"] == {
        "tensorrt": "11.4.0.106",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
        "strongly_typed": True,
        "dtypes": {"vision_tower": "fp16", "compressor": "fp32", "projector": "fp16"},
    }
    manifest = load_manifest(out, verify=True)
    monkeypatch.setattr("apet_trt.runtime.backends.tensorrt_available", lambda: (True, ""))
    same = runtime_plans.Machine("11.4.1.2", "9.0")
    monkeypatch.setattr(runtime_plans, "this_machine", lambda: same)
    assert choose_backend(manifest, "auto").name == "tensorrt" and not choose_backend(manifest, "auto").fallback
    other = runtime_plans.Machine("10.14.1.48", "9.0")
    monkeypatch.setattr(runtime_plans, "this_machine", lambda: other)
    choice = choose_backend(manifest, "auto")
    name, why = choice.name, choice.reason
    assert (
        name == "onnxruntime" and choice.fallback and "TensorRT 11.4 built it, this machine has TensorRT 10.14" in why
    )
    assert f"apet build --model tiny-llava --keep {T} --basis 10 --start 0 --max-batch 8 --opt-batch 1 --fp16" in why
