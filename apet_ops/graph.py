"""ApetCompressor: the same contract as the oracle, written so it exports to an ONNX graph.

Rules this file keeps (docs/DESIGN.md): float32 inside whatever the input dtype; no linalg.solve (an
unrolled Gram-Schmidt instead, k is small and static); no data-dependent shapes; no Python loop
over the batch (the loops below run over the k seeds and are unrolled when traced); only ops
TensorRT's ONNX parser takes (MatMul, GatherElements, TopK, CumSum, Reduce*, Where, elementwise);
scatter-adds written as one-hot matmuls. Memory is O(N*D + N*T): no [N, N] intermediate.

The token count N may be symbolic: nothing below turns N into a Python int (under the tracer,
`x.shape[1]` is a traced scalar and so are T = floor(R * N), aranges and `N - position`), so one
exported graph serves every N; see onnx_export.export_compressor_onnx(dynamic_tokens=True).

Ties are broken exactly as in the oracle (reference.py): lowest index for FPS argmaxes, lower
index first among equal errors, the first candidate in output order for the merge argmax. Argmax
is written as "smallest index among the maxima", and TopK is only ever asked for values or for
the indices of distinct values, so TopK's tie order (which TensorRT does not document) never
matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ApetConfig
from .reference import DEGENERATE, NORM_EPS, ZERO_ERROR, check_features

_NO_INDEX = float(2**30)  # larger than any index; indices are handled as exact float32 (< 2**24)


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """[..., M] -> [...] int64: index of the maximum, the lowest index among equal maxima."""
    index = torch.arange(values.shape[-1], device=values.device).to(torch.float32)  # broadcast, not expanded
    is_max = values == values.max(dim=-1, keepdim=True).values
    no_index = torch.tensor(_NO_INDEX, device=values.device)
    return torch.where(is_max, index, no_index).min(dim=-1).values.to(torch.int64)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, M] -> x[b, index[b]] as [B, M, D] (ONNX GatherElements)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _sq_dist_to(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], s [B, D] -> ||x_i - s||^2 [B, N], computed directly (no norm expansion)."""
    return ((x - s.unsqueeze(1)) ** 2).sum(dim=-1)


def farthest_point_sampling(x: torch.Tensor, k: int, start: torch.Tensor) -> torch.Tensor:
    """Step 1, batched and unrolled: x [B, N, D], start [B] int64 -> seed indices [B, k] (FPS order)."""
    idx = start
    seeds = [idx]
    min_dist = _sq_dist_to(x, _gather_rows(x, idx.unsqueeze(1))[:, 0])
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


def first_in_ranking(err: torch.Tensor, count) -> torch.Tensor:
    """Step 3 in O(N): err [B, N], count (int, or a traced scalar) -> bool [B, N], the `count`
    tokens that come first when ranked by error, largest first, equal errors lower index first.

    TopK yields the value v at rank count-1 (values only: TopK's own tie order never matters).
    Every token with error > v is in; the places left go to the tokens with error == v in index
    order (a running count, CumSum)."""
    v = err.topk(count, dim=-1).values[:, -1:]
    above = err > v
    tied = err == v
    room = count - above.to(torch.float32).sum(dim=-1, keepdim=True)
    return above | (tied & (tied.to(torch.float32).cumsum(dim=-1) <= room))


def ascending_members(mask: torch.Tensor, count) -> torch.Tensor:
    """mask [B, M] with exactly `count` members per row -> their indices [B, count], ascending.
    TopK on M - index over the members: distinct values, so TopK's tie order never matters."""
    m = mask.shape[-1]
    reverse = (m - torch.arange(m, device=mask.device)).to(torch.float32)
    return torch.where(mask, reverse, torch.zeros_like(reverse)).topk(count, dim=-1).indices


def rank_within(err: torch.Tensor) -> torch.Tensor:
    """err [B, M] of M tokens in ascending index order -> [B, M] float: each one's rank among them
    (largest error first, equal errors lower index first). [B, M, M]: call it on the k slots or the
    T kept tokens only, never on all N."""
    m = err.shape[-1]
    index = torch.arange(m, device=err.device)
    other, this = err.unsqueeze(1), err.unsqueeze(2)  # [B, this, other]
    ahead = (other > this) | ((other == this) & (index < index.unsqueeze(1)))
    return ahead.to(torch.float32).sum(dim=-1)


def merge_groups(x: torch.Tensor, dropped: torch.Tensor, cols: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Step 5's groups: every dropped token of x [B, N, D] (dropped [B, N]) goes to the candidate column
    (cols [B, T] are the columns' rows of x, candidate [B, T]) of highest cosine similarity, the
    first column among equals. -> one-hot [B, N, T] float32 (a row of zeros for a kept token)."""
    t = cols.shape[-1]
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    sim = unit @ _gather_rows(unit, cols).transpose(1, 2)  # [B, N, T]
    sim = torch.where(candidate.unsqueeze(1), sim, torch.tensor(-3.0, device=x.device))  # never a target
    target = _first_argmax(sim)  # [B, N]
    onehot = (target.unsqueeze(-1) == torch.arange(t, device=x.device)) & dropped.unsqueeze(-1)
    return onehot.to(torch.float32)


def merge_into(x: torch.Tensor, dropped: torch.Tensor, cols: torch.Tensor, candidate: torch.Tensor, tokens):
    """Step 5: column t of `tokens` becomes (tokens_t + sum of the rows of x merged into it) / (1 +
    count), the groups of `merge_groups`. Scatter-add as a one-hot MatMul; memory [B, N, T]."""
    return merge_with(merge_groups(x, dropped, cols, candidate), x, tokens)


def merge_with(onehot: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Groups `onehot` [B, N, T] applied to rows y [B, N, D]: (tokens + onehot^T y) / (1 + count)."""
    sums = onehot.transpose(1, 2) @ y  # [B, T, D]
    counts = onehot.sum(dim=1).unsqueeze(-1)  # [B, T, 1]
    return (tokens + sums) / (1.0 + counts)


@dataclass
class Selection:
    """ApET's decisions for a batch of images (image layout), as tensors: kept positions [B, T]
    ascending, FPS seeds [B, k], which kept columns are seed slots [B, T] (bool), which seed each slot
    receives (one-hot [B, T, k] float32), the seed blend w, the merge groups (one-hot [B, N, T]
    float32, None without merge), and whether anything was dropped [B]. Model-agnostic: it applies
    to any features of the same N tokens (`apply_selection`)."""

    positions: torch.Tensor
    seeds: torch.Tensor
    is_slot: torch.Tensor
    assign: torch.Tensor
    seed_blend: float
    groups: torch.Tensor | None
    dropped_any: torch.Tensor


def apply_selection(selection: Selection, y: torch.Tensor) -> torch.Tensor:
    """The selection's tokens built from rows y [B, N, D] (float32): kept rows in position order,
    each seed slot w * (its seed's row) + (1 - w) * (its own row), then each merge group averaged
    into its kept row. On the features the selection was made on, this is ApET's output."""
    base = _gather_rows(y, selection.positions)  # [B, T, D] original rows
    placed = selection.assign @ _gather_rows(y, selection.seeds)  # [B, T, D] the seed of each slot (one-hot)
    if selection.seed_blend != 1.0:
        placed = selection.seed_blend * placed + (1.0 - selection.seed_blend) * base
    tokens = torch.where(selection.is_slot.unsqueeze(-1), placed, base)
    if selection.groups is not None:
        tokens = merge_with(selection.groups, y, tokens)
    return torch.where(selection.dropped_any[:, None, None], tokens, base)


class ApetCompressor(nn.Module):
    """features [B, N, D] (+ start [B] int64, optional) -> (tokens [B, T', D] in the input dtype,
    positions [B, T'] int64); T' = config.output_rows(N). See compress_reference for the layouts."""

    def __init__(self, config: ApetConfig):
        super().__init__()
        if not isinstance(config, ApetConfig):
            raise TypeError(f"ApetCompressor needs an ApetConfig, got {type(config).__name__}")
        self.config = config

    def forward(self, features: torch.Tensor, start: torch.Tensor | None = None, others=None):
        """-> (tokens, positions); with `others` (a list of [B, N, D_i]), compress_with's
        (tokens, positions, [tokens_i]) (called through the module, an exported graph's nodes are
        scoped by its name)."""
        if others is not None:
            return self.compress_with(features, others, start)
        cfg = self.config
        b, n, _ = check_features(features)
        cfg.validate_for(n)  # under the tracer, n is the example's: checks the example only
        x = features.float()  # first: nothing below reads the input in its own dtype (fp16 graphs stay fp32 here)
        start = self._start(x, start)
        if cfg.layout == "video":
            tokens, positions = self._video(x, start)
        else:
            t = cfg.keep_for(n)
            if isinstance(n, int) and t == n:  # eager and nothing dropped: the input unchanged
                return features, torch.arange(n, device=x.device).expand(b, n)
            tokens, positions = self._image(x, start, t)
        return tokens.to(features.dtype), positions

    def _start(self, features: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
        """-> [B] int64 first-seed indices (config.start for all when None)."""
        if start is None:
            return torch.zeros_like(features[:, 0, 0], dtype=torch.int64) + self.config.start  # batch stays dynamic
        if not isinstance(start, torch.Tensor) or start.dim() != 1 or start.dtype not in (torch.int32, torch.int64):
            what = f"{start.dtype} of shape {tuple(start.shape)}" if isinstance(start, torch.Tensor) else repr(start)
            raise ValueError(f"start must be a [B] int64 tensor, got {what}")
        if not torch.jit.is_tracing():  # values are runtime data in an exported graph
            b, n = features.shape[:2]
            rows = n - 1 if self.config.layout == "video" else n
            if start.shape[0] != b:
                raise ValueError(f"start has {start.shape[0]} entries for a batch of {b} images")
            bad = start[(start < 0) | (start >= rows)]
            if bad.numel():
                raise ValueError(f"start index {int(bad[0])} is outside 0..{rows - 1} (the {rows} rows FPS runs over)")
        return start.to(torch.int64)

    def _image(self, x: torch.Tensor, start: torch.Tensor, t):
        selection = self._select(x, start, t)
        return apply_selection(selection, x), selection.positions

    def _select(self, x: torch.Tensor, start: torch.Tensor, t) -> Selection:
        """Steps 1-5's decisions on x [B, N, D] (float32), as tensors `apply_selection` applies."""
        cfg, k = self.config, self.config.basis
        # 1-2. seeds by FPS, every token reconstructed from them, squared error per token
        seeds = farthest_point_sampling(x, k, start)  # [B, k]
        s = _gather_rows(x, seeds)  # [B, k, D]
        err = squared_errors(x, ridge_projection(s, x, cfg.ridge))  # [B, N]

        # 3. the T first by error are kept; of them, those after the first T-k are the seed slots
        kept = first_in_ranking(err, t)  # [B, N]
        slots = kept & ~first_in_ranking(err, t - k)
        # 6 (early). kept positions in ascending order
        positions = ascending_members(kept, t)  # [B, T]
        is_slot = torch.gather(slots, 1, positions)  # [B, T]

        # 4. seed j goes to the j-th slot by position, or by error rank (of the k slots only)
        by_position = is_slot.to(torch.float32).cumsum(dim=-1) - is_slot.to(torch.float32)  # exclusive count
        if cfg.seed_placement == "position":
            seed_of = by_position
        else:
            slot_cols = ascending_members(is_slot, k)  # [B, k] the slots' columns, ascending
            slot_rank = rank_within(torch.gather(err, 1, torch.gather(positions, 1, slot_cols)))  # [B, k]
            seed_of = torch.gather(slot_rank, 1, by_position.clamp(max=k - 1).to(torch.int64))
        assign = (seed_of.unsqueeze(-1) == torch.arange(k, device=x.device).to(torch.float32)) & is_slot.unsqueeze(-1)

        # 5. merge: each dropped token goes to the most similar kept non-seed token
        groups = merge_groups(x, ~kept, positions, ~is_slot) if cfg.merge else None
        # T == N (only reachable in a traced graph, whose N is symbolic): the input unchanged
        dropped_any = (~kept).to(torch.float32).sum(dim=-1) > 0
        return Selection(positions, seeds, is_slot, assign.to(torch.float32), cfg.seed_blend, groups, dropped_any)

    def compress_with(
        self, features: torch.Tensor, others: list[torch.Tensor], start: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """ApET decides on `features` [B, N, D] and the same decisions (kept positions, seeds and their
        slots, merge groups) are applied to each of `others` [B, N, D_i] (other features of the same N
        tokens, any widths): -> (tokens [B, T, D], positions [B, T], [tokens_i [B, T, D_i]]), each in
        its input's dtype, computed in float32. Image layout only."""
        cfg = self.config
        b, n, _ = check_features(features)
        if cfg.layout != "image":
            raise ValueError(f"compress_with: the {cfg.layout} layout is not supported (image layout only)")
        for i, y in enumerate(others):
            if check_features(y)[:2] != (b, n):
                raise ValueError(f"others[{i}] has shape {tuple(y.shape)}; it must be [{b}, {n}, D_i] as the features")
        cfg.validate_for(n)
        x = features.float()
        start = self._start(x, start)
        t = cfg.keep_for(n)
        if isinstance(n, int) and t == n:
            return features, torch.arange(n, device=x.device).expand(b, n), list(others)
        selection = self._select(x, start, t)
        outs = [apply_selection(selection, y.float()).to(y.dtype) for y in others]
        return apply_selection(selection, x).to(features.dtype), selection.positions, outs

    def _video(self, x: torch.Tensor, start: torch.Tensor):
        cfg, t, k = self.config, self.config.keep, self.config.basis
        cls, p = x[:, :1], x[:, 1:]  # CLS passes through; everything else works on the patch rows
        seeds = farthest_point_sampling(p, k, start)
        s = _gather_rows(p, seeds)
        err = squared_errors(p, ridge_projection(s, p, cfg.ridge))
        kept = first_in_ranking(err, t)
        ascending = ascending_members(kept, t)  # [B, T]
        rank = rank_within(torch.gather(err, 1, ascending))  # [B, T], distinct 0..T-1
        by_error = torch.gather(ascending, 1, (t - rank).topk(t, dim=-1).indices)  # descending error
        rows = _gather_rows(p, by_error)
        if cfg.merge:  # seeds are dropped rows like any other; ties go to the larger error
            rows = merge_into(p, ~kept, by_error, torch.ones_like(by_error, dtype=torch.bool), rows)
        tokens = torch.cat([cls, rows, s], dim=1)
        positions = torch.cat([torch.zeros_like(seeds[:, :1]), by_error + 1, seeds + 1], dim=1)
        return tokens, positions
