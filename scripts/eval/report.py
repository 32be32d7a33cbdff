"""`apet eval` results: the report (scores per engine, ratios to the baseline, every answer), its
markdown table and its plot (score against the visual rows handed to the LLM), the last two
rendered from the JSON alone:

    python -m apet_trt.scripts.eval.report eval_out/eval.json   # rewrites eval.md, eval.png beside it

Schema: docs/EVAL.md, version config.SCHEMA_VERSION.
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from . import scoring
from .config import SCHEMA_VERSION, EvalConfig


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def item_scores(item, answer: str) -> dict:
    """The scores that apply to one item: VQA accuracy and exact match for an open question, the
    letter's correctness for a multiple-choice one; `score` is the one the summary averages."""
    if item.multiple_choice:
        mc = scoring.mc_accuracy(answer, item.answers, item.choices)
        return {"score": mc, "mc_accuracy": mc, "letter": scoring.predicted_letter(answer, item.choices)}
    vqa = scoring.vqa_accuracy(answer, item.answers)
    return {
        "score": vqa,
        "vqa_accuracy": vqa,
        "vqa_accuracy_min3": scoring.vqa_accuracy_min3(answer, item.answers),
        "exact_match": scoring.exact_match(answer, item.answers),
    }


def _after_llm_stage(recs: list[dict]) -> float | None:
    """Mean rows left after ApET inside the LLM (engines built with --budget / --llm-stage), else None."""
    after = [r.get("num_after_llm_stage") for r in recs]
    return None if any(a is None for a in after) else _mean(after)


def _summary(per_item: list[dict], key: str) -> float | None:
    return _mean([s[key] for s in per_item if key in s])


def build_report(cfg: EvalConfig, items, engines, answers: dict[str, list[dict]], asked: dict[str, int]) -> dict:
    base = engines[0]
    base_answers = answers[base.label]
    rows, per_items = [], {}
    for e in engines:
        recs = answers[e.label]
        per_item = [item_scores(it, r["answer"]) for it, r in zip(items, recs)]
        per_items[e.label] = per_item
        agree = [
            float(scoring.same_answer(r["answer"], b["answer"], it.choices))
            for it, r, b in zip(items, recs, base_answers)
        ]
        calls = {}  # one timing per generate call: the items of a batch share it
        for r in recs:
            calls.setdefault(r["call"], (r["ttft_ms"], r["total_ms"]))
        calls = list(calls.values())
        scores = {k: _summary(per_item, k) for k in ("score", "vqa_accuracy", "vqa_accuracy_min3", "exact_match")}
        scores["mc_accuracy"] = _summary(per_item, "mc_accuracy")
        rows.append(
            {
                "label": e.label,
                "path": str(e.path),
                "baseline": e.baseline,
                "manifest_sha256": e.manifest_sha256,
                **e.facts,
                "backend": sorted({str(r.get("backend")) for r in recs}),
                "decoder": sorted({str(r.get("decoder")) for r in recs}),
                "asked_this_run": asked.get(e.label, 0),
                "scores": scores,
                "agreement_with_baseline": _mean(agree),
                "visual_rows": {
                    "mean_T": _mean([r["num_kept"] for r in recs]),
                    "mean_N": _mean([r["num_patches"] for r in recs]),
                    "mean_after_llm_stage": _after_llm_stage(recs),
                },
                "timing": {
                    "calls": len(calls),
                    "ttft_ms_median": statistics.median(c[0] for c in calls),
                    "total_ms_median": statistics.median(c[1] for c in calls),
                    "per_item_ms_mean": sum(c[1] for c in calls) / len(recs),
                },
            }
        )
    b = rows[0]
    for r in rows:
        r["relative_to_baseline"] = {
            **{k: _ratio(r["scores"][k], b["scores"][k]) for k in r["scores"]},
            "visual_rows": _ratio(r["visual_rows"]["mean_T"], b["visual_rows"]["mean_T"]),
            "ttft": _ratio(r["timing"]["ttft_ms_median"], b["timing"]["ttft_ms_median"]),
            "total": _ratio(r["timing"]["total_ms_median"], b["timing"]["total_ms_median"]),
            "per_item": _ratio(r["timing"]["per_item_ms_mean"], b["timing"]["per_item_ms_mean"]),
        }
    return {
        "schema": "apet-eval",
        "schema_version": SCHEMA_VERSION,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": cfg.to_dict(),
        "data": {
            "path": str(cfg.data),
            "items": len(items),
            "open_ended": sum(not it.multiple_choice for it in items),
            "multiple_choice": sum(it.multiple_choice for it in items),
            "kinds": {k: sum(it.kind == k for it in items) for k in sorted({it.kind for it in items})},
        },
        "baseline": base.label,
        "engines": rows,
        "items": [
            {
                "id": it.id,
                "kind": it.kind,
                "question": it.question,
                "answers": list(it.answers),
                "choices": list(it.choices) if it.choices else None,
                "by_engine": {
                    e.label: {
                        "answer": answers[e.label][i]["answer"],
                        "num_kept": answers[e.label][i]["num_kept"],
                        "num_patches": answers[e.label][i]["num_patches"],
                        "num_after_llm_stage": answers[e.label][i].get("num_after_llm_stage"),
                        **per_items[e.label][i],
                    }
                    for e in engines
                },
            }
            for i, it in enumerate(items)
        ],
    }


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _stage(rows: dict) -> str:
    after = rows.get("mean_after_llm_stage")
    return "" if after is None else f" -> {after:.1f}"


def render_table(report: dict) -> str:
    """The markdown table (what `apet eval` prints)."""
    lines = [
        "| engine | budget | rows N -> T (mean) | score | rel. score | VQA acc | EM | MC acc | agreement "
        "| TTFT ms | request ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["engines"]:
        rel, s, v, t = r["relative_to_baseline"], r["scores"], r["visual_rows"], r["timing"]
        base = " (baseline)" if r["baseline"] else ""
        lines.append(
            f"| {r['label']}{base} | {r['budget']} | {_f(v['mean_N'], 1)} -> {_f(v['mean_T'], 1)}{_stage(v)} "
            f"({_x(rel['visual_rows'])}) | {_pct(s['score'])} | {_pct(rel['score'])} % | {_pct(s['vqa_accuracy'])} "
            f"| {_pct(s['exact_match'])} | {_pct(s['mc_accuracy'])} | {_pct(r['agreement_with_baseline'])} % "
            f"| {_f(t['ttft_ms_median'], 1)} ({_x(rel['ttft'])}) | {_f(t['total_ms_median'], 1)} ({_x(rel['total'])}) |"
        )
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    d, cfg = report["data"], report["config"]
    kinds = ", ".join(f"{n} {k}" for k, n in d["kinds"].items())
    return "\n".join(
        [
            f"# apet eval: {Path(d['path']).name}, {d['items']} items",
            "",
            f"{report['created_utc']}; {d['open_ended']} open-ended, {d['multiple_choice']} multiple-choice ({kinds}); "
            f"greedy, at most {cfg['max_new_tokens']} new tokens, batch {cfg['batch']}; baseline "
            f"`{report['baseline']}`.",
            "",
            render_table(report),
            "",
            "Scores in %: score = the mean over items of VQA accuracy (open-ended; official, averaged over the "
            "ten leave-one-out subsets of the human answers) or letter accuracy (multiple choice); rel. score = "
            "score / the baseline's (the paper's relative accuracy); EM = normalised answer equals the majority "
            "human answer; agreement = the engine's answer equals the baseline's (same option, or the same "
            "normalised text). Rows: the mean visual rows handed to the LLM per item, uncompressed N -> kept T "
            "(x the baseline's). TTFT and request: median per generate call in ms (x the baseline's); timings "
            "of answers cached by an earlier run are that run's. Schema: docs/EVAL.md.",
            "",
        ]
    )


def render_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in report["engines"]:
        x, y = r["visual_rows"]["mean_T"], r["scores"]["score"]
        agree = r["agreement_with_baseline"]
        ax.scatter([x], [100 * y], s=60, marker="s" if r["baseline"] else "o", zorder=3)
        ax.annotate(
            f"{r['label']}\nagree {100 * agree:.0f} %",
            (x, 100 * y),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xlabel("visual rows handed to the LLM (mean per item)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-5, 105)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"apet eval: {Path(report['data']['path']).name} ({report['data']['items']} items)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> dict:
    out = Path(out)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "plot": out / "eval.png"}
    report["outputs"] = {k: str(p) for k, p in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    render_plot(report, paths["plot"])
    return paths


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m apet_trt.scripts.eval.report EVAL_JSON", file=sys.stderr)
        return 2
    path = Path(args[0])
    report = json.loads(path.read_text())
    if report.get("schema") != "apet-eval" or report.get("schema_version") != SCHEMA_VERSION:
        print(f"{path}: not an apet eval report of schema version {SCHEMA_VERSION}", file=sys.stderr)
        return 2
    (path.parent / "eval.md").write_text(render_markdown(report))
    render_plot(report, path.parent / "eval.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
