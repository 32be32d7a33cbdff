"""`apet bench`: what ApET buys, stage by stage, compressed (T tokens) vs uncompressed (N tokens).

    apet bench --model llava-1.5-7b-arch --keep 64             # builds (or reuses) both engine dirs
    apet bench --engine engines/e7b-t64 --baseline engines/e7b-full
    apet bench --engine engines/tiny-t64 --baseline engines/tiny-full --quick

Measured in one process, every comparison interleaved (scripts/timing.py) so that drift of the
machine falls on both sides alike; warm-up, repeats, median and p90; CUDA events on a GPU:

  vision    tower + ApET + projector (T kept) vs tower + projector (all N), per vision backend
            (ONNX Runtime CPU; TensorRT, ONNX Runtime CUDA, torch CUDA where present - the others are
            reported as "not available: <reason>"), on the real image's pixel values;
  op        the ApET op alone: oracle eager vs graph eager vs ONNX Runtime (scripts/bench_ops.py);
  decoder   prefill / time to first token and decode tokens per second at T in {N, 192, 128, 64}
            for a realistic prompt (its text-token count from the engine's tokenizer), and the KV-cache
            bytes each T costs (scripts/bench_decoder.py: the engine's language-model shapes - LLaVA-1.5-7B
            for llava-1.5-7b(-arch) - with seeded random weights; on a CPU a layer-count override, stated);
  request   the whole request through runtime.Pipeline (image file -> preprocess -> vision -> prompt
            assembly -> prefill -> n new tokens) with the benchmark's decoder, compressed vs baseline;
  memory    per call: peak process RSS (sampled) over what the process already held, and the CUDA
            allocator's peak on a GPU; the process's peak RSS over the whole run.

Outputs under --out: bench.json (schema: docs/BENCH.md, "schema_version" SCHEMA_VERSION), bench.md
(the markdown printed on stdout, headline ratios first) and bench.png (latency per stage against T).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import json
import os
import re
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

SCHEMA_VERSION = 1
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = str(ROOT / "assets" / "grace_hopper.jpg")
DEFAULT_PROMPT = "Describe this image in detail."
DEFAULT_TOKENS = (192, 128, 64)  # plus N (from the engine) and the engine's own T
VISION_BACKENDS = ("tensorrt", "onnxruntime_cuda", "torch_cuda", "onnxruntime_cpu")  # preference order
SECTIONS = ("vision", "op", "decoder", "request")


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class BenchConfig:
    engine: str | None = None  # compressed engine directory (ApET, T tokens)
    baseline: str | None = None  # uncompressed engine directory (N tokens); built when missing
    model: str | None = None  # preset or checkpoint path: build both into cache_dir
    keep: int = 64  # T for --model
    basis: int = 10  # k for --model
    fp16: bool = False  # --model: tower and projector in fp16, the ONNX and so the plan (ApET stays fp32)
    cache_dir: str | None = None  # None: <out>/engines
    tokens: list[int] | None = None  # decoder T values; None: N, 192, 128, 64 (+ the engine's T)
    repeats: int | None = None  # None: 10 (2 with quick)
    warmup: int | None = None  # None: 2 (1 with quick)
    batch: int = 1
    decoder_layers: int | None = None  # None: all on a GPU, 2 on a CPU
    new_tokens: int | None = None  # None: 16 (2 with quick)
    text_tokens: int | None = None  # None: counted from the prompt with the engine's tokenizer
    prompt: str = DEFAULT_PROMPT
    image: str = DEFAULT_IMAGE
    backends: list[str] | None = None  # vision backends to try; None: all of VISION_BACKENDS
    request_backend: str = "auto"  # auto: the first available in VISION_BACKENDS order
    device: str = "auto"  # decoder device: auto | cpu | cuda[:i]
    out: str = "bench_out"
    skip_vision: bool = False
    skip_op: bool = False
    skip_decoder: bool = False
    skip_request: bool = False
    quick: bool = False  # smoke run: fewer repeats, 2 new tokens

    def __post_init__(self):
        for name, value in self._defaults().items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _defaults(self) -> dict:
        return (
            {"repeats": 2, "warmup": 1, "new_tokens": 2}
            if self.quick
            else {"repeats": 10, "warmup": 2, "new_tokens": 16}
        )

    def skipped(self, section: str) -> bool:
        return bool(getattr(self, f"skip_{section}"))

    def validate(self) -> None:
        """Everything that can be checked before any engine is opened or built."""
        if (self.engine is None) == (self.model is None):
            raise ValueError(
                "give --engine DIR (optionally with --baseline DIR) or --model MODEL --keep T, "
                "exactly one of --engine / --model"
            )
        if self.baseline is not None and self.engine is None:
            raise ValueError("--baseline needs --engine (the compressed engine directory)")
        for name, low in (("repeats", 1), ("warmup", 0), ("batch", 1), ("new_tokens", 1), ("keep", 1), ("basis", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.decoder_layers is not None and self.decoder_layers < 1:
            raise ValueError(f"--decoder-layers must be >= 1, got {self.decoder_layers}")
        if self.text_tokens is not None and self.text_tokens < 0:
            raise ValueError(f"--text-tokens must be >= 0, got {self.text_tokens}")
        if self.tokens is not None:
            if not self.tokens:
                raise ValueError("--tokens is empty")
            bad = [t for t in self.tokens if t < 1]
            if bad:
                raise ValueError(f"--tokens values must be >= 1, got {bad}")
        unknown = sorted(set(self.backends or ()) - set(VISION_BACKENDS))
        if unknown:
            raise ValueError(f"unknown vision backend(s) {unknown}; choose from {', '.join(VISION_BACKENDS)}")
        if self.request_backend not in ("auto", *VISION_BACKENDS):
            raise ValueError(
                f"--request-backend must be auto or one of {', '.join(VISION_BACKENDS)}, got {self.request_backend!r}"
            )
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {self.device}: no CUDA GPU is visible to torch")
        if all(self.skipped(s) for s in SECTIONS):
            raise ValueError(
                "every section is skipped (--skip-vision --skip-op --skip-decoder --skip-request): nothing to measure"
            )
        if (not self.skip_vision or not self.skip_request) and not Path(self.image).is_file():
            raise FileNotFoundError(f"--image {self.image}: no such file")
        if self.model is not None:
            n = _preset_patches(self.model)
            if n is not None and not self.keep < n:
                raise ValueError(f"--keep {self.keep} must be < N={n} (the patches of {self.model})")

    def check_tokens(self, n: int) -> None:
        bad = [t for t in self.tokens or () if t > n]
        if bad:
            raise ValueError(f"--tokens values must be <= N={n} (the engine's patch count), got {bad}")

    def to_command(self) -> str:
        """The `apet bench` command line that reproduces this configuration."""
        flags = []
        for f in fields(self):
            value, default = getattr(self, f.name), f.default
            default = self._defaults().get(f.name, default)
            if value == default or value is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag)
            elif isinstance(value, list):
                flags.append(f"{flag} {','.join(str(v) for v in value)}")
            else:
                text = str(value)
                flags.append(f"{flag} {json.dumps(text) if re.search(r'[^A-Za-z0-9_./:,=+-]', text) else text}")
        return "apet bench " + " ".join(flags)


def _preset_patches(model: str) -> int | None:
    """N of a preset's engine items (its family's), without building any weights."""
    from apet_trt.export.models import family_class
    from apet_trt.export.presets import PRESETS, preset_config

    if model not in PRESETS:
        return None
    return family_class(PRESETS[model].family)(preset_config(model)[0]).num_patches


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None


def _name_list(text: str | None) -> list[str] | None:
    return None if text is None else [v for v in text.replace(" ", "").split(",") if v]


# ----------------------------------------------------------------------------------------------
# engine directories


@dataclass
class EnginePair:
    compressed: object  # runtime.manifest.Manifest
    baseline: object
    built: dict = field(default_factory=dict)  # variant -> True when this run built it

    @property
    def n(self) -> int:
        return self.compressed.num_patches

    @property
    def t(self) -> int:
        return self.compressed.num_visual_tokens


def _slug(model: str) -> str:
    name = Path(model).name if (os.sep in model or Path(model).exists()) else model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _matches(manifest, model: str, apet: dict | None, fp16: bool) -> bool:
    m = manifest.data["model"]
    same_model = (
        m.get("id") == model
        if m.get("source") == "preset"
        else str(manifest.external_checkpoint) == os.path.realpath(Path(model).expanduser())
    )
    if apet is None:
        same_apet = manifest.apet is None
    else:
        same_apet = manifest.apet is not None and all(manifest.apet.get(k) == v for k, v in apet.items())
    # --fp16 is the graph's precision (vision.onnx and so the plan), not only the plan's
    same_precision = (manifest.data.get("precision", {}).get("vision") == "fp16") == fp16
    from apet_trt.runtime.backends import tensorrt_available

    plan_if_possible = manifest.engine_path("tensorrt") is not None or not tensorrt_available()[0]
    return same_model and same_apet and same_precision and plan_if_possible


def _build_or_reuse(model: str, out: Path, *, keep: int | None, basis: int, fp16: bool) -> tuple[object, bool]:
    """-> (verified manifest, built now?). A directory that verifies and matches is reused."""
    from apet_trt.export.build import BuildConfig, build
    from apet_trt.runtime.manifest import load_manifest

    apet = None if keep is None else {"keep": keep, "basis": basis}
    if (out / "manifest.json").is_file():
        try:
            manifest = load_manifest(out, verify=True)
            if _matches(manifest, model, apet, fp16):
                log(f"reusing verified engine directory {out}")
                return manifest, False
            log(f"{out} was built for another configuration: rebuilding it")
        except Exception as exc:  # noqa: BLE001 - any failure to verify means: rebuild
            log(f"{out} does not verify ({' '.join(str(exc).split())}): rebuilding it")
    log(f"building {out} ({model}, {'T=' + str(keep) if keep else 'no ApET'})")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the report
        build(
            BuildConfig(
                model=model,
                out=str(out),
                keep=keep,
                basis=basis,
                no_apet=keep is None,
                fp16=fp16,
                force=True,
                tensorrt_llm=False,
            )
        )
    return load_manifest(out, verify=True), True


def _model_of(manifest) -> str:
    m = manifest.data["model"]
    return m["id"] if m.get("source") == "preset" else str(manifest.external_checkpoint)


def resolve_engines(cfg: BenchConfig) -> EnginePair:
    """The (compressed, baseline) engine directories: given, or built / reused in the cache. Given
    directories are checked against each other before their files are hashed, so argument errors
    come first."""
    from apet_trt.runtime.manifest import read_manifest, verify_files

    cache = Path(cfg.cache_dir)
    if cfg.model is not None:
        slug = _slug(cfg.model)
        comp, built_c = _build_or_reuse(
            cfg.model, cache / f"{slug}-t{cfg.keep}-k{cfg.basis}", keep=cfg.keep, basis=cfg.basis, fp16=cfg.fp16
        )
        base, built_b = _build_or_reuse(cfg.model, cache / f"{slug}-full", keep=None, basis=cfg.basis, fp16=cfg.fp16)
        pair = EnginePair(comp, base, {"compressed": built_c, "baseline": built_b})
        _check_pair(pair)
        return pair
    comp = read_manifest(cfg.engine)
    if comp.apet is None:
        raise ValueError(
            f"--engine {cfg.engine} has no ApET (T = N = {comp.num_patches}); pass the compressed "
            "engine as --engine and the uncompressed one as --baseline"
        )
    cfg.check_tokens(comp.num_patches)
    if cfg.baseline is not None:
        pair = EnginePair(comp, read_manifest(cfg.baseline), {"compressed": False, "baseline": False})
        _check_pair(pair)
        for m in (pair.compressed, pair.baseline):
            log(f"verifying {m.root}")
            verify_files(m)
        return pair
    log(f"verifying {comp.root}")
    verify_files(comp)
    model = _model_of(comp)
    precision_fp16 = comp.data.get("precision", {}).get("vision") == "fp16"
    base, built_b = _build_or_reuse(
        model, cache / f"{_slug(model)}-full", keep=None, basis=int(comp.apet["basis"]), fp16=precision_fp16
    )
    pair = EnginePair(comp, base, {"compressed": False, "baseline": built_b})
    _check_pair(pair)
    return pair


def _check_pair(pair: EnginePair) -> None:
    c, b = pair.compressed, pair.baseline
    if b.apet is not None or b.num_visual_tokens != b.num_patches:
        raise ValueError(
            f"--baseline {b.root} is compressed (T={b.num_visual_tokens}); it must be built with --no-apet"
        )
    for what, get in (
        ("N (num_patches)", lambda m: m.num_patches),
        ("D (feature_dim)", lambda m: m.vision["feature_dim"]),
        ("image_size", lambda m: m.vision["image_size"]),
        ("llm hidden_size", lambda m: m.llm["hidden_size"]),
        ("model", _model_of),
    ):
        if get(c) != get(b):
            raise ValueError(
                f"the engines differ in {what}: {c.root} has {get(c)!r}, {b.root} has {get(b)!r}; "
                "compare engines of the same model"
            )


def _engine_info(manifest, built: bool) -> dict:
    return {
        "dir": str(manifest.root),
        "model": _model_of(manifest),
        "num_patches": manifest.num_patches,
        "num_visual_tokens": manifest.num_visual_tokens,
        "feature_dim": int(manifest.vision["feature_dim"]),
        "hidden_size": int(manifest.llm["hidden_size"]),
        "apet": manifest.apet,
        "tensorrt_plan": manifest.engine_path("tensorrt") is not None,
        "precision": manifest.data.get("precision"),
        "built_by_bench": built,
    }


def text_config_of(manifest) -> dict:
    """The language model's text config (a dict with model_type) from the engine's checkpoint config."""
    from transformers import AutoConfig

    entry = (manifest.data.get("decoder") or {}).get("transformers") or {}
    if entry.get("config"):
        config_dir = manifest.transformers_config().parent
    elif entry:
        config_dir = manifest.transformers_checkpoint()
    else:
        raise RuntimeError(f"{manifest.root}: the manifest names no Transformers checkpoint config")
    config = AutoConfig.from_pretrained(str(config_dir))
    text = getattr(config, "text_config", None) or config
    return text.to_dict()


# ----------------------------------------------------------------------------------------------
# memory


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # glibc only: give freed heap pages back so RSS starts low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Memory:
    """Per-call memory: the peak RSS of this process while `fn` runs (a thread samples it every
    `interval` seconds), over what the process held just before; the CUDA allocator's peak on a GPU.
    Run untimed: the sampling thread would disturb the timings."""

    def __init__(self, cuda: bool, interval: float = 0.002):
        self.cuda, self.interval = cuda, interval
        self.cuda_peak = 0  # the largest CUDA peak of any measured call

    def measure(self, fn, cuda: bool | None = None) -> dict:
        """cuda: whether fn uses the GPU (default: whether this process has one)."""
        import torch

        cuda = self.cuda if cuda is None else (cuda and self.cuda)
        _trim_heap()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = _rss()
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                stop.wait(self.interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
            if cuda:
                torch.cuda.synchronize()
        finally:
            stop.set()
            thread.join()
        peak_rss = max(peak[0], _rss())
        cuda_peak = int(torch.cuda.max_memory_allocated()) if cuda else None
        if cuda_peak is not None:
            self.cuda_peak = max(self.cuda_peak, cuda_peak)
        return {
            "rss_before_bytes": before,
            "rss_peak_bytes": peak_rss,
            "rss_delta_bytes": peak_rss - before,
            "cuda_peak_allocated_bytes": cuda_peak,
        }


def process_peak_rss() -> int:
    """ru_maxrss: the high-water mark of this process's RSS (kilobytes on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)


# ----------------------------------------------------------------------------------------------
# vision backends


class Unavailable(RuntimeError):
    """A backend this machine cannot run (the message is the reason)."""


def _torch_cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def _vision_model(manifest, device, dtype):
    """The VLM parts TorchVision needs (vision_tower, multi_modal_projector), on device in dtype:
    the saved checkpoint, or - for a preset recorded with seeded random weights - the preset's
    vision parts rebuilt from its seed (the same weights `apet build` exported)."""
    from apet_trt.runtime.checkpoint import load_transformers_model
    from apet_trt.runtime.families import family_class

    entry = (manifest.data.get("decoder") or {}).get("transformers") or {}
    if entry.get("weights", "saved") == "saved":
        model_class = family_class(manifest.family).hf_model_class
        return load_transformers_model(manifest, device=device, model_class=model_class, dtype=dtype)
    if manifest.data["model"].get("source") == "preset":
        try:
            from apet_trt.export.presets import build_preset
        except ImportError as exc:
            raise Unavailable(f"the preset's seeded vision weights need export/ ({exc})") from exc
        parts = build_preset(manifest.data["model"]["id"])[0]
        return parts.to(device=device, dtype=dtype).eval()
    raise Unavailable(f"{manifest.root}: no saved weights for the torch vision path")


def torch_vision_pair(pair: EnginePair, device: str, dtype) -> tuple:
    """(compressed, baseline) VisionBackends running the family's PyTorch eager vision module (tower ->
    feature layer -> ApetCompressor | nothing -> projector), sharing one copy of the weights."""
    import torch

    from apet_trt.runtime.backends import VisionBackend
    from apet_trt.runtime.families import family_for

    class TorchModuleBackend(VisionBackend):
        name = "torch"

        def __init__(self, manifest, module):
            super().__init__(manifest)
            self.module = module

        def _run(self, feeds):
            with torch.inference_mode():
                return self.module(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()})

    model = _vision_model(pair.compressed, torch.device(device), dtype)
    return tuple(
        TorchModuleBackend(m, family_for(m).torch_module(model).to(device).eval())
        for m in (pair.compressed, pair.baseline)
    )


def open_vision_pair(name: str, pair: EnginePair) -> tuple:
    """-> (compressed backend, baseline backend, device, clock); raises Unavailable with the reason."""
    from apet_trt.runtime.backends import create_backend, tensorrt_available

    if name == "onnxruntime_cpu":
        return (
            *(create_backend("onnxruntime", m, device="cpu") for m in (pair.compressed, pair.baseline)),
            "cpu",
            "wall",
        )
    if name == "onnxruntime_cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Unavailable(
                f"ONNX Runtime offers no CUDAExecutionProvider (providers: "
                f"{', '.join(ort.get_available_providers())}; pip install apet-trt[gpu])"
            )
        backends = [create_backend("onnxruntime", m, device="cuda") for m in (pair.compressed, pair.baseline)]
        got = backends[0].session.get_providers()
        if got[0] != "CUDAExecutionProvider":
            raise Unavailable(f"ONNX Runtime could not start its CUDA provider (session providers: {got})")
        return (*backends, "cuda", "cuda_events" if _torch_cuda_ok() else "wall")
    if name == "tensorrt":
        missing = [str(m.root) for m in (pair.compressed, pair.baseline) if m.engine_path("tensorrt") is None]
        if missing:
            ok, why = tensorrt_available()
            extra = "" if ok else f"; {why}"
            raise Unavailable(
                f"no TensorRT plan in {', '.join(missing)} (built where TensorRT was not importable){extra}"
            )
        ok, why = tensorrt_available()
        if not ok:
            raise Unavailable(why)
        return (
            *(create_backend("tensorrt", m, device="cuda") for m in (pair.compressed, pair.baseline)),
            "cuda",
            "cuda_events",
        )
    if name == "torch_cuda":
        import torch

        if not torch.cuda.is_available():
            raise Unavailable("no CUDA GPU is visible to torch")
        return (*torch_vision_pair(pair, "cuda", torch.float16), "cuda", "cuda_events")
    raise ValueError(f"unknown vision backend {name!r}")


class VisionPairs:
    """Opens each backend pair once (the vision and request sections share them)."""

    def __init__(self, pair: EnginePair):
        self.pair = pair
        self._opened: dict[str, tuple] = {}
        self._reasons: dict[str, str] = {}

    def get(self, name: str):
        """-> (compressed, baseline, device, clock) or None (see reason(name))."""
        if name not in self._opened and name not in self._reasons:
            try:
                self._opened[name] = open_vision_pair(name, self.pair)
            except Unavailable as exc:
                self._reasons[name] = f"not available: {exc}"
            except Exception as exc:  # noqa: BLE001 - a backend that should work but fails is reported
                self._reasons[name] = f"failed to open: {type(exc).__name__}: {' '.join(str(exc).split())}"
                log(f"vision backend {name}: {self._reasons[name]}")
        return self._opened.get(name)

    def reason(self, name: str) -> str | None:
        return self._reasons.get(name)


# ----------------------------------------------------------------------------------------------
# sections


def _ratio(num: dict | None, den: dict | None) -> float | None:
    if not num or not den:
        return None
    return num["median_s"] / den["median_s"]


def bench_vision(cfg: BenchConfig, pair: EnginePair, pairs: VisionPairs, batches: dict, memory: Memory) -> dict:
    """batches: {"with_apet": EngineBatch, "without_apet": EngineBatch}, each engine's named inputs
    for the same images (from each engine's own family adapter)."""
    import torch

    from apet_trt.runtime.families import family_for
    from apet_trt.scripts.timing import measure_interleaved

    entries, positions = [], {}
    comp_family, base_family = family_for(pair.compressed), family_for(pair.baseline)
    for name in [b for b in VISION_BACKENDS if b in (cfg.backends or VISION_BACKENDS)]:
        entry = {
            "name": name,
            "available": False,
            "reason": None,
            "device": None,
            "clock": None,
            "timings": None,
            "ratio_apet_over_no_apet": None,
            "memory": None,
            "positions_equal_onnxruntime_cpu": None,
        }
        entries.append(entry)
        opened = pairs.get(name)
        if opened is None:
            entry["reason"] = pairs.reason(name)
            log(f"vision {name}: {entry['reason']}")
            continue
        comp, base, device, clock = opened
        entry.update(available=True, device=device, clock=clock)
        log(f"vision {name}: T={pair.t} vs N={pair.n}, batch {cfg.batch}")
        try:
            timings = measure_interleaved(
                {
                    "with_apet": lambda: comp_family.encode(comp, batches["with_apet"]),
                    "without_apet": lambda: base_family.encode(base, batches["without_apet"]),
                },
                repeats=cfg.repeats,
                warmup=cfg.warmup,
                cuda_events=clock == "cuda_events",
                desc=f"vision {name}",
            )
            on_cuda = device == "cuda" and _torch_cuda_ok()
            # the untimed memory pass also keeps the compressed engine's kept positions
            entry["memory"] = {
                "with_apet": memory.measure(
                    lambda: positions.__setitem__(
                        name, torch.cat([r.positions for r in comp_family.encode(comp, batches["with_apet"])])
                    ),
                    cuda=on_cuda,
                ),
                "without_apet": memory.measure(lambda: base_family.encode(base, batches["without_apet"]), cuda=on_cuda),
            }
        except Exception as exc:  # noqa: BLE001 - keep the other backends' results
            entry.update(available=False, reason=f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
            log(f"vision {name}: {entry['reason']}")
            continue
        entry["timings"] = timings
        entry["ratio_apet_over_no_apet"] = _ratio(timings["with_apet"], timings["without_apet"])
    # kept positions of every backend against ONNX Runtime CPU's (fp16 backends may differ: recorded, not asserted)
    if "onnxruntime_cpu" in positions:
        for entry in entries:
            if entry["available"] and entry["name"] in positions:
                entry["positions_equal_onnxruntime_cpu"] = bool(
                    torch.equal(positions[entry["name"]], positions["onnxruntime_cpu"])
                )
    return {"status": "ok", "batch": cfg.batch, "image": cfg.image, "T": pair.t, "N": pair.n, "backends": entries}


def bench_op(cfg: BenchConfig, pair: EnginePair, out_dir: Path) -> dict:
    import tempfile

    from apet_trt.apet_ops import ApetConfig, export_compressor_onnx
    from apet_trt.scripts.bench_ops import measure_op

    apet = ApetConfig.from_dict(pair.compressed.apet)
    n, d = pair.n, int(pair.compressed.vision["feature_dim"])
    log(f"op: N={n} D={d} T={apet.keep} k={apet.basis}, batch {cfg.batch}")
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        path = export_compressor_onnx(apet, Path(tmp) / "apet.onnx", num_tokens=n, dim=d, max_batch=max(8, cfg.batch))
        candidates = measure_op(
            apet, tokens=n, dim=d, batch=cfg.batch, repeats=cfg.repeats, warmup=cfg.warmup, onnx_path=path, desc="op"
        )
    return {
        "status": "ok",
        "batch": cfg.batch,
        "N": n,
        "D": d,
        "apet": apet.to_dict(),
        "input": "random normal features",
        "candidates": candidates,
    }


def bench_decoder_section(cfg: BenchConfig, dcfg, model, tokens: list[int], n: int, memory: Memory) -> dict:
    from apet_trt.scripts.bench_decoder import DecoderStep, kv_cache_bytes, kv_dim, resolve, shape_of
    from apet_trt.scripts.timing import measure_interleaved

    device, dtype, layers = resolve(dcfg)
    shape = shape_of(dcfg)
    clock = "cuda_events" if device.startswith("cuda") else "wall"
    steps = {
        t: DecoderStep(model, dcfg.text_tokens + t, dcfg.new_tokens, device, dtype, batch=dcfg.batch) for t in tokens
    }
    log(f"decoder: prefill at T in {tokens} ({layers} of {shape['num_hidden_layers']} layers, {device})")
    prefill = measure_interleaved(
        {t: s.prefill for t, s in steps.items()},
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        cuda_events=clock == "cuda_events",
        desc="prefill",
    )
    mem = {t: memory.measure(s.prefill, cuda=device.startswith("cuda")) for t, s in steps.items()}
    kv_measured = {t: s.prepare_decode() for t, s in steps.items()}
    log(f"decoder: decode {dcfg.new_tokens} tokens at T in {tokens}")
    decode = measure_interleaved(
        {t: s.decode for t, s in steps.items()},
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        cuda_events=clock == "cuda_events",
        desc="decode",
    )
    for s in steps.values():
        s.release()
    full_layers, width = int(shape["num_hidden_layers"]), kv_dim(shape)
    points = []
    for t in tokens:
        context = dcfg.text_tokens + t
        per_token = decode[t]["median_s"] / dcfg.new_tokens
        points.append(
            {
                "T": t,
                "context": context,
                "prefill": prefill[t],
                "prefill_ratio_vs_N": _ratio(prefill[t], prefill[n]),
                "decode": decode[t],
                "decode_s_per_token": per_token,
                "decode_tokens_per_s": dcfg.batch / per_token,
                "kv_cache_bytes_full_model": kv_cache_bytes(context, full_layers, width, 2, dcfg.batch),
                "kv_cache_bytes_at_end_full_model": kv_cache_bytes(
                    context + dcfg.new_tokens, full_layers, width, 2, dcfg.batch
                ),
                "kv_cache_bytes_measured": kv_measured[t],
                "memory_prefill": mem[t],
            }
        )
    return {
        "status": "ok",
        "clock": clock,
        "model": decoder_model_info(dcfg),
        "weights": "seeded random (shapes matter for timing, values do not)",
        "kv_cache_dtype_full_model": "float16",
        "points": points,
    }


def decoder_model_info(dcfg) -> dict:
    """The decoder's description in the report: shapes, layers run of all, dtype, device."""
    from apet_trt.scripts.bench_decoder import describe

    return {k: v for k, v in describe(dcfg).items() if k not in ("layers", "text_tokens", "new_tokens", "batch")}


def _make_decoder(model, manifest, text_shape: dict):
    from apet_trt.runtime.decoders import TransformersDecoder

    llm = manifest.llm
    return TransformersDecoder(
        model,
        image_token_id=int(llm["image_token_id"]),
        pad_token_id=llm.get("pad_token_id"),
        eos_token_id=None,  # never stop early: every request makes exactly n tokens
        max_length=int(text_shape.get("max_position_embeddings") or llm["max_position_embeddings"]),
    )


def _pipeline(manifest, backend, decoder):
    """runtime.load on an engine directory already verified, with the benchmark's backend and decoder."""
    from apet_trt import runtime

    return runtime.load(manifest.root, backend=backend, decoder=decoder, verify=False)


def count_text_tokens(manifest, prompt: str) -> int:
    """Prompt tokens that are not visual slots, with the engine's tokenizer and conversation format."""
    from apet_trt.runtime.prompt import engine_prompting

    _, assembler = engine_prompting(manifest)
    return int(assembler(prompt, manifest.num_visual_tokens).input_ids.numel()) - manifest.num_visual_tokens


def bench_request(
    cfg: BenchConfig, pair: EnginePair, pairs: VisionPairs, model, dcfg, text_shape: dict, device: str, memory: Memory
) -> dict:
    from apet_trt.scripts.timing import measure_interleaved

    order = [cfg.request_backend] if cfg.request_backend != "auto" else list(VISION_BACKENDS)
    chosen = next((name for name in order if pairs.get(name) is not None), None)
    if chosen is None:
        raise RuntimeError(
            "no vision backend could be opened for the request: " + "; ".join(f"{n}: {pairs.reason(n)}" for n in order)
        )
    comp, base, _, _ = pairs.get(chosen)
    pipes = {
        "compressed": _pipeline(pair.compressed, comp, _make_decoder(model, pair.compressed, text_shape)),
        "baseline": _pipeline(pair.baseline, base, _make_decoder(model, pair.baseline, text_shape)),
    }
    images, prompts = [cfg.image] * cfg.batch, [cfg.prompt] * cfg.batch
    stage_log: dict[str, list[dict]] = {k: [] for k in pipes}

    def call(variant):
        def run():
            [r, *_] = pipes[variant].generate(images, prompts, max_new_tokens=cfg.new_tokens)
            stage_log[variant].append(r.timings)

        return run

    sync = None
    if device.startswith("cuda") or chosen != "onnxruntime_cpu":
        import torch

        sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    log(f"request: {chosen} vision + decoder, T={pair.t} vs N={pair.n}, {cfg.new_tokens} new tokens")
    timings = measure_interleaved(
        {k: call(k) for k in pipes}, repeats=cfg.repeats, warmup=cfg.warmup, sync=sync, desc="request"
    )
    on_cuda = sync is not None
    variants = {}
    for k, pipe in pipes.items():
        runs = stage_log[k][cfg.warmup : cfg.warmup + cfg.repeats]  # the timed calls only
        med = {
            name: _median([r[f"{name}_ms"] / 1e3 for r in runs])
            for name in ("preprocess", "vision", "first_token", "decode", "total")
        }
        ttft = _median([(r["preprocess_ms"] + r["vision_ms"] + r["first_token_ms"]) / 1e3 for r in runs])
        variants[k] = {
            "engine": str(pipe.manifest.root),
            "T": pipe.num_visual_tokens,
            "prompt_tokens": int(pipe.assembler(cfg.prompt, pipe.num_visual_tokens).input_ids.numel()),
            "timing": timings[k],
            "stages_median_s": {
                "preprocess": med["preprocess"],
                "vision": med["vision"],
                "prefill": med["first_token"],
                "decode": med["decode"],
                "ttft": ttft,
                "total": med["total"],
            },
            "memory": memory.measure(call(k), cuda=on_cuda),
        }
    c, b = variants["compressed"], variants["baseline"]
    return {
        "status": "ok",
        "vision_backend": chosen,
        "clock": "wall" + (" + cuda synchronize" if on_cuda else ""),
        "image": cfg.image,
        "prompt": cfg.prompt,
        "batch": cfg.batch,
        "new_tokens": cfg.new_tokens,
        "decoder_model": decoder_model_info(dcfg),
        "variants": variants,
        "ratio_compressed_over_baseline": _ratio(c["timing"], b["timing"]),
        "ttft_ratio_compressed_over_baseline": c["stages_median_s"]["ttft"] / b["stages_median_s"]["ttft"],
    }


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


# ----------------------------------------------------------------------------------------------
# headline and driver


def headline(report: dict) -> dict:
    """The ratios the benchmark exists for (compressed / uncompressed; < 1 is faster or smaller),
    each with the medians it was computed from. null where its section was skipped or failed."""
    pair_t, pair_n = (
        report["engines"]["compressed"]["num_visual_tokens"],
        report["engines"]["compressed"]["num_patches"],
    )
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
            out["vision_apet_over_no_apet"] = {
                "value": t["with_apet"]["median_s"] / t["without_apet"]["median_s"],
                "backend": name,
                "T": pair_t,
                "N": pair_n,
                "numerator_median_s": t["with_apet"]["median_s"],
                "denominator_median_s": t["without_apet"]["median_s"],
            }
    decoder = report["decoder"]
    if decoder.get("status") == "ok":
        points = {p["T"]: p for p in decoder["points"]}
        if pair_t in points and pair_n in points:
            num, den = points[pair_t], points[pair_n]
            out["ttft_T_over_N"] = {
                "value": num["prefill"]["median_s"] / den["prefill"]["median_s"],
                "T": pair_t,
                "N": pair_n,
                "numerator_median_s": num["prefill"]["median_s"],
                "denominator_median_s": den["prefill"]["median_s"],
            }
            out["kv_cache_bytes_T_over_N"] = {
                "value": num["kv_cache_bytes_full_model"] / den["kv_cache_bytes_full_model"],
                "T": pair_t,
                "N": pair_n,
                "numerator_bytes": num["kv_cache_bytes_full_model"],
                "denominator_bytes": den["kv_cache_bytes_full_model"],
            }
    request = report["request"]
    if request.get("status") == "ok":
        c, b = request["variants"]["compressed"], request["variants"]["baseline"]
        out["request_compressed_over_baseline"] = {
            "value": c["timing"]["median_s"] / b["timing"]["median_s"],
            "backend": request["vision_backend"],
            "T": c["T"],
            "N": b["T"],
            "numerator_median_s": c["timing"]["median_s"],
            "denominator_median_s": b["timing"]["median_s"],
        }
    return out


def _machine() -> dict:
    import importlib.metadata as md

    import onnxruntime as ort
    import torch

    from apet_trt.runtime.backends import tensorrt_available
    from apet_trt.scripts.timing import machine_info

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    trt_ok, trt_why = tensorrt_available()
    info = machine_info()
    info.update(
        {
            "cuda_available": bool(torch.cuda.is_available()),
            "onnxruntime": ort.__version__,
            "onnxruntime_providers": ort.get_available_providers(),
            "transformers": version("transformers"),
            "tensorrt": version("tensorrt"),
            "tensorrt_usable": trt_ok,
            "tensorrt_reason": None if trt_ok else trt_why,
            "load_average_start": list(os.getloadavg()),
            "load_average_end": None,
        }
    )
    return info


def run_bench(cfg: BenchConfig) -> dict:
    """Resolve engines, measure every section that is not skipped, write bench.json / .md / .png.
    -> the report (the JSON object)."""
    import torch

    from apet_trt.runtime.families import family_for
    from apet_trt.runtime.images import to_pil
    from apet_trt.scripts.bench_decoder import DecoderBenchConfig, build_decoder, resolve, shape_of

    cfg.validate()
    command = cfg.to_command()  # as given, before defaults are resolved
    out_dir = Path(cfg.out)
    cfg.cache_dir = cfg.cache_dir or str(out_dir / "engines")
    started = time.perf_counter()
    machine = _machine()
    pair = resolve_engines(cfg)
    cfg.check_tokens(pair.n)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = sorted(set(cfg.tokens or (pair.n, *DEFAULT_TOKENS)) | {pair.n, pair.t}, reverse=True)
    tokens = [t for t in tokens if t <= pair.n]
    cfg.tokens = tokens

    report: dict = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "config": None,
        "machine": machine,
        "engines": {
            "compressed": _engine_info(pair.compressed, pair.built.get("compressed", False)),
            "baseline": _engine_info(pair.baseline, pair.built.get("baseline", False)),
        },
        "headline": None,
        **{s: {"status": f"skipped: --skip-{s}"} for s in SECTIONS},
        "memory": None,
        "duration_s": None,
        "outputs": {
            "json": str(out_dir / "bench.json"),
            "markdown": str(out_dir / "bench.md"),
            "plot": str(out_dir / "bench.png"),
        },
    }
    memory = Memory(cuda=torch.cuda.is_available())
    pairs = VisionPairs(pair)

    def section(name, fn):
        if cfg.skipped(name):
            return
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - the other sections still report; exit status says it failed
            if os.environ.get("APET_DEBUG"):
                raise
            report[name] = {"status": f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}"}
            log(f"{name}: {report[name]['status']}")

    needs_decoder = not (cfg.skip_decoder and cfg.skip_request)
    if needs_decoder:  # resolved (and its arguments checked) before anything is measured
        text_shape = text_config_of(pair.compressed)
        text_tokens = cfg.text_tokens if cfg.text_tokens is not None else count_text_tokens(pair.compressed, cfg.prompt)
        dcfg = DecoderBenchConfig(
            layers=cfg.decoder_layers,
            text_tokens=text_tokens,
            new_tokens=cfg.new_tokens,
            device=cfg.device,
            batch=cfg.batch,
            shape=text_shape,
        )
        device, dtype, layers = resolve(dcfg)

    if not cfg.skip_vision:
        images = [to_pil(cfg.image)] * cfg.batch
        batches = {
            "with_apet": family_for(pair.compressed).preprocess(images),
            "without_apet": family_for(pair.baseline).preprocess(images),
        }
        section("vision", lambda: bench_vision(cfg, pair, pairs, batches, memory))
    section("op", lambda: bench_op(cfg, pair, out_dir))

    if needs_decoder:
        log(
            f"decoder model: {shape_of(dcfg).get('model_type')} hidden {text_shape['hidden_size']}, "
            f"{layers} of {text_shape['num_hidden_layers']} layers, {str(dtype).replace('torch.', '')} on {device} "
            "(seeded random weights)"
        )
        model = build_decoder(layers, device, dtype, shape=text_shape)
        section(
            "decoder",
            lambda: {
                **bench_decoder_section(cfg, dcfg, model, tokens, pair.n, memory),
                "text_tokens": text_tokens,
                "text_tokens_source": "--text-tokens"
                if cfg.text_tokens is not None
                else "the prompt, tokenized by the engine's tokenizer",
                "prompt": cfg.prompt,
                "new_tokens": cfg.new_tokens,
                "batch": cfg.batch,
            },
        )
        section("request", lambda: bench_request(cfg, pair, pairs, model, dcfg, text_shape, device, memory))

    report["config"] = asdict(cfg)
    report["headline"] = headline(report)
    report["memory"] = {
        "process_peak_rss_bytes": process_peak_rss(),
        "cuda_peak_allocated_bytes": (
            max(memory.cuda_peak, int(torch.cuda.max_memory_allocated())) if torch.cuda.is_available() else None
        ),
    }
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["duration_s"] = time.perf_counter() - started

    from apet_trt.scripts.bench_report import plot, render_markdown

    markdown = render_markdown(report)
    Path(report["outputs"]["json"]).write_text(json.dumps(report, indent=2) + "\n")
    Path(report["outputs"]["markdown"]).write_text(markdown)
    plot(report, Path(report["outputs"]["plot"]))
    print(markdown)
    return report


# ----------------------------------------------------------------------------------------------
# CLI


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="latency per stage, compressed vs uncompressed (JSON, markdown, plot)",
        description="Measure, interleaved in one process, the vision stage with and without ApET per "
        "backend, the ApET op alone, the decoder's prefill/TTFT and decode at several T "
        "with the KV-cache bytes, and the whole request; writes bench.json (schema: "
        "docs/BENCH.md), bench.md and bench.png under --out.",
    )
    src = p.add_argument_group("engines (give --engine, or --model to build both)")
    src.add_argument("--engine", help="compressed engine directory (apet build --keep T)")
    src.add_argument(
        "--baseline",
        help="uncompressed engine directory (apet build --no-apet); built into the "
        "cache from the engine's model when omitted",
    )
    src.add_argument("--model", help="preset or checkpoint path: build (or reuse) both engine dirs in --cache-dir")
    src.add_argument("--keep", type=int, default=64, help="T for --model (default 64)")
    src.add_argument("--basis", type=int, default=10, help="k for --model (default 10)")
    src.add_argument("--fp16", action="store_true", help="--model: tower and projector in fp16 (ONNX and plan)")
    src.add_argument("--cache-dir", default=None, help="where --model builds engine dirs (default OUT/engines)")
    m = p.add_argument_group("measurement")
    m.add_argument(
        "--tokens",
        default=None,
        help="decoder T values, comma-separated (default N,192,128,64; N and the engine's T are always included)",
    )
    m.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 10; --quick 2)")
    m.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick 1)")
    m.add_argument("--batch", type=int, default=1, help="images (and requests) per call (default 1)")
    m.add_argument(
        "--decoder-layers",
        type=int,
        default=None,
        help="decoder layers to run (default: all on a GPU, 2 on a CPU; stated in the output)",
    )
    m.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated per request / decode run (default 16; --quick 2)"
    )
    m.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="non-visual prompt tokens for the decoder section (default: counted from --prompt)",
    )
    m.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"request prompt (default {DEFAULT_PROMPT!r})")
    m.add_argument("--image", default=DEFAULT_IMAGE, help="request image (default assets/grace_hopper.jpg)")
    m.add_argument(
        "--backends",
        default=None,
        help=f"vision backends to try, comma-separated (default all: {','.join(VISION_BACKENDS)})",
    )
    m.add_argument(
        "--request-backend",
        default="auto",
        help="vision backend of the whole-request section (default auto: the first available of "
        f"{','.join(VISION_BACKENDS)})",
    )
    m.add_argument("--device", default="auto", help="decoder device: auto, cpu, cuda (default auto)")
    m.add_argument("--quick", action="store_true", help="smoke run: 2 repeats, 1 warm-up, 2 new tokens")
    for s in SECTIONS:
        m.add_argument(f"--skip-{s}", action="store_true", help=f"skip the {s} section")
    p.add_argument("--out", default="bench_out", help="output directory for bench.json, bench.md, bench.png")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        engine=args.engine,
        baseline=args.baseline,
        model=args.model,
        keep=args.keep,
        basis=args.basis,
        fp16=args.fp16,
        cache_dir=args.cache_dir,
        tokens=_int_list(args.tokens, "--tokens"),
        repeats=args.repeats,
        warmup=args.warmup,
        batch=args.batch,
        decoder_layers=args.decoder_layers,
        new_tokens=args.new_tokens,
        text_tokens=args.text_tokens,
        prompt=args.prompt,
        image=args.image,
        backends=_name_list(args.backends),
        request_backend=args.request_backend,
        device=args.device,
        out=args.out,
        skip_vision=args.skip_vision,
        skip_op=args.skip_op,
        skip_decoder=args.skip_decoder,
        skip_request=args.skip_request,
        quick=args.quick,
    )


def run(args: argparse.Namespace) -> int:
    report = run_bench(config_from_args(args))
    failed = [s for s in SECTIONS if str(report[s].get("status", "")).startswith("failed")]
    if failed:
        log(f"section(s) failed: {', '.join(failed)} (see 'status' in {report['outputs']['json']})")
        return 1
    return 0
