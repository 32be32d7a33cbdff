"""What `auto` (or the caller) chose for a stage - a vision backend (runtime/backends/) or a decoder
(runtime/decoders/) - and why; logged once, at WARNING when `auto` fell back from the faster choice
the engine directory offers (a TensorRT plan, a TensorRT-LLM engine), else at INFO."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("apet.runtime")

# the one list of each: what runtime.load(), `apet run` and `apet serve` take ("auto" first)
BACKENDS = ("auto", "tensorrt", "onnxruntime", "torch")
DECODERS = ("auto", "transformers", "tensorrt_llm", "tensorrt_llm_api")


@dataclass(frozen=True)
class Choice:
    name: str  # "onnxruntime", "transformers", ...
    reason: str  # one line: "requested", "auto: ...", "auto: fell back from ... because ..."
    fallback: bool = False  # auto could not use what the directory holds for this stage

    def log(self, stage: str) -> None:
        """One line on logger "apet.runtime": `stage name (reason)`."""
        log.log(logging.WARNING if self.fallback else logging.INFO, "%s %s (%s)", stage, self.name, self.reason)
