"""Helpers (no tests here): a small LLaVA engine directory written by hand, following
docs/ENGINE_DIR.md, so the runtime is tested without depending on `export`.

The model: CLIP vision tower (84 px, patch 14 -> N = 36 patches, 2 layers), a 2-layer Llama, a
byte-level BPE tokenizer with <s>, </s>, <pad> and <image> as special tokens; seeded random weights
saved as a Transformers checkpoint. The vision engine exported to ONNX is
pixel_values -> tower -> layer -2 -> CLS dropped -> ApetCompressor -> projector.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

IMAGE_SIZE, PATCH, TEXT_HIDDEN = 84, 14, 64
N = (IMAGE_SIZE // PATCH) ** 2
TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<pad>", "<image>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def clip_processor_class():
    """The PIL-backed CLIP image processor (apet_ops.compat: the Transformers-version shims)."""
    from apet_trt.apet_ops.compat import pil_image_processor_class

    return pil_image_processor_class("CLIPImageProcessor")


def make_model(tokenizer, seed: int = 0, image_size: int = IMAGE_SIZE, text_layers: int = 2):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = len(tokenizer)
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=PATCH,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=160,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init gives near-uniform logits; widen them so greedy ids are stable
        model.lm_head.weight.mul_(8.0)
    return model


def _export_vision_onnx(model, apet: dict | None, path: Path, image_size: int) -> None:
    from apet_trt.runtime.families.llava import LlavaTorchVision

    class Tupled(torch.nn.Module):  # the exporter names outputs by position
        def __init__(self):
            super().__init__()
            self.inner = LlavaTorchVision(model, feature_layer=-2, select_strategy="default", apet=apet)

        def forward(self, pixel_values):
            out = self.inner(pixel_values)
            return out["embeddings"], out["positions"]

    module = Tupled().eval()
    example = torch.randn(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["pixel_values"],
            output_names=["embeddings", "positions"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"pixel_values": {0: "batch"}, "embeddings": {0: "batch"}, "positions": {0: "batch"}},
        )


def write_manifest(root: Path, data: dict) -> None:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            rel = p.relative_to(root).as_posix()
            files[rel] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
    data["files"] = files
    (root / "manifest.json").write_text(json.dumps(data, indent=2))


_BUILT: dict[tuple, Path] = {}  # the engine directories this test run has built, by their parameters


def build_engine_dir(
    root: Path,
    *,
    keep: int | None = 12,
    basis: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 160,
    image_size: int = IMAGE_SIZE,
) -> Path:
    """The engine directory for these parameters at `root`: built once per test run (ONNX export and
    checkpoint save are the slow part), then copied (fresh regular files: a test may change its copy)."""
    key = (keep, basis, seed, max_position_embeddings, image_size)
    if key not in _BUILT:
        cache = Path(tempfile.mkdtemp(prefix="apet-test-engine-"))
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        _BUILT[key] = _build_engine_dir(cache / "engine", *key)
    shutil.copytree(_BUILT[key], root, dirs_exist_ok=True)
    return Path(root)


def _build_engine_dir(
    root: Path, keep: int | None, basis: int, seed: int, max_position_embeddings: int, image_size: int
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed, image_size)
    n = (image_size // PATCH) ** 2
    apet = None if keep is None else {"keep": keep, "basis": basis, "merge": True, "ridge": 1e-5, "start": 0}
    t = n if keep is None else keep
    _export_vision_onnx(model, apet, root / "vision.onnx", image_size)
    processor = clip_processor_class()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(str(root / "processor"))
    tokenizer.save_pretrained(str(root / "tokenizer"))
    model.save_pretrained(str(root / "hf"))
    text = model.config.text_config
    data = {
        "format": "apet-trt-engine",
        "manifest_version": 2,
        "created_utc": "2026-01-01T00:00:00Z",
        "model": {"id": "test-llava", "source": "preset", "family": "llava"},
        "external_checkpoint": None,
        "vision": {
            "feature_layer": -2,
            "select_strategy": "default",
            "image_size": image_size,
            "patch_size": PATCH,
            "num_patches": n,
            "feature_dim": 32,
        },
        "apet": apet,
        "num_visual_tokens": t,
        "llm": {
            "hidden_size": TEXT_HIDDEN,
            "vocab_size": text.vocab_size,
            "image_token_id": model.config.image_token_id,
            "dtype": "float32",
            "max_position_embeddings": max_position_embeddings,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        "prompt_template": TEMPLATE,
        "image_token": "<image>",
        "io": {
            "inputs": [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, image_size, image_size]}],
            "outputs": [
                {"name": "embeddings", "dtype": "float32", "shape": ["batch", t, TEXT_HIDDEN]},
                {"name": "positions", "dtype": "int64", "shape": ["batch", t]},
            ],
        },
        "batch": {"min": 1, "opt": 1, "max": 4},
        "precision": {"vision": "fp32", "compressor": "fp32"},
        "processor": processor.to_dict(),
        "engines": {"onnx": "vision.onnx", "tensorrt": None},
        "decoder": {"transformers": {"checkpoint": "hf", "weights": "saved"}, "tensorrt_llm": None},
        "versions": {"apet_trt": "0.1.0", "torch": torch.__version__},
    }
    write_manifest(root, data)
    return root


def stack_rows(rows):
    """A fixed-T engine's per-image rows (runtime VisualRows) as (embeddings [B, T, H], positions [B, T])."""
    return torch.stack([r.embeddings for r in rows]), torch.stack([r.positions for r in rows])
