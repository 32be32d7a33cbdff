"""Stage2Decoder: the Transformers decoder with ApET's second stage inside the language model (the
paper's configuration: MaQianKun0/ApET llava/model/modeling_llama_x.py, `forward_x` and
`layer_prune`; docs/DESIGN.md, "Stage 2 inside the LLM").

Prefill, on the batch TransformersDecoder builds (left-padded, image slots filled with the rows):

1. decoder layers 0..L-1 run over the whole sequence with positions 0..n-1 (the official
   `rank_layer = layer_idx + 1 in layer_list`: the stage follows the L-th layer);
2. on each image's span of the hidden states (the rows the family names, `span_rows`: LLaVA-1.5 all
   of them, LLaVA-NeXT the base crop's) `apet_ops.ApetCompressor` with seeds placed by error rank
   runs in float32 from a new FPS start (the engine's fixed start, or a drawn one), keeping K rows in
   ascending position; the span's other rows leave the sequence;
3. the shorter sequences are re-padded and their positions renumbered 0..n'-1 contiguously, and
   layers L.. run over them.

The KV cache: one DynamicCache whose layers < L hold the whole sequence and layers >= L the pruned
one (each cache layer has its own length). A decode step appends its token to both, at position
n + s in layers < L and n' + s in layers >= L: the official decoding, which subtracts the pruned
count from the later layers' position ids. This is exact: the stage reads only the image rows'
hidden states after layer L-1, which no later token changes (causal attention), and a layer >= L
sees keys and values of the pruned sequence computed as a forward without cache over it computes
them; recomputing would give the same ids at a prefill per token (the tests hold the decoder to
such a slow reference). Masks are built here, per part, as additive [B, 1, q, kv] float masks
(a key is seen when it is a token, not padding, and not after the query; a padding query sees
itself only, so no row is all masked): the model's attention must take a 4-D mask (eager, sdpa).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from apet_trt.apet_ops import ApetCompressor, ApetConfig
from apet_trt.apet_ops.compat import cache_kwarg, layer_hidden

from ..prompt import AssembledPrompt
from . import Visual
from .transformers import DecodeState, TransformersDecoder

MASKABLE = ("eager", "sdpa")  # attention implementations that take an additive 4-D mask


@dataclass
class PrefillState(DecodeState):
    """DecodeState for both parts: `mask` / `position` are the whole sequence's (layers < L),
    `mask2` / `position2` the pruned one's (layers >= L), the cache holds both; `kept`: per prompt
    per image the indices among the image's rows the stage kept."""

    mask2: torch.Tensor = None
    position2: torch.Tensor = None
    kept: list[list[torch.Tensor]] = None


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (embeddings, layers, norm, rotary embedding) of a causal LM or a VLM."""
    lm = model.get_decoder()
    if not hasattr(lm, "layers") and hasattr(lm, "get_decoder"):
        lm = lm.get_decoder()
    missing = [a for a in ("layers", "norm", "rotary_emb") if not hasattr(lm, a)]
    if missing:
        raise RuntimeError(
            f"{type(model).__name__}: its language model {type(lm).__name__} has no {', '.join(missing)}; the LLM "
            "stage needs a decoder stack with 1-D rotary positions (LLaMA-like)"
        )
    return lm


def attention_mask_4d(mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """mask [B, K] (1: a token, 0: padding) over the keys, the queries being the last `queries` keys
    -> additive [B, 1, queries, K] (0 where seen, the dtype's minimum where not)."""
    k = mask.shape[1]
    key = torch.arange(k, device=mask.device)
    query = key[k - queries :]
    causal = key.unsqueeze(0) <= query.unsqueeze(1)  # [q, K]
    seen = (causal.unsqueeze(0) & mask.bool().unsqueeze(1)) | (key.unsqueeze(0) == query.unsqueeze(1))
    out = torch.zeros(seen.shape, dtype=dtype, device=mask.device)
    return out.masked_fill(~seen, torch.finfo(dtype).min).unsqueeze(1)


def left_padded(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt rows [n_b, H] -> (hidden [B, n, H] left-padded with zeros, mask [B, n])."""
    n = max(int(r.shape[0]) for r in rows)
    hidden = rows[0].new_zeros((len(rows), n, rows[0].shape[1]))
    mask = torch.zeros((len(rows), n), dtype=torch.int64, device=rows[0].device)
    for b, r in enumerate(rows):
        hidden[b, n - r.shape[0] :] = r
        mask[b, n - r.shape[0] :] = 1
    return hidden, mask


class Stage2Decoder(TransformersDecoder):
    """TransformersDecoder plus ApET after decoder layer `layer` (see the module docstring).

    layer       prune after this many decoder layers (1..layers-1)
    config      the compressor (keep K, basis, merge, ridge, seed_placement="error_rank", start)
    span_rows   an image's row count -> how many of its first rows the stage prunes (the family's
                `llm_stage_rows`); an image whose span is <= K passes unchanged
    start_seed  None: every image starts FPS at config.start; else starts are drawn per image from a
                generator seeded with it when the decoder is made
    """

    name = "transformers+llm-stage"
    llm_stage = True

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        layer: int,
        config: ApetConfig,
        span_rows: Callable[[int], int],
        start_seed: int | None = None,
        **decoder_kwargs,
    ):
        super().__init__(model, **decoder_kwargs)
        lm = language_model(model)
        self.layers, self.norm, self.rotary = list(lm.layers), lm.norm, lm.rotary_emb
        self.head = model.get_output_embeddings()
        attn = getattr(lm.config, "_attn_implementation", None) or "eager"
        if attn not in MASKABLE:
            raise ValueError(
                f"the LLM stage builds 4-D attention masks, which attention {attn!r} does not take; load the model "
                f"with attn_implementation one of {MASKABLE}"
            )
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < len(self.layers):
            raise ValueError(f"llm_stage.layer must be in 1..{len(self.layers) - 1} for this model, got {layer!r}")
        if config.layout != "image" or config.keep is None:
            raise ValueError("the LLM stage needs an image-layout ApetConfig with a fixed keep")
        self.layer, self.config, self.span_rows = layer, config, span_rows
        self.compressor = ApetCompressor(config)
        self._starts = None if start_seed is None else torch.Generator().manual_seed(int(start_seed))
        self._layer_cache_kw = cache_kwarg(self.layers[0].forward)
        self._lower, self._upper = slice(0, layer), slice(layer, None)

    # -- the forward, in two parts --------------------------------------------------------------
    def _layers(self, hidden, mask, positions, cache, part: slice) -> torch.Tensor:
        """Run layers[part] over `hidden` [B, q, H] whose keys are `mask` [B, K] (the last q are the
        queries) at `positions` [B, q]."""
        rope = self.rotary(hidden, positions)
        mask4 = attention_mask_4d(mask, hidden.shape[1], hidden.dtype)
        for layer in self.layers[part]:
            out = layer(
                hidden,
                attention_mask=mask4,
                position_ids=positions,
                position_embeddings=rope,
                use_cache=True,
                **{self._layer_cache_kw: cache},
            )
            hidden = layer_hidden(out)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden[:, -1:])).float()[:, -1]

    # -- the stage ------------------------------------------------------------------------------
    def _draw_start(self, span: int) -> int:
        if self._starts is None:
            return self.config.start
        return int(torch.randint(0, span, (1,), generator=self._starts))

    def prune(
        self, hidden: torch.Tensor, mask: torch.Tensor, prompts: Sequence[AssembledPrompt]
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
        """hidden [B, n, H] after layer L-1 (left-padded by `mask`) -> (the pruned hidden states
        re-padded, their mask, per prompt per image the indices among the image's rows kept)."""
        n, device = hidden.shape[1], hidden.device
        keep_k = self.config.keep
        jobs = []  # (prompt, image, span's sequence indices) of every image the stage prunes
        kept: list[list[torch.Tensor]] = []
        for b, p in enumerate(prompts):
            offset = n - int(p.input_ids.numel())
            rows = p.rows or (int(p.image_slots.numel()),)
            kept.append([])
            for i, slots in enumerate(torch.split(p.image_slots, list(rows))):
                span = self.span_rows(int(rows[i]))
                kept[b].append(torch.arange(int(rows[i])))
                if keep_k < span <= int(rows[i]):
                    jobs.append((b, i, slots[:span].to(device) + offset, self._draw_start(span)))
        tokens: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for span in sorted({len(j[2]) for j in jobs}):  # one compressor call per span length
            group = [j for j in jobs if len(j[2]) == span]
            x = torch.stack([hidden[b, idx] for b, _, idx, _ in group])
            start = torch.tensor([s for *_, s in group], dtype=torch.int64, device=device)
            out, positions = self.compressor(x, start)  # float32 inside, hidden's dtype out
            for g, (b, i, _, _) in enumerate(group):
                tokens[(b, i)] = (out[g], positions[g])
        sequences = []
        for b in range(len(prompts)):
            row, keep = hidden[b].clone(), mask[b].bool().clone()
            for i, idx in ((i, idx) for bb, i, idx, _ in jobs if bb == b):
                out, positions = tokens[(b, i)]
                keep[idx] = False  # the span's rows leave the sequence but for the kept ones,
                keep[idx[positions]] = True  # which take the compressed rows, in position order
                row[idx[positions]] = out
                rest = torch.arange(len(idx), int(kept[b][i].numel()))  # the image's rows after its span
                kept[b][i] = torch.cat([positions.cpu(), rest])
            sequences.append(row[keep])
        pruned, pruned_mask = left_padded(sequences)
        return pruned, pruned_mask, kept

    # -- generation: TransformersDecoder's loop over these two ---------------------------------
    def prefill(self, prompts: Sequence[AssembledPrompt], visual: Visual) -> tuple[torch.Tensor, PrefillState]:
        """The prompts through both parts of the model with the stage between them -> (the last
        position's logits [B, V] float32, what decoding continues from)."""
        from transformers import DynamicCache

        inputs_embeds, mask, positions = self.build_inputs_embeds(prompts, visual)
        if positions.dim() != 2:
            raise ValueError("the LLM stage renumbers 1-D positions; these prompts carry a family's own position ids")
        cache = DynamicCache()
        hidden = self._layers(inputs_embeds, mask, positions, cache, self._lower)
        hidden, mask2, kept = self.prune(hidden, mask, prompts)
        positions2 = (mask2.cumsum(-1) - 1).clamp_min(0)
        hidden = self._layers(hidden, mask2, positions2, cache, self._upper)
        state = PrefillState(cache, mask, positions[:, -1:], mask2, positions2[:, -1:], kept)
        return self._logits(hidden), state

    def step(self, state: PrefillState, token: torch.Tensor) -> torch.Tensor:
        """One decode step: `token` [B] appended to both parts (positions n + s and n' + s) -> logits."""
        ones = torch.ones_like(state.mask[:, :1])
        state.mask, state.mask2 = torch.cat([state.mask, ones], dim=-1), torch.cat([state.mask2, ones], dim=-1)
        state.position, state.position2 = state.position + 1, state.position2 + 1
        hidden = self.embed(token.unsqueeze(-1))
        hidden = self._layers(hidden, state.mask, state.position, state.cache, self._lower)
        hidden = self._layers(hidden, state.mask2, state.position2, state.cache, self._upper)
        return self._logits(hidden)


def stage2_decoder(model: torch.nn.Module, manifest, family, **decoder_kwargs) -> Stage2Decoder:
    """The decoder for an engine directory whose manifest has llm_stage (and maybe random_start: the
    LLM stage draws from seed + 1, the vision stage from seed)."""
    stage = dict(manifest.llm_stage)
    layer = stage.pop("layer", None)
    if not family.llm_stage:
        raise RuntimeError(f"{manifest.root}: the {family.name} family has no ApET stage inside the LLM (llm_stage)")
    try:
        config = ApetConfig.from_dict(stage)
    except (TypeError, ValueError) as exc:
        raise RuntimeError(f"{manifest.root}: manifest llm_stage is not a valid ApET config: {exc}") from exc
    seeded = manifest.random_start
    return Stage2Decoder(
        model,
        layer=layer,
        config=config,
        span_rows=family.llm_stage_rows,
        start_seed=None if not seeded else int(seeded["seed"]) + 1,
        **decoder_kwargs,
    )
