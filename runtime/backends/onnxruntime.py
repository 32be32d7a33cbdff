"""The vision engine on ONNX Runtime: vision.onnx, CUDA execution provider when onnxruntime-gpu
and a GPU are present (unless device="cpu"), else the CPU provider."""

from __future__ import annotations

import numpy as np
import torch

from ..checks import check_engine_dtypes, ort_io
from ..manifest import Manifest
from . import VisionBackend


def _providers(device: str | None) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_cpu = device is not None and str(device).startswith("cpu")
    if not wants_cpu and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device is not None and str(device).startswith("cuda"):
        raise RuntimeError(
            f"device={device!r} asked for CUDA, but ONNX Runtime offers only {available} "
            "(pip install apet-trt[gpu] for onnxruntime-gpu)"
        )
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend(VisionBackend):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, *, device: str | None = None):
        super().__init__(manifest)
        import onnxruntime as ort

        path = manifest.engine_path("onnx")
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{manifest.root}: the manifest names no ONNX model, or {path} is missing")
        self.providers = _providers(device)
        try:
            self.session = ort.InferenceSession(str(path), providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise RuntimeError(
                f"{path}: ONNX Runtime could not load the vision model: {type(exc).__name__}: {exc}"
            ) from exc
        self.check_io(
            path,
            {i.name: i.shape for i in self.session.get_inputs()},
            {o.name: o.shape for o in self.session.get_outputs()},
        )
        check_engine_dtypes(path, manifest, *ort_io(self.session))  # and their dtypes

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        values = self.session.run(self.output_names, feeds)
        return {name: torch.from_numpy(v) for name, v in zip(self.output_names, values)}
