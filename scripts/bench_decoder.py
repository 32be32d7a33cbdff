"""Decoder side of the benchmark: what T visual tokens cost the LLM.

A decoder with LLaVA-1.5-7B's language-model shapes (LLaMA: hidden 4096, 32 heads, MLP 11008,
vocab 32064) - or the text config of the engine being benchmarked, which for llava-1.5-7b(-arch)
is the same thing - with seeded random weights (timing needs the shapes, not the values). On a CPU
the layer count is overridden (default 2) and the output says so; on a GPU all layers run.
Per T: prefill / time to first token on `text + T` embeddings, decode tokens per second with the
KV cache, and the KV-cache bytes the full model would hold for that context.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

LLAVA_15_7B_TEXT = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    num_hidden_layers=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
_SHAPE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "vocab_size",
)


@dataclass
class DecoderBenchConfig:
    layers: int | None = None  # None: all on a GPU, min(2, all) on a CPU
    text_tokens: int = 40  # "USER: <image>\nDescribe this image in detail. ASSISTANT:" ~ 20-50
    new_tokens: int = 8
    dtype: str = "auto"  # auto: float16 on a GPU, float32 on a CPU
    device: str = "auto"
    batch: int = 1
    shape: dict | None = None  # a text config as a dict (with model_type); None: LLAVA_15_7B_TEXT


# transformers 5 renamed `past_key_values` to `cache` (TensorRT-LLM installs still pin 4.x)
CACHE_KWARG = "cache" if int(__import__("transformers").__version__.split(".")[0]) >= 5 else "past_key_values"


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def shape_of(config: DecoderBenchConfig) -> dict:
    return dict(config.shape) if config.shape is not None else dict(LLAVA_15_7B_TEXT)


def head_dim(shape: dict) -> int:
    return int(shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"])


def kv_dim(shape: dict) -> int:
    """Width of one layer's keys (= of its values) per token: kv heads x head dim."""
    return int(shape.get("num_key_value_heads") or shape["num_attention_heads"]) * head_dim(shape)


def is_llava_15_7b(shape: dict) -> bool:
    return all(int(shape.get(k, -1)) == LLAVA_15_7B_TEXT[k] for k in _SHAPE_KEYS)


def kv_cache_bytes(context: int, layers: int = 32, kv_dim: int = 4096, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Keys and values of every layer for `context` tokens (fp16 by default)."""
    return 2 * layers * kv_dim * context * bytes_per_value * batch


def cache_nbytes(cache) -> int:
    """Bytes the KV cache object actually holds (Transformers 5 `layers[i].keys/values`, 4.x
    `key_cache/value_cache`)."""
    tensors = []
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    else:  # legacy tuple of (k, v) per layer
        tensors = [t for kv in cache for t in kv]
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


def resolve(config: DecoderBenchConfig) -> tuple[str, torch.dtype, int]:
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {
        "auto": torch.float16 if device.startswith("cuda") else torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
    }[config.dtype]
    full = int(shape_of(config)["num_hidden_layers"])
    layers = config.layers or (full if device.startswith("cuda") else min(2, full))
    if not 1 <= layers <= full:
        raise ValueError(f"decoder layers must be in 1..{full} (the full model's count), got {layers}")
    return device, dtype, layers


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_decoder(layers: int, device: str, dtype: torch.dtype, seed: int = 0, shape: dict | None = None):
    """A causal LM with `shape` (default LLaVA-1.5-7B's LLaMA) and `layers` layers, seeded random
    weights, created directly in `dtype` on `device` (no float32 copy of a 7B model on the GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(shape or LLAVA_15_7B_TEXT)
    model_type = shape.pop("model_type", "llama")
    for key in ("dtype", "torch_dtype"):  # a saved config's dtype would override ours in from_config
        shape.pop(key, None)
    shape["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **shape)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwarg(dtype))
    return model.to(dtype).eval()


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_config's dtype argument: `dtype` since Transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


class DecoderStep:
    """Callables for one T: prefill (returns the first token) and a decode run of n tokens."""

    def __init__(self, model, context: int, new_tokens: int, device: str, dtype: torch.dtype, batch: int = 1):
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        self.model, self.new_tokens, self.context, self.batch = model, new_tokens, context, batch
        g = torch.Generator(device="cpu").manual_seed(context)
        hidden = model.config.hidden_size
        self.embeds = (torch.randn(batch, context, hidden, generator=g) * 0.02).to(device, dtype)

    @torch.inference_mode()
    def prefill(self):
        out = self.model(inputs_embeds=self.embeds, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), _cache_of(out)

    def prepare_decode(self) -> int:
        """Prefill once (untimed) for `decode`; -> the bytes the KV cache holds after prefill."""
        self._state = self.prefill()
        return cache_nbytes(self._state[1])

    def release(self) -> None:
        self.__dict__.pop("_state", None)

    @torch.inference_mode()
    def decode(self):
        """n greedy tokens from the prefilled cache; the cache is cropped back afterwards so
        every timed call decodes from the same context length."""
        if not hasattr(self, "_state"):
            self.prepare_decode()
        token, cache = self._state
        context = cache.get_seq_length()
        for _ in range(self.new_tokens):
            out = self.model(input_ids=token, use_cache=True, **{CACHE_KWARG: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache.crop(-(cache.get_seq_length() - context))  # new_tokens >= 1: never crop(0)
        return token


def describe(config: DecoderBenchConfig) -> dict:
    device, dtype, layers = resolve(config)
    shape = shape_of(config)
    full = int(shape["num_hidden_layers"])
    info = {k: v for k, v in asdict(config).items() if k != "shape"}
    return {
        **info,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "model_type": shape.get("model_type", "llama"),
        **{k: int(shape[k]) for k in _SHAPE_KEYS if k != "num_hidden_layers"},
        "head_dim": head_dim(shape),
        "llava_1_5_7b_shapes": is_llava_15_7b(shape),
        "layers_run": layers,
        "layers_full_model": full,
        "layer_override": layers != full,
    }
