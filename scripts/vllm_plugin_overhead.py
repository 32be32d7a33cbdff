"""The CPU work apet-trt's vLLM plugin adds to a request, measured in-process (no server, so the machine's
other load hardly matters): its payload check (`check_request`) and its M-RoPE layout
(`get_mrope_input_positions`) for an image of N rows of which R are kept, against vLLM's own layout of
the same prompt with the image's grid. Run it with the vLLM venv's python (the plugin installed):

    ~/.cache/apet-trt/vllm-venv/bin/python scripts/vllm_plugin_overhead.py --out docs/results/vllm_plugin/overhead.json

Sizes default to Qwen2.5-VL-7B's ApET range (256..2048 tokens per image, ratio 0.3, H=3584).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace


def _features(grid, kept, text_before: int, apet: bool):
    import torch
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    t, h, w = grid
    if apet:
        gw = w // 2
        ids = torch.stack([torch.zeros_like(kept), kept // gw, kept % gw], 1)
        data = {
            "apet_mrope_positions": SimpleNamespace(data=ids),
            "apet_grid_thw": SimpleNamespace(data=torch.tensor(grid)),
            "apet_num_rows": SimpleNamespace(data=torch.tensor(len(kept))),
        }
        length = len(kept)
    else:
        data = {"image_grid_thw": SimpleNamespace(data=torch.tensor(grid))}
        length = t * h * w // 4
    return [MultiModalFeatureSpec(data, "image", "x", PlaceholderRange(offset=text_before, length=length))], length


def _time(fn, repeats: int) -> float:
    fn()  # warm
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="256,1024,2048", help="uncompressed rows per image (square grids)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default="docs/results/vllm_plugin/overhead.json")
    args = p.parse_args(argv)

    import torch
    import vllm
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as Own

    from apet_trt.vllm_plugin.qwen2_5_vl import ApetQwen2_5_VLForConditionalGeneration as Plugin
    from apet_trt.vllm_plugin.qwen2_5_vl import check_request

    cfg = SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2, tokens_per_second=2.0))
    me = SimpleNamespace(config=cfg)  # the two methods read only the config and iter_mm_grid_thw
    me.iter_mm_grid_thw = lambda features: Own.iter_mm_grid_thw(me, features)
    rows = []
    for n in (int(x) for x in args.tokens.split(",")):
        side = int(round(n**0.5))
        grid, r = (1, 2 * side, 2 * side), int(args.ratio * side * side)
        kept = torch.sort(torch.randperm(side * side)[:r]).values
        before, after = 20, 30
        apet_features, apet_len = _features(grid, kept, before, apet=True)
        own_features, own_len = _features(grid, kept, before, apet=False)
        apet_tokens, own_tokens = [0] * (before + apet_len + after), [0] * (before + own_len + after)
        request = {
            "image_embeds": torch.randn(r, args.hidden),
            "apet_mrope_positions": apet_features[0].data["apet_mrope_positions"].data,
            "apet_grid_thw": torch.tensor([grid]),
            "apet_num_rows": torch.tensor([r]),
        }
        rows.append(
            {
                "rows_uncompressed": side * side,
                "rows_kept": r,
                "plugin_check_us": _time(lambda: check_request(request, 2, args.hidden), args.repeats),
                "plugin_positions_us": _time(
                    lambda: Plugin.get_mrope_input_positions(me, apet_tokens, apet_features), args.repeats
                ),
                "own_positions_us": _time(
                    lambda: Own.get_mrope_input_positions(me, own_tokens, own_features), args.repeats
                ),
            }
        )
    result = {
        "what": "CPU time the plugin adds per request (median microseconds): the payload check and the M-RoPE "
        "layout of one image of N rows (R kept), vs vLLM's own layout of the uncompressed image",
        "vllm_version": vllm.__version__,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "images": rows,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
