"""scripts/serve_load.py, small: both engines (ApET and --no-apet) served by `apet serve`
processes, every concurrent answer equal to its serial one, the report's fields (no timing asserts)."""

import json

from apet_trt.scripts.serve_load import LoadConfig, markdown, run_load
from helpers.engines import build_engine_dir


def test_load_script_small(tmp_path):
    comp = build_engine_dir(tmp_path / "t12", keep=12)
    base = build_engine_dir(tmp_path / "full", keep=None)
    cfg = LoadConfig(
        model=None,
        engine=str(comp),
        baseline=str(base),
        requests=6,
        concurrency=3,
        rounds=2,
        max_tokens=4,
        out=str(tmp_path / "out"),
    )
    report = run_load(cfg)
    assert report["ok"], json.dumps(report["engines"], indent=1)[:3000]
    for name, T in (("apet", 12), ("baseline", 36)):
        r = report["engines"][name]
        assert r["T"] == T and r["N"] == 36 and r["exit_code"] == 0
        assert r["all_succeeded"] and r["all_equal_serial"] and len(r["rounds"]) == 2
        assert r["vision_batches"]["calls"] >= 1 and r["decoder_batches"]["calls"] >= 1
    # the baseline's prompt holds N visual rows, the ApET engine's T
    assert report["engines"]["baseline"]["prompt_tokens"] - report["engines"]["apet"]["prompt_tokens"] == 36 - 12
    assert set(report["ratio_apet_over_baseline"]) == {"latency_p50", "latency_p95", "requests_per_s"}
    assert json.loads((tmp_path / "out" / "serve_load_t12.json").read_text())["ok"]
    assert "ratio ApET / baseline" in markdown(report)
