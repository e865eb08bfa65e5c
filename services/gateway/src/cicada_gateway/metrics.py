"""Prometheus metrics of the gateway (one registry per app)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cicada_shared.contracts import JobResult

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "cicada_requests", "REST requests by route and status", ["route", "status"], registry=r
        )
        self.in_flight = Gauge(
            "cicada_requests_in_flight", "Inference requests being served", registry=r
        )
        self.jobs = Counter(
            "cicada_jobs", "Finished jobs by model and state", ["model", "state"], registry=r
        )
        self.cold_starts = Counter(
            "cicada_cold_starts", "Jobs that loaded their model", ["model"], registry=r
        )
        self.failures = Counter(
            "cicada_failures", "Failed jobs by error kind", ["kind"], registry=r
        )
        self.queue = Histogram(
            "cicada_queue_seconds", "Submission to dispatch", ["model"], buckets=BUCKETS, registry=r
        )
        self.load = Histogram(
            "cicada_load_seconds",
            "Cold start, request to result (E2E)",
            ["model"],
            buckets=BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "cicada_compute_seconds",
            "Time in the forward pass",
            ["model"],
            buckets=BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "cicada_infer_seconds",
            "Synchronous infer, end to end",
            ["model"],
            buckets=BUCKETS,
            registry=r,
        )

    def observe(self, result: JobResult) -> None:
        model = result.model
        self.jobs.labels(model, result.state).inc()
        if result.error is not None:
            self.failures.labels(result.error.kind).inc()
        if result.queue_s is not None:
            self.queue.labels(model).observe(result.queue_s)
        if result.compute_s is not None:
            self.compute.labels(model).observe(result.compute_s)
        if result.cold:
            self.cold_starts.labels(model).inc()
            if "e2e_s" in result.timeline:
                self.load.labels(model).observe(float(result.timeline["e2e_s"]))
