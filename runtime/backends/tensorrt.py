"""The vision engine on TensorRT (>= 10) through its Python API, with torch CUDA buffers and a stream.

API (TensorRT Python docs, "Runtime", "ICudaEngine", "IExecutionContext"):
  trt.Runtime(logger).deserialize_cuda_engine(bytes) -> ICudaEngine (None on failure)
  engine.num_io_tensors, engine.get_tensor_name(i), engine.get_tensor_mode(name),
  engine.get_tensor_dtype(name), engine.create_execution_context()
  context.set_input_shape(name, shape), context.get_tensor_shape(name),
  context.set_tensor_address(name, ptr), context.execute_async_v3(stream_handle) -> bool
  data types: trt.float32, float16, bfloat16, int8, int32, int64, bool, uint8
(NVIDIA/TensorRT python/src/infer/pyFoundationalTypes.cpp and pyCore.cpp, present at v10.16 and
v11.1; tests/export/test_tensorrt_api.py checks the names where tensorrt imports). A plan built by
another TensorRT major.minor or for another GPU architecture is refused before deserialising
(runtime/plans.py).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..manifest import Manifest
from ..plans import plan_mismatch, this_machine
from . import TENSORRT_INSTALL, VisionBackend, tensorrt_available

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
    "uint8": torch.uint8,
}


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {getattr(trt, name): tdt for name, tdt in TORCH_DTYPES.items()}
    if dtype not in table:
        raise RuntimeError(f"TensorRT tensor dtype {dtype} has no torch equivalent here")
    return table[dtype]


class TensorRTBackend(VisionBackend):
    name = "tensorrt"

    def __init__(self, manifest: Manifest, *, device: str | None = None):
        super().__init__(manifest)
        ok, why = tensorrt_available()
        if not ok:
            raise RuntimeError(
                f"backend='tensorrt' needs TensorRT and an NVIDIA GPU: {why}. "
                f"Install with `{TENSORRT_INSTALL}` on a GPU machine, or use backend='onnxruntime'"
            )
        plan = manifest.engine_path("tensorrt")
        if plan is None or not plan.is_file():
            raise FileNotFoundError(
                f"{manifest.root}: no TensorRT plan in this engine directory (it was built "
                "without TensorRT); rebuild on a machine with TensorRT or use backend='onnxruntime'"
            )
        mismatch = plan_mismatch(manifest, "tensorrt", this_machine())
        if mismatch is not None:
            raise RuntimeError(mismatch)
        import tensorrt as trt

        self.trt = trt
        self.device = torch.device(device if device is not None and str(device).startswith("cuda") else "cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"{plan}: TensorRT could not deserialize the plan (built by another TensorRT "
                "version or for another GPU?); rebuild it with `apet build`"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        shape = lambda n: list(self.engine.get_tensor_shape(n))  # -1: a dynamic dim
        self.check_io(plan, {n: shape(n) for n in self.inputs}, {n: shape(n) for n in self.outputs})
        self.stream = torch.cuda.Stream(device=self.device)
        self._lock = threading.Lock()  # one execution context: one inference at a time

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        with self._lock, torch.cuda.stream(self.stream):
            inputs = {}  # kept alive until the stream is done with them
            for name in self.inputs:
                x = torch.from_numpy(feeds[name]).to(self.device, non_blocking=False)
                x = x.to(_torch_dtype(self.trt, self.engine.get_tensor_dtype(name))).contiguous()
                self.context.set_input_shape(name, tuple(x.shape))
                self.context.set_tensor_address(name, x.data_ptr())
                inputs[name] = x
            outputs = {}
            for out in self.outputs:
                shape = tuple(self.context.get_tensor_shape(out))
                buf = torch.empty(
                    shape, dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(out)), device=self.device
                )
                self.context.set_tensor_address(out, buf.data_ptr())
                outputs[out] = buf
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
            self.stream.synchronize()
        return outputs
