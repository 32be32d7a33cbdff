"""ApET's stage inside the LLM (runtime/decoders/stage2.py) against independent answers:

- kept set: the decoder's equals `apet_ops.compress_reference` (seeds by error rank) applied to the
  hidden states Transformers' own language model computes after `layer` layers, for L=1 of 2 layers
  and for the official index scheme, L=16 of 18; fixed and drawn starts; the pruned sequence's rows
  equal the oracle's tokens (float64) within 1e-4 and the text rows are untouched;
- ids: greedy ids with the KV cache equal a slow reference that recomputes the whole pruned forward
  without cache at every step (tests/helpers/stage2.py), for several prompts batched with padding,
  for a stage over all of an image's rows (LLaVA-1.5) and over its first rows only (LLaVA-NeXT's
  base crop), and for two images in one prompt;
- masks: the 4-D mask against a brute-force one; refusals in one line.
"""

from __future__ import annotations

import pytest
import torch

from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.runtime.decoders import SamplingConfig, Stage2Decoder
from apet_trt.runtime.decoders.stage2 import attention_mask_4d
from apet_trt.runtime.prompt import PromptAssembler, PromptFormat
from helpers.apet_cases import MARGIN, decision_margin
from helpers.engines import TEMPLATE, make_model, make_tokenizer
from helpers.stage2 import Request, embeddings, hidden_after, slow_generate

PROMPTS = ["What is it?", "Describe the picture in a few words, please.", "Colour?"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module", params=[(2, 1), (18, 16)], ids=["L1-of-2", "L16-of-18"])
def model_layer(request, tokenizer):
    layers, layer = request.param
    return make_model(tokenizer, seed=layers, text_layers=layers), layer


def _assembler(tokenizer, model):
    fmt = PromptFormat(TEMPLATE, "<image>", int(model.config.image_token_id))
    return PromptAssembler(fmt, tokenizer)


def _decoder(model, tokenizer, layer, config, span_rows=lambda r: r, start_seed=None):
    return Stage2Decoder(
        model,
        layer=layer,
        config=config,
        span_rows=span_rows,
        start_seed=start_seed,
        image_token_id=model.config.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_length=160,
    )


def _request(assembled, visual, spans, starts) -> Request:
    slots = torch.split(assembled.image_slots, list(assembled.rows))
    return Request(assembled.input_ids, list(zip(slots, visual)), spans, starts)


def _rows(model, count, rows, rng):
    h = model.config.text_config.hidden_size
    return [torch.randn(rows, h, generator=rng) * 0.5 for _ in range(count)]


def _well_posed(model, layer, config, assembled_of, rows_of, rng, tries=20):
    """Draw rows until every span's decisions have a clear margin (float32 vs float64 near-ties)."""
    for _ in range(tries):
        visual = rows_of(rng)
        ok = True
        for a, v in zip(assembled_of(visual), visual):
            hidden = hidden_after(model, embeddings(model, _request(a, [v], [v.shape[0]], [0])), layer)[0]
            ok &= decision_margin(hidden[a.image_slots], config, config.start) >= MARGIN
        if ok:
            return visual
    pytest.skip("no well-posed draw in 20 tries")


@pytest.mark.parametrize("start_seed", [None, 5])
def test_kept_set_equals_the_oracle_on_transformers_hidden_states(model_layer, tokenizer, rng, start_seed):
    model, layer = model_layer
    config = ApetConfig(keep=8, basis=4, seed_placement="error_rank")
    assemble = _assembler(tokenizer, model)
    prompts = PROMPTS[:2]
    visual = _well_posed(
        model, layer, config, lambda v: [assemble(p, 24) for p in prompts], lambda g: _rows(model, 2, 24, g), rng
    )
    assembled = [assemble(p, 24) for p in prompts]
    decoder = _decoder(model, tokenizer, layer, config, start_seed=start_seed)
    out = decoder.generate(assembled, [[v] for v in visual], SamplingConfig(max_new_tokens=1))
    draws = torch.Generator().manual_seed(start_seed) if start_seed is not None else None
    for b, (a, v) in enumerate(zip(assembled, visual)):
        start = 0 if draws is None else int(torch.randint(0, 24, (1,), generator=draws))
        hidden = hidden_after(model, embeddings(model, _request(a, [v], [24], [start])), layer)[0]
        tokens, positions = compress_reference(hidden[a.image_slots].unsqueeze(0), config, start=[start])
        assert torch.equal(out.llm_kept[b][0], positions[0]), f"prompt {b}"


def test_pruned_sequence_equals_the_oracle(model_layer, tokenizer, rng):
    model, layer = model_layer
    config = ApetConfig(keep=8, basis=4, seed_placement="error_rank")
    assemble = _assembler(tokenizer, model)
    visual = _well_posed(
        model, layer, config, lambda v: [assemble(PROMPTS[0], 24)], lambda g: _rows(model, 1, 24, g), rng
    )
    a = assemble(PROMPTS[0], 24)
    hidden = hidden_after(model, embeddings(model, _request(a, visual, [24], [0])), layer)
    decoder = _decoder(model, tokenizer, layer, config)
    seq, mask, kept = decoder.prune(hidden, torch.ones(hidden.shape[:2], dtype=torch.int64), [a])
    tokens, positions = compress_reference(hidden[0, a.image_slots].unsqueeze(0), config)
    first = int(a.image_slots[0])
    assert seq.shape[1] == hidden.shape[1] - 24 + 8 and bool(mask.all())
    assert torch.equal(seq[0, :first], hidden[0, :first]) and torch.equal(seq[0, first + 8 :], hidden[0, first + 24 :])
    scale = float(tokens.abs().max())
    assert float((seq[0, first : first + 8] - tokens[0]).abs().max()) <= 1e-4 * scale
    assert torch.equal(kept[0][0], positions[0])


@pytest.mark.parametrize("case", ["all-rows", "first-rows", "two-images"])
def test_greedy_ids_with_cache_equal_the_slow_reference(model_layer, tokenizer, rng, case):
    model, layer = model_layer
    config = ApetConfig(keep=6, basis=4, seed_placement="error_rank")
    assemble = _assembler(tokenizer, model)
    if case == "all-rows":  # LLaVA-1.5: the stage prunes all of an image's rows
        counts, span_rows = [[20], [20]], (lambda r: r)
    elif case == "first-rows":  # LLaVA-NeXT: the base crop's rows only, rows per image vary
        counts, span_rows = [[30], [19]], (lambda r: min(16, r))
    else:  # two images in one prompt, each pruned
        counts, span_rows = [[16, 20], [18, 12]], (lambda r: r)
    prompts, visual = [], []
    for i, rows in enumerate(counts):
        text = PROMPTS[i] if len(rows) == 1 else "USER: <image> and <image>\n" + PROMPTS[i] + " ASSISTANT:"
        prompts.append(assemble(text, rows))
        visual.append([torch.randn(r, model.config.text_config.hidden_size, generator=rng) * 0.5 for r in rows])
    decoder = _decoder(model, tokenizer, layer, config, span_rows=span_rows, start_seed=11)
    new = 5
    out = decoder.generate(prompts, visual, SamplingConfig(max_new_tokens=new))
    draws = torch.Generator().manual_seed(11)
    for b, (a, v) in enumerate(zip(prompts, visual)):
        spans = [span_rows(r.shape[0]) for r in v]
        starts = [int(torch.randint(0, s, (1,), generator=draws)) for s in spans]
        request = _request(a, v, spans, starts)
        expected = slow_generate(model, request, layer, config, new, tokenizer.eos_token_id)
        assert out.ids[b] == expected, f"prompt {b}"
        for i, s in enumerate(spans):  # the rows after an image's span stay
            assert out.llm_kept[b][i][config.keep :].tolist() == list(range(s, v[i].shape[0]))


def test_attention_mask_against_brute_force(rng):
    mask = (torch.rand(3, 9, generator=rng) > 0.3).long()
    mask[:, -1] = 1
    for q in (9, 1, 4):
        got = attention_mask_4d(mask, q, torch.float32)
        for b in range(3):
            for i in range(q):
                query = 9 - q + i
                for k in range(9):
                    seen = (k <= query and mask[b, k] == 1) or k == query
                    assert (got[b, 0, i, k] == 0) == seen


def test_refusals(tokenizer):
    model = make_model(tokenizer, text_layers=2)
    config = ApetConfig(keep=6, basis=4, seed_placement="error_rank")
    for layer in (0, 2, True):
        with pytest.raises(ValueError, match="llm_stage.layer must be in 1..1"):
            _decoder(model, tokenizer, layer, config)
    model.get_decoder().config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="4-D attention masks"):
        _decoder(model, tokenizer, 1, config)


def test_streaming_gives_the_ids_of_generate_and_stops_rows(tokenizer, rng):
    model = make_model(tokenizer, text_layers=2)
    config = ApetConfig(keep=6, basis=4, seed_placement="error_rank")
    assemble = _assembler(tokenizer, model)
    prompts = [assemble(p, 16) for p in PROMPTS[:2]]
    visual = [[torch.randn(16, model.config.text_config.hidden_size, generator=rng)] for _ in prompts]
    decoder = _decoder(model, tokenizer, 1, config)
    sampling = SamplingConfig(max_new_tokens=5)
    whole = decoder.generate(prompts, visual, sampling)
    steps = []
    streamed = decoder.generate_streaming(prompts, visual, sampling, lambda ids: steps.append(ids))
    assert streamed.ids == whole.ids and all(torch.equal(a, b) for a, b in zip(streamed.llm_kept[0], whole.llm_kept[0]))
    assert [[s[b] for s in steps if s[b] is not None] for b in range(2)] == whole.ids
    stopped = decoder.generate_streaming(prompts, visual, sampling, lambda ids: [1])  # row 1 leaves after a token
    assert stopped.ids[0] == whole.ids[0] and stopped.ids[1] == whole.ids[1][:1]
