"""The decoder of a vision-only server (`apet serve --upstream`): there is none here, the upstream
decodes. Standing in for it lets runtime.load build the rest of the pipeline without loading the
language model."""

from __future__ import annotations

from ..decoders import Decoder


class VisionOnlyDecoder(Decoder):
    name = "upstream"

    def __init__(self, max_length: int):
        self.max_length = int(max_length)

    @classmethod
    def for_manifest(cls, manifest) -> VisionOnlyDecoder:
        return cls(int(manifest.llm["max_position_embeddings"]))

    def generate(self, prompts, visual, sampling):
        raise RuntimeError("this server encodes images only; decoding runs on the upstream")
