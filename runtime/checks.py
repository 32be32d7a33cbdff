"""Checks on what the runtime did not produce itself, each a one-line call where it is needed:

    check_engine_dtypes  at load: the vision engine's declared input and output dtypes against the
                         manifest's `io` (names and static dims: VisionBackend.check_io)
    check_outputs        every engine call: each item's positions unique and in [0, N), embeddings
                         finite (all families)
    check_ascending      a family whose rows are in spatial order: positions strictly ascending
    prompt_list          prompts: a string or a list of strings, said plainly otherwise
    sampling_values      SamplingConfig's fields, normalised (numpy integers accepted), before any
                         model is loaded

An engine that disagrees with its manifest (a replaced ONNX re-hashed into it, a plan built for
another shape) fails here with a line naming the engine, never with a backend's raw error at the
first request or with output printed as if it were fine.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """An engine's declared tensor: dims are ints (static), or str / None / negative (dynamic)."""

    name: str
    dtype: str | None
    shape: tuple


def ort_io(session) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An onnxruntime.InferenceSession's declared (inputs, outputs), dtypes in the manifest's names."""

    def specs(args):
        return [TensorSpec(a.name, _ORT_DTYPES.get(a.type, a.type), tuple(a.shape)) for a in args]

    return specs(session.get_inputs()), specs(session.get_outputs())


def check_engine_dtypes(source, manifest, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """At load: every tensor the engine declares has the manifest's dtype."""
    for side, got in (("inputs", inputs), ("outputs", outputs)):
        want = {t.name: t.dtype for t in getattr(manifest.io, side)}
        for t in got:
            if t.name in want and t.dtype is not None and t.dtype != want[t.name]:
                raise RuntimeError(
                    f"{source}: {side[:-1]} {t.name!r} is {t.dtype}, the manifest says {want[t.name]}; "
                    "rebuild the engine directory with `apet build`"
                )


def check_outputs(source, manifest, outputs: dict[str, torch.Tensor]) -> None:
    """Every engine call: item b's `positions` are unique and in [0, N) (N: vision.num_patches, the
    rows one item has before compression), its `embeddings` finite. Names the item and the engine."""
    positions, embeddings = outputs.get("positions"), outputs.get("embeddings")
    n = manifest.num_patches
    if positions is not None and positions.ndim == 2 and positions.numel():
        pos = positions.to(torch.int64).cpu()
        bad = (pos < 0) | (pos >= n)
        if bool(bad.any()):
            b = int(bad.any(dim=1).nonzero()[0])
            raise RuntimeError(
                f"{source}: item {b}: the vision engine returned position {int(pos[b][bad[b]][0])}, outside "
                f"[0, N={n}); the engine does not match its manifest: rebuild it with `apet build`"
            )
        ordered = pos.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if bool(repeated.any()):
            b = int(repeated.nonzero()[0])
            raise RuntimeError(
                f"{source}: item {b}: the vision engine returned a position twice ({pos[b].tolist()[:8]}...); "
                "the engine does not match its manifest: rebuild it with `apet build`"
            )
    if embeddings is not None and embeddings.is_floating_point() and not bool(torch.isfinite(embeddings).all()):
        b = int((~torch.isfinite(embeddings)).flatten(1).any(dim=1).nonzero()[0]) if embeddings.ndim > 1 else 0
        raise RuntimeError(f"{source}: item {b}: the vision engine returned NaN or Inf embeddings")


def check_ascending(source, rows) -> None:
    """A family whose rows are in spatial order (LLaVA-1.5): each image's positions strictly
    ascending. `rows`: VisualRows."""
    for b, r in enumerate(rows):
        p = r.positions
        if p.numel() > 1 and not bool((p[1:] > p[:-1]).all()):
            raise RuntimeError(
                f"{source}: image {b}: the vision engine returned positions that are not ascending "
                f"({p.tolist()[:8]}...); the engine does not match its manifest: rebuild it with `apet build`"
            )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prompt_list(prompts: Any) -> list[str]:
    """A string or a list/tuple of strings -> a non-empty list; anything else is named."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        hint = "; decode it to str first" if isinstance(prompts, (bytes, bytearray)) else ""
        raise TypeError(
            f"prompts: expected a string or a list of strings, got {type(prompts).__name__} {_shown(prompts)}{hint}"
        )
    if not prompts:
        raise ValueError("empty batch: pass at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i}: expected a string, got {type(p).__name__} {_shown(p)}")
    return list(prompts)


def _integer(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {_shown(value)}")
    v = operator.index(value)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {'>= ' + str(lo) if hi is None else f'in {lo}..{hi}'}, got {v}")
    return v


def _real(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {_shown(value)}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def sampling_values(
    *, max_new_tokens, do_sample, temperature, top_k, top_p, seed
) -> dict[str, int | float | bool | None]:
    """The sampling arguments checked and normalised to Python types (numpy scalars accepted).
    temperature=0 means greedy: accepted with do_sample=False, refused with sampling."""
    if not isinstance(do_sample, (bool, np.bool_)):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__} {_shown(do_sample)}")
    out = {
        "max_new_tokens": _integer("max_new_tokens", max_new_tokens, 1),
        "do_sample": bool(do_sample),
        "temperature": _real("temperature", temperature),
        "top_k": _integer("top_k", top_k, 0),
        "top_p": _real("top_p", top_p),
        "seed": None if seed is None else _integer("seed", seed, 0, (1 << 64) - 1),
    }
    if out["temperature"] < 0:
        raise ValueError(f"temperature must be >= 0, got {out['temperature']}")
    if out["temperature"] == 0 and out["do_sample"]:
        raise ValueError(
            "temperature=0 with sampling: sampling needs temperature > 0; temperature 0 means greedy "
            "decoding (do_sample=False, or leave out --sample)"
        )
    if not 0.0 < out["top_p"] <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {out['top_p']}")
    return out
