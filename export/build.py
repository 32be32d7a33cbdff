"""`apet build`: a checkpoint (local path) or preset -> one engine directory (docs/ENGINE_DIR.md).

    build(BuildConfig(model="tiny-llava", keep=64, basis=10, out="engines/tiny-llava-t64"))

Steps: load the model -> export vision tower + ApET + projector to ONNX (validated: checker,
shape inference, TensorRT op allowlist) -> ONNX Runtime vs PyTorch -> processor, tokenizer and
decoder checkpoint -> TensorRT plan (where tensorrt imports) -> TensorRT-LLM engine (where
tensorrt_llm imports) -> manifest with checksums. The directory is assembled beside the target
and moved into place at the end, so a failed build never leaves half a directory or destroys an
existing one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from apet_trt.apet_ops import ApetConfig

from . import manifest as manifest_writer
from .engine_dir import EngineDirWriter
from .models.llava import LlavaVisionEngine, checkpoint_config, facts, load_checkpoint
from .onnx_export import INPUT, OUTPUTS, compare_with_torch, export_vision_onnx
from .presets import PRESETS, PROMPT_TEMPLATE, build_preset, preset_config
from .tensorrt_build import INSTALL_HINT as TRT_HINT
from .tensorrt_build import build_tensorrt, tensorrt_version
from .trtllm_build import INSTALL_HINT as TRTLLM_HINT
from .trtllm_build import TrtllmBuildConfig, build_trtllm, tensorrt_llm_version


@dataclass
class BuildConfig:
    model: str  # a preset name or a local checkpoint directory
    out: str
    keep: int | None = None  # T; None (or no_apet) builds the uncompressed baseline
    basis: int = 10
    merge: bool = True
    start: int = 0
    ridge: float = 1e-5
    no_apet: bool = False
    max_batch: int = 8
    opt_batch: int = 1
    fp16: bool = False
    force: bool = False  # replace an existing directory
    tensorrt: bool = True  # build the TensorRT plan where tensorrt imports
    tensorrt_llm: bool = True  # build the TensorRT-LLM decoder where tensorrt_llm imports

    def apet(self) -> ApetConfig | None:
        if self.no_apet and self.keep is not None:
            raise ValueError(
                f"--no-apet builds the uncompressed baseline (all N tokens); it cannot take --keep {self.keep}"
            )
        if self.no_apet or self.keep is None:
            return None
        return ApetConfig(keep=self.keep, basis=self.basis, merge=self.merge, ridge=self.ridge, start=self.start)


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


def _resolve(model: str):
    """-> (source, config): which kind of model, and its config, without reading any weights."""
    if model in PRESETS:
        return "preset", preset_config(model)[0]
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"--model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an existing checkpoint directory"
        )
    return "path", checkpoint_config(path)


def _load(model: str, source: str):
    """-> (model, config, image processor, tokenizer, preset or None)."""
    if source == "preset":
        m, config, processor, tokenizer, preset = build_preset(model)
        return m, config, processor, tokenizer, preset
    m, config, processor, tokenizer = load_checkpoint(Path(model).expanduser())
    return m, config, processor, tokenizer, None


def _llm_dtype(config, source: str, preset) -> str:
    if source == "preset":
        return "float32" if preset.materialise_language_model else "float16"
    dtype = next(
        (
            d
            for cfg in (config.text_config, config)
            for attr in ("dtype", "torch_dtype")
            if (d := getattr(cfg, attr, None)) is not None
        ),
        None,
    )
    name = str(dtype).replace("torch.", "") if dtype is not None else "float16"
    return name if name in ("float16", "bfloat16", "float32") else "float16"


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
    apet = config.apet()  # keep / basis / start / ridge checked here
    source, hf_config = _resolve(config.model)
    checkpoint = [Path(config.model).expanduser()] if source == "path" else []
    writer = EngineDirWriter(config.out, force=config.force, inputs=checkpoint)  # --out checked before the build
    f = facts(hf_config)
    if apet is not None:
        apet.validate_for(f.num_patches)  # keep <= N, start < N: before any weights are built
    t = apet.keep if apet else f.num_patches
    steps = Steps(7, quiet)

    steps(f"loading {config.model}")
    model, hf_config, processor, tokenizer, preset = _load(config.model, source)
    engine = LlavaVisionEngine(model, apet).float().eval()  # vision export in float32

    with writer as work:  # locked; removed again, with the parents it made, if the build fails
        what = "ApET" if apet else "no compression"
        steps(f"exporting vision tower + {what} + projector to ONNX (N={f.num_patches} -> T={t})")
        onnx_path = export_vision_onnx(engine, work / "vision.onnx", image_size=f.image_size)
        steps.note("onnx.checker, shape inference and the TensorRT op allowlist: passed")

        steps("ONNX Runtime vs PyTorch")
        batches = sorted({1, min(3, config.max_batch)})
        for c in compare_with_torch(engine, onnx_path, image_size=f.image_size, batches=batches):
            steps.note(
                f"batch {c.batch}: max |diff| {c.max_abs_diff:.2e} ({c.max_rel_diff:.1e} of max), "
                f"positions equal: {c.positions_equal}"
            )
            if not c.positions_equal or c.max_rel_diff > 1e-3:
                raise RuntimeError(f"ONNX Runtime disagrees with PyTorch at batch {c.batch}: {c}")

        steps("saving processor, tokenizer and decoder checkpoint")
        processor.save_pretrained(str(work / "processor"))
        tokenizer.save_pretrained(str(work / "tokenizer"))
        if source == "preset" and preset.materialise_language_model:
            model.save_pretrained(str(work / "hf"))
            decoder = {"checkpoint": "hf", "weights": "saved"}
        elif source == "preset":
            hf_config.save_pretrained(str(work / "hf"))
            decoder = {"checkpoint": "hf", "weights": "random-seeded", "seed": preset.seed, "config": "hf/config.json"}
        else:
            decoder = {"checkpoint": None, "weights": "saved"}  # null: the external checkpoint
        del model

        steps("TensorRT engine")
        plan = None
        if not config.tensorrt:
            steps.note("skipped (--no-tensorrt)")
        elif tensorrt_version() is None:
            steps.note(f"TensorRT is not importable: wrote the ONNX engine only ({TRT_HINT})")
        else:
            result = build_tensorrt(
                onnx_path,
                work / "vision.plan",
                input_name=INPUT,
                image_size=f.image_size,
                max_batch=config.max_batch,
                opt_batch=config.opt_batch,
                fp16=config.fp16,
            )
            plan = "vision.plan"
            steps.note(
                f"saved vision.plan; compressor layers pinned to fp32: {result.fp32_layers}; "
                f"TensorRT vs ONNX Runtime: {'passed' if result.compare_passed else 'FAILED'}"
            )
            if not result.compare_passed:
                raise RuntimeError(
                    "TensorRT outputs differ from ONNX Runtime beyond tolerance (see Polygraphy's report)"
                )

        steps("TensorRT-LLM decoder engine")
        trtllm = None
        llm_dtype = _llm_dtype(hf_config, source, preset)
        if not config.tensorrt_llm:
            steps.note("skipped (--no-tensorrt-llm)")
        elif tensorrt_llm_version() is None:
            steps.note(f"tensorrt_llm is not importable: the decoder is the Transformers checkpoint ({TRTLLM_HINT})")
        elif decoder["weights"] != "saved":
            steps.note("the preset's language model has no saved weights: no TensorRT-LLM engine")
        else:
            # the engine runs in llm.dtype: the runtime builds the prompt table in that dtype and
            # TensorRT-LLM rejects a table whose dtype differs from the engine's
            cfg = TrtllmBuildConfig(max_batch_size=config.max_batch, num_visual_tokens=t, dtype=llm_dtype)
            trtllm = build_trtllm(checkpoint[0] if source == "path" else work / "hf", work / "llm", cfg, work)
            trtllm["engine_dir"] = "llm"

        steps("manifest")
        text = hf_config.text_config
        fields = {
            "model": {"id": config.model, "source": source, "family": "llava"},
            "external_checkpoint": manifest_writer.external_checkpoint(checkpoint[0]) if checkpoint else None,
            "vision": {
                "feature_layer": f.feature_layer,
                "select_strategy": f.select_strategy,
                "image_size": f.image_size,
                "patch_size": f.patch_size,
                "num_patches": f.num_patches,
                "feature_dim": f.feature_dim,
            },
            "apet": apet.to_dict() if apet else None,
            "num_visual_tokens": t,
            "llm": {
                "hidden_size": f.hidden_size,
                "vocab_size": f.vocab_size,
                "image_token_id": f.image_token_id,
                "dtype": llm_dtype,
                "max_position_embeddings": f.max_position_embeddings,
                "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id,
            },
            "prompt_template": PROMPT_TEMPLATE,
            "image_token": "<image>",
            "io": {
                "inputs": [{"name": INPUT, "dtype": "float32", "shape": ["batch", 3, f.image_size, f.image_size]}],
                "outputs": [
                    {"name": OUTPUTS[0], "dtype": "float32", "shape": ["batch", t, f.hidden_size]},
                    {"name": OUTPUTS[1], "dtype": "int64", "shape": ["batch", t]},
                ],
            },
            "batch": {"min": 1, "opt": config.opt_batch, "max": config.max_batch},
            "precision": {"vision": "fp16" if (config.fp16 and plan) else "fp32", "compressor": "fp32"},
            "processor": processor.to_dict(),
            "engines": {"onnx": "vision.onnx", "tensorrt": plan},
            "decoder": {"transformers": decoder, "tensorrt_llm": trtllm},
            "versions": _versions(),
            "build": {k: v for k, v in asdict(config).items() if k not in ("out", "force")},
        }
        data = manifest_writer.write_manifest(work, fields)
        steps.done()
        writer.commit()

    if not quiet:
        print(f"\nengine directory {writer.out}  (N={f.num_patches} -> T={t} visual tokens per image)")
        for rel, entry in data["files"].items():
            if entry["bytes"] >= 1 << 20 or "/" not in rel:
                print(f"  {rel:40s} {entry['bytes'] / 2**20:9.2f} MiB")
        total = sum(e["bytes"] for e in data["files"].values())
        print(f"  {len(data['files'])} files, {total / 2**20:.1f} MiB in all")
    return data
