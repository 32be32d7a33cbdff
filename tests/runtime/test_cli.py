"""`apet run` and `apet inspect` through the real dispatcher (scripts/cli.py), and the overlay."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apet_trt.runtime.overlay import draw_kept_patches
from apet_trt.scripts.cli import main
from helpers.engines import IMAGE_SIZE, N, build_engine_dir

PHOTO = str(Path(__file__).resolve().parents[2] / "assets" / "grace_hopper.jpg")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("eng") / "t10", keep=10)


def test_run_prints_text_tokens_timings_and_writes_overlay(engine, tmp_path, capsys):
    out = tmp_path / "overlay.png"
    rc = main(
        [
            "run",
            "--engine",
            str(engine),
            "--image",
            PHOTO,
            "--prompt",
            "Who is this?",
            "--max-new-tokens",
            "5",
            "--overlay",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert f"{N} -> 10 visual tokens kept" in text
    assert "text     '" in text
    assert "prefill/first token" in text and "decode" in text and "vision" in text
    picture = Image.open(out)
    assert picture.size == (2 * IMAGE_SIZE, 2 * IMAGE_SIZE)


def test_run_prints_the_kept_positions_and_grid(engine, capsys):
    assert (
        main(["run", "--engine", str(engine), "--image", PHOTO, "--prompt", "x", "--max-new-tokens", "1", "--grid"])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    [kept] = [line for line in out if line.startswith("kept     patches ")]
    positions = [int(p) for p in kept.split("patches ")[1].split(", ")]
    assert len(positions) == 10 and positions == sorted(positions)
    side = IMAGE_SIZE // 14
    grid = [
        line.strip() for line in out if line.strip() and set(line.strip()) <= {"#", "."} and len(line.strip()) == side
    ]
    assert len(grid) == side
    assert [i for i, ch in enumerate("".join(grid)) if ch == "#"] == positions


def test_run_json_and_backends_agree(engine, capsys):
    payloads = {}
    for backend in ("onnxruntime", "torch"):
        rc = main(
            [
                "run",
                "--engine",
                str(engine),
                "--image",
                PHOTO,
                "--prompt",
                "Describe.",
                "--max-new-tokens",
                "3",
                "--backend",
                backend,
                "--json",
            ]
        )
        assert rc == 0
        payloads[backend] = json.loads(capsys.readouterr().out)
    ort, pt = payloads["onnxruntime"], payloads["torch"]
    assert ort["backend"] == "onnxruntime" and pt["backend"] == "torch"
    assert len(ort["positions"]) == 10 and ort["positions"] == sorted(ort["positions"])
    assert ort["positions"] == pt["positions"]
    assert ort["ids"] == pt["ids"]
    assert set(ort["timings"]) >= {"preprocess_ms", "vision_ms", "first_token_ms", "decode_ms"}
    assert isinstance(ort["text"], str)


def test_inspect_ok_and_failure_names_the_file(engine, tmp_path, capsys):
    assert main(["inspect", str(engine)]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("OK") and "36 -> 10 tokens" in out
    import shutil

    broken = shutil.copytree(engine, tmp_path / "broken")
    (broken / "vision.onnx").write_bytes(b"")
    assert main(["inspect", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vision.onnx" in err[0] and "size 0 bytes" in err[0]


def test_run_user_errors_are_one_line(engine, tmp_path, capsys):
    assert main(["run", "--engine", str(engine), "--image", str(tmp_path / "nope.jpg"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.jpg" in err[0]
    assert main(["run", "--engine", str(tmp_path / "no_engine"), "--image", PHOTO, "--prompt", "x"]) == 2
    assert "no_engine" in capsys.readouterr().err


def test_overlay_dims_dropped_patches_and_keeps_kept_ones(rng):
    import torch

    crop = torch.randint(40, 256, (28, 42, 3), generator=rng, dtype=torch.uint8).numpy()  # 2 x 3 patches of 14
    picture = np.asarray(draw_kept_patches(crop, [1, 5], patch_size=14, scale=1, dim=0.5))
    for patch in range(6):
        r, c = divmod(patch, 3)
        inner = (slice(r * 14 + 3, r * 14 + 11), slice(c * 14 + 3, c * 14 + 11))
        expected = crop[inner] if patch in (1, 5) else np.round(crop[inner] * 0.5)
        np.testing.assert_array_equal(picture[inner], expected.astype(np.uint8))
    with pytest.raises(ValueError, match="outside the 2x3 patch grid"):
        draw_kept_patches(crop, [6], patch_size=14)
