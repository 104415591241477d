"""The history and audit writers alone, in one process, against a real PostgreSQL: printed,
never asserted.

    .venv/bin/python bench/history_writer.py [--jobs 20000] [--batches 20,200,2000]

Without the rest of the stack (bench/history.py measures that), what each part costs:

1. The worker's calls on a job's path (`started` + `finished` of a no-op run), CPU µs per job
   on the calling thread; and the bridge's `enqueued`, per job.
2. A flush, per batch size (the jobs finished between two flushes): the writing thread's CPU µs
   per job, the database backend's CPU µs per job (it runs on this machine), and the rows a
   second one writer reaches when it writes back to back (the ceiling before events are
   dropped at bulk rates).
3. The ingestion API's audit writer: the same, per batch of audit events.
4. At the ingestion API's bulk rates: each writer with its thread, fed 1,000 events at a time
   at a set rate for `--seconds` from another thread of the process (as gokiq-api's requests
   feed them): what reached the database and what was dropped.

Each job is an enqueued event (the bridge's recorder) then a run (the worker's), as in the
stack. PostgreSQL: as bench/history.py (the local server or a throwaway cluster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from history import _database_backends as _backends  # noqa: E402

from gokiq_celery.settings import Settings  # noqa: E402
from gokiq_celery.sidekiq.job import Job, dumps  # noqa: E402
from gokiq_history import migrations, store  # noqa: E402
from gokiq_history.recorder import HistoryRecorder  # noqa: E402
from gokiq_ingest import audit  # noqa: E402
from tests.history_support import pg_admin, pg_database  # noqa: E402


def _backend_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _jobs(n: int) -> list[Job]:
    now = time.time()
    return [
        Job.parse(dumps({"class": "NoopJob", "args": [], "queue": "default",
                         "jid": uuid.uuid4().hex[:24], "created_at": now, "enqueued_at": now,
                         "retry": True}))
        for _ in range(n)
    ]  # fmt: skip


def job_path(url: str, n: int) -> None:
    recorder = HistoryRecorder(Settings(history_url=url, history_buffer=10**9), background=False)
    jobs = _jobs(n)
    started = time.thread_time()
    recorder.enqueued(jobs)
    enqueued = time.thread_time() - started
    started = time.thread_time()
    for job in jobs:
        recorder.started(job, "default")
        recorder.finished(job, "ok")
    run = time.thread_time() - started
    print(f"1. on the job's path: worker started+finished {run / n * 1e6:.1f} µs/job, "
          f"bridge enqueued {enqueued / n * 1e6:.1f} µs/job", flush=True)  # fmt: skip


def flushes(url: str, n: int, batch: int) -> None:
    settings = Settings(history_url=url, history_buffer=10**9)
    bridge = HistoryRecorder(settings, background=False)
    worker = HistoryRecorder(settings, background=False)
    for recorder in (bridge, worker):  # connect before measuring
        recorder.enqueued(_jobs(1))
        recorder.flush()
    backends = _backends(url)
    jobs = _jobs(n)
    cpu, wall, db = {"bridge": 0.0, "worker": 0.0}, 0.0, _backend_cpu(backends)
    for i in range(0, n, batch):
        chunk = jobs[i : i + batch]
        bridge.enqueued(chunk)
        for job in chunk:
            worker.started(job, "default")
            worker.finished(job, "ok")
        order = (("bridge", bridge), ("worker", worker))  # flushed on their own clocks:
        for name, recorder in order if i // batch % 2 else order[::-1]:  # either first
            t0, w0 = time.thread_time(), time.perf_counter()
            assert recorder.flush()
            cpu[name] += time.thread_time() - t0
            wall += time.perf_counter() - w0
    db = _backend_cpu(backends) - db
    rows = 3 * n  # a job row written twice (enqueued, then its end) and a run row
    print(f"   {batch:>5} jobs a flush: writer CPU µs/job bridge {cpu['bridge'] / n * 1e6:5.1f} "
          f"worker {cpu['worker'] / n * 1e6:5.1f}, database {db / n * 1e6:5.1f}; "
          f"back to back {rows / wall:8.0f} rows/s", flush=True)  # fmt: skip
    for recorder in (bridge, worker):
        recorder.close()


def audits(url: str, n: int, batch: int) -> None:
    engine = store.open_engine(url, pre_ping=False)
    auditor = audit.Auditor(engine, retention=86400, limit=10**9, background=False)
    auditor.record([audit.event(202, client="c", source_ip="127.0.0.1", jid="x")])
    auditor.flush()
    backends = _backends(url)
    events = [
        audit.event(202, client="bench", source_ip="127.0.0.1", job_class="NoopJob",
                    queue="default", jid=uuid.uuid4().hex[:24])
        for _ in range(n)
    ]  # fmt: skip
    cpu, wall, db = 0.0, 0.0, _backend_cpu(backends)
    for i in range(0, n, batch):
        auditor.record(events[i : i + batch])
        t0, w0 = time.thread_time(), time.perf_counter()
        assert auditor.flush()
        cpu += time.thread_time() - t0
        wall += time.perf_counter() - w0
    db = _backend_cpu(backends) - db
    print(
        f"   {batch:>5} events a flush: writer CPU µs/event {cpu / n * 1e6:5.1f}, "
        f"database {db / n * 1e6:5.1f}; back to back {n / wall:8.0f} rows/s",
        flush=True,
    )
    auditor.close()
    engine.dispose()


def _feed(writer_add, events: list, rate: float, seconds: float) -> float:
    """Hand `events` to `writer_add` 1,000 at a time at `rate` a second; the time it took."""
    started = time.monotonic()
    for i in range(0, len(events), 1000):
        time.sleep(max(started + i / rate - time.monotonic(), 0.0))
        writer_add(events[i : i + 1000])
    return time.monotonic() - started


def sustained(url: str, rates: list[int], seconds: float) -> None:
    for rate in rates:
        n = int(rate * seconds)
        recorder = HistoryRecorder(Settings(history_url=url))  # its own thread, as in gokiq-api
        jobs = _jobs(n)
        took = _feed(recorder.enqueued, jobs, rate, seconds)
        recorder.close()  # writes what is left
        engine = store.open_engine(url, pre_ping=False)
        auditor = audit.Auditor(engine, retention=86400, limit=Settings().history_buffer)
        events = [
            audit.event(202, client="bench", source_ip="127.0.0.1", job_class="NoopJob",
                        queue="default", jid=job.jid)
            for job in jobs
        ]  # fmt: skip
        audit_took = _feed(auditor.record, events, rate, seconds)
        auditor.close()
        engine.dispose()
        print(f"   {rate:>6} events/s, {seconds:.0f} s (fed in {took:.1f} / {audit_took:.1f} s): "
              f"history dropped {recorder.drops.total:>6} of {n}, "
              f"audit dropped {auditor.drops.total:>6} of {n}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20000, help="jobs per measure")
    parser.add_argument("--batches", default="20,200,2000", help="jobs per flush, comma-separated")
    parser.add_argument("--rates", default="10000,20000,40000", help="part 4's events a second")
    parser.add_argument("--seconds", type=float, default=5.0, help="part 4's duration")
    opts = parser.parse_args()
    batches = [int(b) for b in opts.batches.split(",")]
    with pg_admin() as admin_url, pg_database(admin_url) as url:
        migrations.upgrade(url)
        job_path(url, opts.jobs)
        print("2. history flushes (bridge: enqueued; worker: runs)", flush=True)
        for batch in batches:
            flushes(url, opts.jobs, batch)
        print("3. audit flushes", flush=True)
        for batch in batches:
            audits(url, opts.jobs, batch)
        print("4. sustained rates (history_buffer events each)", flush=True)
        sustained(url, [int(r) for r in opts.rates.split(",")], opts.seconds)


if __name__ == "__main__":
    main()
