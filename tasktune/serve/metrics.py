"""Prometheus metrics of one API instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int], resident: Callable[[], int],
                 disk_loads: Callable[[], int] | None = None,
                 steps_ahead: Callable[[], tuple[int, int]] | None = None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("tasktune_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("tasktune_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("tasktune_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.latency = Histogram("tasktune_request_latency_seconds", "End-to-end generation latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tasktune_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        Gauge("tasktune_queue_depth", "Requests waiting for a slot", registry=r).set_function(queue_depth)
        Gauge("tasktune_running_sequences", "Sequences in the running batch", registry=r).set_function(running)
        Gauge("tasktune_resident_adapters", "Adapters resident on the device", registry=r).set_function(resident)
        if disk_loads is not None:
            Gauge("tasktune_adapter_disk_loads", "Adapters read from disk since start (LRU misses)",
                  registry=r).set_function(disk_loads)
        if steps_ahead is not None:  # a greedy decode step launched before the last one was read
            ahead = Gauge("tasktune_decode_steps_ahead", "Decode steps launched ahead since start: used, or wasted "
                          "(the batch changed)", ["outcome"], registry=r)
            ahead.labels("used").set_function(lambda: steps_ahead()[0])
            ahead.labels("wasted").set_function(lambda: steps_ahead()[1])

    def observe_completion(self, endpoint: str, model: str, prompt_tokens: int, tokens: int, seconds: float,
                           ttft: float | None) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(tokens)
        self.latency.labels(endpoint).observe(seconds)
        if ttft is not None:
            self.ttft.observe(ttft)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
