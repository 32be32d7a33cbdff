"""Helpers (no tests here) for ApET's stage inside the LLM: an independent, slow reference of what
runtime/decoders/stage2.py must compute, written with Transformers' own forwards and the oracle.

At every generated token the reference recomputes everything without a KV cache: the whole sequence
(prompt + the tokens so far) through Transformers' language model, its hidden states after `layer`
layers (`output_hidden_states`, index `layer`), `apet_ops.compress_reference` (float64, seeds by
error rank) on each image's span of them, the pruned sequence (kept rows in position order, the
rest of the span gone) through a Transformers model of the remaining layers at positions 0..n'-1,
and the argmax of the last position's logits. One prompt at a time, no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apet_trt.apet_ops import ApetConfig, compress_reference


@dataclass
class Request:
    input_ids: torch.Tensor  # [n]
    images: list[tuple[torch.Tensor, torch.Tensor]]  # per image: (slot indices [R], rows [R, H])
    spans: list[int]  # per image, the rows (from its first) the stage prunes
    starts: list[int]  # per image, FPS's first seed within its span


def language_model(model):
    lm = model.get_decoder()
    return lm.get_decoder() if not hasattr(lm, "layers") else lm


def embeddings(model, request: Request, extra: list[int] = ()) -> torch.Tensor:
    """The prompt embedded by the model's own table, each image's slots holding its rows (what
    LlavaModel's masked_scatter does), then the `extra` generated ids: [1, n, H]."""
    ids = torch.cat([request.input_ids, torch.tensor(list(extra), dtype=torch.int64)])
    with torch.no_grad():
        x = model.get_input_embeddings()(ids).clone()
        for slots, rows in request.images:
            x[slots] = rows.to(x.dtype)
    return x.unsqueeze(0)


def hidden_after(model, inputs_embeds: torch.Tensor, layer: int) -> torch.Tensor:
    """Transformers' own hidden states after `layer` decoder layers (no cache): [1, n, H]."""
    lm = language_model(model)
    with torch.no_grad():
        out = lm(inputs_embeds=inputs_embeds, output_hidden_states=True, use_cache=False)
    return out.hidden_states[layer]


def upper_model(model, layer: int):
    """A Transformers model of the language model's layers from `layer` on (shared weights)."""
    import copy

    lm = language_model(model)
    config = copy.deepcopy(lm.config)
    config.num_hidden_layers = lm.config.num_hidden_layers - layer
    with torch.device("meta"):
        upper = type(lm)(config)
    upper.embed_tokens = lm.embed_tokens
    upper.layers = torch.nn.ModuleList(list(lm.layers)[layer:])
    upper.norm, upper.rotary_emb = lm.norm, lm.rotary_emb
    return upper.eval()


def pruned(hidden: torch.Tensor, request: Request, config: ApetConfig):
    """hidden [1, n, H] -> (pruned [1, n', H], per image the kept indices among its rows)."""
    x = hidden[0]
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    out = x.clone()
    kept = []
    for (slots, rows), span, start in zip(request.images, request.spans, request.starts):
        idx = slots[:span]
        tokens, positions = compress_reference(x[idx].unsqueeze(0), config, start=[start])
        keep[idx] = False
        keep[idx[positions[0]]] = True
        out[idx[positions[0]]] = tokens[0]
        kept.append(torch.cat([positions[0], torch.arange(span, rows.shape[0])]))
    return out[keep].unsqueeze(0), kept


def slow_generate(model, request: Request, layer: int, config: ApetConfig, new_tokens: int, eos: int | None):
    """Greedy ids, every step recomputed from scratch (see the module docstring)."""
    upper = upper_model(model, layer)
    head = model.get_output_embeddings()
    ids: list[int] = []
    for _ in range(new_tokens):
        hidden = hidden_after(model, embeddings(model, request, ids), layer)
        seq, _ = pruned(hidden, request, config)
        positions = torch.arange(seq.shape[1]).unsqueeze(0)
        with torch.no_grad():
            last = upper(inputs_embeds=seq, position_ids=positions, use_cache=False).last_hidden_state[:, -1]
            token = int(head(last).argmax(-1))
        ids.append(token)
        if token == eos:
            break
    return ids
