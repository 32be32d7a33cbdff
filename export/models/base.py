"""What a model family tells `apet build`: how to load it (a local checkpoint, or a preset built from
a config with seeded random weights), its vision engine as a PyTorch module with named inputs and
outputs, example inputs and dynamic axes to export it with, and the manifest fields the runtime
adapter of the same family (runtime/families/<family>.py) reads.

One family, one subclass, one file (export/models/<family>.py), listed in export/models/__init__.py.
export/build.py speaks only this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apet_trt.apet_ops import ApetConfig


@dataclass
class LoadedModel:
    """A model ready to export: the module holding the vision parts (the whole VLM, or only its
    vision tower and projector for a preset whose language model is never built), its config,
    image processor and tokenizer."""

    model: torch.nn.Module
    config: Any
    processor: Any
    tokenizer: Any
    language_model_saved: bool  # the whole VLM is here, so its weights can be saved for the decoder


@dataclass(frozen=True)
class Preset:
    """A model that needs no checkpoint and no network: a family's config from these fields,
    seeded random weights. `fields` are the family's own (export/models/<family>.py reads them)."""

    name: str
    family: str
    fields: dict
    materialise_language_model: bool  # False: only the vision parts are built (7B-shape benchmarks)
    seed: int = 0
    description: str = ""


@dataclass
class EnginePart:
    """A vision engine a family needs beside its main one (Video-LLaVA: the image tower beside the
    video tower), exported the same way as `<name>.onnx` (and `<name>.plan`) and recorded under the
    manifest's `parts` with its own io; the runtime sends a call to the engine whose inputs it feeds."""

    name: str
    module: torch.nn.Module  # forward(**named inputs) -> tuple of the outputs in io order
    io: dict
    example_inputs: Callable[[int, torch.Generator], dict[str, torch.Tensor]]


class ExportFamily(ABC):
    """The export side of one model family. `config` is the Hugging Face config of the whole VLM."""

    name: str = ""  # manifest model.family; the runtime finds its adapter by it
    model_types: tuple[str, ...] = ()  # Hugging Face config.model_type values this family takes
    hf_model_class: str = ""  # the Transformers class of the whole VLM
    prompt_template: str = ""  # the conversation format; "{prompt}" and the image token once
    image_token: str = "<image>"
    video_token: str | None = None  # the family's video placeholder, when it takes videos
    media: tuple[str, ...] = ("image",)  # what a request may hold: "image", "video"
    compressed_media: tuple[str, ...] = ("image",)  # which of them ApET compresses (the rest pass whole)
    item: str = "image"  # what one engine item is ("image", "crop", "frame"), for messages
    apet_defaults: dict = {}  # ApetConfig fields the build leaves unset, as the family's official code has them
    # The paper's setting: the BuildConfig budget `apet build` uses when given none (no --keep,
    # --keep-ratio, --budget, --llm-stage or --no-apet), and how the build and --help describe it
    paper_budget: dict = {}
    paper_budget_text: str = ""
    # Video sampling modes the runtime adapter honours (--frame-sampling; the first is the default);
    # empty: the family takes no videos. Build sets `frame_sampling` on the instance.
    frame_samplings: tuple[str, ...] = ()
    frame_sampling: str | None = None
    # tensorrt_llm.models class that converts the language model for TensorRT-LLM's engine flow (the
    # prompt-table decoder); None: the family has no such route
    trtllm_model_class: str | None = None
    # Paper parity (export/parity.py). llm_stage: ApET's second stage inside the language model
    # (runtime/decoders/stage2.py) works for this family's rows. supports_start_input: the vision
    # engine can take an input "start" [items] int64, each item's first FPS seed (--start random);
    # build sets `start_input` on the instance and io / example_inputs / vision_module follow it.
    # image_aspects: the image preprocessing modes the runtime adapter honours ("default": the
    # checkpoint processor's own).
    llm_stage: bool = False
    supports_start_input: bool = False
    start_input: bool = False
    image_aspects: tuple[str, ...] = ("default",)

    def __init__(self, config, processor=None):
        self.config = config
        self.processor = processor  # the image processor the engine is built for (None: not known yet)

    def configure_frames(self, sampling: str | None) -> None:
        """--frame-sampling: how the runtime picks a video's frames (None: the family's default)."""
        if sampling is not None and sampling not in self.frame_samplings:
            takes = ", ".join(self.frame_samplings) if self.frame_samplings else "no videos"
            raise ValueError(f"--frame-sampling {sampling}: the {self.name} family takes {takes}")
        self.frame_sampling = sampling or (self.frame_samplings[0] if self.frame_samplings else None)

    @classmethod
    def configure_processor(cls, processor, *, min_pixels: int | None = None, max_pixels: int | None = None):
        """The image processor with the build's pixel range applied (dynamic-resolution families);
        families with a fixed input size refuse a range."""
        if min_pixels is not None or max_pixels is not None:
            raise ValueError(f"--min-pixels / --max-pixels: the {cls.name} family takes a fixed image size")
        return processor

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def preset_config(cls, preset: Preset) -> tuple[Any, Any, Any]:
        """-> (config, image processor, tokenizer) for a preset; no weights (cheap)."""

    def preset_model(self, preset: Preset) -> torch.nn.Module:
        """The preset's weights, seeded (the caller forks the global RNG around this): the whole VLM
        (`hf_model_class`, its LM head widened: random init gives near-uniform logits, and wider ones
        keep greedy ids stable), or the vision parts alone for a preset that does not materialise its
        language model (the 7B-shape presets)."""
        if not preset.materialise_language_model:
            return self.vision_parts()
        import transformers

        model = getattr(transformers, self.hf_model_class)(self.config).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0)
        return model

    @abstractmethod
    def vision_parts(self) -> torch.nn.Module:
        """The modules the vision engine is made of (tower, projector, ...) from the config alone,
        random weights: what a preset without its language model builds."""

    @classmethod
    def load_checkpoint(cls, path: Path) -> LoadedModel:
        """A local checkpoint directory (offline): the whole VLM, its image processor and tokenizer."""
        import transformers

        from apet_trt.apet_ops.compat import load_image_processor

        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        try:
            processor = load_image_processor(path, local_files_only=True)
        except Exception as exc:
            raise FileNotFoundError(f"{path}: no image processor config (preprocessor_config.json): {exc}") from exc
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        cls_ = getattr(transformers, cls.hf_model_class)
        model = cls_.from_pretrained(str(path), local_files_only=True).eval()
        return LoadedModel(model, config, processor, tokenizer, language_model_saved=True)

    # -- what the engine does -----------------------------------------------------------------
    @property
    @abstractmethod
    def num_patches(self) -> int:
        """N, the tokens of one engine item (an image, a crop) that enter ApET."""

    def check_apet(self, apet: ApetConfig | None) -> None:
        """Refuse options that cannot work for this model before any weights are built."""
        if apet is not None:
            apet.validate_for(self.num_patches)

    def apet_config(self, apet: ApetConfig | None) -> ApetConfig | None:
        """The family's variant of the build's ApET options (e.g. the video layout); unchanged by default."""
        return apet

    def rows_per_item(self, apet: ApetConfig | None) -> int | None:
        """T: rows of `embeddings` per engine item (N when there is no compression); None when it
        depends on the item (dynamic resolution, a ratio budget)."""
        return apet.keep_for(self.num_patches) if apet is not None else self.num_patches

    def budget_text(self, apet: ApetConfig | None) -> str:
        """What the engine keeps, for the build's messages: "N=576 -> T=64"."""
        return f"N={self.num_patches} -> T={self.rows_per_item(apet)}"

    def max_items(self, apet: ApetConfig | None, max_batch: int) -> int:
        """The most engine items (images, crops) one engine call takes: --max-batch, unless the
        family's graph takes fewer."""
        return max_batch

    def max_rows_per_image(self, apet: ApetConfig | None) -> int:
        """The most rows one image (or video) can hand the LLM (what a decoder's multimodal capacity is
        sized for); one engine item per image: T."""
        return self.rows_per_item(apet)

    @abstractmethod
    def vision_module(self, model: torch.nn.Module, apet: ApetConfig | None) -> torch.nn.Module:
        """The vision engine as a module: forward(**named inputs) -> tuple of the outputs in io order.
        Its submodules are named `vision_tower`, `compressor` (apet_ops.ApetCompressor) and
        `projector`: the exported graph's node scopes, by which the build reads each part's dtype
        and checks that the compressor computes in float32 (export/precision.py)."""

    @abstractmethod
    def example_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random named inputs for `batch` engine items (export traces with these; builds compare
        ONNX Runtime with PyTorch on them)."""

    @abstractmethod
    def io(self, apet: ApetConfig | None) -> dict:
        """The manifest's io: {"inputs": [...], "outputs": [...]}, each {"name", "dtype", "shape"};
        a dim that is a string is dynamic (its name), the others are static."""

    def dynamic_axes(self, apet: ApetConfig | None) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes, from io's named dims."""
        io = self.io(apet)
        return {
            t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)}
            for t in [*io["inputs"], *io["outputs"]]
        }

    def profile_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Each input's shape for `batch` items (TensorRT optimisation profiles: min/opt/max); the
        dynamic (named) dim is the items axis."""
        io = self.io(None)
        return {t["name"]: tuple(batch if isinstance(d, str) else d for d in t["shape"]) for t in io["inputs"]}

    def tensorrt_profile(
        self, apet: ApetConfig | None, opt_batch: int, max_batch: int
    ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Each input's (min, opt, max) shape for TensorRT's optimisation profile: by default
        profile_shapes at 1, opt_batch and max_batch items; families with other dynamic axes
        (a token count) give their own."""
        shapes = [self.profile_shapes(b) for b in (1, opt_batch, max_batch)]
        return {name: tuple(s[name] for s in shapes) for name in shapes[0]}

    @abstractmethod
    def reference_rows(self, model: torch.nn.Module, processor, images: list) -> list[torch.Tensor]:
        """Transformers' own answer, for checking the engine: the rows the Hugging Face model hands
        its language model for these PIL images without compression (one [R_i, H] tensor per image),
        computed with the model's and processor's own methods only."""

    def reference_video_rows(self, model: torch.nn.Module, processor, videos: list) -> list[torch.Tensor]:
        """Transformers' own rows for videos ([F, H, W, 3] uint8 frames each), as reference_rows for images."""
        raise NotImplementedError(f"family {self.name!r} takes no videos")

    def extra_parts(self, model: torch.nn.Module, apet: ApetConfig | None) -> list[EnginePart]:
        """Vision engines beside the main one (none by default)."""
        return []

    def trtllm_checkpoint(self, checkpoint: Path, work: Path) -> Path:
        """The Hugging Face checkpoint TensorRT-LLM's converter (`trtllm_model_class`) reads: the
        family's own by default; a family whose model type the converter does not know writes its
        language model as a plain checkpoint under `work` and returns that."""
        return checkpoint

    def save_files(self, model: torch.nn.Module, out_dir: Path) -> None:  # noqa: B027 - optional hook
        """Write the files the family's runtime adapter reads besides the engine (e.g. LLaVA-NeXT's
        newline embedding) into the engine directory being built; `manifest_fields` names them by
        their relative paths (the manifest lists and hashes every file)."""

    # -- what the manifest records ------------------------------------------------------------
    @abstractmethod
    def manifest_fields(self, apet: ApetConfig | None) -> dict:
        """The family's part of the manifest: "vision" facts, "num_visual_tokens", and any
        family-specific section its runtime adapter reads."""

    def llm_fields(self) -> dict:
        """hidden_size, vocab_size, image_token_id, max_position_embeddings of the language model (a
        family adds what its runtime needs, e.g. a video token)."""
        t = self.config.text_config
        return {
            "hidden_size": t.hidden_size,
            "vocab_size": t.vocab_size,
            "image_token_id": self.config.image_token_id,
            "max_position_embeddings": t.max_position_embeddings,
        }
