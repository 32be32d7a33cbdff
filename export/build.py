"""`apet build`: a checkpoint (local path) or preset -> one engine directory (docs/ENGINE_DIR.md).

    build(BuildConfig(model="tiny-llava", keep=64, basis=10, out="engines/tiny-llava-t64"))

No budget at all (keep, keep_ratio, budget, llm_stage, no_apet) builds the family's paper setting,
which its export adapter declares (`paper_budget`; docs/DEFAULTS.md).

Steps: load the model -> export vision tower + ApET + projector to ONNX (validated: checker,
shape inference, TensorRT op allowlist) -> ONNX Runtime vs PyTorch -> processor, tokenizer and
decoder checkpoint -> TensorRT plan (where tensorrt imports) -> TensorRT-LLM engine (where
tensorrt_llm imports) -> manifest with checksums. The directory is assembled beside the target
and moved into place at the end, so a failed build never leaves half a directory or destroys an
existing one.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from apet_trt.apet_ops import ApetConfig
from apet_trt.apet_ops.compat import config_dtype, config_model_type, load_image_processor

from . import manifest as manifest_writer
from . import parity
from .engine_dir import EngineDirWriter
from .limits import DEFAULT_MAX_MEMORY_GIB, MAX_BASIS, MAX_BATCH
from .models import EnginePart, ExportFamily, LoadedModel, family_class, family_for_model_type
from .onnx_export import compare_with_torch, export_vision_onnx
from .precision import compressor_not_fp32, part_dtypes
from .presets import PRESETS, get_preset, load_preset, preset_config
from .tensorrt_build import INSTALL_HINT as TRT_HINT
from .tensorrt_build import build_tensorrt, llm_plan_record, tensorrt_version
from .trtllm_build import INSTALL_HINT as TRTLLM_HINT
from .trtllm_build import TrtllmBuildConfig, build_trtllm, tensorrt_llm_version


@dataclass
class BuildConfig:
    model: str  # a preset name or a local checkpoint directory
    out: str
    keep: int | None = None  # T; no budget at all (keep, keep_ratio, budget, llm_stage): the family's paper_budget
    keep_ratio: float | None = None  # R instead of keep: T = floor(R * N) per image
    seed_blend: float | None = None  # weight of a seed in its slot; None: the family's (1.0 LLaVA, 0.5 Qwen2.5-VL)
    basis: int = 10
    merge: bool = True
    start: int | str = 0  # the first FPS seed's index, or "random" (drawn at run time from start_seed)
    ridge: float = 1e-5
    no_apet: bool = False
    max_batch: int = 8
    opt_batch: int = 1
    min_pixels: int | None = None  # dynamic-resolution families: the processor's pixel range (None: its own)
    max_pixels: int | None = None
    max_memory_gib: float = DEFAULT_MAX_MEMORY_GIB  # the vision engine's estimated peak must stay below (Qwen2.5-VL)
    fp16: bool = False  # tower and projector exported in float16; the compressor stays float32
    force: bool = False  # replace an existing directory
    tensorrt: bool = True  # build the TensorRT plan where tensorrt imports
    tensorrt_llm: bool = True  # build the TensorRT-LLM decoder where tensorrt_llm imports
    # paper parity (export/parity.py)
    budget: int | None = None  # 64 | 128 | 192: the official (keep, llm_stage) pairs
    llm_stage: str | None = None  # "LAYER:KEEP": ApET again on the image rows after LAYER decoder layers
    start_seed: int = 0  # seeds the run-time draws of start="random"
    image_aspect: str = "default"  # "pad": LLaVA-1.5's expand2square before the processor
    frame_sampling: str | None = None  # video families: "transformers" (default) | "official" (runtime/videos.py)

    def gives_budget(self) -> bool:
        """Whether the build names its budget (or the baseline); if not, the family's paper setting applies."""
        return self.no_apet or any(v is not None for v in (self.keep, self.keep_ratio, self.budget, self.llm_stage))

    def apet(self, defaults: dict | None = None) -> ApetConfig | None:
        """The ApET config; `defaults` are the family's for what the build leaves unset (seed_blend)."""
        if self.no_apet and (self.keep is not None or self.keep_ratio is not None):
            budget = f"--keep {self.keep}" if self.keep is not None else f"--keep-ratio {self.keep_ratio}"
            raise ValueError(f"--no-apet builds the uncompressed baseline (all N tokens); it cannot take {budget}")
        plan = parity.resolve(self)  # --budget's keep, --start random's fixed engine start
        if plan.keep is None and self.keep_ratio is None:
            return None
        blend = self.seed_blend if self.seed_blend is not None else (defaults or {}).get("seed_blend", 1.0)
        return ApetConfig(
            keep=plan.keep,
            keep_ratio=self.keep_ratio,
            basis=self.basis,
            merge=self.merge,
            ridge=self.ridge,
            start=plan.start,
            seed_blend=blend,
        )


class Steps:
    """One line per step with its duration: the slow steps show progress as they go."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.n, self.quiet, self.t0 = total, 0, quiet, None

    def __call__(self, text: str):
        self.done()
        self.n += 1
        self.t0 = time.perf_counter()
        if not self.quiet:
            print(f"[{self.n}/{self.total}] {text} ...", flush=True)

    def done(self):
        if self.t0 is not None and not self.quiet:
            print(f"      done in {time.perf_counter() - self.t0:.1f}s", flush=True)
        self.t0 = None

    def note(self, text: str):
        if not self.quiet:
            print(f"      {text}", flush=True)


def _versions() -> dict:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "apet_trt": ver("apet-trt") or "0.1.0",
        "torch": torch.__version__,
        "onnx": ver("onnx"),
        "onnxruntime": ver("onnxruntime") or ver("onnxruntime-gpu"),
        "transformers": ver("transformers"),
        "tensorrt": tensorrt_version(),
        "tensorrt_llm": tensorrt_llm_version(),
    }


def checkpoint_config(path: Path):
    """A local checkpoint's config (offline, no weights read)."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint directory (no config.json)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def _resolve(model: str, pixels: dict | None = None) -> tuple[str, ExportFamily]:
    """-> (source, the model's family adapter on its config and image processor, with the build's
    pixel range applied): without reading any weights."""
    pixels = pixels or {}
    if model in PRESETS:
        config, processor, _, preset = preset_config(model)
        cls = family_class(preset.family)
        return "preset", cls(config, cls.configure_processor(processor, **pixels))
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing checkpoint directory"
        )
    config = checkpoint_config(path)
    try:
        family = family_for_model_type(config_model_type(config))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    try:
        processor = family.configure_processor(load_image_processor(path, local_files_only=True), **pixels)
    except OSError:
        processor = None  # none saved: loading the checkpoint says so, after the --out checks
    return "path", family(config, processor)


def _family_class(model: str) -> type[ExportFamily] | None:
    """The family of a preset or a local checkpoint (its config.json only); None where that cannot be
    read (the build's own checks then say why)."""
    try:
        if model in PRESETS:
            return family_class(get_preset(model).family)
        return family_for_model_type(config_model_type(checkpoint_config(Path(model).expanduser())))
    except (OSError, ValueError):
        return None


def with_paper_budget(config: BuildConfig) -> tuple[BuildConfig, str | None]:
    """No budget given (no --keep, --keep-ratio, --budget, --llm-stage, --no-apet): the config with
    the family's paper setting (its export adapter's `paper_budget`), and a line saying which."""
    if config.gives_budget():
        return config, None
    family = _family_class(config.model)
    if family is None or not family.paper_budget:
        return config, None
    line = (
        f"no budget given: the {family.name} family's paper setting, {family.paper_budget_text} (--no-apet: all rows)"
    )
    return dataclasses.replace(config, **family.paper_budget), line


def _load(model: str, source: str, family: ExportFamily) -> LoadedModel:
    if source == "preset":
        return load_preset(model)
    return family.load_checkpoint(Path(model).expanduser())


def _llm_dtype(config, source: str, loaded: LoadedModel) -> str:
    if source == "preset":
        return "float32" if loaded.language_model_saved else "float16"
    dtype = next((d for cfg in (config.text_config, config) if (d := config_dtype(cfg)) is not None), None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "float16"
    return name if name in ("float16", "bfloat16", "float32") else "float16"


def _profile_shapes(io: dict, batch: int) -> dict[str, tuple[int, ...]]:
    """Each input's shape for `batch` items: the dynamic (named) dim is the items axis."""
    return {t["name"]: tuple(batch if isinstance(d, str) else d for d in t["shape"]) for t in io["inputs"]}


def _export_part(part: EnginePart, work: Path, fp16: bool, batches: list[int]) -> dict:
    """One extra vision engine -> <name>.onnx, checked against PyTorch; -> its manifest `parts` entry."""
    module = (copy.deepcopy(part.module).half() if fp16 else part.module.float()).eval()
    io = part.io
    dynamic = {
        t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
        for t in [*io["inputs"], *io["outputs"]]
    }
    path = export_vision_onnx(
        module,
        work / f"{part.name}.onnx",
        inputs=part.example_inputs(2, torch.Generator().manual_seed(0)),
        output_names=[o["name"] for o in io["outputs"]],
        dynamic_axes=dynamic,
    )
    for c in compare_with_torch(module, path, part.example_inputs, batches=batches):
        if not c.agreement.passed(reduced_precision=fp16):
            raise RuntimeError(
                f"ONNX Runtime disagrees with PyTorch on {part.name}.onnx at batch {c.batch}: {c.agreement}"
            )
    return {"io": io, "engines": {"onnx": path.name, "tensorrt": None}}


@dataclass
class _Job:
    """One build, resolved before any weights are read: the options checked, the family adapter on
    its config and processor, ApET's config (computed once, with the family's defaults and variant)
    and the --out writer."""

    config: BuildConfig
    options: parity.Plan
    source: str  # "preset" | "path"
    family: ExportFamily
    apet: ApetConfig | None
    writer: EngineDirWriter
    items: int  # engine items per call
    batches: list[int]  # the batch sizes the engines are compared at
    checkpoint: Path | None  # a checkpoint built by path (never copied)
    paper_line: str | None = None  # no budget given: the line naming the family's paper setting
    memory_note: str | None = None  # the vision engine's estimated peak memory (Qwen2.5-VL), if the family has one

    @property
    def budget(self) -> str:
        return self.family.budget_text(self.apet)


def build(config: BuildConfig, *, quiet: bool = False) -> dict:
    """Build the engine directory; returns its manifest."""
    job = _plan(config, quiet)
    steps = Steps(7, quiet)
    if job.memory_note:
        steps.note(job.memory_note)
    steps(f"loading {config.model} (family {job.family.name})")
    loaded = _load(config.model, job.source, job.family)
    engine = _vision_engine(job, loaded.model)
    with job.writer as work:  # locked; removed again, with the parents it made, if the build fails
        onnx_path, dtypes = _export_onnx(job, engine, work, steps)
        _compare_with_torch(job, engine, onnx_path, steps)
        parts = _export_parts(job, loaded.model, work, steps)
        decoder = _save_checkpoint(job, loaded, work, steps)
        plans = _tensorrt_plans(job, onnx_path, parts, work, steps)
        llm_dtype = _llm_dtype(loaded.config, job.source, loaded)
        trtllm = _tensorrt_llm_engine(job, decoder, llm_dtype, plans, work, steps)
        steps("manifest")
        fields = _manifest_fields(job, loaded, llm_dtype, dtypes, parts, plans, decoder, trtllm)
        data = manifest_writer.write_manifest(work, fields)  # checked with the runtime's schema first
        steps.done()
        job.writer.commit()
    if not quiet:
        _print_summary(job, data)
    return data


def _plan(config: BuildConfig, quiet: bool = False) -> _Job:
    """Every option checked and the model's family resolved, before any weights are built: batch
    range, ApET options, the family's limits and the parity options; --out checked."""
    if (
        isinstance(config.max_batch, bool)
        or not isinstance(config.max_batch, int)
        or not 1 <= config.max_batch <= MAX_BATCH
    ):
        raise ValueError(
            f"--max-batch must be an integer in 1..{MAX_BATCH} (the engine format's), "
            f"got max_batch={config.max_batch!r}"
        )
    if isinstance(config.basis, int) and config.basis > MAX_BASIS:
        raise ValueError(f"--basis {config.basis}: the engine format takes at most {MAX_BASIS} basis tokens")
    if (
        isinstance(config.opt_batch, bool)
        or not isinstance(config.opt_batch, int)
        or not 1 <= config.opt_batch <= config.max_batch
    ):
        raise ValueError(
            f"--opt-batch must be an integer in 1..max_batch={config.max_batch}, got opt_batch={config.opt_batch!r}"
        )
    config, paper_line = with_paper_budget(config)
    if paper_line and not quiet:
        print(paper_line, flush=True)
    options = parity.resolve(config)
    pixels = {k: v for k, v in (("min_pixels", config.min_pixels), ("max_pixels", config.max_pixels)) if v is not None}
    source, family = _resolve(config.model, pixels)
    # keep / basis / start / ridge checked; the family's defaults for what the build left unset
    # (seed_blend), then its variant (e.g. the video layout)
    apet = family.apet_config(config.apet(family.apet_defaults))
    checkpoint = Path(config.model).expanduser() if source == "path" else None
    writer = EngineDirWriter(config.out, force=config.force, inputs=[checkpoint] if checkpoint else [])
    try:
        family.check_apet(apet)  # keep <= N, start < N: before any weights are built
    except ValueError as exc:
        if paper_line is None:
            raise
        raise ValueError(
            f"no budget given, and the {family.name} family's paper setting does not fit this model ({exc}); "
            "pass --keep / --keep-ratio, or --no-apet"
        ) from exc
    family.configure_frames(config.frame_sampling)  # video families: how the runtime samples frames
    items = family.max_items(apet, config.max_batch)  # engine items per call
    memory = family.check_memory(items, config.max_memory_gib * 2**30)  # refused above the budget
    parity.check_family(options, family, apet, config)
    family.start_input = apet is not None and options.random_seed is not None  # the engine takes "start"
    batches = sorted({1, min(3, items)})
    return _Job(config, options, source, family, apet, writer, items, batches, checkpoint, paper_line, memory)


def _vision_engine(job: _Job, model: torch.nn.Module) -> torch.nn.Module:
    """The vision engine module in the build's precision. Precision is the graph's
    (export/precision.py): tower and projector in the build's dtype, the compressor casts to float32
    inside; a float16 copy, so that the cast never reaches the model whose weights are saved as the
    decoder checkpoint."""
    engine = job.family.vision_module(model, job.apet)
    return (copy.deepcopy(engine).half() if job.config.fp16 else engine.float()).eval()


def _export_onnx(job: _Job, engine: torch.nn.Module, work: Path, steps: Steps) -> tuple[Path, dict]:
    """vision.onnx (validated by export_vision_onnx), its compressor checked to compute in float32;
    -> (its path, each part's dtype)."""
    family, apet = job.family, job.apet
    steps(f"exporting vision tower + {'ApET' if apet else 'no compression'} + projector to ONNX ({job.budget})")
    io = family.io(apet)
    onnx_path = export_vision_onnx(
        engine,
        work / "vision.onnx",
        # batch 2 (where the graph takes it): the batch axis stays symbolic
        inputs=family.example_inputs(min(2, job.items), torch.Generator().manual_seed(0)),
        output_names=[o["name"] for o in io["outputs"]],
        dynamic_axes=family.dynamic_axes(apet),
    )
    steps.note("onnx.checker, shape inference and the TensorRT op allowlist: passed")
    if wrong := compressor_not_fp32(onnx_path):
        raise RuntimeError(f"the exported compressor computes outside float32: {', '.join(wrong[:5])}")
    dtypes = part_dtypes(onnx_path)
    steps.note("dtypes: " + ", ".join(f"{part} {dt}" for part, dt in dtypes.items() if dt))
    return onnx_path, dtypes


def _compare_with_torch(job: _Job, engine: torch.nn.Module, onnx_path: Path, steps: Steps) -> None:
    steps("ONNX Runtime vs PyTorch")
    for c in compare_with_torch(engine, onnx_path, job.family.example_inputs, batches=job.batches):
        steps.note(f"batch {c.batch}: {c.agreement}")
        if not c.agreement.passed(reduced_precision=job.config.fp16):
            raise RuntimeError(f"ONNX Runtime disagrees with PyTorch at batch {c.batch}: {c.agreement}")


def _export_parts(job: _Job, model: torch.nn.Module, work: Path, steps: Steps) -> dict:
    """The vision engines beside the main one (export/models/base.py, EnginePart) -> manifest `parts`."""
    parts = {}
    for part in job.family.extra_parts(model, job.apet):
        steps.note(f"engine part {part.name!r}: exporting {part.name}.onnx and comparing with PyTorch")
        parts[part.name] = _export_part(part, work, job.config.fp16, job.batches)
    return parts


def _save_checkpoint(job: _Job, loaded: LoadedModel, work: Path, steps: Steps) -> dict:
    """processor/, tokenizer/, the family's own files and the decoder checkpoint -> the manifest's
    decoder.transformers entry."""
    steps("saving processor, tokenizer and decoder checkpoint")
    model, processor, tokenizer = loaded.model, job.family.processor, loaded.tokenizer
    processor.save_pretrained(str(work / "processor"))  # the checkpoint's or preset's, with the pixel range
    tokenizer.save_pretrained(str(work / "tokenizer"))
    job.family.save_files(model, work)  # what the family's runtime adapter reads besides the engine
    if job.source == "preset" and loaded.language_model_saved:
        # a whole checkpoint, as one from the hub: weights, processor and tokenizer (TensorRT-LLM's
        # LLM API loads all three from one directory)
        for part in (model, processor, tokenizer):
            part.save_pretrained(str(work / "hf"))
        return {"checkpoint": "hf", "weights": "saved"}
    if job.source == "preset":
        loaded.config.save_pretrained(str(work / "hf"))
        seed = get_preset(job.config.model).seed
        return {"checkpoint": "hf", "weights": "random-seeded", "seed": seed, "config": "hf/config.json"}
    return {"checkpoint": None, "weights": "saved"}  # null: the external checkpoint


def _tensorrt_plans(job: _Job, onnx_path: Path, parts: dict, work: Path, steps: Steps) -> dict:
    """vision.plan (and each part's plan) where TensorRT imports, each checked against ONNX Runtime;
    -> engine kind -> what built its plan (the manifest's `plans`)."""
    steps("TensorRT engine")
    config, family, items = job.config, job.family, job.items
    if not config.tensorrt:
        steps.note("skipped (--no-tensorrt)")
        return {}
    if tensorrt_version() is None:
        steps.note(f"TensorRT is not importable: wrote the ONNX engine only ({TRT_HINT})")
        return {}
    g = torch.Generator().manual_seed(1)
    result = build_tensorrt(
        onnx_path,
        work / "vision.plan",
        profile=family.tensorrt_profile(job.apet, min(config.opt_batch, items), items),
        feeds=[{k: v.numpy() for k, v in family.example_inputs(b, g).items()} for b in job.batches],
    )
    for name, entry in parts.items():
        part_shapes = [_profile_shapes(entry["io"], b) for b in (1, config.opt_batch, config.max_batch)]
        part_result = build_tensorrt(
            work / entry["engines"]["onnx"],
            work / f"{name}.plan",
            profile={k: tuple(s[k] for s in part_shapes) for k in part_shapes[0]},
        )
        entry["engines"]["tensorrt"] = f"{name}.plan"
        steps.note(f"saved {name}.plan; TensorRT vs ONNX Runtime: {part_result.agreement}")
        if not part_result.agreement.passed(reduced_precision=True):
            raise RuntimeError(f"TensorRT disagrees with ONNX Runtime on {name}.onnx: {part_result.agreement}")
    steps.note(
        f"saved vision.plan (TensorRT {result.record['tensorrt']}, {result.record['gpu']}, compute "
        f"capability {result.record['compute_capability']}, strongly typed)"
    )
    steps.note(f"TensorRT vs ONNX Runtime: {result.agreement}")
    if not result.agreement.passed(reduced_precision=True):
        raise RuntimeError(f"TensorRT disagrees with ONNX Runtime on the same graph: {result.agreement}")
    return {"tensorrt": result.record}


def _tensorrt_llm_engine(
    job: _Job, decoder: dict, llm_dtype: str, plans: dict, work: Path, steps: Steps
) -> dict | None:
    """The TensorRT-LLM decoder engine (llm/) where tensorrt_llm imports and the family has a route;
    -> the manifest's decoder.tensorrt_llm (and its plan record added to `plans`), or None."""
    steps("TensorRT-LLM decoder engine")
    config, family = job.config, job.family
    if not config.tensorrt_llm:
        steps.note("skipped (--no-tensorrt-llm)")
    elif tensorrt_llm_version() is None:
        steps.note(f"tensorrt_llm is not importable: the decoder is the Transformers checkpoint ({TRTLLM_HINT})")
    elif decoder["weights"] != "saved":
        steps.note("the preset's language model has no saved weights: no TensorRT-LLM engine")
    elif family.trtllm_model_class is None:
        steps.note(f"TensorRT-LLM's engine flow has no route for the {family.name} family: no engine")
    elif job.options.llm_stage is not None:
        steps.note(
            "--llm-stage runs in the Transformers decoder only (TensorRT-LLM cannot prune in the LLM): no engine"
        )
    else:
        # the engine runs in llm.dtype: the runtime builds the prompt table in that dtype and
        # TensorRT-LLM rejects a table whose dtype differs from the engine's
        cfg = TrtllmBuildConfig(
            max_batch_size=config.max_batch,
            num_visual_tokens=family.max_rows_per_image(job.apet),  # rows per request, at most
            dtype=llm_dtype,
            model_class=family.trtllm_model_class,
        )
        hf_dir = job.checkpoint if job.checkpoint is not None else work / "hf"
        lm_dir = family.trtllm_checkpoint(hf_dir, work / ".trtllm_hf")  # what the converter reads
        trtllm = build_trtllm(lm_dir, work / "llm", cfg, work)
        shutil.rmtree(work / ".trtllm_hf", ignore_errors=True)
        trtllm["engine_dir"] = "llm"
        plans["tensorrt_llm"] = llm_plan_record(
            work / "llm", dtype=llm_dtype, tensorrt_llm_version=tensorrt_llm_version()
        )
        return trtllm
    return None


def _manifest_fields(
    job: _Job,
    loaded: LoadedModel,
    llm_dtype: str,
    dtypes: dict,
    parts: dict,
    plans: dict,
    decoder: dict,
    trtllm: dict | None,
) -> dict:
    """Everything the manifest records but format/version/created/files (export/manifest.py adds those)."""
    config, family, apet, tokenizer = job.config, job.family, job.apet, loaded.tokenizer
    items = job.items
    return {
        "model": {"id": config.model, "source": job.source, "family": family.name},
        "external_checkpoint": manifest_writer.external_checkpoint(job.checkpoint) if job.checkpoint else None,
        **family.manifest_fields(apet),
        "apet": apet.to_dict() if apet else None,
        **parity.manifest_fields(job.options, config),
        "llm": {
            **family.llm_fields(),
            "dtype": llm_dtype,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else loaded.config.text_config.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        "prompt_template": family.prompt_template,
        "image_token": family.image_token,
        "io": family.io(apet),
        "batch": {"min": 1, "opt": min(config.opt_batch, items), "max": items},
        "precision": {"vision": dtypes["vision_tower"], "compressor": dtypes["compressor"]},
        "processor": family.processor.to_dict(),
        "engines": {"onnx": "vision.onnx", "tensorrt": "vision.plan" if "tensorrt" in plans else None},
        **({"parts": parts} if parts else {}),
        "plans": plans,
        "decoder": {"transformers": decoder, "tensorrt_llm": trtllm},
        "versions": _versions(),
        "build": {
            **{k: v for k, v in asdict(job.config).items() if k not in ("out", "force")},
            "paper_budget": job.paper_line is not None,  # no budget given: the family's paper setting
        },
    }


def _print_summary(job: _Job, data: dict) -> None:
    paper = ", the paper's setting" if job.paper_line else ""
    print(f"\nengine directory {job.writer.out}  ({job.budget} visual tokens per {job.family.item}{paper})")
    if job.options.llm_stage is not None:
        stage = job.options.llm_stage
        print(f"  then ApET after LLM layer {stage.layer}: -> {stage.keep} rows (the Transformers decoder runs it)")
    for rel, entry in data["files"].items():
        if entry["bytes"] >= 1 << 20 or "/" not in rel:
            print(f"  {rel:40s} {entry['bytes'] / 2**20:9.2f} MiB")
    total = sum(e["bytes"] for e in data["files"].values())
    print(f"  {len(data['files'])} files, {total / 2**20:.1f} MiB in all")
