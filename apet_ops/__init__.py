"""ApET: approximation-error guided visual-token compression (arXiv 2602.19870).

Two implementations of one contract (docs/DESIGN.md, "The algorithm"), with the variants the
model families need (ApetConfig: seed placement and blend, ratio budget, video layout, per-image
FPS start):
  compress_reference  the oracle: eager, literal, float64, torch.linalg.solve
  ApetCompressor      the graph form: float32, O(N*D + N*T) memory, exports to ONNX TensorRT can
                      parse, with a static or symbolic token count
  compress_with / compress_reference_with   the same decisions applied to other features of the
                      same tokens (e.g. a VLM's per-layer features of each kept token)
"""

from .config import ApetConfig
from .graph import ApetCompressor
from .onnx_export import export_compressor_onnx
from .reference import compress_reference, compress_reference_with

__all__ = ["ApetConfig", "ApetCompressor", "compress_reference", "compress_reference_with", "export_compressor_onnx"]
