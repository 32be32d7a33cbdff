"""Vision engine -> ONNX (opset 17, the family's named inputs and dynamic axes), validated and
compared against PyTorch."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apet_trt.apet_ops.onnx_export import validate_onnx

from .precision import Agreement, agreement

PROTOBUF_LIMIT = 1_800_000_000  # bytes of weights above which they go to vision.onnx.data


@dataclass
class Comparison:
    batch: int
    max_abs_diff: float
    max_rel_diff: float
    positions_equal: bool
    agreement: Agreement  # kept sets and rows compared as reduced precision allows (export/precision.py)


def export_vision_onnx(
    module: torch.nn.Module,
    path: Path,
    *,
    inputs: dict[str, torch.Tensor],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int = 17,
) -> Path:
    """Trace `module` (eval) with the named example `inputs` to `path`. Weights over ~1.8 GB go to
    external data."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings: N, D and T are static by design
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(path),
            input_names=list(inputs),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    if weight_bytes > PROTOBUF_LIMIT:
        model = onnx.load(str(path))
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    # The tracer leaves some output dims symbolic (TopK's K, the baseline's N); shape inference
    # knows them. Written back so the file declares what the manifest's io says: [batch, T, H],
    # [batch, T]. Path to path, so it also works for models with external data.
    onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True)
    validate_onnx(path)  # checker, shape inference, TensorRT op allowlist (apet_ops.trt_ops)
    return path


def compare_with_torch(
    module: torch.nn.Module,
    path: Path,
    make_inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]],
    *,
    batches=(1, 3),
    seed: int = 0,
) -> list[Comparison]:
    """Run ONNX Runtime (CPU) and the PyTorch module on the same random inputs; the first output
    is the embeddings, the second the positions."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    results = []
    for b in batches:
        inputs = make_inputs(b, g)
        emb, pos = session.run(None, {k: v.numpy() for k, v in inputs.items()})[:2]
        with torch.no_grad():
            ref_emb, ref_pos = module(*inputs.values())[:2]
        diff = np.abs(emb - ref_emb.numpy())
        scale = max(float(np.abs(ref_emb.numpy()).max()), 1e-30)
        results.append(
            Comparison(
                b,
                float(diff.max()),
                float(diff.max() / scale),
                bool(np.array_equal(pos, ref_pos.numpy())),
                agreement(emb, pos, ref_emb.numpy(), ref_pos.numpy()),
            )
        )
    return results
