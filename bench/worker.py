"""Worker throughput per Celery pool: gokiq.perform against a stand-in sidecar vs a task that
makes no HTTP call, on the same worker command line, in the same run.

    .venv/bin/python bench/worker.py [--n 3000] [--pools threads,prefork] [--rounds 5]

Prints tasks/s for both, their ratio, the worker's RSS (the main process plus its pool
children), and the CPU time per task of the worker, the stand-in sidecar and redis-server
(everything shares this machine's cores, so a busy stand-in slows the worker down). Each
round runs both tasks, which one first alternating between rounds; the median ratio is the
result. Targets from the issue: the default pool keeps >= 70% of the no-HTTP rate with RSS
<= 150 MB. Nothing here asserts; it measures.

The measured tasks are published into another Redis database first and handed to the worker
in one MOVE, so the clock covers the worker's run of every one of them (a worker consuming
while they are published drains most of them before any clock could start). A run counts only
when the worker ran exactly the tasks it was given: the stand-in sidecar's count of jobs it was
asked to run (gokiq.perform), the worker's own count of tasks it started (`inspect stats`).
A run that does not says so, with no rate.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gokiq_celery.messages import TASK_NAME, new_delivery_token, publish_options  # noqa: E402
from gokiq_celery.sidekiq import Job, SidekiqStore  # noqa: E402
from tests.conftest import free_port, start_redis  # noqa: E402
from tests.stand_in_sidecar import TOKEN  # noqa: E402

QUEUE = "bench"
BROKER_DB = 3  # the worker's broker
STAGING_DB = 4  # where the measured tasks wait until they are handed to the worker at once
RUN_TIMEOUT = 300  # seconds a measurement may take before it counts as failed


class RunFailed(Exception):
    """The worker did not run exactly the tasks it was given: there is no rate to report."""


@dataclass
class Run:
    rate: float  # tasks/s
    rss: float  # peak MB
    cpu: dict[str, float]  # CPU seconds per task: worker, sidecar, redis
    brpops: float = 0.0  # the worker's BRPOP calls per task (kombu's: one per message)


@dataclass
class RunCounts:
    """What really ran so far, by the parties that saw it."""

    sidecar: int  # jobs the stand-in sidecar was asked to run
    worker: int  # tasks the worker started

    def since(self, before: RunCounts) -> RunCounts:
        return RunCounts(self.sidecar - before.sidecar, self.worker - before.worker)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children so far (/proc/<pid>/stat)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def brpop_calls(client: redis.Redis) -> int:
    """BRPOP calls redis-server answered so far (its command statistics)."""
    return int(client.info("commandstats").get("cmdstat_brpop", {}).get("calls", 0))


def rss_mb(pid: int) -> float:
    """RSS of a process and its children, in MB."""
    pids = [pid, *_children(pid)]
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(k) for k in found.split()]
    return kids + [grandchild for kid in kids for grandchild in _children(kid)]


def publish(
    app, task_name: str, n: int, store: SidekiqStore, job_class: str = "OkJob", job_args=None
) -> None:
    """Publish as the bridge does: a gokiq.perform message carries a delivery-ledger token.
    `job_args` (default: the job's index) tells the stand-in sidecar what to do (SlowJob)."""
    with app.producer_or_acquire() as producer:
        for i in range(n):
            job = Job.build(
                {
                    "class": job_class,
                    "args": [i] if job_args is None else job_args,
                    "jid": f"{i:024x}",
                    "retry": True,
                    "queue": QUEUE,
                    "created_at": time.time(),
                }
            )
            options, kwargs = {}, {}
            if task_name == TASK_NAME:
                token = new_delivery_token()
                store.ledger.record([(token, QUEUE, job.text)], time.time() + 600)
                options, kwargs = publish_options(job, QUEUE), {"delivery": token}
            app.send_task(
                task_name,
                args=(job.text, QUEUE),
                kwargs=kwargs,
                queue=QUEUE,
                producer=producer,
                **options,
            )


def drained(broker: redis.Redis) -> bool:
    return broker.llen(QUEUE) == 0 and broker.hlen("unacked") == 0


def sidecar_runs(sidecar) -> int:
    answer = requests.get(
        f"{sidecar.url}/runs", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    answer.raise_for_status()
    return int(answer.json()["execute"])


def worker_starts(app) -> int:
    """Tasks the worker has started (Celery counts them by name as it accepts each; a
    gokiq.perform task is named after its job's class)."""
    replies = app.control.inspect(timeout=10, limit=1).stats() or {}
    if not replies:
        raise RunFailed("the worker did not answer `inspect stats`")
    (stats,) = replies.values()
    return sum(stats.get("total", {}).values())


def counts(app, sidecar) -> RunCounts:
    return RunCounts(sidecar_runs(sidecar), worker_starts(app))


def check_ran(task_name: str, n: int, ran: RunCounts) -> None:
    """Raise RunFailed unless the worker started `n` tasks and, for gokiq.perform, the sidecar
    was asked to run `n` jobs (a job skipped by the delivery ledger or failing before its call
    is acked all the same, so a drained queue alone says nothing)."""
    expected = RunCounts(n if task_name == TASK_NAME else 0, n)
    if ran != expected:
        raise RunFailed(
            f"{task_name}: {n} published, the worker started {ran.worker}, "
            f"the sidecar was asked to run {ran.sidecar} (expected {expected.sidecar})"
        )


def wait_drained(broker: redis.Redis, worker: subprocess.Popen, on_poll=None) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not drained(broker):
        if worker.poll() is not None:
            raise RunFailed(f"the worker exited (status {worker.returncode})")
        if time.monotonic() > deadline:
            raise RunFailed(f"the worker did not drain its queue in {RUN_TIMEOUT} s")
        if on_poll is not None:
            on_poll()
        time.sleep(0.05)


def run_one(
    pool: str,
    task_name: str,
    n: int,
    server,
    sidecar,
    repo: Path = REPO,
    job: tuple[str, list | None] = ("OkJob", None),
    profile: Path | None = None,
) -> Run:
    """One measured run of a fresh worker started from the tree `repo` (bench/redis_pop.py
    compares two trees), on `n` jobs of the stand-in sidecar's class and args `job`; with
    `profile`, py-spy records the worker's GIL holders over the measured part into that file."""
    from celery import Celery

    broker, staging = server.client(BROKER_DB), server.client(STAGING_DB)
    for db in (BROKER_DB, STAGING_DB, 2):
        server.client(db).flushdb()
    client_app = Celery("bench-client", broker=server.url(BROKER_DB))
    staging_app = Celery("bench-staging", broker=server.url(STAGING_DB))
    env = {
        **os.environ,
        "REDIS_URL": server.url(2),
        "CELERY_BROKER_URL": server.url(BROKER_DB),
        "GOKIQ_SIDECAR_URL": sidecar.url,
        "GOKIQ_SIDECAR_TOKEN": TOKEN,
        "GOKIQ_QUEUES": QUEUE,
        "GOKIQ_WORKER_POOL": pool,
        "GOKIQ_SIDEKIQ_VERSION": "7",  # the stand-in sidecar publishes none; beat as in production
        "GOKIQ_WORKER_METRICS_PORT": "0",
        "GOKIQ_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(repo),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.noop_app",
            "worker",
            f"--pool={pool}",
            "--concurrency=20",
            "-Q",
            QUEUE,
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
        ],
        env=env,
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        store = SidekiqStore(server.client(2))
        warm_up = 200  # connections, imports, children
        sidecar_before = sidecar_runs(sidecar)  # the stand-in serves every run
        publish(client_app, task_name, warm_up, store, *job)
        wait_drained(broker, worker)
        before_counts = counts(client_app, sidecar)
        check_ran(task_name, warm_up, before_counts.since(RunCounts(sidecar_before, 0)))
        publish(staging_app, task_name, n, store, *job)
        if staging.llen(QUEUE) != n:
            raise RunFailed(f"{staging.llen(QUEUE)} of {n} tasks reached the staging queue")
        pids = {"worker": worker.pid, "sidecar": sidecar.pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        before["redis"] = redis_cpu(broker)
        brpops = brpop_calls(broker)
        peak = [rss_mb(worker.pid)]
        spy = None if profile is None else _py_spy(worker.pid, profile)
        started = time.monotonic()
        staging.move(QUEUE, BROKER_DB)  # every task at once; a blocked BRPOP wakes on it
        wait_drained(broker, worker, lambda: peak.append(rss_mb(worker.pid)))
        elapsed = time.monotonic() - started
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            spy.wait(60)
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        after["redis"] = redis_cpu(broker)
        brpops = brpop_calls(broker) - brpops
        check_ran(task_name, n, counts(client_app, sidecar).since(before_counts))
        cpu = {name: (after[name] - before[name]) / n for name in before}
        return Run(n / elapsed, max(*peak, rss_mb(worker.pid)), cpu, brpops / n)
    finally:
        worker.terminate()
        worker.wait(30)


def _py_spy(pid: int, out: Path) -> subprocess.Popen:
    """py-spy sampling the GIL holder of `pid` (raw folded stacks into `out`), started once
    it samples: its start-up must not fall into the measured part as missing samples."""
    spy = subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--gil", "--nonblocking",
         "--format", "raw", "--rate", "500", "-o", str(out), "--pid", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1.0)
    return spy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="tasks per measurement")
    parser.add_argument("--pools", default="threads,prefork", help="Celery pools to compare")
    parser.add_argument("--rounds", type=int, default=5, help="measurements of each task")
    args = parser.parse_args()
    import tempfile

    server = start_redis(Path(tempfile.mkdtemp(prefix="gokiq-bench-")))
    port = free_port()
    sidecar = subprocess.Popen(
        [sys.executable, "-m", "tests.stand_in_sidecar", "--port", str(port)], cwd=REPO
    )
    sidecar.url = f"http://127.0.0.1:{port}"
    try:
        time.sleep(0.5)
        print(f"{'pool':8} {'task':14} {'tasks/s':>8} {'RSS MB':>7}   CPU µs/task: "
              f"{'worker':>6} {'sidecar':>7} {'redis':>6}")  # fmt: skip
        for pool in args.pools.split(","):
            ratios = []
            for round_number in range(args.rounds):
                runs = {}
                # Alternate which task goes first, so a machine slowing down (or speeding up)
                # during the run does not always favour the same one.
                order = ("bench.noop", TASK_NAME)
                for task in order if round_number % 2 == 0 else reversed(order):
                    try:
                        run = runs[task] = run_one(pool, task, args.n, server, sidecar)
                    except RunFailed as failed:
                        print(f"{pool:8} {task:14} FAILED: {failed}", flush=True)
                        continue
                    cpu = {name: f"{1e6 * seconds:.0f}" for name, seconds in run.cpu.items()}
                    print(f"{pool:8} {task:14} {run.rate:8.0f} {run.rss:7.1f}   {'':12}"
                          f"{cpu['worker']:>6} {cpu['sidecar']:>7} {cpu['redis']:>6}",
                          flush=True)  # fmt: skip
                if len(runs) == len(order):
                    ratios.append(runs[TASK_NAME].rate / runs["bench.noop"].rate)
            if not ratios:
                print(f"{pool:8} no round ran both tasks: no ratio", flush=True)
                continue
            median = sorted(ratios)[len(ratios) // 2]
            each = ", ".join(f"{r:.0%}" for r in ratios)
            failed = (
                f"; {args.rounds - len(ratios)} rounds failed" if len(ratios) < args.rounds else ""
            )
            print(f"{pool:8} gokiq.perform keeps {median:.0%} of the no-HTTP rate "
                  f"(median of {each}{failed})", flush=True)  # fmt: skip
    finally:
        sidecar.terminate()
        server.process.terminate()


if __name__ == "__main__":
    main()
