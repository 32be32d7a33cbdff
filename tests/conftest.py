import os
import random

import pytest
import torch


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed every run (printed, so a failure can be replayed with
    APET_TEST_SEED=<seed>)."""
    seed = int(os.environ.get("APET_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"APET_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
