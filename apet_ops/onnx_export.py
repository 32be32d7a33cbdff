"""Export the compressor alone to ONNX, and the checks every exported graph of ours must pass."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

from .config import ApetConfig
from .graph import ApetCompressor

OPSET = 17
INPUT_NAME = "features"
OUTPUT_NAMES = ("tokens", "positions")


def validate_onnx(path: str | os.PathLike) -> None:
    """onnx.checker (path form: works past 2 GB), strict shape inference, and the TensorRT
    op allowlist over the whole graph. Raises ValueError naming what failed."""
    import onnx

    from .trt_ops import assert_trt_compatible

    path = str(path)
    try:
        onnx.checker.check_model(path, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"{path}: onnx.checker failed: {exc}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        try:
            onnx.shape_inference.infer_shapes_path(path, os.path.join(tmp, "inferred.onnx"), strict_mode=True)
        except Exception as exc:  # InferenceError and friends
            raise ValueError(f"{path}: ONNX shape inference failed: {exc}") from exc
    assert_trt_compatible(path)


def export_compressor_onnx(
    config: ApetConfig,
    path: str | os.PathLike,
    *,
    num_tokens: int,
    dim: int,
    max_batch: int = 8,
    opset: int = OPSET,
    validate: bool = True,
) -> Path:
    """Write `ApetCompressor(config)` as ONNX: input `features` [batch, N, D] float32, outputs
    `tokens` [batch, T, D] float32 and `positions` [batch, T] int64. The batch axis is dynamic;
    `max_batch` is recorded in the model's metadata (the TensorRT profile's upper bound)."""
    import onnx

    config.validate_for(num_tokens)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, num_tokens, dim)  # batch 2: keeps the traced batch axis symbolic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: N and D are static
        torch.onnx.export(
            ApetCompressor(config).eval(),
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, "tokens": {0: "batch"}, "positions": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(path))
    meta = {"apet_config": repr(config.to_dict()), "max_batch": str(max_batch), "num_tokens": str(num_tokens)}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    if validate:
        validate_onnx(path)
    return path
