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


def _varying_axes(manifest: Manifest) -> bool:
    """Whether an input has a dynamic axis other than the batch (named dims are dynamic)."""
    return any(isinstance(d, str) and d != "batch" for t in manifest.io.inputs for d in t.shape)


ARENA_SHRINKAGE = "memory.enable_memory_arena_shrinkage"  # ONNX Runtime's run config key


class OnnxRuntimeBackend(VisionBackend):
    name = "onnxruntime"

    def __init__(self, manifest: Manifest, *, device: str | None = None):
        super().__init__(manifest)
        import onnxruntime as ort

        path = manifest.engine_path("onnx")
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{manifest.root}: the manifest names no ONNX model, or {path} is missing")
        self.providers = _providers(device)
        options = ort.SessionOptions()
        # ONNX Runtime's memory patterns are planned per input shape; with axes that change from call
        # to call beyond the batch (a token count) they only pile up: 8 blocks of Qwen2.5-VL-7B's tower
        # on two images took 5.0 GB with them, 2.4 GB without, in the same time
        varying = _varying_axes(manifest)
        options.enable_mem_pattern = not varying
        # and its arena keeps the largest call's memory for good: Qwen2.5-VL-7B's tower (3 GB of weights)
        # stayed at 11.7 GB after one 1,591-token image. Such engines shrink it back after every call
        # (peak unchanged, resident 3.1 GB after it; about 5-10 % slower); without an arena the same
        # call peaked at 23 GB
        self.run_options = ort.RunOptions()
        if varying:
            self.run_options.add_run_config_entry(ARENA_SHRINKAGE, "cpu:0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=self.providers)
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
        values = self.session.run(self.output_names, feeds, self.run_options)
        return {name: torch.from_numpy(v) for name, v in zip(self.output_names, values)}
