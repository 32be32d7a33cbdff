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
from apet_trt.apet_ops.trt_ops import unsupported_ops
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
