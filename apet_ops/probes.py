"""Optional dependencies, probed in one place: which of them import here, at which version, and
whether a CUDA GPU is visible. Nothing is imported at module load; each probe imports on call.

TensorRT, TensorRT-LLM, onnxruntime-gpu, vLLM and SGLang are optional: the CPU default (ONNX Runtime
+ Transformers) needs none of them, and each feature that needs one says which and how to install it.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md

INSTALL = {
    "tensorrt": "pip install apet-trt[tensorrt]",
    "tensorrt_llm": "pip install apet-trt[tensorrt-llm]",
    "onnxruntime_gpu": "pip install apet-trt[gpu]",
}


def version(module: str) -> str | None:
    """The `__version__` of an importable module, or None when it does not import."""
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except ImportError:
        return None


def distribution_version(*names: str) -> str | None:
    """The installed version of the first of these distributions that is installed, or None."""
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


def tensorrt_version() -> str | None:
    return version("tensorrt")


def tensorrt_llm_version() -> str | None:
    return version("tensorrt_llm")


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def onnxruntime_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def onnxruntime_cuda() -> tuple[bool, str]:
    """(usable, why not): ONNX Runtime offers the CUDA execution provider."""
    providers = onnxruntime_providers()
    if "CUDAExecutionProvider" in providers:
        return True, ""
    listed = ", ".join(providers)
    return False, f"ONNX Runtime offers no CUDAExecutionProvider (providers: {listed}; {INSTALL['onnxruntime_gpu']})"


def tensorrt_available() -> tuple[bool, str]:
    """(usable, why not): the tensorrt package imports and torch sees a CUDA GPU."""
    if tensorrt_version() is None:
        return False, f"the tensorrt package is not installed ({INSTALL['tensorrt']})"
    if not cuda_available():
        return False, "no CUDA GPU is visible to torch"
    return True, ""


def tensorrt_llm_available() -> tuple[bool, str]:
    """(usable, why not): tensorrt_llm imports and torch sees a CUDA GPU."""
    if tensorrt_llm_version() is None:
        return False, f"tensorrt_llm is not installed ({INSTALL['tensorrt_llm']})"
    if not cuda_available():
        return False, "no CUDA GPU is visible to torch"
    return True, ""
