"""The driver: data -> each engine's answers (cached) -> scores -> eval.json / eval.md / eval.png.

items   = read_items(cfg.data)                       data.py: the whole file checked first
engines = describe(cfg)                              the baseline first; manifest facts, cache identity
for each engine: answer what the cache lacks        one pipeline per engine, loaded once, batched
report  = build_report(cfg, items, engines, ...)     report.py: scores, ratios, per item
write(report)                                        JSON, markdown, plot
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .answer import answer_batch, answer_images
from .cache import AnswerCache, digest
from .config import EvalConfig, log
from .data import Item, file_digest, read_items


@dataclass
class Engine:
    label: str
    path: Path
    manifest_sha256: str
    facts: dict  # model, family, T / ratio, N (what the manifest says)
    baseline: bool


def _facts(manifest) -> dict:
    """What the manifest says about the budget (T fixed, a ratio of N, or none) and the model."""
    apet = manifest.apet
    if not apet:
        budget = "none (all N rows)"
    elif apet.get("keep") is not None:  # Video-LLaVA's rows per frame: CLS + keep + basis seeds
        t = manifest.num_visual_tokens
        budget = f"T={apet['keep']}" if t in (None, apet["keep"]) else f"T={t} per item (keep {apet['keep']})"
    else:
        budget = f"T=floor({apet.get('keep_ratio')} N)"
    if manifest.llm_stage:  # ApET again inside the LLM (apet build --budget / --llm-stage)
        budget += f", then {manifest.llm_stage.get('keep')} after LLM layer {manifest.llm_stage.get('layer')}"
    return {
        "model": manifest.data["model"].get("id"),
        "family": manifest.family,
        "budget": budget,
        "apet": apet,
        "llm_stage": manifest.llm_stage,
        "num_visual_tokens": manifest.num_visual_tokens,
        "num_patches": manifest.num_patches,
    }


def describe(cfg: EvalConfig) -> list[Engine]:
    """The baseline, then each --engine: label, manifest hash and facts (manifest read, not verified:
    runtime.load verifies every file when an engine has anything to answer)."""
    from apet_trt.runtime import load_manifest

    paths = [cfg.baseline, *cfg.engines]
    labels = list(cfg.labels) or [Path(p).resolve().name for p in paths]
    for i, lab in enumerate(labels):  # two directories of one name: "name", "name#2"
        if labels[:i].count(lab):
            labels[i] = f"{lab}#{labels[:i].count(lab) + 1}"
    out = []
    for i, (label, p) in enumerate(zip(labels, paths)):
        manifest = load_manifest(p, verify=False)
        sha = hashlib.sha256((Path(p) / "manifest.json").read_bytes()).hexdigest()
        out.append(Engine(label, Path(p), sha, _facts(manifest), baseline=i == 0))
    return out


# bumped when the way an answer is asked changes (answer.py: the conversation, the decoding), so a
# cache written by older code is asked again rather than mixed in
ANSWER_FORMAT = 3


def request_key(cfg: EvalConfig, engine: Engine, item: Item, prompt: str) -> str:
    request = json.dumps(
        {
            "format": ANSWER_FORMAT,
            "prompt": prompt,
            "kind": item.kind,
            "media": [file_digest(p) for p in item.media],
            "max_new_tokens": cfg.max_new_tokens,
            "backend": cfg.backend,
            "decoder": cfg.decoder,
        },
        sort_keys=True,
    )
    return digest(engine.manifest_sha256, item.id, hashlib.sha256(request.encode()).hexdigest())


def _batches(items: list[Item], size: int) -> list[list[Item]]:
    """Consecutive runs of one kind, at most `size` long; an item with several images alone."""
    out: list[list[Item]] = []
    for it in items:
        last = out[-1] if out else None
        if last and it.kind == last[0].kind != "images" and len(last) < size:
            last.append(it)
        else:
            out.append([it])
    return out


def _ask(pipe, batch: list[Item], prompts: list[str], max_new_tokens: int) -> list[dict]:
    if batch[0].kind == "images":
        [it] = batch
        return [answer_images(pipe, [str(p) for p in it.media], prompts[0], max_new_tokens)]
    return answer_batch(pipe, batch[0].kind, [str(it.media[0]) for it in batch], prompts, max_new_tokens)


def answer_engine(cfg: EvalConfig, engine: Engine, items: list[Item], cache: AnswerCache, load: Callable) -> int:
    """Ask the engine every item the cache lacks; returns how many were asked."""
    from tqdm import tqdm

    prompts = {it.id: it.prompt(cfg.open_suffix, cfg.choice_suffix) for it in items}
    keys = {it.id: request_key(cfg, engine, it, prompts[it.id]) for it in items}
    todo = [it for it in items if keys[it.id] not in cache]
    if not todo:
        log(f"{engine.label}: all {len(items)} answers cached")
        return 0
    log(f"{engine.label}: {len(items) - len(todo)} cached, {len(todo)} to ask; loading {engine.path}")
    pipe = load(str(engine.path), cfg.backend, cfg.device, decoder=cfg.decoder)
    bar = tqdm(
        total=len(items), initial=len(items) - len(todo), desc=engine.label, unit="item", disable=not cfg.progress
    )
    try:
        for batch in _batches(todo, cfg.batch):
            try:
                records = _ask(pipe, batch, [prompts[it.id] for it in batch], cfg.max_new_tokens)
            except (ValueError, TypeError, RuntimeError, OSError) as exc:  # name the items; the cache keeps the rest
                where = ", ".join(f"{it.id!r} (line {it.line})" for it in batch)
                raise RuntimeError(f"{engine.label}: item(s) {where} of {cfg.data}: {exc}") from exc
            for it, rec in zip(batch, records):
                rec.update(
                    key=keys[it.id],
                    engine=str(engine.path),
                    manifest_sha256=engine.manifest_sha256,
                    item=it.id,
                    prompt=prompts[it.id],
                    call=keys[batch[0].id],  # the items of one generate call share its timings
                    backend=getattr(pipe, "backend", None),
                    decoder=getattr(getattr(pipe, "decoder", None), "name", None),
                )
            cache.add(records)
            bar.update(len(batch))
    finally:
        bar.close()
    return len(todo)


def run_eval(cfg: EvalConfig, *, load: Callable | None = None) -> dict:
    """Everything `apet eval` does; returns the report (also written under cfg.out). `load` is
    runtime.load unless given (the tests count pipeline calls through it)."""
    from . import report as rep

    cfg.check()
    if load is None:
        from apet_trt.runtime import load
    items = read_items(cfg.data)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    engines = describe(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = AnswerCache(out / "answers.jsonl")
    asked = {}
    for engine in engines:
        asked[engine.label] = answer_engine(cfg, engine, items, cache, load)
    answers = {
        e.label: [cache[request_key(cfg, e, it, it.prompt(cfg.open_suffix, cfg.choice_suffix))] for it in items]
        for e in engines
    }
    report = rep.build_report(cfg, items, engines, answers, asked)
    rep.write_outputs(report, out)
    return report
