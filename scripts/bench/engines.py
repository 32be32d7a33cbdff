"""The two engine directories a benchmark compares: the compressed one (ApET) and the uncompressed
baseline of the same model. Given (--engine, --baseline), or built by `apet build` into the cache
(--model, or --engine without --baseline) and reused there while they verify and match."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import BenchConfig, log


@dataclass
class EnginePair:
    compressed: object  # runtime.manifest.Manifest
    baseline: object
    built: dict = field(default_factory=dict)  # variant -> True when this run built it


def model_of(manifest) -> str:
    m = manifest.model
    return m.id if m.source == "preset" else str(manifest.external_checkpoint)


def _slug(model: str) -> str:
    name = Path(model).name if (os.sep in model or Path(model).exists()) else model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _matches(manifest, model: str, apet: dict | None, fp16: bool, llm_stage: dict | None = None) -> bool:
    from apet_trt.apet_ops.probes import tensorrt_available

    m = manifest.model
    same_model = (
        m.id == model
        if m.source == "preset"
        else str(manifest.external_checkpoint) == os.path.realpath(Path(model).expanduser())
    )
    if apet is None:
        same_apet = manifest.apet is None
    else:
        same_apet = manifest.apet is not None and all(manifest.apet.get(k) == v for k, v in apet.items())
    # --fp16 is the graph's precision (vision.onnx and so the plan), not only the plan's
    same_precision = (manifest.precision.vision == "fp16") == fp16
    plan_if_possible = manifest.engine_path("tensorrt") is not None or not tensorrt_available()[0]
    stage = manifest.llm_stage
    same_stage = (
        stage is None
        if llm_stage is None
        else stage is not None and all(stage.get(k) == v for k, v in llm_stage.items())
    )
    return same_model and same_apet and same_precision and plan_if_possible and same_stage


def _build_or_reuse(
    model: str,
    out: Path,
    *,
    keep: int | None,
    basis: int,
    fp16: bool,
    budget: int | None = None,
    keep_ratio: float | None = None,
) -> tuple[object, bool]:
    """-> (verified manifest, built now?). A directory that verifies and matches is reused. With
    `budget` the engine is `apet build --budget` (keep: the budget's; an LLM stage); with
    `keep_ratio` `apet build --keep-ratio` (keep unused)."""
    from apet_trt.export.build import BuildConfig, build
    from apet_trt.export.parity import OFFICIAL_BUDGETS
    from apet_trt.runtime.manifest import load_manifest

    if keep_ratio is not None:
        keep = None
    apet = None if keep is None else {"keep": keep, "basis": basis}
    if keep_ratio is not None:
        apet = {"keep_ratio": keep_ratio, "basis": basis}
    llm_stage = None
    if budget is not None:
        keep, layer, keep2 = OFFICIAL_BUDGETS[budget]
        apet, llm_stage = {"keep": keep, "basis": basis}, {"layer": layer, "keep": keep2}
    if (out / "manifest.json").is_file():
        try:
            manifest = load_manifest(out, verify=True)
            if _matches(manifest, model, apet, fp16, llm_stage):
                log(f"reusing verified engine directory {out}")
                return manifest, False
            log(f"{out} was built for another configuration: rebuilding it")
        except Exception as exc:  # noqa: BLE001 - any failure to verify means: rebuild
            log(f"{out} does not verify ({' '.join(str(exc).split())}): rebuilding it")
    what = f"--budget {budget}" if budget else ("T=" + str(keep) if keep else "no ApET")
    if keep_ratio is not None:
        what = f"--keep-ratio {keep_ratio}"
    log(f"building {out} ({model}, {what})")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report
        build(
            BuildConfig(
                model=model,
                out=str(out),
                keep=None if budget else keep,
                keep_ratio=keep_ratio,
                budget=budget,
                basis=basis,
                no_apet=keep is None and keep_ratio is None,
                fp16=fp16,
                force=True,
                tensorrt_llm=False,
            )
        )
    return load_manifest(out, verify=True), True


def build_pair(
    model: str,
    cache: Path,
    *,
    keep: int,
    basis: int,
    fp16: bool,
    budget: int | None = None,
    keep_ratio: float | None = None,
) -> EnginePair:
    """Both engine directories of `model` in `cache` (<model>-t<keep>-k<basis>, <model>-b<budget>-k<basis>
    or <model>-r<ratio>-k<basis>, and <model>-full), built or reused (also scripts/serve_load.py's)."""
    slug = _slug(model)
    name = f"{slug}-b{budget}-k{basis}" if budget else f"{slug}-t{keep}-k{basis}"
    if keep_ratio is not None:
        name = f"{slug}-r{keep_ratio:g}-k{basis}"
    comp, built_c = _build_or_reuse(
        model, cache / name, keep=keep, basis=basis, fp16=fp16, budget=budget, keep_ratio=keep_ratio
    )
    base, built_b = _build_or_reuse(model, cache / f"{slug}-full", keep=None, basis=basis, fp16=fp16)
    return EnginePair(comp, base, {"compressed": built_c, "baseline": built_b})


def resolve_engines(cfg: BenchConfig, check: Callable[[EnginePair], None] = lambda pair: None) -> EnginePair:
    """The (compressed, baseline) engine directories: given, or built / reused in the cache. Given
    directories are checked against each other, and by `check` (the arguments that need only the
    manifests), before their files are hashed, so argument errors come first."""
    from apet_trt.runtime.manifest import read_manifest, verify_files

    cache = Path(cfg.cache_dir)
    if cfg.model is not None:
        pair = build_pair(
            cfg.model,
            cache,
            keep=cfg.keep,
            basis=cfg.basis,
            fp16=cfg.fp16,
            budget=cfg.budget,
            keep_ratio=cfg.keep_ratio,
        )
        check_pair(pair)
        check(pair)
        return pair
    comp = read_manifest(cfg.engine)
    if comp.apet is None:
        raise ValueError(
            f"--engine {cfg.engine} has no ApET (T = N = {comp.num_patches}); pass the compressed "
            "engine as --engine and the uncompressed one as --baseline"
        )
    if cfg.baseline is not None:
        pair = EnginePair(comp, read_manifest(cfg.baseline), {"compressed": False, "baseline": False})
        check_pair(pair)
        check(pair)
        for m in (pair.compressed, pair.baseline):
            log(f"verifying {m.root}")
            verify_files(m)
        return pair
    log(f"verifying {comp.root}")
    verify_files(comp)
    model = model_of(comp)
    precision_fp16 = comp.precision.vision == "fp16"
    base, built_b = _build_or_reuse(
        model, cache / f"{_slug(model)}-full", keep=None, basis=int(comp.apet["basis"]), fp16=precision_fp16
    )
    pair = EnginePair(comp, base, {"compressed": False, "baseline": built_b})
    check_pair(pair)
    check(pair)
    return pair


def check_pair(pair: EnginePair) -> None:
    """The baseline is uncompressed, and both are engines of one model: the same family, model,
    vision facts (whatever the family records there) and language-model width."""
    c, b = pair.compressed, pair.baseline
    if b.apet is not None:
        raise ValueError(f"--baseline {b.root} is compressed (ApET keep={b.apet.get('keep')}); build it with --no-apet")
    for what, get in (
        ("family", lambda m: m.family),
        ("model", model_of),
        ("vision facts", lambda m: m.vision),
        ("llm hidden_size", lambda m: m.llm["hidden_size"]),
    ):
        if get(c) != get(b):
            raise ValueError(
                f"the engines differ in {what}: {c.root} has {get(c)!r}, {b.root} has {get(b)!r}; "
                "compare engines of the same model"
            )


def engine_info(manifest, built: bool) -> dict:
    """One engine's entry in the report (num_patches / num_visual_tokens are per engine item, as the
    manifest records them; the rows of the bench image are the report's `rows`)."""
    return {
        "dir": str(manifest.root),
        "model": model_of(manifest),
        "family": manifest.family,
        "num_patches": manifest.num_patches,
        "num_visual_tokens": manifest.num_visual_tokens,
        "feature_dim": manifest.vision.get("feature_dim"),
        "hidden_size": int(manifest.llm["hidden_size"]),
        "apet": manifest.apet,
        "llm_stage": manifest.llm_stage,
        "tensorrt_plan": manifest.engine_path("tensorrt") is not None,
        "precision": dataclasses.asdict(manifest.precision),
        "built_by_bench": built,
    }
