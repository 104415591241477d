"""gokiq's kombu Redis transport against a real redis-server: one command client per pool,
and messages still published, consumed and acked as kombu's own transport does."""

from __future__ import annotations

import contextlib

import kombu

from gokiq_celery import app
from gokiq_celery.kombu_redis import Transport

from .conftest import start_redis


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


def _consuming(conn: kombu.Connection, name: str) -> list:
    """A consumer of queue `name` and of an auto-delete fanout queue (as Celery's pidbox and
    events), holding one unacked message of `name`."""
    queue = kombu.Queue(name, routing_key=name)
    fanout = kombu.Queue(
        f"{name}.pidbox", kombu.Exchange(f"{name}.fanout", "fanout"), auto_delete=True
    )
    conn.Producer().publish({"n": 2}, routing_key=name, declare=[queue])
    got: list = []
    conn.Consumer([queue, fanout], callbacks=[lambda body, msg: got.append(body)]).consume()
    conn.drain_events(timeout=10)
    return got


def test_a_connection_collected_then_closed_restores_its_unacked_messages(
    broker_url, redis_server, redis_db
):
    """What Celery 5.7's consumer does on a broker connection loss: collect(), then close()."""
    broker = redis_server.client(redis_db + 1)
    conn = kombu.Connection(broker_url, transport=Transport)
    assert _consuming(conn, "gokiq-kombu-collect") == [{"n": 2}]
    assert broker.hlen("unacked") == 1
    conn.collect()
    conn.close()  # restores the unacked message: it is back on its queue
    assert broker.hlen("unacked") == 0 and broker.llen("gokiq-kombu-collect") == 1


def test_a_broker_restart_is_a_connection_error_not_an_unrecoverable_one(tmp_path):
    """With the broker down, collect() fails half way (reading the BRPOP in flight), and close()
    then restored the unacked messages through the collected connection: kombu's own transport
    raised AttributeError, which Celery calls unrecoverable (the worker process exits)."""
    server = start_redis(tmp_path / "redis")
    conn = kombu.Connection(server.url(1), transport=Transport)
    try:
        assert _consuming(conn, "gokiq-kombu-restart") == [{"n": 2}]
        conn.default_channel._brpop_start()  # the consumer's BRPOP in flight, as in a worker
        server.process.terminate()
        server.process.wait(10)
        with contextlib.suppress(Exception):  # as Celery's consumer does
            conn.collect()
        with contextlib.suppress(*conn.connection_errors):  # Celery's ignore_errors
            conn.close()
    finally:
        if server.process.poll() is None:
            server.process.terminate()
