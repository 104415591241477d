"""The bridge's publisher confirms on a real RabbitMQ (a vhost of this module's own, deleted at
the end; skipped, saying why, where no RabbitMQ answers): a batch is confirmed with one wait,
and a message the broker refuses fails the batch."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from amqp.exceptions import MessageNacked
from kombu import Connection, Producer, Queue

from bridge.confirms import BatchConfirms
from bridge.publish import Publisher
from gokiq_celery.sidekiq.job import Job

from .bridge_support import bridge_env, bridge_redis, make_job
from .e2e.conftest import rabbitmq_missing, rabbitmqctl

__all__ = ["bridge_env", "bridge_redis"]  # fixtures used below


@pytest.fixture(scope="module")
def amqp_url() -> Iterator[str]:
    reason = rabbitmq_missing()
    if reason:
        pytest.skip(reason)
    vhost = f"gokiq-test-{secrets.token_hex(4)}"
    if rabbitmqctl("add_vhost", vhost).returncode != 0:
        pytest.skip("cannot create a RabbitMQ vhost")
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def test_a_batch_is_on_the_broker_when_publish_returns(bridge_env, amqp_url):
    publisher = Publisher(bridge_env.settings(celery_broker_url=amqp_url))
    jobs = [Job.parse(make_job(n)) for n in range(50)]
    waits = []
    publisher._ensure_producer()
    confirms = publisher._confirms
    real_wait = confirms.wait
    confirms.wait = lambda: (waits.append(1), real_wait())[1]
    publisher.publish("default", jobs, [f"t{n}" for n in range(50)])
    publisher.publish("default", jobs[:3], ["a", "b", "c"])
    assert waits == [1, 1]  # one wait per batch, not one per message
    assert not confirms._unconfirmed
    assert publisher.pending(bridge_env.settings().celery_queue("default")) == 53
    publisher.close()


def test_a_message_the_broker_refuses_fails_the_batch(amqp_url):
    # A queue that refuses publishes past two messages: RabbitMQ nacks the third.
    full = Queue("gokiq-confirms-full", routing_key="gokiq-confirms-full",
                 queue_arguments={"x-max-length": 2, "x-overflow": "reject-publish"})  # fmt: skip
    with Connection(amqp_url) as conn:
        producer = Producer(conn.default_channel)
        full.bind(producer.channel).declare()
        confirms = BatchConfirms(producer.channel, timeout=10)
        for n in range(3):
            producer.publish({"n": n}, routing_key=full.routing_key, retry=False)
            confirms.published()
        with pytest.raises(MessageNacked):
            confirms.wait()
        producer.publish({"n": 4}, routing_key="gokiq-confirms-elsewhere", retry=False)
        confirms.published()
        confirms.wait()  # the next batch starts clean: accepted (unroutable, but confirmed)
