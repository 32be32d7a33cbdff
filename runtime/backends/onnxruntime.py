"""The vision engine on ONNX Runtime: vision.onnx, CUDA execution provider when onnxruntime-gpu
and a GPU are present (unless device="cpu"), else the CPU provider."""

from __future__ import annotations

import numpy as np
import torch

from ..checks import check_engine_io, ort_io
from ..images import ImagePreprocessor
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

    def __init__(self, manifest: Manifest, preprocessor: ImagePreprocessor, *, device: str | None = None):
        super().__init__(manifest, preprocessor)
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
        io = manifest.data["io"]
        self.input_name = io["inputs"][0]["name"]
        self.output_names = [o["name"] for o in io["outputs"]]
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != [self.input_name] or sorted(got_out) != sorted(self.output_names):
            raise RuntimeError(
                f"{path}: inputs {got_in} / outputs {got_out} differ from the manifest's "
                f"{[self.input_name]} / {self.output_names}"
            )
        self.check_output_shape(path, next(o.shape for o in self.session.get_outputs() if o.name == "embeddings"))
        check_engine_io(path, manifest, *ort_io(self.session))  # every input and output vs the manifest's io

    def _run_chunk(self, pixel_values: np.ndarray):
        emb, pos = self.session.run(["embeddings", "positions"], {self.input_name: pixel_values})
        return torch.from_numpy(emb), torch.from_numpy(pos)
