"""Prometheus metrics of the service (``GET /metrics``).

With several uvicorn workers, each worker is its own process with its own counters.
``python -m streamml.serve`` then sets ``PROMETHEUS_MULTIPROC_DIR`` (before any worker
imports ``prometheus_client``), every worker writes its values to files there, and
``/metrics`` on any worker sums them over all workers (prometheus_client's
multiprocess mode). With one worker, or in tests, the process's own registry is served.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["LATENCY", "UPDATES", "DUPLICATES", "LATE", "STORE_ERRORS", "EVENTS", "render"]

# the service's own registry (not the global one): importing this module twice, as doctest
# collection does, must not register the metrics twice
REGISTRY = CollectorRegistry()
# request latency up to 1 s, finest around the 10-25 ms targets
LATENCY = Histogram(
    "streamml_request_seconds", "Request latency by endpoint", ["endpoint", "method"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
UPDATES = Counter("streamml_updates_applied", "Online updates applied (rewards and feedback)", ["source"], registry=REGISTRY)
DUPLICATES = Counter("streamml_duplicates", "Rewards or feedback acknowledged but not applied again", ["source"],
                     registry=REGISTRY)
LATE = Counter("streamml_late_rewards", "Rewards refused because the event's reward window had closed", registry=REGISTRY)
STORE_ERRORS = Counter("streamml_store_errors", "Requests answered 503 because the backend failed", registry=REGISTRY)
EVENTS = Counter("streamml_rank_events", "Rank events logged, by A/B bucket", ["bucket"], registry=REGISTRY)


def render() -> tuple[bytes, str]:
    """The metrics text and its content type: summed over workers in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
