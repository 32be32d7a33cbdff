"""The Transformers checkpoint an engine directory names for its decoder (and the torch backend):
manifest["decoder"]["transformers"] = {"checkpoint": "hf" | null (the external checkpoint),
"weights": "saved"} or {"checkpoint": ..., "weights": "random-seeded", "seed": S, "config":
"hf/config.json"}; paths come from the manifest's confined accessors."""

from __future__ import annotations

import torch

from apet_trt.apet_ops.compat import dtype_kwarg

from .manifest import Manifest

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_named(name: str, where: str) -> torch.dtype:
    """A manifest dtype name -> torch dtype; `where` names the field for the error."""
    if name not in _DTYPES:
        raise ValueError(f"{where} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def llm_dtype(manifest: Manifest) -> torch.dtype:
    return dtype_named(manifest.llm.get("dtype", "float32"), f"{manifest.root}: llm.dtype")


def load_transformers_model(
    manifest: Manifest, *, device: torch.device, model_class: str, dtype: torch.dtype | None = None
):
    """The VLM (vision tower, projector, language model) as a Transformers model of `model_class`
    (the family's, runtime/families/), in eval mode."""
    import transformers

    entry = manifest.decoders.transformers
    if entry is None:
        raise RuntimeError(f"{manifest.root}: the manifest names no Transformers checkpoint (decoder.transformers)")
    dtype = dtype or llm_dtype(manifest)
    cls = getattr(transformers, model_class)
    weights = entry.weights
    if weights == "saved":
        path = manifest.transformers_checkpoint()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: the Transformers checkpoint named by the manifest does not exist")
        model = cls.from_pretrained(str(path), **dtype_kwarg(dtype))
    elif weights == "random-seeded":
        from transformers import AutoConfig

        config_path = manifest.transformers_config()
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: the config for the seeded random weights does not exist")
        config = AutoConfig.from_pretrained(str(config_path.parent))
        torch.manual_seed(int(entry.seed))
        model = cls(config) if cls.__name__ != "AutoModelForImageTextToText" else cls.from_config(config)
        model = model.to(dtype)
    else:
        raise ValueError(
            f"{manifest.root}: decoder.transformers.weights must be 'saved' or 'random-seeded', got {weights!r}"
        )
    return model.to(device).eval()
