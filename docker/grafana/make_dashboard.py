"""Generate gokiq-dashboard.json (run from anywhere: python docker/grafana/make_dashboard.py).

The dashboard is written as code so that the metric names stay greppable and the JSON stays
consistent; tests/test_docker.py checks every metric it queries is one gokiq exposes.
"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "${datasource}"}
Q = '{queue=~"$queue"}'
_next_id = iter(range(1, 1000))


def target(expr: str, legend: str = "", ref: str = "A") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}


def timeseries(title, exprs, x, y, w=12, h=8, unit="short", desc="", stack=False):
    return {
        "id": next(_next_id),
        "type": "timeseries",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"fillOpacity": 10, "stacking": {"mode": "normal" if stack else "none"}},
            },
            "overrides": [],
        },
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "calcs": ["max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(exprs)],
    }


def stat(title, expr, x, y, w=4, h=4, unit="short", desc="", mappings=None, steps=None):
    return {
        "id": next(_next_id),
        "type": "stat",
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "mappings": mappings or [],
                "thresholds": {
                    "mode": "absolute",
                    "steps": steps or [{"color": "green", "value": None}],
                },
            },
            "overrides": [],
        },
        "options": {
            "colorMode": "background",
            "graphMode": "area",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
        "targets": [target(expr)],
    }


def quantile(q: float, histogram: str, *by: str) -> str:
    labels = ", ".join(("le", *by))
    return (
        f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket[$__rate_interval])))"
    )


def row(title, y):
    return {
        "id": next(_next_id),
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
        "panels": [],
    }


RED_IF_ANY = [{"color": "green", "value": None}, {"color": "red", "value": 1}]
BREAKER_MAP = [
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green"},
            "1": {"text": "half-open", "color": "orange"},
            "2": {"text": "open", "color": "red"},
        },
    }
]
OPEN_MAP = [
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green"},
            "1": {"text": "open", "color": "red"},
        },
    }
]

panels = [
    row("Overview", 0),
    stat(
        "Dead set",
        'max(gokiq_bridge_set_size{set="dead"})',
        0,
        1,
        desc="Jobs in Sidekiq's dead set (retries exhausted). Act on them in Sidekiq's Web UI.",
        steps=RED_IF_ANY,
    ),
    stat(
        "Retry set",
        'max(gokiq_bridge_set_size{set="retry"})',
        4,
        1,
        desc="Jobs waiting in Sidekiq's retry set, including long retries parked by workers.",
    ),
    stat("Scheduled", 'max(gokiq_bridge_set_size{set="schedule"})', 8, 1),
    stat(
        "Worker breaker",
        "max(gokiq_worker_breaker_state)",
        12,
        1,
        desc="Circuit breaker towards the sidecar, worst across workers.",
        mappings=BREAKER_MAP,
    ),
    stat(
        "Bridge breaker",
        "max(gokiq_bridge_breaker_open)",
        16,
        1,
        desc="1 when the bridge sees the shared breaker open and holds jobs back.",
        mappings=OPEN_MAP,
    ),
    stat("Workers online", "sum(flower_worker_online)", 20, 1, desc="From Flower."),
    row("Throughput", 5),
    timeseries(
        "Jobs moved to Celery per queue",
        [
            (
                f"sum by (queue) (rate(gokiq_bridge_jobs_moved_total{Q}[$__rate_interval]))",
                "{{queue}}",
            ),
        ],
        0,
        6,
        unit="ops",
        desc="Jobs the bridge took from Sidekiq's queues and published.",
    ),
    timeseries(
        "Jobs finished per queue and outcome",
        [
            (
                f"sum by (queue, outcome) (rate(gokiq_worker_jobs_total{Q}[$__rate_interval]))",
                "{{queue}} {{outcome}}",
            ),
        ],
        12,
        6,
        unit="ops",
        stack=True,
    ),
    timeseries(
        "Due jobs moved out of schedule/retry",
        [
            (
                "sum by (set) (rate(gokiq_bridge_scheduler_moved_total[$__rate_interval]))",
                "{{set}}",
            ),
        ],
        0,
        14,
        unit="ops",
    ),
    timeseries(
        "Jobs in flight",
        [
            ("sum(gokiq_bridge_inflight)", "bridge in-flight lists"),
            ("sum(gokiq_sidecar_jobs_in_progress)", "running in sidecars"),
        ],
        12,
        14,
    ),
    row("Sidekiq queues", 22),
    timeseries(
        "Queue latency (age of the oldest job)",
        [
            (f"max by (queue) (gokiq_bridge_queue_latency_seconds{Q})", "{{queue}}"),
        ],
        0,
        23,
        unit="s",
        desc="Sidekiq's Queue#latency: how long the oldest job has waited.",
    ),
    timeseries(
        "Queue size",
        [
            (f"max by (queue) (gokiq_bridge_queue_size{Q})", "{{queue}}"),
        ],
        12,
        23,
    ),
    row("Failures", 31),
    timeseries(
        "Failed jobs per queue and outcome",
        [
            (
                'sum by (queue, outcome) (rate(gokiq_worker_jobs_total{queue=~"$queue",'
                'outcome=~"retry|parked|dead|dropped|discarded|invalid"}[$__rate_interval]))',
                "{{queue}} {{outcome}}",
            ),
        ],
        0,
        32,
        unit="ops",
        desc="retry: Celery retries; parked: long retries moved to "
        "Sidekiq's retry set; dead: to the dead set; dropped: retry false; invalid: bad payload.",
    ),
    timeseries(
        "Retries parked in Sidekiq's retry set",
        [
            (
                'sum by (queue) (rate(gokiq_worker_jobs_total{queue=~"$queue",outcome="parked"}'
                "[$__rate_interval]))",
                "{{queue}} parked",
            ),
            ('max(gokiq_bridge_set_size{set="retry"})', "retry set size"),
        ],
        12,
        32,
    ),
    timeseries(
        "Dead set size",
        [
            ('max(gokiq_bridge_set_size{set="dead"})', "dead"),
        ],
        0,
        40,
    ),
    timeseries(
        "Poison payloads (sent to the dead set by the bridge)",
        [
            (
                f"sum by (queue, reason) (rate(gokiq_bridge_poison_total{Q}[$__rate_interval]))",
                "{{queue}} {{reason}}",
            ),
        ],
        12,
        40,
        unit="ops",
    ),
    timeseries(
        "Sidecar failures by class",
        [
            (
                'sum by (class, outcome) (rate(gokiq_sidecar_jobs_total{outcome!="ok"}'
                "[$__rate_interval]))",
                "{{class}} {{outcome}}",
            ),
        ],
        0,
        48,
        unit="ops",
    ),
    timeseries(
        "Sidecar unavailable (jobs held back, budget not spent)",
        [
            (
                'sum by (queue) (rate(gokiq_worker_jobs_total{queue=~"$queue",'
                'outcome="unavailable"}[$__rate_interval]))',
                "{{queue}}",
            ),
        ],
        12,
        48,
        unit="ops",
    ),
    row("Backpressure and breaker", 56),
    timeseries(
        "Breaker state (0 closed, 1 half-open, 2 open)",
        [
            ("max(gokiq_worker_breaker_state)", "workers (worst)"),
            ("max(gokiq_bridge_breaker_open)", "bridge sees open"),
        ],
        0,
        57,
    ),
    timeseries(
        "Bridge paused",
        [
            ("max by (reason) (gokiq_bridge_paused)", "{{reason}}"),
        ],
        12,
        57,
        desc="1 while the bridge stops fetching (backpressure, open breaker...).",
    ),
    row("Durations", 65),
    timeseries(
        "Job duration (worker, incl. HTTP)",
        [
            (
                quantile(0.5, "gokiq_worker_job_duration_seconds"),
                "p50",
            ),
            (
                quantile(0.95, "gokiq_worker_job_duration_seconds"),
                "p95",
            ),
            (
                quantile(0.99, "gokiq_worker_job_duration_seconds"),
                "p99",
            ),
        ],
        0,
        66,
        unit="s",
    ),
    timeseries(
        "Job duration (sidecar, in Rails)",
        [
            (
                quantile(0.5, "gokiq_sidecar_job_duration_seconds"),
                "p50",
            ),
            (
                quantile(0.95, "gokiq_sidecar_job_duration_seconds"),
                "p95",
            ),
        ],
        12,
        66,
        unit="s",
    ),
    row("Flower", 74),
    timeseries(
        "Celery events (Flower)",
        [
            ("sum by (type) (rate(flower_events_total[$__rate_interval]))", "{{type}}"),
        ],
        0,
        75,
        unit="ops",
    ),
    timeseries(
        "Task runtime p95 by task (Flower)",
        [
            (
                quantile(0.95, "flower_task_runtime_seconds", "task"),
                "{{task}}",
            ),
        ],
        12,
        75,
        unit="s",
    ),
    row("Delivery ledger", 83),
    timeseries(
        "Jobs handed to Celery, not yet settled",
        [("max(gokiq_bridge_deliveries)", "in the ledger")],
        0,
        84,
        desc="Jobs in the broker, running, or waiting for a Celery countdown retry.",
    ),
    timeseries(
        "Published again (message lost or not settled in time)",
        [
            (
                f"sum by (queue) (rate(gokiq_bridge_republished_total{Q}[$__rate_interval]))",
                "{{queue}}",
            ),
        ],
        12,
        84,
        unit="ops",
        desc="Non-zero after a worker was killed or a broker lost messages.",
    ),
]

dashboard = {
    "uid": "gokiq",
    "title": "gokiq: Sidekiq jobs on Celery",
    "description": "Bridge, Celery workers, Rails sidecar and Flower. See docker/README.md.",
    "tags": ["gokiq", "sidekiq", "celery"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {
        "list": [
            {
                "name": "datasource",
                "label": "Data source",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
                "hide": 0,
                "refresh": 1,
            },
            {
                "name": "queue",
                "label": "Queue",
                "type": "query",
                "datasource": DS,
                "query": {"query": "label_values(gokiq_bridge_queue_size, queue)", "refId": "q"},
                "definition": "label_values(gokiq_bridge_queue_size, queue)",
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "refresh": 2,
                "sort": 1,
            },
        ]
    },
    "annotations": {"list": []},
    "panels": panels,
}

if __name__ == "__main__":
    out = Path(__file__).with_name("gokiq-dashboard.json")
    out.write_text(json.dumps(dashboard, indent=2) + "\n")
    print(f"wrote {out}")
