"""Video-LLaVA family (Transformers `VideoLlavaForConditionalGeneration`, e.g. LanguageBind/Video-LLaVA-7B-hf).

Two CLIP towers share one projector. A video is 8 uniformly sampled frames at 224 px; every frame
gives the LLM all 257 rows of the video tower's feature layer (CLS kept), projected:
8 x 257 = 2,056 rows (`get_video_features`). A still image goes through the image tower, CLS
dropped ("default"): 256 rows (`get_image_features`).

ApET per frame, after the projector, as the official code does (MaQianKun0/ApET,
video-llava/videollava/model/llava_arch.py, `encode_videos`): `ApetConfig(layout="video")` -
CLS untouched, 10 FPS seeds, the 22 worst-reconstructed rows in descending-error order, every other
row merged into its most similar kept row, output [CLS, 22, 10 seeds] = 33 rows a frame, 264 a
video (docs/DESIGN.md, "Video layout"). Still images pass whole, as in the official code, whose
`encode_images` does not compress.

Engines (the manifest's io and parts):
  vision.onnx  pixel_values_videos [frames, 3, 224, 224] -> video tower -> layer -> projector ->
               ApET (video layout) -> embeddings [frames, 33, H] float32, positions [frames, 33]
               (each row's index in its frame: CLS 0, patch p -> p + 1); without ApET 257 rows.
               With --start random also start [frames] int64: each frame's first FPS seed (0..255
               among its patch rows), drawn by the runtime.
  image.onnx   pixel_values [images, 3, 224, 224] -> image tower -> layer, CLS dropped ->
               projector -> embeddings [images, 256, H], positions [images, 256].

Presets (export/presets.py) give `fields` = {"vision": CLIPVisionConfig kwargs, "text": LlamaConfig
kwargs, "image_token_id": int | None, "num_frames": int}.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from apet_trt.apet_ops import ApetCompressor, ApetConfig
from apet_trt.apet_ops.compat import accepted_kwargs

from ..tokenizer import byte_level_tokenizer
from .base import EnginePart, ExportFamily, Preset
from .llava import CLIP_MEAN, CLIP_STD, llama_text_config

VIDEO_INPUT, IMAGE_INPUT = "pixel_values_videos", "pixel_values"
START = "start"  # with --start random: [frames] int64, each frame's first FPS seed among its patch rows
OUTPUTS = ("embeddings", "positions")
NUM_FRAMES = 8  # Video-LLaVA samples 8 frames a video (LanguageBind's video tower is trained on 8)


def parts(model):
    """(video_tower, image_tower, multi_modal_projector) across transformers versions (4.x keeps them
    on the outer model, 5.x on model.model)."""
    inner = getattr(model, "model", model)
    found = [getattr(inner, n, None) or getattr(model, n, None) for n in ("video_tower", "image_tower")]
    projector = getattr(inner, "multi_modal_projector", None) or getattr(model, "multi_modal_projector", None)
    if None in found or projector is None:
        raise ValueError(f"{type(model).__name__} has no video_tower / image_tower / projector: not Video-LLaVA")
    return found[0], found[1], projector


def _features(output):
    """A get_*_features result across Transformers versions: 5.x a model output (pooler_output),
    4.x the tensor, or (tensor, num_frames) for videos."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "pooler_output", output)


class VisionParts(nn.Module):
    """Only what the vision engines need: both towers and the projector (a 7B language model stays
    unbuilt)."""

    def __init__(self, video_tower: nn.Module, image_tower: nn.Module, projector: nn.Module, config):
        super().__init__()
        self.video_tower, self.image_tower, self.multi_modal_projector = video_tower, image_tower, projector
        self.config = config

    @classmethod
    def from_config(cls, config) -> VisionParts:
        from transformers import CLIPVisionModel
        from transformers.models.video_llava.modeling_video_llava import VideoLlavaMultiModalProjector

        towers = (CLIPVisionModel(config.vision_config), CLIPVisionModel(config.vision_config))
        return cls(*towers, VideoLlavaMultiModalProjector(config), config).eval()


class VideoEngine(nn.Module):
    """pixel_values_videos [F, 3, S, S] (frames of any number of videos) -> (embeddings [F, R, H]
    float32, positions [F, R] int64); R = 33 with ApET (the official [CLS, 22, 10 seeds]), 257 without."""

    def __init__(self, model, apet: ApetConfig | None, feature_layer: int):
        super().__init__()
        self.vision_tower, _, self.projector = parts(model)
        self.feature_layer = feature_layer
        self.compressor = ApetCompressor(apet) if apet is not None else None  # node names: /compressor/...

    def forward(self, pixel_values_videos: torch.Tensor, start: torch.Tensor | None = None):
        dtype = next(self.vision_tower.parameters()).dtype
        hidden = self.vision_tower(pixel_values_videos.to(dtype), output_hidden_states=True).hidden_states
        rows = self.projector(hidden[self.feature_layer])  # all rows of every frame, CLS first
        if self.compressor is not None:
            rows, positions = self.compressor(rows, start)  # per frame, float32 inside, input dtype out
        else:  # a constant 0..R-1, so the exported row axis is static
            positions = torch.arange(rows.shape[1], device=rows.device).expand_as(rows[:, :, 0])
        return rows.float(), positions


class ImageEngine(nn.Module):
    """pixel_values [B, 3, S, S] -> (embeddings [B, N, H] float32, positions [B, N]): the image tower,
    uncompressed (the official code compresses videos only)."""

    def __init__(self, model, feature_layer: int, select_strategy: str):
        super().__init__()
        _, self.vision_tower, self.projector = parts(model)
        self.feature_layer, self.drop_cls = feature_layer, select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor):
        dtype = next(self.vision_tower.parameters()).dtype
        features = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states[
            self.feature_layer
        ]
        if self.drop_cls:
            features = features[:, 1:]
        rows = self.projector(features)
        return rows.float(), torch.arange(rows.shape[1], device=rows.device).expand_as(rows[:, :, 0])


def image_processor(image_size: int = 224):
    """Video-LLaVA's processor (VideoLlavaImageProcessor: CLIP settings, PIL/numpy, no torchvision);
    the runtime runs it on still images and on every sampled frame."""
    from transformers import VideoLlavaImageProcessor

    return VideoLlavaImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def pixel_values(processor, frames) -> torch.Tensor:
    """The processor's pixel values for a list of PIL images or [H, W, 3] frames (Transformers 5 names
    them pixel_values or, legacy, pixel_values_images; 4.x pixel_values_images)."""
    new_key = accepted_kwargs(processor.preprocess, return_legacy_image_output=False)
    out = processor(images=list(frames), return_tensors="np", **new_key)
    key = "pixel_values" if "pixel_values" in out else "pixel_values_images"
    return torch.from_numpy(out[key])


class VideoLlavaExport(ExportFamily):
    name = "video_llava"
    model_types = ("video_llava",)
    hf_model_class = "VideoLlavaForConditionalGeneration"
    # Video-LLaVA's conversation format; the <image> slot takes whatever media the request holds
    # (runtime/prompt.py): "USER: <video>\n{prompt} ASSISTANT:" for a video
    prompt_template = "USER: <image>\n{prompt} ASSISTANT:"
    image_token = "<image>"
    video_token = "<video>"
    media = ("image", "video")
    compressed_media = ("video",)
    item = "frame"
    # TensorRT-LLM's converter does not know model_type video_llava: trtllm_checkpoint writes the
    # language model as a plain LLaMA checkpoint, which LLaMAForCausalLM.from_hugging_face reads
    trtllm_model_class = "LLaMAForCausalLM"
    supports_start_input = True  # --start random: one start per frame
    # the official encode_videos: 22 kept by error + CLS + 10 FPS seeds per frame (basis 10)
    paper_budget = {"keep": 22}
    paper_budget_text = "22 rows + CLS + 10 seeds = 33 per frame (Video-LLaVA-7B: 257 -> 33, 2,056 -> 264 a video)"
    # transformers: Transformers' load_video, frame floor(i * n / 8); official: LanguageBind's
    # np.linspace(0, n - 1, 8, dtype=int) (runtime/videos.py)
    frame_samplings = ("transformers", "official")

    def __init__(self, config, processor=None):
        super().__init__(config, processor)
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: only a single feature layer is supported")
        strategy = config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r}: expected 'default' or 'full'")
        v = config.vision_config
        self.feature_layer, self.select_strategy = layer, strategy
        self.image_size, self.patch_size, self.feature_dim = v.image_size, v.patch_size, v.hidden_size
        patches = (v.image_size // v.patch_size) ** 2
        self._rows = patches + 1  # a frame's rows: CLS and every patch (get_video_features keeps CLS)
        self.image_rows = patches + (1 if strategy == "full" else 0)
        seq = getattr(config, "video_seq_length", None)  # 2056 = 8 x 257 for the released model
        self.num_frames = seq // self._rows if seq and seq % self._rows == 0 else NUM_FRAMES

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def preset_config(cls, preset: Preset):
        from transformers import CLIPVisionConfig, VideoLlavaConfig

        f = preset.fields
        tokenizer = byte_level_tokenizer(f.get("image_token_id"), video_token=True)
        text_config = llama_text_config(f["text"], tokenizer)
        vision = CLIPVisionConfig(**f["vision"])
        patches = (vision.image_size // vision.patch_size) ** 2
        config = VideoLlavaConfig(
            vision_config=vision,
            text_config=text_config,
            image_token_index=tokenizer.convert_tokens_to_ids(cls.image_token),
            video_token_index=tokenizer.convert_tokens_to_ids(cls.video_token),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            image_seq_length=patches,
            video_seq_length=f.get("num_frames", NUM_FRAMES) * (patches + 1),
        )
        return config, image_processor(vision.image_size), tokenizer

    def vision_parts(self) -> nn.Module:
        return VisionParts.from_config(self.config)

    # -- the engine ---------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        """Rows of one frame entering ApET (CLS included)."""
        return self._rows

    def apet_config(self, apet: ApetConfig | None) -> ApetConfig | None:
        """--keep / --basis per frame, in the official video layout: keep=22, basis=10 gives 33 rows."""
        return None if apet is None else dataclasses.replace(apet, layout="video")

    def rows_per_item(self, apet: ApetConfig | None) -> int:
        return apet.output_rows(self._rows) if apet is not None else self._rows

    def max_rows_per_image(self, apet: ApetConfig | None) -> int:
        return max(self.num_frames * self.rows_per_item(apet), self.image_rows)

    def vision_module(self, model: nn.Module, apet: ApetConfig | None) -> nn.Module:
        self.check_apet(apet)
        return VideoEngine(model, apet, self.feature_layer)

    def example_inputs(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        pixels = torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)
        if not self.start_input:
            return {VIDEO_INPUT: pixels}
        return {VIDEO_INPUT: pixels, START: torch.randint(0, self._rows - 1, (batch,), generator=generator)}

    def io(self, apet: ApetConfig | None) -> dict:
        io = self._io(VIDEO_INPUT, "frames", self.rows_per_item(apet))
        if self.start_input:  # FPS runs over a frame's patch rows (CLS excluded): starts in 0..255
            io["inputs"].append({"name": START, "dtype": "int64", "shape": ["frames"]})
        return io

    def _io(self, name: str, axis: str, rows: int) -> dict:
        s, h = self.image_size, self.config.text_config.hidden_size
        return {
            "inputs": [{"name": name, "dtype": "float32", "shape": [axis, 3, s, s]}],
            "outputs": [
                {"name": OUTPUTS[0], "dtype": "float32", "shape": [axis, rows, h]},
                {"name": OUTPUTS[1], "dtype": "int64", "shape": [axis, rows]},
            ],
        }

    def extra_parts(self, model: nn.Module, apet: ApetConfig | None) -> list[EnginePart]:
        def example(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
            return {IMAGE_INPUT: torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)}

        engine = ImageEngine(model, self.feature_layer, self.select_strategy)
        return [EnginePart("image", engine, self._io(IMAGE_INPUT, "images", self.image_rows), example)]

    def reference_rows(self, model: nn.Module, processor, images: list) -> list[torch.Tensor]:
        with torch.no_grad():
            out = model.get_image_features(
                pixel_values(processor, images),
                vision_feature_layer=self.feature_layer,
                vision_feature_select_strategy=self.select_strategy,
            )
        return [x.float() for x in _features(out)]

    def reference_video_rows(self, model: nn.Module, processor, videos: list) -> list[torch.Tensor]:
        """Each video's [F, H, W, 3] frames -> get_video_features' rows, frame after frame ([F * 257, H])."""
        rows = []
        for frames in videos:
            with torch.no_grad():
                out = getattr(model, "model", model).get_video_features(  # VideoLlavaModel's (both 4.x and 5.x)
                    pixel_values_videos=pixel_values(processor, frames)[None], vision_feature_layer=self.feature_layer
                )
            rows.append(_features(out).float().flatten(0, 1))
        return rows

    # -- the decoder --------------------------------------------------------------------------
    def trtllm_checkpoint(self, checkpoint: Path, work: Path) -> Path:
        return save_language_model(checkpoint, work)

    # -- the manifest -------------------------------------------------------------------------
    def manifest_fields(self, apet: ApetConfig | None) -> dict:
        return {
            "vision": {
                "feature_layer": self.feature_layer,
                "select_strategy": self.select_strategy,  # for still images; frames keep CLS
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "num_patches": self._rows,  # rows of one frame (CLS included)
                "feature_dim": self.feature_dim,
                "num_frames": self.num_frames,
                "image_rows": self.image_rows,  # rows of a still image (uncompressed)
                "frame_sampling": self.frame_sampling or self.frame_samplings[0],  # runtime/videos.py
            },
            "num_visual_tokens": self.rows_per_item(apet),  # rows per frame
            "video_token": self.video_token,
        }

    def llm_fields(self) -> dict:
        return {**super().llm_fields(), "video_token_id": self.config.video_token_id}


# -- the language model alone (TensorRT-LLM's converter, vLLM / SGLang with prompt embeddings) -------
_LM_PREFIXES = (  # saved key prefix -> LlamaForCausalLM's
    ("model.language_model.", "model."),  # Transformers >= 4.52 layout
    ("language_model.model.", "model."),  # the released checkpoints' (legacy) layout
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def save_language_model(checkpoint: str | Path, out: str | Path) -> Path:
    """Write a Video-LLaVA checkpoint's language model as a plain LLaMA checkpoint (`LlamaForCausalLM`:
    config.json from text_config, the language-model tensors renamed, the towers and projector left
    out, the tokenizer files copied), tensor by tensor without building the model. This is what
    TensorRT-LLM's LLaMA converter reads, and what vLLM / SGLang serve with prompt embeddings (they
    register no Video-LLaVA model). Returns `out`."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig

    checkpoint, out = Path(checkpoint), Path(out)
    config = AutoConfig.from_pretrained(str(checkpoint), local_files_only=True)
    if getattr(config, "model_type", None) != "video_llava":
        raise ValueError(f"{checkpoint}: model_type {getattr(config, 'model_type', None)!r}, expected 'video_llava'")
    shards = sorted(checkpoint.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{checkpoint}: no *.safetensors weights")
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                new = next((to + key[len(src) :] for src, to in _LM_PREFIXES if key.startswith(src)), None)
                if new is not None:
                    tensors[new] = f.get_tensor(key)
        if tensors:
            save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
            index.update(dict.fromkeys(tensors, shard.name))
    if "lm_head.weight" not in index or "model.embed_tokens.weight" not in index:
        raise ValueError(f"{checkpoint}: no language-model weights found (lm_head / embed_tokens)")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    text = config.text_config
    text.architectures = ["LlamaForCausalLM"]
    text.save_pretrained(str(out))
    for name in _TOKENIZER_FILES:
        if (checkpoint / name).is_file():
            shutil.copy2(checkpoint / name, out / name)
    return out
