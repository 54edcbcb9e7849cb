"""Prometheus metrics of one server (its own registry, so several apps in a process stay apart)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Queue depth and busy rows (read from the engine on scrape), requests by outcome, tokens, latencies."""

    def __init__(self, client):
        """`client`: the EngineClient whose engine is measured."""
        self.registry = CollectorRegistry()
        Gauge("mixtral_queue_depth", "Requests waiting for a batch row", registry=self.registry) \
            .set_function(lambda: client.queue_depth)
        Gauge("mixtral_busy_rows", "Batch rows holding a request", registry=self.registry) \
            .set_function(lambda: client.busy_rows)
        Gauge("mixtral_cache_span", "Cache slots the last step attended over (a span of the ring, or all of it)",
              registry=self.registry).set_function(lambda: client.cache_span)
        Gauge("mixtral_batch_rows", "Batch rows (request slots) of the artifact", registry=self.registry) \
            .set(client.admission.batch)
        Gauge("mixtral_engine_restarts", "Engine processes started after the first one died",
              registry=self.registry).set_function(lambda: client.restarts)
        Gauge("mixtral_engine_up", "1 while the engine serves, 0 while it restarts, has failed or is closing",
              registry=self.registry).set_function(lambda: float(client.state == "ok" and not client.closed))
        self.requests = Counter("mixtral_requests", "Requests by outcome (a finish reason, or why refused)",
                                ["outcome"], registry=self.registry)
        self.stalled_streams = Counter("mixtral_stalled_streams", "Streams cut because their client stopped reading",
                                       registry=self.registry)
        self.prompt_tokens = Counter("mixtral_prompt_tokens", "Prompt tokens admitted", registry=self.registry)
        self.generated_tokens = Counter("mixtral_generated_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram("mixtral_time_to_first_token_seconds", "Submit to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("mixtral_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
