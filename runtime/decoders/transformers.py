"""TransformersDecoder: the checkpoint's language model (PyTorch, Transformers) fed `inputs_embeds`.

The prompt ids are embedded with the model's own input embeddings, the T image slots are replaced by
the visual embeddings (what LlavaModel does with `masked_scatter`), and tokens are generated with
the KV cache: one prefill forward over the whole prompt, then one forward per new token. Batches
are left-padded with the attention mask and position ids that `GenerationMixin.generate` uses
(position = cumsum(mask) - 1), so greedy ids equal `generate(inputs_embeds=...)`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from apet_trt.apet_ops.compat import cache_kwarg, output_cache

from ..prompt import AssembledPrompt
from . import DecodeOutput, Decoder, OnStep, SamplingConfig, Visual


def _sample_filter(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order of Transformers' logits warpers)."""
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - s.top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


class TransformersDecoder(Decoder):
    name = "transformers"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        image_token_id: int,
        pad_token_id: int | None,
        eos_token_id: int | Sequence[int] | None,
        max_length: int,
    ):
        self.model = model.eval()
        self.embed = model.get_input_embeddings()
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else 0)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos_token_ids = torch.tensor(eos, dtype=torch.int64)
        self.max_length = int(max_length)
        self._cache_kw = cache_kwarg(model.forward)
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def build_inputs_embeds(self, prompts: Sequence[AssembledPrompt], visual: Visual):
        """-> (inputs_embeds [B, L, H], attention_mask [B, L], position_ids), left-padded.
        position_ids is [B, L] (0.. over the unpadded tokens, as generate computes it), or
        [P, B, L] when the prompts carry a family's own ids (e.g. Qwen2.5-VL's 3-D M-RoPE)."""
        self.check_batch(prompts, visual)
        b, length = len(prompts), max(int(p.input_ids.numel()) for p in prompts)
        ids = torch.full((b, length), self.pad_token_id, dtype=torch.int64)
        mask = torch.zeros((b, length), dtype=torch.int64)
        for i, p in enumerate(prompts):
            n = int(p.input_ids.numel())
            ids[i, length - n :] = p.input_ids
            mask[i, length - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        inputs_embeds = self.embed(ids)
        for i, p in enumerate(prompts):
            offset = length - int(p.input_ids.numel())
            rows = torch.cat(list(visual[i])).to(device=self.device, dtype=inputs_embeds.dtype)
            inputs_embeds[i, p.image_slots.to(self.device) + offset] = rows
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        if any(p.position_ids is not None for p in prompts):
            position_ids = _family_positions(prompts, position_ids)
        return inputs_embeds, mask, position_ids

    def _forward(self, cache, **inputs):
        kwargs = {self._cache_kw: cache, "use_cache": True, **inputs}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), output_cache(out)

    def _pick(self, logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator | None) -> torch.Tensor:
        if not s.do_sample:
            return logits.argmax(dim=-1)
        probs = _sample_filter(logits, s).softmax(dim=-1)
        return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)

    def generate(self, prompts: Sequence[AssembledPrompt], visual: Visual, sampling: SamplingConfig) -> DecodeOutput:
        return self.generate_streaming(prompts, visual, sampling, None)

    def prefill(self, prompts: Sequence[AssembledPrompt], visual: Visual) -> tuple[torch.Tensor, DecodeState]:
        """One forward over the prompts -> (the last position's logits [B, V] float32, what decoding
        continues from)."""
        inputs_embeds, mask, position_ids = self.build_inputs_embeds(prompts, visual)
        logits, cache = self._forward(None, inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids)
        # the next token's position: one past the largest so far (with 1-D positions, the last one);
        # family ids [P, B, L] continue from their largest over all P components alike
        position = position_ids.amax(dim=-1, keepdim=True)
        if position.dim() == 3:
            position = position.amax(dim=0, keepdim=True).expand_as(position).contiguous()
        return logits, DecodeState(cache, mask, position)

    def step(self, state: DecodeState, token: torch.Tensor) -> torch.Tensor:
        """One decode step: `token` [B] appended at the next position -> the logits [B, V] float32."""
        state.mask = torch.cat([state.mask, torch.ones_like(state.mask[:, :1])], dim=-1)
        state.position = state.position + 1
        logits, state.cache = self._forward(
            state.cache, input_ids=token.unsqueeze(-1), attention_mask=state.mask, position_ids=state.position
        )
        return logits

    @torch.inference_mode()
    def generate_streaming(
        self, prompts: Sequence[AssembledPrompt], visual: Visual, sampling: SamplingConfig, on_step: OnStep | None
    ) -> DecodeOutput:
        """Each step's tokens go to `on_step` as they are picked; the rows it returns stop there (their
        ids end with what they had), the others go on unchanged."""
        self.check_lengths(prompts, sampling.max_new_tokens)
        gen = None
        if sampling.do_sample:
            gen = torch.Generator()
            if sampling.seed is not None:
                gen.manual_seed(int(sampling.seed))
            else:
                gen.seed()
        eos = self.eos_token_ids.to(self.device)
        b = len(prompts)

        t0 = time.perf_counter()
        logits, state = self.prefill(prompts, visual)
        token = self._pick(logits, sampling, gen)
        _sync(self.device)
        t1 = time.perf_counter()

        out = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for step in range(sampling.max_new_tokens):
            token = torch.where(done, torch.full_like(token, self.pad_token_id), token)
            step_ids: list[int | None] = [None] * b
            for i in range(b):
                if not done[i]:
                    out[i].append(int(token[i]))
                    step_ids[i] = out[i][-1]
            if eos.numel():
                done = done | torch.isin(token, eos)
            if on_step is not None:
                for i in on_step(step_ids) or ():
                    done[i] = True
            if bool(done.all()) or step == sampling.max_new_tokens - 1:
                break
            token = self._pick(self.step(state, token), sampling, gen)
        _sync(self.device)
        t2 = time.perf_counter()
        return DecodeOutput(
            ids=out, first_token_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3, llm_kept=getattr(state, "kept", None)
        )


@dataclass
class DecodeState:
    """What decoding continues from after the prefill: the KV cache, the key mask [B, K] and the
    last position ([B, 1], or a family's [P, B, 1])."""

    cache: object
    mask: torch.Tensor
    position: torch.Tensor


def _family_positions(prompts: Sequence[AssembledPrompt], default: torch.Tensor) -> torch.Tensor:
    """The prompts' own [P, L] ids, left-padded into [P, B, L] (a prompt without its own ids takes
    the plain ones on every component); P == 1 gives [B, L]."""
    dims = {int(p.position_ids.shape[0]) for p in prompts if p.position_ids is not None}
    if len(dims) != 1:
        raise ValueError(f"prompts carry position ids with different numbers of components: {sorted(dims)}")
    (components,) = dims
    b, length = default.shape
    out = torch.zeros((components, b, length), dtype=torch.int64, device=default.device)
    for i, p in enumerate(prompts):
        n = int(p.input_ids.numel())
        own = default[i, length - n :].expand(components, n) if p.position_ids is None else p.position_ids
        if tuple(own.shape) != (components, n):
            raise ValueError(f"prompt {i}: position ids {tuple(own.shape)} for {n} tokens")
        out[:, i, length - n :] = own.to(default.device)
    return out[0] if components == 1 else out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
