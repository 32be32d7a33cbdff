"""`apet encode --out` follows `--overlay`'s rules (runtime/output_files.py, one function for both):
never the input image (by path or a hard link), never an existing file without --force, never
through a symbolic link, never inside the engine directory - each refused in one line before the
engine loads, leaving every file as it was; with --force an existing file is replaced atomically
and the engine still verifies."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from apet_trt import runtime
from apet_trt.runtime.manifest import load_manifest
from apet_trt.scripts.cli import main
from helpers.engines import build_engine_dir
from helpers.guard import snapshot

PHOTO = Path(__file__).resolve().parents[3] / "assets" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("encode") / "t6", keep=6)


@pytest.fixture
def no_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the engine was loaded before --out was checked")

    monkeypatch.setattr(runtime, "load", fail)


def _cases(tmp_path: Path, engine: Path) -> dict:
    image = tmp_path / "photo.jpg"
    image.write_bytes(PHOTO.read_bytes())
    (tmp_path / "existing.json").write_text('{"mine": 1}')
    os.link(image, tmp_path / "hardlink.json")  # the input under another name (and a payload extension)
    (tmp_path / "link.pt").symlink_to(tmp_path / "existing.json")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "photo.pt").symlink_to(image)
    return {
        "a hard link to the input": (tmp_path / "hardlink.json", ["--force"], r"is the input image; refusing"),
        "a link to the input": (tmp_path / "photo.pt", ["--force"], r"is the input image; refusing"),
        "an existing file": (tmp_path / "existing.json", [], r"existing\.json exists; pass --force to replace it"),
        "a symbolic link": (tmp_path / "link.pt", ["--force"], r"link\.pt is a symbolic link; refusing"),
        "a dangling link": (tmp_path / "dangling.json", [], r"dangling\.json is a symbolic link; refusing"),
        "inside the engine": (engine / "rows.json", [], r"lies inside the engine directory"),
        "inside the engine, forced": (engine / "manifest.json", ["--force"], r"lies inside the engine directory"),
        "no payload type": (tmp_path / "photo.jpg", ["--force"], r"unknown payload type \.jpg; use \.json or \.pt"),
        "a directory": (str(tmp_path) + "/", [], r"name a payload file"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "a hard link to the input",
        "a link to the input",
        "an existing file",
        "a symbolic link",
        "a dangling link",
        "inside the engine",
        "inside the engine, forced",
        "no payload type",
        "a directory",
    ],
)
def test_encode_out_never_overwrites_or_writes_into_the_engine(engine, tmp_path, capsys, no_load, case):
    target, extra, pattern = _cases(tmp_path, engine)[case]
    before, engine_before = snapshot(tmp_path), snapshot(engine)
    argv = ["encode", "--engine", str(engine), "--image", str(tmp_path / "photo.jpg"), "--out", str(target), *extra]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert (
        len(err) == 1
        and err[0].startswith("apet encode: error:")
        and " --out " in err[0]
        and "Traceback" not in captured.err
    )
    assert re.search(pattern, err[0]), err[0]
    assert snapshot(tmp_path) == before and snapshot(engine) == engine_before
    assert not (tmp_path / "nowhere.json").exists()  # the dangling link was not followed


def test_the_input_itself_is_never_the_output(engine, tmp_path, capsys, no_load):
    """A payload extension on the input: --out equal to --image (by path) is refused, even forced."""
    image = tmp_path / "photo.pt"
    image.write_bytes(PHOTO.read_bytes())
    before = snapshot(tmp_path)
    argv = ["encode", "--engine", str(engine), "--image", str(image), "--out", str(image), "--force"]
    assert main(argv) == 2
    assert "is the input image; refusing to overwrite it" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_force_replaces_a_file_and_the_engine_still_verifies(engine, tmp_path, capsys):
    argv = ["encode", "--engine", str(engine), "--image", str(PHOTO)]
    existing = tmp_path / "rows.json"
    existing.write_text("an older payload")
    assert main([*argv, "--out", str(existing), "--force"]) == 0
    part = json.loads(existing.read_text())
    assert part["type"] == "image_embeds"
    tensor = tmp_path / "new" / "rows.pt"
    assert main([*argv, "--out", str(tensor)]) == 0
    rows = torch.load(tensor, weights_only=True)
    assert rows.shape == (6, 64)  # T = 6 rows of the LLM's width
    assert main([*argv, "--out", str(tensor)]) == 2  # now it exists
    assert "rows.pt exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "rows.json", "rows.pt"]  # no temporary left
    assert oct(existing.stat().st_mode & 0o777) == oct(0o644)
    load_manifest(engine)  # nothing was written inside the engine directory
