"""gokiq_celery.client writes what the example app's real Ruby client (Sidekiq 6.4.1) writes.

The same job is pushed both ways, each into its own empty Redis database, and everything in the
two databases is compared: keys, the `queues` set, queue lists, `schedule` scores and each
payload field by field and in order. Only the jid and the timestamps may differ.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import pytest
import redis

from gokiq_celery.client import SidekiqClient, new_jid, push
from gokiq_celery.settings import load_settings
from gokiq_celery.sidekiq.keys import SIDEKIQ_VERSION_KEY
from gokiq_celery.sidekiq.store import SidekiqStore
from gokiq_celery.sidekiq.version import SidekiqVersionUnknown

from .e2e.conftest import sidekiq_api

VARYING = ("jid", "created_at", "enqueued_at")


@pytest.fixture
def dbs(redis_server, redis_db, tmp_path) -> dict[str, Any]:
    """Ruby pushes into `redis_db`, Python into the (empty) database above it."""
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url(redis_db),
        "GOKIQ_EXAMPLE_DB": str(tmp_path / "example.sqlite3"),
    }
    return {
        "ruby": redis_server.client(redis_db),
        "python": redis_server.client(redis_db + 1),
        "ruby_env": env,
        "client": SidekiqClient(SidekiqStore(redis_server.client(redis_db + 1)), version=6),
    }


def dump(r: redis.Redis) -> dict[str, Any]:
    """Every key of a database, by type; payloads decoded, with their keys' order."""
    out: dict[str, Any] = {}
    for key in sorted(k.decode() for k in r.keys("*")):
        kind = r.type(key).decode()
        if kind == "set":
            out[key] = sorted(m.decode() for m in r.smembers(key))
        elif kind == "list":
            out[key] = [json.loads(p) for p in r.lrange(key, 0, -1)]
        elif kind == "zset":
            out[key] = [(json.loads(m), s) for m, s in r.zrange(key, 0, -1, withscores=True)]
        else:
            out[key] = kind
    return out


def without_varying(job: dict[str, Any]) -> list[tuple[str, Any]]:
    """The payload's fields in order, the jid and timestamps left out."""
    return [(k, v) for k, v in job.items() if k not in VARYING]


def check_varying(job: dict[str, Any], queued: bool) -> None:
    assert re.fullmatch(r"[0-9a-f]{24}", job["jid"])
    assert isinstance(job["created_at"], float)
    assert abs(job["created_at"] - time.time()) < 60
    if queued:
        assert job["created_at"] <= job["enqueued_at"] < job["created_at"] + 5
    else:
        assert "enqueued_at" not in job


ITEM = {
    "class": "HardJob",
    "args": [1, "two", {"k": [3.5, None, True]}, "ünïcode"],
    "queue": "critical",
    "retry": 3,
    "backtrace": True,
    "tags": ["nightly"],
}


def python_push(client: SidekiqClient, item: dict[str, Any], **extra: Any) -> str:
    options = {k: v for k, v in item.items() if k not in ("class", "args")}
    return client.push(item["class"], item["args"], **options, **extra)


def test_push_writes_exactly_what_sidekiq_client_push_writes(dbs):
    ruby_jid = sidekiq_api(dbs["ruby_env"], {"op": "push", "item": ITEM, "middleware": False})[0]
    py_jid = python_push(dbs["client"], ITEM)
    ruby, python = dump(dbs["ruby"]), dump(dbs["python"])
    assert ruby.keys() == python.keys() == {"queues", "queue:critical"}
    assert ruby["queues"] == python["queues"] == ["critical"]
    (ruby_job,), (py_job,) = ruby["queue:critical"], python["queue:critical"]
    assert (ruby_job["jid"], py_job["jid"]) == (ruby_jid, py_jid)
    assert without_varying(py_job) == without_varying(ruby_job)
    assert list(py_job) == list(ruby_job)  # the same fields in the same order
    check_varying(ruby_job, queued=True)
    check_varying(py_job, queued=True)


def test_defaults_match_a_bare_push_and_the_apps_middleware_only_adds_cattr(dbs):
    item = {"class": "HardJob", "args": []}
    sidekiq_api(dbs["ruby_env"], {"op": "push", "item": item})  # with the app's client middleware
    dbs["client"].push("HardJob")
    (ruby_job,), (py_job,) = (
        dump(dbs["ruby"])["queue:default"],
        dump(dbs["python"])["queue:default"],
    )
    # Sidekiq::CurrentAttributes' client middleware (Ruby only) adds the one field `cattr`:
    # an empty {} on 6.4; 6.5.12 and 7.x leave it out when the attributes are empty.
    assert without_varying(py_job) == [(k, v) for k, v in without_varying(ruby_job) if k != "cattr"]
    assert ruby_job.get("cattr", {}) == {}
    assert without_varying(py_job) == [
        ("retry", True),
        ("queue", "default"),
        ("class", "HardJob"),
        ("args", []),
    ]


def test_at_writes_the_schedule_entry_perform_at_writes(dbs):
    at = time.time() + 3600.123456
    sidekiq_api(dbs["ruby_env"], {"op": "push", "item": {**ITEM, "at": at}, "middleware": False})
    python_push(dbs["client"], ITEM, at=at)
    ruby, python = dump(dbs["ruby"]), dump(dbs["python"])
    assert ruby.keys() == python.keys() == {"schedule"}  # no `queues` entry until it is due
    ((ruby_job, ruby_score),) = ruby["schedule"]
    ((py_job, py_score),) = python["schedule"]
    assert py_score == ruby_score == pytest.approx(at, abs=1e-5)
    assert without_varying(py_job) == without_varying(ruby_job)
    assert list(py_job) == list(ruby_job)
    check_varying(ruby_job, queued=False)
    check_varying(py_job, queued=False)


def test_in_schedules_relative_to_now_and_a_past_time_enqueues_now(dbs):
    client: SidekiqClient = dbs["client"]
    before = time.time()
    client.push("HardJob", [1], in_=600)
    ((_, score),) = dump(dbs["python"])["schedule"]
    assert before + 600 <= score <= time.time() + 600
    client.push("HardJob", [2], at=before - 10)  # as perform_at with a past time: now
    client.push("HardJob", [3], in_=0)
    assert [job["args"] for job in dump(dbs["python"])["queue:default"]] == [[3], [2]]


def test_bulk_matches_push_bulk(dbs):
    args = [[1], [2], [3]]
    sidekiq_api(
        dbs["ruby_env"], {"op": "push_bulk", "class": "HardJob", "args": args, "queue": "low"}
    )
    jids = dbs["client"].push_bulk("HardJob", args, queue="low")
    ruby, python = dump(dbs["ruby"]), dump(dbs["python"])
    assert ruby.keys() == python.keys() == {"queues", "queue:low"}
    # One LPUSH of all the jobs: the first runs first (it is at the list's tail).
    assert [job["jid"] for job in python["queue:low"]] == jids[::-1]
    assert len(set(jids)) == 3
    for ruby_job, py_job in zip(ruby["queue:low"], python["queue:low"], strict=True):
        assert without_varying(py_job) == [
            (k, v) for k, v in without_varying(ruby_job) if k != "cattr"
        ]
    assert len({job["enqueued_at"] for job in python["queue:low"]}) == 1


def test_sidekiq_8_writes_integer_milliseconds(redis_client):
    client = SidekiqClient(SidekiqStore(redis_client), version=8)
    before = int(time.time() * 1000)
    client.push("HardJob", [1])
    job = json.loads(redis_client.lindex("queue:default", 0))
    assert isinstance(job["created_at"], int) and isinstance(job["enqueued_at"], int)
    assert before <= job["created_at"] <= job["enqueued_at"] <= time.time() * 1000


def test_module_push_uses_the_settings_redis_and_version(redis_url, redis_client):
    settings = load_settings(environ={"REDIS_URL": redis_url})  # sidekiq_version: auto
    with pytest.raises(SidekiqVersionUnknown):  # nothing published: no guessed timestamps
        push("HardJob", [7], settings=settings)
    assert redis_client.keys("queue:*") == []
    redis_client.set(SIDEKIQ_VERSION_KEY, "8.0.1")  # what a sidecar publishes at boot
    jid = push("HardJob", [7], settings=settings)
    job = json.loads(redis_client.lindex("queue:default", 0))
    assert job["jid"] == jid and job["args"] == [7]
    assert isinstance(job["created_at"], int)  # Sidekiq 8: milliseconds


REFUSED = [
    ([(1, 2)], {}),  # a tuple arrives in Ruby as an array: not the same argument
    ([{1, 2}], {}),
    ([object()], {}),
    ("abc", {}),
    ([1], {"queue": ""}),
    ([1], {"at": 1.0, "in_": 1.0}),
    ([1], {"jid": "x"}),
    ([1], {"tags": "a"}),
]


def test_refuses_what_sidekiq_would_refuse(redis_client):
    client = SidekiqClient(SidekiqStore(redis_client), version=7)
    for args, options in REFUSED:
        with pytest.raises(ValueError):
            client.push("HardJob", args, **options)
    assert redis_client.keys("*") == []


def test_jids_are_24_hex_digits_unique_across_refills_threads_and_a_fork():
    from concurrent.futures import ThreadPoolExecutor

    jids = [new_jid() for _ in range(20_000)]  # several 64 KiB refills of the buffer
    with ThreadPoolExecutor(4) as pool:
        jids += [j for batch in pool.map(lambda _: [new_jid() for _ in range(3000)], range(4))
                 for j in batch]  # fmt: skip
    assert all(re.fullmatch(r"[0-9a-f]{24}", jid) for jid in jids)
    assert len(set(jids)) == len(jids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what it hands out next must not be what the parent does
        os.write(write, "".join(new_jid() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as child:
        text = child.read()
    in_child = {text[n : n + 24] for n in range(0, len(text), 24)}
    assert len(in_child) == 100
    assert in_child.isdisjoint(new_jid() for _ in range(100))
