"""How fast one `gokiq-bridge` process drains Sidekiq queues into a Redis broker.

    .venv/bin/python bench/bridge.py [--jobs 100000] [--batch-size 100] [--rounds 3]

Starts its own redis-server on a free port (Sidekiq data in db 0, the Celery broker in db 1),
pushes realistic Sidekiq payloads, runs one bridge process until the Celery queue holds them
all, and prints jobs/s, with the CPU time the bridge and redis-server spent per job (steadier
than wall time on a shared VM). Each round starts from empty databases; the median round is
the result. For scale it also measures raw LPUSH throughput of the same server
(redis-benchmark if installed, else a pipelined LPUSH loop) and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gokiq_celery.sidekiq.store import SidekiqStore  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def payload(n: int, now: float) -> str:
    """What Sidekiq 7 writes for `HardJob.perform_async(...)`, with a few typical extras."""
    return json.dumps(
        {
            "retry": True,
            "queue": "default",
            "args": [n, "user@example.com", {"plan": "pro", "seats": 12, "trial": False}],
            "class": "BillingSyncJob",
            "jid": f"{n:024x}",
            "created_at": now,
            "enqueued_at": now,
            "tags": ["billing"],
            "cattr": {"tenant": "acme", "user_id": 42},
        },
        separators=(",", ":"),
    )


def push_jobs(store: SidekiqStore, count: int) -> None:
    now = time.time()
    for start in range(0, count, 5000):
        store.queues.push(
            "default", *(payload(n, now) for n in range(start, min(count, start + 5000)))
        )


@dataclass
class Round:
    seconds: float
    startup: float
    bridge_cpu: float  # seconds of CPU the bridge process used while draining
    redis_cpu: float  # likewise, redis-server


def drain(port: int, jobs: int, batch_size: int) -> Round:
    """Run one bridge until the broker holds `jobs` messages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOKIQ_", "CELERY_"))}
    env.update(
        REDIS_URL=f"redis://127.0.0.1:{port}/0",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/1",
        GOKIQ_QUEUES="default",
        GOKIQ_SIDEKIQ_VERSION="7",  # no sidecar publishes one here; poll the sets as in production
        PYTHONPATH=str(REPO),
    )
    broker = redis.Redis(port=port, db=1)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "--metrics-port", "0", "--batch-size",
         str(batch_size), "--max-pending", str(10 * jobs), "--log-level", "WARNING"],
        cwd=REPO,
        env=env,
    )  # fmt: skip
    try:
        while broker.llen("default") == 0:  # start-up (imports) is not throughput
            time.sleep(0.001)
        first, cpu0, redis0 = time.perf_counter(), cpu_seconds(proc.pid), redis_cpu(broker)
        while broker.llen("default") < jobs:
            time.sleep(0.005)
        done, cpu1, redis1 = time.perf_counter(), cpu_seconds(proc.pid), redis_cpu(broker)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return Round(done - first, first - started, cpu1 - cpu0, redis1 - redis0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (/proc/<pid>/stat, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def raw_lpush(port: int, count: int) -> float:
    """LPUSH operations per second on the same server."""
    if shutil.which("redis-benchmark"):
        out = subprocess.run(
            ["redis-benchmark", "-p", str(port), "-t", "lpush", "-n", str(count), "-q"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        match = re.search(r"LPUSH: ([\d.]+) requests per second", out)
        if match:
            return float(match.group(1))
    client = redis.Redis(port=port, db=2)
    value = payload(0, time.time())
    start = time.perf_counter()
    with client.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.lpush("bench", value)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    rounds = []
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = start_redis(workdir)
        try:
            store = SidekiqStore(redis.Redis(port=port, db=0))
            for n in range(args.rounds):
                for db in (0, 1):
                    redis.Redis(port=port, db=db).flushdb()  # our own server: start empty
                push_jobs(store, args.jobs)
                result = drain(port, args.jobs, args.batch_size)
                rounds.append(result)
                print(f"round {n + 1}: {args.jobs / result.seconds:,.0f} jobs/s, CPU per job: "
                      f"bridge {1e6 * result.bridge_cpu / args.jobs:.0f} µs, "
                      f"redis {1e6 * result.redis_cpu / args.jobs:.0f} µs", flush=True)  # fmt: skip
            lpush = raw_lpush(port, args.jobs)
        finally:
            proc.terminate()
            proc.wait(10)

    median = sorted(rounds, key=lambda r: r.seconds)[len(rounds) // 2]
    rate = args.jobs / median.seconds
    print(
        f"bridge: {args.jobs} jobs in {median.seconds:.2f}s = {rate:,.0f} jobs/s (median of "
        f"{len(rounds)}, batch {args.batch_size}, start-up {median.startup:.2f}s not counted)"
    )
    print(f"redis raw LPUSH: {lpush:,.0f} ops/s")
    print(f"ratio bridge/LPUSH: {rate / lpush:.2f}")
    print("target: >= 20,000 jobs/s per bridge process")


if __name__ == "__main__":
    main()
