"""scripts/parity_costs.py against independent counts: the per-layer FLOPs against torch's own
FlopCounterMode on a Transformers LLaMA decoder layer (eager attention, GQA), and the KV bytes
against a DynamicCache actually filled by that layer's model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from apet_trt.scripts.parity_costs import Shapes, cost, table


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    shapes = Shapes(layers=4, hidden=64, intermediate=176, kv_dim=2 * 8, vocab=97)
    return model, shapes


@pytest.mark.parametrize("n", [1, 7, 33])
def test_layer_flops_equal_torch_flop_counter(tiny, n):
    model, shapes = tiny
    x = torch.randn(1, n, 64)
    positions = torch.arange(n).unsqueeze(0)
    rope = model.model.rotary_emb(x, positions)
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model.layers[0](x, attention_mask=mask, position_embeddings=rope, position_ids=positions)
    assert counter.get_total_flops() == shapes.layer_flops(n)


def test_kv_bytes_equal_a_filled_cache_and_budgets_match_their_mean(tiny):
    model, shapes = tiny
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 97, (1, 11)), use_cache=True)
    cache = out.past_key_values
    held = sum(t.numel() * 2 for layer in cache.layers for t in (layer.keys, layer.values))  # as float16
    assert held == round(cost(shapes, "x", 5, 5, shapes.layers, 6).kv_mib * 2**20)
    big = Shapes.of_preset()
    rows = {r.name.split(" (")[0]: r for r in table(big, 40)}
    for budget in (64, 128, 192):
        vision_only = rows[f"vision-only T={budget}"]
        assert (
            rows[f"--budget {budget}"].kv_mib == vision_only.kv_mib and rows[f"--budget {budget}"].mean_rows == budget
        )
        assert 0 < rows[f"--budget {budget}"].prefill_gflops / vision_only.prefill_gflops - 1 < 2e-3
