"""Prometheus metrics for one server (its own registry, so several apps can live in one process).

`/metrics` exposes, in the Prometheus text format:
  palikit_requests_total{endpoint,status}       counter
  palikit_request_duration_seconds{endpoint}    histogram (whole request, streaming included)
  palikit_generation_duration_seconds           histogram (one generation in the engine, queue wait included)
  palikit_queue_depth                           gauge (requests waiting for a slot)
  palikit_inflight_requests                     gauge
  palikit_generated_tokens_total                counter
  palikit_live_slots / palikit_slots            gauges (sequences decoding now / slot count)
  palikit_engine_queued                         gauge (requests queued inside the engine)
  palikit_tokens_per_second                     gauge (generated tokens/s over the last scrape interval)
  palikit_image_cache_hit_rate                  gauge (image-feature cache hits / lookups, since start)
  palikit_decode_steps / palikit_decode_slot_steps  gauges (decode steps, and live slots summed over them,
                                                    since start: their ratio is the mean batch occupancy)
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("palikit_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("palikit_request_duration_seconds", "Request latency by endpoint.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("palikit_generation_duration_seconds",
                                            "One generation in the engine (queue wait included).",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("palikit_queue_depth", "Requests waiting for a slot.", registry=r)
        self.inflight = Gauge("palikit_inflight_requests", "Requests being handled.", registry=r)
        self.tokens = Counter("palikit_generated_tokens", "Tokens generated.", registry=r)
        self.live_slots = Gauge("palikit_live_slots", "Sequences decoding now.", registry=r)
        self.slots = Gauge("palikit_slots", "Sequence slots of the engine.", registry=r)
        self.engine_queued = Gauge("palikit_engine_queued", "Requests queued inside the engine.", registry=r)
        self.tokens_per_second = Gauge("palikit_tokens_per_second", "Generated tokens per second since the last scrape.",
                                       registry=r)
        self.image_cache_hit_rate = Gauge("palikit_image_cache_hit_rate", "Image-feature cache hits / lookups.",
                                          registry=r)
        self.decode_steps = Gauge("palikit_decode_steps", "Decode steps since start.", registry=r)
        self.decode_slot_steps = Gauge("palikit_decode_slot_steps", "Live slots summed over decode steps.", registry=r)
        self._last_tokens: tuple[float, int] | None = None

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_generation(self, tokens: int, seconds: float) -> None:
        self.tokens.inc(tokens)
        self.generation_seconds.observe(seconds)

    def observe_engine(self, stats: dict) -> None:
        """Engine gauges from `Scheduler.stats()` (called on each scrape)."""
        self.live_slots.set(stats["live_slots"])
        self.slots.set(stats["max_slots"])
        self.engine_queued.set(stats["queued"])
        self.image_cache_hit_rate.set(stats["image_cache_hit_rate"])
        self.decode_steps.set(stats["decode_steps"])
        self.decode_slot_steps.set(stats["decode_slot_steps"])
        now = time.monotonic()
        if self._last_tokens is not None and now > self._last_tokens[0]:
            self.tokens_per_second.set((stats["tokens_generated"] - self._last_tokens[1]) / (now - self._last_tokens[0]))
        self._last_tokens = (now, stats["tokens_generated"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
