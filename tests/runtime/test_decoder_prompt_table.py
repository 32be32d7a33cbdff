"""The TensorRT-LLM prompt-table inputs, checked without TensorRT-LLM: TensorRT-LLM's lookup
(PromptTuningEmbedding: an id >= vocab_size reads row (id - vocab_size) + task * T of the table)
is emulated in a Transformers language model, and must give the logits of the inputs_embeds path,
for batch 1 and 3 with different images (embeddings) per request, of the same and of different
row counts (LLaVA-NeXT's rows depend on the image)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from apet_trt.runtime.decoders import TransformersDecoder
from apet_trt.runtime.decoders.prompt_table import build_prompt_table_inputs
from apet_trt.runtime.prompt import AssembledPrompt

VOCAB, HIDDEN, IMAGE_ID, PAD_ID, T = 96, 48, 90, 0, 7


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def _prompts(rows: list[int], rng: torch.Generator) -> tuple[list[AssembledPrompt], list[list[torch.Tensor]]]:
    """Prompts whose image has rows[b] slots, and a different random "image" (rows) for each."""
    prompts, visual = [], []
    for r in rows:
        before = int(torch.randint(1, 6, (1,), generator=rng))
        after = int(torch.randint(1, 9, (1,), generator=rng))
        text = torch.randint(1, IMAGE_ID, (before + after,), generator=rng)
        ids = torch.cat([text[:before], torch.full((r,), IMAGE_ID), text[before:]])
        prompts.append(AssembledPrompt(input_ids=ids, image_slots=torch.arange(before, before + r), text="", rows=(r,)))
        visual.append([torch.randn(r, HIDDEN, generator=rng)])
    return prompts, visual


def emulate_trtllm_embedding(
    embed: torch.nn.Embedding, ids: torch.Tensor, task: int, table_2d: torch.Tensor, task_vocab_size: int
) -> torch.Tensor:
    """tensorrt_llm/layers/embedding.py PromptTuningEmbedding.forward, in torch, one request."""
    virtual = ids > VOCAB - 1
    normal = embed(torch.where(virtual, torch.full_like(ids, VOCAB - 1), ids))
    rows = torch.where(virtual, ids - VOCAB, torch.zeros_like(ids)) + task * task_vocab_size
    return torch.where(virtual.unsqueeze(-1), table_2d[rows], normal)


def _reference_logits(model, prompts, visual):
    """The inputs_embeds path (TransformersDecoder's batch construction), per request unpadded."""
    dec = TransformersDecoder(model, image_token_id=IMAGE_ID, pad_token_id=PAD_ID, eos_token_id=None, max_length=256)
    inputs_embeds, mask, position_ids = dec.build_inputs_embeds(prompts, visual)
    with torch.no_grad():
        logits = model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids).logits
    return [logits[b, mask.shape[1] - p.input_ids.numel() :] for b, p in enumerate(prompts)]


def _table_logits(model, prompts, visual, *, tasks=None):
    inputs = build_prompt_table_inputs(
        [p.input_ids for p in prompts],
        [p.image_slots for p in prompts],
        [torch.cat(images) for images in visual],
        vocab_size=VOCAB,
        dtype=torch.float32,
    )
    table_2d = inputs.prompt_table.reshape(-1, HIDDEN)  # [B*R, H]: the layer's concatenated tables
    tasks = inputs.tasks if tasks is None else tasks
    out = []
    for ids, task in zip(inputs.batch_input_ids, tasks):  # TensorRT-LLM packs requests: no padding
        ids = ids.to(torch.int64)
        embeds = emulate_trtllm_embedding(model.get_input_embeddings(), ids, task, table_2d, inputs.task_vocab_size)
        with torch.no_grad():
            out.append(model(inputs_embeds=embeds.unsqueeze(0)).logits[0])
    return out, inputs


@pytest.mark.parametrize("rows", [[T], [T, T, T], [T, 3, 11]])
def test_prompt_table_lookup_matches_inputs_embeds(model, rng, rows):
    batch = len(rows)
    prompts, visual = _prompts(rows, rng)
    ref = _reference_logits(model, prompts, visual)
    got, inputs = _table_logits(model, prompts, visual)
    assert inputs.prompt_tasks == ",".join(str(b) for b in range(batch))
    assert inputs.prompt_table.shape == (batch, max(rows), HIDDEN)
    for b, p in enumerate(prompts):
        ids = inputs.batch_input_ids[b]
        assert ids.dtype == torch.int32
        assert ids[p.image_slots].tolist() == [VOCAB + i for i in range(rows[b])]
        other = torch.ones_like(ids, dtype=torch.bool)
        other[p.image_slots] = False
        assert torch.equal(ids[other].long(), p.input_ids[other])
        torch.testing.assert_close(got[b], ref[b], rtol=1e-4, atol=1e-4)
    # ModelRunnerCpp hands request i the table prompt_table[task_i]: same rows as the 2-D formula
    for b in range(batch):
        torch.testing.assert_close(inputs.prompt_table[inputs.tasks[b], : rows[b]], visual[b][0])


def test_wrong_task_ids_read_another_image(model, rng):
    """The check above can fail: every request on task 0 reads request 0's image."""
    prompts, visual = _prompts([T, T, T], rng)
    ref = _reference_logits(model, prompts, visual)
    got, _ = _table_logits(model, prompts, visual, tasks=[0, 0, 0])
    assert not torch.allclose(got[2], ref[2], rtol=1e-4, atol=1e-4)


def test_prompt_table_dtype_and_errors(rng):
    prompts, visual = _prompts([T, T], rng)
    rows = [v[0] for v in visual]
    ids, slots = [p.input_ids for p in prompts], [p.image_slots for p in prompts]
    inputs = build_prompt_table_inputs(ids, slots, rows, vocab_size=VOCAB, dtype=torch.float16)
    assert inputs.prompt_table.dtype == torch.float16
    with pytest.raises(ValueError, match="image slots"):
        build_prompt_table_inputs(ids, [s[:-1] for s in slots], rows, vocab_size=VOCAB, dtype=torch.float16)
    with pytest.raises(ValueError, match="prompts"):
        build_prompt_table_inputs(ids[:1], slots[:1], rows, vocab_size=VOCAB, dtype=torch.float16)
    with pytest.raises(ValueError, match="one width"):
        build_prompt_table_inputs(ids, slots, [rows[0], rows[1][:, :5]], vocab_size=VOCAB, dtype=torch.float16)
