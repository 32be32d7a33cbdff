"""Precision is carried by the ONNX graph, not by builder flags.

TensorRT 11 builds strongly typed networks only (10.x: the STRONGLY_TYPED network flag): every
tensor runs in the type the graph gives it. So `apet build --fp16` exports the vision tower and the
projector in float16, and the compressor computes in float32 because the graph says so:
apet_ops.ApetCompressor casts its input to float32 and its tokens back to the input dtype, and
nothing between those casts is anything but float32 (docs/DESIGN.md, "Precision and TensorRT
versions"). This module reads those facts back from an exported graph, so that the build can refuse
a graph that breaks the rule and the manifest can record what each part runs in:

  part_dtypes(model)       {"vision_tower": "fp16", "compressor": "fp32", "projector": "fp16"}
  compressor_not_fp32(model)  the floating tensors computed inside the compressor that are not
                              float32 (the final cast out excepted); [] for a good graph
  agreement(emb, pos, ref_emb, ref_pos)  two runs of the engine compared the way reduced
                              precision allows (near-ties may go either way; see Agreement.passed)

The parts are the vision engine's submodules, which the ONNX exporter turns into node-name scopes
(/vision_tower/..., /compressor/..., /projector/...). A model is an onnx.ModelProto or a path
(external weights are not read: only types matter here).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

PARTS = ("vision_tower", "compressor", "projector")
DTYPE_NAMES = {
    TensorProto.FLOAT: "fp32",
    TensorProto.FLOAT16: "fp16",
    TensorProto.BFLOAT16: "bf16",
    TensorProto.DOUBLE: "fp64",
}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # manifest spelling -> torch


def _inferred(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, (str, os.PathLike)):
        model_or_path = onnx.load(str(model_or_path), load_external_data=False)
    return onnx.shape_inference.infer_shapes(model_or_path, strict_mode=True)


def _part(node: onnx.NodeProto) -> str | None:
    return next((p for p in PARTS if node.name.startswith(f"/{p}/")), None)


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """tensor name -> element type, for every floating tensor shape inference knows."""
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return {name: t for name, t in types.items() if t in DTYPE_NAMES}


def _casts_out(model: onnx.ModelProto) -> set[str]:
    """Outputs of the compressor's Cast nodes that leave the compressor (read only by nodes outside
    it, or graph outputs): the one place it may hand back another dtype."""
    readers = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in model.graph.output}
    return {
        out
        for node in model.graph.node
        if node.op_type == "Cast" and _part(node) == "compressor"
        for out in node.output
        if (readers[out] or out in outputs) and all(_part(r) != "compressor" for r in readers[out])
    }


def computed_dtypes(model_or_path) -> dict[str, Counter]:
    """part -> Counter of the floating element types its nodes compute (Constant nodes and the
    compressor's cast out left aside)."""
    model = _inferred(model_or_path)
    types, cast_out = _float_types(model), _casts_out(model)
    found: dict[str, Counter] = {p: Counter() for p in PARTS}
    for node in model.graph.node:
        part = _part(node)
        if part is None or node.op_type == "Constant":
            continue
        for out in node.output:
            if out in types and out not in cast_out:
                found[part][DTYPE_NAMES[types[out]]] += 1
    return found


def part_dtypes(model_or_path) -> dict[str, str | None]:
    """part -> the one floating type it computes in ("fp32", "fp16", ...); "mixed:fp16+fp32" when
    several; None for a part the graph does not have (the compressor of a --no-apet build)."""
    out = {}
    for part, counts in computed_dtypes(model_or_path).items():
        kinds = sorted(counts)
        out[part] = None if not kinds else kinds[0] if len(kinds) == 1 else "mixed:" + "+".join(kinds)
    return out


def compressor_not_fp32(model_or_path) -> list[str]:
    """'tensor (type)' for every floating tensor computed under /compressor/ that is not float32,
    apart from the final cast out; [] when the compressor computes in float32 throughout."""
    model = _inferred(model_or_path)
    types, cast_out = _float_types(model), _casts_out(model)
    return [
        f"{out} ({DTYPE_NAMES[types[out]]})"
        for node in model.graph.node
        if _part(node) == "compressor"
        for out in node.output
        if out in types and out not in cast_out and types[out] != TensorProto.FLOAT
    ]


# --- comparing two runs of the vision engine ----------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """Two runs of the vision engine on the same pixels (embeddings [B, T, H], positions [B, T])."""

    slots: int  # kept positions compared, B x T
    positions_differ: int  # kept by one run and not the other
    rows: int  # embedding rows compared: those at positions both runs kept
    rows_off: int  # of those, rows whose max |diff| exceeds 1e-2 of the reference's max |value|
    max_abs_diff: float  # over the rows compared
    max_rel_diff: float  # max_abs_diff / the reference's max |value|

    def passed(self, *, reduced_precision: bool) -> bool:
        """float32 against float32: the same kept positions and every value within 1e-3 of the
        output's scale. With reduced precision on either side (float16 tensors, TensorRT's TF32),
        the two round the features differently, so a near-tie (two candidates closer than that
        rounding) may go either way: a kept position, a seed slot or a merge target moves, and with
        it whole rows. A broken engine moves many; at most 1 position in 20 and 1 row in 10 may."""
        if not reduced_precision:
            return self.positions_differ == 0 and self.max_rel_diff <= 1e-3
        return self.positions_differ * 20 <= self.slots and self.rows_off * 10 <= self.rows

    def __str__(self) -> str:
        return (
            f"{self.positions_differ} of {self.slots} kept positions differ, {self.rows_off} of {self.rows} rows "
            f"beyond 1e-2 of max, max |diff| {self.max_abs_diff:.2e} ({self.max_rel_diff:.1e} of max)"
        )


def agreement(embeddings, positions, ref_embeddings, ref_positions) -> Agreement:
    """Compare a run with a reference run (numpy arrays or tensors): kept sets image by image, and
    the embedding rows of the positions both kept."""
    emb, pos = np.asarray(embeddings, dtype=np.float64), np.asarray(positions)
    ref_emb, ref_pos = np.asarray(ref_embeddings, dtype=np.float64), np.asarray(ref_positions)
    if emb.shape != ref_emb.shape or pos.shape != ref_pos.shape:
        raise ValueError(f"outputs {emb.shape}, {pos.shape} differ in shape from {ref_emb.shape}, {ref_pos.shape}")
    scale = max(float(np.abs(ref_emb).max()), 1e-30)
    differ, row_diffs = 0, []
    for b in range(pos.shape[0]):
        common, here, there = np.intersect1d(pos[b], ref_pos[b], assume_unique=True, return_indices=True)
        differ += pos.shape[1] - len(common)
        row_diffs.append(np.abs(emb[b, here] - ref_emb[b, there]).max(axis=-1))
    rows = np.concatenate(row_diffs)
    worst = float(rows.max()) if rows.size else 0.0
    return Agreement(int(pos.size), differ, int(rows.size), int((rows > 1e-2 * scale).sum()), worst, worst / scale)
