"""Decoder side of the benchmark: what T visual tokens cost the LLM.

A LLaMA decoder with LLaVA-1.5-7B's shapes (hidden 4096, 32 heads, MLP 11008, vocab 32064) and
seeded random weights; on a CPU the layer count is overridden (default 2) and the output says so.
Per T: prefill / time to first token on `text + T` embeddings, decode tokens per second with the
KV cache, and the KV-cache bytes the full model would hold for that context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

LLAVA_15_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                        num_key_value_heads=32, num_hidden_layers=32, vocab_size=32064,
                        max_position_embeddings=4096, rms_norm_eps=1e-5)


@dataclass
class DecoderBenchConfig:
    layers: int | None = None     # None: all 32 on a GPU, 2 on a CPU
    text_tokens: int = 40         # "USER: <image>\nDescribe this image in detail. ASSISTANT:" ~ 20-40
    new_tokens: int = 8
    dtype: str = "auto"           # auto: float16 on a GPU, float32 on a CPU
    device: str = "auto"


# transformers 5 renamed `past_key_values` to `cache` (TensorRT-LLM installs still pin 4.x)
CACHE_KWARG = "cache" if int(__import__("transformers").__version__.split(".")[0]) >= 5 else "past_key_values"


def _cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def kv_cache_bytes(context: int, layers: int = 32, kv_dim: int = 4096, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for `context` tokens (fp16 by default)."""
    return 2 * layers * kv_dim * context * bytes_per_value


def resolve(config: DecoderBenchConfig) -> tuple[str, torch.dtype, int]:
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.float16 if device == "cuda" else torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[config.dtype]
    layers = config.layers or (32 if device == "cuda" else 2)
    return device, dtype, layers


def build_decoder(layers: int, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAVA_15_7B_TEXT, "num_hidden_layers": layers})
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


class DecoderStep:
    """Callables for one T: prefill (returns the first token) and a decode run of n tokens."""

    def __init__(self, model, context: int, new_tokens: int, device: str, dtype: torch.dtype):
        self.model, self.new_tokens = model, new_tokens
        g = torch.Generator(device="cpu").manual_seed(context)
        hidden = model.config.hidden_size
        self.embeds = (torch.randn(1, context, hidden, generator=g) * 0.02).to(device, dtype)

    @torch.inference_mode()
    def prefill(self):
        out = self.model(inputs_embeds=self.embeds, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), _cache_of(out)

    @torch.inference_mode()
    def decode(self):
        """n greedy tokens from the prefilled cache; the cache is cropped back afterwards so
        every timed call decodes from the same context length."""
        if not hasattr(self, "_state"):
            self._state = self.prefill()
        token, cache = self._state
        context = cache.get_seq_length()
        for _ in range(self.new_tokens):
            out = self.model(input_ids=token, use_cache=True, **{CACHE_KWARG: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache.crop(-(cache.get_seq_length() - context))
        return token


def describe(config: DecoderBenchConfig) -> dict:
    device, dtype, layers = resolve(config)
    return {**asdict(config), "device": device, "dtype": str(dtype).replace("torch.", ""),
            "layers_run": layers, "layers_full_model": 32,
            "layer_override": layers != 32}
