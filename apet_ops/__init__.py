"""ApET: approximation-error guided visual-token compression (arXiv 2602.19870).

Two implementations of one contract (docs/DESIGN.md, "The algorithm"):
  compress_reference  the oracle: eager, literal, float64, torch.linalg.solve
  ApetCompressor      the graph form: float32, static shapes, exports to ONNX TensorRT can parse
"""

from .config import ApetConfig
from .graph import ApetCompressor
from .onnx_export import export_compressor_onnx
from .reference import compress_reference

__all__ = ["ApetConfig", "ApetCompressor", "compress_reference", "export_compressor_onnx"]
