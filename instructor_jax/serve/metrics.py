"""Prometheus metrics of one server (its own registry, so that several apps in one process do not clash)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

from instructor_jax.serve.batcher import BatchStats

PREFIX = "instructor_jax"
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKENS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Metrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=registry)
        self.request_seconds = Histogram(f"{PREFIX}_request_seconds", "Time from request to answer, by route",
                                         ["route"], buckets=SECONDS, registry=registry)
        self.queue_seconds = Histogram(f"{PREFIX}_queue_seconds", "Time a request's inputs waited for their "
                                       "first batch", buckets=SECONDS, registry=registry)
        self.inference_seconds = Histogram(f"{PREFIX}_inference_seconds", "Encode time of a batch",
                                           buckets=SECONDS, registry=registry)
        self.batch_inputs = Histogram(f"{PREFIX}_batch_inputs", "Inputs per batch", buckets=COUNTS,
                                      registry=registry)
        self.batch_tokens = Histogram(f"{PREFIX}_batch_tokens", "Real tokens per batch", buckets=TOKENS,
                                      registry=registry)
        self.padding = Histogram(f"{PREFIX}_batch_padding_fraction", "Share of a batch's computed token slots "
                                 "that are padding", buckets=FRACTIONS, registry=registry)
        self.tokens = Counter(f"{PREFIX}_embedded_tokens", "Real tokens embedded", registry=registry)
        self.inputs = Counter(f"{PREFIX}_embedded_inputs", "Inputs embedded", registry=registry)
        self.tokens_per_second = Gauge(f"{PREFIX}_tokens_per_second", "Real tokens per second of encode time, "
                                       "last batch", registry=registry)
        self.compiles = Counter(f"{PREFIX}_compiles_after_warmup", "Programs compiled after warm-up (0 unless "
                                "a bug)", registry=registry)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read when scraped."""
        Gauge(f"{PREFIX}_{name}", documentation, registry=self.registry).set_function(read)

    def observe_batch(self, stats: BatchStats) -> None:
        self.inference_seconds.observe(stats.seconds)
        self.batch_inputs.observe(stats.inputs)
        self.batch_tokens.observe(stats.tokens)
        if stats.slots:
            self.padding.observe(max(0.0, 1 - stats.tokens / stats.slots))
        for seconds in stats.queue_seconds:
            self.queue_seconds.observe(seconds)
        self.tokens.inc(stats.tokens)
        self.inputs.inc(stats.inputs)
        if stats.seconds > 0:
            self.tokens_per_second.set(stats.tokens / stats.seconds)
        if stats.compiled:
            self.compiles.inc(stats.compiled)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
