"""The task end to end on the Python side: a real embedded Celery worker (threads pool), a real
redis-server as Sidekiq's Redis and as the broker, and a real HTTP server for the sidecar."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time

import pytest
from celery.canvas import Signature
from celery.contrib.testing.worker import start_worker
from celery.signals import task_failure, task_retry, task_success

from bridge.metrics import BridgeMetrics
from bridge.scheduler import Scheduler
from gokiq_celery import metrics
from gokiq_celery.celery_app import app
from gokiq_celery.messages import TASK_NAME, new_delivery_token, publish_options
from gokiq_celery.settings import load_settings
from gokiq_celery.sidecar import SidecarClient
from gokiq_celery.sidekiq import Job, RetryPolicy, SidekiqStore
from gokiq_celery.sidekiq.keys import DELIVERY_DEADLINES, RETRY
from gokiq_celery.sidekiq.retry import decode_backtrace
from gokiq_celery.worker import SIDECAR_DEATHS_MAX, Worker, current_worker, install_worker

from .conftest import free_port, wait_for
from .stand_in_sidecar import TOKEN, StandInSidecar


class NoJitter(random.Random):
    """Sidekiq's jitter is random; these tests want the base delay exactly."""

    def randrange(self, *args, **kwargs) -> int:
        return 0


@pytest.fixture(scope="module")
def stack(redis_server):
    """One worker for the module; each test gets the Sidekiq db and broker db flushed."""
    sidekiq_db, broker_db = 60, 61
    app.conf.broker_url = redis_server.url(broker_db)
    with StandInSidecar() as sidecar:
        settings = load_settings(
            redis_url=redis_server.url(sidekiq_db),
            sidecar_url=sidecar.url,
            sidecar_token=TOKEN,
            breaker_reset_timeout=1,
            breaker_fail_max=3,
            sidekiq_version=7,  # the stand-in sidecar publishes none
            queues="default critical low",
        )
        store = SidekiqStore.from_settings(settings)
        previous = install_worker(
            Worker(
                settings,
                store,
                SidecarClient(settings, store.redis),
                RetryPolicy(settings.max_retries, settings.sidekiq_version, rng=NoJitter()),
            )
        )
        try:
            with start_worker(
                app, pool="threads", concurrency=8, perform_ping_check=False, shutdown_timeout=10
            ):
                yield sidecar, store, redis_server.client(broker_db)
        finally:
            install_worker(previous)


@pytest.fixture
def env(stack):
    sidecar, store, _broker = stack
    store.redis.flushdb()
    return sidecar, store


def send(job: Job, queue: str = "default") -> None:
    app.send_task(TASK_NAME, args=(job.text, queue), queue=queue, **publish_options(job, queue))


def make_job(cls: str, args: list, **fields) -> Job:
    jid = f"{random.getrandbits(96):024x}"
    return Job.build(
        {
            "retry": True,
            "queue": "default",
            "class": cls,
            "args": args,
            "jid": jid,
            "created_at": time.time(),
            **fields,
        }
    )


def settle(broker) -> None:
    """Wait until the worker acked every message (acks are late: only after the task ran)."""
    wait_for(
        lambda: (
            not any(broker.llen(q) for q in ("default", "critical", "low"))
            and not broker.hlen("unacked")
        ),
        message="messages never acked",
    )


@contextlib.contextmanager
def worker_with(store: SidekiqStore, **settings_overrides):
    """The module's worker runs with other settings (another sidecar, say) for a while."""
    settings = load_settings(
        redis_url=current_worker().settings.redis_url,
        sidecar_token=TOKEN,
        queues="default critical low",
        **settings_overrides,
    )
    healthy = current_worker()
    install_worker(Worker(settings, store, SidecarClient(settings, store.redis), healthy.policy))
    try:
        yield
    finally:
        install_worker(healthy)


def dead_jobs(store: SidekiqStore) -> list[Job]:
    return [Job.parse(raw) for raw, _ in store.dead.entries()]


def test_success_counts_processed_and_leaves_no_trace(env):
    sidecar, store = env
    job = make_job("OkJob", [1, "two", {"three": 3}], extra_field={"kept": True})
    send(job, "critical")
    wait_for(lambda: store.stats.counts()["processed"] == 1, message="job did not run")
    [seen] = sidecar.executed(job.jid)
    assert seen == job.fields
    assert sidecar.calls["execute"][-1]["queue"] == "critical"
    assert store.stats.counts() == {"processed": 1, "failed": 0}
    assert store.dead.entries() == [] and store.scheduled.retry_set() == []


def test_raise_then_succeed_carries_sidekiq_error_fields(env):
    sidecar, store = env
    job = make_job("FlakyJob", [2, 1], backtrace=2)
    send(job)
    wait_for(lambda: len(sidecar.executed(job.jid)) == 3, timeout=20, message="not retried")
    wait_for(lambda: store.stats.counts()["processed"] == 3)
    first, second, third = sidecar.executed(job.jid)
    assert "retry_count" not in first
    assert second["retry_count"] == 0 and second["error_message"] == "flaky 1"
    assert second["error_class"] == "RuntimeError" and isinstance(second["failed_at"], float)
    assert third["retry_count"] == 1 and "retried_at" in third
    assert decode_backtrace(third["error_backtrace"]) == ["app/jobs/x.rb:1:in `perform'"] * 2
    assert store.stats.counts() == {"processed": 3, "failed": 2}
    assert store.dead.entries() == []


def test_exhausted_job_lands_in_dead_set_with_sidekiq_fields(env):
    sidecar, store = env
    job = make_job("FailJob", [1], retry=2, queue="default", retry_queue="low")
    send(job)
    wait_for(lambda: dead_jobs(store), timeout=20, message="job never reached the dead set")
    [dead] = dead_jobs(store)
    assert len(sidecar.executed(job.jid)) == 3
    assert dead.jid == job.jid and dead.get("retry_count") == 2
    assert dead.get("error_class") == "ArgumentError" and dead.get("error_message") == "boom"
    assert dead.queue == "low" and dead.get("created_at") == job.get("created_at")
    assert "failed_at" in dead and "retried_at" in dead
    # Sidekiq's order: the hook alone, then (after the dead set) the death handlers alone.
    hook, handlers = sidecar.exhausted_calls(job.jid)
    assert (hook["run_hook"], hook["death_handlers"]) == (True, False)
    assert (handlers["run_hook"], handlers["death_handlers"]) == (False, True)
    assert hook["error_class"] == "ArgumentError" and hook["job"]["retry_count"] == 2
    # The last two runs were sent to the retry queue, as Sidekiq's retry_queue says.
    assert [c["queue"] for c in sidecar.calls["execute"] if c["job"]["jid"] == job.jid] == [
        "default",
        "low",
        "low",
    ]


@pytest.mark.parametrize(
    ("fields", "dead", "hook"),
    [
        ({"retry": 0}, True, True),
        ({"retry": False}, False, False),
        ({"retry": 0, "dead": False}, False, True),
    ],
    ids=["retry-0", "retry-false", "dead-false"],
)
def test_no_retry_variants(env, stack, fields, dead, hook):
    sidecar, store = env
    job = make_job("FailJob", [], **fields)
    send(job)
    wait_for(
        lambda: any(c["death_handlers"] for c in sidecar.exhausted_calls(job.jid)),
        message="death handlers never called",
    )
    settle(stack[2])
    assert len(sidecar.executed(job.jid)) == 1
    calls = [(c["run_hook"], c["death_handlers"]) for c in sidecar.exhausted_calls(job.jid)]
    assert calls == ([(True, False), (False, True)] if hook else [(False, True)])
    assert [d.jid for d in dead_jobs(store)] == ([job.jid] if dead else [])
    assert store.scheduled.retry_set() == []


def test_a_hook_that_discards_keeps_the_job_out_of_the_dead_set_and_tells_the_handlers(env, stack):
    sidecar, store = env
    job = make_job("DiscardingFailJob", [], retry=0)
    send(job)
    wait_for(lambda: len(sidecar.exhausted_calls(job.jid)) == 2, message="no death handler call")
    settle(stack[2])
    hook, handlers = sidecar.exhausted_calls(job.jid)
    assert (hook["run_hook"], hook["death_handlers"], hook["discarded"]) == (True, False, False)
    # The sidecar runs the handlers after a discard only where the app's Sidekiq does (8.0.7+).
    assert (handlers["run_hook"], handlers["death_handlers"], handlers["discarded"]) == (
        False,
        True,
        True,
    )
    assert dead_jobs(store) == []


@pytest.mark.parametrize(("version", "stamped"), [("8.0.7", False), ("8.0.8", True)])
def test_an_exhausted_job_kept_out_of_the_dead_set_reaches_the_handlers_discarded(
    env, version, stamped
):
    """`dead: false`: no dead set, and from Sidekiq 8.0.8 the death handlers get the job
    stamped `discarded_at` (JobRetry#retries_exhausted)."""
    sidecar, store = env
    worker = current_worker()
    previous = worker.policy
    worker.policy = RetryPolicy(worker.settings.max_retries, version, rng=NoJitter())
    try:
        job = make_job("FailJob", [], retry=0, dead=False)
        send(job)
        wait_for(lambda: len(sidecar.exhausted_calls(job.jid)) == 2, message="no handler call")
    finally:
        worker.policy = previous
    hook, handlers = sidecar.exhausted_calls(job.jid)
    assert (hook["run_hook"], handlers["death_handlers"]) == (True, True)
    assert "discarded_at" not in hook["job"]
    assert ("discarded_at" in handlers["job"]) is stamped
    assert dead_jobs(store) == []


def test_long_delay_is_parked_in_the_retry_set(env, stack):
    sidecar, store = env
    job = make_job("FailJob", [1000])
    send(job)
    wait_for(lambda: store.scheduled.retry_set(), message="retry not parked")
    [(raw, score)] = store.scheduled.retry_set()
    parked = Job.parse(raw)
    assert parked.get("retry_count") == 0 and parked.get("error_class") == "ArgumentError"
    assert time.time() + 990 < score < time.time() + 1001
    assert stack[2].llen("default") == 0  # the Celery message was acked, not held
    assert len(sidecar.executed(job.jid)) == 1


def test_unknown_class_follows_its_retry_field(env):
    _sidecar, store = env
    job = make_job("UnknownJob", [], retry=0)
    send(job)
    wait_for(lambda: dead_jobs(store), message="unknown class did not fail like a raising job")
    assert dead_jobs(store)[0].get("error_class") == "NameError"


def test_invalid_payload_goes_to_dead_set_verbatim(env):
    _, store = env
    app.send_task(TASK_NAME, args=("{not json", "default"), queue="default")
    wait_for(lambda: store.dead.entries(), message="invalid payload not buried")
    assert store.dead.entries()[0][0] == b"{not json"


def test_sidecar_down_spends_no_retry(env, stack):
    _sidecar, store = env
    with worker_with(store, sidecar_url=f"http://127.0.0.1:{free_port()}", breaker_fail_max=50):
        job = make_job("OkJob", [7])
        send(job, "critical")
        wait_for(lambda: store.queues.size("critical") == 1, message="job not put back")
    [raw] = store.queues.jobs("critical")
    assert raw == job.raw  # the same bytes, no retry_count, no error fields
    assert store.stats.counts() == {"processed": 0, "failed": 0}
    assert store.scheduled.retry_set() == [] and store.dead.entries() == []


def test_each_message_keeps_its_own_retry_limit(env):
    """Celery 5.7 leaks a per-call max_retries into later messages of the same task."""
    sidecar, store = env
    one = make_job("FailJob", [1], retry=1)
    three = make_job("FailJob", [1], retry=3)
    send(one)
    send(three)
    wait_for(lambda: len(dead_jobs(store)) == 2, timeout=30, message="jobs not exhausted")
    counts = {d.jid: d.get("retry_count") for d in dead_jobs(store)}
    assert counts == {one.jid: 1, three.jid: 3}
    assert len(sidecar.executed(one.jid)) == 2 and len(sidecar.executed(three.jid)) == 4


def test_a_retry_that_cannot_be_republished_is_parked_not_lost(env, monkeypatch):
    """Celery turns a failed retry publish into a Reject (message dropped): gokiq parks it."""
    sidecar, store = env

    def broker_down(self, *args, **kwargs):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(Signature, "apply_async", broker_down)  # used only by Task.retry here
    job = make_job("FailJob", [1])
    send(job)
    wait_for(lambda: store.scheduled.retry_set(), message="failed retry publish lost the job")
    [(raw, score)] = store.scheduled.retry_set()
    assert Job.parse(raw).get("retry_count") == 0 and Job.parse(raw).jid == job.jid
    assert time.time() < score <= time.time() + 2  # due after the job's own short delay
    assert len(sidecar.executed(job.jid)) == 1


def send_tracked(store: SidekiqStore, job: Job, queue: str = "default", *, stale=False) -> str:
    """Publish as the bridge does: the ledger entry first, then the message with its token.
    `stale`: the entry is gone before the message is sent (settled, or published again)."""
    token = new_delivery_token()
    store.ledger.record([(token, queue, job.text)], deadline=time.time() + 60)
    if stale:
        store.ledger.settle([token])
    app.send_task(
        TASK_NAME,
        args=(job.text, queue),
        kwargs={"delivery": token},
        queue=queue,
        **publish_options(job, queue),
    )
    return token


def test_a_tracked_delivery_is_settled_once_the_job_ran(env, stack):
    _sidecar, store = env
    job = make_job("OkJob", [1])
    send_tracked(store, job)
    wait_for(lambda: store.stats.counts()["processed"] == 1, message="job did not run")
    settle(stack[2])
    wait_for(lambda: store.ledger.tokens() == [], message="delivery never settled")


def test_a_stale_delivery_is_skipped(env, stack):
    """A message whose token left the ledger (settled, or published again) must not run."""
    sidecar, store = env
    job = make_job("OkJob", [2])
    send_tracked(store, job, stale=True)  # as if the bridge had re-published it (new token)
    settle(stack[2])
    assert sidecar.executed(job.jid) == [] and store.stats.counts()["processed"] == 0


def test_a_retry_carries_a_new_token_and_settles_at_the_end(env, stack):
    sidecar, store = env
    job = make_job("FlakyJob", [1, 1])
    first = send_tracked(store, job)
    wait_for(lambda: len(sidecar.executed(job.jid)) == 2, timeout=20, message="not retried")
    assert first not in store.ledger.tokens()  # replaced when the retry was published
    settle(stack[2])
    wait_for(lambda: store.ledger.tokens() == [], message="deliveries never settled")
    assert store.stats.counts() == {"processed": 2, "failed": 1}


def with_member(job: Job, member: str) -> Job:
    """The job's text with one more member, written as is (NaN, escapes: what Job.build won't)."""
    return Job(job.text[:-1] + "," + member + "}", job.fields)


@pytest.mark.parametrize(
    "member",
    ['"retry_count":"abc"', '"retry_count":NaN', '"retry_queue":"\\ud800"', '"retry_count":-2'],
)
def test_a_payload_that_would_break_after_its_run_is_dead_before_it(env, stack, member):
    """These used to run, then raise in the retry handling: Celery acked, nobody settled the
    delivery, and the ledger published the job (and ran its side effects) every ~10 minutes."""
    sidecar, store = env
    job = with_member(make_job("FailJob", []), member)
    send_tracked(store, job)
    wait_for(lambda: store.dead.entries(), message="poison payload not buried")
    settle(stack[2])
    wait_for(lambda: store.ledger.tokens() == [], message="delivery never settled")
    [(raw, _)] = store.dead.entries()
    assert json.loads(raw)["error_class"] == "Gokiq::InvalidJob"
    assert json.loads(raw)["jid"] == job.jid and sidecar.executed(job.jid) == []


def test_an_infinite_retry_in_from_the_sidecar_is_ignored(env, stack):
    """`retry_in: Infinity` in a reply made the delay computation raise after the run."""
    sidecar, store = env
    job = make_job("FailJob", [0], retry=1)  # the stand-in answers retry_in = args[0]
    job = Job.parse(job.text.replace('"args":[0]', '"args":[1e400]'))  # a float: infinity
    send_tracked(store, job)
    wait_for(lambda: dead_jobs(store), timeout=60, message="job never exhausted")
    assert dead_jobs(store)[0].get("error_class") == "ArgumentError"
    assert len(sidecar.executed(job.jid)) == 2  # the default delay, then exhausted
    settle(stack[2])
    wait_for(lambda: store.ledger.tokens() == [], message="delivery never settled")


def test_whatever_still_breaks_after_a_run_sends_the_job_to_the_dead_set(env, stack, monkeypatch):
    sidecar, store = env

    def broken(*args, **kwargs):
        raise OverflowError("a value no one foresaw")

    monkeypatch.setattr(current_worker().policy, "decide", broken)
    job = make_job("FailJob", [])
    send_tracked(store, job)
    wait_for(lambda: store.dead.entries(), message="job not buried")
    settle(stack[2])
    wait_for(lambda: store.ledger.tokens() == [], message="delivery never settled")
    [(raw, _)] = store.dead.entries()
    dead = json.loads(raw)
    assert dead["error_class"] == "Gokiq::InvalidJob" and "OverflowError" in dead["error_message"]
    assert len(sidecar.executed(job.jid)) == 1 and store.stats.counts() == {
        "processed": 1,
        "failed": 1,
    }


def test_metric_labels_are_resolved_classes_and_configured_queues(env, stack):
    """A payload's display_class, a class the sidecar does not know, or a retry_queue nobody
    configured must not become a label: each would grow /metrics without bound."""
    _sidecar, store = env
    for n in range(3):
        send(make_job("OkJob", [], display_class=f"spam-display-{n}"))
        send(make_job(f"SpamUnknown{n}", [], retry=False))
    send(make_job("FailJob", [], retry=0, retry_queue="spam-queue"))
    wait_for(lambda: store.stats.counts()["processed"] == 7, message="jobs did not run")
    settle(stack[2])
    labels = {
        (sample.labels["queue"], sample.labels["class"])
        for metric in current_worker().metrics.jobs.collect()
        for sample in metric.samples
    }
    assert not [label for label in labels if "spam" in "".join(label)], labels
    assert ("default", "OkJob") in labels and ("default", "(other)") in labels
    assert ("default", "FailJob") in labels  # the queue it ran from; the retry_queue is not a label


def test_class_labels_are_capped():
    labels = metrics.ClassLabels(limit=2)
    jobs = [make_job(f"Job{n}", []) for n in range(3)]
    for job in jobs:
        labels.learn(job)
    assert [labels.label(job) for job in jobs] == ["Job0", "Job1", "(other)"]


def test_a_409_leaves_the_job_in_the_ledger_until_the_other_run_is_over(env, stack):
    """409: another run of the jid still holds it (one whose answer timed out, say) and may yet
    fail unheard. This delivery must not settle the job: the ledger publishes it again later."""
    sidecar, store = env
    job = make_job("BusyJob", [])
    token = send_tracked(store, job)
    wait_for(lambda: sidecar.executed(job.jid), message="job never reached the sidecar")
    settle(stack[2])
    current_worker().settler.flush()
    assert store.ledger.tokens() == [token]
    deadline = store.redis.zscore(DELIVERY_DEADLINES, token)
    assert deadline > time.time() + current_worker().settings.job_timeout
    assert store.stats.counts() == {"processed": 0, "failed": 0}


def test_a_job_that_keeps_killing_the_sidecar_fails_after_a_few_deaths(env, stack):
    """A connection cut after the job was sent is a sidecar death: put back (not the job's
    fault) until the same jid has been in flight at SIDECAR_DEATHS_MAX of them."""
    sidecar, store = env
    job = make_job("CrashJob", [], retry=0)
    # breaker_fail_max: the deaths must not open the other tests' breaker
    with worker_with(store, sidecar_url=sidecar.url, breaker_fail_max=50):
        send(job)
        for death in range(1, SIDECAR_DEATHS_MAX):
            wait_for(lambda: store.queues.size("default") == 1, message=f"not put back ({death})")
            again = Job.parse(store.redis.rpop("queue:default"))
            assert "retry_count" not in again  # no retry spent on a death below the limit
            send(again)
        wait_for(lambda: dead_jobs(store), message="the sidecar's killer never failed")
    [dead] = dead_jobs(store)
    assert dead.jid == job.jid and dead.get("error_class") == "Gokiq::SidecarDied"
    assert len(sidecar.executed(job.jid)) == SIDECAR_DEATHS_MAX
    assert store.queues.size("default") == 0


def test_a_retry_queue_no_worker_consumes_is_parked_in_the_retry_set(env, stack):
    """A Celery retry sent to a queue nobody consumes would wait there for ever."""
    sidecar, store = env
    job = make_job("FailJob", [1], retry_queue="nobody-consumes")
    send(job)
    wait_for(lambda: store.scheduled.retry_set(), message="retry not parked")
    settle(stack[2])
    [(raw, score)] = store.scheduled.retry_set()
    parked = Job.parse(raw)
    assert parked.queue == "nobody-consumes" and parked.get("retry_count") == 0
    assert score <= time.time() + 2  # due after the job's own short delay
    assert stack[2].llen("nobody-consumes") == 0
    assert len(sidecar.executed(job.jid)) == 1


@pytest.fixture
def task_states():
    """What Flower would show: the final state of each task id, from Celery's own signals."""
    states: dict[str, tuple[str, str]] = {}

    def record(state):
        def receiver(sender=None, request=None, task_id=None, exception=None, reason=None, **kw):
            tid = task_id or (request.id if request is not None else None)
            if tid is None:  # task_success: the task's own request
                tid = sender.request.id
            states[tid] = (state, str(exception or reason or kw.get("result")))

        return receiver

    receivers = {
        task_failure: record("FAILURE"),
        task_retry: record("RETRY"),
        task_success: record("SUCCESS"),
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver, weak=False)
    yield states
    for signal, receiver in receivers.items():
        signal.disconnect(receiver)


def test_flower_sees_a_dead_job_fail_and_each_retried_attempt_as_a_retry(env, task_states):
    _sidecar, store = env
    dead = make_job("FailJob", [0], retry=1)  # retry_in 0: retried at once, then dead
    flaky = make_job("FlakyJob", [1, 0])
    parked = make_job("FailJob", [1000])
    send(dead)
    send(flaky)
    send(parked)
    wait_for(lambda: len(task_states) == 5, timeout=20, message=f"tasks: {task_states}")
    assert task_states[dead.jid][0] == "RETRY"
    assert task_states[f"{dead.jid}.1"] == ("FAILURE", "dead: ArgumentError: boom")
    assert task_states[flaky.jid][0] == "RETRY" and "flaky 1" in task_states[flaky.jid][1]
    assert task_states[f"{flaky.jid}.1"] == ("SUCCESS", "ok")
    assert task_states[parked.jid][0] == "RETRY"  # parked in the retry set: still a retry
    assert [job.jid for job in dead_jobs(store)] == [dead.jid]


def test_a_job_put_back_for_the_sidecar_is_neither_failed_nor_retried(env, stack, task_states):
    _sidecar, store = env
    with worker_with(store, sidecar_url=f"http://127.0.0.1:{free_port()}", breaker_fail_max=50):
        job = make_job("OkJob", [7])
        send(job)
        wait_for(lambda: job.jid in task_states, message="task never ended")
    assert task_states[job.jid] == ("SUCCESS", "unavailable")


def pending_retry(store: SidekiqStore, job: Job) -> tuple[bytes, float] | None:
    """The job's entry in Sidekiq's retry set, if it has one."""
    entries = [
        (raw, score) for raw, score in store.scheduled.retry_set() if Job.parse(raw).jid == job.jid
    ]
    return entries[0] if entries else None


def test_a_short_retry_waits_in_the_retry_set_and_its_countdown_runs_it_once(env, stack):
    sidecar, store = env
    job = make_job("FailJob", [3], retry=1)  # retried in 3 s, then dead
    failed_at = time.time()
    send(job)
    wait_for(lambda: pending_retry(store, job), message="the retry is not in the retry set")
    raw, score = pending_retry(store, job)
    waiting = Job.parse(raw)
    assert waiting.get("retry_count") == 0 and waiting.get("error_class") == "ArgumentError"
    assert failed_at + 3 <= score <= time.time() + 3
    assert store.stats.counts() == {"processed": 1, "failed": 1}  # counted with the retry's write
    wait_for(lambda: dead_jobs(store), timeout=30, message="the countdown never ran the retry")
    settle(stack[2])
    assert len(sidecar.executed(job.jid)) == 2 and store.scheduled.retry_set() == []
    wait_for(lambda: store.ledger.tokens() == [], message="the retry's delivery never settled")


def test_a_retry_removed_from_the_retry_set_makes_its_countdown_stale(env, stack, task_states):
    """What the Web UI's Delete, Kill and Retry Now do: the countdown must not run it then."""
    sidecar, store = env
    job = make_job("FailJob", [2], retry=1)
    send(job)
    wait_for(lambda: pending_retry(store, job), message="the retry is not in the retry set")
    raw, _score = pending_retry(store, job)
    assert store.redis.zrem(RETRY, raw) == 1
    wait_for(lambda: f"{job.jid}.1" in task_states, timeout=30, message="countdown never fired")
    settle(stack[2])
    assert task_states[f"{job.jid}.1"] == ("SUCCESS", "stale")
    assert len(sidecar.executed(job.jid)) == 1 and dead_jobs(store) == []
    assert store.ledger.tokens() == [] and store.stats.counts() == {"processed": 1, "failed": 1}


def test_the_poller_and_a_countdown_racing_for_a_retry_run_it_once(env, stack):
    """No grace: the bridge's poller takes the retry as soon as it is due, while its countdown
    fires; whoever removes the entry first has it (the poller onto `queue:default`, which no
    bridge fetches here; the countdown runs it), the other gets nothing."""
    sidecar, store = env
    job = make_job("FailJob", [2], retry=1)
    send(job)
    wait_for(lambda: pending_retry(store, job), message="the retry is not in the retry set")
    stop = threading.Event()
    poller = Scheduler(store, "b1", BridgeMetrics(), sidekiq_version=7, retry_grace=0)
    poller.poll_interval = 0.01
    thread = threading.Thread(target=poller.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: not pending_retry(store, job), timeout=30, message="nobody took it")
        settle(stack[2])
    finally:
        stop.set()
        thread.join()
    ran_by_countdown = len(sidecar.executed(job.jid)) - 1
    taken_by_poller = store.queues.size("default")
    assert ran_by_countdown + taken_by_poller == 1
