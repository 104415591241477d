"""The ingestion API's speed (issue 15's targets), printed, never asserted.

    .venv/bin/python bench/ingest.py [--seconds 10] [--rounds 1] [--connections 32]

One `gokiq-api` process (uvicorn, one event loop) in front of its own redis-server, the real
sidecar on the example app (for `GET /classes`) and a history database (PostgreSQL: the
server on 127.0.0.1:5432 if it answers, else a throwaway cluster; the database made here is
dropped at the end), with a client whose rate limit is too high to throttle and the audit on
(every submission is a log line, an audit row and a history row). The load generator is this
process: asyncio streams on keep-alive connections, no HTTP library in the way.

1. Single-job requests/s: `--connections` connections each sending `POST /v1/jobs` as soon as
   the previous answer came (closed loop). Target: >= 2,000 req/s.
2. Latency at half the load of 1: requests sent on a fixed schedule (open loop), each timed
   from when it was due, so a stall counts against every request it delayed. Target: p99 <=
   20 ms.
3. Bulk jobs/s: 4 connections sending `POST /v1/jobs/bulk` with 1,000 jobs each. Target:
   >= 50,000 jobs/s.

Each measurement starts `SETTLE` seconds after the last, once gokiq-api's audit and history
writers have caught up with what the last one left them (run right after the bulk load, the
latency's p99 was that backlog's, ~180 ms, against ~10 ms after a pause).

The machine is shared: the load average is printed with the figures, and only figures of the
same run compare. The CPU time gokiq-api spent per request (all its threads, from /proc) moves
less with the machine's load than the rates do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from e2e import percentile  # noqa: E402

from gokiq_history import migrations  # noqa: E402
from tests.conftest import VENV_BIN, free_port, start_redis  # noqa: E402
from tests.e2e.conftest import EXAMPLE_APP, SIDECAR_BIN, Service, _http_ok  # noqa: E402
from tests.history_support import pg_admin, pg_database  # noqa: E402

TOKEN = "bench-ingest-token-0123456789"
SIDECAR_TOKEN = "bench-ingest-sidecar-token"
CLIENT = {"name": "bench", "token": TOKEN, "classes": ["HardJob"], "queues": ["default"],
          "rate": 10_000_000, "burst": 10_000_000}  # fmt: skip
TARGETS = {"single": 2000.0, "bulk": 50_000.0, "p99_ms": 20.0}
BULK_SIZE = 1000
SETTLE = 5.0  # seconds between measurements


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the load generator ---------------------------------------------------------------------


def request(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def exchange(reader: asyncio.StreamReader, writer, raw: bytes) -> int:
    """Send one request, read its whole answer; its status."""
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def closed_loop(port: int, raw: bytes, connections: int, seconds: float) -> Counter:
    """Each connection sends again as soon as it has its answer; statuses counted."""
    statuses: Counter = Counter()
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            statuses[await exchange(reader, writer, raw)] += 1
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


async def open_loop(
    port: int, raw: bytes, rate: float, connections: int, seconds: float
) -> tuple[list[float], Counter]:
    """`rate` requests/s on a fixed schedule spread over the connections; each latency from
    the moment its request was due."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    start = time.perf_counter() + 0.2
    interval = connections / rate  # per connection

    async def connection(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        due = start + n * interval / connections
        while due < start + seconds:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            statuses[await exchange(reader, writer, raw)] += 1
            latencies.append(time.perf_counter() - due)
            due += interval
        writer.close()

    await asyncio.gather(*(connection(n) for n in range(connections)))
    return latencies, statuses


# -- the processes ----------------------------------------------------------------------------


class Bench:
    def __init__(self, tmp: Path, history_url: str) -> None:
        self.redis = start_redis(tmp / "redis")
        sidecar_port, self.port = free_port(), free_port()
        sidecar_url = f"http://127.0.0.1:{sidecar_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GOKIQ_")}
        env.update(
            REDIS_URL=self.redis.url(0),
            GOKIQ_SIDECAR_URL=sidecar_url,
            GOKIQ_SIDECAR_TOKEN=SIDECAR_TOKEN,
            GOKIQ_EXAMPLE_DB=str(tmp / "example.sqlite3"),
            GOKIQ_HISTORY_URL=history_url,
            GOKIQ_API_PORT=str(self.port),
            GOKIQ_API_CLIENTS=json.dumps([CLIENT]),
            GOKIQ_LOG_LEVEL="warning",  # the audit's log lines are info: not on the terminal
        )
        argv = ["ruby", str(SIDECAR_BIN), "--port", str(sidecar_port)]
        ready = lambda: _http_ok(sidecar_url + "/ready")  # noqa: E731
        self.sidecar = Service("sidecar", argv, env, tmp / "sidecar.log", ready, cwd=EXAMPLE_APP)
        api_url = f"http://127.0.0.1:{self.port}"
        ready = lambda: _http_ok(api_url + "/health")  # noqa: E731
        self.api = Service("api", [str(VENV_BIN / "gokiq-api")], env, tmp / "api.log", ready)

    def start(self) -> Bench:
        self.sidecar.start()
        self.api.start()
        return self

    def stop(self) -> None:
        self.api.stop()
        self.sidecar.stop()
        self.redis.process.terminate()
        self.redis.process.wait(10)

    def empty_queue(self) -> None:
        """The jobs written so far go: Redis stays small over the rounds."""
        self.redis.client(0).delete("queue:default", "schedule")


def run_round(bench: Bench, seconds: float, connections: int) -> dict[str, float]:
    single = request("/v1/jobs", {"class": "HardJob", "args": [1, "two"]})
    jobs = [{"class": "HardJob", "args": [n, "two"]} for n in range(BULK_SIZE)]
    bulk = request("/v1/jobs/bulk", {"jobs": jobs})

    asyncio.run(closed_loop(bench.port, single, connections, 2.0))  # warm-up
    bench.empty_queue()
    cpu = cpu_seconds(bench.api.pid)
    statuses = asyncio.run(closed_loop(bench.port, single, connections, seconds))
    cpu = cpu_seconds(bench.api.pid) - cpu
    single_rate = sum(statuses.values()) / seconds
    print(f"   single: {single_rate:8.0f} req/s   (target >= {TARGETS['single']:,.0f}); "
          f"gokiq-api CPU {cpu * 1000 / sum(statuses.values()):.2f} ms per request; "
          f"answers {dict(statuses)}; {load()}", flush=True)  # fmt: skip
    bench.empty_queue()

    time.sleep(SETTLE)  # the audit and history writers catch up: their backlog is no load
    half = single_rate / 2
    latencies, statuses = asyncio.run(open_loop(bench.port, single, half, connections, seconds))
    p50, p99 = (percentile(latencies, p) * 1000 for p in (50, 99))
    print(f"   at {half:.0f} req/s (half): p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"(target p99 <= {TARGETS['p99_ms']:.0f} ms); answers {dict(statuses)}; {load()}",
          flush=True)  # fmt: skip
    bench.empty_queue()

    time.sleep(SETTLE)  # the audit and history writers catch up: their backlog is no load
    cpu = cpu_seconds(bench.api.pid)
    statuses = asyncio.run(closed_loop(bench.port, bulk, 4, seconds))
    cpu = cpu_seconds(bench.api.pid) - cpu
    bulk_rate = sum(statuses.values()) * BULK_SIZE / seconds
    print(f"   bulk:   {bulk_rate:8.0f} jobs/s  (target >= {TARGETS['bulk']:,.0f}); "
          f"gokiq-api CPU {cpu * 1000 / sum(statuses.values()):.1f} ms per 1,000 jobs; "
          f"answers {dict(statuses)}; {load()}", flush=True)  # fmt: skip
    bench.empty_queue()
    for line in bench.api.lines():  # the audit and history are complete only without these
        if "events dropped" in line:
            print(f"   gokiq-api: {line}", flush=True)
    return {"single": single_rate, "bulk": bulk_rate, "p50_ms": p50, "p99_ms": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    print(f"ingest: one gokiq-api process, audit and history on; {load()}; "
          f"{os.cpu_count()} CPUs", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="gokiq-bench-ingest-"))
    with pg_admin() as admin, pg_database(admin) as url:
        migrations.upgrade(url)
        bench = Bench(tmp, url).start()
        try:
            for r in range(args.rounds):
                print(f" round {r + 1}", flush=True)
                run_round(bench, args.seconds, args.connections)
        finally:
            bench.stop()
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
