"""Typed, frozen views of the manifest's common sections, made from a manifest `validate` accepted
(so every required key is there and of its type). The runtime reads these instead of reaching into
the JSON; export writes the JSON (its tables: manifest.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def _view(cls, data: dict[str, Any]):
    """cls from a checked JSON object: its keys that cls declares (optional ones take their default)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ModelInfo:
    id: str  # a label (preset name or the path as given): never opened
    source: str  # "preset" | "path"
    family: str


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # a string dim is dynamic (its name)


@dataclass(frozen=True)
class EngineIO:
    """An engine's named inputs and outputs (`io`, or a part's)."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]

    @classmethod
    def of(cls, data: dict) -> EngineIO:
        side = lambda key: tuple(Tensor(t["name"], t["dtype"], tuple(t["shape"])) for t in data[key])
        return cls(side("inputs"), side("outputs"))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Precision:
    vision: str | None  # fp32 | fp16 | bf16 | mixed:...
    compressor: str | None  # fp32, null without ApET


@dataclass(frozen=True)
class PlanRecord:
    """What built one TensorRT plan (runtime/plans.py compares it with this machine)."""

    dtypes: dict
    tensorrt: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    strongly_typed: bool | None = None
    tensorrt_llm: str | None = None


@dataclass(frozen=True)
class TransformersDecoder:
    checkpoint: str | None  # a folder of the directory; None: the external checkpoint
    weights: str  # "saved" | "random-seeded"
    seed: int | None = None  # random-seeded: the seed and the config file
    config: str | None = None


@dataclass(frozen=True)
class TrtllmDecoder:
    engine_dir: str
    max_multimodal_len: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    dtype: str


@dataclass(frozen=True)
class Decoders:
    transformers: TransformersDecoder | None
    tensorrt_llm: TrtllmDecoder | None

    @classmethod
    def of(cls, data: dict) -> Decoders:
        hf, trt = data["transformers"], data["tensorrt_llm"]
        return cls(
            None if hf is None else _view(TransformersDecoder, hf),
            None if trt is None else _view(TrtllmDecoder, trt),
        )


def model_info(data: dict) -> ModelInfo:
    return _view(ModelInfo, data)


def batch_range(data: dict) -> BatchRange:
    return _view(BatchRange, data)


def precision(data: dict) -> Precision:
    return _view(Precision, data)


def plan_records(data: dict | None) -> dict[str, PlanRecord]:
    return {kind: _view(PlanRecord, record) for kind, record in (data or {}).items()}
