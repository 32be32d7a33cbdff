"""ApetConfig: the parameters of one ApET compressor (docs/DESIGN.md, "The algorithm")."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ApetConfig:
    """What ApET keeps and how.

    keep   T, tokens kept per image (output length).
    basis  k, tokens picked by farthest point sampling to reconstruct the others from.
    merge  add every dropped token into its most similar kept non-seed token (averaging).
    ridge  eps of the ridge least squares `(S S^T + eps I)^-1 S X^T`; must be > 0 so the solve is
           well posed even when seeds repeat (a constant or all-zero image).
    start  index of the first FPS seed (the paper samples it at random; a fixed integer keeps
           engines deterministic).
    """

    keep: int
    basis: int = 10
    merge: bool = True
    ridge: float = 1e-5
    start: int = 0

    def __post_init__(self) -> None:
        for name in ("keep", "basis", "start"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ApetConfig.{name} must be an int, got {value!r}")
        if not isinstance(self.merge, bool):
            raise TypeError(f"ApetConfig.merge must be a bool, got {self.merge!r}")
        if self.basis < 1:
            raise ValueError(f"ApetConfig.basis must be >= 1, got basis={self.basis}")
        if self.keep <= self.basis:
            raise ValueError(
                f"ApetConfig.keep must be > basis (the kept set holds the {self.basis} seeds plus "
                f"at least one other token), got keep={self.keep}, basis={self.basis}"
            )
        if self.start < 0:
            raise ValueError(f"ApetConfig.start must be >= 0, got start={self.start}")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ApetConfig.ridge must be a finite number > 0, got ridge={self.ridge!r}")

    def validate_for(self, num_tokens: int) -> None:
        """Check the config against the number of tokens N it will see."""
        if self.keep > num_tokens:
            raise ValueError(f"ApetConfig.keep={self.keep} is larger than the number of tokens N={num_tokens}")
        if self.start >= num_tokens:
            raise ValueError(f"ApetConfig.start={self.start} must be < the number of tokens N={num_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ApetConfig:
        known = {"keep", "basis", "merge", "ridge", "start"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ApetConfig fields: {sorted(unknown)}")
        return cls(**data)
