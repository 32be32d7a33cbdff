"""Can this machine run an engine directory's TensorRT plan?

A TensorRT plan is not portable: it runs under the TensorRT major.minor that built it and on the
GPU architecture (compute capability) it was built for. The manifest's `plans` table records both
for each plan (docs/ENGINE_DIR.md); `plan_mismatch` compares a record with this machine and says,
in one line, why the plan cannot run here and how to rebuild it. The TensorRT backend refuses such
a plan with that line, and backend="auto" falls back to ONNX Runtime, giving it as the reason.

    plan_mismatch(manifest, "tensorrt", Machine(tensorrt="11.4.0.106", compute_capability="9.0"))
    this_machine()  -> Machine: the installed tensorrt's version and torch's current CUDA device
"""

from __future__ import annotations

from dataclasses import dataclass

from .manifest import Manifest


@dataclass(frozen=True)
class Machine:
    tensorrt: str | None  # tensorrt.__version__
    compute_capability: str | None  # "major.minor"
    gpu: str | None = None


def this_machine() -> Machine:
    import torch

    try:
        import tensorrt

        version = tensorrt.__version__
    except ImportError:
        version = None
    if not torch.cuda.is_available():
        return Machine(version, None)
    major, minor = torch.cuda.get_device_capability()
    return Machine(version, f"{major}.{minor}", torch.cuda.get_device_name())


def _major_minor(version: str | None) -> str | None:
    return None if not version else ".".join(str(version).split(".")[:2])


def rebuild_command(manifest: Manifest) -> str:
    """`apet build ...` with the options the manifest says the directory was built with."""
    build = manifest.data.get("build") or {}
    model = manifest.external_checkpoint or build.get("model") or manifest.data["model"].get("id")
    parts = ["apet build", "--model", str(model)]
    skip = {"start_seed": build.get("start") != "random", "image_aspect": build.get("image_aspect") == "default"}
    for key in (
        *("keep", "keep_ratio", "seed_blend", "basis", "start", "start_seed", "budget", "llm_stage"),
        *("image_aspect", "frame_sampling", "min_pixels", "max_pixels", "max_batch", "opt_batch"),
    ):
        if build.get(key) is not None and not skip.get(key):
            parts += [f"--{key.replace('_', '-')}", str(build[key])]
    flags = {"no_apet": True, "merge": False, "fp16": True}
    parts += [f"--{'no-merge' if k == 'merge' else k.replace('_', '-')}" for k, v in flags.items() if build.get(k) is v]
    return " ".join(parts + ["--out", str(manifest.root), "--force"])


def plan_mismatch(manifest: Manifest, kind: str, machine: Machine) -> str | None:
    """Why the plan of engine `kind` ("tensorrt") cannot run on `machine`, in one line; None when
    it can, or when the manifest has no record for it (a directory written before plans were
    recorded: deserialising is then the test)."""
    record = (manifest.data.get("plans") or {}).get(kind)
    if not record:
        return None
    built_trt, here_trt = _major_minor(record.get("tensorrt")), _major_minor(machine.tensorrt)
    built_cc, here_cc = record.get("compute_capability"), machine.compute_capability
    problems = []
    if built_trt and here_trt and built_trt != here_trt:
        problems.append(f"TensorRT {built_trt} built it, this machine has TensorRT {here_trt}")
    if built_cc and here_cc and built_cc != here_cc:
        built_gpu = f" ({record['gpu']})" if record.get("gpu") else ""
        here_gpu = f" ({machine.gpu})" if machine.gpu else ""
        problems.append(f"it was built for compute capability {built_cc}{built_gpu}, this GPU is {here_cc}{here_gpu}")
    if not problems:
        return None
    if kind == "tensorrt_llm":
        plan = ((manifest.data.get("decoder") or {}).get("tensorrt_llm") or {}).get("engine_dir") or kind
        instead = "decoder='transformers'"
    else:
        plan = (manifest.data.get("engines") or {}).get(kind) or kind
        instead = "backend='onnxruntime'"
    return (
        f"{manifest.root / plan}: {'; '.join(problems)}. A TensorRT plan runs only under the TensorRT "
        f"major.minor and on the GPU architecture that built it: rebuild it here with `{rebuild_command(manifest)}`"
        f", or use {instead}"
    )
