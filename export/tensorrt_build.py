"""TensorRT engine from the vision ONNX, with Polygraphy, then TensorRT vs ONNX Runtime.

The network is strongly typed: TensorRT runs every tensor in the type the ONNX graph gives it
(export/precision.py). TensorRT 11 knows no other mode and has dropped the weak-typing API (layer
precisions, output types, the FP16/BF16 builder flags, precision constraints); on 10.x the
STRONGLY_TYPED network flag asks for the same. So nothing here sets a precision: an `--fp16` build
is a float16 graph whose compressor computes in float32 because its casts say so.

Polygraphy's loaders (polygraphy.backend.trt; Polygraphy >= 0.53 reads TensorRT 10.x and 11.x):
  NetworkFromOnnxPath(path, strongly_typed=True)    parse; -> (builder, network, parser)
  CreateConfig(profiles=[Profile().add(name, min=, opt=, max=)], load_timing_cache=path)
  EngineFromNetwork(network, config=, save_timing_cache=path); SaveEngine(engine, path=)
  Comparator.run([TrtRunner(engine), OnnxrtRunner(SessionFromOnnx(path, providers=))], data_loader=)
    -> RunResults: .values() one list of IterationResult (output name -> array) per runner
TensorRT Python API (NVIDIA/TensorRT python/src/infer/pyCore.cpp, pyGraph.cpp at v10.16 and v11.1):
  trt.__version__, trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED (11.x: "Deprecated: always
  enabled"), INetworkDefinition.get_flag(flag).
tests/export/test_tensorrt_api.py checks that every name used here exists in the installed version.

A plan runs only under the TensorRT major.minor and on the GPU architecture that built it, so
`plan_record` writes down what built it; the runtime refuses a mismatch (runtime/plans.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .precision import Agreement, agreement, part_dtypes

INSTALL_HINT = "pip install apet-trt[tensorrt]"


def tensorrt_version() -> str | None:
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
        return None


def tensorrt_major(version: str) -> int:
    return int(version.split(".")[0])


def gpu_facts() -> tuple[str | None, str | None]:
    """(name, compute capability "major.minor") of the current CUDA device as torch sees it, the
    device the runtime will run the plan on; (None, None) without one."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def plan_record(*, strongly_typed: bool | None, dtypes: dict) -> dict:
    """What a plan is built with, for the manifest's `plans` (docs/ENGINE_DIR.md): TensorRT
    version, GPU name and compute capability, strong typing, and the dtype of each part."""
    gpu, capability = gpu_facts()
    return {
        "tensorrt": tensorrt_version(),
        "gpu": gpu,
        "compute_capability": capability,
        "strongly_typed": strongly_typed,
        "dtypes": dtypes,
    }


def llm_plan_record(engine_dir: Path, *, dtype: str, tensorrt_llm_version: str | None) -> dict:
    """plan_record for a TensorRT-LLM engine directory: trtllm-build writes its build options,
    strongly_typed among them, to config.json's build_config."""
    config = json.loads((engine_dir / "config.json").read_text()) if (engine_dir / "config.json").is_file() else {}
    strongly_typed = (config.get("build_config") or {}).get("strongly_typed")
    record = plan_record(strongly_typed=strongly_typed, dtypes={"llm": dtype})
    return {**record, "tensorrt_llm": tensorrt_llm_version}


@dataclass
class TensorRTBuild:
    plan: Path
    timing_cache: Path
    agreement: Agreement  # TensorRT against ONNX Runtime on the same graph and inputs
    record: dict  # plan_record(): what built the plan


def _strongly_typed_network(onnx_path: Path):
    """(builder, network, parser) for the ONNX model, strongly typed on every TensorRT version.
    11.x networks are strongly typed whatever is asked; the flag is passed while it exists."""
    import tensorrt as trt
    from polygraphy.backend.trt import NetworkFromOnnxPath

    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None and tensorrt_major(trt.__version__) < 11:
        raise RuntimeError(
            f"TensorRT {trt.__version__} has no strongly typed networks; apet-trt needs TensorRT >= 10.0 "
            f"({INSTALL_HINT})"
        )
    builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=flag is not None)()
    strongly_typed = flag is None or bool(network.get_flag(flag))
    if not strongly_typed:
        raise RuntimeError("TensorRT did not create a strongly typed network for the vision engine")
    return (builder, network, parser), strongly_typed


def _input_dtypes(onnx_path: Path) -> dict:
    """Each graph input's numpy dtype (the graph alone, not its external weights)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.input}


def build_tensorrt(
    onnx_path: Path,
    plan_path: Path,
    *,
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    iterations: int = 2,
) -> TensorRTBuild:
    """Build and save the plan from the (already typed) ONNX graph, then run TensorRT and ONNX
    Runtime on the same graph and random inputs and compare them (export/precision.py, Agreement:
    TensorRT may use TF32 or float16 kernels, so a near-tie may go either way).
    `profile`: each input's (min, opt, max) shape, the model family's (export/models/)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, Profile, SaveEngine, TrtRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator, DataLoader

    trt_profile = Profile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    cache = plan_path.with_name("timing.cache")
    network, strongly_typed = _strongly_typed_network(onnx_path)
    config = CreateConfig(profiles=[trt_profile], load_timing_cache=str(cache) if cache.exists() else None)
    engine = SaveEngine(EngineFromNetwork(network, config=config, save_timing_cache=str(cache)), path=str(plan_path))
    runners = [TrtRunner(engine), OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))]
    # dynamic axes: give the data loader a concrete shape inside the profile (each input's opt shape)
    metadata = TensorMetadata()
    for name, dtype in _input_dtypes(onnx_path).items():
        metadata.add(name, dtype=dtype, shape=profile[name][1])
    loader = DataLoader(iterations=iterations, val_range=(-2.0, 2.0), input_metadata=metadata)
    trt_runs, ort_runs = Comparator.run(runners, data_loader=loader).values()
    joined = lambda runs, name: np.concatenate([np.asarray(r[name]) for r in runs])  # noqa: E731
    result = agreement(
        joined(trt_runs, "embeddings"),
        joined(trt_runs, "positions"),
        joined(ort_runs, "embeddings"),
        joined(ort_runs, "positions"),
    )
    record = plan_record(strongly_typed=strongly_typed, dtypes=part_dtypes(onnx_path))
    return TensorRTBuild(plan_path, cache, result, record)
