"""apet-trt runtime: load an engine directory and answer image + prompt requests (pure Python).

    from apet_trt import runtime
    pipe = runtime.load("engines/tiny-llava-t64")            # backend="auto": TensorRT, else ORT
    [r] = pipe.generate("photo.jpg", "What is in the picture?", max_new_tokens=32)
    r.text, r.ids, r.positions, r.timings

This package reads engine directories (docs/ENGINE_DIR.md); it never imports `export`.
"""

from .manifest import Manifest, ManifestError, load_manifest
from .pipeline import GenerationResult, Pipeline, load

__all__ = ["load", "Pipeline", "GenerationResult", "Manifest", "ManifestError", "load_manifest"]
