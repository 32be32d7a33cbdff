"""Which ONNX graphs TensorRT's ONNX parser can take, checked before any TensorRT is at hand.

The allowlist lives in trt_onnx_ops.json next to this file, transcribed from the ONNX-TensorRT
operator support matrix of each TensorRT release it is checked against; each release's "source"
block names the repository, path and commit it came from (docs/operators.md of onnx/onnx-tensorrt):
TensorRT 10.16 at 6bde6596 (with the restriction texts) and TensorRT 11.1 at 7c51a63a (TensorRT 11
is the strongly typed only line; its matrix adds Swish and is otherwise 10.16's). A graph passes
only if every release takes it: TRT_ONNX_OPS is what all of them support, and the opset must be in
every release's range (opset 9 to 24 for both).

  unsupported_ops(model)       op types outside the allowlist, over every graph the parser reads
  check_restrictions(model)    per-node restrictions that can be decided from the graph alone
  runtime_limits(model)        conditions TensorRT only checks while running (a run-time TopK K <= 3840)
  assert_trt_compatible(model) both, raising ValueError with everything found

A model is an onnx.ModelProto or a path to a .onnx file (read without its external weights).
Op names come back as the bare op type for the default ONNX domain ("NonZero") and as
"domain::OpType" for any other domain ("com.microsoft::FusedMatMul").
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

__all__ = [
    "TRT_ONNX_OPS",
    "TRT_ONNX_UNSUPPORTED",
    "TRT_RELEASES",
    "TRT_SOURCE",
    "TOPK_MAX_K",
    "unsupported_ops",
    "check_restrictions",
    "runtime_limits",
    "assert_trt_compatible",
]

_DATA_FILE = Path(__file__).with_name("trt_onnx_ops.json")
_DEFAULT_DOMAINS = ("", "ai.onnx")


def _load_data() -> dict:
    with open(_DATA_FILE, encoding="utf-8") as f:
        return json.load(f)


_DATA = _load_data()


@dataclass(frozen=True)
class TrtRelease:
    """One TensorRT release's ONNX operator support matrix."""

    source: dict  # TensorRT version, repository, path, commit, opset range
    supported: frozenset[str]  # marked Y
    unsupported: frozenset[str]  # marked N

    @property
    def version(self) -> str:
        return self.source["tensorrt_version"]


#: Every release the graphs are checked against, oldest first: 10.16, then 11.1.
TRT_RELEASES: tuple[TrtRelease, ...] = tuple(
    TrtRelease(dict(r["source"]), frozenset(r["supported"]), frozenset(r["unsupported"]))
    for r in [_DATA, *_DATA.get("other_releases", [])]
)
#: Every operator all the releases' matrices mark supported (Y), default ONNX domain.
TRT_ONNX_OPS: frozenset[str] = frozenset.intersection(*(r.supported for r in TRT_RELEASES))
#: Every operator some release's matrix marks unsupported (N). Ops absent from both sets are unsupported too.
TRT_ONNX_UNSUPPORTED: frozenset[str] = frozenset.union(*(r.unsupported for r in TRT_RELEASES))
#: Where the 10.16 list (and the restriction texts) come from; TRT_RELEASES has every release's source.
TRT_SOURCE: dict = dict(_DATA["source"])
_VERSIONS = ", ".join(r.version for r in TRT_RELEASES)
#: Largest TopK K TensorRT builds (NvInfer.h, INetworkDefinition::addTopK).
TOPK_MAX_K: int = int(_DATA["topk_max_k"])
_TOPK_LAST_AXES: int = int(_DATA["topk_last_axes"])
#: op type -> {input index: input name} for inputs TensorRT needs as build-time constants.
_CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    op: {int(i): name for i, name in inputs.items()} for op, inputs in _DATA["constant_inputs"].items()
}


# ----------------------------------------------------------------------------------------------
# Loading


def _load(model_or_path) -> tuple[onnx.ModelProto, str, Path | None]:
    """(model, a name for messages, the directory external data would be read from)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, f"model {model_or_path.graph.name or '<unnamed graph>'!r}", None
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # DecodeError and friends: not an ONNX file
            raise ValueError(f"{path}: not a readable ONNX model ({exc})") from exc
        return model, str(path), path.parent
    raise TypeError(f"expected an onnx.ModelProto or a path to an .onnx file, got {type(model_or_path).__name__}")


# ----------------------------------------------------------------------------------------------
# Walking every graph the parser reads: the main graph, subgraphs in attributes (If branches, Loop
# and Scan bodies, at any depth), and the bodies of the model's local functions.


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.name, attr.g
        elif attr.type == AttributeProto.GRAPHS:
            for i, g in enumerate(attr.graphs):
                yield f"{attr.name}[{i}]", g


def _walk_nodes(nodes: Iterable[onnx.NodeProto], where: str) -> Iterator[tuple[onnx.NodeProto, str]]:
    for node in nodes:
        yield node, where
        for attr_name, graph in _subgraphs(node):
            yield from _walk_nodes(graph.node, f"{where}/{_node_label(node)}.{attr_name}")


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type}({node.name})" if node.name else node.op_type


def _function_key(domain: str, name: str) -> tuple[str, str]:
    return ("" if domain in _DEFAULT_DOMAINS else domain, name)


def _op_name(node: onnx.NodeProto) -> str:
    domain = node.domain or ""
    return node.op_type if domain in _DEFAULT_DOMAINS else f"{domain}::{node.op_type}"


# ----------------------------------------------------------------------------------------------
# The allowlist check


def unsupported_ops(model_or_path, *, extra_allowed: Iterable[str] = ()) -> list[str]:
    """Sorted, unique op names the TensorRT ONNX parser has no importer for; [] if none.

    An op counts as supported when every release in TRT_RELEASES supports it (TRT_ONNX_OPS).
    Walks the main graph, every subgraph (If/Loop/Scan attributes, nested), and every function in
    model.functions. A node that calls one of the model's local functions is not itself reported
    (the parser imports local functions by expanding their bodies, whose nodes are checked).
    Default-domain ops are checked against TRT_ONNX_OPS; an op in any other domain is reported as
    "domain::OpType" unless named in `extra_allowed` (e.g. a TensorRT plugin you load yourself;
    entries are "domain::OpType", or a bare op type for the default domain)."""
    model, _, _ = _load(model_or_path)
    return _unsupported(model, extra_allowed)


def _unsupported(model: onnx.ModelProto, extra_allowed: Iterable[str]) -> list[str]:
    if isinstance(extra_allowed, str):
        raise TypeError("extra_allowed must be an iterable of op names, not a single string")
    allowed = TRT_ONNX_OPS | frozenset(extra_allowed)
    local_functions = {_function_key(f.domain, f.name) for f in model.functions}

    nodes = list(_walk_nodes(model.graph.node, "graph"))
    for function in model.functions:
        nodes.extend(_walk_nodes(function.node, f"function {function.domain}::{function.name}"))

    found = set()
    for node, _ in nodes:
        if _function_key(node.domain, node.op_type) in local_functions:
            continue
        name = _op_name(node)
        if name not in allowed:
            found.add(name)
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Constant resolution: which tensor names hold build-time constants (initializers, Constant node
# outputs), with ONNX's lexical scoping (a subgraph sees its enclosing graphs' names; its own
# inputs shadow them) and function bodies bound to the caller's actual arguments.

_DYNAMIC = object()  # a name known to be a runtime value


@dataclass
class _Scope:
    names: dict = field(default_factory=dict)  # name -> TensorProto | NodeProto | _DYNAMIC
    parent: _Scope | None = None
    attributes: dict = field(default_factory=dict)  # function attribute bindings (ref_attr_name)
    ranks: dict | None = None  # tensor name -> rank; set on a root scope

    def rank(self, name: str) -> int | None:
        scope = self
        while scope.ranks is None and scope.parent is not None:
            scope = scope.parent
        return (scope.ranks or {}).get(name)

    def lookup(self, name: str):
        scope = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return _DYNAMIC

    def attribute(self, name: str):
        scope = self
        while scope is not None:
            if name in scope.attributes:
                return scope.attributes[name]
            scope = scope.parent
        return None


class _NotReadable(Exception):
    pass


@dataclass
class _Checker:
    external_dir: Path | None
    functions: dict[tuple[str, str], onnx.FunctionProto]
    problems: list[str] = field(default_factory=list)
    runtime_limits: list[str] = field(default_factory=list)  # conditions only the run can check

    # -- values --

    def value(self, ref):
        """numpy value of a constant reference (TensorProto or Constant node)."""
        if isinstance(ref, onnx.TensorProto):
            if ref.data_location == onnx.TensorProto.EXTERNAL:
                if self.external_dir is None:
                    raise _NotReadable("its initializer is stored as external data")
                from onnx.external_data_helper import load_external_data_for_tensor

                tensor = onnx.TensorProto()
                tensor.CopyFrom(ref)
                load_external_data_for_tensor(tensor, str(self.external_dir))
                ref = tensor
            return numpy_helper.to_array(ref)
        if isinstance(ref, onnx.NodeProto):  # Constant
            for attr in ref.attribute:
                if attr.ref_attr_name:
                    raise _NotReadable("its Constant node takes its value from a function attribute")
                if attr.type == AttributeProto.TENSOR:
                    return self.value(attr.t)
                if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    return np.asarray(onnx.helper.get_attribute_value(attr))
            raise _NotReadable("its Constant node holds no numeric value")
        raise _NotReadable("it is not a constant")

    # -- attributes (with function attribute references) --

    def attr(self, node: onnx.NodeProto, name: str, default, scope: _Scope):
        for attr in node.attribute:
            if attr.name != name:
                continue
            if attr.ref_attr_name:
                attr = scope.attribute(attr.ref_attr_name)
                if attr is None:
                    return default
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
        return default

    # -- walking --

    def graph_scope(self, graph: onnx.GraphProto, parent: _Scope | None) -> _Scope:
        scope = _Scope(parent=parent)
        for vi in graph.input:
            scope.names[vi.name] = _DYNAMIC
        for init in graph.initializer:  # IR < 4: initializers may also be listed as inputs
            scope.names[init.name] = init
        return scope

    def check_nodes(self, nodes, scope: _Scope, where: str, stack: tuple) -> None:
        for node in nodes:
            self.check_node(node, scope, where)
            for attr_name, sub in _subgraphs(node):
                self.check_nodes(
                    sub.node, self.graph_scope(sub, scope), f"{where}/{_node_label(node)}.{attr_name}", stack
                )
            function = self.functions.get(_function_key(node.domain, node.op_type))
            if function is not None and function.name not in stack:
                self.check_function(function, node, scope, where, stack + (function.name,))
            for out in node.output:
                if out:
                    scope.names[out] = node if node.op_type == "Constant" and _is_default(node) else _DYNAMIC

    def check_function(
        self, function: onnx.FunctionProto, call: onnx.NodeProto, caller: _Scope, where: str, stack: tuple
    ) -> None:
        # Function bodies see only their formal inputs (bound to the call's actual arguments) and
        # their own nodes: not the caller's other names.
        scope = _Scope(ranks={})  # names inside a body are its own: no ranks from the model's graphs
        for formal, actual in zip(function.input, call.input):
            scope.names[formal] = caller.lookup(actual) if actual else _DYNAMIC
        for formal in function.input[len(call.input) :]:
            scope.names[formal] = _DYNAMIC
        scope.attributes = {a.name: a for a in call.attribute}
        for attr in function.attribute_proto:  # defaults for attributes the call leaves out
            scope.attributes.setdefault(attr.name, attr)
        self.check_nodes(function.node, scope, f"{where}/{_node_label(call)} -> function {function.name}", stack)

    # -- the restrictions --

    def report(self, node: onnx.NodeProto, where: str, message: str) -> None:
        self.problems.append(f"{_node_label(node)} in {where}: {message}")

    def check_node(self, node: onnx.NodeProto, scope: _Scope, where: str) -> None:
        if not _is_default(node):
            return
        op = node.op_type
        for index, input_name in _CONSTANT_INPUTS.get(op, {}).items():
            if index < len(node.input) and node.input[index]:
                if scope.lookup(node.input[index]) is not _DYNAMIC:
                    continue
                self.report(
                    node,
                    where,
                    f"input {index} ({input_name}) {node.input[index]!r} must be a "
                    "build-time constant (initializer or Constant) for TensorRT, but is computed at run time",
                )
        if op == "TopK":
            self.check_topk(node, scope, where)
        elif op in ("ScatterElements", "ScatterND"):
            reduction = self.attr(node, "reduction", "none", scope)
            if reduction != "none":
                if op == "ScatterND":
                    self.report(
                        node,
                        where,
                        f"reduction={reduction!r}: TensorRT's parser rejects ScatterND with a "
                        "reduction (express the scatter-add as a one-hot MatMul)",
                    )
                else:
                    self.report(
                        node,
                        where,
                        f"reduction={reduction!r}: not a core TensorRT layer; needs the "
                        "ScatterElements plugin library at build and run time (express the scatter-add "
                        "as a one-hot MatMul)",
                    )

    def check_topk(self, node: onnx.NodeProto, scope: _Scope, where: str) -> None:
        if self.attr(node, "sorted", 1, scope) != 1:
            self.report(node, where, "sorted=0: TensorRT only imports TopK with sorted=1")
        k = self.attr(node, "k", None, scope)  # opset < 10: K is an attribute
        if k is None and len(node.input) > 1 and node.input[1]:
            ref = scope.lookup(node.input[1])
            if ref is _DYNAMIC:  # TensorRT takes it (ITopKLayer::setInput(1)); K <= 3840 is a run-time condition
                self.runtime_limits.append(
                    f"{_node_label(node)} in {where}: K {node.input[1]!r} is computed at run time; "
                    f"TensorRT fails at run time if it exceeds {TOPK_MAX_K}"
                )
            else:
                try:
                    k = int(self.value(ref).reshape(-1)[0])
                except (_NotReadable, IndexError, ValueError, TypeError) as exc:
                    self.report(
                        node, where, f"K {node.input[1]!r} cannot be read ({exc}); TensorRT needs K <= {TOPK_MAX_K}"
                    )
        if k is not None and k > TOPK_MAX_K:
            self.report(node, where, f"K={k} exceeds TensorRT's TopK limit of {TOPK_MAX_K}")
        rank = scope.rank(node.input[0]) if node.input else None
        if rank is not None and rank > 0:
            axis = self.attr(node, "axis", -1, scope)
            axis = axis + rank if axis < 0 else axis
            if not rank - _TOPK_LAST_AXES <= axis < rank:
                self.report(
                    node,
                    where,
                    f"axis {axis} of a rank-{rank} input: TensorRT's TopK reduces only "
                    f"one of the last {_TOPK_LAST_AXES} dimensions",
                )


def _is_default(node: onnx.NodeProto) -> bool:
    return (node.domain or "") in _DEFAULT_DOMAINS


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> rank, from (inferred) value_info of every graph and subgraph."""
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a help here, not a requirement (e.g. protos over 2 GB)
        pass
    ranks: dict[str, int] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            tensor_type = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tensor_type.HasField("shape"):
                ranks[vi.name] = len(tensor_type.shape.dim)
        for init in graph.initializer:
            ranks[init.name] = len(init.dims)
        for node in graph.node:
            for _, sub in _subgraphs(node):
                collect(sub)

    collect(model.graph)
    return ranks


def check_restrictions(model_or_path) -> list[str]:
    """Violations of TensorRT parser restrictions that the graph alone decides; [] if none.

    Checked (sources in trt_onnx_ops.json): the default-domain opset is within the range the parser
    of every release in TRT_RELEASES reads; TopK has K <= TOPK_MAX_K where K is a constant
    (attribute, initializer or Constant; a K computed at run time is legal, see runtime_limits),
    sorted=1, and reduces one of the last four axes (where the rank is known); inputs TensorRT needs
    as build-time constants are initializers or Constant outputs (Reduce* axes, CumSum axis, OneHot
    depth, STFT frame_step/window); ScatterElements and ScatterND carry no reduction other than
    "none". Walks subgraphs, and local functions at each call site (their inputs bound to the
    caller's arguments). Each entry names the node and where it is.
    """
    model, _, external_dir = _load(model_or_path)
    return _restrictions(model, external_dir)


def runtime_limits(model_or_path) -> list[str]:
    """Conditions TensorRT accepts the graph under but only checks while it runs; [] if none.

    Today: every TopK whose K is computed at run time (for example from the input's shape). The
    parser takes such a K (ITopKLayer::setInput(1), TensorRT >= 8.6; sources in trt_onnx_ops.json),
    and TensorRT raises a run-time error when it exceeds TOPK_MAX_K. Callers record these next to
    the engine (e.g. the token range a profile may cover)."""
    model, _, external_dir = _load(model_or_path)
    return _run_checker(model, external_dir).runtime_limits


def _restrictions(model: onnx.ModelProto, external_dir: Path | None) -> list[str]:
    return _run_checker(model, external_dir).problems


def _run_checker(model: onnx.ModelProto, external_dir: Path | None) -> _Checker:
    checker = _Checker(
        external_dir=external_dir,
        functions={_function_key(f.domain, f.name): f for f in model.functions},
    )
    for opset in model.opset_import:
        if opset.domain in _DEFAULT_DOMAINS:
            for release in TRT_RELEASES:
                lo, hi = release.source["opset_min"], release.source["opset_max"]
                if not lo <= opset.version <= hi:
                    checker.problems.append(
                        f"default-domain opset {opset.version} is outside the range TensorRT "
                        f"{release.version} parses ({lo} to {hi})"
                    )
    root = checker.graph_scope(model.graph, None)
    root.ranks = _ranks(model)
    checker.check_nodes(model.graph.node, root, "graph", ())
    return checker


def assert_trt_compatible(model_or_path, *, extra_allowed: Iterable[str] = ()) -> None:
    """Raise ValueError listing every op outside the allowlist and every restriction violation."""
    model, label, external_dir = _load(model_or_path)
    ops = _unsupported(model, extra_allowed)
    problems = _restrictions(model, external_dir)
    if not ops and not problems:
        return
    parts = []
    if ops:
        parts.append(f"ops the ONNX parser of TensorRT {_VERSIONS} does not support: {', '.join(ops)}")
    parts.extend(problems)
    raise ValueError(f"{label} is not TensorRT-compatible: " + "; ".join(parts))
