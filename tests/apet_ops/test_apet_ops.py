"""ApetCompressor (graph form) against compress_reference (the oracle), and the oracle's own
contract: shapes, dtypes, keep == N, errors, and finiteness on degenerate inputs."""

import pytest
import torch

from apet_trt.apet_ops import ApetCompressor, ApetConfig, compress_reference
from apet_trt.apet_ops.reference import decide
from helpers.apet_cases import constant_image, duplicated_tokens, few_huge_tokens, low_rank_plus_noise, well_posed

N, D = 144, 48


def assert_matches_oracle(x: torch.Tensor, config: ApetConfig) -> None:
    ref_tokens, ref_pos = compress_reference(x, config)
    tokens, pos = ApetCompressor(config)(x)
    assert pos.dtype == torch.int64 and tokens.dtype == x.dtype
    assert tokens.shape == (x.shape[0], config.keep, x.shape[2]) and pos.shape == (x.shape[0], config.keep)
    assert torch.equal(pos, ref_pos), "kept positions differ from the oracle's"
    assert torch.all(pos[:, 1:] > pos[:, :-1]), "positions must be strictly ascending"
    assert torch.isfinite(tokens.float()).all()
    if x.dtype == torch.float32:
        scale = ref_tokens.norm(dim=-1).clamp_min(1e-30)
        rel = (tokens - ref_tokens).norm(dim=-1) / scale
        assert rel.max() < 1e-4, f"tokens differ by {rel.max():.2e} relative"
    else:  # both round a float32/float64 result to the same 16-bit dtype: at most one ulp apart
        torch.testing.assert_close(tokens, ref_tokens, rtol=torch.finfo(x.dtype).eps, atol=1e-3)


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("keep,basis,start", [(16, 4, 0), (40, 10, 7), (100, 10, 143), (11, 10, 3)])
def test_random_inputs_match_oracle(rng, keep, basis, start, merge):
    config = ApetConfig(keep=keep, basis=basis, merge=merge, start=start)
    scale = lambda g: torch.randn(N, D, generator=g) * torch.rand(N, 1, generator=g) * 3
    assert_matches_oracle(well_posed(scale, config, 3, rng), config)


STRUCTURED = {
    "low_rank_plus_noise": low_rank_plus_noise,
    "duplicated_tokens": duplicated_tokens,
    "constant_image": constant_image,
    "few_huge_tokens": few_huge_tokens,
}


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_structured_inputs_match_oracle(rng, name):
    config = ApetConfig(keep=24, basis=6)
    x = well_posed(lambda g: STRUCTURED[name](g, 1, N, D)[0], config, 2, rng)
    assert_matches_oracle(x, config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(rng, dtype):
    config = ApetConfig(keep=24, basis=6)
    # CLIP-like magnitudes: squared norms of these overflow float16 (max 65504)
    make = lambda g: (few_huge_tokens(g, 1, N, D, factor=30.0)[0] * 4).to(dtype).float()
    x = well_posed(make, config, 2, rng).to(dtype)
    assert (x.float() ** 2).sum(-1).max() > torch.finfo(torch.float16).max
    assert_matches_oracle(x, config)


def test_large_real_shape(rng):
    """LLaVA-1.5 shapes: N=576, D=1024, T=64, k=10."""
    config = ApetConfig(keep=64, basis=10)
    make = lambda g: torch.randn(576, 1024, generator=g)
    assert_matches_oracle(well_posed(make, config, 2, rng), config)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.zeros(N, D),  # all-zero features
        lambda g: torch.randn(1, D, generator=g).expand(N, D).clone(),  # every seed the same token
        lambda g: torch.cat([torch.zeros(N // 2, D), torch.randn(N - N // 2, D, generator=g)]),
        lambda g: torch.randn(3, D, generator=g).repeat(N // 3, 1) * 1000,  # rank 3, huge
    ],
    ids=["zeros", "constant", "half_zero", "rank3_x1000"],
)
def test_degenerate_bases_are_finite(rng, make):
    config = ApetConfig(keep=24, basis=10)  # basis > rank: seeds repeat, Gram matrix singular
    x = make(rng).unsqueeze(0)
    tokens, pos = ApetCompressor(config)(x)
    ref_tokens, ref_pos = compress_reference(x, config)
    assert torch.isfinite(tokens).all() and torch.isfinite(ref_tokens).all()
    assert torch.equal(pos, ref_pos)


def test_keep_equals_n_returns_input(rng):
    x = torch.randn(2, 20, 8, generator=rng)
    config = ApetConfig(keep=20, basis=4)
    for tokens, pos in (compress_reference(x, config), ApetCompressor(config)(x)):
        assert torch.equal(tokens, x)
        assert torch.equal(pos, torch.arange(20).expand(2, 20))


def test_oracle_steps_by_hand():
    """A 1-D case small enough to check each step by hand."""
    # tokens on a line: 0, 1, 2, 10 (D=1) plus an orthogonal one (D=2)
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [10.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    config = ApetConfig(keep=3, basis=2, start=0)
    dec = decide(x, config)
    assert dec.seeds == [0, 3]  # start, then the farthest from token 0
    # span of the seeds is the x-axis: tokens 1, 2 reconstruct (almost) exactly, token 4 not at all
    assert dec.order[0] == 4
    assert dec.kept == sorted(dec.order[:3])
    tokens, pos = compress_reference(x.unsqueeze(0), config)
    assert pos.tolist() == [dec.kept]
    # seeds go to the two lowest-error kept positions, in order
    for j, p in enumerate(dec.seed_slots):
        assert torch.equal(tokens[0, dec.kept.index(p)], x[dec.seeds[j]])


def test_merge_averages_into_most_similar(rng):
    """Step 5 against an independent numpy-free recomputation from the oracle's decisions."""
    config = ApetConfig(keep=12, basis=3)
    x = well_posed(lambda g: torch.randn(40, 6, generator=g), config, 1, rng)
    dec = decide(x[0].double(), config)
    tokens, pos = compress_reference(x, config)
    for t, p in enumerate(dec.kept):
        if p in dec.seed_slots:
            continue
        group = [i for i, target in dec.merge_targets.items() if target == p]
        expected = (x[0, p] + x[0, group].sum(0)) / (1 + len(group))
        torch.testing.assert_close(tokens[0, t], expected, rtol=1e-6, atol=1e-6)
    assert len(dec.merge_targets) == 40 - 12


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep=10, basis=10), "keep must be > basis"),
        (dict(keep=5, basis=0), "basis must be >= 1"),
        (dict(keep=5, basis=2, start=-1), "start must be >= 0"),
        (dict(keep=5, basis=2, ridge=0.0), "ridge"),
        (dict(keep=5.0, basis=2), "keep must be an int"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ApetConfig(**kwargs)


@pytest.mark.parametrize("fn", [compress_reference, lambda x, c: ApetCompressor(c)(x)])
def test_bad_features(fn):
    config = ApetConfig(keep=8, basis=2)
    with pytest.raises(ValueError, match="keep=8 is larger than the number of tokens N=5"):
        fn(torch.randn(1, 5, 4), config)
    with pytest.raises(ValueError, match="start=9 must be <"):
        fn(torch.randn(1, 9, 4), ApetConfig(keep=4, basis=2, start=9))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        fn(torch.randn(5, 4), config)
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.ones(1, 20, 4, dtype=torch.int64), config)
    with pytest.raises(ValueError, match="non-empty"):
        fn(torch.randn(0, 20, 4), config)
