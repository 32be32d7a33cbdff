"""The oracle: ApET steps 1-6 of docs/DESIGN.md, literally, one image (or video frame) at a time.

Eager and plain on purpose: per-image Python, `torch.linalg.solve`, a sort with an explicit key.
It computes in float64, a stricter yardstick than the float32 graph form it checks.

Ties (exactly equal values) are broken the same way everywhere, in both forms:
  * reconstruction: a relative error <= ZERO_ERROR is exactly 0 (below float32 resolution);
  * FPS: among equal largest distances, the lowest token index wins;
  * ranking: equal errors are ordered by token index, lower index first (kept first);
  * merge: among equal largest cosine similarities, the candidate that comes first in the output
    wins (image layout: the lowest position; video layout: the larger error); a zero vector has
    cosine 0 with everything.
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
    """Every discrete choice the oracle makes for one image (tests use it to find near-ties).

    Indices count the rows FPS runs over: the image's tokens, or for the video layout the frame's
    patch rows (patch row i is row i + 1 of the frame; CLS is not among them)."""

    seeds: list[int]  # FPS order
    errors: torch.Tensor  # [N] float64
    order: list[int]  # all N indices by error, largest first
    kept: list[int]  # ascending positions, length T
    seed_slots: list[int]  # ascending positions that receive the seed features (video: none)
    merge_targets: dict[int, int]  # dropped index -> kept candidate it is merged into
    seed_of_slot: dict[int, int]  # slot position -> j, the seed (FPS order) it receives
    candidates: list[int]  # merge candidates in output order (a tie goes to the first)


def decide(x: torch.Tensor, config: ApetConfig, start: int | None = None) -> ImageDecisions:
    """Steps 1-5's decisions for one image x [N, D] (float64); for the video layout x is one
    frame [R, D] with CLS first. `start` overrides config.start for this image."""
    if config.layout == "video":
        x = x[1:]
    n = x.shape[0]
    t, k = config.keep_for(n if config.layout == "image" else n + 1), config.basis
    seeds = farthest_point_sampling(x, k, config.start if start is None else start)
    errors = reconstruction_errors(x, seeds, config.ridge)
    order = rank_by_error(errors)
    kept_by_error = order[:t]
    kept = sorted(kept_by_error)
    if config.layout == "video":  # seeds are appended, not placed; every kept row is a candidate
        seed_slots, seed_of_slot, candidates = [], {}, kept_by_error
    else:
        by_rank = kept_by_error[t - k :]  # step 4: the k lowest-error kept positions
        seed_slots = sorted(by_rank)
        placed = seed_slots if config.seed_placement == "position" else by_rank
        seed_of_slot = {p: j for j, p in enumerate(placed)}
        candidates = [p for p in kept if p not in seed_of_slot]  # ascending positions
    targets: dict[int, int] = {}
    if config.merge:
        kept_set = set(kept)
        dropped = [i for i in range(n) if i not in kept_set]
        if dropped:
            sim = cosine_similarity(x[dropped], x[candidates])
            for row, i in enumerate(dropped):
                targets[i] = candidates[first_argmax(sim[row])]
    return ImageDecisions(seeds, errors, order, kept, seed_slots, targets, seed_of_slot, candidates)


def _merged(x: torch.Tensor, dec: ImageDecisions, out: dict[int, torch.Tensor]) -> None:
    """Step 5 in place: each candidate becomes (itself + its dropped tokens) / (1 + count)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for i, p in dec.merge_targets.items():
        sums[p] = sums.get(p, torch.zeros_like(x[0])) + x[i]
        counts[p] = counts.get(p, 0) + 1
    for p in sums:
        out[p] = (out[p] + sums[p]) / (1 + counts[p])


def apply_decisions(y: torch.Tensor, dec: ImageDecisions, config: ApetConfig) -> torch.Tensor:
    """Steps 4-6 of one image's decisions applied to rows y [N, D'] (float64) of the same N tokens:
    the kept rows in position order, each seed slot w * y[its seed] + (1 - w) * y[slot], each merge
    group averaged into its kept row. On the features `dec` was made from, this is ApET's output."""
    out = {p: y[p].clone() for p in dec.kept}
    w = config.seed_blend
    for p, j in dec.seed_of_slot.items():  # step 4
        seed = y[dec.seeds[j]]
        out[p] = seed.clone() if w == 1.0 else w * seed + (1 - w) * y[p]
    if config.merge:  # step 5 (seed slots are never candidates)
        _merged(y, dec, out)
    return torch.stack([out[p] for p in dec.kept])  # step 6: spatial order


def compress_image(x: torch.Tensor, config: ApetConfig, start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-6 for one image x [N, D] (float64): tokens [T, D], positions [T]."""
    dec = decide(x, config, start)
    return apply_decisions(x, dec, config), torch.tensor(dec.kept, dtype=torch.int64)


def compress_frame(
    frame: torch.Tensor, config: ApetConfig, start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The video layout for one frame [R, D] (float64, CLS first): rows [CLS, T kept rows by
    descending error (merged), k seeds in FPS order] and each output row's index in the frame."""
    dec = decide(frame, config, start)
    x = frame[1:]
    kept_by_error = dec.candidates
    out = {p: x[p].clone() for p in kept_by_error}
    if config.merge:
        _merged(x, dec, out)
    rows = [frame[0]] + [out[p] for p in kept_by_error] + [x[s] for s in dec.seeds]
    positions = [0] + [p + 1 for p in kept_by_error] + [s + 1 for s in dec.seeds]
    return torch.stack(rows), torch.tensor(positions, dtype=torch.int64)


def per_image_starts(start, batch: int, rows: int, config: ApetConfig) -> list[int]:
    """None (config.start for every image), an int, or one int per image ([B] tensor or sequence)
    -> B validated start indices, each < the number of rows FPS runs over."""
    if start is None:
        starts = [config.start] * batch
    elif isinstance(start, int) and not isinstance(start, bool):
        starts = [start] * batch
    else:
        if isinstance(start, torch.Tensor):
            if start.dim() != 1 or start.is_floating_point() or start.dtype == torch.bool:
                raise ValueError(f"start must be a [B] integer tensor, got {start.dtype} of shape {tuple(start.shape)}")
            start = start.tolist()
        starts = list(start)
        if any(isinstance(s, bool) or not isinstance(s, int) for s in starts):
            raise TypeError(f"start must hold integers, got {starts!r}")
        if len(starts) != batch:
            raise ValueError(f"start has {len(starts)} entries for a batch of {batch} images")
    limit = rows - 1 if config.layout == "video" else rows
    bad = [s for s in starts if not 0 <= s < limit]
    if bad:
        what = "patch rows" if config.layout == "video" else "tokens"
        raise ValueError(f"start index {bad[0]} is outside 0..{limit - 1} (the {limit} {what} FPS runs over)")
    return starts


def compress_reference(features: torch.Tensor, config: ApetConfig, start=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle. features [B, N, D], any float dtype -> (tokens [B, T', D] in that dtype,
    positions [B, T'] int64): image layout T' = T in ascending position; video layout (each of the
    B items is a frame of N rows, CLS first) T' = 1 + keep + basis in the order
    [CLS, kept by descending error, seeds]. `start`: None (config.start), an int, or one per image
    ([B] int tensor or sequence). An image layout with T == N returns the input unchanged."""
    b, n, _ = check_features(features)
    config.validate_for(n)
    starts = per_image_starts(start, b, n, config)
    if config.layout == "image" and config.keep_for(n) == n:
        positions = torch.arange(n, dtype=torch.int64).expand(b, n).clone()
        return features.clone(), positions
    one = compress_frame if config.layout == "video" else compress_image
    tokens, positions = zip(*(one(features[i].detach().cpu().double(), config, starts[i]) for i in range(b)))
    out = torch.stack(tokens).to(device=features.device, dtype=features.dtype)
    return out, torch.stack(positions).to(features.device)


def compress_reference_with(
    features: torch.Tensor, others, config: ApetConfig, start=None
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The oracle of ApetCompressor.compress_with: decisions on features [B, N, D], the same decisions
    applied to each of `others` [B, N, D_i] -> (tokens, positions, [tokens_i]), each in its input's
    dtype. Image layout only."""
    b, n, _ = check_features(features)
    if config.layout != "image":
        raise ValueError(f"compress_reference_with: the {config.layout} layout is not supported (image layout only)")
    for i, y in enumerate(others):
        if check_features(y)[:2] != (b, n):
            raise ValueError(f"others[{i}] has shape {tuple(y.shape)}; it must be [{b}, {n}, D_i] as the features")
    config.validate_for(n)
    starts = per_image_starts(start, b, n, config)
    if config.keep_for(n) == n:
        return features.clone(), torch.arange(n, dtype=torch.int64).expand(b, n).clone(), [y.clone() for y in others]
    decisions = [decide(features[i].detach().cpu().double(), config, starts[i]) for i in range(b)]

    def applied(y: torch.Tensor) -> torch.Tensor:
        rows = [apply_decisions(y[i].detach().cpu().double(), decisions[i], config) for i in range(b)]
        return torch.stack(rows).to(device=y.device, dtype=y.dtype)

    positions = torch.stack([torch.tensor(d.kept, dtype=torch.int64) for d in decisions]).to(features.device)
    return applied(features), positions, [applied(y) for y in others]
