"""Vision engine -> ONNX (opset 17, dynamic batch), validated and compared against PyTorch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apet_trt.apet_ops.onnx_export import validate_onnx

from .precision import Agreement, agreement

INPUT = "pixel_values"
OUTPUTS = ("embeddings", "positions")
PROTOBUF_LIMIT = 1_800_000_000  # bytes of weights above which they go to vision.onnx.data


@dataclass
class Comparison:
    batch: int
    max_abs_diff: float
    max_rel_diff: float
    positions_equal: bool
    agreement: Agreement  # kept sets and rows compared as reduced precision allows (export/precision.py)


def export_vision_onnx(module: torch.nn.Module, path: Path, *, image_size: int, opset: int = 17) -> Path:
    """Trace `module` (eval, float32 inputs) to `path`. Weights over ~1.8 GB go to external data."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    example = torch.randn(2, 3, image_size, image_size)  # batch 2 keeps the batch axis symbolic
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings: N, D and T are static by design
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_axes={INPUT: {0: "batch"}, OUTPUTS[0]: {0: "batch"}, OUTPUTS[1]: {0: "batch"}},
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
    module: torch.nn.Module, path: Path, *, image_size: int, batches=(1, 3), seed: int = 0
) -> list[Comparison]:
    """Run ONNX Runtime (CPU) and the PyTorch module on the same random pixels."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    results = []
    for b in batches:
        pixels = torch.randn(b, 3, image_size, image_size, generator=g)
        emb, pos = session.run(None, {INPUT: pixels.numpy()})
        with torch.no_grad():
            ref_emb, ref_pos = module(pixels)
        diff = np.abs(emb - ref_emb.numpy())
        results.append(
            Comparison(
                b,
                float(diff.max()),
                float(diff.max() / max(np.abs(ref_emb.numpy()).max(), 1e-30)),
                bool(np.array_equal(pos, ref_pos.numpy())),
                agreement(emb, pos, ref_emb.numpy(), ref_pos.numpy()),
            )
        )
    return results
