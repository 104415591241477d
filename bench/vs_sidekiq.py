"""gokiq against real Sidekiq on the same machine, the same Rails app and the same jobs.

    .venv/bin/python bench/vs_sidekiq.py [--rounds 2] [--noop 3000] [--sleep 2000]
                                          [--trickle 150] [--sides ...] [--no-scale-out]
                                          [--against GIT-REF]

Sides, all started once and measured in alternating rounds (each side's order rotates):
  sidekiq      real Sidekiq 6.4.1, `sidekiq -c 20` on the example app
  gokiq-redis  sidecar + `celery -A gokiq_celery worker --concurrency=20` + gokiq-bridge,
               default (INFO) logging, the Celery broker on Redis
  gokiq-amqp   the same on RabbitMQ (a vhost of its own, deleted at the end)
  bare-redis   a bare Celery task (bench/noop_app.py: sleep, one RPUSH) with gokiq's Celery
  bare-amqp    settings on each broker: the bound gokiq rides on
Sidekiq and gokiq get the example app's NoopJob and SleepJob(20), enqueued with the app's own
`Sidekiq::Client.push_bulk`; the bare task gets the same count through Celery's producer.
The amqp sides are skipped, with a message, when no RabbitMQ answers on 127.0.0.1:5672.

Per workload and side it prints jobs/s from the first job done to the last (median of the
rounds), CPU ms per job of each process and their total, pickup latency (enqueued to the job's
start) p50/p99, the ratio to Sidekiq and to the bare task on the same broker. Each side has a
redis-server of its own, so its CPU counts; RabbitMQ's is shown apart and left out of the
total (other users of the server would land in it). Peak RSS (VmHWM) at the end; then the
no-op rate of one gokiq worker (concurrency 20) against two (concurrency 10 each). Everything
shares this machine's cores: compare ratios from one run, never absolute figures across runs.
Nothing here asserts.

`--against REF` adds, for each gokiq side, the same side with its bridge and worker run from a
checkout of REF (a temporary detached `git worktree`; the sidecar stays this tree's), named
`<side>@REF`, measured in the same alternating rounds; each gokiq side's jobs/s and worker and
total CPU per job are then printed as ratios to its `@REF` twin, round by round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from celery import Celery

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import checkout, remove_checkout  # noqa: E402
from bench.noop_app import DONE_KEY  # noqa: E402
from bench.worker import cpu_seconds  # noqa: E402
from tests.conftest import VENV_BIN, free_port, sidekiq_processes  # noqa: E402
from tests.e2e.conftest import (  # noqa: E402
    EXAMPLE_APP,
    Service,
    Stack,
    rabbitmq_missing,
    rabbitmqctl,
    sidekiq_api,
)

QUEUE = "default"
SLEEP_MS = 20
TRICKLE_INTERVAL = 0.02


@dataclass
class Done:
    """One finished job: when it was enqueued, started and finished (epoch seconds)."""

    enqueued: float
    start: float
    end: float


class LogTail:
    """The lines appended to a log file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return data[:end].decode(errors="replace").splitlines()


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class Side:
    """One contender: its processes, how to enqueue to it and how to see its jobs finish."""

    name: str
    broker: str  # "redis", "amqp" or "" (Sidekiq)

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.services: list[Service] = []
        self.enqueued_at: dict[str, float] = {}  # jid -> enqueue time, for the running batch
        self.bulk_at = 0.0

    def start(self) -> None:
        for service in self.services:
            service.start()

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.stack.redis.process.terminate()
        self.stack.redis.process.wait(10)

    def pids(self) -> dict[str, int]:
        return {s.name: s.pid for s in self.services} | {
            "redis-server": self.stack.redis.process.pid
        }

    def push(self, workload: str, n: int) -> None:
        cls, args = ("NoopJob", []) if workload == "noop" else ("SleepJob", [SLEEP_MS])
        self.bulk_at, _jids = sidekiq_api(
            self.stack.env, {"op": "now"}, {"op": "push_bulk", "class": cls, "args": [args] * n}
        )
        self.enqueued_at = {}

    def trickle(self, n: int) -> None:
        [pairs] = sidekiq_api(
            self.stack.env,
            {"op": "trickle", "class": "NoopJob", "n": n, "interval": TRICKLE_INTERVAL},
        )
        self.enqueued_at = {p["jid"]: p["at"] for p in pairs}

    def finished(self) -> list[Done]:
        """Jobs finished since the last call."""
        raise NotImplementedError

    def _done(self, jid: str, start: float, end: float) -> Done:
        return Done(self.enqueued_at.get(jid, self.bulk_at), start, end)


class SidekiqSide(Side):
    name, broker = "sidekiq", ""
    # Sidekiq 6's default job log line: "<time> pid= tid= class= jid= elapsed= INFO: done"
    DONE = re.compile(r"^(\S+) pid=\d+ tid=\S+ class=\S+ jid=(\S+) elapsed=([\d.]+) INFO: done")

    def __init__(self, stack: Stack) -> None:
        super().__init__(stack)
        log = stack.tmp / "logs" / "sidekiq.log"
        self.sidekiq = Service(
            "sidekiq",
            ["sidekiq", "-c", "20", "-q", QUEUE],
            stack.env,
            log,
            # Ready once Sidekiq's API lists it (its first heartbeat, after the boot).
            lambda: bool(sidekiq_processes(stack.redis_url)["processes"]),
            cwd=EXAMPLE_APP,
            ready_timeout=180,
        )
        self.services = [self.sidekiq]
        self.tail = LogTail(log)

    def finished(self) -> list[Done]:
        out = []
        for line in self.tail.new_lines():
            if m := self.DONE.match(line):
                end = ts(m[1])
                out.append(self._done(m[2], end - float(m[3]), end))
        return out


class GokiqSide(Side):
    def __init__(self, stack: Stack, broker: str, concurrency: int = 20) -> None:
        super().__init__(stack)
        self.name, self.broker = f"gokiq-{broker}", broker
        stack.worker.argv = [
            *(a for a in stack.worker.argv if not a.startswith("--concurrency")),
            f"--concurrency={concurrency}",
        ]
        self.services = list(stack.services)
        self.tail = LogTail(stack.sidecar.log)

    def finished(self) -> list[Done]:
        out = []
        for line in self.tail.new_lines():
            if not line.startswith("{") or '"job done"' not in line:
                continue
            entry = json.loads(line)
            end = ts(entry["ts"])
            out.append(self._done(entry["jid"], end - float(entry["duration"]), end))
        return out


class BareSide(Side):
    """gokiq's Celery app and settings running bench/noop_app.py's task: no sidecar, no bridge."""

    def __init__(self, stack: Stack, broker: str) -> None:
        super().__init__(stack)
        self.name, self.broker = f"bare-{broker}", broker
        env = {**stack.env, "BENCH_DONE_URL": stack.redis_url, "PYTHONPATH": str(REPO)}
        argv = [str(VENV_BIN / "celery"), "-A", "bench.noop_app", "worker", "--concurrency=20"]
        argv += ["-Q", QUEUE, "-n", f"bare-{broker}-{stack.worker_port}@%h"]
        self.worker = Service(
            "worker",
            argv,
            env,
            stack.tmp / "logs" / "worker.log",
            stack.worker.ready,  # its /metrics, on the stack's worker port
        )
        self.services = [self.worker]
        self.app = Celery("bench-client", broker=stack.env["CELERY_BROKER_URL"])
        self.redis = stack.sidekiq_redis
        self.seen = 0

    def stop(self) -> None:
        self.app.close()
        super().stop()

    def _send(self, ms: float, n: int, interval: float = 0.0) -> None:
        with self.app.producer_or_acquire() as producer:
            for _ in range(n):
                self.app.send_task("bench.bare", (ms, time.time()), queue=QUEUE, producer=producer)
                if interval:
                    time.sleep(interval)

    def push(self, workload: str, n: int) -> None:
        self._send(0 if workload == "noop" else SLEEP_MS, n)

    def trickle(self, n: int) -> None:
        self._send(0, n, TRICKLE_INTERVAL)

    def finished(self) -> list[Done]:
        raw = self.redis.lrange(DONE_KEY, self.seen, -1)
        self.seen += len(raw)
        return [Done(*map(float, item.split())) for item in raw]


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Round:
    rate: float  # jobs/s, first done to last done
    cpu_ms: dict[str, float]  # per process, CPU ms per job
    shared_cpu_ms: float  # RabbitMQ's CPU ms per job (not the side's alone)
    p50: float  # pickup latency, ms
    p99: float


@dataclass
class Result:
    rounds: list[Round] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.rounds)

    def cpu(self, name: str) -> float:
        return statistics.median(r.cpu_ms.get(name, 0.0) for r in self.rounds)

    def total_cpu(self) -> float:
        return statistics.median(sum(r.cpu_ms.values()) for r in self.rounds)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def rabbitmq_pid() -> int | None:
    found = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True).stdout
    return int(found.split()[0]) if found.split() else None


def measure(side: Side, workload: str, n: int, timeout: float) -> Round:
    side.finished()  # forget whatever finished before (warm-up, earlier rounds)
    pids = side.pids()
    beam = rabbitmq_pid() if side.broker == "amqp" else None
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    beam0 = cpu_seconds(beam) if beam else 0.0
    if workload == "trickle":
        side.trickle(n)
    else:
        side.push(workload, n)
    done: list[Done] = []
    deadline = time.monotonic() + timeout
    while len(done) < n:
        done += side.finished()
        if time.monotonic() > deadline:
            raise SystemExit(f"{side.name} {workload}: {len(done)} of {n} done after {timeout}s")
        time.sleep(0.1)
    cpu = {name: (cpu_seconds(pid) - cpu0[name]) * 1000 / n for name, pid in pids.items()}
    shared = (cpu_seconds(beam) - beam0) * 1000 / n if beam else 0.0
    latencies = [(d.start - d.enqueued) * 1000 for d in done]
    ends = [d.end for d in done]
    return Round(
        n / max(max(ends) - min(ends), 1e-3),
        cpu,
        shared,
        statistics.median(latencies),
        percentile(latencies, 99),
    )


def warm_up(side: Side) -> None:
    measure(side, "noop", 100, timeout=120)


def peak_rss_mb(side: Side) -> dict[str, float]:
    out = {}
    for name, pid in side.pids().items():
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out[name] = int(line.split()[1]) / 1024
    return out


# -- building the sides ----------------------------------------------------------------------


class Vhosts:
    """RabbitMQ vhosts made for this run, deleted at the end."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def new(self) -> str:
        vhost = f"gokiq-bench-{secrets.token_hex(4)}"
        created = rabbitmqctl("add_vhost", vhost)
        if created.returncode != 0:
            raise SystemExit(f"cannot create a RabbitMQ vhost: {created.stderr.strip()[:200]}")
        self.made.append(vhost)
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"

    def delete_all(self) -> None:
        for vhost in self.made:
            rabbitmqctl("delete_vhost", vhost)


def make_side(name: str, tmp: Path, vhosts: Vhosts, trees: dict[str, Path] | None = None) -> Side:
    """The side `name`; `<gokiq side>@REF` runs its bridge and worker from `trees[REF]`."""
    base, _, ref = name.partition("@")
    broker = base.rpartition("-")[2]
    extra = {"CELERY_BROKER_URL": vhosts.new()} if broker == "amqp" else {}
    tree = (trees or {}).get(ref) if ref else None
    if ref and (tree is None or not base.startswith("gokiq")):
        raise SystemExit(f"{name}: only a gokiq side can run from another ref (--against)")
    if tree is not None:
        extra["PYTHONPATH"] = str(tree)  # ahead of this tree's editable install
    stack = Stack(tmp / name.replace("@", "-at-"), extra)
    if name == "sidekiq":
        return SidekiqSide(stack)
    if base.startswith("gokiq"):
        side = GokiqSide(stack, broker)
        side.name = name
        for service in (stack.bridge, stack.worker):
            service.cwd = tree or service.cwd  # Celery imports from its working directory
        return side
    return BareSide(stack, broker)


# -- printing --------------------------------------------------------------------------------


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:5.2f}x" if b else "    - "


def print_workload(workload: str, results: dict[str, Result]) -> None:
    print(f"\n== {workload} ==", flush=True)
    head = f"{'side':<12} {'jobs/s':>8} {'rounds':<17} {'CPU ms/job':>10} {'p50 ms':>8}"
    print(f"{head} {'p99 ms':>8} {'xSidekiq':>8} {'xbare':>6}  CPU ms/job per process")
    sidekiq = results.get("sidekiq")
    for name, res in results.items():
        rate = res.median("rate")
        broker = name.partition("@")[0].rpartition("-")[2]
        bare = results.get(f"bare-{broker}") if name.startswith("gokiq") else None
        per_proc = " ".join(f"{p} {res.cpu(p):.2f}" for p in res.rounds[0].cpu_ms)
        shared = res.median("shared_cpu_ms")
        if shared:
            per_proc += f" (+ rabbitmq {shared:.2f}, shared server, not in the total)"
        rounds = "/".join(f"{r.rate:.0f}" for r in res.rounds)
        print(
            f"{name:<12} {rate:8.0f} {rounds:<17} {res.total_cpu():10.2f} {res.median('p50'):8.1f} "
            f"{res.median('p99'):8.1f} {ratio(rate, sidekiq and sidekiq.median('rate')):>8} "
            f"{ratio(rate, bare and bare.median('rate')):>6}  {per_proc}",
            flush=True,
        )
    if sidekiq:
        base = sidekiq.total_cpu()
        cpu = ", ".join(
            f"{n} {r.total_cpu() / base:.1f}x" for n, r in results.items() if n != "sidekiq"
        )
        print(f"CPU per job against Sidekiq's: {cpu}", flush=True)


def print_against(workload: str, results: dict[str, Result], ref: str) -> None:
    """Each gokiq side against its twin run from `ref`, round by round (same-run ratios)."""
    for name, res in results.items():
        before = results.get(f"{name}@{ref}")
        if before is None:
            continue
        pairs = list(zip(res.rounds, before.rounds, strict=True))
        figures = {
            "jobs/s": [a.rate / b.rate for a, b in pairs],
            "worker CPU/job": [a.cpu_ms["worker"] / b.cpu_ms["worker"] for a, b in pairs],
            "total CPU/job": [sum(a.cpu_ms.values()) / sum(b.cpu_ms.values()) for a, b in pairs],
        }
        text = "; ".join(
            f"{k} {statistics.median(v):.2f}x ({'/'.join(f'{x:.2f}' for x in v)})"
            for k, v in figures.items()
        )
        print(f"{workload}: {name} / {name}@{ref}: {text}", flush=True)


def print_rss(sides: list[Side]) -> None:
    print("\n== peak RSS (VmHWM), MB ==", flush=True)
    for side in sides:
        rss = peak_rss_mb(side)
        own = sum(v for k, v in rss.items() if k != "redis-server")
        detail = " ".join(f"{k} {v:.0f}" for k, v in rss.items())
        print(f"{side.name:<12} {own:6.0f} without redis-server  ({detail})", flush=True)


def scale_out(side: GokiqSide, n: int) -> None:
    """No-op rate of the side's worker at concurrency 20 against two workers at 10 each."""
    print(f"\n== scale-out, {side.name}, {n} no-op jobs ==", flush=True)
    one = measure(side, "noop", n, timeout=600)
    stack = side.stack
    worker = stack.worker
    worker.stop()
    worker.argv = [a.replace("--concurrency=20", "--concurrency=10") for a in worker.argv]
    second_port = free_port()
    argv = [a.replace(f"e2e-{stack.worker_port}@", f"e2e-{second_port}@") for a in worker.argv]
    second = Service(
        "worker2",
        argv,
        {**stack.env, "GOKIQ_WORKER_METRICS_PORT": str(second_port)},
        stack.tmp / "logs" / "worker2.log",
        lambda: any("ready." in line for line in second.lines()),
        ready_timeout=120,
    )
    worker.start()
    second.start()
    side.services.append(second)
    warm_up(side)
    two = measure(side, "noop", n, timeout=600)
    print(f"one worker, concurrency 20: {one.rate:6.0f} jobs/s, {sum(one.cpu_ms.values()):.2f} ms")
    print(f"two workers, 10 each:       {two.rate:6.0f} jobs/s, {sum(two.cpu_ms.values()):.2f} ms")
    print(f"two / one: {two.rate / one.rate:.2f}x", flush=True)


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per workload (default 2)")
    parser.add_argument("--noop", type=int, default=3000, help="no-op jobs a round (3000)")
    parser.add_argument("--sleep", type=int, default=2000, help="20 ms jobs a round (2000)")
    parser.add_argument("--trickle", type=int, default=150, help="trickled jobs (150, 0: none)")
    parser.add_argument(
        "--sides",
        default="sidekiq,gokiq-redis,gokiq-amqp,bare-redis,bare-amqp",
        help="comma-separated subset of the sides",
    )
    parser.add_argument("--no-scale-out", action="store_true", help="skip the scale-out run")
    parser.add_argument("--quick", action="store_true", help="1 round of 600/400/50 jobs")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with the logs")
    parser.add_argument(
        "--against",
        metavar="REF",
        help="also run each gokiq side's bridge and worker from this git ref (<side>@REF)",
    )
    opts = parser.parse_args()
    if opts.quick:
        opts.rounds, opts.noop, opts.sleep, opts.trickle = 1, 600, 400, 50
    return opts


def wanted_sides(opts: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in opts.sides.split(",") if n.strip()]
    missing = rabbitmq_missing() if any(n.endswith("amqp") for n in names) else None
    if missing:
        print(f"skipping the RabbitMQ sides: {missing}", flush=True)
        names = [n for n in names if not n.endswith("amqp")]
    return names


@contextlib.contextmanager
def started(
    names: list[str], tmp: Path, trees: dict[str, Path] | None = None
) -> Iterator[list[Side]]:
    vhosts = Vhosts()
    sides: list[Side] = []
    try:
        for name in names:
            print(f"starting {name} ...", flush=True)
            side = make_side(name, tmp, vhosts, trees)
            sides.append(side)
            side.start()
            warm_up(side)
        yield sides
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                side.stop()
        vhosts.delete_all()


def main() -> None:
    opts = parse_args()
    names = wanted_sides(opts)
    tmp = Path(tempfile.mkdtemp(prefix="gokiq-vs-sidekiq-"))
    print(f"logs in {tmp}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}", flush=True)
    workloads = [("noop", opts.noop), ("sleep", opts.sleep)]
    trees: dict[str, Path] = {}
    if opts.against:
        trees[opts.against] = checkout(opts.against, tmp / "against")
        names += [f"{n}@{opts.against}" for n in names if n.startswith("gokiq")]
    try:
        with started(names, tmp, trees) as sides:
            results = {
                w: {s.name: Result() for s in sides} for w, _ in [*workloads, ("trickle", 0)]
            }
            for r in range(opts.rounds):
                order = sides[r % len(sides) :] + sides[: r % len(sides)]
                for workload, n in workloads:
                    for side in order:
                        results[workload][side.name].rounds.append(measure(side, workload, n, 600))
            if opts.trickle:
                for side in sides:
                    results["trickle"][side.name].rounds.append(
                        measure(side, "trickle", opts.trickle, 600)
                    )
            for workload, _ in workloads:
                print_workload(
                    f"{workload}: {dict(workloads)[workload]} jobs a round", results[workload]
                )
            if opts.against:
                print(f"\n== against {opts.against} (same rounds) ==", flush=True)
                for workload, _ in workloads:
                    print_against(workload, results[workload], opts.against)
            if opts.trickle:
                print_workload(
                    f"trickle: {opts.trickle} no-op jobs, one every 20 ms (pickup latency)",
                    results["trickle"],
                )
            print_rss(sides)
            gokiq = [s for s in sides if isinstance(s, GokiqSide) and "@" not in s.name]
            if gokiq and not opts.no_scale_out:
                scale_out(gokiq[-1], opts.noop)
    finally:
        for tree in trees.values():
            remove_checkout(tree)
        if not opts.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
