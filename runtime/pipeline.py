"""The request pipeline: images + prompts -> text, with the kept positions and per-stage timings.

    pipe = runtime.load("engines/tiny-llava-t64")
    [result] = pipe.generate("photo.jpg", "What is in the picture?", max_new_tokens=32)
    [result] = pipe.generate(prompts="What happens?", videos="clip.mp4")   # families that take videos

The stages, each behind its own interface: the model family (runtime/families/: images -> the
engine's named inputs -> rows per image, position ids), the vision backend (runtime/backends/:
named inputs -> named outputs), prompt assembly (runtime/prompt.py: each image token expanded to
that image's rows) and the decoder (runtime/decoders/).

Thread safety: `generate` and `encode` hold one lock per pipeline, so calls from several threads run
one after another and give the results serial calls give (the vision execution context and the
decoder's model are not safe to share concurrently). Run one pipeline per device for parallelism.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import checks
from .backends import PartsBackend, VisionBackend, choose_backend, create_backend
from .checkpoint import load_transformers_model
from .decoders import Decoder, SamplingConfig
from .decoders.choice import choose_decoder, create_decoder, llm_stage_refusal
from .families import EngineBatch, RuntimeFamily, VisualRows, family_for
from .images import ImageLike, as_image_list, to_pil
from .manifest import Manifest, load_manifest
from .prompt import AssembledPrompt, PromptAssembler, engine_prompting
from .videos import Video, VideoLike, as_video_list, read_video

log = logging.getLogger("apet.runtime")


@dataclass
class GenerationResult:
    text: str
    ids: list[int]  # generated token ids (eos included when produced)
    # kept rows' indices among the image's (video's) uncompressed rows, in the order the LLM reads
    # them (N -> T); a prompt with several media: each item's, offset by the items before it
    positions: list[int]
    num_patches: int  # N: rows the uncompressed model hands the LLM for this prompt's media
    num_kept: int  # rows handed to the LLM with ApET
    timings: dict[str, float] = field(default_factory=dict)  # ms, for the whole batch of the call
    # with ApET inside the LLM (manifest llm_stage): the positions (as above) of the rows still in the
    # sequence after that stage; None without it
    llm_positions: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Pipeline:
    def __init__(
        self,
        manifest: Manifest,
        family: RuntimeFamily,
        backend: VisionBackend,
        decoder: Decoder,
        tokenizer,
        assembler: PromptAssembler,
        *,
        backend_reason: str = "",
    ):
        self.manifest = manifest
        self.family = family
        self.vision = backend
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.assembler = assembler
        self.backend = backend.name  # which vision backend runs (see backend_reason)
        self.backend_reason = backend_reason
        self._lock = threading.Lock()

    @property
    def num_visual_tokens(self) -> int | None:
        """T, the rows every image hands the LLM; None when they vary per image (LLaVA-NeXT: T per
        crop, `manifest.num_visual_tokens`, but the rows of an image depend on its aspect ratio)."""
        return self.family.fixed_rows

    def _media(self, images, videos) -> list:
        """images and videos -> the family's media items: RGB PIL images, then sampled Videos (a
        `Video` among `images`, already sampled, e.g. by apet serve, stays where it is)."""
        images = as_image_list(images) if images is not None else []
        items = [img if isinstance(img, Video) else to_pil(img, i) for i, img in enumerate(images)]
        if videos is not None:
            frames = self.family.frames_per_video
            if frames is None:
                raise ValueError(f"the {self.family.name} family takes no videos (images only)")
            sampling = self.family.frame_sampling  # the engine's vision.frame_sampling
            items += [read_video(v, frames, i, sampling=sampling) for i, v in enumerate(as_video_list(videos))]
        if not items:
            raise ValueError("empty batch: pass at least one image or video")
        return items

    def preprocess(
        self, images: ImageLike | Sequence[ImageLike] | None = None, *, videos: VideoLike | None = None
    ) -> EngineBatch:
        """images (and videos) -> the engine's named inputs (the checkpoint's own image processor),
        with the time it took; `generate(batch=...)` takes it, and so do the family's patch maps."""
        t0 = time.perf_counter()
        batch = self.family.preprocess(self._media(images, videos))
        batch.preprocess_ms = (time.perf_counter() - t0) * 1e3
        return batch

    def encode(
        self, images: ImageLike | Sequence[ImageLike] | None = None, *, videos: VideoLike | None = None
    ) -> list[VisualRows]:
        """images, then videos -> one VisualRows per item: embeddings [R_i, H] float32, positions [R_i] int64."""
        with self._lock:
            return self.family.encode(self.vision, self.preprocess(images, videos=videos))

    def assemble(self, prompt: str, rows: Sequence[VisualRows], index: int = 0) -> AssembledPrompt:
        """The prompt's ids with each media token expanded to its item's rows, and the family's
        position ids for them (None: plain 1-D positions). `rows` in item order; the result's `rows`
        and `items` are in slot (text) order."""
        a = self.assembler(prompt, [r.num_rows for r in rows], index, [r.media for r in rows])
        ids = self.family.position_ids(a.input_ids, a.image_slots, [rows[i] for i in a.items])
        return a if ids is None else AssembledPrompt(a.input_ids, a.image_slots, a.text, a.rows, ids, a.items)

    def generate(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        prompts: str | Sequence[str] | None = None,
        *,
        videos: VideoLike | Sequence[VideoLike] | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        sampling: SamplingConfig | None = None,
        batch: EngineBatch | None = None,
    ) -> list[GenerationResult]:
        """One image per prompt, or one video per prompt (`videos=`, families that take videos), or
        both; a single item and a single string make a batch of one.

        sampling  a SamplingConfig instead of the six keywords before it (which then stay at their defaults)
        batch     `preprocess(images, videos=videos)` of these same media, made once by a caller that
                  also draws their patch map (apet run --grid / --overlay); its time is the preprocess time"""
        keywords = SamplingConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        if sampling is not None and keywords != SamplingConfig():
            raise ValueError("pass sampling=SamplingConfig(...) or the sampling keywords, not both")
        sampling = sampling or keywords
        if prompts is None:
            raise ValueError("no prompts: pass one prompt per image (or video)")
        image_list = as_image_list(images) if images is not None else []
        video_list = as_video_list(videos) if videos is not None else []
        prompt_list = checks.prompt_list(prompts)
        for what, media in (("image", image_list), ("video", video_list)):
            if media and len(media) != len(prompt_list):
                raise ValueError(f"{len(media)} {what}(s) but {len(prompt_list)} prompt(s): pass one {what} per prompt")
        if not image_list and not video_list:
            raise ValueError("no images or videos: pass one per prompt")
        n = len(prompt_list)  # prompt b's media: image b and/or video b (items b and len(images) + b)
        per_prompt = [[b] * bool(image_list) + [len(image_list) + b] * bool(video_list) for b in range(n)]
        with self._lock:  # the tokenizer too: a fast tokenizer's padding state is not thread-safe
            for i, p in enumerate(prompt_list):  # the text's own errors, before any heavy work
                self.assembler.conversation(p, i, int(bool(image_list)), int(bool(video_list)))
            fixed = self.family.fixed_rows
            if fixed is not None and not video_list:  # rows known up front: lengths checked before any heavy work
                early = [self.assembler(p, fixed, i) for i, p in enumerate(prompt_list)]
                self.decoder.check_lengths(early, sampling.max_new_tokens)
            t0 = time.perf_counter()
            if batch is None:
                batch = self.family.preprocess(self._media(image_list or None, video_list or None))
                t1 = time.perf_counter()
            elif len(batch.items) != len(image_list) + len(video_list):
                raise ValueError(
                    f"batch holds {len(batch.items)} item(s) for {len(image_list) + len(video_list)} media"
                )
            else:  # made by preprocess(): its time counts as this call's
                t0, t1 = t0 - batch.preprocess_ms / 1e3, t0
            rows = self.family.encode(self.vision, batch)
            t2 = time.perf_counter()
            media = [[rows[i] for i in items] for items in per_prompt]
            assembled = [self.assemble(p, media[b], b) for b, p in enumerate(prompt_list)]
            self.decoder.check_lengths(assembled, sampling.max_new_tokens)
            visual = [[media[b][i].embeddings for i in a.items] for b, a in enumerate(assembled)]
            out = self.decoder.generate(assembled, visual, sampling)
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
                positions=_positions([media[b][i] for i in assembled[b].items]),
                num_patches=sum(r.num_patches for r in media[b]),
                num_kept=sum(r.num_rows for r in media[b]),
                timings=dict(timings),
                llm_positions=None
                if out.llm_kept is None
                else _positions([media[b][i] for i in assembled[b].items], out.llm_kept[b]),
            )
            for b, ids in enumerate(out.ids)
        ]


def _positions(rows: Sequence[VisualRows], kept: Sequence[torch.Tensor] | None = None) -> list[int]:
    """Each item's kept positions (with `kept`, those of its rows at kept[i] only: what the LLM
    stage left), offset by the uncompressed rows of the items before it."""
    out, offset = [], 0
    for i, r in enumerate(rows):
        positions = r.positions if kept is None else r.positions[kept[i]]
        out += (positions + offset).tolist()
        offset += r.num_patches
    return out


def _default_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_keep(manifest: Manifest, keep: int | None) -> None:
    """An engine's T is fixed when it is built: asking one built for T=64 for another T is an error,
    never a silent substitution."""
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int (T, visual tokens per image), got {keep!r}")
    t, n = manifest.num_visual_tokens, manifest.num_patches
    if t is None:
        raise ValueError(
            f"{manifest.root}: this engine's rows per image vary with the image (no fixed T); "
            f"keep={keep} cannot be checked against it"
        )
    if keep != t:
        raise ValueError(
            f"{manifest.root}: engine built for T={t} visual tokens (N={'per image' if n is None else n} -> {t}), "
            f"asked for T={keep}; T is fixed at build time: build one with `apet build --keep {keep}`"
            + (" (or --no-apet for all N)" if keep == n else "")
        )


BackendArg = str | VisionBackend | Callable[[Manifest], VisionBackend]
DecoderArg = str | Decoder | Callable[[Manifest], Decoder]


def load(
    engine_dir: str | os.PathLike,
    backend: BackendArg = "auto",
    device: str | None = None,
    *,
    decoder: DecoderArg = "auto",
    verify: bool = True,
    keep: int | None = None,
) -> Pipeline:
    """Verify the engine directory's manifest (every file's size and sha256), then build the
    pipeline: the model family's adapter (by the manifest's model.family), the vision backend and
    the decoder.

    backend  "auto" | "tensorrt" | "onnxruntime" | "torch", or an already-made VisionBackend, or a
             loader `f(manifest) -> VisionBackend` (Polygraphy-style: a value or what makes it)
    decoder  "auto" | "transformers" | "tensorrt_llm" | "tensorrt_llm_api", or a Decoder, or a
             loader `f(manifest) -> Decoder`
    The chosen backend and why are logged (logger "apet.runtime") and kept in `pipeline.backend` /
    `pipeline.backend_reason`. `keep`, when given, is the T the caller expects; an engine built for
    another T is refused."""
    manifest = load_manifest(engine_dir, verify=verify, progress=True)
    check_keep(manifest, keep)
    family = family_for(manifest)
    torch_device = _default_device(device)

    model_cache: dict = {}

    def model_loader():  # one Transformers model shared by the torch backend and the decoder
        if "model" not in model_cache:
            model_cache["model"] = load_transformers_model(
                manifest, device=torch_device, model_class=family.hf_model_class
            )
        return model_cache["model"]

    if isinstance(backend, str):
        choice = choose_backend(manifest, backend)
        choice.log("vision backend")
        reason = choice.reason
        engines = [
            create_backend(choice.name, m, device=device, torch_module=lambda: family.torch_module(model_loader()))
            for m in [manifest, *(manifest.part(p) for p in manifest.parts)]
        ]  # the main engine, and the family's other towers (manifest parts)
        vision = engines[0] if len(engines) == 1 else PartsBackend(manifest, engines)
    else:
        vision = backend if isinstance(backend, VisionBackend) else backend(manifest)
        reason = "given by the caller"

    if isinstance(decoder, str):
        choice = choose_decoder(manifest, decoder, family)
        choice.log("decoder")
        dec = create_decoder(choice.name, manifest, family, model_loader)
    else:
        dec = decoder if isinstance(decoder, Decoder) else decoder(manifest)
        if manifest.llm_stage and not dec.llm_stage:
            raise RuntimeError(llm_stage_refusal(manifest, dec.name))
    tokenizer, assembler = engine_prompting(manifest)
    return Pipeline(manifest, family, vision, dec, tokenizer, assembler, backend_reason=reason)
