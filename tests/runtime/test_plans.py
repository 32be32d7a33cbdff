"""Plans that know their TensorRT (runtime/plans.py, docs/ENGINE_DIR.md "Precision and plans").

A plan built by another TensorRT major.minor or for another compute capability is refused by the
TensorRT backend with one line that says how to rebuild, and backend="auto" falls back to ONNX
Runtime giving that line as its reason. No TensorRT here: the machine's facts are given to
`plan_mismatch` directly, or `this_machine` / `tensorrt_available` are replaced, and the plan file is
never opened (the refusal comes first).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from apet_trt import runtime
from apet_trt.runtime import plans as plans_module
from apet_trt.runtime.backends import tensorrt as trt_backend
from apet_trt.runtime.manifest import Manifest
from apet_trt.runtime.plans import Machine, plan_mismatch, rebuild_command
from helpers.engines import build_engine_dir, stack_rows, write_manifest

RECORD = {
    "tensorrt": "10.14.1.48",
    "gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0",
    "strongly_typed": True,
    "dtypes": {"vision_tower": "fp16", "compressor": "fp32", "projector": "fp16"},
}
BUILD = {"model": "tiny-llava", "keep": 64, "basis": 10, "merge": False, "start": 3, "no_apet": False}
BUILD |= {"max_batch": 4, "opt_batch": 2, "fp16": True, "tensorrt": True, "tensorrt_llm": True}


def manifest(record=RECORD, build=BUILD, root="/engines/x") -> Manifest:
    data = {"model": {"id": "tiny-llava"}, "engines": {"onnx": "vision.onnx", "tensorrt": "vision.plan"}}
    if record is not None:
        data["plans"] = {"tensorrt": record}
    if build is not None:
        data["build"] = build
    return Manifest(Path(root), data)


@pytest.mark.parametrize(
    "machine",
    [
        Machine("10.14.1.48", "9.0"),
        Machine("10.14.2.1", "9.0", "NVIDIA H200"),  # another patch release, another GPU of the same architecture
        Machine(None, "9.0"),
        Machine("10.14.1.48", None),  # facts this machine cannot tell are not held against the plan
    ],
)
def test_a_plan_built_for_this_machine_is_accepted(machine):
    assert plan_mismatch(manifest(), "tensorrt", machine) is None


@pytest.mark.parametrize(
    "machine, says",
    [
        (Machine("11.4.0.106", "9.0"), ["TensorRT 10.14 built it, this machine has TensorRT 11.4"]),
        (Machine("10.16.1.11", "9.0"), ["TensorRT 10.14 built it, this machine has TensorRT 10.16"]),
        (
            Machine("10.14.1.48", "8.9", "NVIDIA L40S"),
            ["built for compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is 8.9 (NVIDIA L40S)"],
        ),
        (Machine("11.4.0.106", "10.0"), ["TensorRT 10.14 built it", "compute capability 9.0", "this GPU is 10.0"]),
    ],
)
def test_another_tensorrt_or_gpu_architecture_is_refused_in_one_line(machine, says):
    why = plan_mismatch(manifest(), "tensorrt", machine)
    assert why is not None and "\n" not in why
    assert why.startswith("/engines/x/vision.plan: ")
    for part in says:
        assert part in why
    assert (
        "rebuild it here with `apet build --model tiny-llava --keep 64 --basis 10 --start 3 --max-batch 4 "
        "--opt-batch 2 --no-merge --fp16 --out /engines/x --force`" in why
    )
    assert why.endswith("or use backend='onnxruntime'")


def test_without_a_record_the_plan_is_not_judged():
    """Directories written before plans were recorded: deserialising is the only test left."""
    assert plan_mismatch(manifest(record=None), "tensorrt", Machine("11.4", "8.0")) is None
    assert plan_mismatch(manifest(), "tensorrt_llm", Machine("11.4", "8.0")) is None


def test_rebuild_command_uses_the_checkpoint_path_and_the_defaults():
    m = manifest(build={"model": "ckpt", "keep": None, "no_apet": True, "merge": True, "fp16": False})
    m.data["model"] = {"id": "ckpt", "source": "path"}
    m.data["external_checkpoint"] = {"path": "/models/llava-1.5-7b-hf", "fingerprint": {}}
    assert rebuild_command(m) == "apet build --model /models/llava-1.5-7b-hf --no-apet --out /engines/x --force"
    assert rebuild_command(manifest(build=None)) == "apet build --model tiny-llava --out /engines/x --force"


def test_rebuild_command_keeps_every_budget_and_parity_option():
    """A rebuild must not fall back to the family's default budget (docs/DEFAULTS.md) or lose a choice."""
    build = {"model": "q", "keep": None, "keep_ratio": 0.5, "seed_blend": 0.5, "basis": 8, "start": "random"}
    build |= {"start_seed": 7, "image_aspect": "default", "frame_sampling": None, "max_pixels": 200704}
    assert rebuild_command(manifest(build=build)) == (
        "apet build --model q --keep-ratio 0.5 --seed-blend 0.5 --basis 8 --start random --start-seed 7 "
        "--max-pixels 200704 --out /engines/x --force"
    )
    build = {
        "model": "v",
        "budget": 64,
        "start": 0,
        "start_seed": 0,
        "image_aspect": "pad",
        "frame_sampling": "official",
    }
    assert rebuild_command(manifest(build=build)) == (
        "apet build --model v --start 0 --budget 64 --image-aspect pad --frame-sampling official "
        "--out /engines/x --force"
    )


# --- through runtime.load, on a real (hand-written) engine directory ------------------------------


@pytest.fixture
def stale_plan(tmp_path, monkeypatch):
    """An engine directory with a plan recorded as built by TensorRT 10.14 on compute capability
    9.0, on a 'machine' with TensorRT 11.4 and a GPU of compute capability 8.9."""
    root = build_engine_dir(tmp_path / "stale", keep=8)
    (root / "vision.plan").write_bytes(b"never opened: the record refuses it first")
    data = json.loads((root / "manifest.json").read_text())
    data["engines"]["tensorrt"] = "vision.plan"
    data["plans"] = {"tensorrt": RECORD}
    write_manifest(root, data)
    here = Machine("11.4.0.106", "8.9", "NVIDIA L40S")
    monkeypatch.setattr(plans_module, "this_machine", lambda: here)
    monkeypatch.setattr(trt_backend, "this_machine", lambda: here)
    monkeypatch.setattr("apet_trt.runtime.backends.tensorrt_available", lambda: (True, ""))
    monkeypatch.setattr(trt_backend, "tensorrt_available", lambda: (True, ""))
    return root


def test_the_tensorrt_backend_refuses_a_stale_plan(stale_plan):
    with pytest.raises(RuntimeError) as err:
        runtime.load(stale_plan, backend="tensorrt")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{stale_plan / 'vision.plan'}: TensorRT 10.14 built it")
    assert "this GPU is 8.9 (NVIDIA L40S)" in message and "--force`" in message


def test_auto_falls_back_to_onnxruntime_and_says_why(stale_plan, caplog):
    with caplog.at_level(logging.WARNING, logger="apet.runtime"):
        pipe = runtime.load(stale_plan)  # backend="auto"
    assert pipe.backend == "onnxruntime"
    assert pipe.backend_reason.startswith("auto: fell back from TensorRT because ")
    assert "TensorRT 10.14 built it, this machine has TensorRT 11.4" in pipe.backend_reason
    assert any("TensorRT 10.14 built it" in rec.getMessage() for rec in caplog.records)
    embeddings, positions = stack_rows(
        pipe.encode(str(Path(__file__).resolve().parents[2] / "assets" / "grace_hopper.jpg"))
    )
    assert positions.shape == (1, 8) and embeddings.shape[:2] == (1, 8)


def test_engine_tensor_types_map_to_torch_including_bfloat16():
    """The TensorRT module names its types float32, float16, bfloat16, ... (pyFoundationalTypes.cpp;
    there is no trt.bf16): a module shaped like that maps every one, bfloat16 included."""
    import torch

    names = ["float32", "float16", "bfloat16", "int8", "int32", "int64", "bool", "uint8", "fp8", "int4"]
    fake = type("FakeTensorRT", (), {name: f"DataType.{name}" for name in names})
    for name in ("float32", "float16", "bfloat16", "int64", "uint8"):
        assert trt_backend._torch_dtype(fake, f"DataType.{name}") is getattr(torch, name)
    with pytest.raises(RuntimeError, match="DataType.fp8 has no torch equivalent"):
        trt_backend._torch_dtype(fake, "DataType.fp8")


def test_a_stale_tensorrt_llm_engine_is_named_with_the_decoder_to_use_instead():
    m = manifest()
    m.data["plans"]["tensorrt_llm"] = dict(RECORD, tensorrt="10.14.1.48")
    m.data["decoder"] = {"tensorrt_llm": {"engine_dir": "llm"}}
    why = plan_mismatch(m, "tensorrt_llm", Machine("11.4.0.106", "9.0"))
    assert why.startswith("/engines/x/llm: TensorRT 10.14 built it, this machine has TensorRT 11.4")
    assert why.endswith("or use decoder='transformers'") and "\n" not in why
    assert plan_mismatch(m, "tensorrt_llm", Machine("10.14.2.1", "9.0")) is None
