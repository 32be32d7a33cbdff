"""`apet bench` options: the configuration object, its defaults, and every check that needs no engine
directory (the checks that need one - T values against the medium's rows, the decoder's layer count -
run once the engines are resolved, still before anything is measured)."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path

SCHEMA_VERSION = 3  # of bench.json (docs/BENCH.md)
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_IMAGE = str(ROOT / "assets" / "grace_hopper.jpg")
DEFAULT_PROMPT = "Describe this image in detail."
DEFAULT_TOKENS = (192, 128, 64)  # decoder T values, plus N and T of the bench medium
VISION_BACKENDS = ("tensorrt", "onnxruntime_cuda", "torch_cuda", "onnxruntime_cpu")  # preference order
SECTIONS = ("vision", "op", "decoder", "request")


def log(msg: str) -> None:
    """Progress on stderr: stdout carries only the report."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


@dataclass
class BenchConfig:
    engine: str | None = None  # compressed engine directory (ApET)
    baseline: str | None = None  # uncompressed engine directory; built when missing
    model: str | None = None  # preset or checkpoint path: build both into cache_dir
    keep: int = 64  # T per engine item for --model
    keep_ratio: float | None = None  # --model: T = floor(R * N) per image instead of --keep (Qwen2.5-VL's budget)
    budget: int | None = None  # --model: the compressed engine is apet build --budget B (--keep is then unused)
    basis: int = 10  # k for --model
    fp16: bool = False  # --model: tower and projector in fp16, the ONNX and so the plan (ApET stays fp32)
    cache_dir: str | None = None  # None: <out>/engines
    tokens: list[int] | None = None  # decoder T values; None: N, 192, 128, 64 (+ the medium's T)
    repeats: int | None = None  # None: 10 (2 with quick)
    warmup: int | None = None  # None: 2 (1 with quick)
    batch: int = 1
    decoder_layers: int | None = None  # None: all on a GPU, 2 on a CPU
    new_tokens: int | None = None  # None: 16 (2 with quick)
    text_tokens: int | None = None  # None: the prompt's own, with the engine's tokenizer
    prompt: str = DEFAULT_PROMPT
    image: str = DEFAULT_IMAGE  # the bench medium: this image ...
    video: str | None = None  # ... or this video (families that take videos)
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

    @property
    def media(self) -> tuple[str, str]:
        """(kind, path) of the bench medium: the video when one is given, else the image."""
        return ("video", self.video) if self.video is not None else ("image", self.image)

    @property
    def needs_rows(self) -> bool:
        """Whether a section runs that needs the rows the bench medium gets (all but the op)."""
        return not (self.skip_vision and self.skip_decoder and self.skip_request)

    @property
    def needs_decoder(self) -> bool:
        return not (self.skip_decoder and self.skip_request)

    def validate(self) -> None:
        """Everything that can be checked before any engine is opened or built."""
        if (self.engine is None) == (self.model is None):
            raise ValueError(
                "give --engine DIR (optionally with --baseline DIR) or --model MODEL --keep T, "
                "exactly one of --engine / --model"
            )
        if self.baseline is not None and self.engine is None:
            raise ValueError("--baseline needs --engine (the compressed engine directory)")
        if self.budget is not None:
            from apet_trt.export.parity import OFFICIAL_BUDGETS

            if self.model is None:
                raise ValueError("--budget builds the compressed engine: give it with --model (or pass --engine DIR)")
            if self.budget not in OFFICIAL_BUDGETS:
                raise ValueError(f"--budget must be one of {sorted(OFFICIAL_BUDGETS)}, got {self.budget!r}")
        if self.keep_ratio is not None:
            if self.model is None:
                raise ValueError(
                    "--keep-ratio builds the compressed engine: give it with --model (or pass --engine DIR)"
                )
            if self.budget is not None:
                raise ValueError("give one of --keep-ratio and --budget")
            r = self.keep_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r < 1.0:
                raise ValueError(f"--keep-ratio must be a number in (0, 1), got {r!r}")
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
        kind, path = self.media
        if self.needs_rows and not Path(path).is_file():
            raise FileNotFoundError(f"--{kind} {path}: no such file")
        if self.model is not None and self.keep_ratio is None and self.budget is None:
            n = _preset_patches(self.model)
            if n is not None and not self.keep < n:
                raise ValueError(f"--keep {self.keep} must be < N={n} (the tokens per engine item of {self.model})")

    def check_tokens(self, n: int) -> None:
        bad = [t for t in self.tokens or () if t > n]
        if bad:
            raise ValueError(
                f"--tokens values must be <= N={n} (the rows the {self.media[0]} gets from the uncompressed engine), "
                f"got {bad}"
            )

    def vision_backends(self) -> list[str]:
        """The vision backends to try, in preference order."""
        return [b for b in VISION_BACKENDS if b in (self.backends or VISION_BACKENDS)]

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
    """N of a preset's engine items (its family's), without building any weights; None for a path
    (`apet build` checks a checkpoint's N itself, before it builds any weights)."""
    from apet_trt.export.models import family_class
    from apet_trt.export.presets import PRESETS, preset_config

    if model not in PRESETS:
        return None
    config, processor = preset_config(model)[:2]
    return family_class(PRESETS[model].family)(config, processor).num_patches


def int_list(text: str | None, flag: str) -> list[int] | None:
    """ "576,128,64" -> [576, 128, 64]; None stays None."""
    if text is None:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None


def name_list(text: str | None) -> list[str] | None:
    return None if text is None else [v for v in text.replace(" ", "").split(",") if v]
