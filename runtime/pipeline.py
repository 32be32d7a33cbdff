"""The request pipeline: images + prompts -> text, with the kept positions and per-stage timings.

    pipe = runtime.load("engines/tiny-llava-t64")
    [result] = pipe.generate("photo.jpg", "What is in the picture?", max_new_tokens=32)

Thread safety: `generate` and `encode` hold one lock per pipeline, so calls from several threads run
one after another and give the results serial calls give (the vision execution context and the
decoder's model are not safe to share concurrently). Run one pipeline per device for parallelism.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import checks
from .backends import VisionBackend, choose_backend, create_backend
from .checkpoint import dtype_named, llm_dtype, load_transformers_model
from .decoders import Decoder, SamplingConfig
from .images import ImageLike, ImagePreprocessor, as_image_list
from .manifest import Manifest, load_manifest
from .prompt import PromptAssembler, engine_prompting

log = logging.getLogger("apet.runtime")
DECODERS = ("auto", "transformers", "tensorrt_llm", "tensorrt_llm_api")


@dataclass
class GenerationResult:
    text: str
    ids: list[int]  # generated token ids (eos included when produced)
    positions: list[int]  # kept patch indices, ascending (N -> T)
    num_patches: int  # N
    num_kept: int  # T
    timings: dict[str, float] = field(default_factory=dict)  # ms, for the whole batch of the call

    def to_dict(self) -> dict:
        return asdict(self)


class Pipeline:
    def __init__(
        self,
        manifest: Manifest,
        preprocessor: ImagePreprocessor,
        backend: VisionBackend,
        decoder: Decoder,
        tokenizer,
        assembler: PromptAssembler,
        *,
        backend_reason: str = "",
    ):
        self.manifest = manifest
        self.preprocessor = preprocessor
        self.vision = backend
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.assembler = assembler
        self.backend = backend.name  # which vision backend runs (see backend_reason)
        self.backend_reason = backend_reason
        self._lock = threading.Lock()

    @property
    def num_visual_tokens(self) -> int:
        return self.manifest.num_visual_tokens

    def encode(self, images: ImageLike | Sequence[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        """images -> (embeddings [B, T, H] float32, positions [B, T] int64)."""
        with self._lock:
            return self.vision.encode(images)

    def generate(
        self,
        images: ImageLike | Sequence[ImageLike],
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[GenerationResult]:
        """One image per prompt; a single image and a single string make a batch of one."""
        sampling = SamplingConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        image_list = as_image_list(images)
        prompt_list = checks.prompt_list(prompts)
        if len(image_list) != len(prompt_list):
            raise ValueError(f"{len(image_list)} image(s) but {len(prompt_list)} prompt(s): pass one image per prompt")
        with self._lock:  # the tokenizer too: a fast tokenizer's padding state is not thread-safe
            assembled = [self.assembler(p, i) for i, p in enumerate(prompt_list)]
            self.decoder.check_lengths(assembled, sampling.max_new_tokens)  # fail before any heavy work
            t0 = time.perf_counter()
            pixel_values = self.vision.preprocess(image_list)
            t1 = time.perf_counter()
            embeddings, positions = self.vision.run(pixel_values)
            t2 = time.perf_counter()
            out = self.decoder.generate(assembled, embeddings, sampling)
            t3 = time.perf_counter()
            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in out.ids]
        timings = {
            "preprocess_ms": (t1 - t0) * 1e3,
            "vision_ms": (t2 - t1) * 1e3,
            "first_token_ms": out.first_token_ms,
            "decode_ms": out.decode_ms,
            "total_ms": (t3 - t0) * 1e3,
            "new_tokens": float(max(len(ids) for ids in out.ids)),
        }
        return [
            GenerationResult(
                text=texts[b],
                ids=list(ids),
                positions=positions[b].tolist(),
                num_patches=self.manifest.num_patches,
                num_kept=self.manifest.num_visual_tokens,
                timings=dict(timings),
            )
            for b, ids in enumerate(out.ids)
        ]


def _default_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _choose_decoder(manifest: Manifest, requested: str) -> str:
    if requested not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {requested!r}")
    if requested != "auto":
        return requested
    if (manifest.data.get("decoder") or {}).get("tensorrt_llm"):
        try:
            import tensorrt_llm  # noqa: F401

            if torch.cuda.is_available():
                return "tensorrt_llm"
        except ImportError:
            pass
        log.warning(
            "decoder auto: the engine directory has a TensorRT-LLM engine but tensorrt_llm or a GPU "
            "is missing; using the Transformers decoder"
        )
    return "transformers"


def _build_decoder(kind: str, manifest: Manifest, model_loader, device: torch.device) -> Decoder:
    llm = manifest.llm
    if kind == "transformers":
        from .decoders import TransformersDecoder

        return TransformersDecoder(
            model_loader(),
            image_token_id=llm["image_token_id"],
            pad_token_id=llm.get("pad_token_id"),
            eos_token_id=llm.get("eos_token_id"),
            max_length=int(llm["max_position_embeddings"]),
        )
    trt_entry = (manifest.data.get("decoder") or {}).get("tensorrt_llm")
    if kind == "tensorrt_llm":
        from .decoders import TensorRTLLMDecoder

        if not trt_entry:
            raise RuntimeError(
                f"{manifest.root}: decoder='tensorrt_llm' but the engine directory has no TensorRT-LLM "
                "engine (decoder.tensorrt_llm is null); build it with tensorrt_llm installed"
            )
        pad = llm.get("pad_token_id")
        return TensorRTLLMDecoder(
            manifest.tensorrt_llm_dir(),
            vocab_size=int(llm["vocab_size"]),
            num_visual_tokens=manifest.num_visual_tokens,
            eos_token_id=int(llm["eos_token_id"]),
            pad_token_id=int(pad if pad is not None else llm["eos_token_id"]),
            dtype=dtype_named(trt_entry["dtype"], f"{manifest.root}: decoder.tensorrt_llm.dtype")
            if trt_entry.get("dtype")
            else llm_dtype(manifest),
        )  # the engine's: the table's
    from .decoders import TensorRTLLMAPIDecoder

    return TensorRTLLMAPIDecoder(
        manifest.transformers_checkpoint(),
        image_token=manifest.image_token,
        max_length=int(llm["max_position_embeddings"]),
    )


def check_keep(manifest: Manifest, keep: int | None) -> None:
    """An engine's T is fixed when it is built: asking one built for T=64 for another T is an error,
    never a silent substitution."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int (T, visual tokens per image), got {keep!r}")
    t, n = manifest.num_visual_tokens, manifest.num_patches
    if keep != t:
        raise ValueError(
            f"{manifest.root}: engine built for T={t} visual tokens (N={n} -> {t}), asked for "
            f"T={keep}; T is fixed at build time: build one with `apet build --keep {keep}`"
            + (" (or --no-apet for all N)" if keep == n else "")
        )


def load(
    engine_dir: str | os.PathLike,
    backend: str = "auto",
    device: str | None = None,
    *,
    decoder: str = "auto",
    verify: bool = True,
    keep: int | None = None,
) -> Pipeline:
    """Verify the engine directory's manifest (every file's size and sha256), then build the
    pipeline: the vision backend ("auto" | "tensorrt" | "onnxruntime" | "torch") and the decoder
    ("auto" | "transformers" | "tensorrt_llm" | "tensorrt_llm_api"). The chosen backend and why
    are logged (logger "apet.runtime") and kept in `pipeline.backend` / `pipeline.backend_reason`.
    `keep`, when given, is the T the caller expects; an engine built for another T is refused."""
    manifest = load_manifest(engine_dir, verify=verify, progress=True)
    check_keep(manifest, keep)
    torch_device = _default_device(device)

    model_cache: dict = {}

    def model_loader():  # one Transformers model shared by the torch backend and the decoder
        if "model" not in model_cache:
            model_cache["model"] = load_transformers_model(manifest, device=torch_device)
        return model_cache["model"]

    preprocessor = ImagePreprocessor(manifest.processor_dir, image_size=int(manifest.vision["image_size"]))
    name, reason = choose_backend(manifest, backend)
    if reason.startswith("auto: fell back"):
        log.warning("vision backend %s (%s)", name, reason)
    else:
        log.info("vision backend %s (%s)", name, reason)
    vision = create_backend(name, manifest, preprocessor, device=device, hf_model_loader=model_loader)

    tokenizer, assembler = engine_prompting(manifest)
    dec = _build_decoder(_choose_decoder(manifest, decoder), manifest, model_loader, torch_device)
    return Pipeline(manifest, preprocessor, vision, dec, tokenizer, assembler, backend_reason=reason)
