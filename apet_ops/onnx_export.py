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
START_NAME = "start"
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


def trt_token_limit(config: ApetConfig) -> int | None:
    """The largest N for which every TopK of the graph asks for K <= TensorRT's limit (3840;
    a larger K, even one computed at run time, fails in TensorRT); None when N does not bound K."""
    from .trt_ops import TOPK_MAX_K

    return config.max_tokens_for_k(TOPK_MAX_K)


def export_compressor_onnx(
    config: ApetConfig,
    path: str | os.PathLike,
    *,
    num_tokens: int,
    dim: int,
    max_batch: int = 8,
    opset: int = OPSET,
    validate: bool = True,
    dynamic_tokens: bool = False,
    max_tokens: int | None = None,
    start_input: bool = False,
) -> Path:
    """Write `ApetCompressor(config)` as ONNX: input `features` [batch, N, D] float32, outputs
    `tokens` [batch, T', D] float32 and `positions` [batch, T'] int64 (T' = config.output_rows(N)).
    The batch axis is dynamic; `max_batch` is recorded in the model's metadata (the TensorRT
    profile's upper bound).

    dynamic_tokens  the token axis is symbolic ("tokens"): one graph for every N >= config.min_tokens
                    (with keep_ratio, T = floor(R * N) is computed in the graph and so is TopK's K);
                    `num_tokens` is then only the example traced. `max_tokens` (optional) is the
                    TensorRT profile's upper bound, recorded in the metadata and refused when a
                    TopK there would ask for K > 3840 (see trt_token_limit).
    start_input     a second input `start` [batch] int64: each image's first FPS seed (the official
                    code draws it at random); without it every image starts at config.start.
    """
    import onnx

    config.validate_for(num_tokens)
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    meta = {"apet_config": repr(config.to_dict()), "max_batch": str(max_batch)}
    if dynamic_tokens:
        meta.update(_token_range(config, max_tokens))
    else:
        if max_tokens is not None:
            raise ValueError("max_tokens is for dynamic_tokens=True (a static graph has one N: num_tokens)")
        meta["num_tokens"] = str(num_tokens)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    example = torch.randn(2, num_tokens, dim)  # batch 2: keeps the traced batch axis symbolic
    args, input_names = (example,), [INPUT_NAME]
    axes = {INPUT_NAME: {0: "batch"}, "tokens": {0: "batch"}, "positions": {0: "batch"}}
    if start_input:
        rows = num_tokens - 1 if config.layout == "video" else num_tokens
        args += (torch.tensor([config.start, (config.start + 1) % rows]),)
        input_names.append(START_NAME)
        axes[START_NAME] = {0: "batch"}
    if dynamic_tokens:
        axes[INPUT_NAME][1] = "tokens"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the checks on the example
        torch.onnx.export(
            ApetCompressor(config).eval(),
            args,
            str(path),
            input_names=input_names,
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(path))
    kept = "kept" if dynamic_tokens and config.keep_ratio is not None else config.output_rows(num_tokens)
    _name_output_dims(model, kept, dim)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    if validate:
        validate_onnx(path)
    return path


def _name_output_dims(model, kept: int | str, dim: int) -> None:
    """The outputs' axes after the batch: T' as a number, or "kept" where it follows N, and D (the
    tracer's own names for derived dims are opaque)."""
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if isinstance(kept, int):
            dims[1].dim_value = kept
        else:
            dims[1].dim_param = kept
        if output.name == "tokens":
            dims[2].dim_value = dim


def _token_range(config: ApetConfig, max_tokens: int | None) -> dict:
    limit = trt_token_limit(config)
    meta = {"min_tokens": str(config.min_tokens)}
    if limit is not None:
        meta["trt_max_tokens"] = str(limit)
    if max_tokens is not None:
        if max_tokens < config.min_tokens:
            raise ValueError(f"max_tokens={max_tokens} is below the smallest N this config takes ({config.min_tokens})")
        if limit is not None and max_tokens > limit:
            raise ValueError(
                f"max_tokens={max_tokens}: TensorRT's TopK takes K <= 3840 (a larger K fails at run time), and "
                f"{config.to_dict()} asks for K = {config.keep_for(max_tokens)} there; the largest N it allows "
                f"is {limit}"
            )
        meta["max_tokens"] = str(max_tokens)
    return meta
