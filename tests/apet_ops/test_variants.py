"""The image-layout variants the family adapters use (docs/DESIGN.md, "Variants"): seed placement by
error rank (the official stage 2 inside the LLM), the seed blend (Qwen2.5-VL), the ratio budget,
and per-image FPS starts. Graph form against the oracle, and the official rules on a case worked
out by hand."""

import pytest
import torch

from apet_trt.apet_ops import ApetCompressor, ApetConfig, compress_reference
from apet_trt.apet_ops.reference import decide
from helpers.apet_cases import constant_image, duplicated_tokens, well_posed

D = 40


def random_image(n):
    return lambda g: torch.randn(n, D, generator=g) * torch.rand(n, 1, generator=g) * 3


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize(
    "budget",
    [dict(keep=30), dict(keep=11), dict(keep_ratio=0.3)],
    ids=["keep30", "keep11", "ratio0.3"],
)
@pytest.mark.parametrize("placement,blend", [("error_rank", 1.0), ("position", 0.5), ("error_rank", 0.5)])
def test_variants_match_oracle(rng, placement, blend, budget, merge):
    n = int(torch.randint(60, 130, (1,), generator=rng))
    config = ApetConfig(**budget, basis=10, merge=merge, seed_placement=placement, seed_blend=blend)
    starts = torch.randint(0, n, (2,), generator=rng)
    x = well_posed(random_image(n), config, 2, rng, starts=starts)
    ref_tokens, ref_pos = compress_reference(x, config, start=starts)
    tokens, pos = ApetCompressor(config)(x, starts)
    assert pos.shape == (2, config.keep_for(n))
    assert torch.equal(pos, ref_pos), "kept positions differ from the oracle's"
    rel = (tokens - ref_tokens).norm(dim=-1) / ref_tokens.norm(dim=-1).clamp_min(1e-30)
    assert rel.max() < 1e-4, f"tokens differ by {rel.max():.2e} relative"


@pytest.mark.parametrize("placement", ["position", "error_rank"])
@pytest.mark.parametrize("make", [duplicated_tokens, constant_image], ids=["duplicated", "constant"])
def test_variants_on_exact_ties(rng, placement, make):
    config = ApetConfig(keep_ratio=0.25, basis=6, seed_placement=placement, seed_blend=0.5)
    x = make(rng, 2, 96, D)
    ref_tokens, ref_pos = compress_reference(x, config)
    tokens, pos = ApetCompressor(config)(x)
    assert torch.equal(pos, ref_pos)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-4, atol=1e-5)


# --- the official rules on a hand-worked case ---------------------------------------------------

# Seeds from start 0: token 0, then token 2 (squared distance 1000 from token 0, the farthest).
# They span the xy-plane, so every other token's error is its |z|: 4, 1, 3, 2, 6 for tokens
# 1, 3, 4, 5, 6; the seeds reconstruct themselves (error 0). Ranking: 6, 1, 4, 5, 3, 0, 2.
# T=5 keeps positions 1 3 4 5 6; the first T-k=3 (6, 1, 4) are not slots, so slots are 5 and 3
# (error ranks 3 and 4). Merge: token 0 is orthogonal to every candidate (1, 4, 6): a tie at
# cosine 0, won by the lowest position, 1; token 2 is closest to 4 (cosines 1/sqrt(17),
# 1/sqrt(10), 0).
HAND = torch.tensor(
    [[10, 0, 0], [0, 1, 4], [0, 30, 0], [1, 1, 1], [0, 1, 3], [1, 0, 2], [0, 0, 6]], dtype=torch.float64
)
SEED0, SEED1 = HAND[0], HAND[2]
EXPECTED = {  # (placement, blend) -> tokens at positions 1 3 4 5 6
    ("position", 1.0): [(HAND[1] + HAND[0]) / 2, SEED0, (HAND[4] + HAND[2]) / 2, SEED1, HAND[6]],
    ("error_rank", 1.0): [(HAND[1] + HAND[0]) / 2, SEED1, (HAND[4] + HAND[2]) / 2, SEED0, HAND[6]],
    ("position", 0.5): [
        (HAND[1] + HAND[0]) / 2,
        0.5 * SEED0 + 0.5 * HAND[3],
        (HAND[4] + HAND[2]) / 2,
        0.5 * SEED1 + 0.5 * HAND[5],
        HAND[6],
    ],
}


@pytest.mark.parametrize("placement,blend", sorted(EXPECTED))
def test_official_rules_by_hand(placement, blend):
    config = ApetConfig(keep=5, basis=2, start=0, seed_placement=placement, seed_blend=blend)
    dec = decide(HAND, config)
    assert dec.seeds == [0, 2] and dec.order == [6, 1, 4, 5, 3, 0, 2]
    assert dec.seed_slots == [3, 5] and dec.merge_targets == {0: 1, 2: 4}
    expected = torch.stack(EXPECTED[placement, blend])
    for fn in (compress_reference, lambda x, c: ApetCompressor(c)(x)):
        for dtype in (torch.float64, torch.float32):
            tokens, pos = fn(HAND.to(dtype).unsqueeze(0), config)
            assert pos.tolist() == [[1, 3, 4, 5, 6]]
            torch.testing.assert_close(tokens[0].double(), expected, rtol=1e-5, atol=1e-5)


# --- per-image start ---------------------------------------------------------------------------


def test_per_image_start_is_per_image_config(rng):
    """A [B] start gives each image what a config with that start gives it alone."""
    config = ApetConfig(keep=20, basis=5, seed_placement="error_rank")
    starts = torch.tensor([0, 17, 63])
    x = well_posed(random_image(64), config, 3, rng, starts=starts)
    tokens, pos = ApetCompressor(config)(x, starts)
    ref_tokens, ref_pos = compress_reference(x, config, start=starts.tolist())
    assert torch.equal(pos, ref_pos)
    for b, s in enumerate(starts.tolist()):
        alone = ApetConfig(keep=20, basis=5, seed_placement="error_rank", start=s)
        one_tokens, one_pos = compress_reference(x[b : b + 1], alone)
        assert torch.equal(ref_pos[b], one_pos[0]) and torch.equal(ref_tokens[b], one_tokens[0])
        assert decide(x[b].double(), config, s).seeds[0] == s


@pytest.mark.parametrize("fn", [compress_reference, lambda x, c, s: ApetCompressor(c)(x, s)], ids=["oracle", "graph"])
def test_bad_start(fn):
    config, x = ApetConfig(keep=8, basis=2), torch.randn(2, 20, 4)
    with pytest.raises(ValueError, match="start index 20 is outside 0..19"):
        fn(x, config, torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="start index -1"):
        fn(x, config, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        fn(x, config, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        fn(x, config, torch.tensor([0.0, 1.0]))


# --- the ratio budget --------------------------------------------------------------------------


def test_ratio_budget_is_exact_floor():
    """T = floor(R * N) in exact arithmetic. For R = 0.3 (the official Qwen2.5-VL setting) this is
    the official int(0.3 * n) for every N below 2**17; for some ratios float64 rounding makes the
    official expression one lower (int(0.7 * 90) == 62), where we keep floor(63.0) = 63."""
    ns, config = range(1, 2**17), ApetConfig(keep_ratio=0.3, basis=1)
    assert [config.keep_for(n) for n in ns] == [int(0.3 * n) for n in ns]
    assert int(0.7 * 90) == 62 and ApetConfig(keep_ratio=0.7, basis=1).keep_for(90) == 63
    assert ApetConfig(keep_ratio=0.333, basis=1).keep_for(1000) == 333
    assert ApetConfig(keep_ratio=1, basis=1).keep_for(77) == 77


@pytest.mark.parametrize("ratio,basis,start", [(0.3, 10, 0), (0.25, 3, 5), (0.5, 1, 40), (0.0001, 2, 0)])
def test_ratio_smallest_legal_n(ratio, basis, start):
    config = ApetConfig(keep_ratio=ratio, basis=basis, start=start)
    n = config.min_tokens
    assert config.keep_for(n) > basis and n > start
    assert config.keep_for(n - 1) <= basis or n - 1 <= start
    config.validate_for(n)
    with pytest.raises(ValueError):
        config.validate_for(n - 1)
    if n <= 300:
        x = torch.randn(1, n, 6)
        assert torch.equal(ApetCompressor(config)(x)[1], compress_reference(x, config)[1])


def test_ratio_errors_are_clear():
    config = ApetConfig(keep_ratio=0.3, basis=10)
    assert config.min_tokens == 37  # floor(0.3 * 37) = 11 > 10, floor(0.3 * 36) = 10
    for fn in (compress_reference, lambda x, c: ApetCompressor(c)(x)):
        with pytest.raises(ValueError, match=r"keeps T=floor\(0.3\*36\)=10 of N=36 .* > basis=10; .* N >= 37"):
            fn(torch.randn(1, 36, 4), config)


def test_ratio_one_returns_input(rng):
    x = torch.randn(2, 25, 6, generator=rng)
    config = ApetConfig(keep_ratio=1.0, basis=4)
    for tokens, pos in (compress_reference(x, config), ApetCompressor(config)(x)):
        assert torch.equal(tokens, x) and torch.equal(pos, torch.arange(25).expand(2, 25))


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(basis=2), "exactly one budget"),
        (dict(keep=8, keep_ratio=0.5, basis=2), "exactly one budget"),
        (dict(keep_ratio=0.0, basis=2), r"keep_ratio must be a number in \(0, 1\]"),
        (dict(keep_ratio=1.5, basis=2), r"keep_ratio must be a number in \(0, 1\]"),
        (dict(keep_ratio=0.12345, basis=2), "at most 4 decimals"),
        (dict(keep_ratio="0.3", basis=2), "keep_ratio must be a number"),
        (dict(keep=8, basis=2, seed_placement="rank"), "seed_placement must be one of"),
        (dict(keep=8, basis=2, seed_blend=0.0), r"seed_blend must be a number in \(0, 1\]"),
        (dict(keep=8, basis=2, seed_blend=True), "seed_blend must be a number"),
        (dict(keep=8, basis=2, layout="audio"), "layout must be one of"),
        (dict(keep_ratio=0.3, basis=2, layout="video"), "keep_ratio is for the image layout"),
        (dict(keep=8, basis=2, layout="video", seed_blend=0.5), "seed_placement and seed_blend do not apply"),
        (dict(keep=0, basis=2, layout="video"), "keep must be >= 1 for the video layout"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ApetConfig(**kwargs)


def test_config_round_trip_and_old_manifests():
    old = {"keep": 64, "basis": 10, "merge": True, "ridge": 1e-5, "start": 0}
    assert ApetConfig.from_dict(old) == ApetConfig(keep=64)
    assert ApetConfig(keep=64).to_dict() == old  # a default config serialises as it always did
    for config in (
        ApetConfig(keep_ratio=0.3, seed_blend=0.5),
        ApetConfig(keep=32, basis=10, seed_placement="error_rank", start=5),
        ApetConfig(keep=22, basis=10, layout="video"),
    ):
        assert ApetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ApetConfig fields"):
        ApetConfig.from_dict({**old, "ratio": 0.3})
