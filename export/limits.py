"""Bounds a build checks before it builds anything, so that no engine is written that the runtime
would refuse or that could not run on the machine class it is meant for (docs/LIMITS.md).

The engine format's bounds are engine_format's (the schema both sides check manifests with).
"""

from __future__ import annotations

from apet_trt.engine_format import MAX_BASIS, MAX_BATCH
from apet_trt.engine_format import MAX_TOKENS as MAX_TOKENS_PER_IMAGE

__all__ = ["DEFAULT_MAX_MEMORY_GIB", "MAX_BASIS", "MAX_BATCH", "MAX_TOKENS_PER_IMAGE"]

# the default budget for a vision engine's estimated peak memory (`apet build --max-memory`): a
# 24 GiB machine, with 8 GiB left for the decoder, the process and everything else
DEFAULT_MAX_MEMORY_GIB = 16.0
