"""Inputs for ApET tests: fresh random features whose decisions are well posed, and structured ones.

The oracle computes in float64, the graph form in float32. Where two candidates are closer than
float32 can resolve (a genuine near-tie, not an exact tie), either answer is right, so random
inputs are drawn again until every decision the oracle makes has a clear margin. Exact ties
(duplicated, constant or zero tokens) are kept: both forms must break them the same way.
"""

from __future__ import annotations

import torch

from apet_trt.apet_ops import ApetConfig
from apet_trt.apet_ops.reference import cosine_similarity, decide

MARGIN = 1e-5  # relative; float32 noise in these decisions is ~1e-7 (measured), so 100x headroom


def _smallest_nonzero_gap(sorted_desc: torch.Tensor, index: int, scale: float) -> float:
    """Relative gap between entries index-1 and index of a descending tensor; exact ties -> inf."""
    if index <= 0 or index >= len(sorted_desc):
        return float("inf")
    gap = float(sorted_desc[index - 1] - sorted_desc[index])
    return float("inf") if gap == 0 else gap / max(scale, 1e-300)


def _cuts(config: ApetConfig, t: int) -> list[int]:
    """Places in the error ranking where a near-tie would change the output: the cut at T, and
    whatever order the output depends on inside the kept set."""
    k = config.basis
    if config.layout == "video":  # the kept rows leave in error order
        return list(range(1, t + 1))
    if config.seed_placement == "error_rank":  # seed j goes to the slot of rank T-k+j
        return list(range(t - k, t + 1))
    return [t - k, t]


def decision_margin(x: torch.Tensor, config: ApetConfig, start: int | None = None) -> float:
    """Smallest relative margin of the oracle's decisions for one image x [N, D] (video layout:
    one frame, CLS first)."""
    x = x.double()
    dec = decide(x, config, start)
    rows = x[1:] if config.layout == "video" else x
    t = config.keep_for(x.shape[0]) if config.layout == "image" else config.keep
    margins = []
    # FPS: at each step, the winner against the runner-up
    min_dist = ((rows - rows[dec.seeds[0]]) ** 2).sum(1)
    for seed in dec.seeds[1:]:
        top = min_dist.topk(2).values
        margins.append(_smallest_nonzero_gap(top, 1, float(top[0])))
        min_dist = torch.minimum(min_dist, ((rows - rows[seed]) ** 2).sum(1))
    # ranking: the cuts the output depends on
    errs = dec.errors[dec.order]
    scale = float(errs[0])
    margins += [_smallest_nonzero_gap(errs, cut, scale) for cut in _cuts(config, t)]
    # merge: best against second-best candidate for every dropped token
    if config.merge and dec.merge_targets and len(dec.candidates) > 1:
        sims = cosine_similarity(rows[list(dec.merge_targets)], rows[dec.candidates]).topk(2, dim=1).values
        gaps = sims[:, 0] - sims[:, 1]
        nonzero = gaps[gaps > 0]
        if len(nonzero):
            margins.append(float(nonzero.min()))
    return min(margins)


def well_posed(
    make, config: ApetConfig, batch: int, generator: torch.Generator, tries: int = 50, starts=None
) -> torch.Tensor:
    """Stack `batch` images from make(generator) -> [N, D], each with decision margin > MARGIN
    (for image b, FPS starting at starts[b] when given)."""
    images = []
    for b in range(batch):
        start = None if starts is None else int(starts[b])
        for _ in range(tries):
            x = make(generator)
            if decision_margin(x, config, start) > MARGIN:
                images.append(x)
                break
        else:
            raise RuntimeError("could not draw a well-posed input; the generator is degenerate")
    return torch.stack(images)


# --- structured inputs, [B, N, D] -------------------------------------------------------------


def low_rank_plus_noise(g: torch.Generator, b: int, n: int, d: int, rank: int = 6) -> torch.Tensor:
    u = torch.randn(b, n, rank, generator=g)
    v = torch.randn(b, rank, d, generator=g)
    return u @ v + 0.01 * torch.randn(b, n, d, generator=g)


def duplicated_tokens(g: torch.Generator, b: int, n: int, d: int, copies: int = 4) -> torch.Tensor:
    base = torch.randn(b, n // copies + 1, d, generator=g)
    x = base.repeat(1, copies, 1)[:, :n]
    return x[:, torch.randperm(n, generator=g)]


def constant_image(g: torch.Generator, b: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(b, 1, d, generator=g).expand(b, n, d).clone()


def few_huge_tokens(g: torch.Generator, b: int, n: int, d: int, factor: float = 100.0) -> torch.Tensor:
    """A few tokens with magnitudes `factor` x the rest, as real CLIP features have."""
    x = torch.randn(b, n, d, generator=g)
    idx = torch.randint(0, n, (b, 4), generator=g)
    for i in range(b):
        x[i, idx[i]] *= factor
    return x
