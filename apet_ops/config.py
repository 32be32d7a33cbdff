"""ApetConfig: the parameters of one ApET compressor (docs/DESIGN.md, "The algorithm")."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from fractions import Fraction

SEED_PLACEMENTS = ("position", "error_rank")
LAYOUTS = ("image", "video")
RATIO_DECIMALS = 4  # keep_ratio is applied in exact integer arithmetic: floor(p * N / q), q | 10**4

# The fields every manifest has carried since the first release; the later ones are written only
# when they differ from their default, so a default config serialises exactly as it always did.
_BASE_FIELDS = ("keep", "basis", "merge", "ridge", "start")


@dataclass(frozen=True)
class ApetConfig:
    """What ApET keeps and how.

    keep        T, a fixed budget. Image layout: tokens kept per image (the output length, seed
                slots included). Video layout: patch rows kept per frame (CLS and seeds come on top).
    keep_ratio  R, a budget relative to the N tokens of each image: T = floor(R * N) (image layout
                only; exactly one of keep / keep_ratio). R has at most 4 decimals.
    basis       k, tokens picked by farthest point sampling to reconstruct the others from.
    merge       average every dropped token into its most similar kept candidate.
    ridge       eps of the ridge least squares `(S S^T + eps I)^-1 S X^T`; must be > 0 so the solve is
                well posed even when seeds repeat (a constant or all-zero image).
    start       index of the first FPS seed among the rows FPS runs over (the paper samples it at
                random; a fixed integer keeps engines deterministic; both forms also take a
                per-image start at call time).
    seed_placement  image layout: which kept slot receives which seed. "position": seed j (FPS
                order) goes to the j-th smallest position among the k lowest-error kept tokens (the
                official stage 1); "error_rank": seed j goes to the kept token of error rank T-k+j
                (the official stage 2 inside the LLM).
    seed_blend  image layout: weight w of the seed in its slot, slot = w * seed + (1 - w) * slot.
                1.0 overwrites (LLaVA); the official Qwen2.5-VL code blends 0.5.
    layout      "image": steps 1-6 of docs/DESIGN.md, output in position order. "video": one frame
                of R rows with CLS first (Video-LLaVA after the projector); output
                [CLS, keep rows in descending-error order, the k seeds] = 1 + keep + basis rows.
    """

    keep: int | None = None
    basis: int = 10
    merge: bool = True
    ridge: float = 1e-5
    start: int = 0
    keep_ratio: float | None = None
    seed_placement: str = "position"
    seed_blend: float = 1.0
    layout: str = "image"

    def __post_init__(self) -> None:
        for name in ("basis", "start"):
            _check_int(name, getattr(self, name))
        if self.keep is not None:
            _check_int("keep", self.keep)
        if not isinstance(self.merge, bool):
            raise TypeError(f"ApetConfig.merge must be a bool, got {self.merge!r}")
        if self.basis < 1:
            raise ValueError(f"ApetConfig.basis must be >= 1, got basis={self.basis}")
        if self.start < 0:
            raise ValueError(f"ApetConfig.start must be >= 0, got start={self.start}")
        if not (_is_real(self.ridge) and math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ApetConfig.ridge must be a finite number > 0, got ridge={self.ridge!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"ApetConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.seed_placement not in SEED_PLACEMENTS:
            raise ValueError(f"ApetConfig.seed_placement must be one of {SEED_PLACEMENTS}, got {self.seed_placement!r}")
        if not (_is_real(self.seed_blend) and 0 < self.seed_blend <= 1):
            raise ValueError(f"ApetConfig.seed_blend must be a number in (0, 1], got seed_blend={self.seed_blend!r}")
        if (self.keep is None) == (self.keep_ratio is None):
            raise ValueError(
                "ApetConfig needs exactly one budget: keep (a fixed T) or keep_ratio (T = floor(R * N)), "
                f"got keep={self.keep!r}, keep_ratio={self.keep_ratio!r}"
            )
        if self.keep_ratio is not None:
            self._check_ratio()
        if self.layout == "video":
            self._check_video()
        elif self.keep is not None and self.keep <= self.basis:
            raise ValueError(
                f"ApetConfig.keep must be > basis (the kept set holds the {self.basis} seeds plus "
                f"at least one other token), got keep={self.keep}, basis={self.basis}"
            )

    def _check_ratio(self) -> None:
        r = self.keep_ratio
        if not (_is_real(r) and 0 < r <= 1):
            raise ValueError(f"ApetConfig.keep_ratio must be a number in (0, 1], got keep_ratio={r!r}")
        if _fraction(r)[1] > 10**RATIO_DECIMALS:
            raise ValueError(
                f"ApetConfig.keep_ratio must have at most {RATIO_DECIMALS} decimals (T = floor(R * N) is "
                f"computed exactly in integers), got keep_ratio={r!r}"
            )

    def _check_video(self) -> None:
        if self.keep_ratio is not None:
            raise ValueError("ApetConfig.keep_ratio is for the image layout; the video layout takes a fixed keep")
        if self.keep < 1:
            raise ValueError(f"ApetConfig.keep must be >= 1 for the video layout, got keep={self.keep}")
        if self.seed_placement != "position" or self.seed_blend != 1.0:
            raise ValueError(
                "the video layout appends the seeds after the kept rows; seed_placement and seed_blend "
                f"do not apply (got seed_placement={self.seed_placement!r}, seed_blend={self.seed_blend!r})"
            )

    # -- budgets -----------------------------------------------------------------------------------

    @property
    def ratio_fraction(self) -> tuple[int, int] | None:
        """keep_ratio as an exact fraction (p, q) with q | 10**4, or None for a fixed keep."""
        return None if self.keep_ratio is None else _fraction(self.keep_ratio)

    def keep_for(self, num_tokens: int) -> int:
        """T for an input of N tokens (rows): keep, or floor(R * N) in exact integer arithmetic."""
        if self.keep is not None:
            return self.keep
        p, q = self.ratio_fraction
        return (p * num_tokens) // q

    def output_rows(self, num_tokens: int) -> int:
        """Rows the compressor returns for an input of N rows."""
        if self.layout == "video":
            return 1 + self.keep + self.basis
        return self.keep_for(num_tokens)

    @property
    def min_tokens(self) -> int:
        """The smallest N (rows per image or frame, CLS included for video) this config accepts."""
        if self.layout == "video":
            return 1 + max(self.keep, self.start + 1)
        if self.keep is not None:
            return max(self.keep, self.start + 1)
        p, q = self.ratio_fraction  # smallest N with floor(p N / q) >= basis + 1
        return max(-(-(self.basis + 1) * q // p), self.start + 1)

    def max_tokens_for_k(self, limit: int) -> int | None:
        """The largest N whose every TopK K (T, T - k, k) is <= limit; None when N is not the
        bound (a fixed T); 0 when no N fits."""
        if max(self.basis, self.keep if self.keep is not None else 0) > limit:
            return 0
        if self.keep is not None:
            return None
        p, q = self.ratio_fraction  # largest N with floor(p N / q) <= limit
        return ((limit + 1) * q - 1) // p

    def validate_for(self, num_tokens: int) -> None:
        """Check the config against the number of tokens (rows) N it will see."""
        n = num_tokens
        if self.layout == "video":
            if n < 2:
                raise ValueError(f"the video layout needs a CLS row and at least one patch row, got N={n} rows")
            if self.keep > n - 1:
                raise ValueError(f"ApetConfig.keep={self.keep} is larger than the number of patch rows N-1={n - 1}")
            if self.start >= n - 1:
                raise ValueError(f"ApetConfig.start={self.start} must be < the number of patch rows N-1={n - 1}")
            return
        t = self.keep_for(n)
        if self.keep is not None and t > n:
            raise ValueError(f"ApetConfig.keep={self.keep} is larger than the number of tokens N={n}")
        if self.keep_ratio is not None and t <= self.basis:
            raise ValueError(
                f"ApetConfig.keep_ratio={self.keep_ratio} keeps T=floor({self.keep_ratio}*{n})={t} of N={n} "
                f"tokens, which must be > basis={self.basis}; such configs need N >= {self.min_tokens}"
            )
        if self.start >= n:
            raise ValueError(f"ApetConfig.start={self.start} must be < the number of tokens N={n}")

    # -- serialisation (the manifest stores it) -------------------------------------------------

    def to_dict(self) -> dict:
        defaults = ApetConfig.__dataclass_fields__
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _BASE_FIELDS or value != defaults[f.name].default:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ApetConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ApetConfig fields: {sorted(unknown)}")
        return cls(**data)


@functools.lru_cache(maxsize=64)
def _fraction(ratio: float) -> tuple[int, int]:
    """The ratio as written (its shortest decimal repr), as an exact fraction (p, q)."""
    f = Fraction(repr(float(ratio)))
    return f.numerator, f.denominator


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ApetConfig.{name} must be an int, got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
