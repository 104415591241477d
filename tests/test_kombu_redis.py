"""gokiq's kombu Redis transport against a real redis-server: one command client per pool,
and messages still published, consumed and acked as kombu's own transport does."""

from __future__ import annotations

import kombu

from gokiq_celery import app
from gokiq_celery.kombu_redis import Transport


def test_the_worker_app_uses_it_for_a_redis_broker():
    assert app.conf.broker_url.startswith("redis://")
    with app.connection_for_read() as conn:
        assert type(conn.transport) is Transport


def test_one_command_client_per_pool(broker_url):
    with kombu.Connection(broker_url, transport=Transport) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first  # kombu's own makes a new one every call
        assert channel._create_client(asynchronous=True) is not first  # BRPOP's stays apart
        channel._disconnect_pools()  # what kombu does after a fork or to reconnect
        assert channel._create_client() is not first


def test_publish_consume_and_ack_as_kombu_does(broker_url, redis_server, redis_db):
    queue = kombu.Queue("gokiq-kombu-test", routing_key="gokiq-kombu-test")
    got = []
    with kombu.Connection(broker_url, transport=Transport) as conn:
        conn.Producer().publish({"n": 1}, routing_key=queue.routing_key, declare=[queue])
        with conn.Consumer(queue, callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
            conn.drain_events(timeout=10)
    assert got == [{"n": 1}]
    broker = redis_server.client(redis_db + 1)
    assert broker.hlen("unacked") == 0 and broker.llen("gokiq-kombu-test") == 0
