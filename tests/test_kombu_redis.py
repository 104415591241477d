"""gokiq's kombu Redis transport against a real redis-server: one command client per pool,
acks batched with the next message, and messages still published, consumed and acked as kombu's
own transport does."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import kombu
import pytest
import redis
from celery.worker import state as worker_state
from kombu.asynchronous import Hub

from gokiq_celery import app
from gokiq_celery.kombu_redis import AckBatchingQoS, Transport

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


def _consuming(conn: kombu.Connection, name: str, messages: list | None = None) -> list:
    """A consumer of queue `name` and of an auto-delete fanout queue (as Celery's pidbox and
    events), holding one unacked message of `name` (appended to `messages`); returns bodies."""
    queue = kombu.Queue(name, routing_key=name)
    fanout = kombu.Queue(
        f"{name}.pidbox", kombu.Exchange(f"{name}.fanout", "fanout"), auto_delete=True
    )
    conn.Producer().publish({"n": 2}, routing_key=name, declare=[queue])
    got: list = []
    held = [] if messages is None else messages
    on_message = [lambda body, msg: (got.append(body), held.append(msg))]
    conn.Consumer([queue, fanout], callbacks=on_message).consume()
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


def _restarted_holding_one_unacked(tmp_path, name: str, ack_while_down: bool = False):
    """A consumer holds one unacked message of queue `name`, with its BRPOP in flight, when its
    redis-server stops (AOF on); its job acks it while the server is down if `ack_while_down`;
    Celery's consumer then collects and closes the connection, and the server starts again on
    the same port and data. Returns (server, the message's tag)."""
    server = start_redis(tmp_path / "redis", None, "--appendonly", "yes")
    conn = kombu.Connection(server.url(1), transport=Transport)
    messages: list = []
    assert _consuming(conn, name, messages) == [{"n": 2}]
    [tag] = conn.default_channel.qos._delivered
    conn.default_channel._brpop_start()
    server.process.terminate()
    server.process.wait(10)
    if ack_while_down:
        with pytest.raises(conn.connection_errors):
            messages[0].ack()
    with contextlib.suppress(Exception):
        conn.collect()
    with contextlib.suppress(*conn.connection_errors):
        conn.close()
    server = start_redis(server.dir, server.port, "--appendonly", "yes")
    assert server.client(1).hlen("unacked") == 1  # closing could not restore it
    return server, tag


def _left_after_reconnect(server, name: str) -> tuple[int, int]:
    """Once the process connects again (Celery's consumer reconnecting): the messages left in
    `unacked` and in queue `name`."""
    with kombu.Connection(server.url(1), transport=Transport) as again:
        again.default_channel  # noqa: B018 (connects)
        broker = server.client(1)
        return broker.hlen("unacked"), broker.llen(name)


def test_unacked_messages_a_broker_restart_kept_are_restored_on_reconnect(tmp_path):
    """A message delivered to the channel but not acked (a worker's prefetch) stayed in the
    broker's `unacked` hash when the channel closed with the broker down: kombu restores it on
    close, which failed, and nothing tried again (celery/celery#1307), so it waited for the
    visibility timeout. The process's next channel to connect restores it."""
    name = "gokiq-kombu-reconnect"
    server, _ = _restarted_holding_one_unacked(tmp_path, name)
    try:
        assert _left_after_reconnect(server, name) == (0, 1)
    finally:
        server.process.terminate()


@pytest.mark.parametrize("lost", ["reply", "write"])
def test_a_delivery_redis_recorded_or_not_is_put_back_on_reconnect(tmp_path, monkeypatch, lost):
    """BRPOP took the message from its queue, then a restart cut the write that records it in
    `unacked`, or only that write's reply: the consumer saw an error and never got the message,
    which is in `unacked` or nowhere, so closing the channel did not restore it (seen in the
    Redis-restart e2e test). The cut is simulated; the write itself runs on the real server."""
    name = f"gokiq-kombu-lost-{lost}"
    server = start_redis(tmp_path / "redis", None, "--appendonly", "yes")
    execute = redis.client.Pipeline.execute

    def execute_and_cut(pipeline, *args, **kwargs):
        if lost == "reply":
            execute(pipeline, *args, **kwargs)
        raise redis.ConnectionError("Connection closed by server.")

    try:
        broker = server.client(1)
        with kombu.Connection(server.url(1), transport=Transport) as conn:
            queue = kombu.Queue(name, routing_key=name)
            conn.Producer().publish({"n": 3}, routing_key=name, declare=[queue])
            got: list = []
            conn.Consumer(queue, callbacks=[lambda body, msg: got.append(body)]).consume()
            monkeypatch.setattr(redis.client.Pipeline, "execute", execute_and_cut)
            with pytest.raises(conn.connection_errors):
                conn.drain_events(timeout=10)
            monkeypatch.undo()
            assert got == [] and not conn.default_channel.qos._delivered
        assert broker.llen(name) == 0  # closing did not put it back: it was not delivered
        assert broker.hlen("unacked") == (1 if lost == "reply" else 0)
        assert _left_after_reconnect(server, name) == (0, 1)
    finally:
        server.process.terminate()


def test_a_message_delivered_again_since_is_not_restored(tmp_path):
    """Another worker that took the message after the restart holds it now (kombu noted the
    new delivery's time in `unacked_index`): restoring it would hand it out twice."""
    name = "gokiq-kombu-redelivered"
    server, tag = _restarted_holding_one_unacked(tmp_path, name)
    try:
        broker = server.client(1)
        broker.zadd("unacked_index", {tag: time.time() + 1})  # as kombu's QoS.append does
        assert _left_after_reconnect(server, name) == (1, 0)
    finally:
        server.process.terminate()


def test_a_message_its_job_acked_while_the_broker_was_down_is_acked_not_restored(tmp_path):
    """The job finished and acked while Redis was down: running it again is not the way to
    settle that message, completing its ack is."""
    name = "gokiq-kombu-acked"
    server, _ = _restarted_holding_one_unacked(tmp_path, name, ack_while_down=True)
    try:
        assert _left_after_reconnect(server, name) == (0, 0)
    finally:
        server.process.terminate()


class _Request:  # what Celery's worker state tracks of a job it runs: its message
    def __init__(self, delivery_tag: str):
        self.message = SimpleNamespace(delivery_tag=delivery_tag)


def test_the_message_of_a_job_the_worker_still_runs_is_not_restored(tmp_path):
    """A job that was running at the connection loss acks its own message when done; restoring
    its message would run it a second time meanwhile."""
    name = "gokiq-kombu-running"
    server, tag = _restarted_holding_one_unacked(tmp_path, name)
    running = _Request(tag)
    worker_state.active_requests.add(running)
    try:
        assert _left_after_reconnect(server, name) == (1, 0)
    finally:
        worker_state.active_requests.discard(running)
        server.process.terminate()


def _unacked(broker) -> int:
    assert broker.zcard("unacked_index") == broker.hlen("unacked")
    return broker.hlen("unacked")


def _on_this_threads_loop(conn: kombu.Connection) -> Hub:
    """A kombu Hub whose loop is this thread, with `conn`'s transport registered on it, as
    Celery's consumer does: acks on this thread are then the event loop's."""
    hub = Hub()
    hub._loop_thread = threading.get_ident()  # as Hub.create_loop sets it
    conn.transport.register_with_event_loop(conn.connection, hub)
    return hub


def test_acks_on_the_event_loop_ride_with_the_next_message(broker_url, redis_server, redis_db):
    """An ack on the worker's event-loop thread frees its prefetch slot at once, and its unacked
    record goes in the next message's round trip, or after ACK_DELAY, or when the channel
    closes; never is an acked message restored."""
    broker = redis_server.client(redis_db + 1)
    name = "gokiq-kombu-acks"
    queue = kombu.Queue(name, routing_key=name)
    got: list = []
    with kombu.Connection(broker_url, transport=Transport) as conn:
        hub = _on_this_threads_loop(conn)
        for n in range(3):
            conn.Producer().publish({"n": n}, routing_key=name, declare=[queue])
        with conn.Consumer(queue, callbacks=[lambda body, msg: got.append(msg)]):
            conn.drain_events(timeout=10)
            conn.drain_events(timeout=10)
            assert _unacked(broker) == 2
            got[0].ack()
            assert _unacked(broker) == 2  # not written yet...
            qos = conn.default_channel.qos
            assert len(qos._delivered) - len(qos._dirty) == 1  # ...but its slot is free
            conn.drain_events(timeout=10)
            assert _unacked(broker) == 2  # the third message's record, the first's ack
            got[1].ack()
            time.sleep(AckBatchingQoS.ACK_DELAY * 2)
            hub.fire_timers()
            assert _unacked(broker) == 1  # a lone ack, written after ACK_DELAY
            got[2].ack()
        conn.close()  # the pending ack is written, so nothing is restored
    assert _unacked(broker) == 0 and broker.llen(name) == 0
    assert [m.payload["n"] for m in got] == [0, 1, 2]


def test_acks_redis_refuses_to_write_stay_pending_and_are_tried_again(
    broker_url, redis_server, redis_db, monkeypatch
):
    """An error reply (NOREPLICAS here: Redis refuses writes) is not a lost connection: the acks
    stay pending, and the timer tries them again, so an idle worker's acks do not wait for a
    next message."""
    monkeypatch.setattr(AckBatchingQoS, "RETRY_DELAY", 0.05)
    broker = redis_server.client(redis_db + 1)
    name = "gokiq-kombu-refused-ack"
    queue = kombu.Queue(name, routing_key=name)
    got: list = []
    with kombu.Connection(broker_url, transport=Transport) as conn:
        hub = _on_this_threads_loop(conn)
        conn.Producer().publish({"n": 1}, routing_key=name, declare=[queue])
        with conn.Consumer(queue, callbacks=[lambda body, msg: got.append(msg)]):
            conn.drain_events(timeout=10)
            got[0].ack()
            broker.config_set("min-replicas-to-write", 1)
            try:
                time.sleep(AckBatchingQoS.ACK_DELAY * 2)
                hub.fire_timers()  # the write is refused (logged by the hub)
                assert _unacked(broker) == 1
            finally:
                broker.config_set("min-replicas-to-write", 0)
            time.sleep(AckBatchingQoS.RETRY_DELAY * 2)
            hub.fire_timers()
            assert _unacked(broker) == 0
    assert broker.llen(name) == 0


def test_an_ack_from_another_thread_is_written_at_once(broker_url, redis_server, redis_db):
    broker = redis_server.client(redis_db + 1)
    name = "gokiq-kombu-thread-ack"
    queue = kombu.Queue(name, routing_key=name)
    got: list = []
    with kombu.Connection(broker_url, transport=Transport) as conn:
        _on_this_threads_loop(conn)
        conn.Producer().publish({"n": 1}, routing_key=name, declare=[queue])
        with conn.Consumer(queue, callbacks=[lambda body, msg: got.append(msg)]):
            conn.drain_events(timeout=10)
            acker = threading.Thread(target=got[0].ack)
            acker.start()
            acker.join()
            assert _unacked(broker) == 0


@pytest.mark.parametrize("cut", ["close", "next message"])
def test_pending_acks_a_broker_restart_cut_are_completed_on_reconnect(tmp_path, cut):
    """Acks still pending when Redis stops (written at close, or riding with the next message's
    record) fail with it: the next channel completes them and never restores their messages,
    and restores the message no job acked."""
    name = "gokiq-kombu-pending-acks"
    server = start_redis(tmp_path / "redis", None, "--appendonly", "yes")
    queue = kombu.Queue(name, routing_key=name)
    conn = kombu.Connection(server.url(1), transport=Transport)
    got: list = []
    _on_this_threads_loop(conn)
    for n in range(3):
        conn.Producer().publish({"n": n}, routing_key=name, declare=[queue])
    conn.Consumer(queue, callbacks=[lambda body, msg: got.append(msg)]).consume()
    conn.drain_events(timeout=10)
    conn.drain_events(timeout=10)
    got[0].ack()  # pending
    got[1].ack()
    assert _unacked(server.client(1)) == 2
    if cut == "next message":
        conn.default_channel._brpop_start()  # the third message is BRPOPed with Redis going
    server.process.terminate()
    server.process.wait(10)
    if cut == "next message":
        with pytest.raises(conn.connection_errors):
            conn.drain_events(timeout=10)
    with contextlib.suppress(Exception):  # as Celery's consumer does
        conn.collect()
    with contextlib.suppress(*conn.connection_errors):
        conn.close()
    server = start_redis(server.dir, server.port, "--appendonly", "yes")
    try:
        assert _unacked(server.client(1)) == 2  # nothing could be written
        assert _left_after_reconnect(server, name) == (0, 1)  # the third is back, no other
    finally:
        server.process.terminate()


# -- several messages per BRPOP reply (Channel.record_and_pop, lua/pop_deliveries.lua) ----------


def _publish(conn: kombu.Connection, name: str, bodies: list) -> kombu.Queue:
    queue = kombu.Queue(name, routing_key=name)
    for body in bodies:
        conn.Producer().publish(body, routing_key=name, declare=[queue])
    return queue


def test_a_brpop_reply_brings_more_messages_up_to_the_prefetch_room(
    broker_url, redis_server, redis_db
):
    """One BRPOP, one Lua call: the first message and up to `pop_batch` - 1 more, in the queue's
    order, each recorded in `unacked` as kombu records it, never more than the prefetch count
    leaves room for."""
    broker = redis_server.client(redis_db + 1)
    name = "gokiq-kombu-pop"
    got: list = []
    with kombu.Connection(broker_url, transport=Transport) as conn:
        queue = _publish(conn, name, [{"n": n} for n in range(12)])
        on_message = [lambda body, msg: got.append(msg)]
        with conn.Consumer(queue, callbacks=on_message, prefetch_count=5):
            conn.drain_events(timeout=10)
            assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4]
            assert _unacked(broker) == 5 and broker.llen(name) == 7
            for msg in got:  # the record kombu's own QoS.append writes
                exchange, key = msg.delivery_info["exchange"], msg.delivery_info["routing_key"]
                record = json.loads(broker.hget("unacked", msg.delivery_tag))
                assert record == [msg._raw, exchange, key]
            qos = conn.default_channel.qos
            assert not qos.can_consume() and not qos._prerecorded
            got[0].ack()
            got[1].ack()
            conn.drain_events(timeout=10)
            assert [m.payload["n"] for m in got] == [0, 1, 2, 3, 4, 5, 6]  # two slots, two more
            for msg in got[2:]:
                msg.ack()
            while len(got) < 12:
                conn.drain_events(timeout=10)
                for msg in got:
                    if not msg.acknowledged:
                        msg.ack()
    assert [m.payload["n"] for m in got] == list(range(12))
    assert _unacked(broker) == 0 and broker.llen(name) == 0


def test_pop_batch_1_is_kombus_one_message_per_brpop(redis_server, redis_db):
    url = redis_server.url(redis_db + 1)
    got: list = []
    options = {"pop_batch": 1}
    with kombu.Connection(url, transport=Transport, transport_options=options) as conn:
        queue = _publish(conn, "gokiq-kombu-pop-1", [{"n": n} for n in range(3)])
        with conn.Consumer(queue, callbacks=[lambda b, m: got.append(m)], prefetch_count=5):
            conn.drain_events(timeout=10)
            assert len(got) == 1
            conn.drain_events(timeout=10)
            assert len(got) == 2


def test_a_payload_that_is_no_kombu_message_stops_the_popping_and_stays(
    broker_url, redis_server, redis_db
):
    broker = redis_server.client(redis_db + 1)
    name = "gokiq-kombu-pop-odd"
    got: list = []
    with kombu.Connection(broker_url, transport=Transport) as conn:
        queue = _publish(conn, name, [{"n": n} for n in range(2)])
        broker.lpush(name, b"not json")  # behind the two (BRPOP pops from the right)
        with conn.Consumer(queue, callbacks=[lambda b, m: got.append(m)], prefetch_count=5):
            conn.drain_events(timeout=10)
            assert [m.payload["n"] for m in got] == [0, 1]
            assert broker.lrange(name, 0, -1) == [b"not json"] and _unacked(broker) == 2


_CONSUME_AND_HANG = """
import sys, time, kombu
from gokiq_celery.kombu_redis import Transport
got = []
with kombu.Connection(sys.argv[1], transport=Transport) as conn:
    queue = kombu.Queue(sys.argv[2], routing_key=sys.argv[2])
    with conn.Consumer(queue, callbacks=[lambda b, m: got.append(m)], prefetch_count=4):
        conn.drain_events(timeout=10)
        print(len(got), flush=True)
        time.sleep(60)
"""


def test_messages_popped_together_are_restored_after_the_worker_is_killed(
    broker_url, redis_server, redis_db
):
    """A consumer killed (SIGKILL) right after a reply brought several messages: every one is
    recorded in `unacked`, so kombu's visibility-timeout restore hands all of them back."""
    broker = redis_server.client(redis_db + 1)
    name = "gokiq-kombu-pop-kill"
    with kombu.Connection(broker_url, transport=Transport) as conn:
        _publish(conn, name, [{"n": n} for n in range(10)])
    child = subprocess.Popen(
        [sys.executable, "-c", _CONSUME_AND_HANG, broker_url, name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "4"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert _unacked(broker) == 4 and broker.llen(name) == 6
    options = {"visibility_timeout": 0}
    with kombu.Connection(broker_url, transport=Transport, transport_options=options) as conn:
        conn.default_channel.qos.restore_visible(num=100)
    assert _unacked(broker) == 0
    bodies = [json.loads(_body(raw)) for raw in broker.lrange(name, 0, -1)]
    assert sorted(body["n"] for body in bodies) == list(range(10))


def _body(raw: bytes) -> str:
    """The JSON body of a kombu message as its Redis list holds it (base64 or not)."""
    message = json.loads(raw)
    body = message["body"]
    if message["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body).decode()
    return body


def test_messages_popped_together_survive_a_redis_restart(tmp_path):
    """Redis (AOF on) stops and starts again with a reply's messages in flight: each is still
    in `unacked`, and the process's next channel, closing the old one having failed, puts
    them back on their queue."""
    name = "gokiq-kombu-pop-restart"
    server = start_redis(tmp_path / "redis", None, "--appendonly", "yes")
    conn = kombu.Connection(server.url(1), transport=Transport)
    got: list = []
    try:
        queue = _publish(conn, name, [{"n": n} for n in range(6)])
        conn.Consumer(queue, callbacks=[lambda b, m: got.append(m)], prefetch_count=4).consume()
        conn.drain_events(timeout=10)
        assert len(got) == 4  # the prefetch is full: no BRPOP in flight
        server.process.terminate()
        server.process.wait(10)
        with contextlib.suppress(Exception):  # as Celery's consumer does
            conn.collect()
        with contextlib.suppress(*conn.connection_errors):
            conn.close()
        server = start_redis(server.dir, server.port, "--appendonly", "yes")
        assert _unacked(server.client(1)) == 4 and server.client(1).llen(name) == 2
        assert _left_after_reconnect(server, name) == (0, 6)
    finally:
        server.process.terminate()


def test_messages_a_cut_pop_took_are_put_back_on_reconnect(tmp_path, monkeypatch):
    """A restart cut the reply of the call that recorded the BRPOPed message and popped more:
    the consumer got none of them, yet Redis recorded all of them in `unacked`. The process's
    next channel restores every message recorded under that call's delivery time."""
    name = "gokiq-kombu-pop-cut"
    server = start_redis(tmp_path / "redis", None, "--appendonly", "yes")
    call = redis.commands.core.Script.__call__

    def call_and_cut(script, *args, **kwargs):
        call(script, *args, **kwargs)
        raise redis.ConnectionError("Connection closed by server.")

    try:
        broker = server.client(1)
        with kombu.Connection(server.url(1), transport=Transport) as conn:
            queue = _publish(conn, name, [{"n": n} for n in range(6)])
            got: list = []
            on_message = [lambda body, msg: got.append(body)]
            conn.Consumer(queue, callbacks=on_message, prefetch_count=4).consume()
            monkeypatch.setattr(redis.commands.core.Script, "__call__", call_and_cut)
            with pytest.raises(conn.connection_errors):
                conn.drain_events(timeout=10)
            monkeypatch.undo()
            assert got == [] and not conn.default_channel.qos._delivered
        assert broker.llen(name) == 2 and _unacked(broker) == 4  # none delivered, none back
        assert _left_after_reconnect(server, name) == (0, 6)
    finally:
        server.process.terminate()


def test_messages_popped_after_a_delivery_that_raises_go_back_to_their_queue(
    broker_url, redis_server, redis_db
):
    """A consumer's callback that raises on a popped message: the raise reaches the caller, as
    on kombu's own BRPOP path; the ones popped after it go back at once, untouched."""
    broker = redis_server.client(redis_db + 1)
    name = "gokiq-kombu-pop-raises"
    got: list = []

    def on_message(body, message):
        got.append(message)
        if body["n"] == 1:
            raise RuntimeError("the consumer failed")

    with kombu.Connection(broker_url, transport=Transport) as conn:
        queue = _publish(conn, name, [{"n": n} for n in range(4)])
        with conn.Consumer(queue, callbacks=[on_message], prefetch_count=5):
            with pytest.raises(RuntimeError):
                conn.drain_events(timeout=10)
            assert [m.payload["n"] for m in got] == [0, 1]
            assert _unacked(broker) == 2  # the two delivered: their jobs' to ack
            assert sorted(json.loads(_body(p))["n"] for p in broker.lrange(name, 0, -1)) == [2, 3]
            assert not conn.default_channel.qos._prerecorded
