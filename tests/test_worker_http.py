"""The worker's status port: `/metrics`, a real `/health`, and 404 for anything else (the
bridge's StatusServer, shared)."""

from __future__ import annotations

import requests

from gokiq_celery import metrics
from gokiq_celery.settings import load_settings

from .conftest import free_port


def _get(url: str) -> tuple[int, str]:
    response = requests.get(url, timeout=10)
    return response.status_code, response.text


def test_worker_serves_health_and_metrics_and_nothing_else():
    port = free_port()
    settings = load_settings(environ={}, worker_metrics_port=port)
    registry = metrics.process_metrics().registry  # what a worker process serves
    server = metrics.serve_worker_metrics(settings, registry)
    assert server is not None
    try:
        url = f"http://127.0.0.1:{port}"
        assert _get(url + "/health") == (200, "ok\n")
        status, body = _get(url + "/metrics")
        assert status == 200 and "gokiq_worker_job_duration_seconds" in body
        assert _get(url + "/ready")[0] == 404  # the worker has no readiness check of its own
        assert _get(url + "/")[0] == 404
        assert _get(url + "/metricsx")[0] == 404
        # A second worker on the host: no server, a warning, the worker still runs.
        assert metrics.serve_worker_metrics(settings, registry) is None
    finally:
        server.stop()


def test_port_zero_serves_nothing():
    settings = load_settings(environ={}, worker_metrics_port=0)
    assert metrics.serve_worker_metrics(settings, metrics.WorkerMetrics().registry) is None
