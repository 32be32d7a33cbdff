"""Issue 11, class 4: manifest values are checked, in one place, before anything else reads them.

Edited manifests (re-hashed, so the checksums alone cannot tell) with wrong types, ranges, choices,
template placeholders, token ids, nesting, size, duplicate keys or NaN are refused by
`runtime.load` and `apet inspect` with one line naming the field, and no other file of the engine
directory is opened first. The schema is a table a family adapter extends with one line per field.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from apet_trt import runtime
from apet_trt.runtime import manifest_schema
from apet_trt.runtime.manifest import Field, ManifestError, load_manifest, read_manifest
from apet_trt.runtime.manifest_schema import check_fields
from apet_trt.scripts.cli import main
from helpers.engines import build_engine_dir
from helpers.guard import untouched


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("schema") / "t8", keep=8)


@pytest.fixture
def engine(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "engine")


def _set(path: str, value):
    """A mutation: set the dotted field (list items as [i]) to value."""

    def mutate(data):
        keys = re.findall(r"[^.\[\]]+", path)
        node = data
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(path: str):
    def mutate(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


def _deep(data):
    nested = "leaf"
    for _ in range(40):
        nested = {"x": nested}
    data["processor"]["nested"] = nested


def _huge(data):
    data["processor"]["padding"] = "x" * (5 << 20)


CASES = {
    # field: (mutation, what the one line must say)
    "type": (_set("batch.max", "8"), r"batch\.max: must be an int, got \"8\""),
    "bool is no int": (_set("llm.eos_token_id", True), r"llm\.eos_token_id: must be an int, got true"),
    "range": (_set("batch.max", 0), r"batch\.max: must be in 1\.\.4096, got 0"),
    "opt above max": (_set("batch.opt", 9), r"batch\.opt: must lie in batch\.min\.\.batch\.max = 1\.\.4"),
    "min not 1": (_set("batch.min", 2), r"batch\.min: must be 1"),
    "patch size 0": (_set("vision.patch_size", 0), r"vision\.patch_size: must be in 1\.\.16384, got 0"),
    "patch above image": (_set("vision.patch_size", 100), r"vision\.patch_size: larger than vision\.image_size"),
    "T vs keep": (_set("num_visual_tokens", 9), r"num_visual_tokens: 9 differs from the 8 rows apet gives for N=36"),
    "basis >= keep": (_set("apet.basis", 8), r"apet: apet\.keep must be > basis .*got keep=8, basis=8"),
    "start >= N": (_set("apet.start", 36), r"apet: apet\.start=36 must be < the number of tokens N=36"),
    "ridge": (_set("apet.ridge", -1.0), r"apet\.ridge: must be in 1e-30\.\.1000, got -1\.0"),
    "merge": (_set("apet.merge", "yes"), r"apet\.merge: must be a bool"),
    "llm dtype": (_set("llm.dtype", "float64"), r"llm\.dtype: must be one of \['float32', 'float16', 'bfloat16'\]"),
    "output dtype": (_set("io.outputs[0].dtype", "float16"), r"io\.outputs\[0\]\.dtype: embeddings must be float32"),
    "output shape": (_set("io.outputs[1].shape", ["batch", 9]), r"io\.outputs\[1\]\.shape: positions must be"),
    "input shape": (_set("io.inputs[0].shape", ["batch", 3, 96, 96]), r"io\.inputs\[0\]\.shape: an image input"),
    "dim": (_set("io.inputs[0].shape", ["batch", 3, 0, 84]), r"io\.inputs\[0\]\.shape\[2\]: must be in 1\.\."),
    "no {prompt}": (_set("prompt_template", "USER: <image> ASSISTANT:"), r"prompt_template: must hold the field"),
    "attribute": (_set("prompt_template", "<image>{prompt.__class__}"), r"prompt_template: must hold the field"),
    "positional": (_set("prompt_template", "<image>{prompt}{0}"), r"prompt_template: must hold the field"),
    "image twice": (_set("prompt_template", "<image><image>{prompt}"), r"prompt_template: must hold image_token"),
    "image token": (_set("image_token", ""), r"image_token: \"\" is not of the form"),
    "token id": (_set("llm.image_token_id", 10**6), r"llm\.image_token_id: 1000000 is not below llm\.vocab_size"),
    "negative id": (_set("llm.pad_token_id", -1), r"llm\.pad_token_id: must be in 0\.\."),
    "unknown field": (_set("model_path", "/etc"), r"model_path: unknown field"),
    "frame sampling": (_set("vision.frame_sampling", "decord"), r"vision\.frame_sampling: must be one of"),
    "missing": (_drop("batch"), r"batch: missing"),
    "missing nested": (_drop("llm.hidden_size"), r"llm\.hidden_size: missing"),
    "sha256": (lambda d: d["files"]["vision.onnx"].update(sha256="abc"), r"files\.vision\.onnx\.sha256: \"abc\""),
    "old version": (_set("manifest_version", 1), r"manifest_version 1 is older than this runtime reads \(2"),
    "nesting": (_deep, r"JSON nested deeper than 16 levels"),
    "size": (_huge, r"bytes, over the limit of 4194304"),
}


def _tamper(engine, mutate) -> None:
    path = engine / "manifest.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data, indent=2))


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in captured.err, captured.err
    return err[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_edited_values_are_refused_naming_the_field(engine, capsys, case):
    mutate, pattern = CASES[case]
    _tamper(engine, mutate)
    others = [engine / name for name in ("vision.onnx", "hf", "processor", "tokenizer")]
    with untouched(*others):  # checked before any other file of the directory is read
        with pytest.raises(ManifestError, match=pattern):
            runtime.load(engine, backend="onnxruntime")
        capsys.readouterr()
        assert main(["inspect", str(engine)]) == 2
    line = _one_line(capsys)
    assert line.startswith("apet inspect: error: ManifestError") and re.search(pattern, line), line


RAW_CASES = {
    "duplicate key": (lambda text: text.replace('"batch": {', '"batch": {"max": 2, ', 1), r"duplicate key 'max'"),
    "NaN": (lambda text: re.sub(r'"ridge": [^,\n]+', '"ridge": NaN', text), r"NaN is not a JSON number"),
    "not UTF-8": (lambda text: text.replace('"test-llava"', '"test-\udcff"'), r"not valid JSON"),
    "not an object": (lambda text: "[1, 2]", r"not an apet-trt manifest"),
}


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_malformed_json_is_refused(engine, capsys, case):
    edit, pattern = RAW_CASES[case]
    path = engine / "manifest.json"
    path.write_bytes(edit(path.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(ManifestError, match=pattern):
        read_manifest(engine)
    capsys.readouterr()
    assert main(["inspect", str(engine)]) == 2
    assert re.search(pattern, _one_line(capsys))


def test_a_valid_manifest_passes_and_keeps_its_values(engine):
    m = load_manifest(engine)
    assert (m.num_patches, m.num_visual_tokens, m.batch_max) == (36, 8, 4)
    assert m.apet == {"keep": 8, "basis": 4, "merge": True, "ridge": 1e-5, "start": 0}


def test_a_family_adds_its_facts_with_one_line_and_checks_them_with_its_own_table(engine, monkeypatch):
    """The seam's hook: the top-level table gains one line for the family's object, and the family
    adapter checks that object against its own table through Manifest.section."""
    monkeypatch.setitem(manifest_schema.SCHEMA, "family", Field("object", required=False, open=True))
    rows = {"rows_per_image": Field("int", lo=1, hi=4096), "grid": Field("list", max_len=3), "grid[]": Field("int")}
    _tamper(engine, _set("family", {"rows_per_image": 12, "grid": [2, 3]}))
    m = read_manifest(engine)
    assert m.section("family", rows) == {"rows_per_image": 12, "grid": [2, 3]}
    _tamper(engine, _set("family", {"rows_per_image": 0, "grid": [2, "3"]}))
    with pytest.raises(ManifestError, match=r"manifest\.json: family\.rows_per_image: must be in 1\.\.4096, got 0"):
        read_manifest(engine).section("family", rows)
    _tamper(engine, _set("family", {"rows_per_image": 1, "grid": [2, "3"]}))
    with pytest.raises(ManifestError, match=r"family\.grid\[1\]: must be an int"):
        read_manifest(engine).section("family", rows)


def test_check_fields_on_fresh_random_values(rng):
    """check_fields against an independent statement of the same rules (Python's own comparisons)."""
    import torch

    schema = {"n": Field("int", lo=-5, hi=5), "x": Field("number", lo=0.0, hi=1.0, required=False)}
    for _ in range(200):
        n = int(torch.randint(-10, 11, (1,), generator=rng))
        x = float(torch.rand(1, generator=rng)) * 2 - 0.5
        ok = -5 <= n <= 5 and 0.0 <= x <= 1.0
        try:
            check_fields({"n": n, "x": x}, schema)
            assert ok, (n, x)
        except ManifestError:
            assert not ok, (n, x)
