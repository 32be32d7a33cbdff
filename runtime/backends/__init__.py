"""Vision backends behind one interface: the engine's named inputs in, its named outputs out.

    backend.run({"pixel_values": array, ...}) -> {"embeddings": tensor, "positions": tensor, ...}

The names, dtypes and static dims are the manifest's `io` (checked when the backend loads, so an
engine that disagrees with its manifest is refused before the first request). What the inputs
mean and how the outputs become each image's rows is the model family's business
(runtime/families/). Implementations:

    OnnxRuntimeBackend  vision.onnx on ONNX Runtime (CUDA provider when present, else CPU)
    TensorRTBackend     vision.plan on TensorRT's Python API with torch CUDA buffers and a stream
    TorchBackend        (torch_eager.py) the family's PyTorch eager module from the Transformers checkpoint
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import torch

from apet_trt.apet_ops.probes import INSTALL, tensorrt_available

from ..checks import check_outputs
from ..choice import BACKENDS, Choice
from ..manifest import Manifest

log = logging.getLogger("apet.runtime")

TENSORRT_INSTALL = INSTALL["tensorrt"]


class VisionBackend(ABC):
    name = "vision"

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        io = manifest.io
        self.input_shapes = {i.name: list(i.shape) for i in io.inputs}
        self.output_shapes = {o.name: list(o.shape) for o in io.outputs}
        self.input_names, self.output_names = list(self.input_shapes), list(self.output_shapes)

    def check_io(self, source, inputs: dict[str, Sequence], outputs: dict[str, Sequence]) -> None:
        """At load: the engine's input and output names are the manifest's, and every static dim the
        engine declares equals the manifest's (an engine built for another T or model, or a manifest
        edited after the build, is refused here rather than at the first request)."""
        if sorted(inputs) != sorted(self.input_names) or sorted(outputs) != sorted(self.output_names):
            raise RuntimeError(
                f"{source}: engine tensors {list(inputs)} -> {list(outputs)} differ from the "
                f"manifest's {self.input_names} -> {self.output_names}"
            )
        for kind, declared, promised in (("takes", inputs, self.input_shapes), ("emits", outputs, self.output_shapes)):
            for name, dims in declared.items():
                if not _compatible(dims, promised[name]):
                    raise RuntimeError(
                        f"{source}: the engine {kind} {name} [{', '.join(map(str, dims))}], the "
                        f"manifest promises [{', '.join(map(str, promised[name]))}]: the engine was "
                        "built for another T or model; rebuild it with `apet build`"
                    )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if sorted(feeds) != sorted(self.input_names):
            raise ValueError(f"{self.name}: inputs {sorted(feeds)} given, the engine takes {self.input_names}")
        for name, value in feeds.items():
            if not _compatible(list(value.shape), self.input_shapes[name]):
                raise ValueError(
                    f"{self.name}: input {name} has shape {list(value.shape)}, the engine takes "
                    f"[{', '.join(map(str, self.input_shapes[name]))}]"
                )
        outputs = self._run({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        check_outputs(self.name, self.manifest, outputs)  # positions unique and in [0, N), embeddings finite
        return outputs

    __call__ = run

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]: ...


class PartsBackend(VisionBackend):
    """The vision engines of one directory (the main one and its `parts`, docs/ENGINE_DIR.md) behind one
    run(): each call goes to the engine whose input names are the feeds' (e.g. Video-LLaVA's frames to
    the video tower, still images to the image tower)."""

    def __init__(self, manifest: Manifest, engines: Sequence[VisionBackend]):
        super().__init__(manifest)
        self.engines = list(engines)
        self.name = self.engines[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        for engine in self.engines:
            if sorted(feeds) == sorted(engine.input_names):
                return engine.run(feeds)
        takes = " or ".join(str(e.input_names) for e in self.engines)
        raise ValueError(f"{self.name}: inputs {sorted(feeds)} given, the engines take {takes}")

    __call__ = run

    def _run(self, feeds):  # pragma: no cover - run() dispatches to an engine
        raise NotImplementedError


def _static(dim) -> bool:
    return isinstance(dim, int) and dim >= 0


def _compatible(dims: Sequence, promised: Sequence) -> bool:
    """Same rank, and equal wherever both dims are static (a name or -1 is a dynamic dim)."""
    return len(dims) == len(promised) and all(not (_static(d) and _static(w)) or d == w for d, w in zip(dims, promised))


def choose_backend(manifest: Manifest, requested: str) -> Choice:
    """The backend and why. `auto` takes the TensorRT plan when TensorRT and a GPU are present and
    the plan was built for them (runtime/plans.py), else ONNX Runtime (a fallback when there is a plan)."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        return Choice(requested, "requested")
    if manifest.engine_path("tensorrt") is None:
        return Choice("onnxruntime", "auto: the engine directory has no TensorRT plan")
    ok, why = tensorrt_available()
    if ok:  # a plan built by another TensorRT major.minor or GPU architecture cannot run here
        from ..plans import plan_mismatch, this_machine

        why = plan_mismatch(manifest, "tensorrt", this_machine())
        if why is None:
            return Choice("tensorrt", "auto: TensorRT plan, tensorrt and a GPU present")
    return Choice("onnxruntime", f"auto: fell back from TensorRT because {why}", fallback=True)


def create_backend(
    name: str,
    manifest: Manifest,
    *,
    device: str | None = None,
    torch_module: Callable[[], torch.nn.Module] | None = None,
) -> VisionBackend:
    """The backend `name` for the engine directory. `torch_module` (backend="torch") makes the
    family's PyTorch eager vision module."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, device=device)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(manifest, device=device)
    if name == "torch":
        from .torch_eager import TorchBackend

        return TorchBackend(manifest, torch_module=torch_module)
    raise ValueError(f"backend must be one of {BACKENDS[1:]} here, got {name!r}")
