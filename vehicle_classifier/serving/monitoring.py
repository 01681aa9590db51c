"""Prometheus metrics of the service: requests by endpoint, method and status, their latency,
and images by predicted label."""

from __future__ import annotations

import os
import time

from flask import Flask, g, request

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The counters of one app. Under gunicorn, gunicorn.conf.py sets prometheus_client's
    PROMETHEUS_MULTIPROC_DIR: the values live in files shared by all workers and /metrics sums
    them; otherwise they live in this app's own registry."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("http_requests", "HTTP requests by endpoint, method and status",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("http_request_duration_seconds", "Time to answer a request",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("predicted_images", "Images classified, by predicted label",
                              ["label"], registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its mimetype."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        mimetype = CONTENT_TYPE_LATEST.split(";")[0]
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), mimetype
        return generate_latest(self.registry), mimetype

    def init_app(self, app: Flask) -> None:
        """Count and time every request of `app`."""

        @app.before_request
        def _start_timer():
            g.started = time.perf_counter()

        @app.after_request
        def _count(response):
            endpoint = request.url_rule.rule if request.url_rule else "unmatched"
            self.requests.labels(endpoint, request.method, str(response.status_code)).inc()
            self.latency.labels(endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
            return response
