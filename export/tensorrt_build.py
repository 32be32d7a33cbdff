"""TensorRT engine from the vision ONNX, with Polygraphy, then TensorRT vs ONNX Runtime.

Polygraphy's documented loaders (polygraphy.backend.trt, Polygraphy >= 0.49 / TensorRT 10):
  NetworkFromOnnxPath(path)                         parse the ONNX model
  PostprocessNetwork(network, func)                 here: pin the compressor's layers to float32
  CreateConfig(fp16=..., profiles=[Profile().add(name, min, opt, max)],
               precision_constraints="obey", load_timing_cache=path)
  EngineFromNetwork(network, config, save_timing_cache=path); SaveEngine(engine, path)
  Comparator.run([TrtRunner(engine), OnnxrtRunner(SessionFromOnnx(path))], data_loader)
  Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=..., rtol=...))
(docs.nvidia.com/deeplearning/tensorrt/polygraphy/docs/backend/trt/loader.html, .../comparator/)

With --fp16 the tower and projector may run in half precision, but every layer the ONNX parser
made from the compressor's nodes (named /compressor/... by the exporter) is set to float32 compute
and float32 outputs, and "obey" makes TensorRT honour it: squared norms of CLIP features overflow
fp16, and the kept set must not depend on the precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

COMPRESSOR_SCOPE = "/compressor/"
INSTALL_HINT = "pip install apet-trt[tensorrt]"


def tensorrt_version() -> str | None:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
        return None


@dataclass
class TensorRTBuild:
    plan: Path
    timing_cache: Path
    compare_passed: bool
    fp32_layers: int


def _in_scope(layer) -> bool:
    """A layer the ONNX parser named after one of the compressor's nodes: by its own name, or by
    the name of one of its outputs (the parser gives a node's output tensors the ONNX names,
    /compressor/..._output_0)."""
    if COMPRESSOR_SCOPE in (layer.name or ""):
        return True
    return any(COMPRESSOR_SCOPE in (_name(layer.get_output(j))) for j in range(layer.num_outputs))


def _name(tensor) -> str:
    return "" if tensor is None else (tensor.name or "")


def compressor_layers(network) -> list[int]:
    """Indices of the layers that make up the compressor: those named in its scope, plus every
    layer that lies between two of them (descendant of one and ancestor of another), which is
    where the parser's own helper layers (broadcast shuffles, casts, auto-named) end up."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer, consumers = {}, {}
    for i, layer in enumerate(layers):
        for j in range(layer.num_outputs):
            producer[_name(layer.get_output(j))] = i
        for j in range(layer.num_inputs):
            name = _name(layer.get_input(j))
            if name:
                consumers.setdefault(name, []).append(i)
    seeds = {i for i, layer in enumerate(layers) if _in_scope(layer)}

    def reach(step) -> set[int]:
        seen, todo = set(), list(seeds)
        while todo:
            for nxt in step(todo.pop()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    down = reach(
        lambda i: [c for j in range(layers[i].num_outputs) for c in consumers.get(_name(layers[i].get_output(j)), [])]
    )
    up = reach(
        lambda i: [producer[n] for j in range(layers[i].num_inputs) if (n := _name(layers[i].get_input(j))) in producer]
    )
    return sorted(seeds | (down & up))


def pin_compressor_fp32(network):
    """PostprocessNetwork callback: float32 compute and float32 outputs for the compressor's layers
    (compressor_layers).

    Only layers that compute on a floating-point tensor are pinned: shape layers, shape
    arithmetic, index math and other integer-only layers run in INT32/INT64 whatever is asked
    ("A shape layer can only run in INT32 precision"), and a float precision on them is at best a
    warning."""
    import tensorrt as trt

    floats = (trt.float16, trt.bfloat16, trt.float32)
    shape = getattr(trt.LayerType, "SHAPE", None)
    count = 0
    for i in compressor_layers(network):
        layer = network.get_layer(i)
        if shape is not None and layer.type == shape:
            continue
        tensors = [layer.get_input(j) for j in range(layer.num_inputs)] + [
            layer.get_output(j) for j in range(layer.num_outputs)
        ]
        if not any(x is not None and x.dtype in floats for x in tensors):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output_type(j) in floats:
                layer.set_output_type(j, trt.float32)
        count += 1
    pin_compressor_fp32.count = count
    return network


def build_tensorrt(
    onnx_path: Path,
    plan_path: Path,
    *,
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    fp16: bool = False,
    atol: float = 1e-2,
    rtol: float = 1e-2,
    feeds: list[dict[str, np.ndarray]] | None = None,
) -> TensorRTBuild:
    """Build and save the plan, then compare TensorRT with ONNX Runtime on `feeds` (the family's
    example inputs: index inputs must be valid), or on random float inputs at the opt shapes.
    `profile`: each input's (min, opt, max) shape, the model family's (export/models/)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        PostprocessNetwork,
        Profile,
        SaveEngine,
        TrtRunner,
    )
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, CompareFunc, DataLoader

    trt_profile = Profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    cache = plan_path.with_name("timing.cache")
    network = PostprocessNetwork(NetworkFromOnnxPath(str(onnx_path)), pin_compressor_fp32, name="pin_compressor_fp32")
    config = CreateConfig(
        fp16=fp16,
        profiles=[trt_profile],
        precision_constraints="obey" if fp16 else None,
        load_timing_cache=str(cache) if cache.exists() else None,
    )
    engine = SaveEngine(EngineFromNetwork(network, config=config, save_timing_cache=str(cache)), path=str(plan_path))
    runners = [TrtRunner(engine), OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))]
    # dynamic axes: give the data loader a concrete shape inside the profile (each input's opt shape);
    # Comparator.run takes any iterable of feed dicts as its data loader
    metadata = TensorMetadata()
    for name, (_, opt, _) in profile.items():
        metadata.add(name, dtype=np.float32, shape=opt)
    loader = feeds if feeds else DataLoader(iterations=2, val_range=(-2.0, 2.0), input_metadata=metadata)
    results = Comparator.run(runners, data_loader=loader)
    passed = bool(Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol)))
    return TensorRTBuild(plan_path, cache, passed, getattr(pin_compressor_fp32, "count", 0))
