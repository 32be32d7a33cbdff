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


def build(config: BuildConfig, *, quiet: bool = False) -> dict:
    """Build the engine directory; returns its manifest."""
    if isinstance(config.max_batch, bool) or not isinstance(config.max_batch, int) or config.max_batch < 1:
        raise ValueError(f"--max-batch must be an integer >= 1, got max_batch={config.max_batch!r}")
    if (
        isinstance(config.opt_batch, bool)
        or not isinstance(config.opt_batch, int)
        or not 1 <= config.opt_batch <= config.max_batch
    ):
        raise ValueError(
            f"--opt-batch must be an integer in 1..max_batch={config.max_batch}, got opt_batch={config.opt_batch!r}"
        )
    config, default_line = with_paper_budget(config)
    if default_line and not quiet:
        print(default_line, flush=True)
    apet = config.apet()  # keep / basis / start / ridge checked here
    options = parity.resolve(config)
    pixels = {k: v for k, v in (("min_pixels", config.min_pixels), ("max_pixels", config.max_pixels)) if v is not None}
    source, family = _resolve(config.model, pixels)
    checkpoint = [Path(config.model).expanduser()] if source == "path" else []
    writer = EngineDirWriter(config.out, force=config.force, inputs=checkpoint)  # --out checked before the build
    # the family's defaults for what the build left unset (seed_blend), then its variant (e.g. the video layout)
    apet = family.apet_config(config.apet(family.apet_defaults))
    try:
        family.check_apet(apet)  # keep <= N, start < N: before any weights are built
    except ValueError as exc:
        if default_line is None:
            raise
        raise ValueError(
            f"no budget given, and the {family.name} family's paper setting does not fit this model ({exc}); "
            "pass --keep / --keep-ratio, or --no-apet"
        ) from exc
    family.configure_frames(config.frame_sampling)  # video families: how the runtime samples frames
    parity.check_family(options, family, apet, config)
    family.start_input = apet is not None and options.random_seed is not None  # the engine takes "start"
    budget = family.budget_text(apet)
    items = family.max_items(apet, config.max_batch)  # engine items per call
    steps = Steps(7, quiet)

    steps(f"loading {config.model} (family {family.name})")
    loaded = _load(config.model, source, family)
    model, hf_config, tokenizer = loaded.model, loaded.config, loaded.tokenizer
    processor = family.processor  # the checkpoint's or preset's, with the build's pixel range
    engine = family.vision_module(model, apet)
    # precision is the graph's (export/precision.py): tower and projector in the build's dtype, the
    # compressor casts to float32 inside; a float16 copy, so that the cast never reaches the model
    # whose weights are saved as the decoder checkpoint below
    engine = (copy.deepcopy(engine).half() if config.fp16 else engine.float()).eval()
    io = family.io(apet)
    output_names = [o["name"] for o in io["outputs"]]

    with writer as work:  # locked; removed again, with the parents it made, if the build fails
        what = "ApET" if apet else "no compression"
        steps(f"exporting vision tower + {what} + projector to ONNX ({budget})")
        onnx_path = export_vision_onnx(
            engine,
            work / "vision.onnx",
            # batch 2 (where the graph takes it): the batch axis stays symbolic
            inputs=family.example_inputs(min(2, items), torch.Generator().manual_seed(0)),
            output_names=output_names,
            dynamic_axes=family.dynamic_axes(apet),
        )
        steps.note("onnx.checker, shape inference and the TensorRT op allowlist: passed")
        if wrong := compressor_not_fp32(onnx_path):
            raise RuntimeError(f"the exported compressor computes outside float32: {', '.join(wrong[:5])}")
        dtypes = part_dtypes(onnx_path)
        steps.note("dtypes: " + ", ".join(f"{part} {dt}" for part, dt in dtypes.items() if dt))

        steps("ONNX Runtime vs PyTorch")
        batches = sorted({1, min(3, items)})
        for c in compare_with_torch(engine, onnx_path, family.example_inputs, batches=batches):
            steps.note(f"batch {c.batch}: {c.agreement}")
            if not c.agreement.passed(reduced_precision=config.fp16):
                raise RuntimeError(f"ONNX Runtime disagrees with PyTorch at batch {c.batch}: {c.agreement}")

        parts = {}  # vision engines beside the main one (export/models/base.py, EnginePart)
        for part in family.extra_parts(model, apet):
            steps.note(f"engine part {part.name!r}: exporting {part.name}.onnx and comparing with PyTorch")
            parts[part.name] = _export_part(part, work, config.fp16, batches)

        steps("saving processor, tokenizer and decoder checkpoint")
        processor.save_pretrained(str(work / "processor"))
        tokenizer.save_pretrained(str(work / "tokenizer"))
        family.save_files(model, work)  # what the family's runtime adapter reads besides the engine
        if source == "preset" and loaded.language_model_saved:
            # a whole checkpoint, as one from the hub: weights, processor and tokenizer (TensorRT-LLM's
            # LLM API loads all three from one directory)
            model.save_pretrained(str(work / "hf"))
            processor.save_pretrained(str(work / "hf"))
            tokenizer.save_pretrained(str(work / "hf"))
            decoder = {"checkpoint": "hf", "weights": "saved"}
        elif source == "preset":
            hf_config.save_pretrained(str(work / "hf"))
            seed = get_preset(config.model).seed
            decoder = {"checkpoint": "hf", "weights": "random-seeded", "seed": seed, "config": "hf/config.json"}
        else:
            decoder = {"checkpoint": None, "weights": "saved"}  # null: the external checkpoint
        del model

        steps("TensorRT engine")
        plan = None
        plans = {}  # engine kind -> what built its plan (tensorrt_build.plan_record)
        if not config.tensorrt:
            steps.note("skipped (--no-tensorrt)")
        elif tensorrt_version() is None:
            steps.note(f"TensorRT is not importable: wrote the ONNX engine only ({TRT_HINT})")
        else:
            g = torch.Generator().manual_seed(1)
            result = build_tensorrt(
                onnx_path,
                work / "vision.plan",
                profile=family.tensorrt_profile(apet, min(config.opt_batch, items), items),
                feeds=[{k: v.numpy() for k, v in family.example_inputs(b, g).items()} for b in batches],
            )
            plan = "vision.plan"
            plans["tensorrt"] = result.record
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

        steps("TensorRT-LLM decoder engine")
        trtllm = None
        llm_dtype = _llm_dtype(hf_config, source, loaded)
        if not config.tensorrt_llm:
            steps.note("skipped (--no-tensorrt-llm)")
        elif tensorrt_llm_version() is None:
            steps.note(f"tensorrt_llm is not importable: the decoder is the Transformers checkpoint ({TRTLLM_HINT})")
        elif decoder["weights"] != "saved":
            steps.note("the preset's language model has no saved weights: no TensorRT-LLM engine")
        elif family.trtllm_model_class is None:
            steps.note(f"TensorRT-LLM's engine flow has no route for the {family.name} family: no engine")
        elif options.llm_stage is not None:
            steps.note(
                "--llm-stage runs in the Transformers decoder only (TensorRT-LLM cannot prune in the LLM): no engine"
            )
        else:
            # the engine runs in llm.dtype: the runtime builds the prompt table in that dtype and
            # TensorRT-LLM rejects a table whose dtype differs from the engine's
            cfg = TrtllmBuildConfig(
                max_batch_size=config.max_batch,
                num_visual_tokens=family.max_rows_per_image(apet),  # rows per request, at most
                dtype=llm_dtype,
                model_class=family.trtllm_model_class,
            )
            hf_dir = checkpoint[0] if source == "path" else work / "hf"
            lm_dir = family.trtllm_checkpoint(hf_dir, work / ".trtllm_hf")  # what the converter reads
            trtllm = build_trtllm(lm_dir, work / "llm", cfg, work)
            shutil.rmtree(work / ".trtllm_hf", ignore_errors=True)
            trtllm["engine_dir"] = "llm"
            plans["tensorrt_llm"] = llm_plan_record(
                work / "llm", dtype=llm_dtype, tensorrt_llm_version=tensorrt_llm_version()
            )

        steps("manifest")
        text = hf_config.text_config
        fields = {
            "model": {"id": config.model, "source": source, "family": family.name},
            "external_checkpoint": manifest_writer.external_checkpoint(checkpoint[0]) if checkpoint else None,
            **family.manifest_fields(apet),
            "apet": apet.to_dict() if apet else None,
            **parity.manifest_fields(options, config),
            "llm": {
                **family.llm_fields(),
                "dtype": llm_dtype,
                "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            },
            "prompt_template": family.prompt_template,
            "image_token": family.image_token,
            "io": io,
            "batch": {"min": 1, "opt": min(config.opt_batch, items), "max": items},
            "precision": {"vision": dtypes["vision_tower"], "compressor": dtypes["compressor"]},
            "processor": processor.to_dict(),
            "engines": {"onnx": "vision.onnx", "tensorrt": plan},
            **({"parts": parts} if parts else {}),
            "plans": plans,
            "decoder": {"transformers": decoder, "tensorrt_llm": trtllm},
            "versions": _versions(),
            "build": {
                **{k: v for k, v in asdict(config).items() if k not in ("out", "force")},
                "paper_budget": default_line is not None,  # no budget given: the family's paper setting
            },
        }
        data = manifest_writer.write_manifest(work, fields)
        steps.done()
        writer.commit()

    if not quiet:
        paper = ", the paper's setting" if default_line else ""
        print(f"\nengine directory {writer.out}  ({budget} visual tokens per {family.item}{paper})")
        if options.llm_stage is not None:
            stage = options.llm_stage
            print(f"  then ApET after LLM layer {stage.layer}: -> {stage.keep} rows (the Transformers decoder runs it)")
        for rel, entry in data["files"].items():
            if entry["bytes"] >= 1 << 20 or "/" not in rel:
                print(f"  {rel:40s} {entry['bytes'] / 2**20:9.2f} MiB")
        total = sum(e["bytes"] for e in data["files"].values())
        print(f"  {len(data['files'])} files, {total / 2**20:.1f} MiB in all")
    return data
