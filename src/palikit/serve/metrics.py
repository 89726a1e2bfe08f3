"""Prometheus metrics for one server (its own registry, so several apps can live in one process).

`/metrics` exposes, in the Prometheus text format:
  palikit_requests_total{endpoint,status}       counter
  palikit_request_duration_seconds{endpoint}    histogram (whole request, streaming included)
  palikit_batch_size                            histogram (requests per model call)
  palikit_batch_duration_seconds                histogram (one model call)
  palikit_queue_depth                           gauge (requests waiting for the model)
  palikit_inflight_requests                     gauge
  palikit_generated_tokens_total                counter
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("palikit_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("palikit_request_duration_seconds", "Request latency by endpoint.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("palikit_batch_size", "Requests per model call.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_seconds = Histogram("palikit_batch_duration_seconds", "Duration of one model call.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("palikit_queue_depth", "Requests waiting for the model.", registry=r)
        self.inflight = Gauge("palikit_inflight_requests", "Requests being handled.", registry=r)
        self.tokens = Counter("palikit_generated_tokens", "Tokens generated.", registry=r)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
