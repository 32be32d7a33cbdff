"""The vision engine in PyTorch eager, written independently of export's wrapper: the checkpoint's
vision tower -> hidden state of the manifest's feature layer -> CLS dropped ("default") ->
apet_ops.ApetCompressor -> the multimodal projector on the T kept tokens.

It needs the checkpoint's real weights ("saved", or a checkpoint path): with "random-seeded"
weights the tower here would not be the one the ONNX engine was exported from."""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..images import ImagePreprocessor
from ..manifest import Manifest
from . import VisionBackend


def _submodule(model, name: str):
    inner = getattr(model, "model", None)  # Transformers >= 4.52 nests them under .model
    for owner in (inner, model):
        if owner is not None and getattr(owner, name, None) is not None:
            return getattr(owner, name)
    raise RuntimeError(f"the checkpoint model has no {name!r}; the torch backend supports LLaVA-style models")


class TorchVision(torch.nn.Module):
    """pixel_values [B, 3, S, S] -> (embeddings [B, T, H] float32, positions [B, T] int64)."""

    def __init__(self, model, *, feature_layer: int, select_strategy: str, apet: dict | None):
        super().__init__()
        from apet_trt.apet_ops import ApetCompressor, ApetConfig

        self.tower = _submodule(model, "vision_tower")
        self.projector = _submodule(model, "multi_modal_projector")
        self.feature_layer = int(feature_layer)
        if select_strategy not in ("default", "full"):
            raise ValueError(f"vision.select_strategy must be 'default' or 'full', got {select_strategy!r}")
        self.drop_cls = select_strategy == "default"
        self.compressor = None if apet is None else ApetCompressor(ApetConfig.from_dict(apet))

    def forward(self, pixel_values: torch.Tensor):
        dtype = next(self.tower.parameters()).dtype
        out = self.tower(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        if self.drop_cls:
            features = features[:, 1:]
        if self.compressor is not None:
            tokens, positions = self.compressor(features)
        else:
            tokens = features
            positions = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(tokens.to(proj_dtype)).float(), positions


class TorchBackend(VisionBackend):
    name = "torch"

    def __init__(
        self, manifest: Manifest, preprocessor: ImagePreprocessor, *, device: str | None = None, hf_model_loader=None
    ):
        super().__init__(manifest, preprocessor)
        hf = (manifest.data.get("decoder") or {}).get("transformers") or {}
        if hf.get("weights", "saved") != "saved":
            raise RuntimeError(
                f"{manifest.root}: backend='torch' needs the checkpoint's saved weights, but the manifest's decoder "
                f"weights are {hf.get('weights')!r} (seeded random weights would not be the ones the ONNX engine "
                "was exported from); use backend='onnxruntime'"
            )
        if hf_model_loader is None:
            raise RuntimeError("backend='torch' needs the pipeline's Transformers model loader")
        model = hf_model_loader()
        v = manifest.vision
        self.vision = TorchVision(
            model, feature_layer=v["feature_layer"], select_strategy=v["select_strategy"], apet=manifest.apet
        ).eval()
        self.device = next(self.vision.tower.parameters()).device
        self._lock = threading.Lock()

    def _run_chunk(self, pixel_values: np.ndarray):
        with self._lock, torch.inference_mode():
            return self.vision(torch.from_numpy(pixel_values).to(self.device))
