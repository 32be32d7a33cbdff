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


def decision_margin(x: torch.Tensor, config: ApetConfig) -> float:
    """Smallest relative margin of the oracle's decisions for one image x [N, D]."""
    x = x.double()
    dec = decide(x, config)
    margins = []
    # FPS: at each step, the winner against the runner-up
    min_dist = ((x - x[dec.seeds[0]]) ** 2).sum(1)
    for seed in dec.seeds[1:]:
        top = min_dist.topk(2).values
        margins.append(_smallest_nonzero_gap(top, 1, float(top[0])))
        min_dist = torch.minimum(min_dist, ((x - x[seed]) ** 2).sum(1))
    # ranking: the cut at T and the cut at T - k
    errs = dec.errors[dec.order]
    scale = float(errs[0])
    margins += [
        _smallest_nonzero_gap(errs, config.keep, scale),
        _smallest_nonzero_gap(errs, config.keep - config.basis, scale),
    ]
    # merge: best against second-best candidate for every dropped token
    if config.merge and dec.merge_targets:
        slots = set(dec.seed_slots)
        cands = [p for p in dec.kept if p not in slots]
        if len(cands) > 1:
            sims = cosine_similarity(x[list(dec.merge_targets)], x[cands]).topk(2, dim=1).values
            gaps = sims[:, 0] - sims[:, 1]
            nonzero = gaps[gaps > 0]
            if len(nonzero):
                margins.append(float(nonzero.min()))
    return min(margins)


def well_posed(make, config: ApetConfig, batch: int, generator: torch.Generator, tries: int = 50) -> torch.Tensor:
    """Stack `batch` images from make(generator) -> [N, D], each with decision margin > MARGIN."""
    images = []
    for _ in range(batch):
        for _ in range(tries):
            x = make(generator)
            if decision_margin(x, config) > MARGIN:
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
