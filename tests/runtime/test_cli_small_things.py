"""Issue 11, class 7 (the small things users hit) and the --overlay half of class 2.

`apet --version`; `run --help` documents every generation flag and its default; an unknown option is
reported by the subcommand's own parser; `--no-apet --keep` is refused; temperature 0 is greedy
(accepted without --sample, refused with it, before any model loads); numpy integers work as
max_new_tokens / top_k / seed; prompts that are not strings are named; and --overlay never
overwrites the input image or an existing file (without --force-overlay), never writes through a
link or inside the engine directory - all checked before the engine is loaded, in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apet_trt import runtime
from apet_trt.runtime.decoders import SamplingConfig
from apet_trt.runtime.manifest import load_manifest
from apet_trt.scripts.cli import build_parser, main
from helpers.engines import build_engine_dir
from helpers.guard import snapshot

PHOTO = str(Path(__file__).resolve().parents[2] / "assets" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("small") / "t6", keep=6)


@pytest.fixture(scope="module")
def pipe(engine):
    return runtime.load(engine, backend="onnxruntime")


@pytest.fixture
def no_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the engine was loaded before the arguments were checked")

    monkeypatch.setattr(runtime, "load", fail)


def _one_line(capsys, prefix="apet run: error:") -> str:
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(prefix) and "Traceback" not in captured.err, captured.err
    assert captured.out == ""
    return err[0]


# --- the command line ---------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"apet {importlib.metadata.version('apet-trt')}"


def test_run_help_documents_every_flag_and_its_default(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--max-new-tokens", 32),
        ("--temperature", 1.0),
        ("--top-k", 0),
        ("--top-p", 1.0),
        ("--backend", "auto"),
        ("--decoder", "auto"),
    ]:
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(str(default))}\)", text), flag
    assert "--seed SEED random seed for --sample (default: a fresh one)" in text
    assert "--sample sample instead of greedy decoding" in text


@pytest.mark.parametrize(
    "argv, unknown",
    [
        (["run", "--engine", "e", "--image", "i", "--prompt", "p", "--tempreature", "0.5"], "--tempreature 0.5"),
        (["build", "--model", "tiny-llava", "--out", "x", "--keeep", "64"], "--keeep 64"),
        (["inspect", "engines/x", "--verbose"], "--verbose"),
    ],
)
def test_unknown_options_are_reported_by_the_subcommand(capsys, argv, unknown):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"usage: apet {argv[0]} ") and f"apet {argv[0]}: error: unrecognized arguments: {unknown}" in err
    )


def test_no_apet_with_keep_is_refused(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["build", "--model", "tiny-llava", "--no-apet", "--keep", "64", "--out", str(out)]) == 2
    line = _one_line(capsys, "apet build: error:")
    assert "--no-apet builds the uncompressed baseline" in line and "--keep 64" in line
    assert list(tmp_path.iterdir()) == []


# --- sampling arguments and prompts ---------------------------------------------------------------------


def test_temperature_zero_is_greedy(pipe):
    greedy = pipe.generate(PHOTO, "Describe.", max_new_tokens=4)[0].ids
    assert pipe.generate(PHOTO, "Describe.", max_new_tokens=4, temperature=0)[0].ids == greedy
    assert SamplingConfig(temperature=0.0).temperature == 0.0
    with pytest.raises(ValueError, match=r"temperature=0 with sampling: sampling needs temperature > 0"):
        pipe.generate(PHOTO, "Describe.", do_sample=True, temperature=0)
    with pytest.raises(ValueError, match=r"temperature must be >= 0, got -1\.0"):
        SamplingConfig(temperature=-1)


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--sample", "--temperature", "0"], r"temperature=0 with sampling"),
        (["--max-new-tokens", "0"], r"max_new_tokens must be >= 1, got 0"),
        (["--top-p", "1.5"], r"top_p must be in \(0, 1\], got 1\.5"),
        (["--seed", "-3", "--sample"], r"seed must be in 0\.\.\d+, got -3"),
    ],
)
def test_sampling_arguments_are_checked_before_the_model_loads(engine, capsys, no_load, extra, pattern):
    assert main(["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x", *extra]) == 2
    assert re.search(pattern, _one_line(capsys))


def test_numpy_integers_are_accepted(pipe):
    plain = pipe.generate(PHOTO, "Describe.", max_new_tokens=3, do_sample=True, top_k=5, seed=7)[0].ids
    numpy = pipe.generate(
        PHOTO, "Describe.", max_new_tokens=np.int64(3), do_sample=np.bool_(True), top_k=np.int32(5), seed=np.uint64(7)
    )[0].ids
    assert numpy == plain and len(plain) <= 3
    config = SamplingConfig(max_new_tokens=np.int16(2), top_p=np.float32(0.5))
    assert type(config.max_new_tokens) is int and type(config.top_p) is float
    with pytest.raises(TypeError, match=r"max_new_tokens must be an integer, got float 2\.5"):
        SamplingConfig(max_new_tokens=2.5)


@pytest.mark.parametrize(
    "prompts, pattern",
    [
        (b"What is it?", r"prompts: expected a string or a list of strings, got bytes b'What is it\?'; decode it"),
        (5, r"prompts: expected a string or a list of strings, got int 5"),
        ({"text": "a"}, r"prompts: expected a string or a list of strings, got dict \{'text': 'a'\}"),
        (["fine", 3], r"prompt 1: expected a string, got int 3"),
    ],
)
def test_prompts_that_are_not_strings_are_named(pipe, prompts, pattern):
    images = [PHOTO, PHOTO] if isinstance(prompts, list) else PHOTO
    with pytest.raises(TypeError, match=pattern):
        pipe.generate(images, prompts, max_new_tokens=1)


# --- --overlay ---------------------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _overlay_cases(tmp_path: Path, engine: Path) -> dict:
    image = tmp_path / "photo.jpg"
    image.write_bytes(Path(PHOTO).read_bytes())
    (tmp_path / "existing.png").write_bytes(b"my earlier picture")
    os.link(image, tmp_path / "hardlink.jpg")
    (tmp_path / "link.png").symlink_to(tmp_path / "existing.png")
    return {
        "the input image": (str(image), [], r"--overlay .*photo\.jpg is the input image; refusing to overwrite it"),
        "the input, forced": (str(image), ["--force-overlay"], r"is the input image"),
        "a hard link to the input": (str(tmp_path / "hardlink.jpg"), ["--force-overlay"], r"is the input image"),
        "an existing file": (str(tmp_path / "existing.png"), [], r"existing\.png exists; pass --force-overlay"),
        "a symbolic link": (str(tmp_path / "link.png"), ["--force-overlay"], r"link\.png is a symbolic link"),
        "inside the engine": (str(engine / "kept.png"), [], r"lies inside the engine directory"),
        "no image type": (str(tmp_path / "kept.txt"), [], r"unknown image type \.txt; use \.png or \.jpg"),
        "a directory": (str(tmp_path) + "/", [], r"name an image file"),
    }


OVERLAY_CASES = [
    "the input image",
    "the input, forced",
    "a hard link to the input",
    "an existing file",
    "a symbolic link",
    "inside the engine",
    "no image type",
    "a directory",
]


@pytest.mark.parametrize("case", OVERLAY_CASES)
def test_overlay_never_overwrites_or_writes_into_the_engine(engine, tmp_path, capsys, no_load, case):
    target, extra, pattern = _overlay_cases(tmp_path, engine)[case]
    image = tmp_path / "photo.jpg"
    before, engine_before = snapshot(tmp_path), snapshot(engine)
    argv = ["run", "--engine", str(engine), "--image", str(image), "--prompt", "x", "--overlay", target, *extra]
    assert main(argv) == 2
    assert re.search(pattern, _one_line(capsys))
    assert snapshot(tmp_path) == before and snapshot(engine) == engine_before


def test_force_overlay_replaces_a_file_and_the_engine_still_verifies(engine, tmp_path, capsys):
    photo = _sha(Path(PHOTO))
    existing = tmp_path / "kept.png"
    existing.write_bytes(b"an older overlay")
    argv = ["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x", "--max-new-tokens", "1"]
    assert main([*argv, "--overlay", str(existing), "--force-overlay"]) == 0
    with Image.open(existing) as picture:
        assert picture.format == "PNG" and picture.size == (168, 168)
    fresh = tmp_path / "new" / "kept.jpg"
    assert main([*argv, "--overlay", str(fresh)]) == 0
    assert Image.open(fresh).format == "JPEG"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept.jpg", "kept.png", "new"]  # no temporary left
    assert oct(existing.stat().st_mode & 0o777) == oct(0o644)
    load_manifest(engine)  # nothing was written inside the engine directory
    assert _sha(Path(PHOTO)) == photo


@pytest.mark.parametrize(
    "video, pattern",
    [
        ("https://example.com/clip.mp4", r"--video: https://example\.com/clip\.mp4 is a URL; apet reads local video"),
        ("-", r"--video: '-' \(standard input\) is not supported; save the video to a file"),
        ("FOLDER", r"is a directory, not a video file"),
    ],
)
def test_video_paths_are_reported_as_what_they_are(engine, tmp_path, capsys, no_load, video, pattern):
    video = str(tmp_path) if video == "FOLDER" else video
    assert main(["run", "--engine", str(engine), "--video", video, "--prompt", "x"]) == 2
    assert re.search(pattern, _one_line(capsys))
