"""`apet bench --model M --keep-ratio R` (Qwen2.5-VL's official budget, T = floor(R * N) per image):
the compressed engine is built with that ratio (and reused when it verifies), the op section runs at
the bench image's own N (an engine whose N varies per image records none), and T is floor(R * N) of
the rows the image gets; bad combinations are one line before anything is built."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from apet_trt.scripts.bench import BenchConfig
from apet_trt.scripts.cli import main


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_ratio_engines_are_built_then_reused_and_the_op_runs_at_the_images_n(tmp_path):
    argv = ["bench", "--model", "tiny-qwen2.5-vl", "--keep-ratio", "0.3", "--quick", "--repeats", "1"]
    argv += ["--warmup", "0", "--skip-decoder", "--skip-request", "--backends", "onnxruntime_cpu"]
    argv += ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    built = []
    for _ in range(2):
        rc, _, stderr = _cli(argv)
        assert rc == 0, stderr
        report = json.loads((tmp_path / "out" / "bench.json").read_text())
        comp = report["engines"]["compressed"]
        assert comp["dir"] == str(tmp_path / "cache" / "tiny-qwen2.5-vl-r0.3-k10")
        assert comp["apet"]["keep_ratio"] == 0.3 and comp["apet"]["keep"] is None
        n, t = report["rows"]["N"], report["rows"]["T"]
        assert t == (3 * n) // 10 and report["vision"]["status"] == "ok"
        assert report["op"]["status"] == "ok" and report["op"]["N"] == n
        built.append((comp["built_by_bench"], report["engines"]["baseline"]["built_by_bench"]))
    assert built == [(True, True), (False, False)]
    assert "--keep-ratio 0.3" in report["command"]


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(engine="x", keep_ratio=0.3), "--keep-ratio builds the compressed engine"),
        (dict(model="tiny-qwen2.5-vl", keep_ratio=1.5), "--keep-ratio must be a number in (0, 1)"),
        (dict(model="tiny-qwen2.5-vl", keep_ratio=0.0), "--keep-ratio must be a number in (0, 1)"),
        (dict(model="tiny-llava", keep_ratio=0.3, budget=64), "one of --keep-ratio and --budget"),
    ],
)
def test_bad_ratio_options(config, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BenchConfig(**config).validate()
