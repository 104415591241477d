"""The ingestion API's speed (issue 15's targets), printed, never asserted.

    .venv/bin/python bench/ingest.py [--seconds 10] [--rounds 1] [--connections 32]
        [--generator asyncio|wrk] [--against GIT-REF] [--only single latency bulk]

One `gokiq-api` process (uvicorn, one event loop) in front of its own redis-server, the real
sidecar on the example app (for `GET /classes`) and a history database (PostgreSQL: the
server on 127.0.0.1:5432 if it answers, else a throwaway cluster; the database made here is
dropped at the end), with a client whose rate limit is too high to throttle and the audit on
(every submission is a log line, an audit row and a history row).

1. Single-job requests/s: `--connections` connections each sending `POST /v1/jobs` as soon as
   the previous answer came (closed loop). Target: >= 2,000 req/s.
2. Latency at half the target load (`--half`, 1,000 req/s): requests sent on a fixed schedule
   (open loop), each timed from when it was due, so a stall counts against every request it
   delayed. Target: p99 <= 20 ms.
3. Bulk jobs/s: 4 connections sending `POST /v1/jobs/bulk` with 1,000 jobs each. Target:
   >= 50,000 jobs/s.

The load generator shares the machine's cores with gokiq-api, so its CPU time is printed next
to gokiq-api's (`client`): when it is the larger, the generator is the bound, not the API.
`--generator asyncio` (default) is this process (asyncio streams on keep-alive connections, no
HTTP library in the way); `--generator wrk` runs the closed loops (1 and 3) with wrk (`apt-get
install wrk`), which costs less CPU per request. The open loop (2) is always this process's.

`--against REF` runs a second gokiq-api from a checkout of REF (a temporary `git worktree`)
on the same Redis, sidecar and database, and measures the two in alternating order in each
round (`before` is REF, `after` this tree): on a shared machine only such a same-run ratio
means anything. Only one of them is under load at a time.

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
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import psycopg  # noqa: E402
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
BULK_CONNECTIONS = 4
SETTLE = 5.0  # seconds between measurements


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the load generators --------------------------------------------------------------------


@dataclass
class Body:
    path: str
    data: bytes

    @classmethod
    def of(cls, path: str, value: dict) -> Body:
        return cls(path, json.dumps(value).encode())

    def request(self) -> bytes:
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(self.data)}\r\n\r\n"
        )
        return head.encode() + self.data


@dataclass
class Load:
    """What one closed loop did: answers by status, its seconds, the generator's CPU."""

    statuses: Counter
    seconds: float
    client_cpu: float

    @property
    def count(self) -> int:
        return sum(self.statuses.values())


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


async def _closed_loop(port: int, raw: bytes, connections: int, seconds: float) -> Counter:
    statuses: Counter = Counter()
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            statuses[await exchange(reader, writer, raw)] += 1
        writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return statuses


def asyncio_closed_loop(port: int, body: Body, connections: int, seconds: float) -> Load:
    """Each connection sends again as soon as it has its answer; statuses counted."""
    cpu = time.process_time()
    statuses = asyncio.run(_closed_loop(port, body.request(), connections, seconds))
    return Load(statuses, seconds, time.process_time() - cpu)


WRK_SCRIPT = """
wrk.method = "POST"
local file = io.open("{body}", "rb")
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("GOKIQ %d %d %d %d\\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""


def wrk_closed_loop(port: int, body: Body, connections: int, seconds: float) -> Load:
    """The same closed loop, run by wrk (one thread): statuses are 2xx, or not."""
    with tempfile.TemporaryDirectory(prefix="gokiq-bench-wrk-") as tmp:
        (Path(tmp) / "body.json").write_bytes(body.data)
        script = Path(tmp) / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=Path(tmp) / "body.json", token=TOKEN))
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                "-s", str(script), f"http://127.0.0.1:{port}{body.path}"]  # fmt: skip
        cpu = children_cpu_seconds()
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        cpu = children_cpu_seconds() - cpu
    found = re.search(r"^GOKIQ (\d+) (\d+) (\d+) (\d+)$", out, re.M)
    if not found:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    requests, micros, bad_status, socket_errors = map(int, found.groups())
    statuses = Counter({"2xx": requests - bad_status, "other": bad_status})
    if socket_errors:
        statuses["socket errors"] = socket_errors
    return Load(+statuses, micros / 1e6, cpu)


GENERATORS = {"asyncio": asyncio_closed_loop, "wrk": wrk_closed_loop}


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


class Api:
    """One gokiq-api process, run from the source tree `tree`."""

    def __init__(self, label: str, tree: Path, env: dict[str, str], log: Path) -> None:
        self.label, self.port = label, free_port()
        self.lines_seen = 0  # of its log, by the round that printed its dropped rows
        env = {**env, "GOKIQ_API_PORT": str(self.port), "PYTHONPATH": str(tree)}
        url = f"http://127.0.0.1:{self.port}"
        argv = [str(VENV_BIN / "python"), "-m", "gokiq_history.api"]
        ready = lambda: _http_ok(url + "/health")  # noqa: E731
        self.service = Service(f"api-{label}", argv, env, log, ready, cwd=tree)

    @property
    def pid(self) -> int:
        return self.service.pid


class Bench:
    def __init__(self, tmp: Path, history_url: str, trees: dict[str, Path]) -> None:
        self.history_url = history_url
        self.redis = start_redis(tmp / "redis")
        sidecar_port = free_port()
        sidecar_url = f"http://127.0.0.1:{sidecar_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("GOKIQ_")}
        env.update(
            REDIS_URL=self.redis.url(0),
            GOKIQ_SIDECAR_URL=sidecar_url,
            GOKIQ_SIDECAR_TOKEN=SIDECAR_TOKEN,
            GOKIQ_EXAMPLE_DB=str(tmp / "example.sqlite3"),
            GOKIQ_HISTORY_URL=history_url,
            GOKIQ_API_CLIENTS=json.dumps([CLIENT]),
            GOKIQ_LOG_LEVEL="warning",  # the audit's log lines are info: not on the terminal
        )
        argv = ["ruby", str(SIDECAR_BIN), "--port", str(sidecar_port)]
        ready = lambda: _http_ok(sidecar_url + "/ready")  # noqa: E731
        self.sidecar = Service("sidecar", argv, env, tmp / "sidecar.log", ready, cwd=EXAMPLE_APP)
        self.apis = [
            Api(label, tree, env, tmp / f"api-{label}.log") for label, tree in trees.items()
        ]

    def start(self) -> Bench:
        self.sidecar.start()
        for api in self.apis:
            api.service.start()
        return self

    def stop(self) -> None:
        for api in self.apis:
            api.service.stop()
        self.sidecar.stop()
        self.redis.process.terminate()
        self.redis.process.wait(10)

    def written_rows(self) -> tuple[int, int]:
        """Rows in the history's job table and in the audit table."""
        with psycopg.connect(self.history_url) as conn:
            jobs = conn.execute("SELECT count(*) FROM gokiq_jobs").fetchone()
            audited = conn.execute("SELECT count(*) FROM gokiq_ingest_audit").fetchone()
        return jobs[0], audited[0]

    def empty_queue(self) -> None:
        """The jobs written so far go: Redis stays small over the rounds."""
        self.redis.client(0).delete("queue:default", "schedule")


# -- the measurements ---------------------------------------------------------------------------

SINGLE = Body.of("/v1/jobs", {"class": "HardJob", "args": [1, "two"]})
BULK = Body.of(
    "/v1/jobs/bulk", {"jobs": [{"class": "HardJob", "args": [n, "two"]} for n in range(BULK_SIZE)]}
)


def measure_single(bench: Bench, api: Api, args) -> dict[str, float]:
    closed_loop = GENERATORS[args.generator]
    closed_loop(api.port, SINGLE, args.connections, 2.0)  # warm-up
    bench.empty_queue()
    cpu = cpu_seconds(api.pid)
    done = closed_loop(api.port, SINGLE, args.connections, args.seconds)
    cpu = cpu_seconds(api.pid) - cpu
    rate = done.count / done.seconds
    print(f"   {api.label:6} single: {rate:8.0f} req/s   (target >= {TARGETS['single']:,.0f}); "
          f"CPU per request: gokiq-api {cpu * 1000 / done.count:.3f} ms, "
          f"{args.generator} client {done.client_cpu * 1000 / done.count:.3f} ms; "
          f"answers {dict(done.statuses)}; {load()}", flush=True)  # fmt: skip
    bench.empty_queue()
    return {"single": rate, "single_cpu_ms": cpu * 1000 / done.count}


def measure_latency(bench: Bench, api: Api, args) -> dict[str, float]:
    latencies, statuses = asyncio.run(
        open_loop(api.port, SINGLE.request(), args.half, args.connections, args.seconds)
    )
    p50, p99 = (percentile(latencies, p) * 1000 for p in (50, 99))
    print(f"   {api.label:6} at {args.half:.0f} req/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"(target p99 <= {TARGETS['p99_ms']:.0f} ms); answers {dict(statuses)}; {load()}",
          flush=True)  # fmt: skip
    bench.empty_queue()
    return {"p50_ms": p50, "p99_ms": p99}


def measure_bulk(bench: Bench, api: Api, args) -> dict[str, float]:
    GENERATORS[args.generator](api.port, BULK, BULK_CONNECTIONS, 1.0)  # warm-up
    bench.empty_queue()
    time.sleep(SETTLE)  # the warm-up's audit and history written
    rows = bench.written_rows()
    cpu = cpu_seconds(api.pid)
    done = GENERATORS[args.generator](api.port, BULK, BULK_CONNECTIONS, args.seconds)
    cpu = cpu_seconds(api.pid) - cpu
    rate = done.count * BULK_SIZE / done.seconds
    time.sleep(SETTLE)  # what the writers still hold is written
    accepted = (done.statuses[200] + done.statuses["2xx"]) * BULK_SIZE
    jobs, audited = (
        after - before for after, before in zip(bench.written_rows(), rows, strict=True)
    )
    print(f"   {api.label:6} bulk:   {rate:8.0f} jobs/s  (target >= {TARGETS['bulk']:,.0f}); "
          f"CPU per 1,000 jobs: gokiq-api {cpu * 1000 / done.count:.1f} ms, "
          f"{args.generator} client {done.client_cpu * 1000 / done.count:.1f} ms; "
          f"answers {dict(done.statuses)}; {load()}", flush=True)  # fmt: skip
    print(f"   {api.label:6} bulk:   of {accepted} jobs accepted, history rows {jobs} "
          f"({accepted - jobs} events dropped), audit rows {audited} "
          f"({accepted - audited} dropped)", flush=True)  # fmt: skip
    bench.empty_queue()
    return {
        "bulk": rate,
        "bulk_cpu_ms": cpu * 1000 / done.count,
        "bulk_history_dropped": accepted - jobs,
        "bulk_audit_dropped": accepted - audited,
    }


MEASUREMENTS = {"single": measure_single, "latency": measure_latency, "bulk": measure_bulk}
FIGURES = {
    "single": ("single", "single_cpu_ms"),
    "latency": ("p50_ms", "p99_ms"),
    "bulk": ("bulk", "bulk_cpu_ms", "bulk_history_dropped", "bulk_audit_dropped"),
}


def run_round(bench: Bench, apis: list[Api], args) -> dict[str, dict[str, float]]:
    """Each measurement for each API in turn (the order given), with a pause before each."""
    figures: dict[str, dict[str, float]] = {api.label: {} for api in apis}
    for measure in (MEASUREMENTS[name] for name in args.only):
        for api in apis:
            time.sleep(SETTLE)  # the audit and history writers catch up: no backlog as load
            figures[api.label].update(measure(bench, api, args))
    for api in apis:
        for line in api.service.lines()[api.lines_seen :]:  # the audit and history are complete
            if "events dropped" in line:  # only without these
                print(f"   {api.label} gokiq-api: {line}", flush=True)
        api.lines_seen = len(api.service.lines())
    return figures


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.2f}x" if before else f"{after:g} vs {before:g}"


def summary(rounds: list[dict[str, dict[str, float]]], labels: list[str], args) -> None:
    """Medians over the rounds, their ratios to the targets and, with two APIs, after/before."""
    figures = [k for name in args.only for k in FIGURES[name]]
    medians = {
        label: {k: statistics.median(r[label][k] for r in rounds) for k in figures}
        for label in labels
    }
    half = args.half
    print(f" medians over {len(rounds)} round(s); {load()}")
    for label, m in medians.items():
        m = {**dict.fromkeys((k for f in FIGURES.values() for k in f), math.nan), **m}
        print(f"   {label:6} single {m['single']:.0f} req/s "
              f"({m['single'] / TARGETS['single']:.2f}x "
              f"target), {m['single_cpu_ms']:.3f} ms CPU each; p50 {m['p50_ms']:.1f} ms, "
              f"p99 {m['p99_ms']:.1f} ms at {half:.0f} req/s "
              f"({m['p99_ms'] / TARGETS['p99_ms']:.2f}x the p99 limit); bulk {m['bulk']:.0f} "
              f"jobs/s ({m['bulk'] / TARGETS['bulk']:.2f}x target), "
              f"{m['bulk_cpu_ms'] / 1000:.4f} ms CPU per job, "
              f"{m['bulk_history_dropped']:.0f} history and {m['bulk_audit_dropped']:.0f} audit "
              f"events dropped per {args.seconds:g} s")  # fmt: skip
    if len(labels) == 2:
        before, after = labels
        ratios = ", ".join(f"{k} {_ratio(medians[after][k], medians[before][k])}" for k in figures)
        print(f"   {after}/{before} (medians): {ratios}")
        for n, r in enumerate(rounds, start=1):
            each = ", ".join(f"{k} {_ratio(r[after][k], r[before][k])}" for k in figures)
            print(f"     round {n}: {each}")


def checkout(ref: str, into: Path) -> Path:
    """A detached worktree of `ref` (removed by `remove_checkout`)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(into), ref],
                   check=True, capture_output=True)  # fmt: skip
    return into


def remove_checkout(tree: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                   check=False, capture_output=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--half", type=float, default=TARGETS["single"] / 2,
                        help="the open loop's requests/s (default: half the target)")  # fmt: skip
    parser.add_argument("--generator", choices=sorted(GENERATORS), default="asyncio")
    parser.add_argument("--against", metavar="REF", help="also run gokiq-api at this git ref")
    parser.add_argument("--only", nargs="+", choices=list(MEASUREMENTS), default=list(MEASUREMENTS),
                        help="these measurements only (default: all)")  # fmt: skip
    args = parser.parse_args()
    if args.generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")
    print(f"ingest: one gokiq-api process, audit and history on; {load()}; "
          f"{os.cpu_count()} CPUs; closed loops by {args.generator}", flush=True)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="gokiq-bench-ingest-"))
    trees = {"api": REPO}
    if args.against:
        trees = {"before": checkout(args.against, tmp / "before"), "after": REPO}
    labels = list(trees)
    rounds = []
    try:
        with pg_admin() as admin, pg_database(admin) as url:
            migrations.upgrade(url)
            bench = Bench(tmp, url, trees).start()
            try:
                for r in range(args.rounds):
                    order = bench.apis if r % 2 == 0 else bench.apis[::-1]
                    print(f" round {r + 1}: {', '.join(a.label for a in order)}", flush=True)
                    rounds.append(run_round(bench, order, args))
            finally:
                bench.stop()
        summary(rounds, labels, args)
    finally:
        if args.against:
            remove_checkout(trees["before"])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
