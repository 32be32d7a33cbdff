"""ApetCompressor: the same contract as the oracle, written so it exports to a static ONNX graph.

Rules this file keeps (docs/DESIGN.md): float32 inside whatever the input dtype; no linalg.solve (an
unrolled Gram-Schmidt instead, k is small and static); no data-dependent shapes; no Python loop
over the batch (the loops below run over the k seeds and are unrolled when traced); only ops
TensorRT's ONNX parser takes (MatMul, GatherElements, TopK, Reduce*, Where, elementwise);
scatter-adds written as one-hot matmuls.

Ties are broken exactly as in the oracle (reference.py): lowest index for FPS and merge argmaxes,
lower index first among equal errors. Argmax is written as "smallest index among the maxima"
rather than ArgMax/TopK, whose tie order TensorRT does not document.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ApetConfig
from .reference import DEGENERATE, NORM_EPS, ZERO_ERROR, check_features


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """[..., M] -> [...] int64: index of the maximum, the lowest index among equal maxima."""
    m = values.shape[-1]
    index = torch.arange(m, device=values.device).expand_as(values)
    is_max = values == values.max(dim=-1, keepdim=True).values
    return torch.where(is_max, index, torch.full_like(index, m)).min(dim=-1).values


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, M] -> x[b, index[b]] as [B, M, D] (ONNX GatherElements)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _sq_dist_to(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], s [B, D] -> ||x_i - s||^2 [B, N], computed directly (no norm expansion)."""
    return ((x - s.unsqueeze(1)) ** 2).sum(dim=-1)


def farthest_point_sampling(x: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """Step 1, batched and unrolled: [B, N, D] -> seed indices [B, k] (FPS order)."""
    idx = torch.zeros_like(x[:, 0, 0], dtype=torch.int64) + start  # [B], batch stays dynamic
    seeds = [idx]
    min_dist = _sq_dist_to(x, x[:, start])
    for _ in range(1, k):
        idx = _first_argmax(min_dist)
        seeds.append(idx)
        min_dist = torch.minimum(min_dist, _sq_dist_to(x, _gather_rows(x, idx.unsqueeze(1))[:, 0]))
    return torch.stack(seeds, dim=1)


def ridge_projection(s: torch.Tensor, x: torch.Tensor, ridge: float) -> torch.Tensor:
    """Step 2, unrolled: x_hat = C^T S with C = (S S^T + eps I)^-1 S X^T, for S [B, k, D],
    X [B, N, D].

    Ridge least squares is ordinary least squares on the augmented system [S^T; sqrt(eps) I] c
    = [x; 0], solved here by modified Gram-Schmidt (twice, "twice is enough") on its k columns.
    Unlike a Cholesky of S S^T this does not square the condition number, which matters in
    float32 when seeds repeat (a constant image) or features are large (CLIP's outlier tokens).
    With Q the orthonormal columns, x_hat = Q_top Q_top^T x. A seed whose part in feature space
    is, after orthogonalisation, below float32 resolution (DEGENERATE x its norm) is exactly in the
    span of the earlier seeds; that part is set to zero rather than left as amplified round-off.
    """
    b, k, d = s.shape
    # a literal constant, not torch.eye (EyeLike wants static input dims in TensorRT's parser)
    identity = torch.tensor([[float(i == j) for j in range(k)] for i in range(k)], dtype=s.dtype, device=s.device)
    ridge_rows = (ridge**0.5) * identity.expand(b, k, k)
    columns = torch.cat([s, ridge_rows], dim=-1)  # [B, k, D + k], column j of [S^T; rI]
    qs: list[torch.Tensor] = []
    for j in range(k):
        a = columns[:, j]
        for _ in range(2):
            if qs:
                q = torch.stack(qs, dim=1)  # [B, j, D + k]
                a = a - ((q @ a.unsqueeze(-1)).transpose(1, 2) @ q)[:, 0]
        top, bottom = a[:, :d], a[:, d:]
        in_span = top.norm(dim=-1, keepdim=True) <= DEGENERATE * s[:, j].norm(dim=-1, keepdim=True)
        a = torch.cat([torch.where(in_span, torch.zeros_like(top), top), bottom], dim=-1)
        qs.append(a / a.norm(dim=-1, keepdim=True))  # >= sqrt(eps) > 0: never 0/0
    q_top = torch.stack(qs, dim=1)[:, :, :d]  # [B, k, D]
    return (x @ q_top.transpose(1, 2)) @ q_top  # [B, N, D]


def squared_errors(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """||x_i - x_hat_i||^2 [B, N]; a relative error at or below ZERO_ERROR counts as exactly 0."""
    err = ((x - x_hat) ** 2).sum(dim=-1)
    floor = (ZERO_ERROR**2) * (x**2).sum(dim=-1)
    return torch.where(err <= floor, torch.zeros_like(err), err)


class ApetCompressor(nn.Module):
    """features [B, N, D] -> (tokens [B, T, D] in the input dtype, positions [B, T] int64)."""

    def __init__(self, config: ApetConfig):
        super().__init__()
        if not isinstance(config, ApetConfig):
            raise TypeError(f"ApetCompressor needs an ApetConfig, got {type(config).__name__}")
        self.config = config

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        _, n, _ = check_features(features)
        cfg.validate_for(n)
        t, k = cfg.keep, cfg.basis
        x = features.float()
        positions_all = torch.arange(n, device=x.device)
        if t == n:  # nothing dropped: the input unchanged, as the oracle does
            return features, positions_all.expand_as(x[:, :, 0])

        # 1-2. seeds by FPS, every token reconstructed from them, squared error per token
        seeds = farthest_point_sampling(x, k, cfg.start)  # [B, k]
        s = _gather_rows(x, seeds)  # [B, k, D]
        err = squared_errors(x, ridge_projection(s, x, cfg.ridge))  # [B, N]

        # 3. rank (0 = largest error); ties: lower index first. rank_i = #{j before i}
        ahead = (err.unsqueeze(1) > err.unsqueeze(2)) | (
            (err.unsqueeze(1) == err.unsqueeze(2)) & (positions_all < positions_all.unsqueeze(1))
        )  # [B, i, j]: j ranks before i
        rank = ahead.to(torch.float32).sum(dim=-1)  # [B, N]
        kept = rank < t

        # 6 (early). kept positions in ascending order: TopK on (N - position) over kept tokens;
        # those values are distinct, so TopK's tie order never matters.
        score = torch.where(kept, (n - positions_all).to(torch.float32), torch.zeros_like(rank))
        positions = score.topk(t, dim=-1).indices  # [B, T] ascending
        base = _gather_rows(x, positions)  # [B, T, D] original features
        slot_rank = torch.gather(rank, 1, positions)  # [B, T]

        # 4. the k lowest-error kept tokens (ranks T-k..T-1) receive the seeds, in position order
        is_slot = slot_rank >= t - k  # [B, T]
        tri = torch.tril(torch.ones(t, t, device=x.device), diagonal=-1)  # exclusive prefix count
        slot_order = is_slot.to(torch.float32) @ tri.T  # [B, T]
        assign = (slot_order.unsqueeze(-1) == torch.arange(k, device=x.device).to(torch.float32)) & is_slot.unsqueeze(
            -1
        )
        tokens = torch.where(is_slot.unsqueeze(-1), assign.to(torch.float32) @ s, base)

        # 5. merge: each dropped token goes to the most similar kept non-seed token
        if cfg.merge:
            unit = x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
            unit_kept = _gather_rows(unit, positions)  # [B, T, D]
            sim = unit @ unit_kept.transpose(1, 2)  # [B, N, T]
            sim = torch.where(is_slot.unsqueeze(1), torch.full_like(sim, -3.0), sim)  # seeds: never
            target = _first_argmax(sim)  # [B, N] slot index
            onehot = (target.unsqueeze(-1) == torch.arange(t, device=x.device)) & ~kept.unsqueeze(-1)
            onehot = onehot.to(torch.float32)  # [B, N, T]
            sums = onehot.transpose(1, 2) @ x  # [B, T, D]
            counts = onehot.sum(dim=1).unsqueeze(-1)  # [B, T, 1]
            tokens = (tokens + sums) / (1.0 + counts)  # seed slots: counts == 0

        return tokens.to(features.dtype), positions
