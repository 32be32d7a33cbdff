"""Prometheus metrics of one server (its own registry, so several servers can live in one process):
requests by outcome, errors by type, latency per stage, batch sizes, queue depth, and the visual
rows handed to the LLM against the rows the uncompressed model would have taken (T vs N)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH = (1, 2, 4, 8, 16, 32, 64)
STAGES = ("queue", "preprocess", "vision", "prefill", "decode", "upstream", "request")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("apet_requests", "Chat requests answered, by HTTP status", ["status"], registry=r)
        self.errors = Counter("apet_request_errors", "Failed requests, by OpenAI error type", ["type"], registry=r)
        self.stage = Histogram(
            "apet_stage_seconds", "Latency per stage (request: end to end)", ["stage"], buckets=_LATENCY, registry=r
        )
        self.vision_batch = Histogram(
            "apet_vision_batch_images", "Images per vision-engine call", buckets=_BATCH, registry=r
        )
        self.decoder_batch = Histogram(
            "apet_decoder_batch_prompts", "Prompts per decoder call", buckets=_BATCH, registry=r
        )
        self.visual_rows = Counter(
            "apet_visual_rows",
            "Visual rows: kept = handed to the LLM (T per image with ApET), uncompressed = what the model "
            "without ApET would take (N)",
            ["kind"],
            registry=r,
        )
        self.images = Counter("apet_images", "Images answered, by how they came", ["source"], registry=r)
        self.tokens = Counter("apet_tokens", "Tokens, by kind", ["kind"], registry=r)
        self.queue_depth = Gauge("apet_queue_depth", "Requests admitted and not yet answered", registry=r)
        self.cancelled = Counter("apet_cancelled", "Requests stopped early (client gone or timed out)", registry=r)
        info = Gauge("apet_model_info", "The served model", ["model"], registry=r)
        info.labels(model=model).set(1)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage.labels(stage=stage).observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
