"""The whole stack, measured: Rails' Sidekiq client -> redis -> gokiq-bridge -> Celery worker
(threads, concurrency 20) -> Ruby sidecar -> the job, as real processes (tests/e2e/conftest.py).

    .venv/bin/python bench/e2e.py [--n 2000] [--trickle 200]

For N NoopJob and then N SleepJob(20), all enqueued with one `push_bulk` through the example
app's real Sidekiq client, it prints jobs/s (enqueue to the last job done) and the latency
from `enqueued_at` to the start of `perform` (the sidecar's log: end time minus duration),
p50 / p99. A backlog of N jobs pushed at once is a drain test, so its latency is mostly
queueing; the trickle phase (jobs enqueued one at a time, every 20 ms) shows the pickup latency
of an idle stack. Then the peak RSS (VmHWM) of each process. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.e2e.conftest import Stack  # noqa: E402


def done_lines(stack: Stack, jids: set[str]) -> dict[str, dict]:
    return {line["jid"]: line for line in stack.sidecar_done() if line.get("jid") in jids}


def wait_done(stack: Stack, jids: set[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = done_lines(stack, jids)
        if len(lines) >= len(jids):
            return lines
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(lines)} of {len(jids)} jobs done after {timeout}s")
        time.sleep(0.25)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def report(name: str, stack: Stack, jids: list[str], enqueued_at: dict[str, float]) -> None:
    lines = wait_done(stack, set(jids), timeout=600)
    starts = {
        jid: datetime.fromisoformat(line["ts"]).timestamp() - float(line["duration"])
        for jid, line in lines.items()
    }
    ends = [datetime.fromisoformat(line["ts"]).timestamp() for line in lines.values()]
    latencies = [starts[jid] - enqueued_at[jid] for jid in jids]
    elapsed = max(ends) - min(enqueued_at.values())
    bad = sum(1 for line in lines.values() if line["outcome"] != "ok")
    print(
        f"{name:<22} {len(jids):>6} jobs  {len(jids) / elapsed:8.1f} jobs/s  "
        f"latency p50 {statistics.median(latencies) * 1000:8.1f} ms  "
        f"p99 {percentile(latencies, 99) * 1000:8.1f} ms" + (f"  ({bad} not ok)" if bad else ""),
        flush=True,
    )


def bulk(stack: Stack, cls: str, args: list, n: int) -> tuple[list[str], dict[str, float]]:
    before, jids = stack.api({"op": "now"}, {"op": "push_bulk", "class": cls, "args": [args] * n})
    # push_bulk stamps every job with one enqueued_at just after `before` (one LPUSH);
    # `before` is the conservative (earliest) choice.
    return jids, dict.fromkeys(jids, before)


def trickle(stack: Stack, n: int) -> tuple[list[str], dict[str, float]]:
    # One perform_async every 20 ms; `at` is Ruby's clock just before each push.
    [pairs] = stack.api({"op": "trickle", "class": "NoopJob", "n": n, "interval": 0.02})
    jids = [p["jid"] for p in pairs]
    return jids, {p["jid"]: p["at"] for p in pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="jobs per phase (default 2000)")
    parser.add_argument("--trickle", type=int, default=200, help="trickled jobs (default 200)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    opts = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gokiq-bench-"))
    stack = Stack(tmp)
    try:
        print(f"starting redis, sidecar, bridge, worker (logs in {tmp}/logs) ...", flush=True)
        stack.start()
        # Warm up: Rails, connection pools, Celery's consumer.
        jids, _ = bulk(stack, "NoopJob", [], 50)
        wait_done(stack, set(jids), timeout=60)

        report("NoopJob (bulk)", stack, *bulk(stack, "NoopJob", [], opts.n))
        report("SleepJob(20) (bulk)", stack, *bulk(stack, "SleepJob", [20], opts.n))
        if opts.trickle:
            report("NoopJob (trickle 20ms)", stack, *trickle(stack, opts.trickle))

        print("peak RSS (VmHWM):", flush=True)
        procs = [("redis-server", stack.redis.process.pid)]
        procs += [(s.name, s.pid) for s in stack.services]
        for name, pid in procs:
            hwm = 0
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
            print(f"  {name:<13} {hwm / 1024:7.1f} MB", flush=True)
    finally:
        stack.stop()
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
