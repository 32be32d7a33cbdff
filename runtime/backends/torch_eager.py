"""The vision engine in PyTorch eager: the family's module (runtime/families/<family>.py,
`torch_module`) built from the Transformers checkpoint's own tower and projector plus
apet_ops.ApetCompressor, written independently of export's wrapper.

It needs the checkpoint's real weights ("saved", or a checkpoint path): with "random-seeded"
weights the tower here would not be the one the ONNX engine was exported from."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from ..manifest import Manifest
from . import VisionBackend


class TorchBackend(VisionBackend):
    name = "torch"

    def __init__(self, manifest: Manifest, *, torch_module: Callable[[], torch.nn.Module] | None = None):
        super().__init__(manifest)
        hf = manifest.decoders.transformers
        if hf is not None and hf.weights != "saved":
            raise RuntimeError(
                f"{manifest.root}: backend='torch' needs the checkpoint's saved weights, but the manifest's decoder "
                f"weights are {hf.weights!r} (seeded random weights would not be the ones the ONNX engine "
                "was exported from); use backend='onnxruntime'"
            )
        if torch_module is None:
            raise RuntimeError("backend='torch' needs the family's PyTorch module (torch_module)")
        self.module = torch_module().eval()
        self.device = next(self.module.parameters()).device
        self._lock = threading.Lock()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        with self._lock, torch.inference_mode():
            return self.module(**{k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()})
