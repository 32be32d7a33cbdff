"""Transformers-version shims, in one place.

The suite runs on Transformers 5.x and 4.57 (the line TensorRT-LLM's installs pin), whose APIs
differ in small ways every stage meets: how `from_pretrained` takes a dtype, how a PIL-backed
image processor is asked for, what the KV-cache argument is called, which class is the PIL CLIP
processor. Every stage imports apet_ops, so the shims live here and nowhere else; nothing in this
module knows a model family.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch


def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return major, minor


def dtype_kwarg(dtype: torch.dtype) -> dict:
    """`from_pretrained` / `from_config`'s dtype argument: `dtype` since Transformers 4.56,
    `torch_dtype` before."""
    return {"dtype": dtype} if transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def config_dtype(config) -> torch.dtype | str | None:
    """The dtype a Transformers config records (`dtype` in 5.x, `torch_dtype` in 4.x), or None."""
    return next((d for attr in ("dtype", "torch_dtype") if (d := getattr(config, attr, None)) is not None), None)


def load_image_processor(path: str | Path, **kwargs):
    """The PIL-backed image processor saved at `path`: no torchvision needed (Transformers 5 selects it
    with backend="pil", 4.x with use_fast=False)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(path), backend="pil", **kwargs)
    except (TypeError, ValueError):
        return AutoImageProcessor.from_pretrained(str(path), use_fast=False, **kwargs)


def pil_image_processor_class(name: str):
    """A PIL-backed image processor class by its 4.x name (e.g. "CLIPImageProcessor"): the `...Pil`
    class in Transformers 5, the class itself (PIL/numpy) in 4.x."""
    import transformers

    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def cache_kwarg(forward) -> str:
    """The KV-cache argument of a model's forward: `cache` in Transformers >= 5, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return getattr(output, "past_key_values", None) if cache is None else cache


def layer_hidden(output) -> torch.Tensor:
    """A decoder layer's hidden states: the tensor Transformers 5 (and 4.5x) layers return, or the first
    element of the tuple older ones return."""
    return output[0] if isinstance(output, tuple) else output


def accepted_kwargs(fn, **kwargs) -> dict:
    """The keyword arguments `fn` takes by name, the others dropped (Transformers adds and removes
    keyword arguments between majors, e.g. a model's `mm_token_type_ids` in 5.x)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def config_model_type(config) -> str:
    """A config's model_type as its class declares it: Transformers 4.57 copies a nested text
    config's attributes onto some composite configs it loads (Qwen2.5-VL's then reads
    "qwen2_5_vl_text"), the class attribute keeps the composite model's."""
    return getattr(type(config), "model_type", "") or config.model_type


def convert_to_rgb(image):
    """Transformers' convert_to_rgb (transparency composited onto white) -> a PIL RGB image: 5.x
    grew a return_numpy flag (and warns without it), 4.x returns a PIL image."""
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb

    if "return_numpy" in inspect.signature(hf_convert_to_rgb).parameters:
        return Image.fromarray(hf_convert_to_rgb(image, return_numpy=True))
    return hf_convert_to_rgb(image)
