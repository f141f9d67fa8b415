"""The server's Prometheus metrics, in a registry of their own (one per served model), exposed at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300)  # seconds


class Metrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dgemma_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("dgemma_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("dgemma_completion_tokens", "tokens returned to clients", registry=r)
        self.decoder_passes = Counter(
            "dgemma_decoder_passes", "decoder forward passes (one pass serves every row in it)", registry=r
        )
        self.decoder_rows = Counter(
            "dgemma_decoder_rows", "rows over all decoder passes: / passes = mean batch occupancy", registry=r
        )
        self.encoder_passes = Counter("dgemma_encoder_passes", "encoder passes (prompts, commits)", registry=r)
        buckets = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch] + [max_batch]
        self.batch_rows = Histogram("dgemma_batch_rows", "rows denoised per engine step", buckets=buckets, registry=r)
        self.running = Gauge("dgemma_running_rows", "requests being denoised now", registry=r)
        self.queued = Gauge("dgemma_queue_length", "requests waiting for a row", registry=r)
        self.first_canvas = Histogram(
            "dgemma_time_to_first_canvas_seconds", "request arrival to its first committed canvas", buckets=LATENCY,
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "dgemma_request_seconds", "request arrival to its last event", buckets=LATENCY, registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
