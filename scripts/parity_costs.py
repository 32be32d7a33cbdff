"""What the paper's budgets cost the language model, counted: prefill FLOPs and KV-cache bytes of
`apet build --budget B` (the vision stage keeps T1 rows, ApET inside the LLM keeps T2 after layer
L) against vision-only ApET at T rows, at LLaVA-1.5-7B's language-model shapes.

    python scripts/parity_costs.py                    # markdown table (the README's), 40 text tokens
    python scripts/parity_costs.py --text-tokens 60 --json docs/results/parity/costs.json

Counted per decoder layer over n tokens, multiply-adds x 2 (the convention of FastV / PDrop-style
tables): the projections n * d * (2 d + 2 kv_heads * head_dim), attention scores and their use
2 * n^2 * d (the full square, no causal saving), the gated MLP 3 * n * d * m; plus the LM head for the
last position, 2 * d * V, and for the budgets the compressor on the image's hidden states
(farthest point sampling, the ridge projection, the errors and the merge: about
2 * (3 k N D + 4 k N D + 2 N T2 D) FLOPs). KV cache: keys and values of every layer in float16,
2 * kv_heads * head_dim * 2 bytes per token per layer; with the LLM stage layers < L hold T1 + text
rows and layers >= L hold T2 + text. So --budget 64 (96 then 32 after layer 16 of 32) holds exactly
the KV bytes of T = 64 whatever the text, and costs its prefill FLOPs plus the difference of the
squares and the compressor, 0.05 % at 40 text tokens.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from apet_trt.export.parity import OFFICIAL_BUDGETS
from apet_trt.export.presets import preset_config

VISION_ONLY = (576, 288, 192, 128, 96, 64, 32)
KV_BYTES = 2  # float16


@dataclass(frozen=True)
class Shapes:
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # kv_heads * head_dim
    vocab: int
    basis: int = 10

    @classmethod
    def of_preset(cls, name: str = "llava-1.5-7b-arch") -> Shapes:
        text = preset_config(name)[0].text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = text.num_key_value_heads or text.num_attention_heads
        return cls(
            text.num_hidden_layers, text.hidden_size, text.intermediate_size, kv_heads * head_dim, text.vocab_size
        )

    def layer_flops(self, n: int) -> int:
        d = self.hidden
        return 2 * (n * d * (2 * d + 2 * self.kv_dim) + 2 * n * n * d + 3 * n * d * self.intermediate)

    def compressor_flops(self, rows: int, keep: int) -> int:
        k, d = self.basis, self.hidden
        return 2 * (3 * k * rows * d + 4 * k * rows * d + 2 * rows * keep * d)

    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.kv_dim * KV_BYTES


@dataclass
class Cost:
    name: str
    rows_before: int  # visual rows in layers < L (all layers for vision-only)
    rows_after: int  # visual rows in layers >= L
    layer: int  # L (= all layers for vision-only)
    prefill_gflops: float
    kv_mib: float
    mean_rows: float  # visual rows averaged over the layers


def cost(shapes: Shapes, name: str, t1: int, t2: int, layer: int, text: int) -> Cost:
    lower, upper = layer, shapes.layers - layer
    flops = lower * shapes.layer_flops(text + t1) + upper * shapes.layer_flops(text + t2)
    flops += 2 * shapes.hidden * shapes.vocab
    if t2 != t1:
        flops += shapes.compressor_flops(t1, t2)
    kv = shapes.kv_bytes_per_token_layer() * (lower * (text + t1) + upper * (text + t2))
    return Cost(name, t1, t2, layer, flops / 1e9, kv / 2**20, (lower * t1 + upper * t2) / shapes.layers)


def table(shapes: Shapes, text: int) -> list[Cost]:
    rows = [cost(shapes, f"vision-only T={t}", t, t, shapes.layers, text) for t in VISION_ONLY]
    for budget, (t1, layer, t2) in OFFICIAL_BUDGETS.items():
        rows.append(cost(shapes, f"--budget {budget} ({t1} -> {t2} after layer {layer})", t1, t2, layer, text))
    return rows


def markdown(rows: list[Cost], text: int) -> str:
    base = next(r for r in rows if r.name == "vision-only T=576")
    lines = [
        f"| configuration ({text} text tokens) | visual rows, layers < L / >= L | mean | prefill GFLOPs | / T=576 "
        "| KV cache (fp16, 32 layers) | / T=576 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = f"{r.rows_before}" if r.rows_before == r.rows_after else f"{r.rows_before} / {r.rows_after}"
        lines.append(
            f"| {r.name} | {split} | {r.mean_rows:g} | {r.prefill_gflops:,.0f} "
            f"| {r.prefill_gflops / base.prefill_gflops:.3f} | {r.kv_mib:.1f} MiB | {r.kv_mib / base.kv_mib:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text-tokens", type=int, default=40, help="text tokens of the prompt (default 40)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.text_tokens < 0:
        p.error("--text-tokens must be >= 0")
    shapes = Shapes.of_preset()
    rows = table(shapes, args.text_tokens)
    print(markdown(rows, args.text_tokens))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"shapes": asdict(shapes), "text_tokens": args.text_tokens, "rows": [asdict(r) for r in rows]}
        out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
