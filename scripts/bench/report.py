"""`apet bench` results: the headline ratios (computed into the JSON report), and the markdown
report (headline first) and PNG plot of latency per stage against T, both rendered from the JSON
alone, so a saved bench.json can be re-rendered:

    python -m apet_trt.scripts.bench.report bench_out/bench.json   # writes bench.md, bench.png beside it

The JSON's schema is docs/BENCH.md, version config.SCHEMA_VERSION; the renderer also reads version 2
(no LLM-stage fields) and version 1
(docs/results/bench.json was recorded with it: T and N the manifest's, and the decoder timed on its
own forward by the benchmark rather than through the runtime's TransformersDecoder).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import SCHEMA_VERSION, VISION_BACKENDS

READABLE_SCHEMAS = (1, 2, SCHEMA_VERSION)  # 3 added the LLM-stage fields, which older reports lack


def _entry(value: float, **facts) -> dict:
    return {"value": value, **facts}


def headline(report: dict) -> dict:
    """The ratios the benchmark exists for (compressed / uncompressed; < 1 is faster or smaller),
    each with the medians it was computed from; T and N are the bench medium's rows. null where
    its section was skipped or failed."""
    out = {
        "vision_apet_over_no_apet": None,
        "ttft_T_over_N": None,
        "request_compressed_over_baseline": None,
        "kv_cache_bytes_T_over_N": None,
    }
    vision = report["vision"]
    if vision.get("status") == "ok":
        ok = {e["name"]: e for e in vision["backends"] if e["available"]}
        name = next((b for b in VISION_BACKENDS if b in ok), None)
        if name:
            t = ok[name]["timings"]
            num, den = t["with_apet"]["median_s"], t["without_apet"]["median_s"]
            out["vision_apet_over_no_apet"] = _entry(
                num / den, backend=name, T=vision["T"], N=vision["N"], numerator_median_s=num, denominator_median_s=den
            )
    decoder, rows = report["decoder"], report["rows"]
    if decoder.get("status") == "ok":
        points = {p["T"]: p for p in decoder["points"]}
        t, n = rows["T"], rows["N"]
        if t in points and n in points:
            num, den = points[t]["prefill"]["median_s"], points[n]["prefill"]["median_s"]
            out["ttft_T_over_N"] = _entry(num / den, T=t, N=n, numerator_median_s=num, denominator_median_s=den)
            num, den = points[t]["kv_cache_bytes_full_model"], points[n]["kv_cache_bytes_full_model"]
            out["kv_cache_bytes_T_over_N"] = _entry(num / den, T=t, N=n, numerator_bytes=num, denominator_bytes=den)
    request = report["request"]
    if request.get("status") == "ok":
        c, b = request["variants"]["compressed"], request["variants"]["baseline"]
        num, den = c["timing"]["median_s"], b["timing"]["median_s"]
        out["request_compressed_over_baseline"] = _entry(
            num / den,
            backend=request["vision_backend"],
            T=c["T"],
            N=b["T"],
            numerator_median_s=num,
            denominator_median_s=den,
        )
    return out


def _ms(summary: dict | None) -> str:
    if not summary:
        return "-"
    return f"{1e3 * summary['median_s']:.1f} ({1e3 * summary['p90_s']:.1f})"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _faster(value: float | None) -> str:
    if value is None or value <= 0:
        return "-"
    return f"{1 / value:.2f}x less" if value < 1 else f"{value:.2f}x more"


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def decoder_note(report: dict) -> str | None:
    """The decoder's model and the layer override, from the decoder section (or the request's)."""
    dec, req = report["decoder"], report["request"]
    if dec.get("status") == "ok":
        m, text, batch = dec["model"], f"{dec['text_tokens']} text tokens", dec["batch"]
    elif req.get("status") == "ok":
        c = req["variants"]["compressed"]
        m, text, batch = req["decoder_model"], f"{c['prompt_tokens'] - c['T']} text tokens", req["batch"]
    else:
        return None
    if "class" in m:
        model = f"the engine's own language model, {m['class']} from `{m['config']}`"
        runner = ", run by the runtime's TransformersDecoder"
    else:  # schema 1
        shapes = "LLaVA-1.5-7B's" if m.get("llava_1_5_7b_shapes") else "the engine's"
        model, runner = f"a causal LM with {shapes} language-model shapes", ""
    positions = f"; position ids {dec['position_ids']}" if dec.get("position_ids") else ""
    layers = (
        f"**layer override: {m['layers_run']} of {m['layers_full_model']} layers run** "
        f"(prefill and decode times are for {_layers(m['layers_run'])}"
        + (f"; KV-cache bytes are for all {m['layers_full_model']} in float16)" if dec.get("status") == "ok" else ")")
        if m["layer_override"]
        else f"all {m['layers_full_model']} layers run"
    )
    return (
        f"Decoder: {model} ({m['model_type']}: "
        f"hidden {m['hidden_size']}, MLP {m['intermediate_size']}, {m['num_attention_heads']} heads, "
        f"{m['num_key_value_heads']} KV heads of {m['head_dim']}, vocab {m['vocab_size']}), {layers}, "
        f"{m['dtype']} on {m['device']}, seeded random weights{runner}{positions}; "
        f"prompt {text} + T visual rows, batch {batch}."
    )


def render_markdown(report: dict) -> str:
    """The markdown report, headline first, from the JSON alone (any readable schema version)."""
    t, n = _t_and_n(report)
    sections = [
        _title(report, t, n),
        _headline_table(report, t, n),
        _vision_section(report, t, n),
        _op_section(report),
        _decoder_section(report),
        _request_section(report),
        _run_section(report),
    ]
    return "\n".join(line for section in sections for line in section)


def _t_and_n(report: dict) -> tuple:
    """T and N of the bench medium (schema 1 has no `rows`: the manifest's)."""
    eng, rows = report["engines"]["compressed"], report.get("rows")
    return (rows["T"], rows["N"]) if rows else (eng["num_visual_tokens"], eng["num_patches"])


def _title(report: dict, t, n) -> list[str]:
    """The title, where and how it was measured, the bench medium's rows."""
    eng, rows = report["engines"]["compressed"], report.get("rows")  # no rows in schema 1
    cfg, machine = report["config"], report["machine"]
    cpu = machine.get("cpu_model") or machine.get("processor") or "unknown CPU"
    where = f"{machine.get('gpu')} + {cpu}" if machine.get("gpu") else f"{cpu}, {machine['cpu_count']} cores, no GPU"
    lines = [
        f"# apet bench: {eng['model']}, N={n} -> T={t}",
        "",
        f"{report['created_utc']} on {where}; torch {machine['torch']} ({machine['torch_threads']} threads), "
        f"onnxruntime {machine['onnxruntime']}. Median (p90) of {cfg['repeats']} interleaved rounds after "
        f"{cfg['warmup']} warm-up, in ms. Ratios are compressed / uncompressed (< 1: ApET is faster or smaller); "
        f"absolute times depend on this machine, the ratios are the result.",
        "",
        *(
            [
                f"Rows: `{Path(rows['media']).name}` hands the LLM N={n} rows from the uncompressed engine and "
                f"T={t} from the compressed one ({eng['family']} family, {rows['backend']}); "
                f"{_per_item(eng)}.",
                "",
            ]
            if rows
            else []
        ),
    ]
    return lines


def _headline_table(report: dict, t, n) -> list[str]:
    """The four ratios (compressed / uncompressed), then the decoder note."""
    h = report["headline"]
    lines = ["## Headline", "", "| ratio | value | | compressed | uncompressed |", "|---|---|---|---|---|"]
    labels = [
        ("vision stage, ApET (T={T}) / no ApET (N={N}), {backend}", "vision_apet_over_no_apet", "time"),
        ("TTFT (decoder prefill), T={T} / T={N}", "ttft_T_over_N", "time"),
        ("whole request, T={T} / N={N}, {backend}", "request_compressed_over_baseline", "time"),
        ("KV-cache bytes (full model, fp16), T={T} / T={N}", "kv_cache_bytes_T_over_N", "bytes"),
    ]
    for label, key, kind in labels:
        r = h.get(key)
        if r is None:
            section = {
                "vision_apet_over_no_apet": "vision",
                "ttft_T_over_N": "decoder",
                "request_compressed_over_baseline": "request",
                "kv_cache_bytes_T_over_N": "decoder",
            }[key]
            lines.append(f"| {label.format(T=t, N=n, backend='-')} | - | {report[section].get('status')} | | |")
            continue
        text = label.format(T=r["T"], N=r["N"], backend=r.get("backend", ""))
        if kind == "time":
            lines.append(
                f"| {text} | **{r['value']:.3f}** | {_faster(r['value'])} time | "
                f"{1e3 * r['numerator_median_s']:.1f} ms | {1e3 * r['denominator_median_s']:.1f} ms |"
            )
        else:
            lines.append(
                f"| {text} | **{r['value']:.3f}** | {_faster(r['value'])} memory | "
                f"{_mib(r['numerator_bytes'])} | {_mib(r['denominator_bytes'])} |"
            )
    note = decoder_note(report)
    if note:
        lines += ["", note]
    return lines


def _vision_section(report: dict, t, n) -> list[str]:
    """Per vision backend: with and without ApET, memory, kept positions."""
    vision = report["vision"]
    cfg = report["config"]
    lines = ["", f"## Vision stage (tower + ApET + projector vs tower + projector), batch {cfg['batch']}", ""]
    if vision.get("status") != "ok":
        lines.append(vision.get("status", ""))
    else:
        lines += [
            f"| backend | with ApET, T={t} | without, N={n} | ratio | RSS delta with / without | "
            "CUDA peak with / without | kept = ORT CPU | status |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in vision["backends"]:
            if not e["available"]:
                lines.append(f"| {e['name']} | - | - | - | - | - | - | {e['reason']} |")
                continue
            mem = e["memory"]
            cuda = (
                f"{_mib(mem['with_apet']['cuda_peak_allocated_bytes'])} / "
                f"{_mib(mem['without_apet']['cuda_peak_allocated_bytes'])}"
                if mem["with_apet"]["cuda_peak_allocated_bytes"] is not None
                else "-"
            )
            lines.append(
                f"| {e['name']} | {_ms(e['timings']['with_apet'])} | {_ms(e['timings']['without_apet'])} | "
                f"**{_x(e['ratio_apet_over_no_apet'])}** | {_mib(mem['with_apet']['rss_delta_bytes'])} / "
                f"{_mib(mem['without_apet']['rss_delta_bytes'])} | {cuda} | "
                f"{e['positions_equal_onnxruntime_cpu']} | ok ({e['device']}, {e['clock']}) |"
            )
    return lines


def _op_section(report: dict) -> list[str]:
    """The ApET op alone: each candidate against the oracle."""
    op = report["op"]
    lines = ["", "## The ApET op alone", ""]
    if op.get("status") != "ok":
        lines.append(op.get("status", ""))
    else:
        a = op["apet"]
        lines += [
            f"N={op['N']}, D={op['D']}, {_op_budget(a, op['N'])}, k={a['basis']}, batch {op['batch']}, {op['input']}.",
            "",
            "| candidate | median (p90) ms | speed-up vs oracle | kept = oracle | status |",
            "|---|---|---|---|---|",
        ]
        for c in op["candidates"]:
            if not c["available"]:
                lines.append(f"| {c['name']} | - | - | - | {c['reason']} |")
            else:
                lines.append(
                    f"| {c['name']} | {_ms(c['timing'])} | {c['ratio_vs_oracle']:.1f}x | "
                    f"{c['positions_equal_oracle']} | ok ({c['device']}, {c['clock']}) |"
                )
    return lines


def _decoder_section(report: dict) -> list[str]:
    """Prefill (TTFT) and decode against T; the LLM stage when measured."""
    dec = report["decoder"]
    lines = ["", "## Decoder: prefill (TTFT) and decode against T", ""]
    if dec.get("status") != "ok":
        lines.append(dec.get("status", ""))
    else:
        m = dec["model"]
        lines += [
            f"{m['layers_run']} of {m['layers_full_model']} layers run"
            + (" (layer override)" if m["layer_override"] else "")
            + f"; {dec['new_tokens']} tokens per decode run; KV cache of the full model "
            f"({m['layers_full_model']} layers, float16) and as measured in the run "
            f"({_layers(m['layers_run'])}, {m['dtype']})."
            + (f" Position ids: {dec['position_ids']}." if dec.get("position_ids") else ""),
            "",
            "| T | rows | context | prefill / TTFT | / T=N | decode per token | tokens/s | KV cache full model | "
            "KV measured | RSS delta (prefill) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in dec["points"]:
            lines.append(
                f"| {p['T']} | {p.get('rows', '-')} | {p['context']} | {_ms(p['prefill'])} | "
                f"{_x(p['prefill_ratio_vs_N'])} | "
                f"{1e3 * p['decode_s_per_token']:.1f} | {p['decode_tokens_per_s']:.1f} | "
                f"{_mib(p['kv_cache_bytes_full_model'])} | {_mib(p['kv_cache_bytes_measured'])} | "
                f"{_mib(p['memory_prefill']['rss_delta_bytes'])} |"
            )
        stage = dec.get("llm_stage")
        if stage:
            ratios = ", ".join(f"{_x(v)} of T={t}'s" for t, v in stage["prefill_ratio_vs_T"].items())
            lines += [
                "",
                f"ApET inside the LLM (the compressed engine's `llm_stage`): {stage['T_vision']} rows, then "
                f"{stage['keep_llm']} after layer {stage['layer_full_model']} of {m['layers_full_model']} (run: after "
                f"layer {stage['layer_run']} of {m['layers_run']}), {stage['mean_rows_full_model']:g} rows on average "
                f"over the full model's layers; context {stage['context']} -> {stage['context_after_stage']}.",
                "",
                "| LLM stage | prefill / TTFT | vs vision-only | decode per token | KV cache full model | KV measured "
                "| RSS delta (prefill) |",
                "|---|---|---|---|---|---|---|",
                f"| {stage['T_vision']} -> {stage['keep_llm']} @ {stage['layer_full_model']} | "
                f"{_ms(stage['prefill'])} | "
                f"{ratios} | {1e3 * stage['decode_s_per_token']:.1f} | {_mib(stage['kv_cache_bytes_full_model'])} | "
                f"{_mib(stage['kv_cache_bytes_measured'])} | {_mib(stage['memory_prefill']['rss_delta_bytes'])} |",
            ]
    return lines


def _request_section(report: dict) -> list[str]:
    """The whole request, compressed and baseline."""
    req = report["request"]
    lines = ["", "## Whole request (media file -> preprocess -> vision -> prefill -> decode)", ""]
    if req.get("status") != "ok":
        lines.append(req.get("status", ""))
    else:
        m = req["decoder_model"]
        lines += [
            f"runtime.Pipeline with the {req['vision_backend']} vision backend and the benchmark decoder "
            f"({_layers(m['layers_run'])} of {m['layers_full_model']}"
            + (", layer override" if m["layer_override"] else "")
            + f", {m['dtype']} on {m['device']}); "
            f"{req['new_tokens']} new tokens, batch {req['batch']}, prompt {req['prompt']!r}.",
            "",
            "| variant | T | prompt tokens | total | preprocess | vision | prefill | TTFT | decode | "
            "RSS delta | CUDA peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, v in req["variants"].items():
            s = v["stages_median_s"]
            lines.append(
                f"| {name} | {v['T']} | {v['prompt_tokens']} | {_ms(v['timing'])} | "
                + " | ".join(f"{1e3 * s[k]:.1f}" for k in ("preprocess", "vision", "prefill", "ttft", "decode"))
                + f" | {_mib(v['memory']['rss_delta_bytes'])} | {_mib(v['memory']['cuda_peak_allocated_bytes'])} |"
            )
        lines += [
            "",
            f"Request ratio {_x(req['ratio_compressed_over_baseline'])}, TTFT ratio "
            f"{_x(req['ttft_ratio_compressed_over_baseline'])} (compressed / baseline).",
        ]
    return lines


def _run_section(report: dict) -> list[str]:
    """Memory over the run, load average, duration and the command."""
    mem, machine = report["memory"], report["machine"]
    return [
        "",
        "## Memory and run",
        "",
        f"Process peak RSS over the run {_mib(mem['process_peak_rss_bytes'])}; CUDA allocator peak "
        f"{_mib(mem['cuda_peak_allocated_bytes'])}. RSS delta = the peak RSS while one call ran minus the RSS "
        f"just before it (after a heap trim): what the call needed beyond what the process already held.",
        "",
        f"Load average {machine['load_average_start']} at the start, {machine['load_average_end']} at the end; "
        f"{report['duration_s']:.0f} s in all. Command: `{report['command']}`",
        "",
    ]


def plot(report: dict, path: Path) -> Path:
    """Latency per stage against T (log scale) and the KV-cache bytes against T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eng, rows = report["engines"]["compressed"], report.get("rows")  # no rows in schema 1
    t, n = (rows["T"], rows["N"]) if rows else (eng["num_visual_tokens"], eng["num_patches"])
    fig, (ax, kv) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2, 1]})
    vision = report["vision"]
    if vision.get("status") == "ok":
        for e in vision["backends"]:
            if e["available"]:
                ax.plot(
                    [t, n],
                    [1e3 * e["timings"]["with_apet"]["median_s"], 1e3 * e["timings"]["without_apet"]["median_s"]],
                    marker="s",
                    label=f"vision ({e['name']})",
                )
    dec = report["decoder"]
    if dec.get("status") == "ok":
        pts = sorted(dec["points"], key=lambda p: p["T"])
        ts = [p["T"] for p in pts]
        ax.plot(ts, [1e3 * p["prefill"]["median_s"] for p in pts], marker="o", label="prefill / TTFT (decoder)")
        ax.plot(ts, [1e3 * p["decode_s_per_token"] for p in pts], marker="v", label="decode, per token")
        ax.set_xticks(sorted(set(ts) | {t, n}))
        kv.bar([str(x) for x in ts], [p["kv_cache_bytes_full_model"] / 2**20 for p in pts], color="tab:purple")
        kv.set_xlabel("T (visual rows)")
        kv.set_ylabel("MiB")
        m = dec["model"]
        kv.set_title(f"KV cache, {m['layers_full_model']} layers fp16, batch {dec['batch']}")
    req = report["request"]
    if req.get("status") == "ok":
        c, b = req["variants"]["compressed"], req["variants"]["baseline"]
        ax.plot(
            [c["T"], b["T"]],
            [1e3 * c["timing"]["median_s"], 1e3 * b["timing"]["median_s"]],
            marker="D",
            linewidth=2,
            label=f"whole request ({req['new_tokens']} new tokens)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("T (visual rows into the LLM)")
    ax.set_ylabel("median latency, ms (log)")
    title = f"{eng['model']}: latency per stage against T (N={n})"
    if dec.get("status") == "ok" and dec["model"]["layer_override"]:
        title += f"\ndecoder: {dec['model']['layers_run']} of {dec['model']['layers_full_model']} layers (override)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            "usage: python -m apet_trt.scripts.bench.report BENCH.json  (re-renders bench.md and bench.png beside it)",
            file=sys.stderr,
        )
        return 2
    src = Path(argv[0])
    try:
        report = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        print(f"bench report: error: {src}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if report.get("schema_version") not in READABLE_SCHEMAS:
        print(
            f"bench report: error: {src} has schema_version {report.get('schema_version')!r}; this renderer reads "
            f"{', '.join(map(str, READABLE_SCHEMAS))} (docs/BENCH.md): run `apet bench` again",
            file=sys.stderr,
        )
        return 2
    (src.parent / "bench.md").write_text(render_markdown(report))
    plot(report, src.parent / "bench.png")
    print(render_markdown(report))
    return 0


def _per_item(eng: dict) -> str:
    """What one engine item gets: fixed N -> T, or per image (dynamic resolution, a ratio budget)."""
    n, t = eng.get("num_patches"), eng.get("num_visual_tokens")
    if t is not None:
        return f"per engine item N={n} -> T={t}"
    ratio = (eng.get("apet") or {}).get("keep_ratio")
    budget = f"T = floor({ratio} N)" if ratio is not None else "T"
    return f"N varies per image (up to {n}), {budget} per image" if n is not None else f"{budget} per image"


def _op_budget(apet: dict, n: int) -> str:
    """T of the op section: the fixed keep, or floor(R N) for a ratio budget."""
    ratio = apet.get("keep_ratio")
    if apet.get("keep") is not None or ratio is None:
        return f"T={apet.get('keep')}"
    from apet_trt.apet_ops import ApetConfig

    return f"T=floor({ratio} N)={ApetConfig.from_dict(apet).keep_for(n)}"


if __name__ == "__main__":
    sys.exit(main())
