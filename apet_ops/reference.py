"""The oracle: ApET steps 1-6 of docs/DESIGN.md, literally, one image at a time.

Eager and plain on purpose: per-image Python, `torch.linalg.solve`, a sort with an explicit key.
It computes in float64, a stricter yardstick than the float32 graph form it checks.

Ties (exactly equal values) are broken the same way everywhere, in both forms:
  * reconstruction: a relative error <= ZERO_ERROR is exactly 0 (below float32 resolution);
  * FPS: among equal largest distances, the lowest token index wins;
  * ranking: equal errors are ordered by token index, lower index first (kept first);
  * merge: among equal largest cosine similarities, the kept token with the lowest position wins;
    a zero vector has cosine 0 with everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ApetConfig

NORM_EPS = 1e-12  # cosine similarity: norms are clamped to this, so zero tokens get similarity 0
# Float32 resolution, shared by both forms. A reconstruction error at or below ZERO_ERROR x the
# token's norm counts as exactly zero: such a token is reconstructed exactly (a seed, a duplicate,
# a token of a rank-deficient image), and among exact zeros the tie rule (lower index first)
# decides, not round-off. The graph form also treats a seed as lying in the span of the earlier
# seeds when its orthogonal part is at or below DEGENERATE x its norm (see graph.ridge_projection).
ZERO_ERROR = 1e-5
DEGENERATE = 1e-6


def check_features(features: torch.Tensor) -> tuple[int, int, int]:
    """Validate `features` [B, N, D] (float) and return its shape."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    b, n, d = features.shape
    if b == 0 or n == 0 or d == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    return b, n, d


def first_argmax(values: torch.Tensor) -> int:
    """Index of the largest value of a 1-D tensor; the lowest index among equal maxima."""
    return int(torch.nonzero(values == values.max())[0, 0])


def farthest_point_sampling(x: torch.Tensor, k: int, start: int) -> list[int]:
    """Step 1. x [N, D]; returns k token indices, the first is `start`."""
    seeds = [start]
    min_dist = ((x - x[start]) ** 2).sum(dim=1)
    for _ in range(1, k):
        nxt = first_argmax(min_dist)
        seeds.append(nxt)
        min_dist = torch.minimum(min_dist, ((x - x[nxt]) ** 2).sum(dim=1))
    return seeds


def reconstruction_errors(x: torch.Tensor, seeds: list[int], ridge: float) -> torch.Tensor:
    """Step 2. e_i = ||x_i - x_hat_i|| with x_hat = C^T S, C = (S S^T + eps I)^-1 S X^T;
    e_i <= ZERO_ERROR ||x_i|| counts as 0. Products are summed per token (no GEMM), so equal
    tokens get bit-identical errors and tie."""
    s = x[seeds]  # [k, D]
    gram = s @ s.T + ridge * torch.eye(len(seeds), dtype=x.dtype)
    coeffs = torch.linalg.solve(gram, (s.unsqueeze(1) * x.unsqueeze(0)).sum(-1))  # [k, N]
    x_hat = (coeffs.T.unsqueeze(-1) * s.unsqueeze(0)).sum(1)  # [N, D]
    errors = (x - x_hat).norm(dim=1)
    return torch.where(errors <= ZERO_ERROR * x.norm(dim=1), torch.zeros_like(errors), errors)


def rank_by_error(errors: torch.Tensor) -> list[int]:
    """Step 3. Token indices, largest error first; equal errors: lower index first."""
    return sorted(range(len(errors)), key=lambda i: (-float(errors[i]), i))


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, D] x [m, D] -> [n, m], summed per pair (no GEMM) so equal tokens tie exactly."""
    a = a / a.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    return torch.stack([(row * b).sum(-1) for row in a])


@dataclass
class ImageDecisions:
    """Every discrete choice the oracle makes for one image (tests use it to find near-ties)."""

    seeds: list[int]  # FPS order
    errors: torch.Tensor  # [N] float64
    order: list[int]  # all N indices by error, largest first
    kept: list[int]  # ascending positions, length T
    seed_slots: list[int]  # ascending positions that receive the seed features
    merge_targets: dict[int, int]  # dropped index -> kept non-seed position it is merged into


def decide(x: torch.Tensor, config: ApetConfig) -> ImageDecisions:
    """Steps 1-5's decisions for one image x [N, D] (float64)."""
    n = x.shape[0]
    t, k = config.keep, config.basis
    seeds = farthest_point_sampling(x, k, config.start)
    errors = reconstruction_errors(x, seeds, config.ridge)
    order = rank_by_error(errors)
    kept_by_error = order[:t]
    seed_slots = sorted(kept_by_error[t - k :])  # step 4: the k lowest-error kept positions
    kept = sorted(kept_by_error)
    targets: dict[int, int] = {}
    if config.merge:
        kept_set, slot_set = set(kept), set(seed_slots)
        candidates = [p for p in kept if p not in slot_set]  # ascending positions
        dropped = [i for i in range(n) if i not in kept_set]
        if dropped:
            sim = cosine_similarity(x[dropped], x[candidates])
            for row, i in enumerate(dropped):
                targets[i] = candidates[first_argmax(sim[row])]
    return ImageDecisions(seeds, errors, order, kept, seed_slots, targets)


def compress_image(x: torch.Tensor, config: ApetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-6 for one image x [N, D] (float64): tokens [T, D], positions [T]."""
    dec = decide(x, config)
    out = {p: x[p].clone() for p in dec.kept}
    for j, p in enumerate(dec.seed_slots):  # step 4: seed j goes to the j-th smallest slot
        out[p] = x[dec.seeds[j]].clone()
    if config.merge:  # step 5
        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = {}
        for i, p in dec.merge_targets.items():
            sums[p] = sums.get(p, torch.zeros_like(x[0])) + x[i]
            counts[p] = counts.get(p, 0) + 1
        for p in sums:
            out[p] = (x[p] + sums[p]) / (1 + counts[p])
    positions = torch.tensor(dec.kept, dtype=torch.int64)  # step 6: spatial order
    return torch.stack([out[p] for p in dec.kept]), positions


def compress_reference(features: torch.Tensor, config: ApetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle. features [B, N, D], any float dtype -> (tokens [B, T, D] in that dtype,
    positions [B, T] int64 ascending). keep == N returns the input unchanged."""
    b, n, _ = check_features(features)
    config.validate_for(n)
    if config.keep == n:
        positions = torch.arange(n, dtype=torch.int64).expand(b, n).clone()
        return features.clone(), positions
    tokens, positions = zip(*(compress_image(features[i].detach().cpu().double(), config) for i in range(b)))
    out = torch.stack(tokens).to(device=features.device, dtype=features.dtype)
    return out, torch.stack(positions).to(features.device)
