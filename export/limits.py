"""Bounds a build checks before it builds anything, so that no engine is written that the runtime
would refuse or that could not run on the machine class it is meant for (docs/LIMITS.md).

MAX_TOKENS_PER_IMAGE is the runtime schema's bound on `vision.max_tokens` (runtime/manifest_schema.py,
MAX_TOKENS), repeated here because export never imports runtime; a test holds the two equal.
"""

from __future__ import annotations

# rows of one image the engine format takes (manifest `vision.max_tokens`, `num_visual_tokens`, ...)
MAX_TOKENS_PER_IMAGE = 1 << 20

# the default budget for a vision engine's estimated peak memory (`apet build --max-memory`): a
# 24 GiB machine, with 8 GiB left for the decoder, the process and everything else
DEFAULT_MAX_MEMORY_GIB = 16.0
