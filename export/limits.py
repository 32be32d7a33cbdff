"""Bounds a build checks before it builds anything, so that no engine is written that the runtime
would refuse or that could not run on the machine class it is meant for (docs/LIMITS.md).

The engine format's bounds are the runtime schema's (runtime/manifest_schema.py: MAX_TOKENS, MAX_BATCH,
MAX_BASIS), repeated here because export never imports runtime; a test holds each pair equal.
"""

from __future__ import annotations

# rows of one image the engine format takes (manifest `vision.max_tokens`, `num_visual_tokens`, ...)
MAX_TOKENS_PER_IMAGE = 1 << 20
# engine items per call (manifest `batch.max`)
MAX_BATCH = 4096
# ApET's basis tokens (manifest `apet.basis`, `llm_stage.basis`)
MAX_BASIS = 4096

# the default budget for a vision engine's estimated peak memory (`apet build --max-memory`): a
# 24 GiB machine, with 8 GiB left for the decoder, the process and everything else
DEFAULT_MAX_MEMORY_GIB = 16.0
