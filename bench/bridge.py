"""How fast one `gokiq-bridge` process drains Sidekiq queues into a Redis broker.

    .venv/bin/python bench/bridge.py [--jobs 100000] [--batch-size 100]

Starts its own redis-server on a free port (Sidekiq data in db 0, the Celery broker in db 1),
pushes realistic Sidekiq payloads, runs one bridge process until the Celery queue holds them
all, and prints jobs/s. For scale it also measures raw LPUSH throughput of the same server
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
        store.push("default", *(payload(n, now) for n in range(start, min(count, start + 5000))))


def drain(port: int, jobs: int, batch_size: int) -> tuple[float, float]:
    """Run one bridge until the broker holds `jobs` messages. Returns (seconds, startup)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOKIQ_", "CELERY_"))}
    env.update(
        REDIS_URL=f"redis://127.0.0.1:{port}/0",
        CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/1",
        GOKIQ_QUEUES="default",
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
        first = time.perf_counter()
        while broker.llen("default") < jobs:
            time.sleep(0.005)
        done = time.perf_counter()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return done - first, first - started


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
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        proc, port = start_redis(workdir)
        try:
            store = SidekiqStore(redis.Redis(port=port, db=0))
            push_jobs(store, args.jobs)
            seconds, startup = drain(port, args.jobs, args.batch_size)
            rate = args.jobs / seconds
            lpush = raw_lpush(port, args.jobs)
        finally:
            proc.terminate()
            proc.wait(10)

    print(f"bridge: {args.jobs} jobs in {seconds:.2f}s = {rate:,.0f} jobs/s "
          f"(batch {args.batch_size}, start-up {startup:.2f}s not counted)")  # fmt: skip
    print(f"redis raw LPUSH: {lpush:,.0f} ops/s")
    print(f"ratio bridge/LPUSH: {rate / lpush:.2f}")
    print("target: >= 20,000 jobs/s per bridge process")


if __name__ == "__main__":
    main()
