"""The TensorRT ONNX-op allowlist (apet_ops/trt_onnx_ops.json) and the checks built on it."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from apet_trt.apet_ops import trt_ops
from apet_trt.apet_ops.trt_ops import (
    TOPK_MAX_K,
    TRT_ONNX_OPS,
    TRT_ONNX_UNSUPPORTED,
    TRT_RELEASES,
    TRT_SOURCE,
    assert_trt_compatible,
    check_restrictions,
    runtime_limits,
    unsupported_ops,
)

OPSET = 17
F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _model(nodes, inputs, outputs, initializers=(), functions=(), opset=OPSET, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _x(name="x", shape=(2, 8)):
    return helper.make_tensor_value_info(name, F, list(shape))


def _y(name="y", elem=F, rank=2):
    return helper.make_tensor_value_info(name, elem, [f"{name}{i}" for i in range(rank)])


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


# ---------------------------------------------------------------------------------------------
# The data file


def test_source_is_pinned():
    assert TRT_SOURCE["repo"] == "onnx/onnx-tensorrt"
    assert TRT_SOURCE["path"] == "docs/operators.md"
    assert re.fullmatch(r"[0-9a-f]{40}", TRT_SOURCE["commit"])
    assert TRT_SOURCE["tensorrt_version"].startswith("10.")
    assert TRT_SOURCE["commit"] in TRT_SOURCE["url"]
    assert TRT_SOURCE["opset_min"] <= OPSET <= TRT_SOURCE["opset_max"]


def test_tensorrt_11_matrix_is_pinned_and_checked_too():
    """The TensorRT 11 line (strongly typed only) is checked beside 10.16: its matrix is the one of
    NVIDIA/TensorRT v11.1's parsers/onnx submodule, opset 9 to 24."""
    assert [r.version for r in TRT_RELEASES] == ["10.16", "11.1"]
    new = TRT_RELEASES[1].source
    assert new["repo"] == "onnx/onnx-tensorrt" and new["path"] == "docs/operators.md"
    assert new["commit"] == "7c51a63a719180eb5160c874c111746f3fb46a6b" and new["commit"] in new["url"]
    assert (new["opset_min"], new["opset_max"]) == (9, 24)
    old, eleven = TRT_RELEASES
    assert eleven.supported - old.supported == {"Swish"}  # the one difference between the two matrices
    assert old.supported <= eleven.supported and old.unsupported == eleven.unsupported
    assert TRT_ONNX_OPS == old.supported & eleven.supported


def test_an_op_one_release_lacks_is_reported():
    """Swish imports on TensorRT 11.1, not on 10.16: a graph with it does not pass both."""
    model = _model([helper.make_node("Swish", ["x"], ["y"])], [_x()], [_y()], opset=24)
    assert unsupported_ops(model) == ["Swish"]
    with pytest.raises(ValueError, match=r"TensorRT 10\.16, 11\.1 does not support: Swish"):
        assert_trt_compatible(model)


def test_allowlist_shape():
    assert TRT_ONNX_OPS.isdisjoint(TRT_ONNX_UNSUPPORTED)
    # Ops the ApET graph is built from (docs/DESIGN.md) are all supported...
    assert {
        "MatMul",
        "TopK",
        "ArgMax",
        "Gather",
        "GatherElements",
        "ReduceSum",
        "Add",
        "Mul",
        "Div",
        "Sqrt",
        "Where",
        "Concat",
        "Reshape",
        "Transpose",
        "If",
        "Loop",
        "Scan",
    } <= TRT_ONNX_OPS
    # ...and ops the matrix marks N are not.
    assert {"Unique", "Det", "SequenceAt", "MatMulInteger", "BitShift"} <= TRT_ONNX_UNSUPPORTED


def test_every_listed_op_is_an_onnx_op():
    # Names the matrix carries from old opsets / experimental ops that have no schema any more.
    legacy = {"ImageScaler", "ParametricSoftplus", "ScaledTanh", "Scatter", "Upsample"}
    missing = sorted(op for op in (TRT_ONNX_OPS | TRT_ONNX_UNSUPPORTED) - legacy if not onnx.defs.has(op))
    assert missing == []


def test_restrictions_recorded_for_the_ops_we_depend_on():
    data = trt_ops._DATA
    assert data["topk_max_k"] == 3840
    assert "3840" in data["supported"]["TopK"]
    assert "initializer" in data["supported"]["ReduceSum"]
    assert "plugin" in data["supported"]["ScatterElements"]
    assert "reduction" in data["supported"]["ScatterND"]
    assert data["supported"]["Einsum"]  # the 8.x limits are noted
    assert data["constant_inputs"]["ReduceSum"] == {"1": "axes"}


# ---------------------------------------------------------------------------------------------
# unsupported_ops


def test_supported_model_is_clean():
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("TopK", ["h", "k"], ["y", "idx"], axis=-1)],
        [_x()],
        [_y(), _y("idx", I64)],
        [numpy_helper.from_array(np.ones((8, 8), np.float32), "w"), _i64("k", [4])],
    )
    onnx.checker.check_model(model)
    assert unsupported_ops(model) == []
    assert check_restrictions(model) == []
    assert_trt_compatible(model)


def test_unsupported_default_domain_op():
    model = _model(
        [helper.make_node("Det", ["x"], ["d"]), helper.make_node("Relu", ["d"], ["y"])],
        [_x(shape=(3, 3))],
        [_y(rank=0)],
    )
    onnx.checker.check_model(model)
    assert unsupported_ops(model) == ["Det"]


def test_ai_onnx_domain_is_the_default_domain():
    model = _model([helper.make_node("Relu", ["x"], ["y"], domain="ai.onnx")], [_x()], [_y()])
    assert unsupported_ops(model) == []


def test_custom_domain_op_is_unsupported_unless_allowed():
    model = _model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("FusedThing", ["r"], ["y"], domain="com.example")],
        [_x()],
        [_y()],
        extra_opsets=["com.example"],
    )
    assert unsupported_ops(model) == ["com.example::FusedThing"]
    assert unsupported_ops(model, extra_allowed=["com.example::FusedThing"]) == []
    with pytest.raises(TypeError, match="iterable"):
        unsupported_ops(model, extra_allowed="com.example::FusedThing")


def _if_model(then_op: str):
    then_g = helper.make_graph([helper.make_node(then_op, ["x"], ["t"])], "then", [], [_y("t", rank=1)])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_y("e", rank=1)])
    return _model(
        [
            helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Greater", ["m", "zero"], ["c"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        ],
        [_x(shape=(6,))],
        [_y(rank=1)],
        [numpy_helper.from_array(np.float32(0), "zero")],
    )


def test_unsupported_op_inside_if_branch():
    clean = _if_model("Neg")
    onnx.checker.check_model(clean)
    assert unsupported_ops(clean) == []
    hidden = _if_model("Unique")
    onnx.checker.check_model(hidden)
    assert unsupported_ops(hidden) == ["Unique"]


def _loop_model(body_op: str):
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node(body_op, ["acc_in"], ["acc_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", I64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", F, [3, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", F, None),
        ],
    )
    return _model(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], body=body)],
        [_x(shape=(3, 3))],
        [_y()],
        [_i64("trip", 2), numpy_helper.from_array(np.array(True), "cond")],
    )


def test_unsupported_op_inside_loop_body():
    clean = _loop_model("Neg")
    onnx.checker.check_model(clean)
    assert unsupported_ops(clean) == []
    hidden = _loop_model("MatMulInteger")
    assert unsupported_ops(hidden) == ["MatMulInteger"]


def test_nested_subgraphs():
    inner = _if_model("Det").graph.node[-1]  # an If whose then-branch holds Det
    body = helper.make_graph([inner], "body", [], [_y("y")])
    model = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [_y()],
    )
    assert unsupported_ops(model) == ["Det"]


def _function(name: str, body_op: str, domain="apet.local"):
    return helper.make_function(
        domain, name, ["a"], ["b"], [helper.make_node(body_op, ["a"], ["b"])], [helper.make_opsetid("", OPSET)]
    )


def test_function_defined_op():
    for body_op, expected in (("Relu", []), ("Det", ["Det"])):
        model = _model(
            [helper.make_node("MyBlock", ["x"], ["y"], domain="apet.local")],
            [_x(shape=(3, 3))],
            [_y()],
            functions=[_function("MyBlock", body_op)],
            extra_opsets=["apet.local"],
        )
        onnx.checker.check_model(model)
        # The call to the local function is not an unsupported op; its body is checked.
        assert unsupported_ops(model) == expected


def test_function_bodies_are_walked_even_uncalled():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [_x()],
        [_y()],
        functions=[_function("Unused", "Unique")],
        extra_opsets=["apet.local"],
    )
    assert unsupported_ops(model) == ["Unique"]


def test_random_nested_models_against_a_recorded_oracle(rng):
    """Random graphs nested through If/Loop/Scan attributes and local functions; the generator
    records which unsupported names it planted, and unsupported_ops must find exactly those."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))

    def pick(seq):
        return seq[int(torch.randint(0, len(seq), (1,), generator=gen))]

    good = sorted(TRT_ONNX_OPS - {"If", "Loop", "Scan"})
    bad_default = sorted(TRT_ONNX_UNSUPPORTED) + ["NotAnOnnxOp"]
    bad_custom = [("com.example", "Fancy"), ("ai.onnx.ml", "LabelEncoder"), ("org.pytorch.aten", "ATen")]

    for _ in range(25):
        planted: set[str] = set()
        counter = iter(range(10**6))
        functions = []

        def make_nodes(depth):
            nodes = []
            for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
                kind = float(torch.rand((), generator=gen))
                out = f"t{next(counter)}"
                if kind < 0.5:
                    nodes.append(helper.make_node(pick(good), ["x"], [out]))
                elif kind < 0.65:
                    op = pick(bad_default)
                    planted.add(op)
                    nodes.append(helper.make_node(op, ["x"], [out]))
                elif kind < 0.75:
                    domain, op = pick(bad_custom)
                    planted.add(f"{domain}::{op}")
                    nodes.append(helper.make_node(op, ["x"], [out], domain=domain))
                elif kind < 0.85 and depth < 3:
                    name = f"Fn{next(counter)}"
                    functions.append(
                        helper.make_function(
                            "apet.local", name, ["x"], [out], make_nodes(depth + 1), [helper.make_opsetid("", OPSET)]
                        )
                    )
                    nodes.append(helper.make_node(name, ["x"], [out], domain="apet.local"))
                elif depth < 3:
                    op = pick(["If", "Loop", "Scan"])
                    sub = helper.make_graph(make_nodes(depth + 1), f"sub{next(counter)}", [], [])
                    attrs = {
                        "If": {"then_branch": sub, "else_branch": sub},
                        "Loop": {"body": sub},
                        "Scan": {"body": sub, "num_scan_inputs": 1},
                    }[op]
                    nodes.append(helper.make_node(op, ["x"], [out], **attrs))
            return nodes

        model = _model(make_nodes(0), [_x()], [], functions=functions, extra_opsets=["apet.local"])
        assert unsupported_ops(model) == sorted(planted)


# ---------------------------------------------------------------------------------------------
# check_restrictions


def _topk_model(k_values=None, *, k_as="initializer", axis=-1, shape=(2, 5000), sorted_=1):
    nodes, inits, inputs = [], [], [_x(shape=shape)]
    if k_as == "initializer":
        inits.append(_i64("k", [k_values]))
    elif k_as == "constant":
        nodes.append(
            helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([k_values], np.int64)))
        )
    else:  # a graph input: known only at run time
        inputs.append(helper.make_tensor_value_info("k", I64, [1]))
    nodes.append(helper.make_node("TopK", ["x", "k"], ["y", "idx"], axis=axis, sorted=sorted_))
    return _model(nodes, inputs, [_y(), _y("idx", I64)], inits)


@pytest.mark.parametrize("k_as", ["initializer", "constant"])
def test_topk_k_limit(k_as):
    ok = _topk_model(64, k_as=k_as)
    onnx.checker.check_model(ok)
    assert check_restrictions(ok) == []
    assert check_restrictions(_topk_model(TOPK_MAX_K, k_as=k_as)) == []
    problems = check_restrictions(_topk_model(4000, k_as=k_as))
    assert len(problems) == 1 and "K=4000" in problems[0] and "3840" in problems[0]
    assert check_restrictions(_topk_model(TOPK_MAX_K + 1, k_as=k_as)) != []


def test_topk_runtime_k_is_legal_with_a_runtime_limit():
    """TensorRT's parser takes a K computed at run time (ITopKLayer::setInput(1), since 8.6; see
    trt_onnx_ops.json): not a restriction, but a condition (K <= 3840) only the run can check."""
    model = _topk_model(k_as="input")
    assert check_restrictions(model) == []
    limits = runtime_limits(model)
    assert len(limits) == 1 and "run time" in limits[0] and str(TOPK_MAX_K) in limits[0]
    assert runtime_limits(_topk_model(64)) == []


def test_topk_attribute_k_before_opset_10():
    model = _model([helper.make_node("TopK", ["x"], ["y", "idx"], k=4000)], [_x()], [_y(), _y("idx", I64)], opset=9)
    assert ["K=4000" in p for p in check_restrictions(model)] == [True]


def test_topk_axis_and_sorted():
    rank6 = (2, 2, 2, 2, 2, 16)
    assert check_restrictions(_topk_model(2, axis=-1, shape=rank6)) == []
    assert check_restrictions(_topk_model(2, axis=2, shape=rank6)) == []  # the 4th-from-last axis
    problems = check_restrictions(_topk_model(2, axis=1, shape=rank6))
    assert len(problems) == 1 and "last 4" in problems[0]
    problems = check_restrictions(_topk_model(2, sorted_=0))
    assert len(problems) == 1 and "sorted" in problems[0]


def test_topk_in_subgraph_resolves_outer_constants():
    for k, n_problems in ((64, 0), (4000, 1)):
        then_g = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"])], "then", [], [_y("v")])
        else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_y("e")])
        model = _model(
            [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
            [_x(), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
            [_y()],
            [_i64("k", [k])],
        )
        problems = check_restrictions(model)
        assert len(problems) == n_problems
        if problems:
            assert "then_branch" in problems[0]


def test_subgraph_input_shadows_outer_constant():
    body = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"])],
        "body",
        [helper.make_tensor_value_info("k", I64, [1])],
        [_y("v")],
    )
    model = _model(
        [helper.make_node("Loop", ["", "c"], [], body=body)],
        [_x(), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [],
        [_i64("k", [4])],
    )
    assert check_restrictions(model) == []  # the outer K=4 would pass as well: the limit tells them apart
    limits = runtime_limits(model)
    assert len(limits) == 1 and "run time" in limits[0] and "body" in limits[0]


def test_topk_in_function_binds_call_site_arguments():
    fn = helper.make_function(
        "apet.local",
        "Select",
        ["a", "kk"],
        ["v"],
        [helper.make_node("TopK", ["a", "kk"], ["v", "i"])],
        [helper.make_opsetid("", OPSET)],
    )
    for k, n_problems in ((64, 0), (4000, 1)):
        model = _model(
            [helper.make_node("Select", ["x", "k"], ["y"], domain="apet.local")],
            [_x()],
            [_y()],
            [_i64("k", [k])],
            functions=[fn],
            extra_opsets=["apet.local"],
        )
        problems = check_restrictions(model)
        assert len(problems) == n_problems
        if problems:
            assert "function Select" in problems[0] and "K=4000" in problems[0]


def _reducesum_model(axes_as):
    nodes, inits, inputs = [], [], [_x(shape=(2, 3, 4))]
    if axes_as == "initializer":
        inits.append(_i64("axes", [1]))
    elif axes_as == "constant":
        nodes.append(helper.make_node("Constant", [], ["axes"], value_ints=[1]))
    elif axes_as == "computed":  # derived at run time from the input's shape
        nodes += [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["axes"])]
        inits.append(_i64("zero", [0]))
    else:
        inputs.append(helper.make_tensor_value_info("axes", I64, [1]))
    nodes.append(helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0))
    return _model(nodes, inputs, [_y()], inits)


@pytest.mark.parametrize(
    "axes_as, flagged", [("initializer", False), ("constant", False), ("input", True), ("computed", True)]
)
def test_reducesum_axes_must_be_constant(axes_as, flagged):
    model = _reducesum_model(axes_as)
    onnx.checker.check_model(model)
    problems = check_restrictions(model)
    assert bool(problems) == flagged
    if flagged:
        assert "ReduceSum" in problems[0] and "axes" in problems[0]


def test_reducesum_without_axes_input_is_fine():
    model = _model([helper.make_node("ReduceSum", ["x"], ["y"])], [_x()], [_y()])
    assert check_restrictions(model) == []


def _scatter_model(op, reduction):
    attrs = {} if reduction is None else {"reduction": reduction}
    if op == "ScatterElements":
        indices = _i64("ind", [[0, 1], [1, 0]])
        node = helper.make_node(op, ["x", "ind", "upd"], ["y"], axis=1, **attrs)
        upd = numpy_helper.from_array(np.ones((2, 2), np.float32), "upd")
    else:
        indices = _i64("ind", [[0], [1]])
        node = helper.make_node(op, ["x", "ind", "upd"], ["y"], **attrs)
        upd = numpy_helper.from_array(np.ones((2, 8), np.float32), "upd")
    return _model([node], [_x()], [_y()], [indices, upd], opset=18)


@pytest.mark.parametrize("op", ["ScatterElements", "ScatterND"])
def test_scatter_reduction(op):
    for reduction in (None, "none"):
        model = _scatter_model(op, reduction)
        onnx.checker.check_model(model)
        assert check_restrictions(model) == []
    model = _scatter_model(op, "add")
    onnx.checker.check_model(model)
    problems = check_restrictions(model)
    assert len(problems) == 1 and "reduction='add'" in problems[0]
    assert ("plugin" in problems[0]) == (op == "ScatterElements")
    assert unsupported_ops(model) == []  # the op itself is on the list; the reduction is the problem


@pytest.mark.parametrize("opset", [8, 25])
def test_opset_outside_parser_range(opset):
    """Outside the range of every release (both read opset 9 to 24): one problem per release."""
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_y()], opset=opset)
    problems = check_restrictions(model)
    assert [re.search(r"TensorRT (\S+) parses", p).group(1) for p in problems] == ["10.16", "11.1"]
    assert all(f"opset {opset} " in p for p in problems)
    for edge in (9, 24):
        assert check_restrictions(_model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_y()], opset=edge)) == []


# ---------------------------------------------------------------------------------------------
# Paths, external data, errors, assert_trt_compatible


def test_path_and_external_data(tmp_path):
    model = _topk_model(4000)
    path = tmp_path / "m.onnx"
    onnx.save(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0
    )
    assert onnx.load(str(path), load_external_data=False).graph.initializer[0].data_location == TensorProto.EXTERNAL
    assert unsupported_ops(path) == [] and unsupported_ops(str(path)) == []
    # From a path the checker reads the small external tensors it needs (here K)...
    problems = check_restrictions(path)
    assert len(problems) == 1 and "K=4000" in problems[0]
    # ...from an in-memory proto without its data it says it cannot.
    problems = check_restrictions(onnx.load(str(path), load_external_data=False))
    assert len(problems) == 1 and "cannot be read" in problems[0]


def test_assert_trt_compatible_lists_everything(tmp_path):
    model = _model(
        [
            helper.make_node("Det", ["x"], ["d"]),
            helper.make_node("TopK", ["x", "k"], ["v", "i"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["y"]),
        ],
        [_x(shape=(3, 3)), helper.make_tensor_value_info("axes", I64, [1])],
        [_y()],
        [_i64("k", [4000])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError) as info:
        assert_trt_compatible(path)
    message = str(info.value)
    assert str(path) in message and "Det" in message and "K=4000" in message and "ReduceSum" in message
    assert "\n" not in message  # the CLI prints one line


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        unsupported_ops(tmp_path / "nope.onnx")
    with pytest.raises(TypeError, match="ModelProto"):
        check_restrictions(42)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00 not a protobuf \x13\x37" * 7)
    with pytest.raises(ValueError, match="junk.onnx"):
        assert_trt_compatible(junk)


def test_exported_compressor_passes(tmp_path, rng):
    """The lead's exported ApET graph (apet_ops.export_compressor_onnx) is inside the allowlist."""
    from apet_trt.apet_ops import ApetConfig, export_compressor_onnx

    basis = int(torch.randint(2, 12, (1,), generator=rng))
    keep = basis + int(torch.randint(1, 60, (1,), generator=rng))
    path = export_compressor_onnx(
        ApetConfig(keep=keep, basis=basis), tmp_path / "c.onnx", num_tokens=128, dim=32, validate=False
    )
    assert unsupported_ops(path) == []
    assert check_restrictions(path) == []
