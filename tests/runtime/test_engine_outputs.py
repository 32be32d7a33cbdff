"""Issue 11, class 5: the vision engine's outputs are not trusted.

A replaced ONNX (re-hashed into the manifest, so the checksums pass) whose positions are out of
range, descending or repeated, or whose embeddings are NaN, is an error naming the image and the
engine at the request - never output printed as if fine, never an overlay written. An engine whose
declared input shape or dtype disagrees with the manifest is refused at load with one line, not at
the first request with a raw backend error.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from apet_trt import runtime
from apet_trt.runtime.checks import check_ascending, check_outputs
from apet_trt.runtime.families import VisualRows
from apet_trt.runtime.manifest import load_manifest
from apet_trt.scripts.cli import main
from helpers.engines import N, build_engine_dir, write_manifest
from helpers.guard import untouched

PHOTO = str(Path(__file__).resolve().parents[2] / "assets" / "grace_hopper.jpg")
KEEP = 8


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("outputs") / "t8", keep=KEEP)


def _tampered(pristine: Path, tmp_path: Path, output: str, op: str, value) -> Path:
    """A copy whose vision.onnx computes `output = op(original output, value)`, re-hashed."""
    engine = shutil.copytree(pristine, tmp_path / "engine")
    model = onnx.load(str(engine / "vision.onnx"))
    raw = f"{output}_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == output else o for o in node.output]
        node.input[:] = [raw if i == output else i for i in node.input]
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name=f"{output}_const"))
    args = [f"{output}_const", raw] if op == "Sub" else [raw, f"{output}_const"]
    model.graph.node.append(helper.make_node(op, args, [output]))
    onnx.save(model, str(engine / "vision.onnx"))
    write_manifest(engine, json.loads((engine / "manifest.json").read_text()))
    return engine


CASES = {
    "out of range": (
        "positions",
        "Add",
        np.int64(N),
        r"item 0: the vision engine returned position \d+, outside \[0, N=36\)",
    ),
    "descending": ("positions", "Sub", np.int64(N - 1), r"image 0: .*positions that are not ascending"),
    "repeated": ("positions", "Mul", np.int64(0), r"item 0: the vision engine returned a position twice"),
    "NaN embeddings": ("embeddings", "Mul", np.float32("nan"), r"item 0: the vision engine returned NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_outputs_of_a_replaced_engine_are_refused_per_request(pristine, tmp_path, capsys, case):
    output, op, value, pattern = CASES[case]
    engine = _tampered(pristine, tmp_path, output, op, value)
    load_manifest(engine)  # the checksums match: only the outputs can tell
    pipe = runtime.load(engine, backend="onnxruntime")
    with pytest.raises(RuntimeError, match=pattern):
        pipe.generate(PHOTO, "What is it?", max_new_tokens=2)
    with pytest.raises(RuntimeError, match=pattern):
        pipe.encode([PHOTO])
    overlay = tmp_path / "out" / "kept.png"
    (tmp_path / "out").mkdir()
    capsys.readouterr()
    with untouched(tmp_path / "out"):
        rc = main(["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x", "--overlay", str(overlay)])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == ""  # nothing printed as if fine
    err = [line for line in captured.err.splitlines() if line.startswith("apet ")]
    assert len(err) == 1 and re.search(rf"RuntimeError: .*{pattern}", err[0]), captured.err
    assert not overlay.exists()


def _manifest_edit(pristine: Path, tmp_path: Path, edit) -> Path:
    engine = shutil.copytree(pristine, tmp_path / "engine")
    data = json.loads((engine / "manifest.json").read_text())
    edit(data)
    write_manifest(engine, data)
    return engine


def _size_112(data):
    data["vision"]["image_size"] = 112
    data["io"]["inputs"][0]["shape"] = ["batch", 3, 112, 112]


def _dtype_f16(data):
    data["io"]["inputs"][0]["dtype"] = "float16"


def _input_name(data):
    data["io"]["inputs"][0]["name"] = "images"


INPUT_CASES = {
    "shape": (_size_112, r"the engine takes pixel_values \[batch, 3, 84, 84\], the manifest promises \[batch, 3, 112"),
    "dtype": (_dtype_f16, r"input 'pixel_values' is float32, the manifest says float16"),
    "name": (_input_name, r"engine tensors \['pixel_values'\] -> .* differ from the manifest's \['images'\]"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_an_input_that_disagrees_with_the_manifest_is_refused_at_load(pristine, tmp_path, capsys, case):
    edit, pattern = INPUT_CASES[case]
    engine = _manifest_edit(pristine, tmp_path, edit)
    with pytest.raises(RuntimeError, match=pattern):
        runtime.load(engine, backend="onnxruntime")
    capsys.readouterr()
    assert main(["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x"]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("apet ")]
    assert len(err) == 1 and "vision.onnx" in err[0] and captured.out == "", captured.err


def test_check_outputs_against_fresh_random_outputs(pristine, rng):
    """Valid outputs (random strictly ascending positions in [0, N), finite rows) pass; each kind of
    corruption of one entry is named with its item index."""
    manifest = load_manifest(pristine)
    for _ in range(20):
        b = int(torch.randint(1, 4, (1,), generator=rng))
        pos = torch.stack([torch.randperm(N, generator=rng)[:KEEP].sort().values for _ in range(b)])
        emb = torch.randn(b, KEEP, 64, generator=rng)
        check_outputs("engine", manifest, {"embeddings": emb, "positions": pos})
        check_ascending("engine", [VisualRows(emb[i], pos[i], N) for i in range(b)])
        i, j = int(torch.randint(0, b, (1,), generator=rng)), int(torch.randint(1, KEEP, (1,), generator=rng))
        for corrupt, pattern in (
            (lambda p, e: p[i].__setitem__(j, N), rf"item {i}: .*position {N}, outside"),
            (lambda p, e: p[i].__setitem__(0, -1), rf"item {i}: .*position -1, outside"),
            (lambda p, e: p[i].__setitem__(j, p[i, j - 1]), rf"item {i}: .*a position twice"),
            (lambda p, e: e[i, j].__setitem__(0, float("inf")), rf"item {i}: .*NaN or Inf"),
        ):
            p, e = pos.clone(), emb.clone()
            corrupt(p, e)
            with pytest.raises(RuntimeError, match=pattern):
                check_outputs("engine", manifest, {"embeddings": e, "positions": p})
        p = pos.clone()
        p[i] = p[i].flip(0)
        with pytest.raises(RuntimeError, match=rf"image {i}: .*not ascending"):
            check_ascending("engine", [VisualRows(emb[k], p[k], N) for k in range(b)])


def test_a_valid_engine_passes_the_same_checks(pristine):
    """The checks never fire on the real engine: positions equal the torch backend's."""
    rows = runtime.load(pristine, backend="onnxruntime").encode([PHOTO, PHOTO])
    ref = runtime.load(pristine, backend="torch").encode([PHOTO, PHOTO])
    for r, q in zip(rows, ref):
        assert r.positions.shape == (KEEP,) and bool((r.positions[1:] > r.positions[:-1]).all())
        assert torch.equal(r.positions, q.positions)
