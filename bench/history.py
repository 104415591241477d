"""The job history's cost and speed (issue 14's targets), printed, never asserted.

    .venv/bin/python bench/history.py [--n 2000] [--rounds 2] [--rows 1000000]

1. Throughput through the whole stack (bench/e2e.py's helpers), history off vs on
   (PostgreSQL), for N NoopJob and N SleepJob(20) pushed at once; the rounds alternate off and
   on so that the VM's drift hits both. Target: on loses <= 10%. Also the CPU ms per job of
   the bridge, the worker, the sidecar and the database's backends for the recorders (on this
   machine, where a production database would not be), off vs on: where the loss comes from.
2. Visibility: jobs trickled one every 50 ms with history on; the delay from a job's end (its
   `finished_at`, the worker's clock) to its final state being readable in the database
   (polled every 10 ms). Target: <= 1 s.
3. `GET /v1/jobs/{jid}` through a `gokiq-api` process on a table of `--rows` jobs (bulk-loaded
   with generate_series, one run each): p50 / p99 of sequential keep-alive requests; also a
   filtered page and a next page. Target: p99 <= 10 ms.

PostgreSQL: the server on 127.0.0.1:5432 if it answers, else a throwaway cluster
(tests/history_support.py); the databases made here are dropped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psycopg
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from e2e import bulk, percentile, wait_done  # noqa: E402
from sqlalchemy import text  # noqa: E402
from worker import cpu_seconds  # noqa: E402

from gokiq_history import migrations, store  # noqa: E402
from tests.conftest import VENV_BIN, free_port  # noqa: E402
from tests.e2e.conftest import Stack  # noqa: E402
from tests.history_support import pg_admin, pg_database  # noqa: E402


def _database_backends(url: str | None) -> list[int]:
    """The PostgreSQL server processes serving the history database (the recorders' pooled
    connections), to count the database's CPU per job when it runs on this machine."""
    if not url:
        return []
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    return [pid for (pid,) in rows]


def _process_cpu(stack: Stack, url: str | None) -> dict[str, float]:
    cpu = {s.name: cpu_seconds(s.pid) for s in (stack.bridge, stack.worker, stack.sidecar)}
    cpu["postgres"] = sum(cpu_seconds(pid) for pid in _database_backends(url))
    return cpu


def throughput(stack: Stack, cls: str, args: list, n: int, url: str | None) -> dict[str, float]:
    """jobs/s, and each process's CPU ms per job (the database's: its backends for the recorders,
    which persist through the run: the first measure of a stack includes its connection)."""
    before = _process_cpu(stack, url)
    jids, enqueued_at = bulk(stack, cls, args, n)
    lines = wait_done(stack, set(jids), timeout=600)
    last = max(datetime.fromisoformat(line["ts"]).timestamp() for line in lines.values())
    after = _process_cpu(stack, url)
    cpu = {name: (after[name] - before.get(name, 0.0)) * 1000 / n for name in after}
    return {"rate": n / (last - min(enqueued_at.values())), **cpu}


def run_stack(env: dict[str, str], n: int) -> dict[str, dict[str, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="gokiq-bench-history-"))
    stack = Stack(tmp, env)
    url = env.get("GOKIQ_HISTORY_URL")
    try:
        stack.start()
        jids, _ = bulk(stack, "NoopJob", [], 50)  # warm up
        wait_done(stack, set(jids), timeout=120)
        return {
            "noop": throughput(stack, "NoopJob", [], n, url),
            "sleep20": throughput(stack, "SleepJob", [20], n, url),
        }
    finally:
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_throughput(url: str, n: int, rounds: int) -> None:
    print(f"1. throughput, {n} jobs per workload, {rounds} rounds alternating off/on", flush=True)
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for r in range(rounds):
        for mode, env in (("off", {}), ("on", {"GOKIQ_HISTORY_URL": url})):
            rates = run_stack(env, n)
            results[mode].append(rates)
            print(f"   round {r + 1} history {mode:<3}: noop {rates['noop']['rate']:7.1f} jobs/s, "
                  f"20 ms {rates['sleep20']['rate']:7.1f} jobs/s", flush=True)  # fmt: skip
    for workload in ("noop", "sleep20"):
        off = statistics.median(x[workload]["rate"] for x in results["off"])
        on = statistics.median(x[workload]["rate"] for x in results["on"])
        rounds_ratio = ", ".join(
            f"{a[workload]['rate'] / b[workload]['rate']:.2f}"
            for a, b in zip(results["on"], results["off"], strict=True)
        )
        print(f"   {workload:<8} median on/off = {on / off:.2f}  ({on:.0f} vs {off:.0f} jobs/s; "
              f"round by round {rounds_ratio})")  # fmt: skip
        cpu = []
        for name in ("bridge", "worker", "sidecar", "postgres"):
            cpu_off = statistics.median(x[workload][name] for x in results["off"])
            cpu_on = statistics.median(x[workload][name] for x in results["on"])
            cpu.append(f"{name} {cpu_off:.2f} -> {cpu_on:.2f}")
        print(f"   {'':<8} CPU ms per job, median off -> on: {'; '.join(cpu)}")


def bench_visibility(url: str, count: int = 100) -> None:
    print(f"2. visibility: {count} NoopJob trickled every 50 ms, history on", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gokiq-bench-history-"))
    stack = Stack(tmp, {"GOKIQ_HISTORY_URL": url})
    engine = store.open_engine(url)
    seen: dict[str, float] = {}
    finished: dict[str, float] = {}
    stop = threading.Event()
    t0 = time.time()

    def poll() -> None:
        query = text(
            "SELECT jid, finished_at FROM gokiq_jobs WHERE state = 'succeeded' "
            "AND job_class = 'NoopJob' AND created_at >= :t0"
        )
        with engine.connect() as conn:
            while not stop.is_set():
                now = time.time()
                for jid, at in conn.execute(query, {"t0": t0}):
                    if jid not in seen:
                        seen[jid], finished[jid] = now, at
                conn.commit()
                time.sleep(0.01)

    try:
        stack.start()
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        [pairs] = stack.api({"op": "trickle", "class": "NoopJob", "n": count, "interval": 0.05})
        deadline = time.monotonic() + 60
        while len(seen) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        poller.join(5)
        delays = [seen[j] - finished[j] for j in seen]
        print(f"   {len(seen)}/{len(pairs)} visible; delay finish -> visible: "
              f"p50 {statistics.median(delays) * 1000:.0f} ms, "
              f"p99 {percentile(delays, 99) * 1000:.0f} ms, "
              f"max {max(delays) * 1000:.0f} ms", flush=True)  # fmt: skip
    finally:
        stop.set()
        stack.stop()
        engine.dispose()
        shutil.rmtree(tmp, ignore_errors=True)


LOAD_JOBS = """
INSERT INTO gokiq_jobs (jid, job_class, queue, state, state_rank, state_at, attempts,
    created_at, enqueued_at, first_started_at, last_started_at, finished_at, worker, runtime,
    updated_at)
SELECT substr(md5(i::text), 1, 24), 'Class' || (i % 50),
    (ARRAY['default', 'critical', 'low'])[1 + i % 3],
    (ARRAY['succeeded', 'succeeded', 'succeeded', 'dead', 'retrying'])[1 + i % 5],
    3, :now - i * 0.5, 1, :now - i * 0.5 - 1, :now - i * 0.5 - 1, :now - i * 0.5 - 0.5,
    :now - i * 0.5 - 0.5, :now - i * 0.5, 'bench:1', 0.5, :now - i * 0.5
FROM generate_series(1, :rows) AS i
"""
LOAD_RUNS = """
INSERT INTO gokiq_job_attempts (jid, started_at, attempt, finished_at, outcome, worker, runtime)
SELECT jid, first_started_at, 1, finished_at, 'ok', worker, runtime FROM gokiq_jobs
"""


def bench_api(admin_url: str, rows: int, requests_n: int = 2000) -> None:
    print(f"3. gokiq-api on {rows:,} jobs", flush=True)
    with pg_database(admin_url) as url:
        migrations.upgrade(url)
        engine = store.open_engine(url, statement_timeout=600)
        started = time.monotonic()
        with engine.begin() as conn:
            conn.execute(text(LOAD_JOBS), {"now": time.time(), "rows": rows})
            conn.execute(text(LOAD_RUNS))
        with engine.connect() as conn:
            conn.execute(text("ANALYZE gokiq_jobs"))
            conn.execute(text("ANALYZE gokiq_job_attempts"))
            conn.commit()
        print(f"   loaded in {time.monotonic() - started:.0f} s", flush=True)
        engine.dispose()
        port, token = free_port(), "bench-token"
        env = {"GOKIQ_HISTORY_URL": url, "GOKIQ_API_PORT": str(port), "GOKIQ_API_TOKENS": token,
               "GOKIQ_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"}  # fmt: skip
        api = subprocess.Popen([str(VENV_BIN / "gokiq-api")], env=env)
        try:
            _api_latencies(f"http://127.0.0.1:{port}", token, rows, requests_n)
        finally:
            api.terminate()
            api.wait(10)


def _timed(session: requests.Session, url: str, **params) -> tuple[float, dict]:
    started = time.perf_counter()
    response = session.get(url, params=params, timeout=10)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


def _api_latencies(base: str, token: str, rows: int, n: int) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    for _ in range(300):
        try:
            if session.get(base + "/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.1)
    jids = [hashlib.md5(str(random.randint(1, rows)).encode()).hexdigest()[:24] for _ in range(n)]
    for jid in jids[:100]:  # warm up: connections, plans
        _timed(session, f"{base}/v1/jobs/{jid}")
    one = [_timed(session, f"{base}/v1/jobs/{jid}")[0] for jid in jids]
    _print_latency("GET /v1/jobs/{jid}", one)
    pages, cursor = [], None
    for _ in range(200):
        params = {"class": "Class7", "limit": 50}  # one filter: one index range per page
        elapsed, page = _timed(session, f"{base}/v1/jobs", **params, **(
            {"cursor": cursor} if cursor else {}))  # fmt: skip
        pages.append(elapsed)
        cursor = page["next_cursor"]
    _print_latency("GET /v1/jobs?class= (50/page, 200 pages)", pages)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    stats = [_timed(session, f"{base}/v1/stats", since=since)[0] for _ in range(20)]
    _print_latency("GET /v1/stats?since=1h ago (7,200 jobs)", stats)


def _print_latency(name: str, values: list[float]) -> None:
    p50, p99 = statistics.median(values) * 1000, percentile(values, 99) * 1000
    print(f"   {name:<48} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  ({len(values)} requests)")


def main() -> None:
    # A SIGTERM (timeout, kill) unwinds like Ctrl-C: the stacks' processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="jobs per workload (default 2000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of off/on (default 2)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the API part")
    parser.add_argument("--skip", action="append", default=[], choices=["1", "2", "3"])
    opts = parser.parse_args()
    with pg_admin() as admin_url:
        if "1" not in opts.skip or "2" not in opts.skip:
            with pg_database(admin_url) as url:
                migrations.upgrade(url)
                if "1" not in opts.skip:
                    bench_throughput(url, opts.n, opts.rounds)
                if "2" not in opts.skip:
                    bench_visibility(url)
        if "3" not in opts.skip:
            bench_api(admin_url, opts.rows)


if __name__ == "__main__":
    main()
