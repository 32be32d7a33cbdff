"""apet eval end to end on two small hand-written LLaVA engine directories (tests/helpers/engines.py):
identical engines agree 100 %; an interrupted run resumes without asking a cached item again
(pipeline calls counted); a bad data line is one error naming it, with nothing run and nothing lost;
the CLI prints the table and writes eval.json / eval.md / eval.png."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apet_trt.runtime import load as runtime_load
from apet_trt.scripts import cli
from apet_trt.scripts.eval.config import EvalConfig
from apet_trt.scripts.eval.data import DataError
from apet_trt.scripts.eval.report import main as render_main
from apet_trt.scripts.eval.report import render_table
from apet_trt.scripts.eval.run import run_eval
from helpers.engines import build_engine_dir

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "eval"


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-engines")
    full = build_engine_dir(root / "full", keep=None, max_position_embeddings=512)
    t12 = build_engine_dir(root / "t12", keep=12, max_position_embeddings=512)
    twin = root / "full-twin"  # the same files, its own manifest bytes: its own cache entries
    shutil.copytree(full, twin)
    manifest = json.loads((twin / "manifest.json").read_text())
    manifest["created_utc"] = "2026-02-02T00:00:00Z"
    (twin / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"full": full, "t12": t12, "twin": twin}


ITEMS = [
    {"id": "cat", "image": "chelsea.jpg", "question": "What animal?", "answers": ["cat"] * 10},
    {"id": "cups", "image": "coffee.jpg", "question": "How many cups?", "answers": ["1"] * 6 + ["one"] * 4},
    {"id": "mc", "image": "horse.jpg", "question": "Which?", "choices": ["dog", "horse"], "answers": ["B"]},
    {"id": "two", "images": ["chelsea.jpg", "horse.jpg"], "question": "Which one?", "answers": ["first"] * 10},
    {"id": "saucer", "image": "coffee.jpg", "question": "Color?", "answers": ["red"] * 10},
]
CALLS_PER_ENGINE = 4  # batch 2: [cat, cups], [mc], [two] (several images: alone), [saucer]


@pytest.fixture
def data(tmp_path) -> Path:
    for name in ("chelsea.jpg", "coffee.jpg", "horse.jpg"):
        shutil.copy(ASSETS / name, tmp_path / name)
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in ITEMS))
    return path


class Counting:
    """A pipeline whose generate / encode calls are counted (and can be made to fail after n)."""

    def __init__(self, pipe, calls: dict, key: str, fail_after: int | None):
        self._pipe, self._calls, self._key, self._fail_after = pipe, calls, key, fail_after

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def _count(self):
        self._calls[self._key] = self._calls.get(self._key, 0) + 1
        if self._fail_after is not None and self._calls[self._key] > self._fail_after:
            raise KeyboardInterrupt  # what Ctrl-C does half-way

    def generate(self, *args, **kwargs):
        self._count()
        return self._pipe.generate(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self._count()
        return self._pipe.encode(*args, **kwargs)


def counting_load(calls: dict, fail_after: int | None = None):
    def load(path, *args, **kwargs):
        return Counting(runtime_load(path, *args, **kwargs), calls, Path(path).name, fail_after)

    return load


def config(engines, data, out, *names) -> EvalConfig:
    return EvalConfig(
        engines=[str(engines[n]) for n in names],
        baseline=str(engines["full"]),
        data=str(data),
        out=str(out),
        batch=2,
        max_new_tokens=3,
        backend="onnxruntime",
        progress=False,
    )


def test_identical_engines_agree_and_compressed_rows_are_counted(engines, data, tmp_path):
    calls: dict = {}
    report = run_eval(config(engines, data, tmp_path / "out", "twin", "t12"), load=counting_load(calls))
    # the twin's manifest differs by a byte, so it was asked everything itself, not read from the cache
    assert calls == {"full": CALLS_PER_ENGINE, "full-twin": CALLS_PER_ENGINE, "t12": CALLS_PER_ENGINE}
    base, twin, t12 = report["engines"]
    assert twin["agreement_with_baseline"] == 1.0
    assert twin["scores"] == base["scores"]
    assert all(it["by_engine"]["full-twin"]["answer"] == it["by_engine"]["full"]["answer"] for it in report["items"])
    n = 36  # the helper's 84 px CLIP: 6 x 6 patches; 12 kept with ApET; the item with two images: twice
    assert base["visual_rows"] == {"mean_T": n * 6 / 5, "mean_N": n * 6 / 5, "mean_after_llm_stage": None}
    assert t12["visual_rows"] == {"mean_T": 12 * 6 / 5, "mean_N": n * 6 / 5, "mean_after_llm_stage": None}
    assert t12["relative_to_baseline"]["visual_rows"] == pytest.approx(12 / n)
    assert all(len(it["by_engine"]) == 3 for it in report["items"])
    assert {p: Path(f).is_file() for p, f in report["outputs"].items()} == {
        "json": True,
        "markdown": True,
        "plot": True,
    }
    saved = json.loads(Path(report["outputs"]["json"]).read_text())
    assert saved["schema"] == "apet-eval" and saved["engines"][2]["label"] == "t12"
    md = Path(report["outputs"]["markdown"])
    written = md.read_text()
    md.unlink()
    assert render_main([report["outputs"]["json"]]) == 0 and md.read_text() == written  # from the JSON alone


def test_interrupted_run_resumes_without_recomputing(engines, data, tmp_path):
    out = tmp_path / "out"
    calls: dict = {}
    with pytest.raises(KeyboardInterrupt):
        run_eval(config(engines, data, out, "t12"), load=counting_load(calls, fail_after=2))
    cached = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [r["item"] for r in cached] == ["cat", "cups", "mc"]  # two batches kept, the third lost
    # a line cut short by the interruption is skipped and asked again
    with (out / "answers.jsonl").open("a") as f:
        f.write('{"key": "trunc')
    calls = {}
    resumed = run_eval(config(engines, data, out, "t12"), load=counting_load(calls))
    assert calls == {"full": 2, "t12": CALLS_PER_ENGINE}  # the baseline: [two], [saucer] only
    assert [e["asked_this_run"] for e in resumed["engines"]] == [2, len(ITEMS)]
    calls = {}
    again = run_eval(config(engines, data, out, "t12"), load=counting_load(calls))
    assert calls == {}  # everything cached: no engine even loaded
    fresh = run_eval(config(engines, data, tmp_path / "fresh", "t12"))
    for a, b, c in zip(resumed["items"], again["items"], fresh["items"]):
        assert a["by_engine"] == b["by_engine"] == c["by_engine"]


def test_bad_lines_are_one_error_naming_them_and_nothing_runs_or_is_lost(engines, data, tmp_path):
    out = tmp_path / "out"
    run_eval(config(engines, data, out, "t12"))
    before = (out / "answers.jsonl").read_bytes()
    lines = data.read_text().splitlines()
    lines[1] = lines[1][:-1]  # line 2: bad JSON
    lines[3] = lines[3].replace("horse.jpg", "zebra.jpg")  # line 4: a missing image
    data.write_text("\n".join(lines) + "\n")
    calls: dict = {}
    with pytest.raises(DataError) as err:
        run_eval(config(engines, data, out, "t12"), load=counting_load(calls))
    msg = str(err.value)
    assert f"{data}:2: bad JSON" in msg and f"{data}:4:" in msg and "zebra.jpg not found" in msg
    assert msg.startswith("2 bad line(s)")
    assert calls == {} and (out / "answers.jsonl").read_bytes() == before


def test_cli_prints_the_table_and_bad_data_is_one_line(engines, data, tmp_path, capsys):
    args = ["eval", "--engine", str(engines["t12"]), "--baseline", str(engines["full"]), "--data", str(data)]
    args += ["--out", str(tmp_path / "out"), "--max-new-tokens", "2", "--backend", "onnxruntime", "--no-progress"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| full (baseline) | none (all N rows) | 43.2 -> 43.2 (1.00x) |" in printed
    assert "| t12 | T=12 | 43.2 -> 14.4 (0.33x) |" in printed
    data.write_text('{"id": 1, "image": "chelsea.jpg"}\n')
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("apet eval: error: DataError: 1 bad line(s)")
    assert f"{data}:1: " in err[0] and '"question" must be a non-empty string' in err[0]


def test_an_item_the_engine_cannot_answer_is_named_and_earlier_answers_kept(engines, data, tmp_path):
    shutil.copy(ASSETS.parent / "big_buck_bunny.mp4", data.parent / "clip.mp4")
    with data.open("a") as f:
        f.write(json.dumps({"id": "clip", "video": "clip.mp4", "question": "What?", "answers": ["x"]}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"full: item\(s\) 'clip' \(line 6\) of .*set.jsonl: .*takes no videos"):
        run_eval(config(engines, data, out, "t12"))
    cached = [json.loads(x)["item"] for x in (out / "answers.jsonl").read_text().splitlines()]
    assert cached == [x["id"] for x in ITEMS]  # the baseline's five answers before the video are kept


def test_an_engine_with_apet_inside_the_llm_reports_the_rows_left(data, tmp_path):
    """apet build --keep 96 --llm-stage 1:32 (the paper's "64" shape on tiny-llava): 576 -> 96 rows
    handed to the LLM, 32 per image left after its first layer; the item with two images, twice."""
    from apet_trt.export.build import BuildConfig, build

    stage = tmp_path / "stage"
    build(BuildConfig(model="tiny-llava", out=str(stage), keep=96, llm_stage="1:32", tensorrt=False), quiet=True)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], lines[3]]) + "\n")  # one image, then two
    cfg = EvalConfig(
        engines=[str(stage)], baseline=str(stage), data=str(data), out=str(tmp_path / "out"), max_new_tokens=2
    )
    cfg.progress, cfg.backend = False, "onnxruntime"
    report = run_eval(cfg)
    rows = report["engines"][1]["visual_rows"]
    assert rows == {"mean_T": 96 * 3 / 2, "mean_N": 576 * 3 / 2, "mean_after_llm_stage": 32 * 3 / 2}
    assert [it["by_engine"]["stage#2"]["num_after_llm_stage"] for it in report["items"]] == [32, 64]
    assert report["engines"][1]["budget"] == "T=96, then 32 after LLM layer 1"
    assert "| stage#2 | T=96, then 32 after LLM layer 1 | 864.0 -> 144.0 -> 48.0 (" in render_table(report)
