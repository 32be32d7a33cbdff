"""ApET's decisions applied to other features of the same tokens (ApetCompressor.compress_with, the
oracle compress_reference_with): what a VLM needs when each token has more than one row (Qwen3-VL's
DeepStack levels). Fresh random features, several variants; the graph form against the oracle, and
the oracle against a numpy recomputation of the kept rows from its own decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apet_trt.apet_ops import ApetCompressor, ApetConfig, compress_reference, compress_reference_with
from apet_trt.apet_ops.reference import decide

VARIANTS = [
    dict(keep=24, basis=6),
    dict(keep=24, basis=6, seed_blend=0.5),
    dict(keep_ratio=0.3, basis=10, seed_blend=0.5),
    dict(keep=20, basis=5, seed_placement="error_rank", merge=False),
]


@pytest.mark.parametrize("fields", VARIANTS)
def test_graph_equals_oracle_on_the_main_features_and_every_other(rng, fields):
    config = ApetConfig(**fields)
    x = torch.randn(2, 80, 16, generator=rng)
    others = [torch.randn(2, 80, 16, generator=rng), torch.randn(2, 80, 7, generator=rng) * 3.0]
    tokens, positions, kept = ApetCompressor(config).compress_with(x, others)
    ref_tokens, ref_positions, ref_kept = compress_reference_with(x.double(), [y.double() for y in others], config)
    assert torch.equal(positions, ref_positions)
    # the main output is exactly ApET's (compress_with changes nothing about it)
    main, main_positions = ApetCompressor(config)(x)
    assert torch.equal(tokens, main) and torch.equal(positions, main_positions)
    assert float((tokens.double() - ref_tokens).abs().max()) <= 1e-4
    for y, got, want in zip(others, kept, ref_kept):
        assert got.shape == (2, positions.shape[1], y.shape[-1]) and got.dtype == y.dtype
        assert float((got.double() - want).abs().max()) <= 1e-4 * max(1.0, float(y.abs().max()))
    # applying the decisions to the features themselves is compress_reference
    assert torch.equal(ref_tokens, compress_reference(x.double(), config)[0])


def test_oracle_others_equal_a_numpy_recomputation_from_its_decisions(rng):
    """Each other feature's kept row: its own row at the kept position, a seed slot blended with the
    seed's row (w = 0.5), then averaged with the rows of the dropped tokens whose main features are
    most cosine-similar to that kept non-seed token (groups recomputed here with numpy)."""
    config = ApetConfig(keep=30, basis=8, seed_blend=0.5)
    x = torch.randn(1, 90, 12, generator=rng, dtype=torch.float64)
    y = torch.randn(1, 90, 5, generator=rng, dtype=torch.float64)
    _, positions, [got] = compress_reference_with(x, [y], config)
    dec = decide(x[0], config)
    xs, ys = x[0].numpy(), y[0].numpy()
    kept = positions[0].tolist()
    candidates = [p for p in kept if p not in dec.seed_of_slot]
    unit = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    rows = {p: ys[p].copy() for p in kept}
    for p, j in dec.seed_of_slot.items():
        rows[p] = 0.5 * ys[dec.seeds[j]] + 0.5 * ys[p]
    groups: dict[int, list[int]] = {c: [] for c in candidates}
    for i in sorted(set(range(90)) - set(kept)):
        groups[candidates[int(np.argmax(unit[candidates] @ unit[i]))]].append(i)
    for c, members in groups.items():
        rows[c] = (rows[c] + ys[members].sum(axis=0)) / (1 + len(members))
    assert np.abs(got[0].numpy() - np.stack([rows[p] for p in kept])).max() <= 1e-12


def test_bad_others_and_layouts_are_refused(rng):
    x = torch.randn(1, 40, 8, generator=rng)
    compressor = ApetCompressor(ApetConfig(keep=12, basis=4))
    with pytest.raises(ValueError, match=r"others\[0\] has shape \(1, 39, 8\); it must be \[1, 40, D_i\]"):
        compressor.compress_with(x, [torch.randn(1, 39, 8)])
    with pytest.raises(ValueError, match=r"others\[0\] has shape \(1, 39, 8\)"):
        compress_reference_with(x, [torch.randn(1, 39, 8)], ApetConfig(keep=12, basis=4))
    video = ApetConfig(keep=22, basis=10, layout="video")
    with pytest.raises(ValueError, match="video layout is not supported"):
        ApetCompressor(video).compress_with(torch.randn(1, 257, 8), [])
    # nothing dropped: every input comes back as it was
    full = ApetConfig(keep=40, basis=4)
    y = torch.randn(1, 40, 3)
    tokens, positions, [same] = ApetCompressor(full).compress_with(x, [y])
    assert torch.equal(tokens, x) and torch.equal(same, y) and torch.equal(positions[0], torch.arange(40))
