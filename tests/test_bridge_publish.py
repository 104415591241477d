"""What the bridge sends to Celery: one `gokiq.perform(payload_text, queue)` message per job,
task id = jid, shown as the job's class, Celery's retry counter = Sidekiq's retry_count + 1."""

from __future__ import annotations

import json
import threading

from celery import Celery
from celery.contrib.testing.worker import start_worker

from bridge.metrics import BridgeMetrics
from bridge.publish import Backpressure, Publisher
from gokiq_celery.sidekiq.job import Job

from .bridge_support import bridge_env, bridge_redis, make_job

__all__ = ["bridge_env", "bridge_redis"]  # fixtures used below

WRAPPER = "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper"


def test_message_headers_and_body(bridge_env):
    publisher = Publisher(bridge_env.settings(queue_map={"default": "celery_default"}))
    big = make_job(1, args=["x" * 1_000_000])
    active_job = make_job(2, **{"class": WRAPPER, "wrapped": "AjJob", "retry_count": 3})
    publisher.publish("default", [Job.parse(big), Job.parse(active_job)], ["t1", "t2"])
    first, second = bridge_env.messages("celery_default")
    assert first["headers"]["task"] == "gokiq.perform"
    assert first["headers"]["id"] == f"{1:024x}"
    assert first["args"] == [big, "default"] and first["kwargs"] == {"delivery": "t1"}
    assert first["headers"]["shadow"] == "HardJob"
    assert first["headers"]["retries"] == 0
    assert len(first["headers"]["argsrepr"]) < 250
    assert first["headers"]["kwargsrepr"] == "{}"
    assert second["headers"]["shadow"] == "AjJob"
    assert second["headers"]["retries"] == 4
    assert second["args"][0] == active_job  # the exact text as read


def test_the_one_lpush_fast_path_writes_what_kombus_producer_writes(bridge_env):
    jobs = [Job.parse(make_job(n, retry_count=n)) for n in range(3)]
    fast = Publisher(bridge_env.settings(queue_map={"default": "fast"}))
    slow = Publisher(bridge_env.settings(queue_map={"default": "slow"}))
    slow.fast_path = False
    tokens = ["a", "b", "c"]
    fast.publish("default", jobs, tokens)
    slow.publish("default", jobs, tokens)

    def envelopes(queue):
        out = []
        for raw in reversed(bridge_env.broker.lrange(queue, 0, -1)):
            envelope = json.loads(raw)
            del envelope["properties"]["delivery_tag"]  # a fresh uuid per message
            envelope["properties"]["delivery_info"]["routing_key"] = "*"
            out.append(envelope)
        return out

    assert envelopes("fast") == envelopes("slow")
    ids = [m["headers"]["id"] for m in bridge_env.messages("fast")]
    assert ids == [f"{job.jid}.{n + 1}" for n, job in enumerate(jobs)]  # the run after n failures


def test_a_celery_worker_runs_what_the_bridge_published(bridge_env):
    app = Celery("bridge-test", broker=bridge_env.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], worker_hijack_root_logger=False
    )
    seen = []
    done = threading.Event()

    @app.task(name="gokiq.perform", bind=True, shared=False)
    def perform(self, payload_text, queue, delivery=None):
        seen.append((self.request.id, self.request.retries, payload_text, queue, delivery))
        if len(seen) == 2:
            done.set()

    jobs = [make_job(1), make_job(2, retry_count=0)]
    Publisher(bridge_env.settings()).publish("default", [Job.parse(j) for j in jobs], ["x", "y"])
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["default"]):
        assert done.wait(20)
    assert sorted(seen) == [
        (f"{1:024x}", 0, jobs[0], "default", "x"),
        (f"{2:024x}.1", 1, jobs[1], "default", "y"),  # the run after a failure
    ]


def test_a_held_back_queue_is_refilled_by_the_batch_not_one_job_at_a_time(bridge_env):
    settings = bridge_env.settings(max_pending=50, publish_batch_size=100)
    clock = [0.0]
    backpressure = Backpressure(
        settings, Publisher(settings), bridge_env.store(), BridgeMetrics(), clock=lambda: clock[0]
    )
    assert backpressure.refill_at == 25  # half the limit
    published = [make_job(i) for i in range(40)]
    Publisher(settings).publish("default", [Job.parse(j) for j in published], ["t"] * 40)
    backpressure.refresh(["default"])
    assert backpressure.room("default") == 10
    assert backpressure.allowed(["default"]) == []  # room for 10: wait for a batch's worth
    for _ in range(15):  # a worker takes 15
        bridge_env.broker.rpop("default")
    clock[0] += Backpressure.REFRESH_WHEN_FULL  # near the limit: read again this soon
    backpressure.refresh(["default"])
    assert backpressure.room("default") == 25
    assert backpressure.allowed(["default"]) == ["default"]
