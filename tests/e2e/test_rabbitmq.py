"""The whole stack with RabbitMQ as the Celery broker instead of Redis.

Runs where a RabbitMQ server answers on 127.0.0.1:5672 and `rabbitmqctl` works (as on the
development and CI machines): the test makes its own vhost and deletes it afterwards, so it
never touches anybody's queues. Elsewhere it is skipped, saying why.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest

from ..conftest import wait_for
from .conftest import Stack, rabbitmq_missing, rabbitmqctl, running
from .test_resilience import assert_at_least_once, done_count, push_hard_jobs, wait_all_ran

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    reason = rabbitmq_missing()
    if reason:
        pytest.skip(reason)
    vhost = f"gokiq-e2e-{secrets.token_hex(4)}"
    created = rabbitmqctl("add_vhost", vhost)
    if created.returncode != 0:
        pytest.skip(f"cannot create a RabbitMQ vhost: {created.stderr.strip()[:200]}")
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        broker = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        amqp_stack = Stack(tmp_path_factory.mktemp("stack-amqp"), {"CELERY_BROKER_URL": broker})
        with running(amqp_stack) as s:
            yield s
    finally:
        rabbitmqctl("delete_vhost", vhost)


def test_jobs_run_through_rabbitmq_and_survive_a_killed_worker(stack: Stack, record_property):
    jids = push_hard_jobs(stack, 200, "amqp")
    wait_for(lambda: done_count(stack, set(jids)) >= 50, timeout=60, interval=0.2)
    stack.worker.kill9()
    time.sleep(1)
    stack.worker.start()
    runs = wait_all_ran(stack, jids, timeout=120)
    assert_at_least_once(runs, 200, record_property, "RabbitMQ, kill -9 worker")
    assert stack.api1({"op": "dead"}) == []
