"""scripts/serve_limits.py, small: one `apet serve` process through the burst, zip-bomb and
full-server phases; the report's fields and the server's answers (no timing or memory asserts)."""

import json

from apet_trt.scripts.serve_limits import LimitsConfig, run
from helpers.engines import build_engine_dir


def test_limits_script_small(tmp_path):
    engine = build_engine_dir(tmp_path / "t12", keep=12, max_position_embeddings=4096)
    cfg = LimitsConfig(
        engine=str(engine),
        label="small",
        max_queue=2,
        burst=4,
        images=2,
        side=1000,
        bomb_gib=0.02,
        trials=1,
        fill_max_tokens=3000,
        timeout_s=120.0,
        out=str(tmp_path / "out"),
    )
    report = run(cfg)
    burst = report["burst"]
    assert sum(burst["statuses"].values()) == 4 and set(burst["statuses"]) <= {"200", "503"}
    assert burst["peak_rss_bytes"] >= burst["idle_rss_bytes"] > 0
    assert report["zip_bomb"]["status"] == 400  # unpacks past the engine's largest tensor
    [trial] = report["full"]["trials"]
    if trial["full_before"] and trial["full_after"]:  # the fillers were still decoding
        assert trial["status"] == 503 and trial["headers_only_status"] == 503
    assert report["health_after"] == 200 and report["good_request_after"] == 200
    assert report["server_exit_code"] == 0
    assert json.loads((tmp_path / "out" / "serve_limits_small.json").read_text())["label"] == "small"
