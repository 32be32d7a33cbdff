"""Vision backends behind one interface.

    backend.encode(images) -> (embeddings [B, T, H] float32, positions [B, T] int64)

`preprocess(images)` runs the checkpoint's HF image processor (runtime/images.py) and `run(pixel_values)`
runs the vision engine [vision tower -> feature layer -> ApET -> projector], in chunks of at most the
manifest's batch.max. Implementations:

    OnnxRuntimeBackend  vision.onnx on ONNX Runtime (CUDA provider when present, else CPU)
    TensorRTBackend     vision.plan on TensorRT's Python API with torch CUDA buffers and a stream
    TorchBackend        (torch_eager.py) PyTorch eager from the Transformers checkpoint + apet_ops.ApetCompressor
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from ..checks import check_outputs
from ..images import ImageLike, ImagePreprocessor
from ..manifest import Manifest

log = logging.getLogger("apet.runtime")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
TENSORRT_INSTALL = "pip install apet-trt[tensorrt]"


class VisionBackend(ABC):
    name = "vision"

    def __init__(self, manifest: Manifest, preprocessor: ImagePreprocessor):
        self.manifest = manifest
        self.preprocessor = preprocessor
        self.num_visual_tokens = manifest.num_visual_tokens
        self.hidden_size = int(manifest.llm["hidden_size"])
        self.batch_max = manifest.batch_max

    def check_output_shape(self, source, embeddings_shape) -> None:
        """At load: the engine's static embeddings shape [batch, T, H] must be the manifest's (an
        engine built for another T, or a manifest edited after the build, is refused here rather
        than at the first request)."""
        dims = list(embeddings_shape)[1:]
        want = [self.num_visual_tokens, self.hidden_size]
        if len(dims) != 2 or any(isinstance(d, int) and d >= 0 and d != w for d, w in zip(dims, want)):
            raise RuntimeError(
                f"{source}: the engine emits embeddings [batch, {', '.join(map(str, dims))}], the "
                f"manifest promises [batch, T={want[0]}, H={want[1]}]: the engine was built for another "
                "T or model; rebuild it with `apet build`"
            )

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        return self.preprocessor(images)

    def run(self, pixel_values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if pixel_values.ndim != 4 or pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values must be [B>=1, 3, S, S], got {pixel_values.shape}")
        embs, poss = [], []
        for start in range(0, pixel_values.shape[0], self.batch_max):
            chunk = np.ascontiguousarray(pixel_values[start : start + self.batch_max], dtype=np.float32)
            emb, pos = self._run_chunk(chunk)
            embs.append(emb.float().cpu())
            poss.append(pos.to(torch.int64).cpu())
        emb, pos = torch.cat(embs), torch.cat(poss)
        want = (pixel_values.shape[0], self.num_visual_tokens)
        if tuple(emb.shape) != (*want, self.hidden_size) or tuple(pos.shape) != want:
            raise RuntimeError(
                f"{self.name}: the vision engine returned embeddings {tuple(emb.shape)} and positions "
                f"{tuple(pos.shape)}, the manifest promises {(*want, self.hidden_size)} and {want}"
            )
        check_outputs(self.name, self.manifest, emb, pos)  # positions ascending, unique, in [0, N); finite
        return emb, pos

    def encode(self, images: ImageLike | Sequence[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(self.preprocess(images))

    @abstractmethod
    def _run_chunk(self, pixel_values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


def tensorrt_available() -> tuple[bool, str]:
    """(usable, why not): the tensorrt package imports and torch sees a CUDA GPU."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, f"the tensorrt package is not installed ({TENSORRT_INSTALL})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible to torch"
    return True, ""


def choose_backend(manifest: Manifest, requested: str) -> tuple[str, str]:
    """-> (backend name, the reason it was chosen). `auto` takes the TensorRT plan when TensorRT and
    a GPU are present, else ONNX Runtime."""
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested != "auto":
        return requested, "requested"
    if manifest.engine_path("tensorrt") is None:
        return "onnxruntime", "auto: the engine directory has no TensorRT plan"
    ok, why = tensorrt_available()
    if ok:
        return "tensorrt", "auto: TensorRT plan, tensorrt and a GPU present"
    return "onnxruntime", f"auto: fell back from TensorRT because {why}"


def create_backend(
    name: str, manifest: Manifest, preprocessor: ImagePreprocessor, *, device: str | None = None, hf_model_loader=None
) -> VisionBackend:
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, preprocessor, device=device)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(manifest, preprocessor, device=device)
    if name == "torch":
        from .torch_eager import TorchBackend

        return TorchBackend(manifest, preprocessor, device=device, hf_model_loader=hf_model_loader)
    raise ValueError(f"backend must be one of {BACKENDS[1:]} here, got {name!r}")
