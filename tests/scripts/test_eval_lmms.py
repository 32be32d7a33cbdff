"""The lmms-eval adapter: lmms-eval's own harness runs the local task assets/eval/lmms_task (the
sample set, read with datasets' json builder, no hub) against an engine directory, and its per-doc
answers and mean score equal `apet eval`'s on the same engine. Skipped where lmms-eval is not
installed (scripts/setup_lmms_eval.sh installs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apet_trt.scripts.eval.config import EvalConfig
from apet_trt.scripts.eval.run import run_eval
from helpers.engines import build_engine_dir

ROOT = Path(__file__).resolve().parents[2]


def test_lmms_eval_runs_the_local_task_against_an_engine_like_apet_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    evaluator = pytest.importorskip(
        "lmms_eval.evaluator", reason="lmms-eval not installed (scripts/setup_lmms_eval.sh)"
    )
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from apet_trt.scripts.eval.lmms_eval_model import ApetEngine

    assert get_model("apet") is ApetEngine  # the entry point: `python -m lmms_eval --model apet`
    engine = build_engine_dir(tmp_path / "t12", keep=12, max_position_embeddings=512)
    model = ApetEngine(engine=str(engine), backend="onnxruntime", batch_size="4")
    tasks = TaskManager("WARNING", include_path=str(ROOT / "assets/eval/lmms_task"), include_defaults=False)
    result = evaluator.simple_evaluate(
        model=model,
        tasks=["apet_sample"],
        task_manager=tasks,
        gen_kwargs="max_new_tokens=3",
        log_samples=True,
        bootstrap_iters=0,
    )
    samples = {s["doc"]["id"]: s["filtered_resps"][0] for s in result["samples"]["apet_sample"]}

    cfg = EvalConfig(
        engines=[str(engine)],
        baseline=str(engine),
        data=str(ROOT / "assets/eval/sample.jsonl"),
        out=str(tmp_path / "out"),
        max_new_tokens=3,
        backend="onnxruntime",
        progress=False,
    )
    report = run_eval(cfg)
    ours = {it["id"]: it["by_engine"]["t12"]["answer"] for it in report["items"]}
    assert len(samples) == len(ours) == 14
    assert samples == ours
    assert result["results"]["apet_sample"]["score,none"] == pytest.approx(report["engines"][0]["scores"]["score"])
    assert len(model.visual_rows) == 14 and set(model.visual_rows) == {12, 24}  # the two-image item: 2 x 12

    with pytest.raises(NotImplementedError, match="log-likelihood"):
        model.loglikelihood([])
