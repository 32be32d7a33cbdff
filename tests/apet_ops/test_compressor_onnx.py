"""The compressor exported alone: a valid, TensorRT-parsable ONNX graph that ONNX Runtime and
onnx's own ReferenceEvaluator run to the same answer as PyTorch and the oracle."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from apet_trt.apet_ops import ApetCompressor, ApetConfig, compress_reference, export_compressor_onnx
from apet_trt.apet_ops.onnx_export import validate_onnx
from apet_trt.apet_ops.trt_ops import check_restrictions, runtime_limits, unsupported_ops
from helpers.apet_cases import duplicated_tokens, well_posed

N, D = 196, 64
CONFIG = ApetConfig(keep=32, basis=8, start=3)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return export_compressor_onnx(
        CONFIG, tmp_path_factory.mktemp("onnx") / "apet.onnx", num_tokens=N, dim=D, max_batch=8
    )


def test_graph_is_valid_and_trt_parsable(onnx_path):
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    outputs = {o.name: o for o in inferred.graph.output}
    assert [i.name for i in model.graph.input] == ["features"]
    assert set(outputs) == {"tokens", "positions"}
    assert outputs["positions"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    dims = [d.dim_param or d.dim_value for d in outputs["tokens"].type.tensor_type.shape.dim]
    assert dims == ["batch", CONFIG.keep, D]
    assert model.opset_import[0].version >= 17
    assert unsupported_ops(model) == []
    validate_onnx(onnx_path)  # the same checks as the export path runs
    assert {p.key for p in model.metadata_props} >= {"apet_config", "max_batch"}


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_equals_pytorch_and_oracle(onnx_path, rng, batch):
    x = well_posed(lambda g: torch.randn(N, D, generator=g) * 2, CONFIG, batch, rng)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tokens, positions = session.run(None, {"features": x.numpy()})
    torch_tokens, torch_positions = ApetCompressor(CONFIG)(x)
    ref_tokens, ref_positions = compress_reference(x, CONFIG)
    np.testing.assert_array_equal(positions, torch_positions.numpy())
    np.testing.assert_array_equal(positions, ref_positions.numpy())
    np.testing.assert_allclose(tokens, torch_tokens.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tokens, ref_tokens.numpy(), rtol=1e-4, atol=1e-5)


def test_onnxruntime_on_exact_ties(onnx_path, rng):
    x = duplicated_tokens(rng, 2, N, D)
    tokens, positions = ort.InferenceSession(str(onnx_path)).run(None, {"features": x.numpy()})
    ref_tokens, ref_positions = compress_reference(x, CONFIG)
    np.testing.assert_array_equal(positions, ref_positions.numpy())
    np.testing.assert_allclose(tokens, ref_tokens.numpy(), rtol=1e-4, atol=1e-5)


def test_reference_evaluator_agrees_with_onnxruntime(tmp_path, rng):
    """A second, independent ONNX runtime on a small case."""
    config = ApetConfig(keep=9, basis=3)
    path = export_compressor_onnx(config, tmp_path / "small.onnx", num_tokens=30, dim=8)
    x = well_posed(lambda g: torch.randn(30, 8, generator=g), config, 2, rng).numpy()
    ort_out = ort.InferenceSession(str(path)).run(None, {"features": x})
    ref_out = ReferenceEvaluator(str(path)).run(None, {"features": x})
    np.testing.assert_array_equal(ort_out[1], ref_out[1])
    np.testing.assert_allclose(ort_out[0], ref_out[0], rtol=1e-4, atol=1e-5)


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep=32 is larger than the number of tokens N=20"):
        export_compressor_onnx(CONFIG, tmp_path / "x.onnx", num_tokens=20, dim=D)
    with pytest.raises(ValueError, match="max_batch"):
        export_compressor_onnx(CONFIG, tmp_path / "x.onnx", num_tokens=N, dim=D, max_batch=0)


# --- a symbolic token count (Qwen2.5-VL's dynamic resolution) and a per-image start input ------

RATIO = ApetConfig(keep_ratio=0.3, basis=4, seed_blend=0.5)


@pytest.fixture(scope="module")
def dynamic_path(tmp_path_factory):
    return export_compressor_onnx(
        RATIO,
        tmp_path_factory.mktemp("onnx") / "dyn.onnx",
        num_tokens=70,
        dim=24,
        dynamic_tokens=True,
        start_input=True,
    )


def test_dynamic_graph_interface(dynamic_path):
    model = onnx.load(str(dynamic_path))
    dims = lambda vi: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert {i.name: dims(i) for i in model.graph.input} == {"features": ["batch", "tokens", 24], "start": ["batch"]}
    assert {o.name: dims(o) for o in model.graph.output} == {
        "tokens": ["batch", "kept", 24],
        "positions": ["batch", "kept"],
    }
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["min_tokens"] == str(RATIO.min_tokens) == "17" and "num_tokens" not in meta
    assert unsupported_ops(model) == [] and check_restrictions(model) == []
    # T = floor(0.3 N) is computed in the graph, so TopK's K is a run-time value: legal for
    # TensorRT (>= 8.6), which fails at run time above 3840 - recorded, not refused
    assert runtime_limits(model) and all("3840" in line for line in runtime_limits(model))
    assert meta["trt_max_tokens"] == "12803"  # floor(0.3 * 12803) = 3840, floor(0.3 * 12804) = 3841
    # nothing in the graph is sized by the example's N (70): no constant of that length
    for init in list(model.graph.initializer) + [
        a.t for n in model.graph.node for a in n.attribute if a.name == "value"
    ]:
        assert 70 not in init.dims, f"a constant sized like the example N: {init.name} {list(init.dims)}"


def test_dynamic_graph_serves_every_n(dynamic_path, rng):
    """One exported model, several N (the smallest legal one included): ONNX Runtime == PyTorch ==
    the oracle, with each image's own FPS start."""
    session = ort.InferenceSession(str(dynamic_path), providers=["CPUExecutionProvider"])
    for n in (RATIO.min_tokens, 70, 131, 256):
        starts = torch.randint(0, n, (2,), generator=rng)
        x = well_posed(lambda g, n=n: torch.randn(n, 24, generator=g) * 2, RATIO, 2, rng, starts=starts)
        tokens, positions = session.run(None, {"features": x.numpy(), "start": starts.numpy()})
        torch_tokens, torch_positions = ApetCompressor(RATIO)(x, starts)
        ref_tokens, ref_positions = compress_reference(x, RATIO, start=starts)
        assert positions.shape == (2, int(0.3 * n))
        np.testing.assert_array_equal(positions, ref_positions.numpy())
        np.testing.assert_array_equal(torch_positions.numpy(), ref_positions.numpy())
        np.testing.assert_allclose(tokens, torch_tokens.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tokens, ref_tokens.numpy(), rtol=1e-4, atol=1e-5)


def test_dynamic_graph_reference_evaluator(dynamic_path, rng):
    x = well_posed(lambda g: torch.randn(40, 24, generator=g), RATIO, 2, rng, starts=[3, 39]).numpy()
    feed = {"features": x, "start": np.array([3, 39], dtype=np.int64)}
    ort_out = ort.InferenceSession(str(dynamic_path)).run(None, feed)
    ref_out = ReferenceEvaluator(str(dynamic_path)).run(None, feed)
    np.testing.assert_array_equal(ort_out[1], ref_out[1])
    np.testing.assert_allclose(ort_out[0], ref_out[0], rtol=1e-4, atol=1e-5)


def test_dynamic_fixed_keep_down_to_n_equal_keep(tmp_path, rng):
    """A fixed T with a symbolic N: T static in the graph; at N == T the input comes back."""
    config = ApetConfig(keep=12, basis=4, seed_placement="error_rank")
    path = export_compressor_onnx(
        config, tmp_path / "k.onnx", num_tokens=50, dim=8, dynamic_tokens=True, max_tokens=4096
    )
    model = onnx.load(str(path))
    assert [d.dim_value for d in model.graph.output[1].type.tensor_type.shape.dim[1:]] == [12]
    assert runtime_limits(model) == [] and {p.key: p.value for p in model.metadata_props}["max_tokens"] == "4096"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 12, 8, generator=rng)
    tokens, positions = session.run(None, {"features": x.numpy()})
    np.testing.assert_array_equal(tokens, x.numpy())
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(12), (2, 12)))
    for n in (13, 90):
        x = well_posed(lambda g, n=n: torch.randn(n, 8, generator=g), config, 2, rng)
        tokens, positions = session.run(None, {"features": x.numpy()})
        ref_tokens, ref_positions = compress_reference(x, config)
        np.testing.assert_array_equal(positions, ref_positions.numpy())
        np.testing.assert_allclose(tokens, ref_tokens.numpy(), rtol=1e-4, atol=1e-5)


def test_dynamic_export_arguments(tmp_path):
    with pytest.raises(ValueError, match="largest N it allows is 12803"):
        export_compressor_onnx(RATIO, tmp_path / "x.onnx", num_tokens=70, dim=8, dynamic_tokens=True, max_tokens=16384)
    with pytest.raises(ValueError, match="below the smallest N this config takes"):
        export_compressor_onnx(RATIO, tmp_path / "x.onnx", num_tokens=70, dim=8, dynamic_tokens=True, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens is for dynamic_tokens=True"):
        export_compressor_onnx(CONFIG, tmp_path / "x.onnx", num_tokens=N, dim=8, max_tokens=400)
    with pytest.raises(ValueError, match=r"T=floor\(0.3\*16\)=4 of N=16 tokens, which must be > basis=4"):
        export_compressor_onnx(RATIO, tmp_path / "x.onnx", num_tokens=16, dim=8, dynamic_tokens=True)


# --- memory: nothing of size N x N -------------------------------------------------------------

ODD_N = 131  # a size no other dimension has (D, T, k, batch)


def intermediate_shapes(path, feed) -> dict[str, tuple]:
    """Every tensor the graph computes, with its shape on this input: ONNX Runtime run with each
    node output (typed by shape inference) made a graph output."""
    model = onnx.load(str(path))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    names = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in names:
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
                names.add(name)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feed)
    return {o.name: value.shape for o, value in zip(session.get_outputs(), outputs)}


@pytest.mark.parametrize(
    "config",
    [ApetConfig(keep=40, basis=7), ApetConfig(keep_ratio=0.3, basis=7, seed_placement="error_rank", seed_blend=0.5)],
    ids=["position", "ratio_error_rank_blend"],
)
def test_no_n_by_n_intermediate_in_the_graph(tmp_path, config, rng):
    """No tensor the exported graph computes has two axes of length N, and none is larger than
    B * N * max(D, T): memory is O(N*D + N*T) (the ranking is a TopK value plus a running count,
    not an N x N comparison)."""
    path = export_compressor_onnx(config, tmp_path / "m.onnx", num_tokens=ODD_N, dim=24, dynamic_tokens=True)
    x = torch.randn(2, ODD_N, 24, generator=rng)
    shapes = intermediate_shapes(path, {"features": x.numpy()})
    assert len(shapes) > 300
    square = {name: shape for name, shape in shapes.items() if list(shape).count(ODD_N) >= 2}
    assert not square, f"N x N intermediates: {square}"
    bound = 2 * ODD_N * max(24, config.keep_for(ODD_N))
    biggest = max(shapes.items(), key=lambda item: np.prod(item[1]))
    assert np.prod(biggest[1]) <= bound, f"{biggest} is larger than B*N*max(D, T) = {bound}"


def test_no_n_by_n_intermediate_in_eager(rng):
    """The same for the eager graph form (what a decoder calls for stage 2): every op's inputs,
    as the profiler records them."""
    from torch.profiler import profile

    config = ApetConfig(keep=40, basis=7, seed_placement="error_rank")
    x = torch.randn(2, ODD_N, 24, generator=rng)
    with profile(record_shapes=True) as prof, torch.inference_mode():
        ApetCompressor(config)(x, torch.tensor([0, 5]))
    shapes = [shape for event in prof.events() for shape in event.input_shapes if isinstance(shape, list)]
    assert len(shapes) > 100
    assert not [s for s in shapes if s.count(ODD_N) >= 2]
